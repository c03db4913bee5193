"""TokenStream: per-rank reads of prepared token shards, the global batch as P lanes, each
reading its own contiguous part of the corpus in checksummed chunks of a few MB, in the
order data_pipeline.layout lays out.

Rank r trains rows [r·G/W, (r+1)·G/W), which for W dividing P are whole lanes: it reads
only those lanes' chunks, each with one ranged request, checked before any token is used.
Its DataLoader workers split them (worker (lane + chunk slot) mod workers reads that
chunk). A lane holds one chunk at a time as pieces (`Held`) and frees each piece once
passed, so a rank holds about lanes × chunk / 2.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from data_pipeline.batchstream import LANES, BatchStream, effective_lanes
from data_pipeline.chunks import ChunkTable
from data_pipeline.errors import DataError
from data_pipeline.examples import window_stride
from data_pipeline.layout import ChunkOrder, Layout
from data_pipeline.manifest import open_dataset
from data_pipeline.raw import FORMAT as RAW_FORMAT
from data_pipeline.raw import RawOptions
from data_pipeline.redact import redact_text
from data_pipeline.windows import window_count

# Windows are shuffled within pieces of a chunk, freed one by one as a lane passes them: the
# fewer the lanes, the larger the pieces (lanes x piece / 2 is what freeing by piece costs, kept
# under PIECE_BUDGET), down to PIECE_BYTES. 16 lanes shuffle 2 MB pieces, 512 lanes 64 KB ones.
PIECE_BYTES = 64 << 10
PIECE_BUDGET = 32 << 20
SKIP_RUN = 16  # on_error=skip gives up after this many chunks in a row fail


class Held:
    """The pieces of one chunk that one lane still needs, in the chunk's order."""

    def __init__(
        self,
        tokens: np.ndarray,
        order: ChunkOrder,
        offset: int,
        seq_len: int,
        k_lo: int,
        k_hi: int,
        free: bool = True,
        stride: int | None = None,
    ):
        self.order, self.seq_len, self.free, self.stride = order, seq_len, free, stride or seq_len
        self.pieces: dict[int, np.ndarray] = {}
        first, last = order.slot(k_lo)[0], order.slot(max(k_hi - 1, k_lo))[0]
        for q in range(first, last + 1):
            w0 = int(order.sigma[q]) * order.piece
            a = offset + w0 * self.stride
            self.pieces[q] = tokens[a : a + (int(order.sizes[q]) - 1) * self.stride + seq_len + 1].copy()
        self.nbytes = sum(p.nbytes for p in self.pieces.values())
        self.q, self.tau = None, None  # the piece being read, and its windows' order

    def window(self, k: int) -> np.ndarray:
        k %= self.order.n  # a stand-in chunk may hold fewer windows
        q = self.q
        if q is None or not self.order.starts[q] <= k < self.order.starts[q + 1]:
            q = self.q = self.order.slot(k)[0]
            self.tau = self.order.tau(q)
            if self.free:  # a lane's positions only grow: free the pieces it passed
                for done in [p for p in self.pieces if p < q]:
                    self.nbytes -= self.pieces.pop(done).nbytes
        t = int(self.tau[k - self.order.starts[q]]) * self.stride
        return self.pieces[q][t : t + self.seq_len + 1]


