"""Where a job runs: connecting to Ray and running the worker function there (a private
Ray's plain actors, cluster/worker_group.py; Ray Train on a joined cluster).

Ray is imported only inside cluster/'s functions (and trainer/patches.py's Ray patches,
called from here). The training loop knows nothing of Ray: `run_workers` takes the worker
function as an argument and hands each worker the resolved config as a plain dict (on a
private Ray with its secrets redacted, the real values inherited: `connect`).
"""

from __future__ import annotations

import collections
import contextlib
import math
import os
import re
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cluster.restarts import Failure, Restarts, classify, one_of
from cluster.workers import worker_error, worker_resources
from trainer import patches
from trainer.config import ClusterSection, is_secret_name, redact_text


class JobFailed(RuntimeError):
    """A worker raised; the message carries the worker's own error, `status` the exit
    status it ends the job with (2: the user's to fix, cluster/restarts.py), `message` the
    line without the class name for those."""

    def __init__(self, line: str, status: int = 1, message: str | None = None):
        super().__init__(line)
        self.status, self.message = status, line if message is None else message


class NotPlaceable(RuntimeError):
    """The cluster cannot hold the job's workers: Ray would wait for them forever."""


def scaling_config(cluster: ClusterSection):
    """Ray Train's ScalingConfig for the job's workers (training and `cluster check` alike)."""
    from ray.train import ScalingConfig

    return ScalingConfig(
        num_workers=cluster.num_workers,
        use_gpu=cluster.use_gpu,
        resources_per_worker=worker_resources(cluster),
        placement_strategy=cluster.placement,
    )


@dataclass
class Capacity:
    fits: int  # workers the alive nodes can hold, each whole on one node (totals, not what is free)
    short: list[str]  # "CPU 1 of 2": each resource the alive nodes lack in all
    alive: set[str]  # the alive nodes' addresses


