"""cluster/restarts.py in this process: which worker failures recur (the job ends at once,
with its line and exit status) and which are restarted (after a wait that doubles, capped),
the attempt log's rows, and Ray Train's failures read the same way. Real groups fail and
restart in tests/test_worker_group.py (actors), tests/test_e2e.py and test_checkpoints.py
(`trainctl run`)."""

from __future__ import annotations

import importlib
import json

import pytest

from cluster.restarts import RECURRING, Failure, Restarts, classify, one_of, recurring_status
from trainer.config import ClusterSection


def recurring_errors() -> dict[str, BaseException]:
    """One real exception of each class that recurs, as a worker raises it."""
    from pydantic import ValidationError

    from data_pipeline.errors import DataError
    from trainer.checkpoint import CheckpointError, NoCheckpoint
    from trainer.config import JobConfig
    from trainer.guard import Diverged
    from trainer.hf import HFError
    from trainer.saver import SaveFailed

    try:
        JobConfig.model_validate({"train": {"lr": "fast"}})
    except ValidationError as e:
        invalid = e
    return {
        "SaveFailed": SaveFailed("checkpoint /r/step_00000020 could not be written (No space left on device)"),
        "CheckpointError": CheckpointError("checkpoint /r/step_10 was written by another model"),
        "NoCheckpoint": NoCheckpoint("checkpoint /r/step_10 is damaged (short file): give an earlier one"),
        "DataError": DataError("chunk data/train-000000.tar bytes 0-100: sha256 mismatch"),
        "HFError": HFError("model.init_from: tensor 'lm_head.weight' is missing"),
        "ValidationError": invalid,
        "Diverged": Diverged("step 15: the loss is nan; 0 rollbacks allowed (train.max_rollbacks)"),
    }


def test_every_recurring_class_named_exists():
    """RECURRING names classes by their qualified names (torch-free): a rename must fail here."""
    for qualified in RECURRING:
        module, name = qualified.rsplit(".", 1)
        assert isinstance(getattr(importlib.import_module(module), name), type), qualified


def test_errors_that_recur_end_the_job_with_their_line_and_status():
    for name, error in recurring_errors().items():
        f = classify(error, f"{name}: as Ray's text has it")
        assert f.recurs and f.kind == "recurring", name
        assert f.status == (1 if name == "Diverged" else 2), name
        assert f.line.startswith(f"{name}: ") and "\n" not in f.line, f.line
    f = classify(recurring_errors()["SaveFailed"], "")
    assert f.message == "checkpoint /r/step_00000020 could not be written (No space left on device)"
    # the exception itself not at hand (it did not survive the trip): its class name in the line
    assert classify(None, "DataError: chunk x: sha256 mismatch") == Failure(
        "DataError: chunk x: sha256 mismatch", True, 2
    )
    assert recurring_status(None, "Diverged: step 3: the loss is nan") == 1


def test_other_errors_are_restarted():
    for error, line in (
        (
            RuntimeError("[third_party/gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:5"),
            "RuntimeError: ...",
        ),
        (TimeoutError("a collective timed out after 1800 s"), "TimeoutError: ..."),
        (ValueError("boom"), "ValueError: boom"),
        (None, "ActorDiedError: worker 1's process died (killed by SIGKILL)"),
    ):
        f = classify(error, line)
        assert not f.recurs and f.kind == "transient" and f.status == 1 and f.line == line


def test_of_several_ranks_failures_a_recurring_one_is_acted_on():
    peer = Failure("RuntimeError: Connection closed by peer")
    data = Failure("DataError: bad chunk", True, 2)
    assert one_of([peer, data]) is data and one_of([peer]) is peer


class Clock:
    def __init__(self):
        self.now, self.waits = 0.0, []

    def sleep(self, s: float) -> None:
        self.waits.append(s)
        self.now += s


def test_a_recurring_failure_ends_an_unlimited_job_at_once_and_is_logged(tmp_path, capsys):
    clock = Clock()
    restarts = Restarts(ClusterSection(max_failures=-1), tmp_path, clock.sleep, lambda: clock.now)
    calls = []

    def attempt():
        calls.append(1)
        raise KeyError("stands in for WorkerFailed")

    with pytest.raises(KeyError):
        restarts.run(attempt, lambda e: Failure("SaveFailed: disk full at http://u:pw@host/x", True, 2))
    assert calls == [1] and clock.waits == [] and capsys.readouterr().err == ""
    (row,) = [json.loads(line) for line in (tmp_path / "attempts.jsonl").read_text().splitlines()]
    assert row["class"] == "recurring" and row["wait_s"] is None
    assert row["failure"] == "SaveFailed: disk full at http://u:***@host/x"  # redacted


