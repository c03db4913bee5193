"""Batches built in DataLoader worker processes, in the stream's exact order.

Worker k builds every num_workers-th group of steps (about 4 MB each) and the DataLoader
hands the groups out in turn, so the sequence is the stream's own for any number of
workers. The loader keeps the position of the last batch handed out, not of what the
workers have prefetched, so a checkpoint records exactly what the model has seen.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_pipeline.errors import DataError


class _Steps(IterableDataset):
    """One DataLoader worker's share of the steps, `group` consecutive steps to an item:
    (their rows stacked, their positions). Handing over a few MB at a time keeps the cost of
    passing tensors between processes small. An error comes through as its message, so
    the training process can raise it as one line."""

    def __init__(self, stream, group: int):
        self.stream, self.group = stream, group

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        rows, positions = [], []
        try:
            for step_rows, position in self.stream.steps(worker, workers, self.group):
                if step_rows is None:
                    continue
                rows.append(step_rows)
                positions.append(position)
                if len(rows) == self.group:
                    yield torch.from_numpy(np.stack(rows)), positions
                    rows, positions = [], []
        except DataError as e:
            yield None, [{"error": str(e)}]


class Loader:
    """Micro batches of a TokenStream or MixedStream, with its position.

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

    def _steps(self) -> Iterator[tuple[torch.Tensor, dict]]:
        """(this rank's rows of a step, the position after it), in order."""
        if self.num_workers == 0:
            for rows, position in self.stream.steps():
                rows = torch.from_numpy(rows)
                yield (rows.pin_memory() if self.pin_memory else rows), position
            return
        for rows, positions in DataLoader(
            _Steps(self.stream, self.group),
            batch_size=None,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            prefetch_factor=self.prefetch_factor,
        ):
            if rows is None:
                raise DataError(positions[0]["error"])
            yield from zip(rows, positions)

    def __iter__(self) -> Iterator[torch.Tensor]:
        b, accum = self.stream.micro_batch_size, self.stream.accum
        for rows, position in self._steps():
            self.position = position  # set as the step's first micro batch goes out, as the stream does
            for a in range(accum):
                yield rows[a * b : (a + 1) * b]
