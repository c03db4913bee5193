"""What a step costs: FLOPs per token, the device's peak, MFU, where the step's time goes,
peak memory and goodput.

The FLOPs convention (the PaLM / nanoGPT one, written in the README): a token costs
    6 * N + 12 * L * H * Q * T
FLOPs in training (forward + backward), where N is the weights of every matrix multiply
(all blocks and the output head, also when it is tied to the token embedding; not the
embedding lookups or norms), L layers, H heads of Q dimensions, T the context. MFU is the
FLOPs of the tokens trained per second over the peak of the devices that trained them:
dense bf16 989 TFLOP/s for an H100/H200 SXM, 312 for an A100, `cluster.peak_tflops` to
override; on a CPU, one core's fp32 matmul rate (measured once) times the threads a worker
uses.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import resource
import time
import warnings
from collections import defaultdict
from pathlib import Path

import torch

from trainer.console import LAST_ROW, duration
from trainer.model_config import ModelConfig

# Dense bf16 TFLOP/s of one GPU by (a part of) its name, most specific first.
PEAK_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H200", 989.0),
    ("H100", 989.0),
    ("GH200", 989.0),
    ("A100", 312.0),
)


def matmul_params(c: ModelConfig) -> int:
    """N: the weights of every matrix multiply (blocks and output head)."""
    attn = 2 * c.d_model * c.n_head * c.head_dim + 2 * c.d_model * c.kv_heads * c.head_dim  # wq, wo; wk, wv
    mlp = 3 * c.d_model * c.ffn_dim  # w1, w3, w2
    return c.n_layer * (attn + mlp) + c.vocab_size * c.d_model


def lora_params(c: ModelConfig, lora) -> int:
    """The adapters' parameters of `train.lora` on a model: r (in + out) per targeted layer."""
    C, KD, F = c.d_model, c.kv_heads * c.head_dim, c.ffn_dim
    shapes = {
        "q_proj": (C, C),
        "k_proj": (C, KD),
        "v_proj": (C, KD),
        "o_proj": (C, C),
        "gate_proj": (C, F),
        "up_proj": (C, F),
        "down_proj": (F, C),
    }
    return c.n_layer * sum(lora.rank * sum(shapes[t]) for t in lora.targets)


def flops_per_token(c: ModelConfig, seq_len: int, lora=None) -> int:
    """Training FLOPs per token of a T = seq_len context: 6 N + 12 L H Q T. With LoRA the
    frozen weights get no weight gradients: 4 N (forward, and backward to the inputs), plus
    6 per adapter parameter."""
    attention = 12 * c.n_layer * c.n_head * c.head_dim * seq_len
    if lora is not None:
        return 4 * matmul_params(c) + 6 * lora_params(c, lora) + attention
    return 6 * matmul_params(c) + attention


def gpu_peak_tflops(name: str) -> float | None:
    """The dense bf16 peak of a GPU named like torch.cuda.get_device_name(), or None."""
    return next((peak for key, peak in PEAK_TFLOPS if key in name), None)


def measure_cpu_peak_tflops(seconds: float = 0.3, n: int = 512, bursts: int = 5) -> float:
    """The fp32 matmul rate of one core, TFLOP/s, times the threads torch uses here: the
    best of a few short bursts on one thread (other processes starting up beside it only
    make some bursts slower; two threads on two hyperthreads measure less than one)."""
    g = torch.Generator().manual_seed(0)  # not the global generator: training's randomness stays as seeded
    a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a @ b  # warm the kernels
        best = 0.0
        for _ in range(bursts):
            done, t0 = 0, time.perf_counter()
            while (elapsed := time.perf_counter() - t0) < seconds / bursts:
                a @ b
                done += 1
            best = max(best, 2 * n**3 * done / elapsed / 1e12)
    finally:
        torch.set_num_threads(threads)
    return best * threads


def device_peak_tflops(override: float | None, use_gpu: bool) -> tuple[float | None, str]:
    """(peak TFLOP/s of one device, where that figure comes from)."""
    if override:
        return override, "cluster.peak_tflops"
    if use_gpu:
        name = torch.cuda.get_device_name()
        peak = gpu_peak_tflops(name)
        return peak, (f"{name}, dense bf16" if peak else f"{name}: unknown peak, set cluster.peak_tflops for MFU")
    return cpu_peak_tflops(), "fp32 matmul measured on this CPU"


def cpu_peak_tflops() -> float:
    """measure_cpu_peak_tflops, once per machine, thread count and number of ranks sharing
    it: kept in ~/.cache/trainctl/cpu_peak.json (under XDG_CACHE_HOME if set)."""
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "trainctl" / "cpu_peak.json"
    key = "|".join(
        map(
            str,
            (
                platform.processor() or platform.machine(),
                os.cpu_count(),
                torch.get_num_threads(),
                os.environ.get("LOCAL_WORLD_SIZE", "1"),
                torch.__version__,
            ),
        )
    )
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    if key not in known:
        known[key] = measure_cpu_peak_tflops()
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_name(f".cpu_peak.{os.getpid()}.json")
            tmp.write_text(json.dumps(known))
            os.replace(tmp, cache)
        except OSError:
            pass  # measured again next time
    return known[key]


