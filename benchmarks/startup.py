"""Seconds from `trainctl run` to the first finished step, and to exit, for the README's
tiny config (configs/tiny-cpu.yaml: a private local Ray, 2 gloo workers, DeepSpeed ZeRO-2).

    python benchmarks/startup.py [--runs 3]

Each run is a fresh `trainctl run configs/tiny-cpu.yaml` of 20 steps logged every step
(no sample, one evaluation at the end, W&B offline as the config has it) into a temporary run folder; the corpus is prepared
once beforehand (into data.cache_dir, as the README's first run does), so the figures are
the start-up of a run, not of a dataset. The first finished step is the moment its
progress line reaches this process's stdout. Prints each run, then the best against the
15 s target.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGET_S = 15.0


def one_run(folder: str, steps: int) -> tuple[float, float]:
    cmd = [
        sys.executable,
        "-m",
        "launcher.cli",
        "run",
        str(REPO / "configs" / "tiny-cpu.yaml"),
        "name=startup",
        f"checkpoint.storage_path={folder}",
        f"train.max_steps={steps}",
        "train.log_every=1",
        "train.sample_tokens=0",
        f"train.eval_every={steps}",
        "train.eval_sequences=32",
        "--fresh",
        "--force",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first = None
    for line in proc.stdout:
        if first is None and re.search(rf"\bstep +1/{steps}\b", line):
            first = time.perf_counter() - t0
    rc = proc.wait()
    total = time.perf_counter() - t0
    if rc != 0 or first is None:
        raise SystemExit(f"trainctl run failed (exit {rc}) or printed no step line")
    return first, total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "launcher.cli",
                "run",
                str(REPO / "configs" / "tiny-cpu.yaml"),
                "name=warm",
                f"checkpoint.storage_path={folder}",
                "train.max_steps=1",
                "train.sample_tokens=0",
                "tracking.mode=disabled",
            ],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            check=True,
            capture_output=True,
        )  # prepares the corpus once, untimed
        results = []
        for i in range(args.runs):
            first, total = one_run(folder, args.steps)
            results.append((first, total))
            print(
                f"run {i + 1}: first step after {first:.1f} s, exit after {total:.1f} s ({args.steps} steps)",
                flush=True,
            )
    best_first, best_total = min(r[0] for r in results), min(r[1] for r in results)
    print(
        f"best: first step {best_first:.1f} s, exit {best_total:.1f} s; first step / {TARGET_S:.0f} s target = "
        f"{best_first / TARGET_S:.2f}"
    )


if __name__ == "__main__":
    main()
