"""Where metrics go: `metrics.jsonl` in the run folder always, W&B when enabled.

Only rank 0 builds a tracker. W&B sits behind the same two calls as the JSONL file, and
any W&B failure (no network, bad key, a crash of its service) becomes one warning: a
dashboard must never stop a training run.
"""

from __future__ import annotations

import json
import os
import secrets
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from trainer.config import JobConfig
from trainer.console import warn


class MetricsFile:
    """Appends one JSON object per logged step to run_dir/metrics.jsonl."""

    def __init__(self, run_dir: Path, resume_step: int = 0):
        self.path = run_dir / "metrics.jsonl"
        self._fh = None
        self.high = self.last_step()  # before a resume drops the rows after its checkpoint
        self.rewind(resume_step)

    def last_step(self) -> int:
        """The highest step logged so far (0 for none)."""
        if not self.path.exists():
            return 0
        return max(
            (json.loads(row).get("step", 0) for row in self.path.read_text().splitlines() if row.strip()), default=0
        )

    def rewind(self, step: int) -> None:
        """Drop the rows of steps after `step`: they will be logged again (a resume, a rollback)."""
        if self._fh is not None:
            self._fh.close()
        if self.path.exists():
            rows = self.path.read_text().splitlines(keepends=True)
            kept = [row for row in rows if row.strip() and json.loads(row).get("step", 0) <= step]
            if len(kept) != len(rows):
                tmp = self.path.with_name(".metrics.jsonl.tmp")
                tmp.write_text("".join(kept))
                os.replace(tmp, self.path)
        self._fh = open(self.path, "a", buffering=1)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self._fh.write(json.dumps({"step": step, **metrics}) + "\n")

    def finish(self) -> None:
        self._fh.close()


class WandbTracker:
    """W&B from rank 0. offline by default: the run folder lands in run_dir/wandb and
    `wandb sync` uploads it later. A stable run id (kept in run_dir) with resume="allow"
    continues the same W&B run after a restart. The steps replayed after a resume (those
    between the checkpoint and the crash) are not sent again (see Tracker): W&B history is
    append-only, and a resumed run recomputes them bit for bit anyway."""

    def __init__(self, cfg: JobConfig, run_dir: Path):
        import wandb  # an integration imports its library inside, not at the top of core files

        self._wandb = wandb
        mode = os.environ.get("WANDB_MODE") or cfg.tracking.mode
        self.run = wandb.init(
            project=cfg.tracking.project,
            entity=cfg.tracking.entity,
            group=cfg.tracking.group,
            tags=cfg.tracking.tags or None,
            name=cfg.name,
            id=run_id(run_dir),
            resume="allow",
            dir=str(run_dir),
            mode=mode,
            config=cfg.redacted(),  # secrets (URL credentials, secret cluster.env values) as ***
            # x_disable_meta: W&B would record the command line (and so a secret given as an override)
            settings=wandb.Settings(silent=True, console="off", x_disable_meta=True),
        )

        # Every metric is drawn against the global step, so a resumed run continues one line.
        self.run.define_metric("trainer/global_step")
        self.run.define_metric("*", step_metric="trainer/global_step")

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self.run.log({**{k: v for k, v in metrics.items() if v is not None}, "trainer/global_step": step}, step=step)

    def summarize(self, values: dict[str, Any]) -> None:
        self.run.summary.update(values)

    def table(self, key: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
        self.log({key: self._wandb.Table(columns=columns, data=rows)}, step)

    def finish(self) -> None:
        self.run.finish()


def run_id(run_dir: Path) -> str:
    """The run's W&B id, created once and kept in the run folder."""
    path = run_dir / "wandb_run_id"
    if path.exists():
        return path.read_text().strip()
    rid = secrets.token_hex(4)
    path.write_text(rid + "\n")
    return rid


class Tracker:
    """Fans each log call out to the metrics file and, if it works, W&B.

    W&B starts in a thread (its service takes a second or more), so the first steps do not
    wait for it: calls made before it is up are kept and sent, in order, once it is."""

    def __init__(self, cfg: JobConfig, run_dir: Path, resume_step: int = 0):
        self.file = MetricsFile(run_dir, resume_step)
        self.wandb_high = self.file.high  # W&B already holds every step up to here
        self.carried: dict[str, Any] = {}  # events of a replayed step, sent with W&B's next new step
        self.wandb: WandbTracker | None = None
        self.pending: list[tuple[str, tuple]] = []  # calls made while W&B starts
        self.starting: Future | None = None
        if (os.environ.get("WANDB_MODE") or cfg.tracking.mode) != "disabled":
            self.starting = ThreadPoolExecutor(1, thread_name_prefix="wandb-init").submit(WandbTracker, cfg, run_dir)

    def _started(self, wait: bool) -> bool:
        """Whether W&B's start has finished (waiting for it if `wait`); a failed start is one warning."""
        if self.starting is None:
            return True
        if not wait and not self.starting.done():
            return False
        try:
            self.wandb = self.starting.result()
        except Exception as e:  # noqa: BLE001 - any W&B failure must not stop training
            warn(f"W&B tracking is off for this run ({type(e).__name__}: {e}); metrics still go to {self.file.path}")
        self.starting = None
        return True

    def rewind(self, step: int) -> None:
        self.wandb_high = max(self.wandb_high, self.file.last_step())
        self.file.rewind(step)  # the replayed steps keep their first values in W&B

    def log(self, metrics: dict[str, Any], step: int, event: bool = False) -> None:
        """Log a step's values. A step W&B already holds (replayed after a resume) goes to the
        metrics file only; an `event` (a restart) then goes with W&B's next new step."""
        self.file.log(metrics, step)
        if step <= self.wandb_high:
            if event:
                self.carried.update(metrics)
            return
        metrics, self.carried = {**self.carried, **metrics}, {}
        self._wandb_call("log", metrics, step)

    def _wandb_call(self, what: str, *args, wait: bool = False) -> None:
        self.pending.append((what, args))
        if not self._started(wait):
            return
        calls, self.pending = self.pending, []
        for name, call_args in calls:
            if self.wandb is None:
                return
            try:
                getattr(self.wandb, name)(*call_args)
            except Exception as e:  # noqa: BLE001
                hint = f"; run `wandb sync` on {self.file.path.parent}/wandb" if name == "finish" else ""
                warn(f"W&B {name} failed, tracking turned off ({type(e).__name__}: {e}){hint}")
                self.wandb = None

    def describe(self, values: dict[str, Any]) -> None:
        """Facts about the run (its plan figures, the tokenizer): run.json and the W&B summary."""
        (self.file.path.parent / "run.json").write_text(json.dumps(values, indent=1) + "\n")
        self._wandb_call("summarize", values)

    def summarize(self, rows: list[tuple[str, str]]) -> None:
        self._wandb_call("summarize", {f"summary/{k}": v for k, v in rows})

    def samples(self, step: int, rows: list[list[Any]]) -> None:
        """Validation samples (prompt, continuation) as a W&B table, and samples.jsonl."""
        with open(self.file.path.parent / "samples.jsonl", "a") as f:
            f.writelines(json.dumps({"step": step, "prompt": p, "sample": c}) + "\n" for p, c in rows)
        if step > self.wandb_high:
            self._wandb_call("table", "val/samples", ["prompt", "sample"], rows, step)

    def finish(self) -> None:
        self.file.finish()
        self._wandb_call("finish", wait=True)  # the calls kept while W&B started go out first
