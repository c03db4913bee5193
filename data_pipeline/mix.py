"""Mixing several datasets by weight, deterministically and resumably: each global-batch
row's source is drawn by a generator seeded by (seed, step), so the mix, like the rest of
the order, is a pure function of the position.

Prepared datasets are read per rank, through the same lanes as one dataset
(data_pipeline.lanes): each source is laid out in the global batch's lanes, and lane p of
source s moves on by one window each time one of lane p's rows draws s. Every rank keeps
every lane's count (a few integers a lane), so a position resumes on any number of ranks,
but reads only its own lanes' chunks. Raw-text sources keep the older way: each source is a
stream of one window per step, read whole on every rank.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import numpy as np
import torch

from data_pipeline.batchstream import LANES, BatchStream, effective_lanes
from data_pipeline.errors import DataError
from data_pipeline.lanes import LaneReader, TokenStream
from data_pipeline.raw import RawOptions
from data_pipeline.shardstream import ShardStream
from data_pipeline.streams import dataset_stream


class MixedStream(BatchStream):
    """BatchStream's interface over several weighted sources."""

    def __init__(
        self,
        sources: list[tuple[str, float]],
        seq_len: int,
        micro_batch_size: int,
        rank: int,
        world_size: int,
        grad_accum_steps: int = 1,
        seed: int = 0,
        shuffle_buffer: int = 8192,
        on_error: str = "fail",
        raw: RawOptions | None = None,
        lanes: int = LANES,
    ):
        if not sources:
            raise DataError("data.sources is empty: give at least one {path, weight}")
        weights = np.array([w for _, w in sources], dtype=np.float64)
        if (weights <= 0).any() or not np.isfinite(weights).all():
            raise DataError(f"data.sources weights {weights.tolist()} must all be positive numbers")
        self.weights = weights / weights.sum()
        self.names = [path for path, _ in sources]
        global_batch = micro_batch_size * world_size * grad_accum_steps
        self.lanes = effective_lanes(global_batch, lanes)
        # Each source: its own order (seed + index), laid out in the lanes (one window a lane a
        # step at most), or for raw-text sources one window per step.
        self.subs = [
            dataset_stream(
                path,
                "train",
                seq_len,
                self.lanes,
                0,
                1,
                seed=seed + 1009 * i,
                shuffle_buffer=shuffle_buffer,
                on_error=on_error,
                raw=raw,
                lanes=self.lanes,
            )
            for i, (path, _) in enumerate(sources)
        ]
        self.per_rank = all(isinstance(sub, TokenStream) for sub in self.subs)
        if not self.per_rank:
            self.subs = [
                ShardStream(
                    sub.manifest,
                    "train",
                    seq_len,
                    1,
                    0,
                    1,
                    seed=sub.seed,
                    shuffle_buffer=shuffle_buffer,
                    on_error=on_error,
                )
                for sub in self.subs
            ]
        if any(s.manifest["tokenizer"] != self.subs[0].manifest["tokenizer"] for s in self.subs):
            raise DataError("data.sources use different tokenizers: prepare them all with the same --tokenizer")
        self.manifest = self.subs[0].manifest
        # Rows of sources of different dtypes (a packed uint32 chat dataset, a uint16 text one) travel in the widest.
        self.dtype = np.result_type(*(sub.dtype for sub in self.subs))
        super().__init__(seq_len, micro_batch_size, rank, world_size, grad_accum_steps, seed)
        self.step = 0
        self.taken = np.zeros(len(sources), dtype=np.int64)  # windows drawn from each source so far
        # Per source and lane: the epoch it is in, and windows taken in that epoch.
        self.lane_epoch = np.zeros((len(sources), self.lanes), dtype=np.int64)
        self.lane_v = np.zeros((len(sources), self.lanes), dtype=np.int64)
        self._skipped: list[str] = []

    @property
    def epoch(self) -> int:
        return int(self.lane_epoch[0].min()) if self.per_rank else self.subs[0].epoch

    @property
    def skipped(self) -> list[str]:
        return self._skipped if self.per_rank else [url for s in self.subs for url in s.skipped]

    def proportions(self) -> dict[str, float]:
        """The realised share of each source so far."""
        total = max(int(self.taken.sum()), 1)
        return {name: int(n) / total for name, n in zip(self.names, self.taken)}

    def row_sources(self, step: int) -> np.ndarray:
        """The source of each of the step's global-batch rows."""
        return np.random.default_rng([self.seed, 7919, step]).choice(
            len(self.subs), size=self.global_batch, p=self.weights
        )

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "seed": self.seed,
            "global_batch": self.global_batch,
            "seq_len": self.seq_len,
            "names": self.names,
            "taken": self.taken.tolist(),
            **(
                {"lanes": self.lanes, "lane_epoch": self.lane_epoch.tolist(), "lane_v": self.lane_v.tolist()}
                if self.per_rank
                else {"sources": [s.state_dict() for s in self.subs]}
            ),
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("names") != self.names:
            raise DataError(
                f"the saved data position mixes {state.get('names')} but this job mixes {self.names}: "
                "resume with the same data.sources or start a fresh run"
            )
        self._check_state(state)
        if self.per_rank:
            if "lane_v" not in state or state["lanes"] != self.lanes:
                raise DataError(
                    f"the saved data position mixes its sources in {state.get('lanes', 'no')} lanes but this job uses "
                    f"{self.lanes}: resume with the same data.lanes (and a trainctl that reads per rank), or start a "
                    "fresh run"
                )
            self.lane_epoch = np.array(state["lane_epoch"], dtype=np.int64)
            self.lane_v = np.array(state["lane_v"], dtype=np.int64)
        else:
            for sub, sub_state in zip(self.subs, state["sources"]):
                sub.load_state_dict(sub_state)
        self.step, self.taken = state["step"], np.array(state["taken"], dtype=np.int64)

    def position(self) -> dict:
        return {**super().position(), "mix": self.proportions()}

    def rounds(self, worker: int = 0, workers: int = 1, group: int = 1) -> Iterator[tuple]:
        """BatchStream.rounds; for prepared sources, this process reads only its share of this
        rank's lanes' chunks (chunks are read when first needed, not ahead)."""
        if not self.per_rank:
            yield from self._whole_rounds(worker, workers, group)
            return
        readers = [LaneReader(sub, worker, workers) for sub in self.subs]
        rows_per_step = self.micro_batch_size * self.accum
        g = self.global_batch // self.lanes
        lane = np.arange(self.global_batch) // g
        mine_rows = np.arange(self.rank * rows_per_step, (self.rank + 1) * rows_per_step)
        try:
            while True:
                index, rows, positions = [], [], []
                for n in range(group):
                    src = self.row_sources(self.step)
                    # Each row's window: its lane's count in its source, plus the rows before it
                    # in the same lane that drew the same source.
                    key = src * self.lanes + lane
                    order = np.argsort(key, kind="stable")
                    first = np.searchsorted(key[order], key[order])
                    before = np.empty_like(key)
                    before[order] = np.arange(len(key)) - first
                    for out, r in enumerate(mine_rows.tolist()):
                        s, p = int(src[r]), int(lane[r])
                        e, v = self._wrap(s, int(self.lane_epoch[s, p]), int(self.lane_v[s, p] + before[r]))
                        layout = self.subs[s].layout(e)
                        x, j, k, wrapped = (int(a[0]) for a in layout.locate_rows(np.array([p]), np.array([v])))
                        if readers[s].mine(p, j):
                            index.append(n * rows_per_step + out)
                            rows.append(readers[s].window(e, p, x, j, k, bool(wrapped)))
                    np.add.at(self.lane_v, (src, lane), 1)
                    for s, sub in enumerate(self.subs):  # lanes that finished an epoch of a source
                        for e in np.unique(self.lane_epoch[s]).tolist():
                            done = (self.lane_epoch[s] == e) & (self.lane_v[s] >= sub.layout(e).length)
                            for p in np.flatnonzero(done).tolist():
                                self.lane_epoch[s, p], self.lane_v[s, p] = self._wrap(s, e, int(self.lane_v[s, p]))
                    np.add.at(self.taken, src, 1)
                    self.step += 1
                    self._skipped = [u for r in readers for u in r.skipped]
                    positions.append(self.position())
                block = (
                    np.stack(rows).astype(self.dtype, copy=False)
                    if rows
                    else np.zeros((0, self.seq_len + 1), self.dtype)
                )
                yield np.array(index, dtype=np.int64), block, positions, sum(r.nbytes for r in readers)
        finally:
            for r in readers:
                r.close()

    def _wrap(self, s: int, epoch: int, v: int) -> tuple[int, int]:
        """(epoch, v) of a lane's v-th window from the start of `epoch` of source s."""
        while v >= (length := self.subs[s].layout(epoch).length):
            epoch, v = epoch + 1, v - length
        return epoch, v

    def _whole_rounds(self, worker: int, workers: int, group: int) -> Iterator[tuple]:
        """rounds() with raw-text sources: every process draws every window of every step (one
        window a step from each source's stream), and worker k of `workers` builds rounds k,
        k + workers, ... (an empty item for the others')."""
        rows = self.micro_batch_size * self.accum
        its = [iter(s) for s in self.subs]
        for n in itertools.count():
            block, positions = [], []
            for _ in range(group):
                sources = self.row_sources(self.step)
                batch = [next(its[i])[0] for i in sources]
                if n % workers == worker:
                    block.append(torch.stack(batch[self.rank * rows : (self.rank + 1) * rows]).numpy())
                np.add.at(self.taken, sources, 1)
                self.step += 1
                positions.append(self.position())
            if block:
                yield np.arange(group * rows), np.concatenate(block), positions, 0
            else:
                yield np.zeros(0, np.int64), np.zeros((0, self.seq_len + 1), np.int64), positions, 0
