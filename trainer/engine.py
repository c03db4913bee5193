"""The one seam to DeepSpeed: our config → DeepSpeed's config (pure), and the one call
to `deepspeed.initialize`.

Precision, ZeRO stage, offload, accumulation and clipping are DeepSpeed's job; the
learning-rate schedule is ours (linear warm-up, cosine decay to min_lr, as nanoGPT) so
that it is one pure function, the same on every backend, and saved in every checkpoint
through the scheduler DeepSpeed holds. It multiplies each optimizer group's own peak
learning rate (mup and completep give groups their own: trainer/parametrization.py).
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any

import torch

from trainer import patches
from trainer.config import JobConfig


def deepspeed_config(cfg: JobConfig) -> dict[str, Any]:
    """DeepSpeed's config dict for a job. Pure: no DeepSpeed import, no side effects."""
    t = cfg.train
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": cfg.accum_steps,
        "train_batch_size": cfg.global_batch,
        "gradient_clipping": t.grad_clip,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": t.lr,
                "betas": [t.beta1, t.beta2],
                "eps": t.eps,
                "weight_decay": t.weight_decay,
                # DeepSpeed's CPU FusedAdam rounds differently with the memory layout, so a resumed
                # run drifts from the uninterrupted one by an ulp; torch's AdamW resumes bit for bit.
                # On GPUs the fused kernel is kept.
                "torch_adam": not cfg.cluster.use_gpu,
            },
        },
        "zero_optimization": {"stage": t.zero_stage},
        "bf16": {"enabled": t.precision == "bf16"},
        "fp16": {"enabled": t.precision == "fp16"},
        # Our loop prints and logs; DeepSpeed's own step prints would interleave with it.
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if t.precision == "bf16":
        # bf16 gradients summed over micro batches lose bits; accumulate in fp32. The key
        # must sit under data_types: a top-level grad_accum_dtype is silently ignored.
        ds["data_types"] = {"grad_accum_dtype": "fp32"}
    if t.precision == "fp16":
        ds["fp16"].update(
            {
                "loss_scale": 0,
                "initial_scale_power": 16,
                "loss_scale_window": 1000,
                "hysteresis": 2,
                "min_loss_scale": 1,
            }
        )
    if cfg.cluster.use_gpu and t.zero_stage >= 1:
        # Overlap the gradient reduction with the backward pass, in contiguous buffers; 200M-element
        # buckets (DeepSpeed's ZeRO-3 defaults are 5e8/1e6 and tuned for large models on many nodes).
        ds["zero_optimization"].update(
            {
                "overlap_comm": True,
                "contiguous_gradients": True,
                "reduce_bucket_size": int(2e8),
                "allgather_bucket_size": int(2e8),
            }
        )
        if t.zero_stage == 3:
            ds["zero_optimization"].update(
                {"stage3_prefetch_bucket_size": int(5e7), "stage3_param_persistence_threshold": int(1e5)}
            )
    if t.offload_optimizer:
        ds["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": cfg.cluster.use_gpu}
    return ds


def lr_factor(step: int, cfg: JobConfig) -> float:
    """Multiplier of train.lr at optimizer step `step` (0-based): linear warm-up over
    warmup_steps, cosine decay to min_lr by lr_decay_steps, then min_lr."""
    t = cfg.train
    decay_steps = t.lr_decay_steps or t.max_steps
    if step < t.warmup_steps:
        return (step + 1) / (t.warmup_steps + 1)
    if step >= decay_steps:
        return t.min_lr / t.lr
    progress = (step - t.warmup_steps) / max(1, decay_steps - t.warmup_steps)
    coeff = 0.5 * (1.0 + math.cos(math.pi * progress))
    return (t.min_lr + coeff * (t.lr - t.min_lr)) / t.lr


def import_deepspeed(use_gpu: bool, verbose: bool = False):
    """Import DeepSpeed with the right accelerator. DS_ACCELERATOR is read once, at the
    first import, so it must be set before anything imports deepspeed."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if use_gpu else "cpu")
    import deepspeed
    import deepspeed.ops  # noqa: F401 - the op table patches.skip_deepspeed_shm_op edits
    from deepspeed.utils import logger

    if not use_gpu:
        patches.skip_deepspeed_shm_op(deepspeed)  # a ~30 s compile of an op only its inference uses

    if not verbose:
        logger.setLevel(logging.WARNING)  # its INFO lines (config dumps, timers) only with --verbose
    return deepspeed


def build_engine(model: torch.nn.Module, cfg: JobConfig, universal: bool = False):
    """Wrap `model` in a DeepSpeed engine (the distributed group must already exist).
    `universal`: it will load a universal checkpoint (one written by another number of ranks)."""
    deepspeed = import_deepspeed(cfg.cluster.use_gpu, cfg.tracking.verbose)
    t = cfg.train
    groups = model.optim_groups(t.weight_decay, t.lr, t.eps)  # per group under mup / completep
    if cfg.train.compile:
        model.compile()  # in place: the state dict's keys (and so checkpoints) stay those of the plain model

    def scheduler(optimizer):
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg))

    config = deepspeed_config(cfg)
    if universal:
        config["checkpoint"] = {"load_universal": True}
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=config, lr_scheduler=scheduler)
    return engine
