"""`trainctl sweep CONFIG --grid KEY=V1,V2,... [--grid ...]`: a grid of jobs on Ray Tune.

Here, before Ray starts: the grid is read (values as `key=value` overrides take them: YAML,
commas at the top level separate values), every combination becomes a trial's job through
the same `load_config` as `trainctl run` (so an unknown key, a bad value or a job the value
makes invalid is one line, exit 2, before any trial), each trial's data is prepared and
checked (`prepare_job`), and the cores are counted. The trials run on Tune (cluster/sweep.py),
each in its own run folder `SWEEP/trials/NAME/` as `trainctl run` leaves one. At the end:
a table of each trial's final validation loss with the best of each group, results.csv,
results.json and val_loss.png in the sweep folder. The x axis is the first --grid key; a
group is one combination of the other keys' values.

The same command run again continues a killed sweep (sweep.json records what it was; a
different grid or config is refused).
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from data_pipeline.sources import is_url
from launcher.job import UsageError

# Keys a trial cannot take from the grid: the sweep decides them.
NOT_SWEPT = ("name", "checkpoint.storage_path", "checkpoint.local_path", "checkpoint.resume_from", "cluster.address")


def split_values(text: str) -> list[str]:
    """'1e-3,2e-3' -> ['1e-3', '2e-3']; commas inside brackets or quotes do not split.

    >>> split_values("[q_proj,k_proj],all-linear")
    ['[q_proj,k_proj]', 'all-linear']
    """
    out, depth, quote, cur = [], 0, None, ""
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
            continue
        cur += ch
    out.append(cur.strip())
    return out


def parse_grid(items: list[str], overrides: list[str]) -> list[tuple[str, list[str]]]:
    """[(key, [value, ...]), ...] from the --grid arguments, each problem one line."""
    grid: list[tuple[str, list[str]]] = []
    fixed = {o.partition("=")[0] for o in overrides}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise UsageError(f"--grid {item}: give KEY=V1,V2,... (e.g. --grid train.lr=1e-3,2e-3,4e-3)")
        values = split_values(text)
        if not text.strip() or any(v == "" for v in values):
            raise UsageError(f"--grid {item}: a value is empty: give KEY=V1,V2,... with no empty value")
        if key in NOT_SWEPT:
            raise UsageError(f"--grid {key}: the sweep sets {key} for its trials: sweep another key")
        if any(k == key for k, _ in grid):
            raise UsageError(f"--grid {key} is given twice: give all its values in one --grid {key}=V1,V2,...")
        if key in fixed:
            raise UsageError(f"{key} is given both as an override and as --grid {key}: give one")
        if len(set(values)) != len(values):
            raise UsageError(f"--grid {item}: a value is given twice")
        grid.append((key, values))
    if not grid:
        raise UsageError("no --grid given: sweep at least one key, e.g. --grid train.lr=1e-3,2e-3,4e-3")
    return grid


def trial_name(index: int, values: dict[str, str]) -> str:
    """'003_lr2e-3_n_layer16': a folder name (NAME_RE) that says what the trial is."""
    parts = [f"{key.rsplit('.', 1)[-1]}{re.sub(r'[^A-Za-z0-9._-]+', '-', raw)}" for key, raw in values.items()]
    return f"{index:03d}_" + "_".join(parts)


@dataclass
class Sweep:
    name: str
    folder: Path  # local: results, sweep.json, tune/, trials/
    grid: list[tuple[str, list[str]]]
    trials: list  # cluster.sweep.TrialSpec
    address: str
    identity: dict


def plan_sweep(
    config: str,
    overrides: list[str],
    grid_items: list[str],
    steps: int | None,
    name: str | None,
    address: str | None,
) -> Sweep:
    """Every trial's job built and validated (load_config, as `trainctl run`), before anything is written."""
    from cluster.sweep import TrialSpec
    from launcher.config import ConfigError, load_config

    if steps is not None and steps < 1:
        raise UsageError(f"--steps {steps}: give at least 1")
    grid = parse_grid(grid_items, overrides)
    common = list(overrides) + ([f"train.max_steps={steps}"] if steps is not None else [])
    if address:
        common.append(f"cluster.address={address}")
    base = load_config(config, common)
    sweep_name = name or f"{base.name}-sweep"
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", sweep_name):
        raise UsageError(f"--name {sweep_name}: letters, digits, '_', '.' or '-' (it names a folder)")
    c = base.checkpoint
    url = is_url(c.storage_path)
    folder = Path(c.local_path if url else c.storage_path) / sweep_name
    place = [
        f"checkpoint.storage_path={c.storage_path.rstrip('/')}/{sweep_name}/trials"
        if url
        else f"checkpoint.storage_path={folder / 'trials'}",
        f"checkpoint.local_path={Path(c.local_path) / sweep_name / 'trials'}",
        *([f"tracking.group={sweep_name}"] if base.tracking.group is None else []),  # W&B shows the trials together
    ]
    for key, values in grid:  # each value alone first, so a bad one is named alone
        for raw in values:
            try:
                load_config(config, [*common, f"{key}={raw}"])
            except ConfigError as e:
                raise UsageError(f"--grid {key}={raw}: {e}") from None
    specs = []
    for index, combo in enumerate(itertools.product(*(values for _, values in grid))):
        values = dict(zip((k for k, _ in grid), combo))
        trial = trial_name(index, values)
        try:
            cfg = load_config(config, [*common, *(f"{k}={v}" for k, v in values.items()), f"name={trial}", *place])
        except ConfigError as e:
            raise UsageError(f"trial {' '.join(f'{k}={v}' for k, v in values.items())}: {e}") from None
        specs.append(TrialSpec(trial, str(folder / "trials" / trial), cfg.model_dump(mode="json"), values))
    digest = hashlib.sha256(json.dumps([s.to_dict() for s in specs], sort_keys=True).encode()).hexdigest()
    identity = {"config": str(Path(config).resolve()), "overrides": common, "grid": grid, "trials": digest}
    return Sweep(sweep_name, folder, grid, specs, base.cluster.address, identity)


