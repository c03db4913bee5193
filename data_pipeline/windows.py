"""The windowing stages, on token arrays, a block at a time (no Python per window): tokens →
`skip_tokens` → windows of T+1 at stride T from an offset (packed fine-tuning rows: at
stride T+1 from 0, each window one row; `window_count`, `window_blocks`) → shuffled in blocks
(`shuffle_order`) → batches of rows (`row_batches`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import numpy as np

from data_pipeline.errors import DataError


def skip_tokens(chunks: Iterable[np.ndarray], n: int) -> Iterator[np.ndarray]:
    """`chunks` without their first `n` tokens."""
    for chunk in chunks:
        if n >= len(chunk):
            n -= len(chunk)
            continue
        yield chunk[n:]
        n = 0


def window_count(tokens, seq_len: int, stride: int):
    """How many windows of seq_len+1 tokens at `stride` `tokens` tokens make (an int or an array)."""
    return np.maximum(tokens - seq_len - 1 + stride, 0) // stride


def window_blocks(
    chunks: Iterable[np.ndarray],
    seq_len: int,
    count: int | None,
    block: int,
    order: Callable[[int, int], np.ndarray] | None = None,
    first_block: int = 0,
    stride: int | None = None,
) -> Iterator[np.ndarray]:
    """The windows of seq_len+1 tokens at stride seq_len (each token a target once; or at
    `stride`, seq_len+1 for packed rows) that `chunks` make, `count` in all (None: as many
    as the data makes), as (n, seq_len+1) arrays of `block` consecutive windows (the last
    one maybe fewer); `order(j, n)` permutes the rows of block j (counting from
    `first_block`). Whole blocks at a time, with no per-window Python, so a shuffle buffer
    of thousands of windows costs one gather.

    >>> [w.tolist() for w in window_blocks([np.arange(5), np.arange(5, 8)], 3, 2, 8)]
    [[[0, 1, 2, 3], [3, 4, 5, 6]]]
    """
    stride = stride or seq_len
    tail = seq_len + 1 - stride  # tokens a window has beyond its stride
    chunks = iter(chunks)
    pending, have, made, j = [], 0, 0, first_block
    while count is None or made < count:
        n = block if count is None else min(block, count - made)
        while have < n * stride + tail and (chunk := next(chunks, None)) is not None:
            pending.append(chunk)
            have += len(chunk)
        ended = have < n * stride + tail
        if ended:  # the data ran out: the windows it makes
            n = int(window_count(have, seq_len, stride))
            if count is not None and made + n < count:
                raise DataError(
                    f"the data ended after {made + n} of {count} sequences: the manifest's token counts are wrong"
                )
            if n == 0:
                return
        buf = np.concatenate(pending) if len(pending) > 1 else pending[0]
        windows = np.lib.stride_tricks.as_strided(
            buf, shape=(n, seq_len + 1), strides=(stride * buf.itemsize, buf.itemsize), writeable=False
        )
        yield windows if order is None else windows[order(j, n)]
        made, j = made + n, j + 1
        pending = [buf[n * stride :]]
        have = len(pending[0])
        if ended:
            return


def shuffle_order(seed: int, epoch: int) -> Callable[[int, int], np.ndarray]:
    """order(j, n): the permutation of shuffle block j, from (seed, epoch, j) alone, so any
    block can be rebuilt on its own."""
    return lambda j, n: np.random.default_rng([seed, epoch, j]).permutation(n)


def row_batches(blocks: Iterable[np.ndarray], rows: int, skip: int = 0) -> Iterator[np.ndarray]:
    """Consecutive (rows, ...) slices of the concatenated `blocks`, after the first `skip`
    rows; an incomplete last batch is dropped."""
    carry = None
    for b in blocks:
        if skip:
            cut = min(skip, len(b))
            b, skip = b[cut:], skip - cut
        start = 0
        if carry is not None:  # a batch that straddles two blocks
            start = min(rows - len(carry), len(b))
            carry = np.concatenate([carry, b[:start]])
            if len(carry) < rows:
                continue
            yield carry
        n = (len(b) - start) // rows
        for k in range(n):
            yield b[start + k * rows : start + (k + 1) * rows]
        rest = b[start + n * rows :]
        carry = rest if len(rest) else None
