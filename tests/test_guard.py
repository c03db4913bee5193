"""The divergence guard and the loop's TrainState, driven directly (no engine, no ranks)."""

import json
import math

import pytest

from trainer.guard import SPIKE_WINDOW, Diverged, DivergenceGuard
from trainer.loop import TrainState


def test_alarm_on_a_non_finite_loss_and_the_window_fills_only_with_good_ones():
    guard = DivergenceGuard(spike_factor=None, max_rollbacks=2)
    assert guard.check(2.0) is None
    assert guard.check(math.nan) == "the loss is nan"
    assert guard.check(math.inf) == "the loss is inf"
    assert list(guard.recent) == [2.0]


def test_spike_is_measured_against_a_full_window_only():
    guard = DivergenceGuard(spike_factor=3.0, max_rollbacks=2)
    for _ in range(SPIKE_WINDOW - 1):
        assert guard.check(1.0) is None
    assert guard.check(10.0) is None  # 19 steps seen: no mean to compare with yet
    guard.recent.clear()
    for _ in range(SPIKE_WINDOW):
        guard.check(1.0)
    assert guard.check(3.0) is None  # not above 3x the mean of 1.0; the window now averages 1.1
    assert guard.check(3.5) == "the loss 3.5000 is 3.2x the mean of the last 20 steps (1.1000)"


def test_allow_gives_up_past_max_rollbacks_or_without_a_checkpoint(tmp_path):
    guard = DivergenceGuard(None, max_rollbacks=1)
    guard.allow(1, 15, "the loss is nan", tmp_path)  # the first of one allowed
    with pytest.raises(Diverged, match=r"step 15: the loss is nan; 1 rollbacks allowed \(train.max_rollbacks\)"):
        guard.allow(2, 15, "the loss is nan", tmp_path)
    with pytest.raises(Diverged, match="no checkpoint to roll back to"):
        guard.allow(1, 15, "the loss is nan", None)


def test_rolled_back_records_the_skipped_window_on_rank_0_only(tmp_path, capsys):
    log = tmp_path / "rollbacks.jsonl"
    guard = DivergenceGuard(None, 3, log)
    for step in range(1, 15):
        guard.check(float(step), step)
    position = {"epoch": 0, "batch": 14}
    assert guard.rolled_back(15, "the loss is nan", tmp_path / "step_00000010", 1, position, 10) == 15
    assert list(guard.recent) == [float(s) for s in range(1, 11)]  # the losses up to the checkpoint stand
    assert list(guard.steps) == list(range(1, 11))
    assert json.loads(log.read_text()) == {
        "step": 15,
        "alarm": "the loss is nan",
        "checkpoint": str(tmp_path / "step_00000010"),
        "skipped": position,
    }
    assert "rolled back to" in capsys.readouterr().err
    other = DivergenceGuard(None, 3, None)  # another rank: nothing written, nothing printed
    assert other.rolled_back(15, "x", tmp_path, 1, position) == 15
    assert log.read_text().count("\n") == 1 and capsys.readouterr().err == ""


def test_skip_window_consumes_one_step_of_batches_once():
    batches = iter(range(10))
    assert DivergenceGuard.skip_window(4, 5, batches, accum_steps=3) == 5  # not yet
    assert next(batches) == 0
    assert DivergenceGuard.skip_window(5, 5, batches, accum_steps=3) is None
    assert next(batches) == 4  # 1, 2, 3 passed over untrained


class Position:
    """A stand-in with the data stream's two state calls (the stream has its own tests)."""

    def __init__(self):
        self.at = {"batch": 0}

    def state_dict(self):
        return dict(self.at)

    def load_state_dict(self, state):
        self.at = dict(state)


def test_train_state_round_trips_and_reads_checkpoints_without_guard_fields():
    state = TrainState(Position(), step=7, tokens_seen=700, rollbacks=1, skip_step=6)
    state.stream.at = {"batch": 28}
    saved = state.state_dict()
    assert saved == {"data": {"batch": 28}, "step": 7, "tokens_seen": 700, "rollbacks": 1, "skip_step": 6}
    fresh = TrainState(Position())
    fresh.load_state_dict(saved)
    assert fresh.state_dict() == saved
    fresh.load_state_dict({"data": {"batch": 4}, "step": 1, "tokens_seen": 100})  # a checkpoint from before rollbacks
    assert (fresh.step, fresh.rollbacks, fresh.skip_step, fresh.stream.at) == (1, 0, None, {"batch": 4})
