"""The divergence guard: a step whose loss is non-finite or spikes is not kept. The loop
rolls back to the newest whole checkpoint, and the guard has the data window that
diverged passed over untrained when the run gets back to it (the same batches would
diverge again), records the rollback in `rollbacks.jsonl`, and gives up after
`train.max_rollbacks`.

The guard keeps no state a restart needs: the rollback count and the pending skip live in
the loop's `TrainState`, which every checkpoint carries.
"""

from __future__ import annotations

import json
import math
from collections import deque
from collections.abc import Iterator
from pathlib import Path

from trainer.console import warn

SPIKE_WINDOW = 20  # steps whose mean loss a spike is measured against


class Diverged(RuntimeError):
    """The loss went non-finite or spiked more often than train.max_rollbacks allows."""


def loss_alarm(loss: float, recent: deque, factor: float | None) -> str | None:
    """Why a step's loss (the mean over ranks) must not stand, or None."""
    if not math.isfinite(loss):
        return f"the loss is {loss}"
    if factor is not None and len(recent) == recent.maxlen:
        mean = sum(recent) / len(recent)
        if loss > factor * mean:
            return f"the loss {loss:.4f} is {loss / mean:.1f}x the mean of the last {len(recent)} steps ({mean:.4f})"
    return None


class DivergenceGuard:
    """`check(loss)` after each step; on an alarm the loop calls `rollback(...)` with the
    checkpoint it will restore, then `rolled_back(...)` once restored; `skip_window(...)`
    before each step. `log` (rank 0 only) is where rollbacks are recorded."""

    def __init__(self, spike_factor: float | None, max_rollbacks: int, log: Path | None = None):
        self.factor, self.max_rollbacks, self.log = spike_factor, max_rollbacks, log
        self.recent: deque[float] = deque(maxlen=SPIKE_WINDOW)
        self.steps: deque[int] = deque(maxlen=SPIKE_WINDOW)  # the step of each loss in `recent`

    def check(self, loss: float, step: int = 0) -> str | None:
        """The alarm for step `step`'s loss, or None (then the loss joins the spike window)."""
        alarm = loss_alarm(loss, self.recent, self.factor)
        if alarm is None:
            self.recent.append(loss)
            self.steps.append(step)
        return alarm

    def allow(self, rollbacks: int, step: int, alarm: str, good: Path | None) -> None:
        """Raise Diverged unless rollback number `rollbacks` to `good` may go ahead."""
        if rollbacks > self.max_rollbacks or good is None:
            why = (
                f"{self.max_rollbacks} rollbacks allowed (train.max_rollbacks)"
                if good is not None
                else "no checkpoint to roll back to (save sooner: checkpoint.every)"
            )
            raise Diverged(f"step {step}: {alarm}; {why}: lower train.lr or raise train.warmup_steps")

    def rolled_back(
        self, bad_step: int, alarm: str, good: Path, rollbacks: int, position: dict, good_step: int = -1
    ) -> int:
        """After the restore to `good` (of step `good_step`): the spike window keeps the
        losses up to that step (they stand; the steps after it are trained again), so a
        spike soon after a rollback is still caught; record the rollback (rank 0); returns
        the step whose data window is to be skipped."""
        while self.steps and self.steps[-1] > good_step:
            self.steps.pop()
            self.recent.pop()
        if self.log is not None:
            warn(
                f"step {bad_step}: {alarm}: rolled back to {good} (rollback {rollbacks} of {self.max_rollbacks}); "
                f"the data of step {bad_step} will be skipped: {json.dumps(position)}"
            )
            with open(self.log, "a") as f:
                f.write(
                    json.dumps({"step": bad_step, "alarm": alarm, "checkpoint": str(good), "skipped": position}) + "\n"
                )
        return bad_step

    @staticmethod
    def skip_window(step: int, skip_step: int | None, batches: Iterator, accum_steps: int) -> int | None:
        """Consume the window of step `step` untrained if it is the one to skip; returns the
        skip still pending."""
        if step != skip_step:
            return skip_step
        for _ in range(accum_steps):
            next(batches)
        return None
