"""The run folder, `checkpoint.storage_path/NAME/`: where it is and what the launcher and
the workers leave in it; both sides go through this module. Torch-free at import (the
launcher's commands that only check a job must start fast).

    config.yaml        the resolved job (rank 0, at start)
    checkpoints/       the run's checkpoints (or, with an object-store storage_path, their mirror)
    metrics.jsonl      one row per logged step (tracking.py); wandb/ and wandb_run_id beside it
    launch.json        when this invocation of `trainctl run` started: restarts count from it
    attempts.jsonl     one row per start of the workers, and the launcher's row for each failure
    rollbacks.jsonl    one row per divergence rollback (guard.py)
    PREEMPT            present while a stop is requested (the launcher got SIGTERM)
    workers.log        Ray's, DeepSpeed's and torch's own output, unless --verbose
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from data_pipeline.redact import REDACTED
from data_pipeline.sources import is_url
from trainer.config import JobConfig, redact_text

if TYPE_CHECKING:
    from trainer.checkpoint import Store

PREEMPT = "PREEMPT"
LAUNCH = "launch.json"
RUN_FILES = (
    "checkpoints",
    "metrics.jsonl",
    "attempts.jsonl",
    "rollbacks.jsonl",
    "wandb_run_id",
    "mlflow_run_id",
    "tensorboard",
)  # --fresh --force deletes
# The run's history, copied into every checkpoint (with the W&B run id in its trainctl.json):
# a resume on a machine that has only the checkpoints (an object store) takes it back.
HISTORY = ("metrics.jsonl", "attempts.jsonl", "rollbacks.jsonl", "mlflow_run_id")  # MLflow's: the run continues


class RunFolderError(ValueError):
    """The run folder cannot be used as asked: one line for the user."""


@dataclass(frozen=True)
class RunFolder:
    """A run's folder and where its checkpoints live: made once per job from its config
    (`of`) by the command that starts it, and handed down (the launcher's checks, the
    supervisor, every worker: a plain value, pickled to each). `path` is the local folder
    (with an object-store storage_path, checkpoint.local_path/NAME); `url` the checkpoints'
    object-store URL, or None."""

    path: Path
    url: str | None = None

    @classmethod
    def of(cls, cfg: JobConfig) -> RunFolder:
        c = cfg.checkpoint
        url = f"{c.storage_path.rstrip('/')}/{cfg.name}/checkpoints" if is_url(c.storage_path) else None
        return cls(Path(c.local_path if url else c.storage_path) / cfg.name, url)

    def for_workers(self) -> RunFolder:
        """This value as a private Ray's workers get it in their arguments, which Ray may log:
        the URL's credentials as REDACTED (their config's secrets travel apart the same way,
        trainer/redaction.py); the worker takes them back with `restored`."""
        return replace(self, url=redact_text(self.url)) if self.url else self

    def restored(self, cfg: JobConfig) -> RunFolder:
        """The credentials `for_workers` took out of the URL, back from the worker's own config
        (its secrets already put back)."""
        return replace(self, url=RunFolder.of(cfg).url) if self.url and REDACTED in self.url else self

    @property
    def store(self) -> Store:
        """The run's checkpoints (a new handle each time: it holds no state of its own)."""
        from trainer import checkpoint  # torch: not for the commands that only read the config

        return checkpoint.Store(self.path / "checkpoints", self.url)

    def launched(self) -> None:
        """Note when this invocation started (restarts are counted from it); clear a stale stop request."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            (self.path / PREEMPT).unlink(missing_ok=True)
            (self.path / LAUNCH).write_text(json.dumps({"started_at": time.time(), "pid": os.getpid()}) + "\n")
        except OSError as e:
            raise RunFolderError(
                f"cannot write the run folder {self.path} ({e.strerror or e}): set checkpoint.storage_path to "
                "a folder this machine (and every node) can write"
            ) from None

    def start_over(self, force: bool, delete: bool) -> None:
        """--fresh: refuse to mix into a run folder that holds a run, unless --force; then
        (`delete`, once the job is known to be valid) delete its checkpoints, metrics and W&B
        run id (a new W&B run)."""
        store = self.store
        held = [p.name for p in (self.path / "checkpoints", self.path / "metrics.jsonl") if p.exists()]
        if store.url is not None and store.tags():
            held.append(store.url)
        if not held:
            return
        if not force:
            raise RunFolderError(
                f"--fresh: {self.path} already holds a run ({', '.join(held)}): "
                "add --force to delete it and start over, or choose another name="
            )
        if not delete:
            return
        store.delete(store.tags())
        for p in (self.path / name for name in RUN_FILES):
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()


def history(folder: Path) -> dict[str, str]:
    """The run folder's history files, name → text, for a checkpoint to keep."""
    return {name: (folder / name).read_text() for name in HISTORY if (folder / name).is_file()}


