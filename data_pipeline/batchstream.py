"""What every batch stream shares (`BatchStream`: TokenStream, ShardStream, MixedStream): the
batch geometry, the checks of a saved position, this rank's rows as runs of lanes, and the
hand-out of rounds; and the lanes themselves: the global batch of G rows is read as P lanes
of G/P rows each (`LANES`, data.lanes' default; `effective_lanes`, the P a job uses).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from data_pipeline.errors import DataError

LANES = 256  # data.lanes' default: ranks up to this many read disjoint data


def effective_lanes(global_batch: int, lanes: int) -> int:
    """The number of lanes used: the largest divisor of the global batch not above `lanes`."""
    return max(d for d in range(1, min(lanes, global_batch) + 1) if global_batch % d == 0)


class BatchStream:
    """What TokenStream, ShardStream and MixedStream share: the batch geometry, the checks of
    a saved position, this rank's rows as runs of lanes, and the hand-out of rounds. A
    subclass makes `rounds()`, each process's share of this rank's rows (data_pipeline.loader)."""

    def __init__(
        self, seq_len: int, micro_batch_size: int, rank: int, world_size: int, grad_accum_steps: int, seed: int
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.seq_len, self.micro_batch_size, self.accum = seq_len, micro_batch_size, grad_accum_steps
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.global_batch = micro_batch_size * world_size * grad_accum_steps

    @property
    def vocab_size(self) -> int:
        return self.manifest["tokenizer"]["vocab_size"]

    def _check_state(self, state: dict) -> None:
        """A saved position must have this job's seed, global batch and sequence length."""
        for key in ("seed", "global_batch", "seq_len"):
            if state[key] != getattr(self, key):
                raise DataError(
                    f"the saved data position has {key}={state[key]} but this job has {getattr(self, key)}: "
                    f"resume with the same {key} or start a fresh run"
                )

    def lane_runs(self, lanes: int) -> list[tuple[int, int, int]]:
        """This rank's rows of a global batch of `lanes` lanes, as (lane, first row in the
        lane, end row) runs: whole lanes when the number of ranks divides the lanes."""
        rows, g = self.micro_batch_size * self.accum, self.global_batch // lanes
        first, last = self.rank * rows, (self.rank + 1) * rows
        return [(lane, max(first - lane * g, 0), min(last - lane * g, g)) for lane in range(first // g, -(-last // g))]

    def position(self) -> dict:
        """Where the stream stands, for the loop and the checkpoint: state_dict() plus the
        epoch and the shards skipped so far."""
        return {"state": self.state_dict(), "epoch": self.epoch, "skipped": list(self.skipped)}

    def rounds(self, worker: int = 0, workers: int = 1, group: int = 1) -> Iterator[tuple]:
        """(flat row indices into the round's (steps, rows) grid, those rows, the position
        after each step, bytes held) for `group` steps at a time, from the current position
        on, endlessly: what DataLoader worker `worker` of `workers` contributes to each round."""
        raise NotImplementedError

    def steps(self) -> Iterator[tuple[np.ndarray, dict]]:
        """(this rank's rows of each step as one (A·B, T+1) int64 array, the position after
        it), in this process."""
        for index, block, positions, _ in self.rounds(0, 1, 1):
            out = np.empty((self.micro_batch_size * self.accum, self.seq_len + 1), dtype=np.int64)
            out[index] = block
            yield out, positions[0]

    def __iter__(self) -> Iterator[torch.Tensor]:
        """Micro batches of (micro_batch_size, seq_len+1) tokens, in this process."""
        for rows, _ in self.steps():
            for a in range(self.accum):
                yield torch.from_numpy(rows[a * self.micro_batch_size : (a + 1) * self.micro_batch_size])