def prepare_trials(sweep: Sweep) -> None:
    """Each trial's data prepared and checked, and its own checkpoint (a re-run's) agreeing
    with it, as `trainctl run` checks a job before launch."""
    from launcher.job import prepare_job
    from trainer.config import JobConfig
    from trainer.run_folder import RunFolder

    for spec in sweep.trials:
        cfg = JobConfig.model_validate(spec.config)
        try:
            prepare_job(cfg, RunFolder.of(cfg), ray=False)
        except UsageError as e:
            raise UsageError(f"trial {' '.join(f'{k}={v}' for k, v in spec.values.items())}: {e}") from None
        spec.config = cfg.model_dump(mode="json")  # data.path: the prepared dataset


def check_identity(sweep: Sweep) -> None:
    """A sweep folder holds one sweep: a re-run with other arguments is refused."""
    path = sweep.folder / "sweep.json"
    if not path.is_file():
        return
    was = json.loads(path.read_text())
    if was != json.loads(json.dumps(sweep.identity)):
        raise UsageError(
            f"{sweep.folder} holds sweep '{sweep.name}' with another grid, config or overrides (its sweep.json): run "
            "the same command to finish it, or give --name for a new sweep"
        )


def cores_and_parallel(sweep: Sweep, parallel: int | None) -> tuple[int | None, int]:
    """(trials at once, CPUs one trial needs). On a private local Ray: one trial must fit this
    machine's cores, and --parallel K trials together too; by default as many as fit."""
    from launcher.job import available_cores
    from trainer.config import CPU_UNITS

    units = max(
        round(s.config["cluster"]["cpus_per_worker"] * CPU_UNITS) * s.config["cluster"]["num_workers"]
        for s in sweep.trials
    )
    if parallel is not None and parallel < 1:
        raise UsageError(f"--parallel {parallel}: give at least 1")
    if sweep.address != "local":
        return parallel, units
    cores = available_cores()
    if units > cores * CPU_UNITS:
        raise UsageError(
            f"one trial needs {units / CPU_UNITS:g} CPUs (cluster.num_workers x cluster.cpus_per_worker) but this "
            f"machine has {cores} cores: lower them"
        )
    fit = cores * CPU_UNITS // units
    if parallel is None:
        return min(fit, len(sweep.trials)), units
    if parallel > fit:
        raise UsageError(
            f"--parallel {parallel} runs {parallel} trials of {units / CPU_UNITS:g} CPUs at once but this machine has "
            f"{cores} cores: give --parallel {fit} or less"
        )
    return parallel, units