def restore_history(folder: Path, ckpt: Path) -> list[str]:
    """Take back what the run folder lacks of the run's history from its own checkpoint
    `ckpt` (the run folder is new: a fresh machine, the object store kept the checkpoints):
    the history files and the W&B run id, so metrics continue and W&B continues the same
    run. Returns the names restored."""
    from trainer import checkpoint

    restored = []
    for name in HISTORY:
        if (ckpt / name).is_file() and not (folder / name).exists():
            shutil.copyfile(ckpt / name, folder / name)
            restored.append(name)
    rid = checkpoint.meta(ckpt).get("wandb_run_id")
    if rid and not (folder / "wandb_run_id").exists():
        (folder / "wandb_run_id").write_text(rid + "\n")
        restored.append("wandb_run_id")
    return restored


def rewind(store: Store, to: Path, newer: list[Path]) -> None:
    """Delete the checkpoints after `to` and point `latest` at it."""
    store.delete([c.name for c in newer])
    store.set_latest(to.name)


class StopRequest:
    """A request to save and stop at the next step boundary: SIGTERM to this process (when
    the worker runs on the main thread: alone or under torchrun), or the PREEMPT file the
    launcher writes when it gets SIGTERM (under Ray, whose workers run the loop in a
    thread). Every rank checks after each step and they agree in one all-reduce."""

    def __init__(self, folder: Path):
        self.file, self.signalled = folder / PREEMPT, False
        try:
            signal.signal(signal.SIGTERM, self._on_sigterm)
        except ValueError:  # not the main thread
            pass

    def _on_sigterm(self, signum, frame) -> None:
        self.signalled = True

    def requested(self) -> bool:
        return self.signalled or self.file.exists()


@dataclass
class Attempt:
    restarts: int  # restarts of the workers so far in this invocation
    lost_s: float  # seconds lost to the last one: from the save of the checkpoint it resumed from until now
    launched_at: float  # when this invocation of `trainctl run` started (wall clock)
    launched_step: int  # the step its first attempt started at


def record_attempt(folder: Path, step: int, ckpt: Path | None) -> Attempt:
    """Note this start of the workers in the run folder and say where it stands."""
    started = json.loads((folder / LAUNCH).read_text())["started_at"] if (folder / LAUNCH).exists() else time.time()
    attempts = folder / "attempts.jsonl"
    with open(attempts, "a") as f:
        f.write(json.dumps({"at": time.time(), "step": step}) + "\n")
    rows = [json.loads(line) for line in attempts.read_text().splitlines() if line.strip()]
    mine = [row for row in rows if "step" in row and row["at"] >= started]  # starts, not failures
    restarts = len(mine) - 1
    from trainer import checkpoint

    lost = time.time() - checkpoint.meta(ckpt).get("saved_at", time.time()) if restarts and ckpt is not None else 0.0
    return Attempt(restarts, lost, started, mine[0]["step"])


def record_failure(folder: Path, failure: str, kind: str, wait_s: float | None) -> None:
    """Note a failure of the workers in attempts.jsonl (the launcher's row, between the
    workers' rows of the attempt that failed and the next): its line, redacted; its class
    ("recurring": the job ends at once; "transient": restarted); the seconds waited before
    the restart (null: none, the job ends)."""
    folder.mkdir(parents=True, exist_ok=True)
    row = {"at": time.time(), "failure": redact_text(failure), "class": kind, "wait_s": wait_s}
    with open(folder / "attempts.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
