"""The validation set: the first N windows of a split, in order, the same set for any number
of ranks, micro batch and accumulation; each rank reads only the chunks its share needs.

The split's tokens are taken as one sequence (its shards, and their chunks, in manifest
order) and cut into windows of T+1 tokens at stride T from its start (packed fine-tuning
rows: at stride T+1, each window one row), unshuffled. The set is the first N of them
(`train.eval_sequences`, capped by the split); rank r of W takes the contiguous share
[ceil(r·N/W), ceil((r+1)·N/W)) (rank 0 the largest, a rank past N none) and reads only the
chunks (~3.5 MB byte ranges of the shards, checked against their sha256 like the training
stream's) that hold those windows. A chunk that cannot be read under on_error="skip" drops
the windows that touch it, whatever rank holds them, so the set stays the same for any W.
"""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial

import numpy as np

from data_pipeline.chunks import ChunkTable
from data_pipeline.errors import DataError
from data_pipeline.examples import window_stride
from data_pipeline.manifest import open_dataset
from data_pipeline.prefetch import prefetched
from data_pipeline.raw import RawOptions
from data_pipeline.windows import window_count


@dataclass
class ValShare:
    """One rank's share of a split's validation set."""

    rows: np.ndarray  # (n, T+1) this rank's windows, in order, in the dataset's dtype
    total: int  # windows in the whole set, over every rank (0: the split is missing or too small)
    skipped: list[str]  # chunks passed over under on_error="skip" (their windows dropped)


def share_bounds(total: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, end) of rank `rank`'s contiguous share of `total` windows: ceil(r·N/W) to
    ceil((r+1)·N/W), so the shares differ by at most one and rank 0's is the largest."""
    return -(-rank * total // world_size), -(-(rank + 1) * total // world_size)


def val_share(
    data: str,
    split: str,
    seq_len: int,
    rank: int,
    world_size: int,
    count: int | None = None,
    on_error: str = "fail",
    raw: RawOptions | None = None,
) -> ValShare:
    """Rank `rank`'s windows of the first `count` (None: all) windows of `split`, read from
    only the chunks that hold them. The union over the ranks is the same for any world size."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    if on_error not in ("fail", "skip"):
        raise ValueError(f"on_error={on_error!r} must be 'fail' or 'skip'")
    manifest = open_dataset(data, raw)
    stride = window_stride(manifest, seq_len, data)  # packed rows: each window is one row
    dtype = np.dtype(manifest["dtype"])
    none = ValShare(np.zeros((0, seq_len + 1), dtype), 0, [])
    shards = manifest["splits"].get(split, {"shards": []})["shards"]
    if not shards:
        return none
    table = ChunkTable(shards)
    starts = np.concatenate([[0], np.cumsum(table.tokens)])  # each chunk's first token in the split
    total = int(window_count(int(starts[-1]), seq_len, stride))
    if count is not None:
        total = min(total, count)
    a, b = share_bounds(total, rank, world_size)
    if a == b:
        return ValShare(none.rows, total, [])
    lo, hi = a * stride, (b - 1) * stride + seq_len + 1  # the tokens of windows a..b-1
    needed = np.flatnonzero((starts[:-1] < hi) & (starts[1:] > lo)).tolist()
    buf, bad = np.empty(hi - lo, dtype), np.zeros(hi - lo, dtype=bool)
    skipped: list[str] = []
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="trainctl-val")
    try:  # the next chunk is read while this one is copied
        for c, future in prefetched(needed, partial(pool.submit, table.read, dtype=dtype), 2):
            s0, s1 = max(int(starts[c]), lo), min(int(starts[c + 1]), hi)
            try:
                tokens = future.result()
            except DataError as e:
                if on_error != "skip":
                    raise
                print(f"trainctl: warning: skipping a chunk (data.on_error=skip): {e}", file=sys.stderr, flush=True)
                skipped.append(table.name(c))
                bad[s0 - lo : s1 - lo] = True
                continue
            buf[s0 - lo : s1 - lo] = tokens[s0 - int(starts[c]) : s1 - int(starts[c])]
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    windows = np.lib.stride_tricks.as_strided(
        buf, shape=(b - a, seq_len + 1), strides=(stride * buf.itemsize, buf.itemsize), writeable=False
    )
    if skipped:  # only the windows that touch no skipped chunk
        first = np.arange(b - a) * stride
        hits = np.concatenate([[0], np.cumsum(bad)])
        windows = windows[hits[first + seq_len + 1] == hits[first]]
    return ValShare(np.array(windows), total, skipped)
