"""TensorBoard and MLflow: the dashboards beside W&B (trainer/tracking.py's WandbTracker),
each through its own library, behind the same calls (`held_step`, `log`, `summarize`,
`table`, `finish`, and `purge` where it `replaces`) so the tracker treats them alike.

Their histories differ, and so does what a resume does to them:
- TensorBoard's event files are append-only, but a `SessionLog.START` event at step S makes
  TensorBoard's readers drop the events at steps >= S written before it (what
  `SummaryWriter(purge_step=S)` writes). A resume from step R purges from R + 1: the steps
  the crashed attempt logged after its checkpoint are replaced by the resumed attempt's, as
  in metrics.jsonl. So `replaces` is True, and `held_step` is capped at R.
- MLflow's metric history is append-only with no delete: a step it holds is never sent
  again (as with W&B); `held_step` asks the tracking store.

Values: metrics.jsonl's, flattened (`data_mix: {a: 0.5}` -> `data_mix/a`); what is not a
number (None, text) is left out. Each library is imported here, inside, and a missing one is
refused before the job starts (launcher/cli.py through `missing_library`).
"""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path
from typing import Any

# backend -> (the modules it imports, what to pip install when one is missing)
LIBRARIES = {
    "wandb": (("wandb",), "wandb"),
    "tensorboard": (("tensorboard",), "tensorboard"),
    "mlflow": (("mlflow", "sqlalchemy", "alembic"), "mlflow"),  # the SQLite store needs the last two
}


def missing_library(backend: str, mlflow_uri: str | None = None) -> str | None:
    """The package to install for `backend` when a module it imports is missing, else None
    (MLflow on a server, `mlflow_uri` http(s), needs no database library here)."""
    import importlib.util

    modules, package = LIBRARIES[backend]
    if backend == "mlflow" and (mlflow_uri or "").startswith(("http://", "https://", "databricks")):
        modules = ("mlflow",)
    return None if all(importlib.util.find_spec(m) is not None for m in modules) else package


def mlflow_server_problem(uri: str | None, timeout_s: float = 5.0) -> str | None:
    """Why the MLflow server at `uri` (http(s)) cannot be used, in a line, or None: asked once
    before the job starts (its /health, which every MLflow server answers), so a URI that does
    not answer stops the job there instead of turning MLflow off a minute into the run."""
    import urllib.error
    import urllib.request

    if not uri or not uri.startswith(("http://", "https://")):
        return None
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as answer:
            answer.read(64)
        return None
    except urllib.error.HTTPError as e:
        return f"tracking.mlflow_uri {uri} answered {e.code} {e.reason} to /health: is it an MLflow server?"
    except (OSError, ValueError) as e:
        why = getattr(e, "reason", None) or e
        return f"tracking.mlflow_uri {uri} does not answer ({why}): start the MLflow server or correct the URI"


def scalars(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The numbers of a metrics row, nested dicts flattened with '/'."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(scalars(value, f"{name}/"))
        elif isinstance(value, bool):
            out[name] = float(value)
        elif isinstance(value, int | float):
            out[name] = float(value)
    return out


def markdown_table(columns: list[str], rows: list[list[Any]]) -> str:
    cell = lambda v: str(v).replace("|", "\\|").replace("\n", "<br>")  # noqa: E731
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows])


