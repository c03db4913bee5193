"""Checkpoint save and load speed next to the disk's raw write speed for the same bytes, in
one run.

    python benchmarks/checkpoint_io.py [--layers 8] [--width 512] [--zero-stage 2] [--dir /tmp]

Builds a DeepSpeed engine (one gloo process, CPU) for a model of the given size, takes one
training step so the Adam state exists, then times, interleaved and twice each (best kept):
- save, synchronous: trainctl's Saver with async_save off (DeepSpeed's files, our per-rank
  file, the completion marker; every file fsynced);
- save, background (the default): the time the training loop is blocked (the copy of the
  state into CPU memory) and the time until the checkpoint is complete;
- checkpoint.load into a fresh engine;
- raw write: the same number of bytes in 8 MB blocks, then fsync (dd conv=fsync style).
Prints MB/s for each and the ratios last.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def raw_write(path: Path, n_bytes: int) -> float:
    block = memoryview(os.urandom(8 << 20))  # slices without copies
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        left = n_bytes
        while left > 0:
            f.write(block[: min(left, len(block))])
            left -= len(block)
        f.flush()
        os.fsync(f.fileno())  # as every checkpoint file is
    seconds = time.perf_counter() - t0
    path.unlink()
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--zero-stage", type=int, default=2)
    ap.add_argument("--dir", default=tempfile.gettempdir(), help="where to write (the disk under test)")
    args = ap.parse_args()

    from trainer import checkpoint
    from trainer.config import JobConfig
    from trainer.engine import build_engine, import_deepspeed
    from trainer.loop import train_step
    from trainer.model import Transformer
    from trainer.saver import Saver

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    import_deepspeed(False).init_distributed(dist_backend="gloo")
    cfg = JobConfig.model_validate(
        {
            "model": {"n_layer": args.layers, "n_head": 8, "d_model": args.width, "max_seq_len": 64, "vocab_size": 257},
            "data": {"seq_len": 64},
            "train": {"micro_batch_size": 2, "zero_stage": args.zero_stage},
            "cluster": {"num_workers": 1},
        }
    )

    def engine():
        return build_engine(Transformer(cfg.model), cfg)

    e = engine()
    train_step(e, iter([torch.randint(0, 257, (2, 65))]), 1, torch.device("cpu"))
    params = sum(p.numel() for p in e.module.parameters())
    root = Path(tempfile.mkdtemp(dir=args.dir, prefix="trainctl-ckpt-bench-"))
    store = checkpoint.Store(root / "ckpts")
    meta = {"world_size": 1, "zero_stage": args.zero_stage}
    names = ["sync save", "async save", "async blocked", "load", "raw write"]
    best = dict.fromkeys(names, float("inf"))
    step = 0
    background = Saver(e, store, 0, keep=1, background=True)  # one per run, as in training: its copy buffers stay
    try:
        for _ in range(2):
            step += 1
            t0 = time.perf_counter()
            saved = Saver(e, store, 0, keep=1, background=False).save(step, {"step": step}, meta)
            best["sync save"] = min(best["sync save"], time.perf_counter() - t0)
            n_bytes = folder_bytes(saved)
            best["raw write"] = min(best["raw write"], raw_write(root / "raw.bin", n_bytes))

            step += 1
            t0 = time.perf_counter()
            background.save(step, {"step": step}, meta)
            best["async blocked"] = min(best["async blocked"], time.perf_counter() - t0)
            background.flush()
            best["async save"] = min(best["async save"], time.perf_counter() - t0)

            fresh = engine()
            t0 = time.perf_counter()
            checkpoint.load(fresh, store.latest(), 0)
            best["load"] = min(best["load"], time.perf_counter() - t0)
            del fresh
    finally:
        shutil.rmtree(root, ignore_errors=True)
    mb = n_bytes / 2**20
    print(f"model {params / 1e6:.1f}M parameters, ZeRO-{args.zero_stage}, checkpoint {mb:.0f} MB in {args.dir}")
    for name, seconds in best.items():
        print(f"  {name:<13} {seconds:6.2f} s  {mb / seconds:8.1f} MB/s")
    print(
        f"sync save / raw write speed = {best['raw write'] / best['sync save']:.2f}; "
        f"async save / raw write speed = {best['raw write'] / best['async save']:.2f}; "
        f"load / raw write speed = {best['raw write'] / best['load']:.2f}; "
        f"training blocked for {best['async blocked'] / best['async save']:.0%} of the background save"
    )


if __name__ == "__main__":
    main()
