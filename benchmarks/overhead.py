"""trainctl's whole stack against a bare torch.distributed DDP loop: the same model, the same
batch, 2 gloo processes of one thread each; steady-state step time, interleaved in one run.

    python benchmarks/overhead.py [--rounds 2] [--steps 200]

- bare: `torch.multiprocessing` spawns 2 processes, gloo, `DistributedDataParallel` over
  trainctl's Transformer, torch AdamW, gradient clipping at 1.0, batches sliced from a
  random token tensor in memory. Step time: the mean over the steps after a warm-up.
- trainctl: `trainctl run configs/tiny-cpu.yaml` (a private Ray, 2 worker actors,
  DeepSpeed on gloo at `--zero-stage` (0, DDP's algorithm, by default; the config's 2 shards
  the gradients and optimizer state at the cost of a reduce-scatter and an all-gather), the webdataset token stream from the prepared stdlib corpus,
  metrics, background checkpoints at the end). Step time: the mean of metrics.jsonl's
  step_time_s over the log intervals after the first two.
Both use the tiny-cpu model (4 layers, width 128, 128 tokens) and micro batch 8 per rank.
Prints each measurement, then trainctl / bare (target <= 1.05).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

LAYERS, WIDTH, HEADS, SEQ, VOCAB, MICRO = 4, 128, 4, 128, 257, 8


def bare_worker(rank: int, world: int, port: int, steps: int, warmup: int, out: str) -> None:
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from trainer.model import ModelConfig, Transformer

    torch.set_num_threads(1)  # as a Ray worker with cpus_per_worker=1
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(1337)
    model = Transformer(ModelConfig(vocab_size=VOCAB, n_layer=LAYERS, n_head=HEADS, d_model=WIDTH, max_seq_len=SEQ))
    ddp = DDP(model)
    opt = torch.optim.AdamW(model.optim_groups(0.1), lr=2e-3, betas=(0.9, 0.99))
    data = torch.randint(0, VOCAB, (64, MICRO, SEQ + 1), generator=torch.Generator().manual_seed(rank))
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        batch = data[i % len(data)]
        _, loss = ddp(batch[:, :-1], batch[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss_t = torch.tensor([loss.item()])
        dist.all_reduce(loss_t)  # as trainctl (and any loop that logs a global loss) does every step
        times.append(time.perf_counter() - t0)
    if rank == 0:
        Path(out).write_text(json.dumps(statistics.mean(times[warmup:])))
    dist.destroy_process_group()


def bare(steps: int, warmup: int = 20) -> float:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        mp.spawn(bare_worker, args=(2, port, steps, warmup, f.name), nprocs=2, join=True)
        return json.loads(Path(f.name).read_text())


def trainctl(steps: int, folder: str, zero_stage: int) -> float:
    every = max(steps // 10, 1)
    cmd = [
        sys.executable,
        "-m",
        "launcher.cli",
        "run",
        str(REPO / "configs" / "tiny-cpu.yaml"),
        "name=overhead",
        f"checkpoint.storage_path={folder}",
        f"train.max_steps={steps}",
        f"train.log_every={every}",
        "train.sample_tokens=0",
        f"train.eval_every={steps}",
        "train.eval_sequences=32",
        "tracking.mode=disabled",
        f"checkpoint.every={steps}",
        f"train.zero_stage={zero_stage}",
        "--fresh",
        "--force",
    ]
    subprocess.run(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, check=True, capture_output=True)
    rows = [json.loads(line) for line in (Path(folder) / "overhead" / "metrics.jsonl").read_text().splitlines()]
    return statistics.mean([r["step_time_s"] for r in rows if "step_time_s" in r][2:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument(
        "--zero-stage",
        type=int,
        default=0,
        help="trainctl's ZeRO stage: 0 is DDP's algorithm (all-reduce the "
        "gradients, every rank steps the whole model); 1-3 shard state at the cost of more communication",
    )
    args = ap.parse_args()
    results: dict[str, list[float]] = {"bare": [], "trainctl": []}
    with tempfile.TemporaryDirectory() as folder:
        for r in range(args.rounds):
            for name, fn in (
                ("bare", lambda: bare(args.steps)),
                ("trainctl", lambda: trainctl(args.steps, folder, args.zero_stage)),
            ):
                results[name].append(fn())
                print(
                    f"round {r + 1}: {name:<8} {results[name][-1] * 1000:7.1f} ms per step "
                    f"({2 * MICRO * SEQ / results[name][-1]:,.0f} tokens/s)",
                    flush=True,
                )
    b, t = min(results["bare"]), min(results["trainctl"])
    print(
        f"best: bare {b * 1000:.1f} ms, trainctl (ZeRO-{args.zero_stage}) {t * 1000:.1f} ms per step; "
        f"trainctl / bare = {t / b:.3f} (target <= 1.05)"
    )


if __name__ == "__main__":
    main()