def outcome_rows(sweep: Sweep, outcomes: list) -> list[dict]:
    """One row per trial: its values, how it ended, its steps and losses."""
    rows = []
    for spec, out in zip(sweep.trials, outcomes):
        max_steps = spec.config["train"]["max_steps"]
        vals = [(r["step"], r["val_loss"]) for r in out.rows if "val_loss" in r]
        losses = [r["loss"] for r in out.rows if "loss" in r]
        steps = max((r["step"] for r in out.rows), default=0)
        if out.status == "ERROR":
            state = "diverged" if out.error and "Diverged" in out.error else "failed"
        elif out.status != "TERMINATED":
            state = "not run"
        else:
            state = "done" if steps >= max_steps else "stopped early"
        final = vals[-1][1] if vals and state == "done" and vals[-1][0] == steps else None
        rows.append(
            {
                "trial": spec.name,
                **spec.values,
                "state": state,
                "steps": steps,
                "max_steps": max_steps,
                "final_val_loss": final,
                "last_val_loss": vals[-1][1] if vals else None,
                "best_val_loss": min(v for _, v in vals) if vals else None,
                "final_loss": losses[-1] if losses else None,
                "run_folder": spec.folder,
                "error": out.error,
            }
        )
    return rows


def groups(sweep: Sweep, rows: list[dict]) -> dict[str, list[dict]]:
    """Rows by group: each combination of the values of every --grid key but the first."""
    others = [k for k, _ in sweep.grid[1:]]
    out: dict[str, list[dict]] = {}
    for row in rows:
        label = " ".join(f"{k}={row[k]}" for k in others) or "all trials"
        out.setdefault(label, []).append(row)
    return out


def best_of(rows: list[dict]) -> dict | None:
    done = [r for r in rows if r["final_val_loss"] is not None and math.isfinite(r["final_val_loss"])]
    return min(done, key=lambda r: r["final_val_loss"]) if done else None


def render(sweep: Sweep, rows: list[dict]) -> str:
    keys = [k for k, _ in sweep.grid]
    best = {id(b) for g in groups(sweep, rows).values() if (b := best_of(g))}
    widths = [max(len(k), *(len(str(r[k])) for r in rows)) for k in keys]
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    lines = [
        f"trainctl: sweep '{sweep.name}': {len(rows)} trials ("
        + ", ".join(f"{n} {s}" for s, n in counts.items())
        + f"); results in {sweep.folder}/ (results.csv, results.json, val_loss.png)",
        f"  {'TRIAL':<34} "
        + " ".join(f"{k:<{w}}" for k, w in zip(keys, widths))
        + f"  {'STATE':<13} {'STEPS':>6}  {'VAL_LOSS':>8}",
    ]
    for r in rows:
        val = f"{r['final_val_loss']:.4f}" if r["final_val_loss"] is not None else "-"
        if r["final_val_loss"] is None and r["last_val_loss"] is not None:
            val = f"({r['last_val_loss']:.4f})"  # the last one an early-stopped trial reached
        lines.append(
            f"  {r['trial']:<34} "
            + " ".join(f"{str(r[k]):<{w}}" for k, w in zip(keys, widths))
            + f"  {r['state']:<13} {r['steps']:>6}  {val:>8}"
            + ("  <- best" if id(r) in best else "")
        )
    for label, members in groups(sweep, rows).items():
        b = best_of(members)
        if b is not None:
            lines.append(f"  best for {label}: {keys[0]}={b[keys[0]]} (val_loss {b['final_val_loss']:.4f})")
    for r in rows:
        if r["error"]:
            lines.append(f"  {r['trial']}: {r['state']}: {r['error']}")
    if any(r["state"] == "not run" for r in rows):
        lines.append("trainctl: the sweep stopped before every trial ended: run the same command to continue it")
    return "\n".join(lines)


