"""cluster/worker_group.py: each rank's env:// variables (trainer/build.py's rendezvous_env),
and real groups of Ray actors on one private Ray started in this process (as `trainctl run`
starts it, `ray_job.connect`), running small functions of this module instead of training:
rank 0 holds the rendezvous port from the moment it is chosen (nothing can take it before
its store serves on it); a dead worker is reported before the errors its peers then raise;
a failure, or an exception of `poll`, kills the other workers and returns only once their
processes are gone; a worker killed once is restarted after the backoff; an error that
recurs ends a `max_failures: -1` group at once. The trainer itself fails and restarts in
tests/test_e2e.py and test_checkpoints.py."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli_helpers import ONE_THREAD, REPO, env

from trainer.build import rendezvous_env
from trainer.config import ClusterSection


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
    time (a real group fails and restarts below); the waits are recorded, not slept."""
    from cluster import worker_group
    from cluster.restarts import Failure, Restarts

    calls, waits = [], []

    def failing(train_fn, config, cluster, *rest):
        calls.append(1)
        raise worker_group.WorkerFailed(Failure("ValueError: boom"))

    def restarts(max_failures: int) -> Restarts:
        return Restarts(ClusterSection(max_failures=max_failures), sleep=waits.append)

    monkeypatch.setattr(worker_group, "run_once", failing)
    with pytest.raises(worker_group.WorkerFailed, match="ValueError: boom"):
        worker_group.run_group(None, {}, ClusterSection(max_failures=2), restarts=restarts(2))
    assert len(calls) == 3 and waits == [1, 2]  # the first start and 2 restarts
    assert capsys.readouterr().err.splitlines() == [
        "trainctl: a worker failed (ValueError: boom); starting the workers again in 1 s (1 of 2 restarts)",
        "trainctl: a worker failed (ValueError: boom); starting the workers again in 2 s (2 of 2 restarts)",
    ]
    calls.clear()
    with pytest.raises(worker_group.WorkerFailed):
        worker_group.run_group(None, {}, ClusterSection(max_failures=0), restarts=restarts(0))
    assert len(calls) == 1

    outcomes = iter([worker_group.WorkerFailed(Failure("x"))] * 5 + [None])

    def flaky(train_fn, config, cluster, *rest):
        calls.append(1)
        if (e := next(outcomes)) is not None:
            raise e

    calls.clear()
    monkeypatch.setattr(worker_group, "run_once", flaky)
    worker_group.run_group(None, {}, ClusterSection(max_failures=-1), restarts=restarts(-1))  # the sixth start succeeds
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


# --- real groups -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def private_ray():
    """A private Ray in this process for the module's groups, made as `trainctl run` makes it;
    its workers import this module (tests/ on their path) for the functions they run. Made
    beside another Ray's dashboard agent: 127.0.0.1:52365, Ray's fixed agent port, held."""
    import socket

    from cluster.ray_job import connect, shutdown

    saved = dict(os.environ)
    os.environ.update(ONE_THREAD, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests")]))
    holder = socket.socket()
    try:
        try:
            holder.bind(("127.0.0.1", 52365))
            holder.listen()
        except OSError:  # another Ray on this machine holds it already: the same situation
            pass
        connect(ClusterSection(address="local", num_workers=2), worker_logs=False, verbose=False)
        yield
    finally:
        holder.close()
        shutdown()
        os.environ.clear()
        os.environ.update(saved)


def test_a_private_ray_beside_another_leaves_the_agent_port_to_the_system(private_ray):
    """Ray's fixed agent port taken (by another Ray, here the fixture's socket): the private
    Ray's agent binds a free one at once instead of failing 6 binds while ray.init waits
    (patches.ray_single_machine_mode)."""
    import ray

    session = Path(ray._private.worker._global_node.get_session_dir_path())
    log = (session / "logs" / "dashboard_agent.log").read_text()
    assert "failed to bind" not in log and "52365" not in log, log[-2000:]


def rank() -> int:
    return int(os.environ["RANK"])


def all_reduce_ranks(config: dict) -> None:
    """Rendezvous as the trainer does (env://, rank 0's store through the loopback patch), one
    all-reduce, the result in a file per rank."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method="env://", timeout=timedelta(seconds=60))
    total = torch.tensor([float(rank() + 1)])
    dist.all_reduce(total)
    dist.destroy_process_group()
    (Path(config["dir"]) / f"sum{rank()}").write_text(f"{total.item():g}")


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_rank_0_holds_the_rendezvous_port_from_the_moment_it_is_chosen(private_ray, tmp_path, monkeypatch):
    """Another process binds the rendezvous port between the moment it is chosen and the
    moment rank 0's store would bind it (here: when the driver hands the ranks their
    variables; in a job, while rank 0 imports torch and DeepSpeed, seconds). The port is
    already rank 0's, listening: the bind fails and the group trains. (When rank 0 only found
    the port free and bound it in its store, the intruder got it and the group failed:
    'EADDRINUSE' / 'address already in use'.)"""
    import trainer.build
    from cluster.worker_group import run_once

    original, intruders = trainer.build.rendezvous_env, []

    def intrude(r, world, port, gpus=None):
        if r == 0:
            try:
                intruders.append(socket.create_server(("127.0.0.1", port)))
            except OSError as e:
                intruders.append(e)
        return original(r, world, port, gpus)

    monkeypatch.setattr(trainer.build, "rendezvous_env", intrude)
    try:
        run_once(all_reduce_ranks, {"dir": str(tmp_path)}, ClusterSection(num_workers=2))
    finally:
        for s in intruders:
            if isinstance(s, socket.socket):
                s.close()
    assert [(tmp_path / f"sum{r}").read_text() for r in (0, 1)] == ["3", "3"]
    (refused,) = intruders
    assert isinstance(refused, OSError) and refused.errno == errno.EADDRINUSE, refused


INTRUDE_ALONE = """
import socket, sys
from types import SimpleNamespace
import trainer.build as build
original, intruders = build.rendezvous_env, []
def intrude(r, world, port, gpus=None):
    try:
        intruders.append(socket.create_server(("127.0.0.1", port)))
        print("intruder bound the port", flush=True)
    except OSError as e:
        print("intruder refused:", e.errno, flush=True)
    return original(r, world, port, gpus)
