"""After a worker failure: start the workers again, after how long, or end the job.

A failure that would recur ends the job at once with its one line, whatever
`cluster.max_failures` allows: a checkpoint that cannot be written (a full disk: SaveFailed)
or read, data that cannot be used (DataError), a model.init_from that cannot be loaded
(HFError), a config the worker refuses (pydantic's ValidationError), a divergence the guard
gave up on (Diverged). Started again, the workers would only fail the same way, and with
`max_failures: -1` for ever (about 17 s a turn). Every other failure (a worker's process
killed, a lost node, a collective that timed out, an error not known to recur) is
restarted, up to `max_failures`, after a wait that doubles from FIRST_WAIT_S to MAX_WAIT_S
(back to the first after an attempt that ran RESET_AFTER_S). Each failure is a row of the run
folder's attempts.jsonl, between the workers' own rows: its line, its class and the wait.

Both ways a job's workers run go through `Restarts.run`: a private Ray's actors
(`worker_group.run_group`) and Ray Train on a joined cluster (`ray_job.run_workers`, whose
own FailureConfig then allows none). Torch-free and Ray-free: failures are classified by
the names of their classes.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from trainer.config import ClusterSection, redact_text
from trainer.run_folder import record_failure

T = TypeVar("T")

FIRST_WAIT_S = 1.0  # before the first restart
MAX_WAIT_S = 60.0  # the doubling stops here
RESET_AFTER_S = 600.0  # an attempt that ran this long starts the doubling again

# The failures that recur, by the qualified name of a class in the error's MRO (a subclass
# counts: SaveFailed is a CheckpointError), with the exit status they end the job with:
# 2 for what the user must fix, as `trainctl run` exits on those before launch; a
# divergence as it always ended, 1 ("training failed: Diverged: ...").
RECURRING: dict[str, int] = {
    "trainer.checkpoint.CheckpointError": 2,  # SaveFailed among them
    "trainer.checkpoint.NoCheckpoint": 2,
    "data_pipeline.errors.DataError": 2,
    "trainer.hf.HFError": 2,
    "pydantic_core._pydantic_core.ValidationError": 2,  # the job's config, refused by the worker
    "trainer.guard.Diverged": 1,
}


@dataclass(frozen=True)
class Failure:
    """A failure of the workers: `line` ('SaveFailed: checkpoint ... could not be written
    (...)', or what happened to a worker's process), whether it would recur, and the exit
    status it ends the job with."""

    line: str
    recurs: bool = False
    status: int = 1

    @property
    def message(self) -> str:
        """The line without its class name: what `trainctl: error:` prints (exit 2)."""
        name, sep, rest = self.line.partition(": ")
        return rest if sep and name.replace(".", "").replace("_", "").isalnum() else self.line

    @property
    def kind(self) -> str:
        return "recurring" if self.recurs else "transient"


def recurring_status(error: BaseException | None, line: str = "") -> int | None:
    """The exit status of a failure that recurs (RECURRING), else None: by the error's classes,
    or, when the error did not survive the trip (None), by the class name `line` starts with."""
    if error is not None:
        for cls in type(error).__mro__:
            status = RECURRING.get(f"{cls.__module__}.{cls.__qualname__}")
            if status is not None:
                return status
        return None
    name = line.partition(": ")[0]
    return next((s for qual, s in RECURRING.items() if qual.rsplit(".", 1)[1] == name), None)


def classify(error: BaseException | None, line: str) -> Failure:
    """A worker's error as a Failure: `error` the exception the worker raised (None when a
    process died or the exception is not at hand), `line` the way it is reported. A recurring
    one is reported by its own class and message, one line."""
    status = recurring_status(error, line)
    if status is None:
        return Failure(line)
    if error is not None:
        text = " ".join(str(error).split())  # one line (pydantic's message has several)
        line = f"{type(error).__name__}: {text}" if text else type(error).__name__
    return Failure(line, recurs=True, status=status)


def one_of(failures: list[Failure]) -> Failure:
    """The failure to act on when several ranks failed: a recurring one (a rank that raised
    DataError, its peers then 'Connection closed by peer' or waiting in a collective), else
    the first."""
    return next((f for f in failures if f.recurs), failures[0])


class Restarts:
    """Runs one attempt of a job's workers after another until one ends without a worker
    failure (`run`): a failure that recurs, or one past `cluster.max_failures`, is raised;
    any other is restarted after the backoff. `waiting` is true while it waits (the launcher's
    SIGTERM then stops at once: no step is under way). `folder`: the run folder whose
    attempts.jsonl records each failure (None: not recorded)."""

    def __init__(
        self,
        cluster: ClusterSection,
        folder: Path | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.max_failures, self.folder, self.sleep, self.clock = cluster.max_failures, folder, sleep, clock
        self.failures = 0  # in all, as max_failures counts them
        self.streak = 0  # failures in a row, each attempt shorter than RESET_AFTER_S: the wait's exponent
        self.waiting = False

    def wait_after(self, failure: Failure, ran_s: float) -> float | None:
        """Count `failure` (of an attempt that ran `ran_s`), record it, and return the seconds
        to wait before the restart, or None when there is none."""
        self.failures += 1
        self.streak = 1 if ran_s >= RESET_AFTER_S else self.streak + 1
        spent = self.max_failures != -1 and self.failures > self.max_failures
        wait = None if failure.recurs or spent else min(MAX_WAIT_S, FIRST_WAIT_S * 2 ** (self.streak - 1))
        if self.folder is not None:
            try:
                record_failure(self.folder, failure.line, failure.kind, wait)
            except OSError as e:  # the run folder on a failing disk: the job goes on regardless
                print(f"trainctl: warning: cannot record the failure in {self.folder} ({e})", file=sys.stderr)
        return wait

    def run(self, attempt: Callable[[], T], failure_of: Callable[[Exception], Failure | None]) -> T:
        """`attempt()` until it returns; `failure_of(e)` says what an exception it raised
        means (None: not a worker failure, raised as it is). The exception that ends the
        job (a recurring failure, the restarts spent) is raised as it came."""
        limit = "unlimited" if self.max_failures == -1 else self.max_failures
        while True:
            started = self.clock()
            try:
                return attempt()
            except Exception as e:
                failure = failure_of(e)
                if failure is None:
                    raise
                wait = self.wait_after(failure, self.clock() - started)
                if wait is None:
                    raise
            print(
                f"trainctl: a worker failed ({redact_text(failure.line)}); starting the workers again in {wait:g} s "
                f"({self.failures} of {limit} restarts)",
                file=sys.stderr,
                flush=True,
            )
            self.waiting = True
            try:
                self.sleep(wait)
            finally:
                self.waiting = False
