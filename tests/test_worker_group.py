"""cluster/worker_group.py's pure parts: each rank's env:// variables (trainer/build.py's rendezvous_env) (the group itself runs in
test_e2e, test_checkpoints: every private-Ray job)."""

from __future__ import annotations

from trainer.build import rendezvous_env


def test_each_rank_rendezvous_on_loopback_with_its_rank():
    envs = [rendezvous_env(r, 3, 29500, None) for r in range(3)]
    assert [e["RANK"] for e in envs] == ["0", "1", "2"] == [e["LOCAL_RANK"] for e in envs]
    assert {(e["MASTER_ADDR"], e["MASTER_PORT"], e["WORLD_SIZE"], e["LOCAL_WORLD_SIZE"]) for e in envs} == {
        ("127.0.0.1", "29500", "3", "3")
    }
    assert all("CUDA_VISIBLE_DEVICES" not in e for e in envs)


def test_with_gpus_every_rank_sees_the_groups_gpus_and_takes_its_own():
    assigned = [["3"], ["1"], ["10"]]  # what Ray gave each actor, in rank order
    envs = [rendezvous_env(r, 3, 29500, assigned) for r in range(3)]
    assert {e["CUDA_VISIBLE_DEVICES"] for e in envs} == {"1,3,10"}  # numeric order, not "1,10,3"
    assert [e["LOCAL_RANK"] for e in envs] == ["1", "0", "2"]


def test_the_group_restarts_up_to_max_failures_then_fails(monkeypatch, capsys):
    """run_group's counting, with run_once standing in for a group whose worker fails each
    time (a real group fails and restarts in test_checkpoints' chaos test)."""
    import pytest

    from cluster import worker_group
    from trainer.config import ClusterSection

    calls = []

    def failing(train_fn, config, cluster, *rest):
        calls.append(1)
        raise worker_group.WorkerFailed("ValueError: boom")

    monkeypatch.setattr(worker_group, "run_once", failing)
    with pytest.raises(worker_group.WorkerFailed, match="ValueError: boom"):
        worker_group.run_group(None, {}, ClusterSection(max_failures=2))
    assert len(calls) == 3  # the first start and 2 restarts
    assert capsys.readouterr().err.splitlines() == [
        "trainctl: a worker failed (ValueError: boom); starting the workers again (1 of 2 restarts)",
        "trainctl: a worker failed (ValueError: boom); starting the workers again (2 of 2 restarts)",
    ]
    calls.clear()
    with pytest.raises(worker_group.WorkerFailed):
        worker_group.run_group(None, {}, ClusterSection(max_failures=0))
    assert len(calls) == 1

    outcomes = iter([worker_group.WorkerFailed("x")] * 5 + [None])

    def flaky(train_fn, config, cluster, *rest):
        calls.append(1)
        if (e := next(outcomes)) is not None:
            raise e

    calls.clear()
    monkeypatch.setattr(worker_group, "run_once", flaky)
    worker_group.run_group(None, {}, ClusterSection(max_failures=-1))  # unlimited: the sixth start succeeds
    assert len(calls) == 6


def test_a_dead_workers_cause_is_rays_exit_detail():
    from cluster.worker_group import _cause

    text = (
        "The actor died unexpectedly before finishing this task.\n\tclass_name: TrainWorker\n"
        "The actor is dead because its worker process has died. Worker exit type: SYSTEM_ERROR Worker exit "
        "detail: Worker unexpectedly exits with a connection error code 2. End of file. There are some potential"
    )
    assert _cause(RuntimeError(text)) == "Worker unexpectedly exits with a connection error code 2"
    assert _cause(RuntimeError("\nfirst line\nsecond")) == "first line"
