"""Tokens/s, MFU and memory of the GPU configs on one GPU, with `trainctl plan`'s prediction
beside each: `trainctl run --no-ray` of configs/gpt2-124m.yaml (150 steps), configs/llama-1b.yaml
(32 steps) and configs/llama-7b.yaml (4 steps), and variants of them (the candidates of
issue 17), steady state read from each run's metrics.jsonl. One command, one table:

    python benchmarks/gpu_mfu.py --out DIR [--budget-s 420] [--runs gpt2-124m,gpt2-124m@train.zero_stage=1,...]

Each run is the config as written, made to fit one GPU: 1 worker, a global batch of 64
sequences for 124M and 32 for 1B (65,536 tokens per step either way; the configs' micro
batches of 32 and 8), 1 for 7B (4,096 tokens, its optimizer offloaded to the host), the
byte-level standard-library corpus (data.path=stdlib, prepared on first use: the token
values do not change the arithmetic), W&B disabled, no evaluation or checkpoint inside the
window. A run named CONFIG@KEY=VALUE@... adds those overrides (a variant); `--profile A-B`
also writes a torch profiler trace of steps A-B of each config's first run and prints where
its GPU time went. Once the last step's metrics are written the run is killed (its final
evaluation and checkpoint are not part of the figure). The first two logged intervals
(warm-up, kernel builds, compilation) are dropped; the figures are medians of the rest.

llama-7b needs its whole fp32 model (built on the host before DeepSpeed partitions it) and
the offloaded optimizer (fp32 master, moments and gradients: 16 bytes a parameter) in host
memory: when `plan` says that does not fit 85% of this machine's memory, the run drops
layers until it does and its row names the shape it ran.

MFU is trainctl's own (README, "How MFU is counted"): 6N + 12LHQT FLOPs per token against
the device's dense bf16 peak. Prints one row per run (path, tokens/s, MFU, step time, peak
GPU memory and plan's, peak host memory and plan's offloaded state) and the targets last
(>= 45% for 124M, >= 60% for 1B). Writes DIR/NAME.log (each run's output), DIR/results.json
(with every interval's metrics) and DIR/NAME.trace.json.gz (the profiled runs).

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
TARGETS = {"gpt2-124m": 0.45, "llama-1b": 0.60}
RUNS = {
    "gpt2-124m": ["train.global_batch_size=64", "train.max_steps=150", "train.log_every=10"],
    "llama-1b": ["train.global_batch_size=32", "train.max_steps=32", "train.log_every=4"],
    "llama-7b": ["train.global_batch_size=1", "train.max_steps=4", "train.log_every=1"],
}
# issue 17's order: the 124M baseline, two candidates (ZeRO-1, ZeRO-0: no gradient partitioning
# to pay for on one GPU), llama-1b and its ZeRO-1 variant, a few steps of 7B
DEFAULT_RUNS = (
    "gpt2-124m,gpt2-124m@train.zero_stage=1,gpt2-124m@train.zero_stage=0,llama-1b,llama-1b@train.zero_stage=1,llama-7b"
)
HOST_SHARE = 0.85  # of the machine's memory a run may plan to use
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


def overrides_of(spec: str, work: Path, extra: list[str]) -> list[str]:
    config, *variant = spec.split("@")
    return [
        *COMMON,
        *RUNS.get(config, []),
        f"name=bench-{slug(spec)}",
        f"data.cache_dir={work / 'cache'}",
        f"checkpoint.storage_path={work / 'runs'}",
        *extra,
        *variant,
    ]


def plan_of(config: str, overrides: list[str]) -> dict:
    """`trainctl plan`'s figures for one run: GPU memory (model states + activations) at the
    run's ZeRO stage, the offloaded optimizer state on the host, and the host memory the run
    needs (that state, plus the fp32 model built whole before DeepSpeed takes it)."""
    sys.path.insert(0, str(REPO))
    from launcher.config import load_config
    from launcher.plan import make_plan

    cfg = load_config(REPO / "configs" / f"{config}.yaml", overrides, base_dir=str(REPO))
    p = make_plan(cfg, mfu=0.4)
    t = cfg.train
    m = next(m for m in p.memory if (m.stage, m.offload) == (t.zero_stage, t.offload_optimizer))
    host = (m.cpu_bytes if m.offload else 0) + 4 * p.params
    return {
        "plan_gpu_gb": m.gpu_bytes / 1e9,
        "plan_offload_gb": m.cpu_bytes / 1e9 if m.offload else 0.0,
        "plan_host_gb": host / 1e9,
        "n_layer": cfg.model.n_layer,
    }


def host_memory_bytes() -> int:
    with open("/proc/meminfo") as f:
        return int(f.readline().split()[1]) * 1024  # MemTotal, kB


def fit_host(spec: str, work: Path, extra: list[str]) -> tuple[str, str | None]:
    """The run as named, or with fewer layers when plan says its host memory does not fit
    HOST_SHARE of this machine's (and why)."""
    config = spec.split("@")[0]
    limit = HOST_SHARE * host_memory_bytes() / 1e9
    p = plan_of(config, overrides_of(spec, work, extra))
    if p["plan_host_gb"] <= limit:
        return spec, None
    for layers in range(p["n_layer"] - 1, 0, -1):
        smaller = f"{spec}@model.n_layer={layers}"
        q = plan_of(config, overrides_of(smaller, work, extra))
        if q["plan_host_gb"] <= limit:
            why = (
                f"{spec}: plan needs {p['plan_host_gb']:.0f} GB of host memory, over {HOST_SHARE:.0%} of this "
                f"machine's {limit / HOST_SHARE:.0f} GB: running {layers} of its {p['n_layer']} layers "
                f"({q['plan_host_gb']:.0f} GB)"
            )
            return smaller, why
    return spec, f"{spec}: no depth of it fits {limit:.0f} GB of host memory"