class TensorBoardBackend:
    """Event files in run_dir/tensorboard (`tensorboard --logdir runs` shows every run)."""

    name = "tensorboard"
    replaces = True

    def __init__(self, run_dir: Path, resume_step: int):
        from torch.utils.tensorboard import SummaryWriter

        self.dir = run_dir / "tensorboard"
        self.held = min(self._last_step_on_disk(), resume_step)
        # purge_step: the steps after the checkpoint that an earlier attempt wrote are hidden
        self.writer = SummaryWriter(str(self.dir), purge_step=resume_step + 1 if self.held >= 0 else None)

    def _last_step_on_disk(self) -> int:
        """The highest step of a scalar TensorBoard shows from the earlier attempts' files
        (purges applied, as its own reader applies them); -1 for none."""
        if not self.dir.is_dir() or not any(self.dir.glob("events.out.tfevents.*")):
            return -1
        from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

        acc = EventAccumulator(str(self.dir), size_guidance={SCALARS: 1})  # the reservoir keeps the newest
        acc.Reload()
        steps = [acc.Scalars(tag)[-1].step for tag in acc.Tags()[SCALARS]]
        return max(steps, default=-1)

    def held_step(self) -> int:
        return self.held

    def log(self, metrics: dict[str, Any], step: int) -> None:
        for key, value in scalars(metrics).items():
            self.writer.add_scalar(key, value, step)

    def purge(self, step: int) -> None:
        """Hide what was written at steps >= `step` (a rollback: they are logged again)."""
        from tensorboard.compat.proto.event_pb2 import Event, SessionLog

        self.writer.flush()
        self.writer.file_writer.add_event(Event(step=step, session_log=SessionLog(status=SessionLog.START)))

    def summarize(self, values: dict[str, Any]) -> None:
        rows = [[k, json.dumps(v) if isinstance(v, dict | list) else v] for k, v in values.items()]
        self.writer.add_text("summary", markdown_table(["key", "value"], rows))

    def table(self, key: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
        self.writer.add_text(key, markdown_table(columns, rows), step)

    def finish(self) -> None:
        self.writer.close()


MLFLOW_KEY = re.compile(r"[^A-Za-z0-9_\-. /]")  # what MLflow allows in a metric or param name


class MlflowBackend:
    """One MLflow run per trainctl run, in the experiment `tracking.project`: the store is
    `tracking.mlflow_uri`, else the SQLite file `<checkpoint.local_path>/mlflow.db` (`mlflow ui
    --backend-store-uri sqlite:///runs/mlflow.db`; MLflow 3 refuses a new `mlruns/` folder store). Its id is kept in run_dir/mlflow_run_id (and in each checkpoint), so a
    restart, on this machine or another, continues the same run."""

    name = "mlflow"
    replaces = False

    def __init__(self, cfg, run_dir: Path, run_id_file: Path):
        import logging

        from mlflow.tracking import MlflowClient

        for name in ("mlflow", "alembic"):  # their INFO lines (creating the store's tables) are not the run's
            logging.getLogger(name).setLevel(logging.WARNING)
        uri = cfg.tracking.mlflow_uri or sqlite_store((run_dir.parent / "mlflow.db").resolve())
        self.client = MlflowClient(tracking_uri=uri)
        rid = run_id_file.read_text().strip() if run_id_file.is_file() else ""
        if not rid:
            exp = self.client.get_experiment_by_name(cfg.tracking.project)
            # its artifacts (the samples tables) beside the default store, not in the working directory
            where = None if cfg.tracking.mlflow_uri else (run_dir.parent / "mlartifacts").resolve().as_uri()
            exp_id = exp.experiment_id if exp else self.client.create_experiment(cfg.tracking.project, where)
            tags = {f"trainctl.tag.{t}": "1" for t in cfg.tracking.tags}
            if cfg.tracking.group:
                tags["trainctl.group"] = cfg.tracking.group
            run = self.client.create_run(exp_id, run_name=cfg.name, tags=tags)
            rid = run.info.run_id
            run_id_file.write_text(rid + "\n")
            params = flat_params(cfg.redacted())
            for i in range(0, len(params), 100):  # MLflow takes at most 100 params in one batch
                self.client.log_batch(rid, params=params[i : i + 100])
        else:
            self.client.update_run(rid, status="RUNNING")
        self.run_id = rid

    def held_step(self) -> int:
        """The highest step of any metric the store holds for this run (-1: none)."""
        keys = self.client.get_run(self.run_id).data.metrics
        return max((m.step for key in keys for m in self.client.get_metric_history(self.run_id, key)), default=-1)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        values = [Metric(MLFLOW_KEY.sub("_", k), v, now, step) for k, v in scalars(metrics).items() if math.isfinite(v)]
        if values:
            self.client.log_batch(self.run_id, metrics=values)

    def summarize(self, values: dict[str, Any]) -> None:
        tags = {MLFLOW_KEY.sub("_", f"trainctl.{k}"): str(v)[:5000] for k, v in values.items()}
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, value)

    def table(self, key: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
        self.client.log_dict(
            self.run_id, {"step": step, "columns": columns, "rows": rows}, f"{key}/step_{step:08d}.json"
        )

    def finish(self) -> None:
        self.client.set_terminated(self.run_id)


def sqlite_store(path: Path) -> str:
    """The URI of MLflow's SQLite store at `path`, the file made whole first. MLflow creates its
    tables in many transactions, and a SIGKILL among them (the chaos test's, during a first
    start) left a store MLflow then refused ("table secrets already exists"); so a new store
    is made under another name and linked into place once complete (a link, not a rename:
    another run making the same store at once keeps the one that got there first)."""
    import os

    from mlflow.tracking import MlflowClient

    if not path.exists():
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            MlflowClient(tracking_uri=f"sqlite:///{tmp}").search_experiments()  # creates the tables
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    return f"sqlite:///{path}"


def flat_params(config: dict[str, Any], prefix: str = "") -> list:
    """The run's config as MLflow params (`train.lr`: "0.001"), values cut to MLflow's 6,000."""
    from mlflow.entities import Param

    out = []
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.extend(flat_params(value, f"{name}."))
        else:
            text = value if isinstance(value, str) else json.dumps(value)  # a name as itself, not "quoted"
            out.append(Param(MLFLOW_KEY.sub("_", name), text[:6000]))
    return out
