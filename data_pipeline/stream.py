"""What every batch stream shares (BatchStream), whole-shard reads, the fixed validation
batches, and the stream of raw-text shards (ShardStream). Prepared token shards are read
per rank by data_pipeline.lanes.TokenStream instead; `TokenStream(...)` on raw-text shards
gives a ShardStream.

ShardStream's global order is a pure function of (seed, epoch, position), whatever the number of
ranks: shards permuted per epoch → tokens → windows of T+1 at stride T from a per-epoch
offset → shuffled in blocks of `shuffle_buffer` → global batches of B·world·A windows, of
which rank r keeps its rows. Every rank reads the same stream, so all make the same number
of steps and a position resumes exactly on any number of ranks; the manifest's token
counts let a resume start at the right shard. Windows move a block at a time as arrays,
so no Python runs per window.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import BinaryIO

import numpy as np
import torch

from data_pipeline.errors import DataError
from data_pipeline.prefetch import prefetched
from data_pipeline.prepare import load_manifest
from data_pipeline.raw import FORMAT as RAW_FORMAT
from data_pipeline.raw import RawOptions, is_shard_list, raw_manifest, shard_urls, tokenize_sample
from data_pipeline.sources import describe_error, is_url, join, open_stream, parent, with_retries
from data_pipeline.tokenizer import tokenizer_from_dict
from data_pipeline.ustar import token_members


class HashingReader:
    """A read-only stream that keeps the sha256 of every byte read through it, and raises
    ConnectionError (worth a retry) when a stream of known size ends early."""

    def __init__(self, stream: BinaryIO, size: int | None = None):
        self.stream, self.sha, self.size, self.count = stream, hashlib.sha256(), size, 0

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n)
        self.sha.update(data)
        self.count += len(data)
        if not data and n != 0 and self.size is not None and self.count < self.size:
            raise ConnectionError(f"the stream ended after {self.count:,} of {self.size:,} bytes")
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass

    def read_all(self) -> bytes:
        """Everything left, in one buffer (sha256 of large blocks runs without the GIL)."""
        blocks = []
        while block := self.read(1 << 24):
            blocks.append(block)
        return b"".join(blocks)

    def close(self) -> None:
        self.stream.close()


def read_shard(
    shard: dict, dtype: np.dtype, tokenize: Callable[[dict, str], list[np.ndarray]] | None = None
) -> list[np.ndarray]:
    """The token arrays of one manifest shard (`url`, `tokens`, `sha256`), in order, read
    whole and checked before any token is handed on: corrupt data never reaches the model.

    A transient network error rereads the shard (bounded retries, backoff). DataError
    naming the shard when it is unreadable, holds another number of tokens than the
    manifest says, or fails its sha256 check. `tokenize(sample, url)` reads raw-text shards.
    """
    from webdataset.tariterators import group_by_keys, tar_file_expander

    url = shard["url"]

    def attempt() -> tuple[list[np.ndarray], str]:
        # A short remote stream is a dropped connection (retried); a short local file is truncated.
        stream = HashingReader(open_stream(url), shard.get("bytes") if is_url(url) else None)
        try:
            if tokenize is None:  # our own token shards: one read, members sliced in place
                return token_members(stream.read_all(), dtype, url), stream.sha.hexdigest()
            arrays = []
            for sample in group_by_keys(tar_file_expander([{"url": url, "stream": stream}])):
                arrays += tokenize(sample, url)
            stream.drain()  # the tar's end blocks count in the checksum too
            return arrays, stream.sha.hexdigest()
        finally:
            stream.close()

    # tarfile, IO, network and webdataset errors alike name the shard; only transient ones are retried.
    arrays, sha256 = with_retries(
        attempt,
        url,
        failed=lambda e: (
            f"shard {url} is unreadable ({describe_error(e)}): prepare the dataset again or check the storage"
        ),
    )
    tokens = sum(len(a) for a in arrays)
    if "tokens" in shard and tokens != shard["tokens"]:
        raise DataError(
            f"shard {url} holds {tokens:,} tokens but the manifest says {shard['tokens']:,}: "
            "it is truncated or was replaced; prepare the dataset again"
        )
    if "sha256" in shard and sha256 != shard["sha256"]:
        raise DataError(
            f"shard {url} fails its sha256 check against the manifest: it is corrupt; prepare the dataset again"
        )
    return arrays


def read_shards(
    shards: list[dict],
    read: Callable[[dict], list[np.ndarray]],
    on_error: str = "fail",
    skipped: list[str] | None = None,
    prefetch: int = 1,
) -> Iterator[np.ndarray]:
    """The token arrays of `shards` in order, the next `prefetch` shards read (and checked)
    in a background thread meanwhile. on_error="skip" passes over a shard that cannot be
    used, with a warning naming it, and records its url in `skipped`."""
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="trainctl-shards")
    try:
        for shard, future in prefetched(shards, partial(pool.submit, read), prefetch + 1):
            try:
                arrays = future.result()
            except DataError as e:
                if on_error != "skip":
                    raise
                print(f"trainctl: warning: skipping a shard (data.on_error=skip): {e}", file=sys.stderr, flush=True)
                if skipped is not None:
                    skipped.append(shard["url"])
                continue
            yield from arrays
    finally:  # a consumer that stops early does not wait for shards it will not use
        pool.shutdown(wait=False, cancel_futures=True)


def skip_tokens(chunks: Iterable[np.ndarray], n: int) -> Iterator[np.ndarray]:
    """`chunks` without their first `n` tokens."""
    for chunk in chunks:
        if n >= len(chunk):
            n -= len(chunk)
            continue
        yield chunk[n:]
        n = 0


def window_blocks(
    chunks: Iterable[np.ndarray],
    seq_len: int,
    count: int | None,
    block: int,
    order: Callable[[int, int], np.ndarray] | None = None,
    first_block: int = 0,
) -> Iterator[np.ndarray]:
    """The windows of seq_len+1 tokens at stride seq_len (each token a target once) that
    `chunks` make, `count` in all (None: as many as the data makes), as (n, seq_len+1)
    arrays of `block` consecutive windows (the last one maybe fewer); `order(j, n)` permutes
    the rows of block j (counting from `first_block`). Whole blocks at a time, with no
    per-window Python, so a shuffle buffer of thousands of windows costs one gather.

    >>> [w.tolist() for w in window_blocks([np.arange(5), np.arange(5, 8)], 3, 2, 8)]
    [[[0, 1, 2, 3], [3, 4, 5, 6]]]
    """
    chunks = iter(chunks)
    pending, have, made, j = [], 0, 0, first_block
    while count is None or made < count:
        n = block if count is None else min(block, count - made)
        while have < n * seq_len + 1 and (chunk := next(chunks, None)) is not None:
            pending.append(chunk)
            have += len(chunk)
        ended = have < n * seq_len + 1
        if ended:  # the data ran out: the windows it makes
            n = max(have - 1, 0) // seq_len
            if count is not None and made + n < count:
                raise DataError(
                    f"the data ended after {made + n} of {count} sequences: the manifest's token counts are wrong"
                )
            if n == 0:
                return
        buf = np.concatenate(pending) if len(pending) > 1 else pending[0]
        windows = np.lib.stride_tricks.as_strided(
            buf, shape=(n, seq_len + 1), strides=(seq_len * buf.itemsize, buf.itemsize), writeable=False
        )
        yield windows if order is None else windows[order(j, n)]
        made, j = made + n, j + 1
        pending = [buf[n * seq_len :]]
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


def open_dataset(data: str, raw: RawOptions | None = None) -> dict:
    """The manifest of a prepared dataset; for a shard list, the part of the manifest
    beside the shards that lists them (a subset of a prepared dataset), or one made up for
    raw-text shards."""
    if not is_shard_list(data):
        return load_manifest(data)
    raw = raw or RawOptions()
    urls = shard_urls(data, raw.allow_pipe)
    return manifest_subset(data, urls) or raw_manifest(data, raw, urls)


def manifest_subset(spec: str, urls: list[str]) -> dict | None:
    """The manifest.json beside `urls`, cut down to those shards (each keeps its split);
    None when there is none or it does not list them all (raw-text shards)."""
    folders = {parent(u) for u in urls}
    if len(folders) != 1 or urls[0].startswith("pipe:"):
        return None
    root = folders.pop()
    if not is_url(root) and not os.path.isfile(os.path.join(root, "manifest.json")):
        return None
    try:
        manifest = load_manifest(root)
    except DataError:
        if not is_url(root):
            raise  # a local manifest beside the shards that is broken: say so
        return None  # no manifest at that URL: raw-text shards
    by_url = {shard["url"]: (split, shard) for split, s in manifest["splits"].items() for shard in s["shards"]}
    wanted = [u if is_url(u) else os.path.abspath(u) for u in urls]
    if not all(u in by_url for u in wanted):
        missing = [u for u in wanted if u not in by_url]
        raise DataError(
            f"data.path {spec!r}: {len(missing)} of the shards, the first {missing[0]}, are not in "
            f"{join(root, 'manifest.json')}: name shards of one prepared dataset, or its folder"
        )
    splits = {split: {"shards": []} for split in manifest["splits"]}
    for u in wanted:
        split, shard = by_url[u]
        splits[split]["shards"].append(shard)
    for split in splits.values():
        split["tokens"] = sum(s["tokens"] for s in split["shards"])
    return {**manifest, "name": spec, "splits": splits}


def shard_reader(manifest: dict) -> Callable[[dict], list[np.ndarray]]:
    """read(shard) -> token arrays, for the kind of dataset `manifest` describes."""
    dtype = np.dtype(manifest["dtype"])
    if manifest["format"] != RAW_FORMAT:
        return partial(read_shard, dtype=dtype)
    tok, field = tokenizer_from_dict(manifest["tokenizer"]), manifest["options"].text_field
    return partial(read_shard, dtype=dtype, tokenize=lambda sample, url: tokenize_sample(sample, url, tok, field))


class BatchStream:
    """What TokenStream and MixedStream share: the batch geometry, the checks of a saved
    position, and the hand-out of this rank's rows of each global batch (to the training
    process, or to DataLoader workers in turn). A subclass makes `_batches()`, its global
    batches from the current position on, updating the position before each is yielded,
    and `_rank_rows(rows)`, the (A·B, T+1) int64 array of this rank's slice of one."""

    def __init__(
        self, seq_len: int, micro_batch_size: int, rank: int, world_size: int, grad_accum_steps: int, seed: int
    ):
        self.seq_len, self.micro_batch_size, self.accum = seq_len, micro_batch_size, grad_accum_steps
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.global_batch = micro_batch_size * world_size * grad_accum_steps

    @property
    def vocab_size(self) -> int:
        return self.manifest["tokenizer"]["vocab_size"]

    def _check_state(self, state: dict) -> None:
        """A saved position must have this job's seed, global batch and sequence length."""
        for key in ("seed", "global_batch", "seq_len"):
            if state[key] != getattr(self, key):
                raise DataError(
                    f"the saved data position has {key}={state[key]} but this job has {getattr(self, key)}: "
                    f"resume with the same {key} or start a fresh run"
                )

    def position(self) -> dict:
        """Where the stream stands, for the loop and the checkpoint: state_dict() plus the
        epoch and the shards skipped so far."""
        return {"state": self.state_dict(), "epoch": self.epoch, "skipped": list(self.skipped)}

    def steps(self, worker: int = 0, workers: int = 1, group: int = 1) -> Iterator[tuple[np.ndarray | None, dict]]:
        """(this rank's rows of each global batch as one (A·B, T+1) int64 array, the
        position after it), from the current position on, endlessly.

        With `workers` > 1 only every `workers`-th group of `group` steps from here, starting
        at group `worker`, carries its rows (the others None): DataLoader worker k builds
        those, and the DataLoader hands them out in turn, so the order is the same for any
        number of workers.
        """
        rows = self.micro_batch_size * self.accum
        for n, batch in enumerate(self._batches()):
            mine = (
                self._rank_rows(batch[self.rank * rows : (self.rank + 1) * rows])
                if n // group % workers == worker
                else None
            )
            yield mine, self.position()

    def rounds(self, worker: int = 0, workers: int = 1, group: int = 1) -> Iterator[tuple]:
        """(flat row indices into the round's (steps, rows) grid, those rows, the position
        after each step, bytes held) for `group` steps at a time: what DataLoader worker
        `worker` of `workers` contributes to each round (data_pipeline.loader). Here a
        worker builds whole rounds in turn and contributes nothing to the others'."""
        rows, mine, positions = self.micro_batch_size * self.accum, [], []
        for step_rows, position in self.steps(worker, workers, group):
            if step_rows is not None:
                mine.append(step_rows)
            positions.append(position)
            if len(positions) == group:
                if mine:
                    yield np.arange(group * rows), np.concatenate(mine), positions, 0
                else:
                    yield np.zeros(0, np.int64), np.zeros((0, self.seq_len + 1), np.int64), positions, 0
                mine, positions = [], []

    def __iter__(self) -> Iterator[torch.Tensor]:
        """Micro batches of (micro_batch_size, seq_len+1) tokens, in this process."""
        for rows, _ in self.steps():
            for a in range(self.accum):
                yield torch.from_numpy(rows[a * self.micro_batch_size : (a + 1) * self.micro_batch_size])


