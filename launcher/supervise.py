"""The launcher's watch over a job on Ray while it runs: SIGTERM, lost capacity, and how
the run ends (an exit status and one last line).

SIGTERM (spot reclaim, `scancel`, pod eviction, `trainctl stop`) asks the workers, through
the run folder's PREEMPT file, to save at the next step boundary and stop; if they have not
within `checkpoint.preempt_grace_s`, the launcher exits anyway. When no step is under way
to stop at (the workers have not started in this invocation, or wait for nodes that are
gone), there is nothing to save: it stops at once. Lost nodes are watched by
cluster/ray_job.py's CapacityWatch. Torch-free at import, like the rest of launcher/.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from launcher.exits import FAILED, PREEMPTED
from trainer.config import JobConfig, redact_text
from trainer.redaction import SECRETS_ENV, secrets_apart
from trainer.run_folder import LAUNCH, PREEMPT, RunFolder


class StopNow(KeyboardInterrupt):
    """SIGTERM with no step under way: leave fit() at once. A KeyboardInterrupt: the one
    exception Ray's wait lets through from a signal handler (it swallows others, and raises
    a plain KeyboardInterrupt in its place: `Sigterm.stop` says which it was)."""


def workers_started(folder: Path) -> bool:
    """Whether this invocation's workers have started (recorded an attempt) yet."""
    try:
        launched_at = json.loads((folder / LAUNCH).read_text())["started_at"]
        rows = [json.loads(row) for row in (folder / "attempts.jsonl").read_text().splitlines() if row.strip()]
        return any(row["at"] >= launched_at for row in rows if "step" in row)  # a start, not a failure
    except (OSError, ValueError, KeyError, TypeError):  # a row cut short by a crash: not started, as far as known
        return False


def where_now(run: RunFolder) -> str:
    """'at step N (the same command resumes from CKPT)': for the lines about a stop."""
    folder, store = run.path, run.store
    step = 0
    try:
        rows = (folder / "metrics.jsonl").read_text().splitlines()
    except OSError:
        rows = []
    for row in rows:
        try:
            step = max(step, int(json.loads(row).get("step", 0)))
        except (ValueError, TypeError, AttributeError):  # a line cut short by a crash
            continue
    try:
        tags = store.tags()
    except Exception:  # noqa: BLE001 - a line about the run must not fail on a flaky store
        tags = []
    resumes = f"the same command resumes from {store.where(tags[-1])}" if tags else "no checkpoint yet"
    return f"at step {step} ({resumes})"


class Sigterm:
    """The launcher's SIGTERM handler. `idle()` says why no step is under way (then stop at
    once), or None (then ask for a checkpoint at the next step, within grace_s). While Ray
    starts (`starting`), a stop waits for `ray.init` to return (`check()` raises it then),
    so no half-started Ray is left behind."""

    def __init__(self, folder: Path, grace_s: float, idle: Callable[[], str | None]):
        self.folder, self.grace_s, self.idle = folder, grace_s, idle
        self.starting, self.stop = True, False
        signal.signal(signal.SIGTERM, self.handler)

    def started(self) -> None:
        """Ray is up: take SIGTERM back (`ray.init` puts in its own, which exits with status
        15) and stop now if it came while Ray started."""
        signal.signal(signal.SIGTERM, self.handler)
        self.starting = False
        if self.stop:
            raise StopNow

    def handler(self, signum, frame) -> None:
        folder, grace_s = self.folder, self.grace_s
        (folder / PREEMPT).touch()
        why = "while Ray starts" if self.starting else self.idle()
        if why is not None:
            print(f"trainctl: SIGTERM {why}: no step to save at, stopping now", file=sys.stderr, flush=True)
            self.stop = True
            if not self.starting:
                raise StopNow
            return
        print(
            f"trainctl: SIGTERM: saving a checkpoint at the next step boundary, then stopping (grace {grace_s:g} s)",
            file=sys.stderr,
            flush=True,
        )
        timer = threading.Timer(grace_s, lambda: os._exit(PREEMPTED))
        timer.daemon = True
        timer.start()


def pause_point(folder: Path, name: str) -> None:
    """Where the tests stop the launcher at a known point (`TRAINCTL_TEST_PAUSE_AT=NAME`): it
    writes `folder/paused-NAME` and waits (2 minutes at most) until the test deletes it, a
    SIGTERM handled meanwhile as it would be at that point. A no-op otherwise."""
    if os.environ.get("TRAINCTL_TEST_PAUSE_AT") != name:
        return
    marker = folder / f"paused-{name}"
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()
    for _ in range(1200):
        if not marker.exists():
            return
        time.sleep(0.1)


