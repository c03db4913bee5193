"""Tokens/s the stream delivers to one rank from local token shards, side by side with a
raw read of the same bytes and a plain webdataset loop over the same shards, in one run.

    python benchmarks/data_throughput.py [--tokens 40000000] [--seq-len 1024] [--batch 8] [--sample-tokens 8192] [--shard-mb 16]

Prepares a token dataset from the Python standard library's source (repeated until it
holds --tokens tokens) in a temporary folder, then times the readers over it, each twice,
interleaved: a raw read of the shard files, a plain webdataset loop, the trainctl stream
in this process and through one DataLoader worker process. Prints tokens/s for each and
the ratios last.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from data_pipeline import Loader, TokenStream, prepare  # noqa: E402
from data_pipeline.resolve import stdlib_files  # noqa: E402


def make_dataset(root: Path, tokens: int, sample_tokens: int, shard_mb: float) -> str:
    files, size, inputs = stdlib_files(), 0, []
    while size < tokens:  # byte tokenizer: one token per byte
        for f in files:
            inputs.append(f)
            size += os.path.getsize(f)
            if size >= tokens:
                break
    # prepare takes each path once; link repeats under new names so every copy counts
    for i, f in enumerate(inputs):
        link = root / "src" / f"{i:06d}.py"
        link.parent.mkdir(exist_ok=True)
        os.symlink(f, link)
    prepare(
        [str(root / "src")],
        str(root / "data"),
        val_fraction=0.0,
        shard_size_bytes=int(shard_mb * 2**20),
        sample_tokens=sample_tokens,
    )
    return str(root / "data")


def raw_read(data: str, tokens: int) -> int:
    n = 0
    for shard in sorted(Path(data).glob("train-*.tar")):
        with open(shard, "rb") as f:
            while block := f.read(1 << 22):
                n += len(block) // 2
    return n


def plain_webdataset(data: str, tokens: int) -> int:
    import webdataset as wds

    urls = sorted(str(p) for p in Path(data).glob("train-*.tar"))
    n = 0
    for sample in wds.WebDataset(urls, shardshuffle=False):
        n += len(np.frombuffer(sample["tokens"], dtype=np.uint16))
    return n


def stream(data: str, tokens: int, seq_len: int, batch: int, workers: int) -> int:
    s = TokenStream(data, "train", seq_len, batch, 0, 1, seed=0, shuffle_buffer=8192)
    it, n = iter(Loader(s, workers)), 0
    for _ in range(s.steps_per_epoch):
        n += next(it).numel()
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=40_000_000)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--sample-tokens", type=int, default=8192, help="tokens per tar member (prepare's default)")
    ap.add_argument(
        "--shard-mb", type=float, default=16, help="shard size: several shards, so reading ahead can overlap"
    )
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = make_dataset(Path(tmp), args.tokens, args.sample_tokens, args.shard_mb)
        readers = {
            "raw read": lambda: raw_read(data, args.tokens),
            "plain webdataset": lambda: plain_webdataset(data, args.tokens),
            "trainctl stream": lambda: stream(data, args.tokens, args.seq_len, args.batch, 0),
            "trainctl, 1 worker": lambda: stream(data, args.tokens, args.seq_len, args.batch, 1),
        }
        best: dict[str, float] = {}
        for _ in range(2):  # interleaved rounds; keep each reader's best
            for name, fn in readers.items():
                t0 = time.perf_counter()
                n = fn()
                rate = n / (time.perf_counter() - t0)
                best[name] = max(best.get(name, 0.0), rate)
        print(
            f"{args.tokens:,} tokens in {args.shard_mb:g} MB shards, seq_len {args.seq_len}, micro batch {args.batch}"
        )
        for name, rate in best.items():
            print(f"  {name:<18} {rate / 1e6:8.1f} M tokens/s")
        fastest = max(best["trainctl stream"], best["trainctl, 1 worker"])
        print(
            f"stream (best of in-process and 1 worker) / raw read = {fastest / best['raw read']:.2f}; "
            f"stream / plain webdataset = {fastest / best['plain webdataset']:.2f}"
        )


if __name__ == "__main__":
    main()