class LaneReader:
    """Reads what one process (a rank, or one of its DataLoader workers) needs of the lanes,
    a few steps ahead in a thread, and hands out windows by (epoch, lane, v)."""

    def __init__(self, stream: TokenStream, worker: int, workers: int):
        self.s, self.worker, self.workers = stream, worker, workers
        # A lane's run through a chunk is keyed (epoch, slot, wrapped): a lane whose rotation
        # point falls inside a chunk passes through it twice in the epoch, reading it twice.
        self.held: dict[int, tuple[tuple[int, int, bool], Held]] = {}  # lane -> (key, pieces)
        self.pending: dict[tuple[int, tuple[int, int, bool]], Future] = {}  # (lane, key) -> (chunk, tokens)
        self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="trainctl-chunks")
        self.skipped: list[str] = []

    def mine(self, lane: int, slot: int) -> bool:
        return (lane + slot) % self.workers == self.worker

    def prefetch(self, epoch: int, lane: int, j: int, wrapped: bool) -> None:
        """Start reading slot j for `lane` in a thread, unless this process has or reads it."""
        key = (epoch, j, wrapped)
        held = self.held.get(lane)
        if self.mine(lane, j) and (lane, key) not in self.pending and (held is None or held[0] != key):
            self.pending[lane, key] = self.pool.submit(self._read_slot, epoch, j)

    def _read_slot(self, epoch: int, j: int) -> tuple[int, np.ndarray]:
        """(chunk, tokens) for slot j; under on_error=skip a chunk that fails is named,
        recorded, and the next slot's chunk stands in for it (the same for every rank)."""
        layout = self.s.layout(epoch)
        table = self.s.table
        tries = min(len(table), SKIP_RUN)
        for attempt in range(tries):
            c = int(layout.perm[(j + attempt) % len(table)])
            try:
                return c, table.read(c, self.s.dtype)
            except DataError as e:
                if self.s.on_error != "skip":
                    raise
                print(
                    f"trainctl: warning: skipping a chunk (data.on_error=skip): {redact_text(str(e))}",
                    file=sys.stderr,
                    flush=True,
                )
                self.skipped.append(table.name(c))
        if tries == len(table):
            raise DataError(
                f"every chunk of {self.s.manifest['root']} failed (data.on_error=skip): nothing to train on"
            )
        raise DataError(
            f"{tries} chunks in a row of {self.s.manifest['root']} failed (data.on_error=skip): "
            "the storage is likely down or the dataset damaged; check it, or prepare the dataset again"
        )

    def window(self, epoch: int, lane: int, x: int, j: int, k: int, wrapped: bool) -> np.ndarray:
        """The window at place x (slot j, index k) of the epoch's sequence, for `lane`."""
        layout = self.s.layout(epoch)
        key = (epoch, j, wrapped)
        held = self.held.get(lane)
        if held is None or held[0] != key:
            self.held.pop(lane, None)  # the lane is past it: freed before the next is split
            future = self.pending.pop((lane, key), None)
            c, tokens = future.result() if future is not None else self._read_slot(epoch, j)
            n, own = int(layout.windows[j]), c == int(layout.perm[j])
            if own:
                k_lo, k_hi = k, min(int(layout.starts[j + 1]), layout.run_end(lane, x)) - int(layout.starts[j])
            else:  # a stand-in for a skipped chunk: any of its windows may be needed
                n = int(window_count(len(tokens) - layout.offset, self.s.seq_len, self.s.stride))
                if n < 1:
                    raise DataError(f"chunk {self.s.table.name(c)} is too short to stand in for a skipped chunk")
                k_lo, k_hi = 0, n
            order = ChunkOrder(n, self.s.piece, self.s.seed, epoch, c, self.s.shuffle)
            held = (key, Held(tokens, order, layout.offset, self.s.seq_len, k_lo, k_hi, own, self.s.stride))
            self.held[lane] = held
        return held[1].window(k)

    @property
    def nbytes(self) -> int:
        return sum(h.nbytes for _, h in self.held.values()) + sum(
            f.result()[1].nbytes for f in self.pending.values() if f.done() and not f.exception()
        )

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


