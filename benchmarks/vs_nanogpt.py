"""trainctl against the real nanoGPT on nanoGPT's Shakespeare CPU recipe: the wall time from
each command's start to a validation loss of 1.89, and tokens/s while training, in one run.

    git clone https://github.com/karpathy/nanoGPT /path/to/nanoGPT   # once, anywhere
    python benchmarks/vs_nanogpt.py --nanogpt /path/to/nanoGPT [--rounds 2] [--target 1.89]

- nanoGPT: its own `train.py`, with its README's CPU command (config/train_shakespeare_char.py
  and `--device=cpu --compile=False --eval_iters=20 --log_interval=1 --block_size=64
  --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128 --max_iters=2000 --lr_decay_iters=2000
  --dropout=0.0`), its checkpoints written to a temporary folder. Its
  data/shakespeare_char/prepare.py runs first, untimed, on this repo's copy of the text
  (copied there as input.txt when the checkout has none: prepare.py would download it).
- trainctl: `trainctl run configs/shakespeare-char.yaml` (a private Ray, DeepSpeed, W&B
  offline, as configured) with nanoGPT's 20 validation batches and no text samples; its
  `trainctl prepare` runs first, untimed. The same data, tokens per step (12 x 64), learning
  rate schedule and evaluation steps (every 250); the architecture is trainctl's own, with
  fewer parameters than nanoGPT's (the script prints both counts).
Each run is timed from its command's start to its first validation loss at or under the
target, and stopped there. Rounds alternate the two. Prints each evaluation, then
trainctl's time / nanoGPT's (target <= 0.8).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "shakespeare-char.yaml"
# nanoGPT's README, "I only have a macbook" (the CPU command), as written there
NANOGPT_CPU = (
    "config/train_shakespeare_char.py --device=cpu --compile=False --eval_iters=20 --log_interval=1 "
    "--block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128 --max_iters=2000 "
    "--lr_decay_iters=2000 --dropout=0.0"
).split()
TOKENS_PER_STEP = 12 * 64
EVAL_EVERY = 250
NANO_EVAL = re.compile(r"^step (\d+): train loss [\d.]+, val loss ([\d.]+)")
NANO_ITER = re.compile(r"^iter (\d+): loss [\d.]+, time ([\d.]+)ms")
OURS_EVAL = re.compile(r"^step +(\d+)/\d+ \| val_loss ([\d.]+)")
OURS_STEP = re.compile(r"^step +\d+/\d+ .*\| ([\d,]+) tok/s")


def fail(msg: str) -> None:
    print(f"vs_nanogpt: error: {msg}", file=sys.stderr)
    sys.exit(2)


def prepare_nanogpt(root: Path, text: Path) -> None:
    """nanoGPT's own data preparation (untimed), on this repo's copy of the text."""
    data = root / "data" / "shakespeare_char"
    if (data / "train.bin").exists() and (data / "meta.pkl").exists():
        return
    if not (data / "input.txt").exists():
        shutil.copyfile(text, data / "input.txt")  # prepare.py downloads it otherwise
    subprocess.run([sys.executable, "prepare.py"], cwd=data, check=True, capture_output=True)


def nanogpt_params(root: Path) -> int:
    """Every parameter of nanoGPT's model at the recipe's shape, counted by nanoGPT's model.py."""
    code = (
        "import pickle, sys; sys.path.insert(0, '.'); from model import GPT, GPTConfig\n"
        "v = pickle.load(open('data/shakespeare_char/meta.pkl', 'rb'))['vocab_size']\n"
        "m = GPT(GPTConfig(block_size=64, vocab_size=v, n_layer=4, n_head=4, n_embd=128, dropout=0.0, bias=False))\n"
        "print(sum(p.numel() for p in m.parameters()))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=root, check=True, capture_output=True, text=True)
    return int(out.stdout.split()[-1])


def trainctl_params() -> int:
    sys.path.insert(0, str(REPO))
    from launcher.config import load_config
    from trainer.model import count_params

    return count_params(load_config(CONFIG, base_dir=str(REPO)).model, non_embedding=False)


def timed(name: str, cmd: list[str], cwd: Path, env: dict, target: float, evals: re.Pattern, rate) -> dict:
    """Run `cmd` until its first validation loss <= target (then stop it) or its end; the
    seconds from the start to that line, every evaluation with its time, the tokens/s."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    out = {"reached": None, "evals": [], "rates": [], "tail": []}
    for line in proc.stdout:
        at = time.perf_counter() - t0
        out["tail"] = (out["tail"] + [line.rstrip()])[-20:]
        if (r := rate(line)) is not None:
            out["rates"].append(r)
        if m := evals.match(line):
            step, val = int(m.group(1)), float(m.group(2))
            out["evals"].append((step, val, at))
            print(f"  {name:<8} step {step:>4}: val {val:.4f} at {at:5.1f} s", flush=True)
            if step > 0 and val <= target:
                out["reached"] = at
                os.killpg(proc.pid, signal.SIGKILL)
                break
    proc.wait()
    if out["reached"] is None and proc.returncode not in (0, -signal.SIGKILL):
        fail(f"{name} exited with {proc.returncode}:\n" + "\n".join(out["tail"]))
    return out


def nano_rate(line: str) -> float | None:
    """tokens/s of one training iteration (nanoGPT's evaluation iterations, whose time
    includes the evaluation, and iteration 0 left out)."""
    m = NANO_ITER.match(line)
    if not m or int(m.group(1)) % EVAL_EVERY == 0:
        return None
    return TOKENS_PER_STEP / (float(m.group(2)) / 1e3)


def ours_rate(line: str) -> float | None:
    m = OURS_STEP.match(line)
    return float(m.group(1).replace(",", "")) if m else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nanogpt", required=True, help="a checkout of github.com/karpathy/nanoGPT")
    ap.add_argument("--rounds", type=int, default=1, help="rounds, each nanoGPT then trainctl")
    ap.add_argument("--target", type=float, default=1.89)
    ap.add_argument("--text", default=str(REPO / "tests" / "data" / "tinyshakespeare.txt"))
    args = ap.parse_args()
    root = Path(args.nanogpt).resolve()
    if not (root / "train.py").is_file() or not (root / "config" / "train_shakespeare_char.py").is_file():
        fail(f"{root} is not a nanoGPT checkout (no train.py, config/train_shakespeare_char.py): pass --nanogpt PATH")
    if args.rounds < 1:
        fail("--rounds must be at least 1")
    commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    prepare_nanogpt(root, Path(args.text))
    n_params, t_params = nanogpt_params(root), trainctl_params()
    print(
        f"nanoGPT {commit.stdout.strip() or '(not a git checkout)'} at {root}: {n_params:,} parameters; "
        f"trainctl {CONFIG.relative_to(REPO)}: {t_params:,}",
        flush=True,
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    results: dict[str, list[dict]] = {"nanoGPT": [], "trainctl": []}
    with tempfile.TemporaryDirectory() as folder:
        data = Path(folder) / "data"
        subprocess.run(
            [sys.executable, "-m", "launcher.cli", "prepare", args.text, "--out", str(data), "--val-fraction", "0.1"],
            cwd=REPO,
            env=env,
            check=True,
            capture_output=True,
        )
        for r in range(1, args.rounds + 1):
            print(f"round {r}:", flush=True)
            nano_cmd = [sys.executable, "train.py", *NANOGPT_CPU, f"--out_dir={folder}/nanogpt-{r}"]
            results["nanoGPT"].append(
                timed("nanoGPT", nano_cmd, root, os.environ.copy(), args.target, NANO_EVAL, nano_rate)
            )
            ours_cmd = [
                sys.executable,
                "-m",
                "launcher.cli",
                "run",
                str(CONFIG),
                f"data.path={data}",
                f"checkpoint.storage_path={folder}",
                f"name=vs-nanogpt-{r}",
                "train.eval_sequences=240",  # nanoGPT's eval_iters=20 batches of 12
                "train.sample_tokens=0",
            ]
            results["trainctl"].append(timed("trainctl", ours_cmd, REPO, env, args.target, OURS_EVAL, ours_rate))
    for name, runs in results.items():
        for r, run in enumerate(runs, 1):
            rates = run["rates"][1:] or run["rates"]  # the first interval holds the warm-up
            rate = sum(rates) / max(len(rates), 1)
            last = run["evals"][-1][0] if run["evals"] else 0
            when = f"{run['reached']:.1f} s (step {last})" if run["reached"] else f"not reached by step {last}"
            print(f"{name:<9} round {r}: {rate:9,.0f} tokens/s while training; val <= {args.target}: {when}")
    pairs = [(t["reached"], n["reached"]) for t, n in zip(results["trainctl"], results["nanoGPT"])]
    if all(t and n for t, n in pairs):
        each = ", ".join(f"{t / n:.2f}" for t, n in pairs)
        total = sum(t for t, _ in pairs) / sum(n for _, n in pairs)
        print(f"trainctl / nanoGPT: time to val {args.target} = {total:.2f} (each round: {each}; target <= 0.8)")
    else:
        print(f"trainctl / nanoGPT: not computed: a run did not reach val {args.target}")


if __name__ == "__main__":
    main()
