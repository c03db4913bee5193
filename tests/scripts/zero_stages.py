"""Run under torchrun with 2 processes: the same model and batches through DeepSpeed ZeRO
stages 0-3 (fp32, gloo), writing each stage's loss curve to argv[1] (rank 0)."""

import json
import os
import sys

import torch
import torch.distributed as dist

from launcher.config import load_config
from trainer.build import setup_distributed
from trainer.engine import build_engine
from trainer.loop import train_step
from trainer.model import Transformer
from trainer.targets import Targets

STEPS = 8
FLAGS = {"shift": 24, "prompt": 1, "start": 2, "pad": 4}


def flagged_batches(rank: int) -> list[torch.Tensor]:
    """2 micro batches (2 x 33) of chat-like rows: a prompt of a different length in each, so
    every micro batch of every rank trains another number of targets."""
    gen = torch.Generator().manual_seed(99)
    out = []
    for i in range(4):  # rank r takes micro batches 2r and 2r + 1
        rows = torch.randint(0, 64, (2, 33), generator=gen)
        flags = torch.zeros_like(rows)
        flags[:, : 3 + 7 * i] = FLAGS["prompt"]
        flags[:, 0] |= FLAGS["start"]
        out.append(rows | (flags << FLAGS["shift"]))
    return out[2 * rank : 2 * rank + 2], out


def flagged_step(cfg, stage: int) -> dict:
    """One step on flagged rows through DeepSpeed at `stage`, against the gradient of the mean
    over every trained target of the step computed in one plain model."""
    rank = dist.get_rank()
    torch.manual_seed(0)
    engine = build_engine(Transformer(cfg.model), cfg)
    mine, every = flagged_batches(rank)
    targets = Targets(flags=FLAGS, segments=True)
    seen = {}
    if stage == 0:  # the averaged gradients are the params' .grad when the optimizer steps
        step = engine.optimizer.step

        def record(*args, **kwargs):
            grads = [p.grad.double() for g in engine.optimizer.param_groups for p in g["params"]]
            seen["norm"] = torch.sqrt(sum((g**2).sum() for g in grads)).item()
            return step(*args, **kwargs)

        engine.optimizer.step = record
    loss = torch.tensor([train_step(engine, iter(mine), 2, torch.device("cpu"), targets)])
    dist.all_reduce(loss)
    norm = seen["norm"] if stage == 0 else float(engine.get_global_grad_norm())
    torch.manual_seed(0)
    plain = Transformer(cfg.model)
    total, count = 0.0, 0
    for batch in every:
        idx, tgt, seg = targets.split(batch)
        _, s = plain(idx, tgt, seg, reduction="sum")
        total, count = total + s, count + int((tgt != -100).sum())
    (total / count).backward()
    ref = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in plain.parameters())).item()
    return {
        "loss": loss.item() / dist.get_world_size(),
        "ref_loss": (total / count).item(),
        "norm": norm,
        "ref_norm": ref,
    }


def partitioned_load(folder: str) -> dict:
    """A Hugging Face folder loaded under ZeRO-3's zero.Init on 2 ranks: each rank holds half
    of each weight, and gathered they equal the plain load's."""
    import deepspeed
    from transformers import LlamaConfig, LlamaForCausalLM

    from trainer import hf
    from trainer.engine import deepspeed_config
    from trainer.model_config import ModelConfig

    if dist.get_rank() == 0:
        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True,
        )  # fmt: skip
        LlamaForCausalLM(config).save_pretrained(folder)
    dist.barrier()
    fields = hf.model_fields(hf.hf_config(folder))
    mc = ModelConfig(**fields)
    cfg = load_config(None, ["train.zero_stage=3", "cluster.num_workers=2", "model.vocab_size=64"])
    model = hf.load_model_partitioned(mc, folder, deepspeed_config(cfg))
    plain = dict(hf.load_model(mc, folder).named_parameters())
    halves = all(p.ds_tensor.numel() * 2 >= p.ds_numel > p.ds_tensor.numel() for p in model.parameters())
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        equal = all(torch.equal(p.data, plain[n].data) for n, p in model.named_parameters())
    return {"halves": halves, "equal": equal, "tied": model.lm_head.weight is model.tok_emb.weight}


# completep on a base half as wide and half as deep: every group its own lr, weight decay and eps
COMPLETEP = ["model.parametrization=completep", "model.base_width=32", "model.base_depth=1"]


def main(out: str) -> None:
    curves = {}
    for stage in (*(0, 1, 2, 3), *(f"completep{s}" for s in (0, 1, 2, 3))):
        completep = isinstance(stage, str)
        cfg = load_config(
            None,
            [
                *(COMPLETEP if completep else []),
                f"train.zero_stage={int(str(stage)[-1])}",
                "cluster.num_workers=2",
                "train.micro_batch_size=2",
                "train.grad_accum_steps=2",
                "model.n_layer=2",
                "model.d_model=64",
                "model.max_seq_len=32",
                "data.seq_len=32",
                "train.warmup_steps=2",
                f"train.max_steps={STEPS}",
                "train.lr=3e-3",
            ],
        )
        rank, world, _ = setup_distributed(cfg)
        torch.manual_seed(0)
        engine = build_engine(Transformer(cfg.model), cfg)
        if completep:  # what the optimizer holds, as DeepSpeed built it at this stage
            groups = getattr(engine.optimizer, "optimizer", engine.optimizer).param_groups  # ZeRO's inner AdamW
            # ZeRO-3 puts its flat fp32 partitions into the groups only while it steps
            flat = getattr(engine.optimizer, "fp32_partitioned_groups_flat", None)
            sizes = [t.numel() for t in flat] if flat else [sum(p.numel() for p in g["params"]) for g in groups]
            curves[f"groups_{stage}"] = [
                [g.get("name"), g["lr"], g["eps"], g["weight_decay"], n] for g, n in zip(groups, sizes)
            ]
        gen = torch.Generator().manual_seed(1234 + rank)  # each rank its own batches, the same for every stage
        data = iter([torch.randint(0, 64, (2, 33), generator=gen) for _ in range(STEPS * 2)])
        losses = []
        for _ in range(STEPS):
            loss = torch.tensor([train_step(engine, data, 2, torch.device("cpu"))])
            dist.all_reduce(loss)
            losses.append(loss.item() / world)
        curves[stage] = losses
        del engine
        if stage in (0, 2) and not completep:  # unclipped, so the gradient's norm is the step's own
            curves[f"flagged{stage}"] = flagged_step(
                cfg.model_copy(update={"train": cfg.train.model_copy(update={"grad_clip": 0.0})}), stage
            )
    curves["partitioned_load"] = partitioned_load(os.path.join(os.path.dirname(out), "llama"))
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(curves, f)


if __name__ == "__main__":
    main(sys.argv[1])
    # After ZeRO-3, interpreter teardown sometimes aborts ("terminate called without an
    # active exception") in a C++ thread; the results are written, so leave without it.
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