class ShardStream(BatchStream):
    """An endless, resumable iterator of (micro_batch_size, seq_len+1) int64 batches for one
    rank of raw-text shards (module docstring): every rank reads every shard."""

    def __init__(
        self,
        data: str | dict,
        split: str,
        seq_len: int,
        micro_batch_size: int,
        rank: int,
        world_size: int,
        grad_accum_steps: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        shuffle_buffer: int = 8192,
        on_error: str = "fail",
        raw: RawOptions | None = None,
        **_ignored,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.manifest = data if isinstance(data, dict) else open_dataset(data, raw)
        data = data if isinstance(data, str) else self.manifest.get("name", self.manifest["root"])
        self.read = shard_reader(self.manifest)
        if split not in self.manifest["splits"]:
            raise DataError(f"the dataset {data} has no '{split}' split")
        self.shards = self.manifest["splits"][split]["shards"]
        self.dtype = np.dtype(self.manifest["dtype"])
        super().__init__(seq_len, micro_batch_size, rank, world_size, grad_accum_steps, seed)
        self.shuffle, self.shuffle_buffer = shuffle, shuffle_buffer
        if on_error not in ("fail", "skip"):
            raise ValueError(f"on_error={on_error!r} must be 'fail' or 'skip'")
        self.on_error, self.skipped = on_error, []  # urls of shards passed over, in order
        # Raw-text shards: unknown until read; their epochs end where the data ends.
        self.tokens = None if self.manifest["format"] == RAW_FORMAT else sum(s["tokens"] for s in self.shards)
        worst = max((self.tokens or 0) - seq_len, 0) // seq_len  # windows from the largest per-epoch offset
        if self.tokens is not None and worst < self.global_batch:
            raise DataError(
                f"the {split} split of {data} holds {self.tokens:,} tokens, too few for one global batch of "
                f"{self.global_batch} x {seq_len + 1} tokens: add data or lower the batch size or data.seq_len"
            )
        self.epoch, self.step_in_epoch = 0, 0

    def epoch_plan(self, epoch: int) -> tuple[list[dict], int, int | None]:
        """(shards in this epoch's order, token offset of the first window, steps in the
        epoch; None where the token count is unknown)."""
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.shards)) if self.shuffle else range(len(self.shards))
        offset = int(rng.integers(self.seq_len)) if self.shuffle else 0
        if self.tokens is None:
            return [self.shards[i] for i in order], offset, None
        windows = (self.tokens - offset - 1) // self.seq_len
        return [self.shards[i] for i in order], offset, windows // self.global_batch

    @property
    def steps_per_epoch(self) -> int | None:
        return self.epoch_plan(self.epoch)[2]

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "seed": self.seed,
            "global_batch": self.global_batch,
            "seq_len": self.seq_len,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position (call before iterating). The global batch, the
        sequence length and the seed must match; the number of ranks may differ."""
        self._check_state(state)
        self.epoch, self.step_in_epoch = state["epoch"], state["step_in_epoch"]

    def _global_batches(self, epoch: int, first_step: int) -> Iterator[np.ndarray]:
        """This epoch's global batches, (global_batch, seq_len+1) each, from step `first_step`."""
        shards, offset, steps = self.epoch_plan(epoch)
        block = self.shuffle_buffer
        if steps is None:  # raw-text shards: read from the epoch's start, as far as the data goes
            first_window, count = 0, None
            chunks = skip_tokens(read_shards(shards, self.read, self.on_error, self.skipped), offset)
        else:  # token shards: start reading at the shard that holds the block of `first_step`
            used = steps * self.global_batch
            block = block if self.shuffle else used
            first_window = (first_step * self.global_batch // block) * block
            start = offset + first_window * self.seq_len
            ends = np.cumsum([s["tokens"] for s in shards]).tolist()
            i = bisect.bisect_right(ends, start)
            chunks = skip_tokens(
                read_shards(shards[i:], self.read, self.on_error, self.skipped), start - (ends[i - 1] if i else 0)
            )
            count = used - first_window
            if self.on_error == "skip":
                # Skipped shards shorten the data: top the epoch up from its start, so that every
                # rank still makes the planned number of steps (no rank waits at a collective).
                chunks = itertools.chain(chunks, self._refill(shards))
        blocks = window_blocks(
            chunks,
            self.seq_len,
            count,
            block,
            shuffle_order(self.seed, epoch) if self.shuffle else None,
            first_window // block,
        )
        return row_batches(blocks, self.global_batch, first_step * self.global_batch - first_window)

    def _refill(self, shards: list[dict]) -> Iterator[np.ndarray]:
        while True:
            n = 0
            for chunk in read_shards(shards, self.read, "skip", self.skipped):
                n += len(chunk)
                yield chunk
            if n == 0:
                raise DataError(
                    f"every shard of {self.manifest['root']} failed (data.on_error=skip): nothing left to train on"
                )

    def _batches(self) -> Iterator[np.ndarray]:
        """The global batches from the current position on, endlessly, across epochs."""
        while True:
            steps, fresh = self.steps_per_epoch, self.step_in_epoch == 0
            for batch in self._global_batches(self.epoch, self.step_in_epoch):
                self.step_in_epoch += 1  # the position after this step
                if self.step_in_epoch == steps:
                    self.epoch, self.step_in_epoch = self.epoch + 1, 0
                yield batch
                if self.step_in_epoch == 0:
                    break
            if steps is None:  # raw-text shards: the epoch ended with the data
                if fresh and self.step_in_epoch == 0:
                    raise DataError(
                        f"{self.manifest['root']} holds too few tokens for one global batch of "
                        f"{self.global_batch} x {self.seq_len + 1}: add data or lower the batch size or data.seq_len"
                    )
                self.epoch, self.step_in_epoch = self.epoch + 1, 0

    def _rank_rows(self, rows: np.ndarray) -> np.ndarray:
        return rows.astype(np.int64)


def eval_batches(
    data: str,
    split: str,
    seq_len: int,
    micro_batch_size: int,
    rank: int,
    world_size: int,
    max_batches: int | None = None,
    on_error: str = "fail",
    raw: RawOptions | None = None,
) -> list[torch.Tensor]:
    """The same fixed, unshuffled validation batches on every call: the split's windows in
    order, rank r taking its rows of each; every rank gets the same number. [] when the
    split is missing or too small for one sequence per rank."""
    manifest = open_dataset(data, raw)
    shards = manifest["splits"].get(split, {"shards": []})["shards"]
    tokens = sum(s["tokens"] for s in shards)
    windows = max(tokens - 1, 0) // seq_len
    per_batch = micro_batch_size * world_size
    n_batches = windows // per_batch
    if n_batches == 0:  # a small split: one smaller batch
        micro_batch_size, per_batch, n_batches = windows // world_size, windows // world_size * world_size, 1
        if micro_batch_size == 0:
            return []
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    skipped: list[str] = []
    chunks = read_shards(shards, shard_reader(manifest), on_error, skipped)
    if on_error == "skip":  # fewer windows than planned: every rank stops at the same, smaller count
        chunks = list(chunks)
        if skipped:
            windows = max(sum(len(c) for c in chunks) - 1, 0) // seq_len
            n_batches = min(n_batches, windows // per_batch)
    count = n_batches * per_batch
    batches = row_batches(window_blocks(chunks, seq_len, count, count), per_batch)
    return [
        torch.from_numpy(b[rank * micro_batch_size : (rank + 1) * micro_batch_size].astype(np.int64)) for b in batches
    ]
