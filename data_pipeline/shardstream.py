"""ShardStream: the batch stream of shards whose token counts are unknown until they are read
(raw-text shards, tokenized as read), the shards partitioned over lanes (see its docstring).
Prepared token shards are read per rank by data_pipeline.lanes.TokenStream instead
(data_pipeline.streams.dataset_stream picks); the validation set is data_pipeline.validation's.

The stages (of a lane): shards in order → tokens → windows of T+1 at stride T from an
offset (packed fine-tuning rows: at stride T+1 from 0, each window one row) → shuffled in
blocks of `shuffle_buffer` → batches of rows (data_pipeline.windows). Windows move a block
at a time as arrays, so no Python runs per window.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from data_pipeline.batchstream import LANES, BatchStream, effective_lanes
from data_pipeline.errors import DataError
from data_pipeline.examples import window_stride
from data_pipeline.manifest import open_dataset
from data_pipeline.raw import RawOptions
from data_pipeline.shardreads import read_shards, shard_reader
from data_pipeline.windows import row_batches, skip_tokens, window_blocks, window_count


class ShardStream(BatchStream):
    """An endless, resumable iterator of (micro_batch_size, seq_len+1) int64 batches for one
    rank of raw-text shards, whose token counts are unknown until they are tokenized.

    The shards are partitioned over `lanes` lanes (capped at a divisor of the global batch
    and at the number of shards), so the order does not depend on the number of ranks: in
    its epoch e, lane q reads shards perm_e[q::lanes], tokenized, windowed from a per-epoch
    offset and shuffled in blocks of `shuffle_buffer`, and gives g = G/lanes rows a step.
    Each lane runs through its epochs on its own (a rank cannot know other lanes' token
    counts), so the stream is endless with no common epoch end; a rank reads only its lanes'
    shards. A position is the step: a resume counts each lane's epochs by tokenizing their
    shards (each once) and re-reads only the current epoch's.
    """

    def __init__(
        self,
        data: str | dict,
        split: str,
        seq_len: int,
        micro_batch_size: int,
        rank: int,
        world_size: int,
        grad_accum_steps: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        shuffle_buffer: int = 8192,
        on_error: str = "fail",
        raw: RawOptions | None = None,
        lanes: int = LANES,
        **_ignored,
    ):
        if on_error not in ("fail", "skip"):
            raise ValueError(f"on_error={on_error!r} must be 'fail' or 'skip'")
        self.manifest = data if isinstance(data, dict) else open_dataset(data, raw)
        name = data if isinstance(data, str) else self.manifest.get("name", self.manifest["root"])
        self.read = shard_reader(self.manifest)
        if split not in self.manifest["splits"] or not self.manifest["splits"][split]["shards"]:
            raise DataError(f"the dataset {name} has no '{split}' split")
        self.shards = self.manifest["splits"][split]["shards"]
        self.dtype = np.dtype(self.manifest["dtype"])
        self.stride = window_stride(self.manifest, seq_len, name)
        super().__init__(seq_len, micro_batch_size, rank, world_size, grad_accum_steps, seed)
        self.shuffle, self.shuffle_buffer, self.on_error = shuffle, shuffle_buffer, on_error
        self.skipped: list[str] = []  # urls of shards passed over, in order
        self.lanes = effective_lanes(self.global_batch, min(lanes, len(self.shards)))
        self.runs = self.lane_runs(self.lanes)
        self.step = 0
        self.lane_epochs = {q: 0 for q, _, _ in self.runs}
        self.reading = [q for q, _, _ in self.runs]  # the lanes this process reads
        self._counts: dict[str, int] = {}  # tokens of each shard counted during a resume

    @property
    def steps_per_epoch(self) -> None:
        return None  # each lane's epochs end where its data ends

    @property
    def epoch(self) -> int:
        """The epoch of the slowest lane this process reads."""
        return min((self.lane_epochs[q] for q in self.reading), default=0)

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "seed": self.seed,
            "global_batch": self.global_batch,
            "seq_len": self.seq_len,
            "lanes": self.lanes,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position (call before iterating); the number of ranks may differ."""
        self._check_state(state)
        if "step" not in state or state.get("lanes") != self.lanes:
            raise DataError(
                f"the saved data position reads raw-text shards in {state.get('lanes', 'one stream, not')} lanes but "
                f"this job uses {self.lanes}: resume with the same data.lanes (and trainctl), or start a fresh run"
            )
        self.step = state["step"]

    def _lane_plan(self, q: int, epoch: int) -> tuple[list[dict], int]:
        """(lane q's shards in `epoch`, the token offset of its first window)."""
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.shards)) if self.shuffle else np.arange(len(self.shards))
        offset = int(rng.integers(self.seq_len)) if self.shuffle and self.stride == self.seq_len else 0
        return [self.shards[i] for i in order[q :: self.lanes]], offset

    def _count(self, shard: dict) -> int:
        url = shard["url"]
        if url not in self._counts:
            try:
                self._counts[url] = sum(len(a) for a in self.read(shard))
            except DataError:
                if self.on_error != "skip":
                    raise
                self._counts[url] = 0
        return self._counts[url]

    def _lane_rows(self, q: int, skip_windows: int) -> Iterator[np.ndarray]:
        """Lane q's rows, g at a time, endlessly, after its first `skip_windows` windows."""
        g = self.global_batch // self.lanes
        epoch, empty = 0, 0
        while True:
            shards, offset = self._lane_plan(q, epoch)
            if skip_windows:  # a resume: pass whole epochs by their token counts
                windows = window_count(sum(self._count(s) for s in shards) - offset, self.seq_len, self.stride) // g * g
                if skip_windows >= windows and windows:
                    skip_windows -= windows
                    epoch += 1
                    continue
            block = self.shuffle_buffer
            first = skip_windows // block * block
            chunks = skip_tokens(
                read_shards(shards, self.read, self.on_error, self.skipped), offset + first * self.stride
            )
            order = (
                (lambda j, n, e=epoch: np.random.default_rng([self.seed, e, q, j]).permutation(n))
                if self.shuffle
                else None
            )
            made = 0
            for rows in row_batches(
                window_blocks(chunks, self.seq_len, None, block, order, first // block, self.stride),
                g,
                skip_windows - first,
            ):
                made += 1
                yield rows
            skip_windows = 0
            self.lane_epochs[q] = epoch = epoch + 1
            empty = 0 if made else empty + 1
            if empty > self.lanes:
                raise DataError(
                    f"lane {q} of {self.manifest['root']} found no whole sequence in {empty} epochs: every shard "
                    "failed (data.on_error=skip) or the shards are too small; add data or lower data.lanes"
                )

    def rounds(self, worker: int = 0, workers: int = 1, group: int = 1) -> Iterator[tuple]:
        """BatchStream.rounds: DataLoader worker k reads the rank's lanes whose place among them
        is k mod workers (a worker with none contributes empty items)."""
        g, rows_per_step = self.global_batch // self.lanes, self.micro_batch_size * self.accum
        mine = [(n, run) for n, run in enumerate(self.runs) if n % workers == worker]
        self.reading = [q for _, (q, _, _) in mine]
        its = {q: self._lane_rows(q, self.step * g) for q in self.reading}
        starts = np.cumsum([0] + [i1 - i0 for _, i0, i1 in self.runs])
        while True:
            index, rows, positions = [], [], []
            for n in range(group):
                for k, (q, i0, i1) in mine:
                    index.append(n * rows_per_step + np.arange(starts[k], starts[k + 1]))
                    rows.append(next(its[q])[i0:i1])
                self.step += 1
                positions.append(self.position())
            block = np.concatenate(rows) if rows else np.zeros((0, self.seq_len + 1), self.dtype)
            yield np.concatenate(index) if index else np.zeros(0, np.int64), block, positions, 0