def mfu(tokens_per_s: float, flops: int, world: int, peak_tflops: float | None) -> float | None:
    """Model FLOPs utilisation: achieved FLOP/s over the peak of `world` devices."""
    if not peak_tflops:
        return None
    return tokens_per_s * flops / (world * peak_tflops * 1e12)


class StepTimer:
    """Seconds per part of the step (data, forward_backward, optimizer, checkpoint),
    summed until `take()`. On a GPU the compute parts are timed with CUDA events, read at
    `take()`, so timing adds no synchronisation to the step."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.totals: dict[str, float] = defaultdict(float)
        self.events: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []

    @contextlib.contextmanager
    def __call__(self, part: str, host: bool = False):
        """Time the block as `part`; `host`: wall time even on a GPU (waiting for data, a save)."""
        if self.cuda and not host:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self.events.append((part, start, end))
        else:
            t0 = time.perf_counter()
            yield
            self.totals[part] += time.perf_counter() - t0

    def take(self) -> dict[str, float]:
        if self.events:
            torch.cuda.synchronize()
            for part, start, end in self.events:
                self.totals[part] += start.elapsed_time(end) / 1000
        out = dict(self.totals)
        self.totals.clear()
        self.events.clear()
        return out


def peak_memory_gb(cuda: bool) -> dict[str, float]:
    """Peak memory of this process so far: GPU allocated and reserved, or the CPU RSS."""
    if cuda:
        return {
            "mem_peak_gb": torch.cuda.max_memory_allocated() / 2**30,
            "mem_reserved_gb": torch.cuda.max_memory_reserved() / 2**30,
        }
    return {"mem_peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30}  # Linux: KiB


def mean_over_ranks(values: list[float], device: torch.device) -> list[float]:
    """Each value averaged over the ranks, in one all-reduce."""
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return (t / dist.get_world_size()).tolist()


def max_over_ranks(values: list[float], device: torch.device) -> list[float]:
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


PARTS = ("data", "forward_backward", "optimizer", "sync", "checkpoint")


class Meter:
    """The throughput and time figures of each log interval, measured on every rank (the
    figures are agreed in two all-reduces, so every rank must call `interval`).

    Step time is the interval's wall time less what was set `aside` (evaluation, logging),
    per step; its parts are each rank's timed seconds averaged over the ranks: waiting for
    data, forward+backward, the optimizer step, the per-step agreement of the ranks on the
    loss (`sync`), checkpoints; `time_other_s` is what is left. Goodput is the useful compute (forward,
    backward and optimizer time per step times the steps this invocation advanced) over the
    wall time since `trainctl run` started it: restarts, checkpoints, evaluation, data
    stalls and start-up all count against it.
    """

    def __init__(
        self,
        flops: int,
        world: int,
        tokens_per_step: int,
        peak_tflops: float | None,
        device: torch.device,
        step: int,
        launched_at: float | None = None,
        launched_step: int = 0,
        peak_source: str = "",
    ):
        self.flops, self.world, self.tokens_per_step, self.peak = flops, world, tokens_per_step, peak_tflops
        self.peak_source = peak_source  # where the peak came from: a GPU's datasheet, a measurement, the config
        self.device, self.cuda = device, device.type == "cuda"
        self.timer = StepTimer(self.cuda)
        self.t_log, self.step_log, self.aside_s = time.perf_counter(), step, 0.0
        self.launched_at, self.launched_step = launched_at, launched_step
        self.step_compute_s: list[float] = []  # each interval's forward+backward+optimizer seconds per step
        self.mfus: list[float] = []
        self.last_goodput: float | None = None

    @contextlib.contextmanager
    def aside(self):
        """Leave the block's time (evaluation, logging) out of the step time."""
        t0 = time.perf_counter()
        yield
        self.aside_s += time.perf_counter() - t0

    def restart_interval(self, step: int) -> None:
        """Start an interval at `step` (the loop's start; after a rollback, which threw the
        interval's steps away)."""
        self.timer.take()
        self.t_log, self.step_log, self.aside_s = time.perf_counter(), step, 0.0

    def interval(self, step: int) -> dict[str, float]:
        parts = self.timer.take()
        mean = mean_over_ranks([parts.get(p, 0.0) for p in PARTS], self.device)
        mem = peak_memory_gb(self.cuda)
        mem = dict(zip(mem, max_over_ranks(list(mem.values()), self.device)))
        now = time.perf_counter()
        steps = max(step - self.step_log, 1)
        wall = max(now - self.t_log - self.aside_s, 1e-9)
        step_s = wall / steps
        tok_s = steps * self.tokens_per_step / wall
        per_step = {p: v / steps for p, v in zip(PARTS, mean)}
        self.step_compute_s.append(per_step["forward_backward"] + per_step["optimizer"])
        out = {
            "tokens_per_s": tok_s,
            "tokens_per_s_per_worker": tok_s / self.world,
            "step_time_s": step_s,
            **{f"time_{p}_s": v for p, v in per_step.items()},
            "time_other_s": max(step_s - sum(per_step.values()), 0.0),
            "data_wait": per_step["data"] / step_s,
            **mem,
        }
        u = mfu(tok_s, self.flops, self.world, self.peak)
        if u is not None:
            out["mfu"] = u
            self.mfus.append(u)
        if self.launched_at is not None:
            useful = (step - self.launched_step) * sum(self.step_compute_s) / len(self.step_compute_s)
            out["goodput"] = self.last_goodput = min(useful / max(time.time() - self.launched_at, 1e-9), 1.0)
        self.t_log, self.step_log, self.aside_s = now, step, 0.0
        return out

    def mean_mfu(self) -> float | None:
        return sum(self.mfus) / len(self.mfus) if self.mfus else None