def test_transient_failures_restart_after_a_doubling_capped_wait_then_max_failures_ends_it(tmp_path, capsys):
    clock = Clock()
    restarts = Restarts(ClusterSection(max_failures=9), tmp_path, clock.sleep, lambda: clock.now)
    calls = []

    def attempt():
        calls.append(1)
        clock.now += 5  # each attempt runs 5 s, then a worker dies
        raise KeyError("worker died")

    with pytest.raises(KeyError):
        restarts.run(attempt, lambda e: Failure("ActorDiedError: worker 1's process died (SIGKILL)"))
    assert len(calls) == 10 and clock.waits == [1, 2, 4, 8, 16, 32, 60, 60, 60]
    rows = [json.loads(line) for line in (tmp_path / "attempts.jsonl").read_text().splitlines()]
    assert [r["wait_s"] for r in rows] == [1, 2, 4, 8, 16, 32, 60, 60, 60, None]
    assert {r["class"] for r in rows} == {"transient"}
    err = capsys.readouterr().err.splitlines()
    assert err[0] == (
        "trainctl: a worker failed (ActorDiedError: worker 1's process died (SIGKILL)); "
        "starting the workers again in 1 s (1 of 9 restarts)"
    )
    assert err[-1].endswith("starting the workers again in 60 s (9 of 9 restarts)") and len(err) == 9


def test_the_restart_line_holds_no_secret(capsys):
    restarts = Restarts(ClusterSection(max_failures=1), None, lambda s: None)
    with pytest.raises(KeyError):
        restarts.run(lambda: {}["x"], lambda e: Failure("OSError: reading http://u:pw-1@h/x?X-Amz-Signature=abc"))
    err = capsys.readouterr().err
    assert "pw-1" not in err and "abc" not in err and "http://u:***@h/x" in err


def test_an_attempt_that_ran_long_starts_the_wait_over(tmp_path):
    clock = Clock()
    restarts = Restarts(ClusterSection(max_failures=-1), None, clock.sleep, lambda: clock.now)
    runs = iter([5, 5, 5, 3600, 5, None])  # seconds each attempt runs before its failure; None: it finishes

    def attempt():
        s = next(runs)
        if s is None:
            return "done"
        clock.now += s
        raise KeyError("lost node")

    assert restarts.run(attempt, lambda e: Failure("ActorDiedError: node lost")) == "done"
    assert clock.waits == [1, 2, 4, 1, 2]
    assert not (tmp_path / "attempts.jsonl").exists()


def test_an_exception_that_is_no_worker_failure_passes_through(tmp_path):
    restarts = Restarts(ClusterSection(max_failures=-1), tmp_path)

    def attempt():
        raise KeyboardInterrupt  # SIGTERM's stop, the capacity watch's timeout

    with pytest.raises(KeyboardInterrupt):
        restarts.run(attempt, lambda e: Failure("x"))
    with pytest.raises(ZeroDivisionError):
        restarts.run(lambda: 1 / 0, lambda e: None)
    assert not (tmp_path / "attempts.jsonl").exists()


def test_the_wait_is_seen_while_it_lasts(tmp_path):
    """The launcher's SIGTERM stops at once while the workers are down (supervise's idle)."""
    seen = []
    restarts = Restarts(ClusterSection(max_failures=1), None, lambda s: seen.append(restarts.waiting))
    with pytest.raises(KeyError):
        restarts.run(lambda: {}["x"], lambda e: Failure("x"))
    assert seen == [True] and restarts.waiting is False


def test_ray_trains_failures_are_read_from_each_ranks_own_exception():
    """A joined cluster's restarts: Ray Train's WorkerGroupError carries each failed rank's
    exception as the worker raised it (its FailureConfig then allows no restart of its own)."""
    import ray.exceptions
    from ray.train import ControllerError, WorkerGroupError

    from cluster.ray_job import ray_train_failure

    errors = recurring_errors()
    gloo = RuntimeError("Connection closed by peer")
    f = ray_train_failure(WorkerGroupError("rank 0: SaveFailed ...", {0: errors["SaveFailed"], 1: gloo}))
    assert f.recurs and f.status == 2 and f.message.startswith("checkpoint /r/step_00000020 could not be written")
    f = ray_train_failure(WorkerGroupError("rank 1: Diverged ...", {1: errors["Diverged"]}))
    assert f.recurs and f.status == 1 and f.line.startswith("Diverged: step 15: the loss is nan")
    f = ray_train_failure(WorkerGroupError("ValueError: boom", {0: ValueError("boom")}))
    assert not f.recurs and f.line == "ValueError: boom"
    from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError

    died = ray.exceptions.ActorDiedError()  # a lost node: the worker's process with it
    for dead in (died, WorkerHealthCheckFailedError("A worker health check failed.", died)):  # as Ray Train V2 has it
        f = ray_train_failure(WorkerGroupError("the actor died", {0: dead, 1: errors["DataError"]}))
        assert not f.recurs
    f = ray_train_failure(ControllerError(TimeoutError("the worker group did not start")))
    assert not f.recurs