class TokenStream(BatchStream):
    """An endless, resumable iterator of (micro_batch_size, seq_len+1) int64 batches for one
    rank of a prepared token dataset, reading only this rank's lanes (module docstring).
    `data`: a prepared dataset (its folder or manifest.json, or a shard list of one) or its
    manifest; `manifest`: data's manifest, when the caller has opened it already. Raw-text
    shards have no token counts to lay lanes out with: data_pipeline.streams.dataset_stream
    gives them a ShardStream.

    >>> stream = TokenStream("data/book", "train", 256, 8, rank=0, world_size=2)  # doctest: +SKIP
    >>> batch = next(iter(stream))  # (8, 257); inputs batch[:, :-1], targets batch[:, 1:]
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
        on_error: str = "fail",
        lanes: int = LANES,
        raw: RawOptions | None = None,
        manifest: dict | None = None,
        **_ignored,
    ):
        if manifest is None:
            manifest = data if isinstance(data, dict) else open_dataset(data, raw)
        self.manifest = manifest
        if on_error not in ("fail", "skip"):
            raise ValueError(f"on_error={on_error!r} must be 'fail' or 'skip'")
        if lanes < 1:
            raise DataError(f"data.lanes={lanes} must be at least 1")
        name = data if isinstance(data, str) else self.manifest.get("name", self.manifest["root"])
        if manifest["format"] == RAW_FORMAT:
            raise DataError(
                f"{name} holds raw-text shards, which have no token counts to lay lanes out with: "
                "read them with data_pipeline.dataset_stream (a ShardStream)"
            )
        if split not in self.manifest["splits"]:
            raise DataError(f"the dataset {name} has no '{split}' split")
        super().__init__(seq_len, micro_batch_size, rank, world_size, grad_accum_steps, seed)
        self.table = ChunkTable(self.manifest["splits"][split]["shards"])
        if self.table.whole and rank == 0:
            print(
                f"trainctl: note: {self.manifest['root']} was prepared without per-chunk checksums: each rank reads "
                "whole shards; prepare it again for per-rank reads",
                file=sys.stderr,
                flush=True,
            )
        self.dtype = np.dtype(self.manifest["dtype"])
        self.stride = window_stride(self.manifest, seq_len, name)  # seq_len, or seq_len + 1 for packed rows
        self.shuffle, self.on_error, self.lanes = shuffle, on_error, effective_lanes(self.global_batch, lanes)
        self.piece = max(max(PIECE_BYTES, PIECE_BUDGET // self.lanes) // (self.stride * self.dtype.itemsize), 1)
        self.tokens = int(self.table.tokens.sum())
        self._layouts: dict[int, Layout] = {}
        if self.layout(0).steps == 0:
            raise DataError(
                f"the {split} split of {name} holds {self.tokens:,} tokens, too few for one global batch of "
                f"{self.global_batch} x {seq_len + 1} tokens: add data or lower the batch size or data.seq_len"
            )
        self.epoch, self.step_in_epoch = 0, 0
        self.runs = self.lane_runs(self.lanes)
        self.skipped: list[str] = []

    def layout(self, epoch: int) -> Layout:
        # The loader's threads ask at once (reading ahead, and the steps to the horizon), so
        # no check-then-pop: two threads evicted the same oldest epoch (a KeyError seen in
        # CI). list() of a dict and pop(key, None) are each one step under the GIL; a lock
        # would be copied held into a forked DataLoader worker.
        layouts = self._layouts
        found = layouts.get(epoch)
        if found is None:
            found = Layout(
                self.table, self.seq_len, self.global_batch, self.lanes, self.seed, epoch, self.shuffle, self.stride
            )
            layouts[epoch] = found
            for old in sorted(list(layouts))[:-3]:  # the newest three epochs kept
                layouts.pop(old, None)
        return found

    @property
    def steps_per_epoch(self) -> int:
        return self.layout(self.epoch).steps

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "seed": self.seed,
            "global_batch": self.global_batch,
            "seq_len": self.seq_len,
            "lanes": self.lanes,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position (call before iterating). The global batch, the
        sequence length, the seed and the lanes must match; the number of ranks may differ."""
        self._check_state(state)
        if state.get("lanes", self.lanes) != self.lanes:
            raise DataError(
                f"the saved data position has {state['lanes']} lanes but this job has {self.lanes}: "
                f"resume with data.lanes={state['lanes']} or start a fresh run"
            )
        self.epoch, self.step_in_epoch = state["epoch"], state["step_in_epoch"]

    def _advance(self) -> None:
        self.step_in_epoch += 1
        if self.step_in_epoch == self.layout(self.epoch).steps:
            self.epoch, self.step_in_epoch = self.epoch + 1, 0

    def rounds(self, worker: int = 0, workers: int = 1, group: int = 1) -> Iterator[tuple]:
        """(flat row indices into the round's (steps, rows) grid, those rows, the position
        after each step, bytes held) for `group` steps at a time, from the current position
        on, endlessly: this process's share (worker of workers) of this rank's rows."""
        reader = LaneReader(self, worker, workers)
        rows_per_step = self.micro_batch_size * self.accum
        g = self.global_batch // self.lanes
        lane = np.concatenate([np.full(i1 - i0, lane, np.int64) for lane, i0, i1 in self.runs])
        row = np.concatenate([np.arange(i0, i1) for _, i0, i1 in self.runs])
        ahead = 2 * group  # steps read ahead: the next round's chunks are read during this one
        try:
            horizon, last = (self.epoch, self.step_in_epoch), None
            while True:
                index, rows, positions = [], [], []
                for n in range(group):
                    epoch, step = self.epoch, self.step_in_epoch
                    # Read ahead: start reading the chunks lanes enter up to `ahead` steps from here.
                    while horizon <= (epoch, step) or _steps_between((epoch, step), horizon, self) < ahead:
                        e, s = horizon
                        _, j, _, wrapped = self.layout(e).locate_rows(lane, s * g + row)
                        fresh = last is None or last[0] != e
                        new = np.ones(len(j), bool) if fresh else (j != last[1]) | (wrapped != last[2])
                        for r in np.flatnonzero(new):
                            reader.prefetch(e, int(lane[r]), int(j[r]), bool(wrapped[r]))
                        last = (e, j, wrapped)
                        horizon = (e, s + 1) if s + 1 < self.layout(e).steps else (e + 1, 0)
                    x, j, k, wrapped = self.layout(epoch).locate_rows(lane, step * g + row)
                    mine = np.flatnonzero((lane + j) % workers == worker)
                    index.append(n * rows_per_step + mine)
                    for r in mine.tolist():
                        rows.append(
                            reader.window(epoch, int(lane[r]), int(x[r]), int(j[r]), int(k[r]), bool(wrapped[r]))
                        )
                    self._advance()
                    self.skipped = reader.skipped
                    positions.append(self.position())
                block = np.stack(rows) if rows else np.zeros((0, self.seq_len + 1), self.dtype)
                yield np.concatenate(index), block, positions, reader.nbytes
        finally:
            reader.close()


def _steps_between(a: tuple[int, int], b: tuple[int, int], stream: TokenStream) -> int:
    """Steps from position a to position b (b after a)."""
    if a[0] == b[0]:
        return b[1] - a[1]
    return stream.layout(a[0]).steps - a[1] + sum(stream.layout(e).steps for e in range(a[0] + 1, b[0])) + b[1]
