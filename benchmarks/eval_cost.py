"""What `train.evals` costs a run: the README's tiny-cpu job (2 Ray workers, ZeRO-2) with and
without a multiple-choice task scored every N steps, interleaved in one run.

    python benchmarks/eval_cost.py [--rounds 2] [--steps 300] [--every 100] [--items 400]

The task is made here from the corpus the model trains on (the Python standard library's
source): a query of up to three lines of a file, the gold choice the line that follows, three
other lines of the library as the wrong ones (`{query, choices, gold}` a line; fixed seed).

Each run's figures come from its metrics.jsonl:
- step time: the mean `step_time_s` of the log intervals after the first (evaluation is left
  out of it, as validation is); with evals / without = whether scoring slows the steps
  around it (target: 1.0 within noise);
- eval seconds: `eval/seconds` of each evaluation (rank 0's wall time, the all-reduce in);
- its share: eval seconds / (N x step time), the part of a step's time the task adds, against
  what its forward passes predict: each rank's padded tokens of its items (every choice a row
  of its item's longest) x 2 FLOPs a parameter, over the step's 6 FLOPs a parameter of
  micro_batch x seq_len tokens (target: measured <= predicted x 1.5; small forwards of a
  few rows run below the training step's matmul efficiency).
Also: the wall time of the whole command, and the task's accuracy at each evaluation.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MICRO, SEQ, WORLD = 8, 128, 2  # configs/tiny-cpu.yaml


def make_task(path: Path, items: int, seed: int = 0) -> None:
    """Next-line prediction on the standard library's source, `items` of them."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    lines = [
        line.rstrip()
        for f in files
        for line in f.read_text(encoding="utf-8", errors="replace").splitlines()
        if line.strip()  # blank lines are no answer
    ]
    good = [i for i in range(3, len(lines)) if 12 <= len(lines[i].strip()) <= 60]
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in rng.sample(good, items):
            wrong = rng.sample([j for j in rng.sample(good, 12) if lines[j].strip() != lines[i].strip()], 3)
            choices = [lines[j].strip() for j in wrong]
            gold = rng.randrange(4)
            choices.insert(gold, lines[i].strip())
            query = "\n".join(lines[i - 3 : i])[-120:] + "\n" + " " * (len(lines[i]) - len(lines[i].lstrip()))
            f.write(json.dumps({"query": query, "choices": choices, "gold": gold}) + "\n")


def padded_tokens_per_rank(path: Path) -> float:
    """The tokens each rank's forwards hold: an item's choices each a row of its longest."""
    from data_pipeline.tokenizer import build_tokenizer
    from trainer.evals import encode_pair, load_task

    tok = build_tokenizer("byte")
    total = 0
    for item in load_task(path).items:
        rows = [
            len((h + c)[-(SEQ + 1) :]) - 1 for h, c in (encode_pair(tok, item.query, " " + x) for x in item.choices)
        ]
        total += len(rows) * max(rows)
    return total / WORLD


def run(folder: str, name: str, steps: int, extra: list[str]) -> tuple[float, list[dict]]:
    cmd = [
        sys.executable, "-m", "launcher.cli", "run", str(REPO / "configs" / "tiny-cpu.yaml"), f"name={name}",
        f"checkpoint.storage_path={folder}", f"train.max_steps={steps}", f"train.log_every={steps // 10}",
        "train.sample_tokens=0", f"train.eval_every={steps}", "train.eval_sequences=32", "tracking.mode=disabled",
        f"checkpoint.every={steps}", "--fresh", "--force", *extra,
    ]  # fmt: skip
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True)
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in (Path(folder) / name / "metrics.jsonl").read_text().splitlines()]
    return wall, rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--every", type=int, default=100)
    ap.add_argument("--items", type=int, default=400)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        task = Path(folder) / "nextline.jsonl"
        make_task(task, args.items)
        evals = f"train.evals=[{{path: {task}, every: {args.every}}}]"
        tokens = padded_tokens_per_rank(task)
        predicted = (2 * tokens) / (6 * MICRO * SEQ) / args.every  # the task's FLOPs over N steps' FLOPs
        step_s: dict[str, list[float]] = {"without": [], "with": []}
        shares, walls = [], {"without": [], "with": []}
        for r in range(args.rounds):
            for kind, extra in (("without", []), ("with", [evals])):
                wall, rows = run(folder, kind, args.steps, extra)
                walls[kind].append(wall)
                step = statistics.mean([m["step_time_s"] for m in rows if "step_time_s" in m][1:])
                step_s[kind].append(step)
                line = f"round {r + 1}: {kind:<7} evals | step {step * 1000:6.1f} ms | wall {wall:5.1f} s"
                if kind == "with":
                    ev = [m for m in rows if "eval/seconds" in m]
                    seconds = statistics.mean(m["eval/seconds"] for m in ev)
                    shares.append(seconds / (args.every * step))
                    acc = ", ".join(f"{m['step']}: {m['eval/nextline/acc']:.3f}" for m in ev)
                    line += f" | {len(ev)} evals of {seconds:.2f} s each (acc at step {acc}) | share {shares[-1]:.3f}"
                print(line, flush=True)
    ratio = min(step_s["with"]) / min(step_s["without"])
    share = min(shares)
    print(
        f"{args.items} items, {tokens:,.0f} padded tokens a rank an evaluation, every {args.every} steps\n"
        f"step time with evals / without = {ratio:.3f} (target 1.0 within noise)\n"
        f"measured share of the step time {share:.3f}, its forwards' FLOPs predict {predicted:.3f}: "
        f"measured / predicted = {share / predicted:.2f} (target <= 1.5)\n"
        f"wall with - without: {min(walls['with']) - min(walls['without']):.1f} s"
    )


if __name__ == "__main__":
    main()