# How long a finished run waits for Ray to forward rank 0's last line (seconds at most on a
# busy machine; a run on which it never comes only ends this much later).
LAST_LINE_WAIT_S = 30


def run_supervised(cfg: JobConfig, run: RunFolder, worker: Callable[..., str], verbose: bool) -> int | str:
    """Train on Ray: returns the status ("done", "preempted"), or the exit status after
    printing the last line (a failure, lost capacity, a stop before any step)."""
    from cluster.ray_job import (
        CapacityLost,
        CapacityWatch,
        JobFailed,
        NotPlaceable,
        connect,
        import_ray_train_meanwhile,
        route_worker_logs,
        run_workers,
        shutdown,
    )
    from cluster.restarts import Restarts
    from launcher.job import UsageError

    folder = run.path
    watch = CapacityWatch(cfg.cluster, lambda: where_now(run))
    restarts = Restarts(cfg.cluster, folder)

    def idle() -> str | None:
        if watch.waiting_since is not None:
            return "while waiting for capacity"
        if restarts.waiting:
            return "while waiting to start the workers again"
        if cfg.cluster.address != "local":  # the workers' run folder may be on other machines: ask them
            return None
        return None if workers_started(folder) else "before the workers started"

    failure, last_line, secrets = None, None, None
    config = cfg.model_dump(mode="json")
    sigterm = Sigterm(folder, cfg.checkpoint.preempt_grace_s, idle)
    try:
        try:
            if cfg.cluster.address != "local":  # a private Ray runs plain actors (cluster/worker_group.py)
                import_ray_train_meanwhile()
            else:  # the workers' arguments hold the config's secrets as ***, the real ones inherited
                config, secrets = secrets_apart(config)
            pause_point(folder, "ray-start")
            if sigterm.stop:  # stopped before Ray started: nothing to start, nothing to shut down
                raise StopNow
            connect(cfg.cluster, verbose=verbose, secrets={SECRETS_ENV: secrets} if secrets else None)
        except SystemExit as e:  # ray.init's own SIGTERM handler, while it started Ray
            if e.code != signal.SIGTERM:
                raise
            sigterm.handler(signal.SIGTERM, None)
        sigterm.started()  # the launcher's SIGTERM handler back at once (ray.init put in its own)
        last_line = route_worker_logs(folder / "workers.log", verbose)  # redacted, to the console or the file
        pause_point(folder, "workers-start")
        # The run folder travels with the worker function, its URL's credentials apart as the config's are.
        worker = functools.partial(worker, run=run.for_workers() if secrets else run)
        run_workers(worker, config, cfg.cluster, cfg.name, str(folder.parent), watch, restarts)
        if last_line is not None:  # rank 0's summary, forwarded a moment after the workers end
            last_line.wait(LAST_LINE_WAIT_S)
    except (JobFailed, CapacityLost) as e:
        failure = e
    except NotPlaceable as e:
        raise UsageError(str(e)) from None
    except KeyboardInterrupt:
        if not sigterm.stop:
            raise
        failure = StopNow()
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # from here on, ending is all that is left
        shutdown()  # first, so that Ray's forwarded worker logs end before our last line
    if isinstance(failure, StopNow):
        (folder / PREEMPT).unlink(missing_ok=True)
        print(f"trainctl: stopped: the run is {where_now(run)}", file=sys.stderr)
        return PREEMPTED
    if isinstance(failure, CapacityLost):
        print(f"trainctl: stopped: {redact_text(str(failure))}", file=sys.stderr)
        return FAILED
    if isinstance(failure, JobFailed) and failure.status == 2:  # a full disk, bad data: the user's to fix
        print(f"trainctl: error: {redact_text(failure.message)}", file=sys.stderr)
        return 2
    if failure is not None:
        where = "" if verbose else f" (the workers' output: {folder / 'workers.log'})"
        print(f"trainctl: training failed: {redact_text(str(failure))}{where}", file=sys.stderr)
        return FAILED
    status = "preempted" if (folder / PREEMPT).exists() else "done"
    (folder / PREEMPT).unlink(missing_ok=True)
    return status
