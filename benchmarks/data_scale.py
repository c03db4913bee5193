"""What each rank reads, at W = 1, 8, 64 and 512 ranks of one global order: bytes read per
byte of tokens the rank trains on, requests per GB, memory held for data in flight, and
how well a global batch mixes the corpus.

    python benchmarks/data_scale.py [--worlds 1,8,64,512] [--workers 1] [--lanes 512] [--min-mb 512]

A real HTTP server on 127.0.0.1 (Range requests, as S3 and nginx serve them) counts the
bytes and requests of each simulated rank (each reads through its own URL prefix). The
corpus is 2,048 shards of 63 MB, 126 GB in all: one real shard of random GPT-2-sized
tokens, prepared by trainctl's own ShardWriter in 3.5 MB checksummed chunks, served under
every shard name (the manifest lists the same chunks and checksums for each). Global
batch 1,024 sequences of 2,048 tokens; no model: the rank's Loader (with --workers
DataLoader processes) is drained step by step until the rank has consumed at least
--min-mb and, below 512 ranks, 30 times what its lanes read beyond their needs at the start
(each lane begins partway into a chunk and must read all of it to check it).

Sampled ranks: 0 at W=1; 0 and W-1 at 8 and 64; 0, 170, 341, 511 at 512. Before this
change every rank read the whole stream: bytes read / consumed = W.
"""

from __future__ import annotations

import argparse
import collections
import http.server
import json
import os
import re
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_pipeline.lanes import TokenStream  # noqa: E402
from data_pipeline.layout import Layout  # noqa: E402
from data_pipeline.loader import Loader  # noqa: E402
from data_pipeline.shards import ShardWriter  # noqa: E402

SEQ, GLOBAL, SHARDS, SHARD_MB, CHUNK_MB = 2048, 1024, 2048, 63, 3.5


