"""Tokens/s and MFU of the GPU configs on one GPU: `trainctl run --no-ray` of
configs/gpt2-124m.yaml (150 steps) and configs/llama-1b.yaml (32 steps), steady state read
from the run's metrics.jsonl.

    python benchmarks/gpu_mfu.py --out DIR [--budget-s 450] [--runs gpt2-124m,llama-1b,gpt2-124m@train.compile=false]

Each run is the config as written, made to fit one GPU: 1 worker, a global batch of 64
sequences for 124M and 32 for 1B (65,536 tokens per step either way; the configs' micro
batches of 32 and 8), the byte-level standard-library corpus (data.path=stdlib, prepared on
first use: the token values do not change the arithmetic), W&B disabled, no evaluation or
checkpoint inside the window. A run named CONFIG@KEY=VALUE@... adds those overrides (a
variant); `--profile A-B` also writes a torch profiler trace of steps A-B of each config's
first run and prints where its GPU time went. Once the last step's metrics are written the
run is killed (its final evaluation and checkpoint are not part of the figure). The first
two logged intervals (warm-up, kernel builds, compilation) are dropped; the figures are
medians of the rest.

MFU is trainctl's own (README, "How MFU is counted"): 6N + 12LHQT FLOPs per token against
the device's dense bf16 peak. Prints one row per run and the targets last (>= 45% for
124M, >= 50% for 1B). Writes DIR/NAME.log (each run's output), DIR/results.json (with
every interval's metrics) and DIR/NAME.trace.json.gz (the profiled runs).

On a GPU machine without Ray or W&B installed, the packages `--no-ray` needs are
deepspeed, pydantic and webdataset (with their own dependencies); set
TORCH_CUDA_ARCH_LIST to the GPU's architecture (9.0 for Hopper) so that DeepSpeed's
fused Adam builds for that one.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGETS = {"gpt2-124m": 0.45, "llama-1b": 0.50}
RUNS = {
    "gpt2-124m": ["train.global_batch_size=64", "train.max_steps=150", "train.log_every=10"],
    "llama-1b": ["train.global_batch_size=32", "train.max_steps=32", "train.log_every=4"],
}
COMMON = [
    "cluster.num_workers=1",
    "cluster.address=local",
    "data.path=stdlib",
    "tracking.mode=disabled",
    "train.eval_every=1000000",
    "checkpoint.every=1000000",
    "train.warmup_steps=10",
    "train.sample_tokens=0",
]
SKIP = 2  # logged intervals dropped at the start


def slug(spec: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", spec).strip("-")


def one_run(spec: str, out: Path, work: Path, deadline: float, extra: list[str], profile: str | None) -> dict:
    config, *variant = spec.split("@")
    name = f"bench-{slug(spec)}"
    overrides = [
        *COMMON,
        *RUNS.get(config, []),
        f"name={name}",
        f"data.cache_dir={work / 'cache'}",
        f"checkpoint.storage_path={work / 'runs'}",
        *extra,
        *variant,
    ]
    if profile:
        overrides.append(f"train.profile={profile}")
    max_steps = int(next(o for o in reversed(overrides) if o.startswith("train.max_steps=")).split("=")[1])
    folder = work / "runs" / name
    metrics = folder / "metrics.jsonl"
    cmd = [
        sys.executable,
        "-m",
        "launcher.cli",
        "run",
        str(REPO / "configs" / f"{config}.yaml"),
        "--no-ray",
        "--fresh",
        "--force",
        *overrides,
    ]
    log = open(out / f"{slug(spec)}.log", "w")
    t0 = time.monotonic()
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])},
    )
    rows, status = [], "timed out"
    while time.monotonic() < deadline:
        time.sleep(1.0)
        if metrics.exists():
            text = metrics.read_text()
            whole = text[: text.rfind("\n") + 1]  # a row being written is read next time
            rows = [r for r in map(json.loads, whole.splitlines()) if "mfu" in r]
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
    result = {
        "run": spec,
        "status": status,
        "wall_s": round(time.monotonic() - t0, 1),
        "intervals": len(steady),
        "tokens_per_s": None,
        "mfu": None,
        "step_time_s": None,
        "mem_peak_gb": None,
    }
    if steady:
        result.update(
            tokens_per_s=statistics.median(r["tokens_per_s"] for r in steady),
            mfu=statistics.median(r["mfu"] for r in steady),
            step_time_s=statistics.median(r["step_time_s"] for r in steady),
            data_wait=statistics.median(r["data_wait"] for r in steady),
            mem_peak_gb=max(r["mem_peak_gb"] for r in steady),
            last_step=rows[-1]["step"],
        )
    result["rows"] = rows  # every interval, with the step-time breakdown
    for trace in sorted((folder / "profile").glob("trace-*.json")):
        result["profile"] = trace_summary(trace)
        with open(trace, "rb") as f, gzip.open(out / f"{slug(spec)}.trace.json.gz", "wb") as g:
            shutil.copyfileobj(f, g)
    if status != "ok":
        tail = (out / f"{slug(spec)}.log").read_text().splitlines()[-15:]
        print(f"--- {spec}: {status}; the end of its output:\n" + "\n".join(tail), flush=True)
    return result


def trace_summary(path: Path, top: int = 12) -> dict:
    """Where a Chrome trace's device time went: the span from the first to the last
    kernel, the share of it with a kernel running, and the kernels that took the most."""
    events = json.loads(path.read_text()).get("traceEvents", [])
    kernels = [e for e in events if e.get("cat") == "kernel" and "dur" in e]
    if not kernels:
        return {"kernels": 0}
    spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in kernels)
    busy, end = 0.0, spans[0][0]
    for a, b in spans:  # the union of the kernels' intervals (streams overlap)
        busy += max(0.0, b - max(a, end))
        end = max(end, b)
    total: dict[str, float] = {}
    for e in kernels:
        total[e["name"][:90]] = total.get(e["name"][:90], 0.0) + e["dur"]
    span = spans[-1][1] - spans[0][0]
    return {
        "kernels": len(kernels),
        "span_ms": span / 1e3,
        "busy": busy / span,
        "top": [
            (n, round(us / 1e3, 2), round(us / sum(total.values()), 4))
            for n, us in sorted(total.items(), key=lambda kv: -kv[1])[:top]
        ],
    }


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
    return (
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}; "
        f"bf16 8192^3 matmul {tflops:.0f} TFLOP/s on random data"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder for the logs and results.json")
    ap.add_argument("--work", default="/tmp/trainctl-gpu-bench", help="run folders and the prepared corpus")
    ap.add_argument("--runs", default="gpt2-124m,llama-1b")
    ap.add_argument("--profile", help="A-B: a trace of steps A-B in each config's first run")
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
    results, profiled = [], set()
    for spec in args.runs.split(","):
        if end - time.monotonic() < args.min_run_s:
            results.append({"run": spec, "status": "not started (budget)"})
            continue
        config = spec.split("@")[0]
        profile = args.profile if args.profile and config not in profiled else None
        profiled.add(config)
        results.append(one_run(spec, out, work, end, args.extra, profile))
        (out / "results.json").write_text(json.dumps({"device": device, "results": results}, indent=1))
        print(json.dumps({k: v for k, v in results[-1].items() if k not in ("rows", "profile")}), flush=True)
        if "profile" in results[-1]:
            print(json.dumps(results[-1]["profile"], indent=1), flush=True)
    print(f"\n{device}")
    print(f"{'run':<40} {'status':<12} {'tokens/s':>10} {'MFU':>7} {'step s':>7} {'peak GB':>8} {'wall s':>7}")
    for r in results:
        if r.get("mfu") is None:
            print(f"{r['run']:<40} {r['status']:<12}")
            continue
        print(
            f"{r['run']:<40} {r['status']:<12} {r['tokens_per_s']:>10,.0f} {r['mfu']:>7.1%} {r['step_time_s']:>7.3f} "
            f"{r['mem_peak_gb']:>8.1f} {r['wall_s']:>7.0f}"
        )
    for r in results:
        target = TARGETS.get(r["run"])
        if r.get("mfu") is not None and target and "@" not in r["run"]:
            print(
                f"{r['run']}: MFU {r['mfu']:.1%} against the {target:.0%} target: {'met' if r['mfu'] >= target else 'not met'}"
            )


if __name__ == "__main__":
    main()