WARMUP_STEPS = 5  # before a `--profile N` trace: the first steps pay one-time costs


def profile_window(spec: str, start_step: int, max_steps: int) -> tuple[int, int]:
    """(first, last) step to trace: "N" is the N steps after a warm-up of this attempt's
    first steps (less warm-up if the run is short), "FIRST-LAST" as given."""
    if "-" in spec:
        first, last = map(int, spec.split("-"))
        return first, min(last, max_steps)  # FIRST <= LAST: the config checks it
    n = int(spec)
    first = start_step + 1 + max(0, min(WARMUP_STEPS, max_steps - start_step - n))
    return first, min(first + n - 1, max_steps)


class Profiler:
    """A torch profiler trace of a window of steps: call `tick(step)` before each step with
    the step about to run, and `close()` after the loop. Each rank writes its own Chrome trace
    (chrome://tracing or https://ui.perfetto.dev) into FOLDER/profile/."""

    def __init__(
        self, spec: str | None, start_step: int, max_steps: int, folder, rank: int, cuda: bool, verbose: bool = False
    ):
        self.window = profile_window(spec, start_step, max_steps) if spec else None
        self.folder, self.rank, self.cuda, self.verbose = folder, rank, cuda, verbose
        self.prof = None

    def tick(self, step: int) -> None:
        if self.window is None:
            return
        first, last = self.window
        if self.prof is None and first <= step <= last:
            activities = [torch.profiler.ProfilerActivity.CPU] + (
                [torch.profiler.ProfilerActivity.CUDA] if self.cuda else []
            )
            if not self.verbose:  # Kineto prints "USDT:… profiler_start/stop" lines
                os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # read when the first profiler starts
            self.prof = torch.profiler.profile(activities=activities)
            with warnings.catch_warnings():  # "Profiler clears events at the end of each cycle": we trace one
                warnings.filterwarnings("ignore", message=".*Profiler clears events")
                self.prof.__enter__()
            self.started = step
        elif self.prof is not None and step > last:
            self.close(step - 1)

    def close(self, end: int) -> None:
        """Write the trace of the steps up to `end` (the last step run), if one is open."""
        if self.prof is not None:
            self.prof.__exit__(None, None, None)
            out = self.folder / "profile" / f"trace-steps{self.started}-{end}-rank{self.rank}.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            self.prof.export_chrome_trace(str(out))
            self.prof, self.window = None, None
            if self.rank == 0:
                print(f"trainctl: profile of steps {self.started}-{end}: {out} (one file per rank)", flush=True)


def optimizer_figures(engine, precision: str) -> dict[str, float | None]:
    """The learning rate, the last step's gradient norm (before clipping) and loss scale."""
    norm = engine.get_global_grad_norm()
    scale = engine.optimizer.loss_scale if precision == "fp16" else 1.0  # bf16 and fp32 do not scale
    return {"lr": engine.get_lr()[0], "grad_norm": None if norm is None else float(norm), "loss_scale": float(scale)}


def run_summary(
    val_losses: list[tuple[int, float]],
    tokens_seen: int,
    wall_s: float,
    meter: Meter,
    restarts: int,
) -> list[tuple[str, str]]:
    """The end-of-run table's rows (this invocation's figures)."""
    peak, peak_source = meter.peak, meter.peak_source
    rows = []
    if val_losses:
        best_step, best = min(val_losses, key=lambda sv: sv[1])
        rows += [
            ("final val_loss", f"{val_losses[-1][1]:.4f} (step {val_losses[-1][0]})"),
            ("best val_loss", f"{best:.4f} (step {best_step})"),
        ]
    mean_mfu = meter.mean_mfu()
    rows += [
        ("tokens seen", f"{tokens_seen:,}"),
        ("wall time", duration(wall_s)),
        ("goodput", "n/a" if meter.last_goodput is None else f"{meter.last_goodput:.0%}"),
        (
            "mean MFU",
            "n/a" if mean_mfu is None else f"{mean_mfu:.2%} of {peak:,.3g} TFLOP/s per worker ({peak_source})",
        ),
        (LAST_ROW, str(restarts)),  # last: the driver waits for this line (console.LAST_ROW)
    ]
    return rows