def capacity(cluster: ClusterSection) -> Capacity:
    """What the alive nodes can hold of the job's workers (`num_workers` of `worker_resources`)."""
    import ray

    need = worker_resources(cluster)
    fits, have, alive = 0, {k: 0.0 for k in need}, set()
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        alive.add(node.get("NodeManagerAddress", "?"))
        res = node.get("Resources", {})
        for k in need:
            have[k] += res.get(k, 0.0)
        # in Ray's fixed-point units (1e-4): 7 CPUs hold 100 workers of 0.07, not int(7 / 0.07) = 99
        fits += min(round(res.get(k, 0.0) * 1e4) // round(v * 1e4) for k, v in need.items() if v > 0)
    total = {k: v * cluster.num_workers for k, v in need.items()}
    return Capacity(fits, [f"{k} {have[k]:g} of {total[k]:g}" for k in need if have[k] < total[k]], alive)


def check_placeable(cluster: ClusterSection) -> None:
    """Raise NotPlaceable, naming what is missing, when the alive nodes cannot hold
    `num_workers` workers of `worker_resources` (each worker whole on one node)."""
    cap = capacity(cluster)
    if cap.fits >= cluster.num_workers:
        return
    need = worker_resources(cluster)
    raise NotPlaceable(
        f"the cluster can place {cap.fits} of the {cluster.num_workers} workers (each needs "
        + ", ".join(f"{k} {v:g}" for k, v in need.items())
        + " on one node"
        + (f"; in all it has {', '.join(cap.short)}" if cap.short else "")
        + "): lower cluster.num_workers or cluster.cpus_per_worker, or add nodes"
    )


class CapacityLost(RuntimeError):
    """The workers could not be placed again within cluster.restart_timeout_s."""


class CapacityWatch:
    """Watches, while the job runs, whether the alive nodes can still hold its workers.

    Ray Train restarts a failed worker group by waiting for its placement group, forever
    (each try times out after RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S, 60 s, and is retried
    without end): after a lost node with no replacement, the job would hang with nothing on
    the console. Counted by the nodes' totals, the survivors of a running job can hold all
    of it unless a worker was on a lost node: so when they cannot, the group is down. The
    watch then says so at once, naming the lost nodes and what is missing, repeats it every
    `repeat_s`, says when capacity is back, and after `timeout_s` sends this process SIGUSR1,
    whose handler (put in by `run_workers`) raises out of `fit()`: `_thread.interrupt_main`
    would be SIGINT, which Ray Train takes for a graceful abort that waits on the very
    controller that cannot place the workers. `progress()` names where the run stands
    (its step and the checkpoint it would resume from)."""

    def __init__(
        self,
        cluster: ClusterSection,
        progress: Callable[[], str],
        every_s: float = 2.0,
        repeat_s: float = 60.0,
    ):
        self.cluster, self.progress, self.every_s, self.repeat_s = cluster, progress, every_s, repeat_s
        self.timeout_s = cluster.restart_timeout_s
        self.waiting_since: float | None = None
        self.timed_out: str | None = None  # the message, once the timeout passed
        self.seen: set[str] = set()  # every node seen alive while the job ran
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="trainctl-capacity", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stopped(self) -> bool:
        return self._stop.is_set()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def _describe(self, cap: Capacity) -> str:
        lost = sorted(self.seen - cap.alive)
        what = f"lost node{'s' * (len(lost) > 1)} {', '.join(lost)}" if lost else "lost capacity"
        short = f" ({', '.join(cap.short)})" if cap.short else ""
        return (
            f"{what} {self.progress()}; the cluster can place {cap.fits} of {self.cluster.num_workers} workers{short}"
        )

    def _run(self) -> None:
        said = 0.0
        while not self._stop.wait(self.every_s) and self.timed_out is None:
            try:
                said = self._check(said)
            except Exception as e:  # noqa: BLE001 - the watch must outlive any one bad look
                print(f"trainctl: warning: the capacity check failed ({type(e).__name__}: {e})", file=sys.stderr)

    def _check(self, said: float) -> float:
        """One look at the cluster; returns when the waiting line was last printed."""
        import signal
        import time

        cap = capacity(self.cluster)
        now = time.monotonic()
        self.seen |= cap.alive
        if cap.fits >= self.cluster.num_workers:
            if self.waiting_since is not None:
                print(f"trainctl: capacity is back after {now - self.waiting_since:.0f} s: restarting", flush=True)
            self.waiting_since = None
            return said
        if self.waiting_since is None:
            self.waiting_since, said = now, 0.0
        waited = now - self.waiting_since
        if waited >= self.timeout_s:
            self.timed_out = (
                f"{self._describe(cap)}; waited {waited:.0f} s (cluster.restart_timeout_s): add capacity "
                "(or lower cluster.num_workers, keeping the global batch with train.grad_accum_steps) and run "
                "the same command to resume"
            )
            if not self._stop.is_set():
                os.kill(os.getpid(), signal.SIGUSR1)
            return said
        if said == 0.0 or now - said >= self.repeat_s:
            print(
                f"trainctl: {self._describe(cap)}; waiting for capacity ({self.timeout_s - waited:.0f} s more, "
                "cluster.restart_timeout_s)",
                file=sys.stderr,
                flush=True,
            )
            said = now
        return said


@dataclass
class Connection:
    address: str
    started_here: bool


def connect(
    cluster: ClusterSection, worker_logs: bool = True, verbose: bool = True, secrets: dict[str, str] | None = None
) -> Connection:
    """Join the cluster named by `cluster.address`, or start a private one.

    'local' starts a Ray sized to the job on this machine (no dashboard); 'auto' joins
    the cluster `ray start` made here; anything else is a cluster address. Without
    `verbose`, Ray's own warnings in this process are left out (errors still show).

    A private Ray's processes inherit `secrets` and the secret `cluster.env` values
    (`split_env`) from this process's environment, set only while ray.init starts them: Ray
    writes a runtime_env's variables into its session logs (runtime_env_agent.log), not
    inherited ones. A joined cluster gets all of cluster.env through the runtime_env.
    """
    level = "WARNING" if verbose else "ERROR"
    import ray

    from cluster.local_ray import check_reachable, no_usage_stats

    no_usage_stats()
    if cluster.address == "local":
        needed = math.ceil(cluster.num_workers * cluster.cpus_per_worker)  # ray.init takes whole CPUs
        public, secret = split_env(worker_env(cluster))
        with patches.ray_single_machine_mode(), inherited({**secret, **(secrets or {})}):
            ray.init(
                runtime_env=runtime_env(cluster, public),
                num_cpus=needed,
                num_gpus=cluster.num_workers if cluster.use_gpu else 0,
                include_dashboard=False,
                log_to_driver=worker_logs,
                configure_logging=True,
                logging_level=level,
            )
        return Connection("local", True)
    check_reachable(cluster.address)  # in seconds, where ray.init would wait for minutes
    ray.init(address=cluster.address, runtime_env=runtime_env(cluster), log_to_driver=worker_logs, logging_level=level)
    return Connection(cluster.address, False)


def import_ray_train_meanwhile() -> None:
    """Import Ray Train (torch, pandas, ray.data: 3.7 s on 2 vCPUs) in a thread while
    `ray.init` (`connect`) waits on the processes it starts; `run_workers`'s import then
    finds it done.
    Measured: ray.init + the import 8.9-10.9 s one after the other, 6.2-7.5 s together."""

    def load() -> None:
        try:
            import ray.train.torch  # noqa: F401
        except Exception:  # run_workers's own import reports it
            pass

    threading.Thread(target=load, name="import-ray-train", daemon=True).start()


def torch_config(cluster: ClusterSection):
    """Ray Train's TorchConfig (a joined cluster's jobs and `cluster check` there): gloo or
    NCCL, collectives timing out after `cluster.collective_timeout_s` (as the worker actors'
    and --no-ray's groups, trainer/build.py), torch's rendezvous store served on the
    loopback address only when that is the job's address."""
    backend = "nccl" if cluster.use_gpu else "gloo"
    return patches.ray_torch_backend(patches.rendezvous_on_loopback, backend, cluster.collective_timeout_s)


def runtime_env(cluster: ClusterSection, env: dict[str, str] | None = None) -> dict[str, Any]:
    """The job's runtime_env: `env` (default: every `worker_env` variable)."""
    return {"env_vars": worker_env(cluster) if env is None else env}


def split_env(env: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """(the variables that may be written down, the secret ones: a secret name such as HF_TOKEN
    (`is_secret_name`), or a value with a secret in it, such as a URL with a password)."""
    public, secret = {}, {}
    for key, value in env.items():
        (secret if is_secret_name(key) or redact_text(value) != value else public)[key] = value
    return public, secret


@contextlib.contextmanager
def inherited(env: dict[str, str]) -> Iterator[None]:
    """`env` in this process's environment for the block (the processes started meanwhile
    inherit it), then as it was."""
    before = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def worker_env(cluster: ClusterSection) -> dict[str, str]:
    """Environment for every worker: DeepSpeed's accelerator (read once, at import) and the user's extras."""
    # Ray Train's print patch tees each print to its logger once stdout is wrapped (W&B wraps
    # rank 0's), so every progress line would reach the console twice.
    env = {
        "DS_ACCELERATOR": "cuda" if cluster.use_gpu else "cpu",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    }
    env.update(cluster.env)
    return env


def run_workers(
    train_fn: Callable[[dict], None],
    config: dict[str, Any],
    cluster: ClusterSection,
    name: str,
    storage_path: str,
    watch: CapacityWatch | None = None,
    restarts: Restarts | None = None,
) -> None:
    """Run `train_fn(config)` on `cluster.num_workers` Ray workers and wait: on a private
    local Ray plain actors (`cluster/worker_group.py`), on a joined cluster Ray Train. Either
    way a failed group is started again by `restarts` (cluster/restarts.py: after a growing
    wait, and never for a failure that would recur), each failure recorded in the run folder
    (STORAGE_PATH/NAME).

    Raises JobFailed with the worker's error when training fails for good (a failure that
    recurs, or the restarts `cluster.max_failures` allows spent), CapacityLost when `watch`
    gave up waiting for nodes.
    """
    check_placeable(cluster)
    restarts = restarts or Restarts(cluster, Path(storage_path) / name)
    if cluster.address == "local":
        from cluster.worker_group import WorkerFailed, run_group

        def run() -> None:
            try:
                run_group(train_fn, config, cluster, restarts=restarts)
            except WorkerFailed as e:
                raise _job_failed(e.failure) from None

    else:
        import ray.train
        from ray.train import FailureConfig, RunConfig
        from ray.train.torch import TorchTrainer

        def fit() -> None:
            trainer = patches.ray_trainer_without_datasets(TorchTrainer)(
                train_fn,
                train_loop_config=config,
                scaling_config=scaling_config(cluster),
                run_config=RunConfig(
                    name=name,
                    storage_path=storage_path,
                    # restarts are `restarts`' (each a new fit()): Ray Train's own would retry
                    # a full disk at once, for ever with max_failures -1
                    failure_config=FailureConfig(max_failures=0),
                ),
                torch_config=torch_config(cluster),
            )
            trainer.fit()

        def failure_of(e: Exception) -> Failure | None:
            return ray_train_failure(e) if isinstance(e, ray.train.TrainingFailedError) else None

        def run() -> None:
            try:
                restarts.run(fit, failure_of)
            except ray.train.TrainingFailedError as e:
                raise _job_failed(ray_train_failure(e)) from None

    import signal

    def give_up(signum, frame) -> None:
        """The watch's SIGUSR1, in the main thread: out of `fit()`. A KeyboardInterrupt, the
        one exception Ray's wait (`ray.get`'s signal check) lets through (it swallows any
        other a signal handler raises); told from Ctrl-C by `watch.timed_out`."""
        if watch is not None and not watch.stopped():
            raise KeyboardInterrupt

    previous = signal.signal(signal.SIGUSR1, give_up) if watch is not None else None
    try:
        if watch is not None:
            watch.start()
        run()
    except KeyboardInterrupt:
        if watch is None or watch.timed_out is None:
            raise
        raise CapacityLost(watch.timed_out) from None
    finally:
        if watch is not None:
            watch.stop()
            signal.signal(signal.SIGUSR1, previous)


def _job_failed(failure: Failure) -> JobFailed:
    return JobFailed(failure.line, failure.status, failure.message if failure.status == 2 else None)


def ray_train_failure(error: Exception) -> Failure:
    """What Ray Train's TrainingFailedError from `fit()` means (cluster/restarts.py): each
    failed rank's own exception (WorkerGroupError.worker_failures, the worker's exception
    as it raised it; for a process that died, a failed health check wrapping Ray's
    ActorDiedError), a worker's death first, then a recurring error; a controller's failure
    (the group could not be started) does not recur."""
    import ray.exceptions

    def died(e: Exception) -> bool:
        return any(isinstance(x, ray.exceptions.RayActorError) for x in (e, getattr(e, "health_check_failure", None)))

    line = worker_error(str(error))
    errors = list(getattr(error, "worker_failures", {}).values())
    if any(died(e) for e in errors):
        return Failure(line)
    failures = [classify(e, line) for e in errors if not isinstance(e, ray.exceptions.RayError)]
    return one_of(failures) if failures else Failure(line)


def route_worker_logs(log_path: Path, verbose: bool = False) -> threading.Event:
    """Show the workers' trainctl lines (progress, checkpoints, warnings, the summary:
    console.CONSOLE_LINE) on this console as they are, and append every other line of
    their output (Ray's, DeepSpeed's, torch's, a traceback) to `log_path`, each with the
    process it came from, instead of Ray's forwarding of everything; `verbose`: every line
    printed as Ray prints it (`patches.ray_log_printer`), and no file. Every line is
    redacted first (`redact_text`: a URL's password, a presigned URL's signature, a bearer
    token).
    Returns an event set once the summary's last row (rank 0's last line) has been shown:
    Ray's log monitor forwards lines a moment after they are written (seconds on a busy
    machine), so the driver waits for it before ray.shutdown() ends the forwarding
    (wait_for_last_line)."""
    from trainer.console import CONSOLE_LINE, LAST_ROW

    dispatcher = patches.ray_log_dispatcher()

    console = re.compile(CONSOLE_LINE)
    last_row = re.compile(rf"^\| {LAST_ROW} +\| ")
    ended = threading.Event()
    log, ray_print = None, patches.ray_log_printer() if verbose else None
    if not verbose:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(log_path, "a", buffering=1)
    # Nodes that share a log folder (several on one machine) each publish every line; Ray's
    # own printing hides that with its deduplicator, this with the lines seen lately.
    recent: collections.OrderedDict[tuple, None] = collections.OrderedDict()

    def handle(data: dict) -> None:
        if ray_print is not None:  # --verbose: Ray's printing, every line redacted
            lines = [redact_text(line) for line in data.get("lines", [])]
            ray_print({**data, "lines": lines})
            if any(last_row.match(line) for line in lines):
                ended.set()
            return
        who = f"({data.get('actor_name') or data.get('task_name') or 'worker'} pid={data.get('pid')} ip={data.get('ip')}) "
        for line in data.get("lines", []):
            key = (data.get("pid"), data.get("is_err"), line)  # each node's copy names itself as the ip
            if key in recent:
                continue
            recent[key] = None
            if len(recent) > 10_000:
                recent.popitem(last=False)
            line = redact_text(line)
            if console.match(line):
                print(line, file=sys.stderr if data.get("is_err") else sys.stdout, flush=True)
                if last_row.match(line):
                    ended.set()
            else:
                log.write(who + line + "\n")

    dispatcher.remove_handler(patches.RAY_PRINT_HANDLER)
    dispatcher.add_handler(LOG_HANDLER, handle)
    return ended


LOG_HANDLER = "trainctl_worker_logs"


def shutdown(conn: Connection | None = None) -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()  # stops Ray's log thread, so every forwarded line has been handled
    patches.ray_log_dispatcher().remove_handler(LOG_HANDLER)
