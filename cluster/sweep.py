"""A sweep's trials on Ray Tune: every trial is one trainctl job, run inside the one Ray the
sweep uses (a private local one, or a joined cluster) as a Tune function trainable.

Tune owns what a sweep engine owns: the grid, how many trials run at once, placement (each
trial's placement group holds its workers' bundles, STRICT_PACK: a trial's ranks share a
machine and its loopback rendezvous), ASHA early stopping on the validation loss, and the
experiment's state, which a re-run of the same command restores (`Tuner.restore`: finished
trials kept, unfinished and failed ones started again). trainctl owns the job: the trial function runs
the job's workers (cluster/worker_group.py's actors, captured by the trial's placement
group) on the trial's own run folder, where a restarted trial resumes from its newest
checkpoint as `trainctl run` would; their output goes to the run folder's workers.log. The
trial reports the run's metrics.jsonl rows (step, loss, val_loss) to Tune as they appear.

Ray and Tune are imported inside the functions, as everywhere in cluster/.
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from trainer.config import ClusterSection
from trainer.console import duration


@dataclass
class TrialSpec:
    """One trial as the launcher made it: its name, run folder, resolved job and grid values."""

    name: str
    folder: str
    config: dict  # the resolved job (JobConfig.model_dump(mode="json"))
    values: dict[str, str]  # grid key -> the value as given

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Outcome:
    """How a trial ended, from what Tune recorded: its state, error and reported rows."""

    name: str
    status: str  # Tune's: TERMINATED, ERROR, PENDING, RUNNING
    error: str | None
    rows: list[dict] = field(default_factory=list)  # one per step reported, in step order


class Reporter:
    """Follows a run's metrics.jsonl and reports each step's row ({step, loss, val_loss...})
    to Tune once the step is complete (a later step appeared, or `flush`). A file rewritten
    shorter (a resume rewinds it) is read again from its start; Tune keeps the last report
    of a step."""

    KEYS = ("step", "loss", "val_loss", "lr", "tokens")

    def __init__(self, path: Path, report: Callable[[dict], None]):
        self.path, self.report = path, report
        self.offset, self.inode, self.pending = 0, None, {}

    def poll(self, flush: bool = False) -> None:
        try:
            st = self.path.stat()
        except OSError:
            return
        if st.st_ino != self.inode or st.st_size < self.offset:  # replaced or rewound: from the start
            self.inode, self.offset, self.pending = st.st_ino, 0, {}
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        whole = data[: data.rfind(b"\n") + 1]  # a last line not yet whole waits for the next look
        self.offset += len(whole)
        for line in whole.decode("utf-8", errors="replace").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if not isinstance(row, dict) or "step" not in row:
                continue
            kept = {k: row[k] for k in self.KEYS if isinstance(row.get(k), (int, float))}
            self.pending.setdefault(row["step"], {}).update(kept)
        last = max(self.pending, default=-1)
        for step in sorted(self.pending):
            if step < last or flush:
                self.report(self.pending.pop(step))


def run_trial(config: dict, worker: Callable[[dict], Any]) -> None:
    """The Tune function trainable: one trial's job, its rows reported as they come.

    A trial whose run already reached train.max_steps (finished before a killed sweep could
    record it) reports its rows and trains nothing."""
    from ray import tune

    from cluster.restarts import Restarts
    from cluster.worker_group import run_group
    from trainer.config import JobConfig
    from trainer.run_folder import RunFolder

    spec = config["trial"]  # Tune's config: the grid's one entry, a TrialSpec as a dict
    cfg = JobConfig.model_validate(spec["config"])
    run = RunFolder.of(cfg)  # the trial's run folder (spec["folder"]), made once and handed to its workers
    folder = run.path
    reporter = Reporter(folder / "metrics.jsonl", tune.report)
    latest = run.store.latest()
    if latest is not None and _step_of(latest) >= cfg.train.max_steps:
        reporter.poll(flush=True)
        return
    run.launched()
    run_group(
        functools.partial(worker, run=run),
        spec["config"],
        cfg.cluster,
        poll=reporter.poll,
        log_path=str(folder / "workers.log"),
        restarts=Restarts(cfg.cluster, folder),  # its failures in the trial's attempts.jsonl
    )
    reporter.poll(flush=True)


def _step_of(ckpt: Path) -> int:
    from trainer import checkpoint

    return int(checkpoint.meta(ckpt).get("step", 0))


def trial_resources(cluster: dict):
    """A trial's placement group: an empty bundle for the trial function itself, one bundle
    per worker, all on one machine."""
    from ray import tune

    from cluster.workers import worker_resources

    bundle = worker_resources(ClusterSection(**cluster))
    return tune.PlacementGroupFactory([{}] + [dict(bundle)] * cluster["num_workers"], strategy="STRICT_PACK")


def check_one_node(cluster: dict) -> None:
    """A trial's workers share a machine (STRICT_PACK): raise NotPlaceable, naming what is
    missing, when no alive node can hold all of them (Tune would wait for it forever)."""
    import ray

    from cluster.ray_job import NotPlaceable
    from cluster.workers import worker_resources

    need = worker_resources(ClusterSection(**cluster))
    n = cluster["num_workers"]
    most = 0
    for node in ray.nodes():
        if node.get("Alive"):
            res = node.get("Resources", {})
            most = max(most, min(round(res.get(k, 0.0) * 1e4) // round(v * 1e4) for k, v in need.items() if v > 0))
    if most < n:
        raise NotPlaceable(
            f"a trial's {n} workers share one machine (each needs "
            + ", ".join(f"{k} {v:g}" for k, v in need.items())
            + f") but the largest node holds {most}: lower cluster.num_workers or cluster.cpus_per_worker"
        )


STATE = {"PENDING": "pending", "RUNNING": "running", "TERMINATED": "done", "ERROR": "failed", "PAUSED": "paused"}


def live_table_callback(sweep_name: str, max_steps: dict[str, int], every_s: float = 10.0):
    """A Tune callback printing the trials' table (state, step, last loss, last val_loss) when a
    trial ends, and every `every_s` while any runs."""
    from ray import tune

    class LiveTable(tune.Callback):
        def __init__(self):
            self.last: dict[str, dict] = {}
            self.printed, self.changed = 0.0, False
            self.started, self.pid = time.monotonic(), os.getpid()

        def on_trial_result(self, iteration, trials, trial, result, **info):
            row = self.last.setdefault(str(trial), {})
            row.update({k: result[k] for k in ("step", "loss", "val_loss") if k in result})
            self.changed = True

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.show(trials, trial)

        def on_trial_error(self, iteration, trials, trial, **info):
            self.show(trials, trial)

        def on_step_end(self, iteration, trials, **info):
            if self.changed and time.monotonic() - self.printed >= every_s:
                self.show(trials)

        def show(self, trials, ended=None) -> None:
            if self.pid != os.getpid():  # a restored sweep: this callback was pickled with its state
                self.started, self.pid = time.monotonic(), os.getpid()
            table, counts = [], {}
            for t in sorted(trials, key=str):  # a restored experiment lists them in another order
                name = str(t)
                row = {k: v for k, v in (t.last_result or {}).items() if k in ("step", "loss", "val_loss")}
                row.update(self.last.get(name, {}))
                state = STATE.get(t.status, t.status.lower())
                if t is ended:  # Tune sets the status after the callback
                    state = "failed" if t.status == "ERROR" or t.error_file else "done"
                if state == "done" and row.get("step", 0) < max_steps.get(name, 0):
                    state = "stopped"  # early, by ASHA
                counts[state] = counts.get(state, 0) + 1
                step = f"{row['step']}/{max_steps.get(name, '?')}" if "step" in row else "-"
                loss = f"{row['loss']:.4f}" if "loss" in row else "-"
                val = f"{row['val_loss']:.4f}" if "val_loss" in row else "-"
                table.append(f"  {name:<34} {state:<8} {step:>11}  {loss:>8}  {val:>8}")
            head = f"trainctl: sweep '{sweep_name}' after {duration(time.monotonic() - self.started)}: " + ", ".join(
                f"{n} {s}" for s, n in sorted(counts.items())
            )
            columns = f"  {'TRIAL':<34} {'STATE':<8} {'STEP':>11}  {'LOSS':>8}  {'VAL_LOSS':>8}"
            print("\n".join([head, columns, *table]), flush=True)
            self.printed, self.changed = time.monotonic(), False

    return LiveTable()


def tune_trials(
    specs: list[TrialSpec],
    worker: Callable[[dict], Any],
    name: str,
    storage: Path,
    parallel: int,
    early_stop: dict | None,
    verbose: bool = False,
) -> list[Outcome]:
    """Run every trial on Tune inside the Ray this process is connected to (or restore the
    experiment in `storage/name` and finish it); returns each trial's outcome in `specs` order.

    `early_stop`: ASHA's settings ({max_t, grace_period, reduction_factor}) on val_loss by step."""
    import logging

    from ray import tune

    if not verbose:
        for logger in ("ray.tune", "ray.train", "ray.air"):
            logging.getLogger(logger).setLevel(logging.CRITICAL)  # a trial's error is in our table
    # Rows without val_loss (every logged step) are reported too; ASHA passes over them.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # Tune's own tables off (verbose=0): ours instead
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, worker=worker),
        lambda config: trial_resources(config["trial"]["config"]["cluster"]),
    )
    largest = max(specs, key=lambda s: s.config["cluster"]["num_workers"] * s.config["cluster"]["cpus_per_worker"])
    check_one_node(largest.config["cluster"])
    max_steps = {s.name: s.config["train"]["max_steps"] for s in specs}
    path = storage / name
    if tune.Tuner.can_restore(str(path)):
        # A failed trial runs again too (a lost machine, or the cause fixed meanwhile), from its own
        # newest checkpoint like an unfinished one: trainctl resumes it, Tune holds no state of it.
        tuner = tune.Tuner.restore(str(path), trainable, resume_unfinished=True, restart_errored=True)
        print(
            f"trainctl: sweep '{name}': continuing the sweep in {path} (finished trials are kept; unfinished and "
            "failed ones go on from their newest checkpoints)",
            flush=True,
        )
    else:
        scheduler = None
        if early_stop is not None:
            from ray.tune.schedulers import ASHAScheduler

            scheduler = ASHAScheduler(time_attr="step", metric="val_loss", mode="min", **early_stop)
        tuner = tune.Tuner(
            trainable,
            param_space={"trial": tune.grid_search([s.to_dict() for s in specs])},
            tune_config=tune.TuneConfig(
                max_concurrent_trials=parallel,
                scheduler=scheduler,
                trial_name_creator=lambda trial: trial.config["trial"]["name"],
                trial_dirname_creator=lambda trial: trial.config["trial"]["name"],
            ),
            run_config=tune.RunConfig(
                name=name,
                storage_path=str(storage),
                verbose=0,
                callbacks=[live_table_callback(name, max_steps)],
                failure_config=tune.FailureConfig(max_failures=0),
            ),
        )
    grid = tuner.fit()
    # each trial's status as Tune saved it (the results alone do not tell a trial ASHA stopped
    # from one a Ctrl-C left unfinished)
    status = {t.config["trial"]["name"]: t.status for t in tune.ExperimentAnalysis(grid.experiment_path).trials}
    by_name: dict[str, Outcome] = {}
    for result in grid:
        spec = (result.config or {}).get("trial", {})
        rows: dict[int, dict] = {}
        frame = result.metrics_dataframe
        if frame is not None:
            for rec in frame.to_dict("records"):
                if isinstance(rec.get("step"), (int, float)) and rec["step"] == rec["step"]:
                    row = {k: rec[k] for k in Reporter.KEYS if k in rec and rec[k] == rec[k]}
                    rows.setdefault(int(rec["step"]), {}).update(row)
        error = None if result.error is None else _error_line(result.error)
        state = "ERROR" if result.error is not None else status.get(spec.get("name"), "PENDING")
        by_name[spec.get("name")] = Outcome(spec.get("name"), state, error, [rows[s] for s in sorted(rows)])
    return [by_name.get(s.name, Outcome(s.name, "PENDING", None)) for s in specs]


def _error_line(error: BaseException) -> str:
    """A trial's error in one line: the worker's own exception line when there is one."""
    from cluster.workers import worker_error

    text = str(error)
    line = worker_error(text)
    return line if line else f"{type(error).__name__}"