build.rendezvous_env = intrude
cfg = SimpleNamespace(
    cluster=SimpleNamespace(use_gpu=False, num_workers=1, collective_timeout_s=60), tracking=SimpleNamespace(verbose=False)
)
print("group:", build.setup_distributed(cfg), flush=True)
"""


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_group_of_one_holds_its_rendezvous_port_too(tmp_path):
    """`trainctl run --no-ray` alone: the process chooses its store's port, then imports
    DeepSpeed, then makes its group of one. Another process binding the port meanwhile is
    refused (it failed the run: 'address already in use')."""
    r = subprocess.run(
        [sys.executable, "-c", INTRUDE_ALONE], cwd=tmp_path, env=env(**ONE_THREAD), capture_output=True, text=True
    )
    assert f"intruder refused: {errno.EADDRINUSE}" in r.stdout and "group: (0, 1, 0)" in r.stdout, (
        r.stdout + r.stderr[-3000:]
    )


def rank_0_raises_then_rank_1_dies(config: dict) -> None:
    """Rank 0 raises what a collective raises when its peer is gone; rank 1's process dies a
    moment later (as when a killed peer is noticed first by the survivor)."""
    marker = Path(config["dir"]) / "raised"
    if rank() == 0:
        marker.touch()
        raise RuntimeError("[gloo] Connection closed by peer [127.0.0.1]:41234")
    while not marker.exists():
        time.sleep(0.01)
    time.sleep(0.5)
    os.kill(os.getpid(), signal.SIGKILL)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_dead_worker_is_reported_before_the_error_its_peer_raised(private_ray, tmp_path):
    from cluster.worker_group import WorkerFailed, run_once

    with pytest.raises(WorkerFailed) as failed:
        run_once(rank_0_raises_then_rank_1_dies, {"dir": str(tmp_path)}, ClusterSection(num_workers=2))
    assert str(failed.value).startswith("ActorDiedError: worker 1's process died ("), str(failed.value)
    assert not failed.value.failure.recurs  # restarted (transient)


def pid_then(config: dict) -> None:
    """Write this process's id, then: rank 0 raises once every rank has written its own
    (`config["raise"]`), the others sleep (until killed)."""
    d = Path(config["dir"])
    (d / f"pid{rank()}").write_text(str(os.getpid()))
    if rank() == 0 and config["raise"]:
        while len(list(d.glob("pid*"))) < config["n"]:
            time.sleep(0.01)
        raise ValueError("boom")
    time.sleep(600)


def alive(pid: int) -> bool:
    from cluster.worker_group import _zombie

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not _zombie(pid)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_failure_or_polls_exception_kills_the_workers_and_returns_once_their_processes_are_gone(
    private_ray, tmp_path
):
    from cluster.worker_group import WorkerFailed, run_once

    one, two = tmp_path / "raise", tmp_path / "poll"
    one.mkdir()
    two.mkdir()
    t0 = time.monotonic()
    with pytest.raises(WorkerFailed, match="^ValueError: boom$"):
        run_once(pid_then, {"dir": str(one), "raise": True, "n": 2}, ClusterSection(num_workers=2))
    pids = [int((one / f"pid{r}").read_text()) for r in (0, 1)]
    assert [alive(p) for p in pids] == [False, False]  # rank 1 slept on: killed, and gone before run_once returned
    assert time.monotonic() - t0 < 60

    class Stop(Exception):
        pass

    def poll() -> None:  # a sweep trial's reporter, which ASHA's stop leaves through an exception
        if len(list(two.glob("pid*"))) == 2:
            raise Stop

    with pytest.raises(Stop):
        run_once(pid_then, {"dir": str(two), "raise": False, "n": 2}, ClusterSection(num_workers=2), poll=poll)
    pids = [int((two / f"pid{r}").read_text()) for r in (0, 1)]
    assert [alive(p) for p in pids] == [False, False]


def killed_once(config: dict) -> None:
    """Rank 1's process is SIGKILLed at the first start; the second start trains through."""
    d = Path(config["dir"])
    with open(d / "starts", "a") as f:
        f.write(json.dumps({"rank": rank(), "at": time.time()}) + "\n")
    if rank() == 1 and not (d / "killed").exists():
        (d / "killed").touch()
        os.kill(os.getpid(), signal.SIGKILL)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_worker_killed_once_is_restarted_after_the_backoff(private_ray, tmp_path, capsys):
    from cluster.restarts import FIRST_WAIT_S, Restarts
    from cluster.worker_group import run_group

    cluster = ClusterSection(num_workers=2, max_failures=-1)
    run_group(killed_once, {"dir": str(tmp_path)}, cluster, restarts=Restarts(cluster, tmp_path))
    starts = [json.loads(line) for line in (tmp_path / "starts").read_text().splitlines()]
    assert sorted(s["rank"] for s in starts) == [0, 0, 1, 1]
    (row,) = [json.loads(line) for line in (tmp_path / "attempts.jsonl").read_text().splitlines()]
    assert row["class"] == "transient" and row["wait_s"] == FIRST_WAIT_S
    assert row["failure"].startswith("ActorDiedError: worker 1's process died ("), row
    assert min(s["at"] for s in starts[2:]) - row["at"] >= FIRST_WAIT_S  # the second start came after the wait
    err = capsys.readouterr().err
    assert "trainctl: a worker failed (ActorDiedError: worker 1's process died (" in err
    assert "starting the workers again in 1 s (1 of unlimited restarts)" in err


