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

STEPS = 8


def main(out: str) -> None:
    curves = {}
    for stage in (0, 1, 2, 3):
        cfg = load_config(
            None,
            [
                f"train.zero_stage={stage}",
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
        gen = torch.Generator().manual_seed(1234 + rank)  # each rank its own batches, the same for every stage
        data = iter([torch.randint(0, 64, (2, 33), generator=gen) for _ in range(STEPS * 2)])
        losses = []
        for _ in range(STEPS):
            loss = torch.tensor([train_step(engine, data, 2, torch.device("cpu"))])
            dist.all_reduce(loss)
            losses.append(loss.item() / world)
        curves[stage] = losses
        del engine
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
