"""Run under torchrun with 2 processes: the same model and batches through DeepSpeed ZeRO
stages 0-3 (fp32, gloo), writing each stage's loss curve to argv[1] (rank 0), and at stages
0, 2 and 3 one step on packed chat rows: its gradients against a plain module's."""

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


def layout(i: int, j: int) -> list[tuple[int, int, bool]]:
    """Row j of micro batch i: its examples as (length, prompt length, padding), 33 tokens in
    all, three examples (or two and padding) of lengths and prompts that differ by row."""
    first, second = 7 + 2 * i + j, 9 + i
    return [
        (first, 2 + i, False),
        (second, 3 + j, False),
        (33 - first - second, 2 + (i + j) % 3, i % 2 == 1 and j == 1),
    ]


def flagged_batches(rank: int) -> tuple[list[torch.Tensor], list[torch.Tensor], list[tuple]]:
    """4 micro batches of 2 x 33 chat-like rows, several examples packed in each row, every
    micro batch training another number of targets: (this rank's 2, all 4, and for each of
    the 4 its inputs, targets and example numbers worked out here from the layout, not by
    trainer.targets)."""
    gen = torch.Generator().manual_seed(99)
    out, plain = [], []
    for i in range(4):  # rank r takes micro batches 2r and 2r + 1
        rows = torch.randint(0, 64, (2, 33), generator=gen)
        flags = torch.zeros_like(rows)
        trained = torch.zeros(2, 33, dtype=torch.bool)  # token k is a trained target
        example = torch.zeros(2, 33, dtype=torch.long)
        for j in range(2):
            at = 0
            for n, (length, prompt, pad) in enumerate(layout(i, j)):
                example[j, at : at + length] = n
                if pad:
                    flags[j, at : at + length] = FLAGS["pad"]
                else:
                    flags[j, at : at + prompt] = FLAGS["prompt"]
                    trained[j, at + prompt : at + length] = True
                flags[j, at] |= FLAGS["start"]
                trained[j, at] = False  # an example's first token is no one's target
                at += length
        out.append(rows | (flags << FLAGS["shift"]))
        plain.append((rows[:, :-1], rows[:, 1:].masked_fill(~trained[:, 1:], -100), example[:, :-1]))
    return out[2 * rank : 2 * rank + 2], out, plain


def plain_gradients(model: torch.nn.Module, batches: list[tuple]) -> tuple[float, dict]:
    """The reference: the mean cross-entropy over every trained target of the step, in one
    plain module without DeepSpeed, each example attending only to itself and causally."""
    total, count = 0.0, 0
    for idx, tgt, example in batches:
        T = idx.shape[1]
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        mask = (example[:, :, None] == example[:, None, :]) & causal
        cos, sin = model.rope_cos[:T], model.rope_sin[:T]
        x = model.tok_emb(idx)
        for block in model.blocks:
            x = block(x, cos, sin, mask[:, None])
        assert model.output_mult == 1.0  # standard parametrization: no multiplier before the head
        logits = model.lm_head(model.norm(x))
        total = total + torch.nn.functional.cross_entropy(logits.flatten(0, 1), tgt.flatten(), reduction="sum")
        count += int((tgt != -100).sum())
    loss = total / count
    loss.backward()
    return loss.item(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def flagged_step(cfg, stage: int) -> dict:
    """One step on packed chat rows through DeepSpeed at `stage`: its loss and each
    parameter's whole gradient (gathered from the ranks' partitions at ZeRO-1/2/3) against
    the plain reference's."""
    from deepspeed.utils import safe_get_full_grad

    rank = dist.get_rank()
    torch.manual_seed(0)
    engine = build_engine(Transformer(cfg.model), cfg)
    mine, _, reference = flagged_batches(rank)
    named = list(engine.module.named_parameters())
    seen = {}
    step = engine.optimizer.step

    def record(*args, **kwargs):  # the averaged gradients, as the optimizer is about to use them
        if stage == 0:
            seen.update({n: p.grad.detach().clone() for n, p in named})
        else:
            seen.update({n: safe_get_full_grad(p).detach().clone() for n, p in named})  # collective at ZeRO-3
        return step(*args, **kwargs)

    engine.optimizer.step = record
    loss = torch.tensor([train_step(engine, iter(mine), 2, torch.device("cpu"), Targets(flags=FLAGS, segments=True))])
    dist.all_reduce(loss)
    torch.manual_seed(0)
    ref_loss, ref = plain_gradients(Transformer(cfg.model), reference)
    assert set(seen) == set(ref), (sorted(seen), sorted(ref))
    errors = {n: ((seen[n].double() - ref[n].double()).abs().max() / ref[n].double().abs().max()).item() for n in ref}
    return {
        "loss": loss.item() / dist.get_world_size(),
        "ref_loss": ref_loss,
        "grad_error": max(errors.values()),  # the worst parameter's max difference, relative to its largest gradient
        "worst": max(errors, key=errors.get),
        "params": len(ref),
        "zero_grads": sum(int(not ref[n].any()) for n in ref),
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
        if stage in (0, 2, 3) and not completep:  # unclipped, so the gradient's norm is the step's own
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
