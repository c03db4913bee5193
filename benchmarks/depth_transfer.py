"""Does the best learning rate of a 4-layer proxy transfer to 16 and 64 layers? Under
`standard` and `completep`, through `trainctl sweep`, on this machine's CPU.

    python benchmarks/depth_transfer.py [--work DIR] [--lrs 1e-3,2e-3,...] [--depths 4,16,64]
                                        [--steps 300] [--parametrizations standard,completep]
                                        [--seeds 1337,1]

Each parametrization is one `trainctl sweep` of configs/deep-cpu.yaml (byte-level stdlib
text, width 64, its global batch of 8 x 64 tokens and schedule) over a learning-rate grid
with factor-2 spacing x the depths, every trial the same number of steps (so the same
tokens), on one worker with both cores (`cluster.num_workers=1 cluster.cpus_per_worker=2
train.micro_batch_size=8`: the same global batch, the same data order), without activation
checkpointing (speed; it changes no number), a divergence ending its trial
(`train.max_rollbacks=0`). completep's base is the 4-layer proxy (`model.base_depth=4`).

Each seed (`train.seed`: the initial weights, and the data order through it) is a sweep of
its own (`depth-P` for the config's 1337, `depth-P-seedS` for the others); a grid point's
validation loss is the mean over the seeds (one seed's 300 steps at depth 64 can take a
gradient spike that moves it by 5%), and each seed's value is printed beside it.

Prints, per parametrization and depth, the best learning rate and its final validation
loss, and what transfer costs a user: the validation loss of each deeper model trained at
the learning rate that was best at depth 4, against that depth's own best grid point.
Targets (issue 25): under completep <= 1% at depths 16 and 64, and the best loss falling
with depth (64 < 16 < 4). A sweep run again continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "deep-cpu.yaml"
LRS = "1e-3,2e-3,4e-3,8e-3,1.6e-2,3.2e-2,6.4e-2"


CONFIG_SEED = 1337  # configs/deep-cpu.yaml's train.seed


def sweep(work: Path, parametrization: str, lrs: str, depths: str, steps: int, seed: int, report_only: bool) -> dict:
    """One `trainctl sweep` (continued if it was started before); its results.json. With
    `report_only`, nothing is trained: the results of a sweep that finished, else none."""
    name = f"depth-{parametrization}" + ("" if seed == CONFIG_SEED else f"-seed{seed}")
    if report_only:
        results = work / "runs" / name / "results.json"
        return json.loads(results.read_text()) if results.exists() else {"trials": []}
    overrides = [] if seed == CONFIG_SEED else [f"train.seed={seed}"]
    overrides += [
        f"model.parametrization={parametrization}",
        f"model.base_depth={4 if parametrization == 'completep' else 'null'}",  # the config's base: completep's
        "model.activation_checkpointing=false",
        "cluster.num_workers=1",
        "cluster.cpus_per_worker=2",
        "train.micro_batch_size=8",
        "train.max_rollbacks=0",
        "train.sample_tokens=0",
        f"train.eval_every={steps}",
        f"checkpoint.every={max(steps // 3, 1)}",
        "tracking.mode=disabled",
        f"data.cache_dir={REPO / '.cache' / 'trainctl'}",
    ]
    cmd = [sys.executable, "-m", "launcher.cli", "sweep", str(CONFIG), *overrides, "--grid", f"train.lr={lrs}",
           "--grid", f"model.n_layer={depths}", "--steps", str(steps), "--name", name]  # fmt: skip
    t0 = time.monotonic()
    r = subprocess.run(cmd, cwd=work, env={**os.environ, "PYTHONPATH": str(REPO)}, text=True)
    print(f"depth_transfer: sweep {name}: exit {r.returncode} after {time.monotonic() - t0:.0f} s", flush=True)
    if r.returncode == 2:
        sys.exit(f"depth_transfer: the sweep refused its arguments (above): {' '.join(cmd)}")
    return json.loads((work / "runs" / name / "results.json").read_text())


def merge(runs: list[dict]) -> list[dict]:
    """The seeds' sweeps as one list of grid points: final_val_loss the mean over the seeds
    that ran it (None when one diverged), `seeds` each such seed's value."""
    points: dict[tuple, dict] = {}
    for res in runs:
        for t in res["trials"]:
            point = points.setdefault((t["train.lr"], t["model.n_layer"]), {**t, "seeds": []})
            if t["state"] in ("done", "diverged"):  # a seed's sweep stopped before this trial: left out
                point["seeds"].append(t["final_val_loss"])
    for point in points.values():
        vals = point["seeds"]
        point["final_val_loss"] = None if None in vals or not vals else sum(vals) / len(vals)
    return list(points.values())


def best(trials: list[dict]) -> dict | None:
    done = [t for t in trials if t["final_val_loss"] is not None]
    return min(done, key=lambda t: t["final_val_loss"]) if done else None


