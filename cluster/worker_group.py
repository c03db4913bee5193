"""A job's workers on the private local Ray, without Ray Train: one Ray actor per rank.

On `cluster.address: local` (one machine, a Ray started for the job) what the job needs of
Ray Train is N processes on the machine's cores (or GPUs), torch's rendezvous on the
loopback address (listening there only: `patches.rendezvous_on_loopback`, on a port rank 0
holds from the start), and the whole group started again when a worker fails, unless the
failure would recur (up to `cluster.max_failures`, after a growing wait: cluster/restarts.py).
Ray Train's controller, worker group, synchronization actor and
backend setup are each one more process or round trip on the job's cores before the first
step: with plain actors a 20-step tiny-cpu job's first step came after 16.5-17.0 s against
28.5-29.3 s through Ray Train (2-vCPU VM, interleaved; BENCHMARKS.md, issue 17). Ray stays
the launcher: it schedules the actors on `cluster.cpus_per_worker` and GPUs, runs their
processes, forwards their output and kills them. A joined cluster keeps Ray Train
(`ray_job.run_workers`): placement across nodes, node loss.

Ray is imported only inside functions (as in the rest of cluster/).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from cluster.restarts import Failure, Restarts, classify, one_of
from cluster.workers import worker_error, worker_resources
from trainer.config import ClusterSection


class WorkerFailed(RuntimeError):
    """A worker raised or its process died; the message names the worker's own error, and
    `failure` says whether it would recur (cluster/restarts.py)."""

    def __init__(self, failure: Failure):
        super().__init__(failure.line)
        self.failure = failure


def _actor_class():
    import ray

    class TrainWorker:
        """One rank: its process id and GPU ids, its environment, then the worker function."""

        def hello(self, listen: bool = False) -> tuple[int, list[str], str, int | None]:
            """This process's id, the GPU ids Ray gave it and its node; with `listen` (rank
            0: the group is on its machine) the rendezvous port, bound and listening here
            from now on. The store serves on this socket when the process group is made,
            seconds later after torch's and DeepSpeed's imports: a port only found free here
            and bound then could be taken meanwhile (`patches.hold_port`)."""
            import os
            import socket

            port = None
            if listen:  # trainctl (and torch) not imported yet: the socket is taken over in setup
                self.listener = socket.create_server(("127.0.0.1", 0), backlog=128)
                port = self.listener.getsockname()[1]
            return os.getpid(), [str(g) for g in ray.get_gpu_ids()], ray.get_runtime_context().get_node_id(), port

        def setup(self, env: dict[str, str], log_path: str | None = None) -> None:
            """The rank's variables, in a call of their own before `run`, whose arguments
            (the worker function) import trainctl: CUDA_VISIBLE_DEVICES must be set before
            anything could touch CUDA. `log_path`: this process's output goes there (a
            sweep's trial: its run folder's workers.log) instead of to Ray's log forwarding."""
            import os

            from trainer import patches

            if log_path is not None:
                fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
                for std in (1, 2):
                    os.dup2(fd, std)
                os.close(fd)
            os.environ.update(env)
            patches.rendezvous_on_loopback()  # rank 0's store on 127.0.0.1 only, not every interface
            if getattr(self, "listener", None) is not None:  # rank 0: its store on the socket hello bound
                patches.hold_port(self.listener)
                self.listener = None

        def run(self, fn: Callable[[dict], Any], config: dict) -> Any:
            """fn(config), the config's secrets (redacted in the arguments: Ray may log
            those) put back from the environment this process inherited (`ray_job.connect`)."""
            import os

            from trainer.redaction import SECRETS_ENV, secrets_back

            return fn(secrets_back(config, os.environ.get(SECRETS_ENV)))

    return ray.remote(TrainWorker)


def _cause(error: Exception) -> str:
    """Ray's reason for a dead worker process, in a few words: its 'Worker exit detail'
    sentence when it gives one (a SIGKILL, the memory monitor), else its first line."""
    text = str(error)
    if "Worker exit detail: " in text:
        return text.split("Worker exit detail: ", 1)[1].split(". ", 1)[0].strip().rstrip(".")
    return next((ln.strip() for ln in text.splitlines() if ln.strip()), type(error).__name__)


def _failure(rank: int | None, error: Exception) -> Failure:
    import ray.exceptions

    if isinstance(error, ray.exceptions.RayTaskError):  # the worker function raised: its own exception
        return classify(getattr(error, "cause", None), worker_error(str(error)))
    who = f"worker {rank}'s process" if rank is not None else "a worker process"
    if isinstance(error, ray.exceptions.RayActorError):
        return Failure(f"{type(error).__name__}: {who} died ({_cause(error)})")
    return Failure(f"{type(error).__name__}: {who} failed ({_cause(error)})")


