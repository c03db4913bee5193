"""`trainctl plan`: what a job needs before any GPU is allocated.

Parameters, training FLOPs per token, tokens per step, memory per worker under each ZeRO
stage with and without optimizer offload, the stage that fits the declared GPU memory,
and the time per step and per run at a stated MFU. Closed forms, no model is built:

- model states (ZeRO paper, Adam): weights, gradients and optimizer state take w, g, o
  bytes per parameter: w = g = 2 and o = 12 (fp32 master copy, m, v) in bf16/fp16;
  w = g = 4 and o = 8 in fp32. Per worker of N: stage 0 keeps all; 1 splits o; 2 splits
  g + o; 3 splits everything. Offload moves o (and its share of fp32 gradients) to CPU.
- activations (per micro batch of b sequences of s tokens, a bytes each: 2 in bf16/fp16,
  4 in fp32): each block keeps s*b*(6C + 2*K*D + 3F) values for backward (norm inputs and
  outputs, q/k/v, the attention output, the SwiGLU's three F-wide tensors; attention
  itself runs in SDPA's memory-efficient kernels, so no s*s term), the logits s*b*V*(a+4)
  (the fp32 copy the loss takes). With activation checkpointing a block keeps only its
  input, and one block's full set exists at a time during the recompute.
- FLOPs per token: trainer/perf.py's flops_per_token, 6 N + 12 L H Q T (the convention MFU
  is logged with); activation checkpointing makes the hardware do a third more.
- scaling to more GPUs (`scaling`, printed for GPU jobs): bytes each GPU sends per
  optimizer step in ring collectives of 2-byte (bf16) values, with r = (N-1)/N and P the
  trained parameters (ZeRO paper, section 7): ZeRO-0 all-reduces the gradients once (2rP);
  ZeRO-1 reduce-scatters them once and all-gathers the updated weights (2rP); ZeRO-2
  reduce-scatters each micro batch's gradients (k micro batches: krP) and all-gathers the
  weights (rP); ZeRO-3 all-gathers the weights for each micro batch's forward and backward
  and reduce-scatters its gradients (3krP). Within a node of 8 the links are NVLink (900 GB/s
  both ways: 450 GB/s each way); across nodes each GPU's ring traffic crosses its own
  400 Gb/s (50 GB/s) NIC. The global batch stays the config's: more GPUs, fewer micro
  batches each. The step takes between max(compute, communication) (all of it overlapped)
  and their sum (none of it).
- LoRA (`train.lora`): the base's weights are held (w bytes each) but have no gradients or
  optimizer state; the adapters' r (in + out) parameters per targeted layer have all three;
  FLOPs 4 N + 6 adapters + attention (no weight gradients for the frozen matrices).
"""

from __future__ import annotations

from dataclasses import dataclass

from trainer import perf
from trainer.config import JobConfig

GIB = 2**30
H100_TFLOPS = 989.0  # the peak a GPU job's time estimate assumes without cluster.peak_tflops
GPUS_PER_NODE = 8
NVLINK_BYTES_S = 450e9  # NVLink 4 (H100/H200): 900 GB/s per GPU both ways, 450 GB/s each way
NIC_BYTES_S = 50e9  # 400 Gb/s per GPU between nodes
SCALING_GPUS = (8, 64)


@dataclass
class Memory:
    stage: int
    offload: bool
    gpu_bytes: int  # model states + activations, per worker
    cpu_bytes: int  # offloaded optimizer state, per worker


@dataclass
class Plan:
    params: int
    non_embedding: int
    flops_per_token: int
    tokens_per_step: int
    activation_bytes: int
    memory: list[Memory]
    limit_bytes: int | None  # declared GPU memory (None on CPU)
    step_seconds: float | None
    run_seconds: float | None
    peak_tflops: float | None = None  # per device, as the step time assumes

    def fits(self, stage: int, offload: bool) -> bool:
        m = next(m for m in self.memory if m.stage == stage and m.offload == offload)
        return self.limit_bytes is None or m.gpu_bytes <= self.limit_bytes

    def smallest_fit(self) -> Memory | None:
        """The lowest ZeRO stage that fits without offload, else the lowest with offload."""
        for offload in (False, True):
            for m in self.memory:
                if m.offload == offload and self.fits(m.stage, offload):
                    return m
        return None


