"""Tokens/s and MFU of the GPU configs on one GPU: `trainctl run --no-ray` of
configs/gpt2-124m.yaml and configs/llama-1b.yaml for a few hundred (124M) or a few dozen
(1B) steps, steady state read from the run's metrics.jsonl.

    python benchmarks/gpu_mfu.py --out DIR [--budget-s 450] [--runs gpt2-124m,llama-1b,gpt2-124m+compile]

Each run is the config as written, made to fit one GPU: 1 worker, a global batch of 64
sequences for 124M (65,536 tokens, 4 micro batches of 16) and 32 for 1B (65,536 tokens, 8
micro batches of 4), the byte-level standard-library corpus (data.path=stdlib, prepared on
first use: the token values do not change the arithmetic), W&B disabled, no evaluation or
checkpoint inside the window. llama-1b runs ZeRO-2 without activation checkpointing: on
one GPU ZeRO-3 only adds gathers, and 80 GB hold its activations. A `+compile` suffix adds
train.compile=true. Once the last step's metrics are written the run is killed (its final
evaluation and checkpoint are not part of the figure). The first two logged intervals
(warm-up, kernel builds, compilation) are dropped; the figures are medians of the rest.

MFU is trainctl's own (README, "How MFU is counted"): 6N + 12LHQT FLOPs per token against
the device's dense bf16 peak. Prints one row per run and the targets last (>= 45% for
124M, >= 50% for 1B). Writes DIR/NAME.log (each run's output) and DIR/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGETS = {"gpt2-124m": 0.45, "llama-1b": 0.50}
RUNS = {
    "gpt2-124m": ["train.global_batch_size=64", "train.max_steps=200", "train.log_every=10"],
    "llama-1b": ["train.global_batch_size=32", "train.max_steps=40", "train.log_every=4",
                 "train.zero_stage=2", "model.activation_checkpointing=false"],
}
COMMON = ["cluster.num_workers=1", "cluster.address=local", "data.path=stdlib", "tracking.mode=disabled",
          "train.eval_every=1000000", "checkpoint.every=1000000", "train.warmup_steps=10", "train.sample_tokens=0"]
SKIP = 2  # logged intervals dropped at the start


def one_run(spec: str, out: Path, work: Path, deadline: float, extra: list[str]) -> dict:
    config, _, flag = spec.partition("+")
    overrides = [*COMMON, *RUNS.get(config, []), f"name=bench-{spec.replace('+', '-')}",
                 f"data.cache_dir={work / 'cache'}", f"checkpoint.storage_path={work / 'runs'}", *extra]
    if flag == "compile":
        overrides.append("train.compile=true")
    max_steps = int(next(o for o in reversed(overrides) if o.startswith("train.max_steps=")).split("=")[1])
    metrics = work / "runs" / f"bench-{spec.replace('+', '-')}" / "metrics.jsonl"
    cmd = [sys.executable, "-m", "launcher.cli", "run", str(REPO / "configs" / f"{config}.yaml"), "--no-ray",
           "--fresh", "--force", *overrides]
    log = open(out / f"{spec.replace('+', '-')}.log", "w")
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])})
    rows, status = [], "timed out"
    while time.monotonic() < deadline:
        time.sleep(1.0)
        if metrics.exists():
            rows = [r for r in map(json.loads, metrics.read_text().splitlines()) if "mfu" in r]
        if rows and rows[-1]["step"] >= max_steps:
            status = "ok"
            break
        if proc.poll() is not None:
            status = f"exit {proc.returncode}"
            break
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)  # no final evaluation or checkpoint: not part of the figure
    proc.wait()
    log.close()
    steady = rows[SKIP:]
    result = {"run": spec, "status": status, "wall_s": round(time.monotonic() - t0, 1), "intervals": len(steady),
              "tokens_per_s": None, "mfu": None, "step_time_s": None, "mem_peak_gb": None}
    if steady:
        result.update(tokens_per_s=statistics.median(r["tokens_per_s"] for r in steady),
                      mfu=statistics.median(r["mfu"] for r in steady),
                      step_time_s=statistics.median(r["step_time_s"] for r in steady),
                      data_wait=statistics.median(r["data_wait"] for r in steady),
                      mem_peak_gb=max(r["mem_peak_gb"] for r in steady),
                      last_step=rows[-1]["step"])
    if status != "ok":
        tail = (out / f"{spec.replace('+', '-')}.log").read_text().splitlines()[-15:]
        print(f"--- {spec}: {status}; the end of its output:\n" + "\n".join(tail), flush=True)
    return result


def device_line() -> str:
    import torch

    if not torch.cuda.is_available():
        return f"no CUDA device (torch {torch.__version__})"
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        a @ b
    end.record()
    torch.cuda.synchronize()
    tflops = 20 * 2 * 8192**3 / (start.elapsed_time(end) / 1e3) / 1e12
    return (f"{torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}; "
            f"bf16 8192^3 matmul {tflops:.0f} TFLOP/s on random data")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder for the logs and results.json")
    ap.add_argument("--work", default="/tmp/trainctl-gpu-bench", help="run folders and the prepared corpus")
    ap.add_argument("--runs", default="gpt2-124m,llama-1b,gpt2-124m+compile")
    ap.add_argument("--budget-s", type=float, default=450.0, help="stop starting runs after this many seconds")
    ap.add_argument("--min-run-s", type=float, default=90.0, help="do not start a run with less time than this left")
    ap.add_argument("extra", nargs="*", help="more KEY=VALUE overrides for every run")
    args = ap.parse_args()
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    end = time.monotonic() + args.budget_s
    device = device_line()
    print(device, flush=True)
    results = []
    for spec in args.runs.split(","):
        if end - time.monotonic() < args.min_run_s:
            results.append({"run": spec, "status": "not started (budget)"})
            continue
        results.append(one_run(spec, out, work, end, args.extra))
        (out / "results.json").write_text(json.dumps({"device": device, "results": results}, indent=1))
        print(json.dumps(results[-1]), flush=True)
    print(f"\n{device}")
    print(f"{'run':<22} {'status':<12} {'tokens/s':>10} {'MFU':>7} {'step s':>7} {'peak GB':>8} {'wall s':>7}")
    for r in results:
        if r.get("mfu") is None:
            print(f"{r['run']:<22} {r['status']:<12}")
            continue
        print(f"{r['run']:<22} {r['status']:<12} {r['tokens_per_s']:>10,.0f} {r['mfu']:>7.1%} {r['step_time_s']:>7.3f} "
              f"{r['mem_peak_gb']:>8.1f} {r['wall_s']:>7.0f}")
    for r in results:
        target = TARGETS.get(r["run"].split("+")[0])
        if r.get("mfu") is not None and target:
            print(f"{r['run']}: MFU {r['mfu']:.1%} against the {target:.0%} target: {'met' if r['mfu'] >= target else 'not met'}")


if __name__ == "__main__":
    main()
