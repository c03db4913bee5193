"""`trainctl coordcheck`: does the parametrization keep activations the same size as the
model grows? The standard way to see it (Yang et al., Tensor Programs V, section 7;
EleutherAI/nanoGPT-mup's `coord_check_shakespeare_char` and `completep_examples`).

Each shape (the job's model at each depth, or each width) is trained a few steps from the
same seed on the same batches, in this process, with the job's AdamW groups (its
parametrization's per-group learning rate, weight decay and eps) at a constant learning
rate and without clipping, so the update rule itself is what is seen. Forward hooks record,
per block and step, the RMS of the residual stream after the block, of each branch's output
(before the branch multiplier), and of the attention logits (q.k times the attention scale,
causal positions); and the RMS of the output logits. Step s is the forward pass after s
updates. A parametrization that transfers keeps each curve flat across shapes; the slope
of log RMS against log depth (or width) of the last block's residual stream at the last
step says how flat, in one number. With `seeds` > 1 the whole check runs from train.seed,
train.seed + 1, ... (each its initial weights and data order) and every figure is the mean
over them, as microsoft/mup's `get_coord_data(nseeds=...)` averages: one initialisation's 5
Adam steps move a slope by several hundredths.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from trainer.config import JobConfig
from trainer.model import Transformer, apply_rope
from trainer.model_config import ModelConfig

SERIES = ("residual", "attn", "mlp", "attn_logits")  # per block
DEFAULT_DEPTHS = (2, 4, 8, 16, 32, 64)


@dataclass
class Shape:
    """One trained shape's records: series -> [step][block] RMS, and the logits' RMS per step."""

    n_layer: int
    d_model: int
    per_block: dict[str, list[list[float]]] = field(default_factory=dict)
    logits: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)


def rms(x: torch.Tensor) -> float:
    return x.detach().float().pow(2).mean().sqrt().item()


def shapes_of(mc: ModelConfig, depths: list[int] | None, widths: list[int] | None) -> list[ModelConfig]:
    """The model configs to train: the job's model at each depth, or at each width (heads of
    the job's head_dim, d_ff scaled with the width when the job sets it). Under mup and
    completep a base the job leaves null is the job's own width (depth)."""
    base = mc.model_dump()
    if mc.parametrization != "standard":  # the job's own shape is the base the others scale from
        base["base_width"] = mc.base_width or mc.d_model
        if mc.parametrization == "completep":
            base["base_depth"] = mc.base_depth or mc.n_layer
    if depths:
        return [ModelConfig(**{**base, "n_layer": d}) for d in depths]
    out = []
    for w in widths:
        if w % mc.head_dim:
            raise ValueError(
                f"--widths {w}: not a multiple of the job's head_dim {mc.head_dim} (d_model / n_head): heads keep "
                "their size as the width grows"
            )
        d_ff = None if mc.d_ff is None else max(1, round(mc.d_ff * w / mc.d_model))
        kv = None if mc.n_kv_head is None else max(1, mc.n_kv_head * w // mc.d_model)
        out.append(ModelConfig(**{**base, "d_model": w, "n_head": w // mc.head_dim, "n_kv_head": kv, "d_ff": d_ff}))
    return out


def record(model: Transformer, steps_out: Shape) -> list:
    """Forward hooks appending each block's RMS figures for one forward pass into the
    shape's latest step; returns the handles."""
    hooks = []

    def on(series: str, b: int):
        def hook(module, args, output):
            steps_out.per_block[series][-1][b] = rms(output)

        return hook

    def on_attention(b: int):
        def hook(module, args, output):
            x, cos, sin = args[:3]
            B, T, _ = x.shape
            with torch.no_grad():
                q = module.wq(x).view(B, T, module.n_head, module.head_dim).transpose(1, 2)  # (B, H, T, D)
                k = module.wk(x).view(B, T, module.n_kv_head, module.head_dim).transpose(1, 2)  # (B, K, T, D)
                q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
                k = k.repeat_interleave(module.n_head // module.n_kv_head, dim=1)  # (B, H, T, D)
                scale = module.scale if module.scale is not None else 1 / math.sqrt(module.head_dim)
                logits = (q @ k.transpose(-2, -1)) * scale  # (B, H, T, T)
                causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()  # (T, T)
                steps_out.per_block["attn_logits"][-1][b] = rms(logits[..., causal])
            steps_out.per_block["attn"][-1][b] = rms(output)

        return hook

    for b, block in enumerate(model.blocks):
        hooks.append(block.register_forward_hook(on("residual", b)))
        hooks.append(block.attn.register_forward_hook(on_attention(b)))
        hooks.append(block.mlp.register_forward_hook(on("mlp", b)))
    return hooks


def train_shape(cfg: JobConfig, mc: ModelConfig, batches: list[torch.Tensor], targets) -> Shape:
    """`len(batches) - 1` AdamW steps of one shape, recording every forward pass."""
    t = cfg.train
    torch.manual_seed(t.seed)
    model = Transformer(mc)
    optimizer = torch.optim.AdamW(
        model.optim_groups(t.weight_decay, t.lr, t.eps), lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps
    )
    out = Shape(mc.n_layer, mc.d_model, {s: [] for s in SERIES})
    hooks = record(model, out)
    try:
        for i, batch in enumerate(batches):
            for series in SERIES:
                out.per_block[series].append([math.nan] * mc.n_layer)
            idx, tgt, segments = targets.split(batch)
            logits, loss = model(idx, tgt, segments)
            out.logits.append(rms(logits))
            out.losses.append(loss.item())
            if i == len(batches) - 1:
                break
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    finally:
        for h in hooks:
            h.remove()
    return out


def mean_of(runs: list[Shape]) -> Shape:
    """One shape's records averaged over its seeds' runs, figure by figure."""
    avg = lambda values: sum(values) / len(values)
    return Shape(
        runs[0].n_layer,
        runs[0].d_model,
        {
            series: [[avg(v) for v in zip(*steps)] for steps in zip(*(r.per_block[series] for r in runs))]
            for series in SERIES
        },
        [avg(v) for v in zip(*(r.logits for r in runs))],
        [avg(v) for v in zip(*(r.losses for r in runs))],
    )


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log(ys) against log(xs)."""
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def summary(shape: Shape, step: int) -> dict[str, float]:
    """One shape's figures at a step: the last block's residual RMS, the branches' and the
    attention logits' RMS averaged over blocks, the output logits' RMS."""
    blocks = shape.per_block
    mean = lambda series: sum(blocks[series][step]) / len(blocks[series][step])
    return {
        "residual": blocks["residual"][step][-1],
        "attn": mean("attn"),
        "mlp": mean("mlp"),
        "attn_logits": mean("attn_logits"),
        "logits": shape.logits[step],
    }


def run(cfg: JobConfig, depths: list[int] | None, widths: list[int] | None, steps: int, seeds: int = 1) -> dict:
    """Train every shape `steps` steps on the job's first batches, once per seed (train.seed,
    + 1, ...: its initial weights and its data order); returns the records (what
    coordcheck-*.json holds, means over the seeds) with the slope at the last step."""
    from trainer.build import build_stream, make_targets

    def batches_of(seed: int) -> tuple[list[torch.Tensor], object, JobConfig]:
        one = JobConfig.model_validate(
            {
                **cfg.model_dump(),
                "train": {**cfg.train.model_dump(), "grad_accum_steps": 1, "global_batch_size": None, "seed": seed},
                "cluster": {**cfg.cluster.model_dump(), "num_workers": 1},
            }
        )
        stream = build_stream(one, 0, 1)
        it = iter(stream)
        return [next(it) for _ in range(steps + 1)], make_targets(one, stream.manifest["tokenizer"]), one

    axis = "depth" if depths else "width"
    seeded = [batches_of(cfg.train.seed + i) for i in range(seeds)]  # each seed: its init and its data order
    shapes = [
        mean_of([train_shape(one, mc, batches, targets) for batches, targets, one in seeded])
        for mc in shapes_of(cfg.model, depths, widths)
    ]
    batches = seeded[0][0]
    xs = [s.n_layer if depths else s.d_model for s in shapes]
    last = [summary(s, steps) for s in shapes]
    return {
        "parametrization": cfg.model.parametrization,
        "base_width": shapes_of(cfg.model, depths, widths)[0].base_width,
        "base_depth": shapes_of(cfg.model, depths, widths)[0].base_depth,
        "axis": axis,
        "steps": steps,
        "seeds": seeds,
        "lr": cfg.train.lr,
        "tokens_per_step": int(batches[0].shape[0] * (batches[0].shape[1] - 1)),
        "slope": {k: slope(xs, [f[k] for f in last]) for k in last[0]},
        "shapes": [
            {"n_layer": s.n_layer, "d_model": s.d_model, "per_block": s.per_block, "logits": s.logits, "loss": s.losses}
            for s in shapes
        ],
    }


def table(result: dict) -> str:
    """The console table: the last block's residual RMS at every step for each shape, the
    last step's other figures, and the slopes."""
    axis, steps = result["axis"], result["steps"]
    shown = sorted({0, 1, steps // 2, steps}) if steps > 3 else list(range(steps + 1))
    head = (
        f"{axis:>6}  " + "  ".join(f"resid@{s:<3}" for s in shown) + "   attn      mlp       attn_lg   logits    loss"
    )
    lines = [
        f"coordcheck: {result['parametrization']}"
        + (
            f" (base width {result['base_width']}"
            + (f", depth {result['base_depth']})" if result["base_depth"] else ")")
            if result["parametrization"] != "standard"
            else ""
        )
        + f", lr {result['lr']:g}, {steps} steps of {result['tokens_per_step']:,} tokens"
        + (f", mean of {result['seeds']} seeds" if result.get("seeds", 1) > 1 else "")
        + "; RMS of the last block's "
        "residual stream at each step (resid@s), the last step's branch outputs, attention logits and logits",
        head,
    ]
    for s in result["shapes"]:
        x = s["n_layer"] if axis == "depth" else s["d_model"]
        shape = Shape(s["n_layer"], s["d_model"], s["per_block"], s["logits"])
        f = summary(shape, steps)
        lines.append(
            f"{x:>6}  "
            + "  ".join(f"{s['per_block']['residual'][i][-1]:<9.4g}" for i in shown)
            + f"   {f['attn']:<9.4g} {f['mlp']:<9.4g} {f['attn_logits']:<9.4g} {f['logits']:<9.4g} {s['loss'][-1]:.4f}"
        )
    sl = result["slope"]
    lines.append(
        f"slope of log RMS against log {axis} at step {steps}: residual {sl['residual']:+.3f}, attn {sl['attn']:+.3f}, "
        f"mlp {sl['mlp']:+.3f}, attention logits {sl['attn_logits']:+.3f}, logits {sl['logits']:+.3f}"
    )
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    """A PNG of the curves: each figure against depth (or width), one line per step, and the
    residual stream block by block at the last step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axis, steps, shapes = result["axis"], result["steps"], result["shapes"]
    xs = [s["n_layer"] if axis == "depth" else s["d_model"] for s in shapes]
    records = [
        [summary(Shape(s["n_layer"], s["d_model"], s["per_block"], s["logits"]), i) for s in shapes]
        for i in range(steps + 1)
    ]
    titles = {
        "residual": "residual stream (last block)",
        "attn": "attention branch output",
        "mlp": "MLP branch output",
        "attn_logits": "attention logits",
        "logits": "output logits",
    }
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    colors = plt.cm.viridis([i / max(steps, 1) for i in range(steps + 1)])
    for ax, key in zip(axes.flat, titles):
        for i in range(steps + 1):
            ax.plot(xs, [r[key] for r in records[i]], marker="o", color=colors[i], label=f"step {i}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(axis)
        ax.set_title(f"{titles[key]} (slope {result['slope'][key]:+.2f})")
        ax.set_ylabel("RMS")
    axes.flat[0].legend(fontsize=8)
    ax = axes.flat[5]
    cmap = plt.cm.plasma
    for j, s in enumerate(shapes):
        resid = s["per_block"]["residual"][steps]
        ax.plot(
            [(b + 1) / len(resid) for b in range(len(resid))],
            resid,
            color=cmap(j / max(len(shapes) - 1, 1)),
            label=f"{axis} {xs[j]}",
        )
    ax.set_yscale("log")
    ax.set_xlabel("block / depth")
    ax.set_title(f"residual stream by block, step {steps}")
    ax.legend(fontsize=8)
    fig.suptitle(
        f"coordinate check: {result['parametrization']}, lr {result['lr']:g}, {steps} steps (RMS of activations"
        + (f", mean of {result['seeds']} seeds)" if result.get("seeds", 1) > 1 else ")")
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write(result: dict, folder: Path) -> tuple[Path, Path]:
    """coordcheck-PARAMETRIZATION-AXIS.json and .png in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    stem = folder / f"coordcheck-{result['parametrization']}-{result['axis']}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    plot(result, stem.with_suffix(".png"))
    return stem.with_suffix(".json"), stem.with_suffix(".png")
