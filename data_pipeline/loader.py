"""Batches built in DataLoader worker processes, in the stream's exact order.

The stream's steps go out in rounds of `group` steps (about 4 MB). In every round each
worker contributes its share (stream.rounds: for prepared token shards the rows of the
chunks it reads, data_pipeline.lanes; otherwise whole rounds in turn), and the DataLoader
hands the workers' items out in turn, so the training process assembles each round from
one item of each: the sequence is the stream's own for any number of workers. The loader
keeps the position of the last batch handed out, not of what the workers have prefetched,
so a checkpoint records exactly what the model has seen.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_pipeline.errors import DataError


class _Rounds(IterableDataset):
    """One DataLoader worker's contribution to each round: (flat row indices, rows, the
    positions after the round's steps, bytes it holds). An error comes through as its
    message, so the training process can raise it as one line."""

    def __init__(self, stream, group: int):
        self.stream, self.group = stream, group

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        try:
            for index, rows, positions, held in self.stream.rounds(worker, workers, self.group):
                yield torch.from_numpy(index), torch.from_numpy(rows), positions, held
        except DataError as e:
            yield None, None, [{"error": str(e)}], 0


def _ignore_sigterm(worker: int) -> None:
    """A DataLoader worker leaves SIGTERM to the training process: a stop sent to the whole
    process group (`scancel`, a pod's eviction, `kill -TERM -PGID`) must not kill the workers
    under a rank that is about to save at the next step (torch's own handler would end the
    worker, and the rank would fail with "DataLoader worker ... killed by signal")."""
    signal.signal(
        signal.SIGTERM, _ignore
    )  # a handler, not SIG_IGN: a `pipe:` command exec'd from here gets the default back


def _ignore(signum, frame) -> None:
    pass


class Loader:
    """Micro batches of a BatchStream (TokenStream, ShardStream, MixedStream), with its position.

    num_workers=0 builds them in this process; pin_memory (for a GPU) puts them in page-locked
    memory, so `.to(device, non_blocking=True)` overlaps the copy with compute.
    """

    def __init__(
        self, stream, num_workers: int = 0, pin_memory: bool = False, prefetch_factor: int = 2, group: int | None = None
    ):
        self.stream, self.num_workers, self.pin_memory, self.prefetch_factor = (
            stream,
            num_workers,
            pin_memory,
            prefetch_factor,
        )
        step_bytes = stream.micro_batch_size * stream.accum * (stream.seq_len + 1) * 8
        self.group = group or min(max((4 << 20) // step_bytes, 1), 64)  # steps handed over at once: about 4 MB
        self.position = stream.position()
        self.held: dict[int, int] = {}

    @property
    def manifest(self) -> dict:
        return self.stream.manifest

    @property
    def epoch(self) -> int:
        return self.position["epoch"]

    @property
    def skipped(self) -> list[str]:
        return self.position["skipped"]

    def proportions(self) -> dict[str, float]:
        return self.position.get("mix", {})

    def state_dict(self) -> dict:
        """The position after the last batch handed out."""
        return self.position["state"]

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position (before iterating)."""
        self.stream.load_state_dict(state)
        self.position = self.stream.position()

    def _items(self) -> Iterator[tuple]:
        if self.num_workers == 0:
            yield from self.stream.rounds(0, 1, self.group)
            return
        yield from DataLoader(
            _Rounds(self.stream, self.group),
            batch_size=None,
            num_workers=self.num_workers,
            prefetch_factor=self.prefetch_factor,
            worker_init_fn=_ignore_sigterm,
        )

    def _steps(self) -> Iterator[tuple[torch.Tensor, dict]]:
        """(this rank's rows of a step, the position after it), in order: each round put
        together from one item of every worker."""
        s = self.stream
        rows, workers = s.micro_batch_size * s.accum, max(self.num_workers, 1)
        items, skipped = self._items(), list(self.position["skipped"])
        while True:
            parts = []
            for worker in range(workers):
                index, block, positions, nbytes = next(items)
                if index is None:
                    raise DataError(positions[0]["error"])
                parts.append((np.asarray(index), np.asarray(block)))
                self.held[worker] = nbytes
                skipped += [u for p in positions for u in p["skipped"] if u not in skipped]
                if worker == 0:
                    steps = positions
            # Rows travel in the dataset's dtype (uint16: a quarter of int64) and widen here, a step at a time;
            # mixed sources' parts may differ (uint16 text, uint32 packed examples): the widest holds them all.
            dtypes = [b.dtype for _, b in parts if len(b)]
            dtype = np.result_type(*dtypes) if dtypes else np.int64
            out = np.empty((self.group * rows, s.seq_len + 1), dtype=dtype)
            for index, block in parts:
                out[index] = block
            for n, position in enumerate(steps):
                step = torch.from_numpy(out[n * rows : (n + 1) * rows].astype(np.int64))
                yield (step.pin_memory() if self.pin_memory else step), {**position, "skipped": list(skipped)}

    @property
    def held_bytes(self) -> int:
        """Bytes of chunks the workers (or this process) held for this rank at their last round."""
        return sum(self.held.values())

    def __iter__(self) -> Iterator[torch.Tensor]:
        b, accum = self.stream.micro_batch_size, self.stream.accum
        for rows, position in self._steps():
            self.position = position  # set as the step's first micro batch goes out, as the stream does
            for a in range(accum):
                yield rows[a * b : (a + 1) * b]