def write_results(sweep: Sweep, rows: list[dict]) -> None:
    """results.csv, results.json and val_loss.png in the sweep folder."""
    keys = [k for k, _ in sweep.grid]
    cols = [
        "trial",
        *keys,
        "state",
        "steps",
        "max_steps",
        "final_val_loss",
        "best_val_loss",
        "final_loss",
        "run_folder",
        "error",
    ]
    with open(sweep.folder / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    best = {label: (b["trial"] if (b := best_of(members)) else None) for label, members in groups(sweep, rows).items()}
    (sweep.folder / "results.json").write_text(
        json.dumps({"sweep": sweep.name, "x": keys[0], "grid": sweep.grid, "best": best, "trials": rows}, indent=1)
        + "\n"
    )
    plot(sweep, rows, sweep.folder / "val_loss.png")


def plot(sweep: Sweep, rows: list[dict], path: Path) -> None:
    """Final validation loss against the first --grid key, one line per group, the best marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x_key = sweep.grid[0][0]
    order = sweep.grid[0][1]
    try:
        numeric = {v: float(v) for v in order}
    except ValueError:
        numeric = None
    fig, ax = plt.subplots(figsize=(8, 5))
    for label, members in groups(sweep, rows).items():
        pts = [(r[x_key], r["final_val_loss"]) for r in members if r["final_val_loss"] is not None]
        if not pts:
            continue
        pts.sort(key=lambda p: order.index(p[0]))
        xs = [numeric[x] if numeric else order.index(x) for x, _ in pts]
        (line,) = ax.plot(xs, [y for _, y in pts], marker="o", label=label)
        b = best_of(members)
        bx = numeric[b[x_key]] if numeric else order.index(b[x_key])
        ax.plot([bx], [b["final_val_loss"]], marker="*", markersize=16, color=line.get_color())
    if numeric and min(numeric.values()) > 0 and max(numeric.values()) / min(numeric.values()) >= 8:
        ax.set_xscale("log", base=2)
    if not numeric:
        ax.set_xticks(range(len(order)), order)
    ax.set_xlabel(x_key)
    ax.set_ylabel("final validation loss")
    ax.set_title(f"sweep {sweep.name} (* best of each group)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def run_sweep(args) -> int:
    """The `trainctl sweep` command: plan, check, run on Tune, report. Returns the exit status."""
    from cluster.ray_job import NotPlaceable, connect, shutdown
    from cluster.sweep import tune_trials
    from trainer.loop import train_worker

    sweep = plan_sweep(args.config, args.overrides, args.grid, args.steps, args.name, args.address)
    parallel, units = cores_and_parallel(sweep, args.parallel)
    prepare_trials(sweep)
    check_identity(sweep)
    first = sweep.trials[0].config
    early = None
    if args.early_stop:
        t = first["train"]
        early = {"max_t": t["max_steps"], "grace_period": min(t["eval_every"], t["max_steps"]), "reduction_factor": 3}
    sweep.folder.mkdir(parents=True, exist_ok=True)
    (sweep.folder / "sweep.json").write_text(json.dumps(sweep.identity, indent=1) + "\n")
    from trainer.config import CPU_UNITS, ClusterSection

    cluster = ClusterSection(**first["cluster"])
    if sweep.address == "local":  # the private Ray holds `parallel` trials' workers at once
        cluster = cluster.model_copy(
            update={
                "num_workers": parallel * cluster.num_workers,
                "cpus_per_worker": units / CPU_UNITS / cluster.num_workers,
            }
        )
    print(
        f"trainctl: sweep '{sweep.name}' in {sweep.folder}: {len(sweep.trials)} trials of "
        + " x ".join(f"{k} ({len(v)})" for k, v in sweep.grid)
        + (f", {parallel} at a time" if parallel else "")
        + (", ASHA early stopping on val_loss" if early else ""),
        flush=True,
    )
    connect(cluster, worker_logs=False, verbose=args.verbose)
    try:
        outcomes = tune_trials(
            sweep.trials, train_worker, sweep.name, sweep.folder.resolve() / "tune", parallel or 0, early, args.verbose
        )
    except NotPlaceable as e:
        raise UsageError(str(e)) from None
    finally:
        shutdown()
    rows = outcome_rows(sweep, outcomes)
    write_results(sweep, rows)
    print(render(sweep, rows), flush=True)
    return 1 if any(r["state"] in ("failed", "not run") for r in rows) else 0