def raise_recurring(config: dict) -> None:
    from data_pipeline.errors import DataError

    with open(Path(config["dir"]) / "starts", "a") as f:
        f.write(f"{rank()}\n")
    if rank() == config["rank"]:
        raise DataError("chunk http://u:secret@h/train-000000.tar bytes 0-99: sha256 mismatch")
    time.sleep(600)  # its peer: waits in a collective that never completes


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_an_error_that_recurs_ends_an_unlimited_group_at_once(private_ray, tmp_path):
    """Rank 1 raises DataError, rank 0 waits (in a collective, in a job): the group ends at the
    first failure, with the DataError's line and exit status 2, under `max_failures: -1`. The
    old loop started the group again, for ever: a second start fails the test (by `poll`)."""
    from cluster.restarts import Restarts
    from cluster.worker_group import WorkerFailed, run_group

    cluster = ClusterSection(num_workers=2, max_failures=-1)

    def poll() -> None:
        assert (tmp_path / "starts").read_text().count("1\n") <= 1, "a recurring failure was restarted"

    t0 = time.monotonic()
    with pytest.raises(WorkerFailed) as failed:
        run_group(
            raise_recurring, {"dir": str(tmp_path), "rank": 1}, cluster, poll, restarts=Restarts(cluster, tmp_path)
        )
    f = failed.value.failure
    assert (f.recurs, f.status) == (True, 2) and f.line.startswith("DataError: chunk http://u:***@h/train-000000.tar")
    (row,) = [json.loads(line) for line in (tmp_path / "attempts.jsonl").read_text().splitlines()]
    assert row["class"] == "recurring" and row["wait_s"] is None
    assert time.monotonic() - t0 < 60


def raises(name: str) -> None:
    """A Ray task raising one of the recurring errors as a worker would."""
    from test_restarts import recurring_errors

    raise recurring_errors()[name]


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_each_recurring_error_survives_rays_trip_to_the_driver_and_is_known_there(private_ray):
    """What the driver gets from Ray for each class that recurs (the worker's exception,
    unpickled) is classified as it was raised: the same line and exit status."""
    import ray
    import ray.exceptions
    from test_restarts import recurring_errors

    from cluster.worker_group import _failure

    task = ray.remote(num_cpus=0.1)(raises)
    for name, error in recurring_errors().items():
        with pytest.raises(ray.exceptions.RayTaskError) as got:
            ray.get(task.remote(name))
        f = _failure(0, got.value)
        assert f.recurs and f.status == (1 if name == "Diverged" else 2), (name, f)
        assert f.line == f"{name}: {' '.join(str(error).split())}", (name, f.line)