class Server(http.server.SimpleHTTPRequestHandler):
    """/<client>/train-NNNNNN.tar: the one real shard, with Range; counts per client."""

    shard = ""
    manifest = b""
    sent: collections.Counter = collections.Counter()
    requests: collections.Counter = collections.Counter()
    lock = threading.Lock()

    def log_message(self, *args):
        pass

    def do_GET(self):
        client, _, name = self.path.lstrip("/").partition("/")
        if name == "manifest.json":
            body, status = self.manifest, 200
        else:
            start, end = map(int, re.fullmatch(r"bytes=(\d+)-(\d+)", self.headers["Range"]).groups())
            with open(self.shard, "rb") as f:
                f.seek(start)
                body, status = f.read(end - start + 1), 206
        with self.lock:
            self.sent[client] += len(body)
            self.requests[client] += 1
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def make_corpus(folder: str) -> dict:
    """One 63 MB shard of random tokens in 3.5 MB chunks, and a manifest naming it SHARDS times."""
    rng = np.random.default_rng(0)
    writer = ShardWriter(folder, "train", SHARD_MB << 20, chunk_bytes=int(CHUNK_MB * 2**20))
    per_member = 8192
    for _ in range((SHARD_MB << 20) // (2 * per_member + 512) - 8):
        writer.write(rng.integers(0, 50257, per_member, dtype=np.uint16))
    one = writer.finish()["shards"][0]
    Server.shard = os.path.join(folder, one["path"])
    shards = [{**one, "path": f"train-{i:06d}.tar"} for i in range(SHARDS)]
    tokens = one["tokens"] * SHARDS
    return {
        "format": "trainctl.tokens/1",
        "name": "synthetic",
        "tokenizer": {"name": "bpe", "vocab_size": 50257},
        "dtype": "uint16",
        "splits": {"train": {"shards": shards, "tokens": tokens, "samples": one["samples"] * SHARDS}},
    }


def drain(url: str, world: int, rank: int, workers: int, lanes: int, min_bytes: int) -> dict:
    """Run one rank's loader until it has consumed enough; its reads as the server counted them."""
    rows = GLOBAL // world
    client = f"r{world}-{rank}-w{workers}"  # the server counts per client: one per run
    stream = TokenStream(f"{url}/{client}", "train", SEQ, rows, rank, world, seed=1, lanes=lanes)
    lanes_here = len({lane for lane, _, _ in stream.runs})
    target = max(min_bytes, int(30 * lanes_here * CHUNK_MB * 2**20 / 2) if world < 512 else 0)
    step_bytes = rows * (SEQ + 1) * 2
    loader = Loader(stream, workers, group=max(min((4 << 20) // (rows * (SEQ + 1) * 8), 64), 1))
    t0, steps, peak, total, half = time.perf_counter(), 0, 0, 0, None
    it = iter(loader)
    while steps * step_bytes < target:
        next(it)
        steps += 1
        peak, total = max(peak, loader.held_bytes), total + loader.held_bytes
        if half is None and steps * step_bytes >= target // 2:
            half = (steps, Server.sent[client], Server.requests[client])
    del it
    seconds = time.perf_counter() - t0
    consumed = steps * step_bytes
    # Rounds queued from the workers (uint16) and the step handed out (int64).
    in_flight = loader.prefetch_factor * max(workers, 1) * loader.group * rows * (SEQ + 1) * 2 + step_bytes * 4
    late = (consumed - half[0] * step_bytes, Server.sent[client] - half[1], Server.requests[client] - half[2])
    return {
        "steps": steps,
        "consumed": consumed,
        "read": Server.sent[client],
        "requests": Server.requests[client],
        "late_ratio": late[1] / late[0],
        "late_requests": late[2] / (late[0] / 1e9),
        "held": peak,
        "held_mean": total / steps,
        "batches": in_flight,
        "seconds": seconds,
    }


def mixing(lanes: int, steps: int = 8) -> dict:
    """Mean distance in the corpus between two sequences of one global batch (as a fraction
    of the corpus) and distinct chunks per batch: this order, the order before (one
    block of 8,192 consecutive windows shuffled), and a fully shuffled one."""
    from data_pipeline.chunks import ChunkTable

    chunk_tokens = int(CHUNK_MB * 2**20) // 2
    n_chunks = int(SHARDS * SHARD_MB / CHUNK_MB)
    table = ChunkTable([{"url": "x", "chunks": [[0, 0, chunk_tokens, ""]] * n_chunks}])
    layout = Layout(table, SEQ, GLOBAL, lanes, 1, 0, True)
    corpus = n_chunks * chunk_tokens
    g = GLOBAL // lanes
    rng = np.random.default_rng(0)

    def stats(positions: np.ndarray) -> tuple[float, float]:
        p = np.sort(positions.astype(np.float64))
        n = len(p)
        mean_gap = (2 * np.arange(n) - n + 1) @ p / (n * (n - 1) / 2)  # mean |a-b| over pairs
        return mean_gap / corpus, len(np.unique(positions // chunk_tokens))

    ours, before, shuffled = [], [], []
    for s in range(steps):
        pos = []
        for lane in range(lanes):
            for i in range(g):
                _, j, k = layout.locate(lane, s * g + i)
                pos.append(int(layout.perm[j]) * chunk_tokens + layout.offset + k * SEQ)  # within-chunk place ~ k
        ours.append(stats(np.array(pos)))
        block = rng.integers(corpus - 8192 * SEQ)
        before.append(stats(block + rng.permutation(8192)[:GLOBAL] * SEQ))
        shuffled.append(stats(rng.integers(0, corpus, GLOBAL)))
    return {name: np.mean(v, axis=0) for name, v in (("lanes", ours), ("before", before), ("shuffled", shuffled))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worlds", default="1,8,64,512")
    ap.add_argument("--workers", default="1", help="DataLoader workers per rank, a comma list (e.g. 1,2,4)")
    ap.add_argument("--lanes", type=int, default=512)
    ap.add_argument("--min-mb", type=int, default=512)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        Server.manifest = json.dumps(make_corpus(tmp)).encode()
        httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Server)
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{httpd.server_address[1]}"
        print(
            f"corpus {SHARDS * SHARD_MB / 1024:.0f} GB ({SHARDS} shards x {SHARD_MB} MB, {CHUNK_MB} MB chunks), "
            f"global batch {GLOBAL} x {SEQ} tokens, {args.lanes} lanes; ratio = bytes read / bytes of tokens consumed "
            "(before this change: W)"
        )
        print("2nd half: the same over the run's second half (past the start, where each lane reads a whole chunk")
        print("it begins inside); held: MB of chunks held for the rank (mean, peak); +batches: rounds in flight")
        print(
            f"{'W':>4} {'workers':>7} {'rank':>5} {'consumed':>9} {'read':>9} {'ratio':>6} {'2nd half':>8} "
            f"{'req/GB':>7} {'2nd half':>8} {'held MB':>11} {'+batches':>8} {'s':>5}"
        )
        for workers in [int(w) for w in args.workers.split(",")]:
            for world in [int(w) for w in args.worlds.split(",")]:
                ranks = sorted({0, world - 1} | ({world // 3, 2 * world // 3} if world >= 512 else set()))
                for rank in ranks:
                    r = drain(url, world, rank, workers, args.lanes, args.min_mb << 20)
                    print(
                        f"{world:>4} {workers:>7} {rank:>5} {r['consumed'] / 1e9:>7.2f}GB {r['read'] / 1e9:>7.2f}GB "
                        f"{r['read'] / r['consumed']:>6.3f} {r['late_ratio']:>8.3f} "
                        f"{r['requests'] / (r['consumed'] / 1e9):>7.1f} {r['late_requests']:>8.1f} "
                        f"{r['held_mean'] / 2**20:>5.0f} {r['held'] / 2**20:>5.0f} "
                        f"{r['batches'] / 2**20:>8.0f} {r['seconds']:>5.0f}",
                        flush=True,
                    )
        httpd.shutdown()
    m = mixing(args.lanes)
    print("\nmixing of one global batch: mean distance between two of its sequences (fraction of the corpus;")
    print("1/3 for uniform positions) and distinct chunks among its 1,024 sequences")
    for name, label in (
        ("lanes", "this order"),
        ("before", "before (8,192-window shuffle block)"),
        ("shuffled", "fully shuffled"),
    ):
        print(f"  {label:<36} {m[name][0]:.3f}   {m[name][1]:>6.0f}")


if __name__ == "__main__":
    main()