def trained_params(cfg: JobConfig) -> int:
    """Parameters with gradients and optimizer state: all of them, or with LoRA only the
    adapters (the frozen weights have neither)."""
    from trainer.model import count_params

    t = cfg.train
    return perf.lora_params(cfg.model, t.lora) if t.lora is not None else count_params(cfg.model, False)


def make_plan(cfg: JobConfig, mfu: float, peak_tflops: float | None = None, gpu_memory_gb: float | None = None) -> Plan:
    from trainer.model import count_params

    m, t, n = cfg.model, cfg.train, cfg.cluster.num_workers
    mc = m
    s, b = cfg.data.seq_len, t.micro_batch_size
    C, L, V, F, KD = mc.d_model, mc.n_layer, mc.vocab_size, mc.ffn_dim, mc.kv_heads * mc.head_dim
    params = count_params(mc, non_embedding=False)
    flops_per_token = perf.flops_per_token(mc, s, t.lora)
    trained = trained_params(cfg)

    half = t.precision in ("bf16", "fp16")
    w, g, o = (2, 2, 12) if half else (4, 4, 8)
    a = 2 if half else 4
    block = s * b * (6 * C + 2 * KD + 3 * F) * a
    logits = s * b * V * (a + 4)
    acts = (L * s * b * C * a + block if m.activation_checkpointing else L * block) + logits

    memory = []
    for offload in (False, True):
        for stage in range(4):
            if offload and stage == 0:
                continue  # DeepSpeed offloads only with ZeRO 1-3
            weights = w * (params + (trained if t.lora is not None else 0)) / (n if stage == 3 else 1)
            grads = g * trained / (n if stage >= 2 else 1)
            optim = o * trained / (n if stage >= 1 else 1)
            gpu = weights + grads + (0 if offload else optim)
            memory.append(Memory(stage, offload, int(gpu + acts), int(optim + (4 * trained / n if offload else 0))))

    tokens_per_step = cfg.global_batch * s
    limit = int((gpu_memory_gb or cfg.cluster.gpu_memory_gb) * GIB) if cfg.cluster.use_gpu else None
    peak = peak_tflops or cfg.cluster.peak_tflops or (H100_TFLOPS if cfg.cluster.use_gpu else None)
    step_s = flops_per_token * tokens_per_step / (n * peak * 1e12 * mfu) if peak else None
    return Plan(
        params,
        count_params(mc),
        flops_per_token,
        tokens_per_step,
        int(acts),
        memory,
        limit,
        step_s,
        step_s * t.max_steps if step_s else None,
        peak,
    )


@dataclass
class Scaling:
    gpus: int
    stage: int
    accum: int  # micro batches per GPU per step
    comm_bytes: int  # sent by each GPU per optimizer step
    comm_s: float
    compute_s: float
    tokens_per_step: int

    @property
    def tokens_per_s(self) -> tuple[float, float]:
        """(no overlap, full overlap) of communication with compute, for the whole job."""
        return (
            self.tokens_per_step / (self.compute_s + self.comm_s),
            self.tokens_per_step / max(self.compute_s, self.comm_s),
        )


def comm_bytes(trained: int, stage: int, gpus: int, accum: int, value_bytes: int = 2) -> int:
    """Bytes each GPU sends per optimizer step (ring collectives; the module docstring)."""
    r = (gpus - 1) / gpus
    rounds = {0: 2, 1: 2, 2: accum + 1, 3: 3 * accum}[stage]
    return int(rounds * r * trained * value_bytes)


