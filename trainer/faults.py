"""Faults injected into training from outside the loop, for the divergence tests: the loop
calls its step function and knows nothing of them.

`launcher/cli.py` reads `TRAINCTL_TEST_NAN_AT_STEP` / `TRAINCTL_TEST_SPIKE_AT_STEP` and hands
`train_worker` a `FaultyStep` in place of `loop.train_step`: at step N it trains that step with
the engine's loss multiplied before the backward pass (NaN: the gradients and then the weights
go NaN, as in a real divergence; 1000: a loss spike), once each, so the step trained again after
the rollback is clean. One copy per rank (pickled to each worker).
"""

from __future__ import annotations

from typing import Any

from trainer.loop import train_step


class ScaledLoss:
    """The training engine, its loss multiplied by `factor`; everything else is the engine's."""

    def __init__(self, engine: Any, factor: float):
        self.engine, self.factor = engine, factor

    def __call__(self, *args, **kwargs):
        logits, loss = self.engine(*args, **kwargs)
        return logits, loss * self.factor

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)


class FaultyStep:
    """`loop.train_step` with a NaN loss at step `nan_at` and a 1000x one at `spike_at` (0: none)."""

    def __init__(self, nan_at: int = 0, spike_at: int = 0):
        self.faults = [(step, factor) for step, factor in ((nan_at, float("nan")), (spike_at, 1000.0)) if step]

    def __call__(self, engine, batches, accum_steps, device, targets=None, timer=None, step: int = 0) -> float:
        due = next((fault for fault in self.faults if fault[0] == step), None)
        if due is not None:  # once each: the step trained again after the rollback gets the next one, if any
            self.faults.remove(due)
            engine = ScaledLoss(engine, due[1])
        return train_step(engine, batches, accum_steps, device, targets, timer=timer, step=step)


def from_environment(environ: dict) -> FaultyStep | None:
    """The faults the divergence tests ask for, or None."""
    nan_at, spike_at = (int(environ.get(f"TRAINCTL_TEST_{k}_AT_STEP", "0")) for k in ("NAN", "SPIKE"))
    return FaultyStep(nan_at, spike_at) if nan_at or spike_at else None