def _first_failure(failed: dict, pending: list, rank_of: dict) -> WorkerFailed:
    """The failure to report: a worker's death rather than the error its peers then raise
    ('Connection closed by peer' in a collective), else a rank's recurring error rather than
    its peers' (cluster/restarts.py), waiting a moment for the others."""
    import ray
    import ray.exceptions

    if pending:
        done, _ = ray.wait(pending, num_returns=len(pending), timeout=2.0)
        for ref in done:
            try:
                ray.get(ref)
            except ray.exceptions.RayError as e:
                failed[ref] = e
    dead = [ref for ref, e in failed.items() if isinstance(e, ray.exceptions.RayActorError)]
    if dead:
        return WorkerFailed(_failure(rank_of.get(dead[0]), failed[dead[0]]))
    return WorkerFailed(one_of([_failure(rank_of.get(ref), e) for ref, e in failed.items()]))


def run_once(
    train_fn: Callable[[dict], Any],
    config: dict,
    cluster: ClusterSection,
    poll: Callable[[], None] | None = None,
    log_path: str | None = None,
) -> None:
    """Start the group, run `train_fn(config)` on every rank, wait for all of them; raise
    WorkerFailed at the first failure (any of Ray's errors: a worker that raised, died, or
    could not start). The actors are killed whichever way it ends, an exception `poll`
    raises too. `poll`: called about every POLL_S while the group trains (a sweep's trial
    reports the run's metrics from it); `log_path`: the workers' output goes to that file."""
    import ray
    import ray.exceptions

    from trainer.build import rendezvous_env

    res = worker_resources(cluster)
    cpus, gpus = res.pop("CPU"), res.pop("GPU", 0.0)
    worker = _actor_class().options(num_cpus=cpus, num_gpus=gpus, resources=res or None)
    n = cluster.num_workers
    actors: list = []
    pids: list[int] = []
    try:
        actors = [worker.remote() for _ in range(n)]
        try:
            hello = ray.get([a.hello.remote(r == 0) for r, a in enumerate(actors)])
            here = ray.get_runtime_context().get_node_id()
            pids = [pid for pid, _, node, _ in hello if node == here]  # processes this one can watch exit
            gpu_ids = [ids for _, ids, _, _ in hello] if cluster.use_gpu else None
            port = hello[0][3]  # held by rank 0's process, on its machine, until its store serves on it
            ray.get([a.setup.remote(rendezvous_env(r, n, port, gpu_ids), log_path) for r, a in enumerate(actors)])
        except ray.exceptions.RayError as e:
            raise WorkerFailed(_failure(None, e)) from None
        refs = [a.run.remote(train_fn, config) for a in actors]
        rank_of = {ref: r for r, ref in enumerate(refs)}
        pending = refs
        while pending:
            done, pending = ray.wait(pending, num_returns=1, timeout=POLL_S if poll else None)
            if poll is not None:
                poll()
            if not done:
                continue
            try:
                ray.get(done[0])
            except ray.exceptions.RayError as e:
                raise _first_failure({done[0]: e}, pending, rank_of) from None
    finally:
        for a in actors:
            ray.kill(a)
        gone(pids)


POLL_S = 2.0


def gone(pids: list[int], timeout_s: float = 30.0) -> None:
    """Wait (bounded) until the killed workers' processes have exited: the job ends with its
    processes, not a moment before them (`ray.kill` only asks the raylet)."""
    import os
    import time

    deadline = time.monotonic() + timeout_s
    for pid in pids:
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            except PermissionError:  # another user's process took the number: ours is gone
                break
            if _zombie(pid):
                break
            time.sleep(0.05)


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return False  # no /proc (macOS): os.kill's answer is all there is


def run_group(
    train_fn: Callable[[dict], Any],
    config: dict,
    cluster: ClusterSection,
    poll: Callable[[], None] | None = None,
    log_path: str | None = None,
    restarts: Restarts | None = None,
) -> None:
    """`run_once`, started again after a failure that does not recur, after a wait that
    grows, up to `cluster.max_failures` times (-1: no limit), as Ray Train's FailureConfig
    would (`restarts`: the policy, cluster/restarts.py; its run folder records each failure);
    the workers resume from the newest checkpoint themselves. Raises WorkerFailed at a
    failure that recurs, or once the restarts are spent."""
    restarts = restarts or Restarts(cluster)

    def failure_of(e: Exception) -> Failure | None:
        return e.failure if isinstance(e, WorkerFailed) else None

    restarts.run(lambda: run_once(train_fn, config, cluster, poll, log_path), failure_of)