def seeds_text(t: dict) -> str:
    return "" if len(t["seeds"]) == 1 else "[" + ",".join(f"{v:.4f}" for v in t["seeds"]) + "]"


def report(results: dict[str, list[dict]], depths: list[str]) -> bool:
    """The table; True when completep meets the issue's targets."""
    print(
        "\nparametrization  depth  best lr   val_loss   at depth 4's best lr   cost    "
        "(every lr: val_loss mean over the seeds [each seed], '-' diverged)"
    )
    ok = True
    for p, trials_of_p in results.items():
        by_depth = {d: [t for t in trials_of_p if t["model.n_layer"] == d] for d in depths}
        proxy = best(by_depth[depths[0]])
        bests = {}
        for d in depths:
            trials = by_depth[d]
            b = best(trials)
            bests[d] = b
            curve = "  ".join(
                f"{t['train.lr']}:{t['final_val_loss']:.4f}" + seeds_text(t)
                if t["final_val_loss"] is not None
                else f"{t['train.lr']}:-"
                for t in trials
            )
            if b is None:
                print(f"{p:<16} {d:>5}  (no trial finished)   {curve}")
                ok &= p != "completep"
                continue
            at = next((t for t in trials if proxy and t["train.lr"] == proxy["train.lr"]), None)
            cost = None
            if at is not None and at["final_val_loss"] is not None:
                cost = at["final_val_loss"] / b["final_val_loss"] - 1
            at_text = f"{at['final_val_loss']:.4f}" if at and at["final_val_loss"] is not None else "diverged"
            cost_text = f"{cost:+.2%}" if cost is not None else "-"
            print(
                f"{p:<16} {d:>5}  {b['train.lr']:<8}  {b['final_val_loss']:.4f}     {at_text:<22} {cost_text:<7} {curve}"
            )
            if p == "completep" and d != depths[0]:
                ok &= cost is not None and cost <= 0.01
        if p == "completep":
            losses = [bests[d]["final_val_loss"] for d in depths if bests[d]]
            falls = len(losses) == len(depths) and all(a > b for a, b in zip(losses, losses[1:]))
            print(f"{p:<16} best val_loss falls with depth ({' > '.join(f'{x:.4f}' for x in losses)}): {falls}")
            ok &= falls
    return ok


def plot(results: dict[str, list[dict]], depths: list[str], path: Path) -> None:
    """One panel per parametrization: final validation loss (mean over the seeds, each seed a
    small dot) against the learning rate, one line per depth, each depth's best starred."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.5), sharey=True, squeeze=False)
    for ax, (p, trials) in zip(axes[0], results.items()):
        for d in depths:
            pts = sorted(
                (float(t["train.lr"]), t) for t in trials if t["model.n_layer"] == d and t["final_val_loss"] is not None
            )
            if not pts:
                continue
            (line,) = ax.plot(
                [x for x, _ in pts], [t["final_val_loss"] for _, t in pts], marker="o", label=f"{d} layers"
            )
            for x, t in pts:
                ax.plot([x] * len(t["seeds"]), t["seeds"], ".", color=line.get_color(), alpha=0.4)
            bx, bt = min(pts, key=lambda xt: xt[1]["final_val_loss"])
            ax.plot([bx], [bt["final_val_loss"]], marker="*", markersize=16, color=line.get_color())
        ax.set_xscale("log", base=2)
        lrs = sorted({t["train.lr"] for t in trials}, key=float)
        ax.set_xticks([float(lr) for lr in lrs], lrs)
        ax.minorticks_off()
        ax.set_xlabel("train.lr")
        ax.set_title(p)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("final validation loss")
    fig.suptitle("depth_transfer: learning rate against depth (line: mean over seeds, dots: each seed, * best)")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=str(REPO), help="where the sweeps' runs/ folder goes (default: the repo)")
    ap.add_argument("--lrs", default=LRS)
    ap.add_argument("--depths", default="4,16,64")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--parametrizations", default="standard,completep")
    ap.add_argument("--seeds", default=str(CONFIG_SEED), help="train.seed values, one sweep each (default: 1337)")
    ap.add_argument(
        "--report-only", action="store_true", help="train nothing: the table and picture of the sweeps that finished"
    )
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    seeds = [int(s) for s in args.seeds.split(",")]
    results = {
        p: merge([sweep(work, p, args.lrs, args.depths, args.steps, seed, args.report_only) for seed in seeds])
        for p in args.parametrizations.split(",")
    }
    ok = report(results, args.depths.split(","))
    plot(results, args.depths.split(","), work / "depth_transfer.png")
    print(f"depth_transfer: the picture: {work / 'depth_transfer.png'}")
    print(f"\ndepth_transfer: {time.monotonic() - t0:.0f} s in all; completep meets the targets: {ok}")


if __name__ == "__main__":
    main()
