"""What every batch stream shares (BatchStream), whole-shard reads, the windowing stages,
and the stream of raw-text shards (ShardStream: shards partitioned over slots, see its
docstring). Prepared token shards are read per rank by data_pipeline.lanes.TokenStream;
`TokenStream(...)` on raw-text shards gives a ShardStream; the validation set is
data_pipeline.validation's.

The stages (of a slot): shards in order → tokens → windows of T+1 at stride T from an
offset (packed fine-tuning rows: at stride T+1 from 0, each window one row) → shuffled in
blocks of `shuffle_buffer` → batches of rows. Windows move a block at a time as arrays, so
no Python runs per window.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import BinaryIO

import numpy as np
import torch

from data_pipeline.credentials import redact_text
from data_pipeline.errors import DataError, error_text
from data_pipeline.examples import window_stride
from data_pipeline.prefetch import prefetched
from data_pipeline.prepare import load_manifest
from data_pipeline.raw import FORMAT as RAW_FORMAT
from data_pipeline.raw import RawOptions, is_shard_list, raw_manifest, shard_urls, tokenize_sample
from data_pipeline.sources import is_url, join, open_stream, parent, with_retries
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
            f"shard {url} is unreadable ({error_text(e, url)}): prepare the dataset again or check the storage"
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
                print(
                    f"trainctl: warning: skipping a shard (data.on_error=skip): {redact_text(str(e))}",
                    file=sys.stderr,
                    flush=True,
                )
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
    """What TokenStream, ShardStream and MixedStream share: the batch geometry, the checks of
    a saved position, this rank's rows as runs of lanes, and the hand-out of rounds. A
    subclass makes `rounds()`, each process's share of this rank's rows (data_pipeline.loader)."""

    def __init__(
        self, seq_len: int, micro_batch_size: int, rank: int, world_size: int, grad_accum_steps: int, seed: int
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
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

    def lane_runs(self, lanes: int) -> list[tuple[int, int, int]]:
        """This rank's rows of a global batch of `lanes` lanes, as (lane, first row in the
        lane, end row) runs: whole lanes when the number of ranks divides the lanes."""
        rows, g = self.micro_batch_size * self.accum, self.global_batch // lanes
        first, last = self.rank * rows, (self.rank + 1) * rows
        return [(lane, max(first - lane * g, 0), min(last - lane * g, g)) for lane in range(first // g, -(-last // g))]

    def position(self) -> dict:
        """Where the stream stands, for the loop and the checkpoint: state_dict() plus the
        epoch and the shards skipped so far."""
        return {"state": self.state_dict(), "epoch": self.epoch, "skipped": list(self.skipped)}

    def rounds(self, worker: int = 0, workers: int = 1, group: int = 1) -> Iterator[tuple]:
        """(flat row indices into the round's (steps, rows) grid, those rows, the position
        after each step, bytes held) for `group` steps at a time, from the current position
        on, endlessly: what DataLoader worker `worker` of `workers` contributes to each round."""
        raise NotImplementedError

    def steps(self) -> Iterator[tuple[np.ndarray, dict]]:
        """(this rank's rows of each step as one (A·B, T+1) int64 array, the position after
        it), in this process."""
        for index, block, positions, _ in self.rounds(0, 1, 1):
            out = np.empty((self.micro_batch_size * self.accum, self.seq_len + 1), dtype=np.int64)
            out[index] = block
            yield out, positions[0]

    def __iter__(self) -> Iterator[torch.Tensor]:
        """Micro batches of (micro_batch_size, seq_len+1) tokens, in this process."""
        for rows, _ in self.steps():
            for a in range(self.accum):
                yield torch.from_numpy(rows[a * self.micro_batch_size : (a + 1) * self.micro_batch_size])


class ShardStream(BatchStream):
    """An endless, resumable iterator of (micro_batch_size, seq_len+1) int64 batches for one
    rank of raw-text shards, whose token counts are unknown until they are tokenized.

    The shards are partitioned over `lanes` slots (capped at a divisor of the global batch
    and at the number of shards), so the order does not depend on the number of ranks: in
    its epoch e, slot q reads shards perm_e[q::slots], tokenized, windowed from a per-epoch
    offset and shuffled in blocks of `shuffle_buffer`, and gives g = G/slots rows a step.
    Each slot runs through its epochs on its own (a rank cannot know other slots' token
    counts), so the stream is endless with no common epoch end; a rank reads only its slots'
    shards. A position is the step: a resume counts each slot's epochs by tokenizing their
    shards (each once) and re-reads only the current epoch's.
    """

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
        lanes: int = 256,
        **_ignored,
    ):
        from data_pipeline.lanes import effective_lanes

        if on_error not in ("fail", "skip"):
            raise ValueError(f"on_error={on_error!r} must be 'fail' or 'skip'")
        self.manifest = data if isinstance(data, dict) else open_dataset(data, raw)
        name = data if isinstance(data, str) else self.manifest.get("name", self.manifest["root"])
        self.read = shard_reader(self.manifest)
        if split not in self.manifest["splits"] or not self.manifest["splits"][split]["shards"]:
            raise DataError(f"the dataset {name} has no '{split}' split")
        self.shards = self.manifest["splits"][split]["shards"]
        self.dtype = np.dtype(self.manifest["dtype"])
        self.stride = window_stride(self.manifest, seq_len, name)
        super().__init__(seq_len, micro_batch_size, rank, world_size, grad_accum_steps, seed)
        self.shuffle, self.shuffle_buffer, self.on_error = shuffle, shuffle_buffer, on_error
        self.skipped: list[str] = []  # urls of shards passed over, in order
        self.lanes = effective_lanes(self.global_batch, min(lanes, len(self.shards)))
        self.runs = self.lane_runs(self.lanes)
        self.step = 0
        self.lane_epochs = {q: 0 for q, _, _ in self.runs}
        self.reading = [q for q, _, _ in self.runs]  # the slots this process reads
        self._counts: dict[str, int] = {}  # tokens of each shard counted during a resume

    @property
    def steps_per_epoch(self) -> None:
        return None  # each slot's epochs end where its data ends

    @property
    def epoch(self) -> int:
        """The epoch of the slowest slot this process reads."""
        return min((self.lane_epochs[q] for q in self.reading), default=0)

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "seed": self.seed,
            "global_batch": self.global_batch,
            "seq_len": self.seq_len,
            "lanes": self.lanes,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position (call before iterating); the number of ranks may differ."""
        self._check_state(state)
        if "step" not in state or state.get("lanes") != self.lanes:
            raise DataError(
                f"the saved data position reads raw-text shards in {state.get('lanes', 'one stream, not')} slots but "
                f"this job uses {self.lanes}: resume with the same data.lanes (and trainctl), or start a fresh run"
            )
        self.step = state["step"]

    def _lane_plan(self, q: int, epoch: int) -> tuple[list[dict], int]:
        """(slot q's shards in `epoch`, the token offset of its first window)."""
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.shards)) if self.shuffle else np.arange(len(self.shards))
        offset = int(rng.integers(self.seq_len)) if self.shuffle and self.stride == self.seq_len else 0
        return [self.shards[i] for i in order[q :: self.lanes]], offset

    def _count(self, shard: dict) -> int:
        url = shard["url"]
        if url not in self._counts:
            try:
                self._counts[url] = sum(len(a) for a in self.read(shard))
            except DataError:
                if self.on_error != "skip":
                    raise
                self._counts[url] = 0
        return self._counts[url]

    def _lane_rows(self, q: int, skip_windows: int) -> Iterator[np.ndarray]:
        """Slot q's rows, g at a time, endlessly, after its first `skip_windows` windows."""
        g = self.global_batch // self.lanes
        epoch, empty = 0, 0
        while True:
            shards, offset = self._lane_plan(q, epoch)
            if skip_windows:  # a resume: pass whole epochs by their token counts
                windows = window_count(sum(self._count(s) for s in shards) - offset, self.seq_len, self.stride) // g * g
                if skip_windows >= windows and windows:
                    skip_windows -= windows
                    epoch += 1
                    continue
            block = self.shuffle_buffer
            first = skip_windows // block * block
            chunks = skip_tokens(
                read_shards(shards, self.read, self.on_error, self.skipped), offset + first * self.stride
            )
            order = (
                (lambda j, n, e=epoch: np.random.default_rng([self.seed, e, q, j]).permutation(n))
                if self.shuffle
                else None
            )
            made = 0
            for rows in row_batches(
                window_blocks(chunks, self.seq_len, None, block, order, first // block, self.stride),
                g,
                skip_windows - first,
            ):
                made += 1
                yield rows
            skip_windows = 0
            self.lane_epochs[q] = epoch = epoch + 1
            empty = 0 if made else empty + 1
            if empty > self.lanes:
                raise DataError(
                    f"slot {q} of {self.manifest['root']} found no whole sequence in {empty} epochs: every shard "
                    "failed (data.on_error=skip) or the shards are too small; add data or lower data.lanes"
                )

    def rounds(self, worker: int = 0, workers: int = 1, group: int = 1) -> Iterator[tuple]:
        """BatchStream.rounds: DataLoader worker k reads the rank's slots whose place among them
        is k mod workers (a worker with none contributes empty items)."""
        g, rows_per_step = self.global_batch // self.lanes, self.micro_batch_size * self.accum
        mine = [(n, run) for n, run in enumerate(self.runs) if n % workers == worker]
        self.reading = [q for _, (q, _, _) in mine]
        its = {q: self._lane_rows(q, self.step * g) for q in self.reading}
        starts = np.cumsum([0] + [i1 - i0 for _, i0, i1 in self.runs])
        while True:
            index, rows, positions = [], [], []
            for n in range(group):
                for k, (q, i0, i1) in mine:
                    index.append(n * rows_per_step + np.arange(starts[k], starts[k + 1]))
                    rows.append(next(its[q])[i0:i1])
                self.step += 1
                positions.append(self.position())
            block = np.concatenate(rows) if rows else np.zeros((0, self.seq_len + 1), self.dtype)
            yield np.concatenate(index) if index else np.zeros(0, np.int64), block, positions, 0