def scaling(cfg: JobConfig, mfu: float, gpus: int, stage: int, peak_tflops: float | None = None) -> Scaling:
    """The step of `cfg`'s global batch on `gpus` GPUs at ZeRO `stage`, each GPU computing at
    `mfu` of its peak (a measured single-GPU MFU), from the bytes that stage communicates."""
    t, s = cfg.train, cfg.data.seq_len
    trained = trained_params(cfg)
    per_gpu = max(1, cfg.global_batch // gpus)  # sequences per GPU per step
    accum = -(-per_gpu // t.micro_batch_size)
    tokens = per_gpu * gpus * s
    peak = (peak_tflops or cfg.cluster.peak_tflops or H100_TFLOPS) * 1e12
    compute = perf.flops_per_token(cfg.model, s, t.lora) * per_gpu * s / (peak * mfu)
    sent = comm_bytes(trained, stage, gpus, accum)
    link = NVLINK_BYTES_S if gpus <= GPUS_PER_NODE else NIC_BYTES_S
    return Scaling(gpus, stage, accum, sent, sent / link, compute, tokens)


def render_scaling(cfg: JobConfig, mfu: float, peak_tflops: float | None = None) -> list[str]:
    lines = [
        f"  scaling at {mfu:.0%} MFU per GPU (global batch {cfg.global_batch}; ring collectives of bf16; NVLink "
        f"{NVLINK_BYTES_S / 1e9:.0f} GB/s each way in a node of {GPUS_PER_NODE}, {NIC_BYTES_S * 8 / 1e9:.0f} Gb/s "
        "per GPU between nodes)",
        "    GPUs  ZeRO  micro batches  sent/GPU/step  comm s   compute s  tokens/s (none .. all overlapped)",
    ]
    for gpus in sorted({*SCALING_GPUS, cfg.cluster.num_workers}):
        for stage in (1, 2, 3):
            sc = scaling(cfg, mfu, gpus, stage, peak_tflops)
            slow, fast = sc.tokens_per_s
            lines.append(
                f"    {gpus:>4}  {stage:>4}  {sc.accum:>13}  {sc.comm_bytes / 1e9:>10.2f} GB  {sc.comm_s:>6.3f}  "
                f"{sc.compute_s:>9.3f}  {slow:>12,.0f} .. {fast:,.0f}"
            )
    return lines


def _gb(n: int) -> str:
    return f"{n / GIB:,.2f} GiB"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.2f} s"
    h, rest = divmod(int(seconds), 3600)
    d, h = divmod(h, 24)
    return (f"{d}d " if d else "") + f"{h}h{rest // 60:02d}m"


def render_parametrization(cfg: JobConfig) -> list[str]:
    """The parametrization, its multipliers and each optimizer group's peak lr, weight decay and eps."""
    from trainer.parametrization import Rules

    mc, t = cfg.model, cfg.train
    rules = Rules.of(mc)
    head = f"  parametrization     {mc.parametrization}"
    if not rules.standard:
        base = f"base {mc.base_width or mc.d_model} wide" + (
            f" x {mc.base_depth or mc.n_layer} deep" if mc.parametrization == "completep" else ""
        )
        scale = rules.attention_scale(mc.head_dim)
        head += (
            f" ({base}: width x{rules.width_mult:g}, depth x{rules.depth_mult:g}; branches x{rules.residual_scale:.4g}, "
            f"logits x{rules.output_mult:.4g}, attention 1/{round(1 / scale)})"
        )
    lines = [head, "    group              peak lr     weight decay  eps"]
    for kind, g in rules.describe(t.lr, t.weight_decay, t.eps):
        if kind == "head" and mc.tie_embeddings:
            continue  # the tied head is the embedding, in its group
        lines.append(f"    {kind:<18} {g['lr']:<11.4g} {g['weight_decay']:<13.4g} {g['eps']:.4g}")
    return lines


def render(cfg: JobConfig, p: Plan, mfu: float) -> str:
    c, t = cfg.cluster, cfg.train
    where = f"{c.num_workers} GPUs of {_gb(p.limit_bytes)}" if p.limit_bytes else f"{c.num_workers} CPU workers"
    lines = [
        f"plan for '{cfg.name}' on {where}, {t.precision}, ZeRO-{t.zero_stage}"
        + (" + offload" if t.offload_optimizer else ""),
        f"  parameters          {p.params:,} ({p.non_embedding:,} without embeddings)",
        *(
            [
                f"  LoRA adapters       {perf.lora_params(cfg.model, t.lora):,} trained (rank {t.lora.rank}), the rest frozen"
            ]
            if t.lora is not None
            else []
        ),
        f"  FLOPs per token     {p.flops_per_token:,} ("
        + ("4 x frozen + 6 x adapter parameters" if t.lora is not None else "6 x matmul parameters")
        + " + attention, training)",
        f"  tokens per step     {p.tokens_per_step:,} ({cfg.global_batch} sequences x {cfg.data.seq_len})",
        *render_parametrization(cfg),
        f"  activations         {_gb(p.activation_bytes)} per worker (micro batch {t.micro_batch_size}"
        + (", activation checkpointing)" if cfg.model.activation_checkpointing else ")"),
        "  memory per worker   model states + activations" + (" (fits?)" if p.limit_bytes else ""),
    ]
    for m in p.memory:
        mark = ("fits" if p.fits(m.stage, m.offload) else "too big") if p.limit_bytes else ""
        chosen = " <- this job" if (m.stage, m.offload) == (t.zero_stage, t.offload_optimizer) else ""
        cpu = f" + {_gb(m.cpu_bytes)} CPU" if m.offload else ""
        lines.append(
            f"    ZeRO-{m.stage}{' + offload' if m.offload else '':<10} {_gb(m.gpu_bytes):>12}{cpu:<18} {mark}{chosen}"
        )
    if p.step_seconds is not None:
        lines.append(
            f"  time at {mfu:.0%} MFU     {_duration(p.step_seconds)} per step, {_duration(p.run_seconds)} for "
            f"{t.max_steps:,} steps ({p.tokens_per_step * t.max_steps / 1e9:,.2f}B tokens)"
        )
    if cfg.cluster.use_gpu:
        lines += render_scaling(cfg, mfu, p.peak_tflops)
    if p.limit_bytes:
        best = p.smallest_fit()
        if best is None:
            lines.append(
                "  verdict: does not fit at any ZeRO stage: lower train.micro_batch_size, turn on "
                "model.activation_checkpointing or add GPUs"
            )
        else:
            lines.append(
                f"  verdict: the smallest ZeRO stage that fits is ZeRO-{best.stage}"
                + (" with offload" if best.offload else "")
            )
    return "\n".join(lines)


def fit_warning(cfg: JobConfig) -> str | None:
    """A warning when a GPU job's own ZeRO stage cannot fit the declared GPU memory."""
    if not cfg.cluster.use_gpu:
        return None
    p = make_plan(cfg, mfu=0.4)
    if p.fits(cfg.train.zero_stage, cfg.train.offload_optimizer):
        return None
    need = next(m for m in p.memory if (m.stage, m.offload) == (cfg.train.zero_stage, cfg.train.offload_optimizer))
    best = p.smallest_fit()
    advice = (
        f"ZeRO-{best.stage}{' with train.offload_optimizer' if best.offload else ''} fits"
        if best
        else "lower train.micro_batch_size or turn on model.activation_checkpointing"
    )
    return (
        f"this job needs about {_gb(need.gpu_bytes)} per GPU at ZeRO-{cfg.train.zero_stage} but cluster.gpu_memory_gb is "
        f"{cfg.cluster.gpu_memory_gb:g}: {advice} (see `trainctl plan`)"
    )