def peak_rss_gb(pid: int) -> float | None:
    """The process's peak resident memory (VmHWM), GB, while it still runs."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    return None


def one_run(spec: str, out: Path, work: Path, deadline: float, extra: list[str], profile: str | None) -> dict:
    config = spec.split("@")[0]
    name = f"bench-{slug(spec)}"
    overrides = overrides_of(spec, work, extra)
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
    rows, status, host_peak = [], "timed out", None
    while time.monotonic() < deadline:
        time.sleep(1.0)
        host_peak = peak_rss_gb(proc.pid) or host_peak
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
        "host_peak_gb": host_peak,
        "path": "--no-ray",
        **plan_of(config, overrides),
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
    ap.add_argument("--runs", default=DEFAULT_RUNS)
    ap.add_argument("--profile", help="A-B: a trace of steps A-B in each config's first run")
    ap.add_argument("--budget-s", type=float, default=420.0, help="stop starting runs after this many seconds")
    ap.add_argument("--min-run-s", type=float, default=90.0, help="do not start a run with less time than this left")
    ap.add_argument("extra", nargs="*", help="more KEY=VALUE overrides for every run")
    args = ap.parse_args()
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    end = time.monotonic() + args.budget_s
    device = device_line()
    print(device, flush=True)
    results, profiled, notes = [], set(), []
    for spec in args.runs.split(","):
        spec, why = fit_host(spec, work, args.extra)
        if why:
            print(why, flush=True)
            notes.append(why)
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
    print(table(results))
    for why in notes:
        print(why)
    for r in results:
        target = TARGETS.get(r["run"])
        if r.get("mfu") is not None and target and "@" not in r["run"]:
            print(
                f"{r['run']}: MFU {r['mfu']:.1%} against the {target:.0%} target: {'met' if r['mfu'] >= target else 'not met'}"
            )


def table(results: list[dict]) -> str:
    """One row per run: GPU memory and host memory measured, each beside plan's prediction."""
    head = (
        f"{'run':<44} {'path':<9} {'status':<10} {'tokens/s':>10} {'MFU':>6} {'step s':>7} "
        f"{'GPU GB':>7} {'plan':>6} {'host GB':>8} {'plan':>6} {'wall s':>6}"
    )
    lines = [head]

    def num(v, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    for r in results:
        if r.get("mfu") is None:
            lines.append(f"{r['run']:<44} {r.get('path', ''):<9} {r['status']:<10}")
            continue
        lines.append(
            f"{r['run']:<44} {r['path']:<9} {r['status']:<10} {r['tokens_per_s']:>10,.0f} {r['mfu']:>6.1%} "
            f"{r['step_time_s']:>7.3f} {num(r['mem_peak_gb'], '.1f'):>7} {r['plan_gpu_gb']:>6.1f} "
            f"{num(r['host_peak_gb'], '.1f'):>8} {r['plan_host_gb']:>6.1f} {r['wall_s']:>6.0f}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
