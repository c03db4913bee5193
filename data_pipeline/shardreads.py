"""Whole-shard reads, checked before any token is handed on: `read_shard` (one manifest
shard's token arrays, its sha256 and token count checked, transient errors retried),
`read_shards` (shards in order, the next ones read ahead in a thread, `on_error=skip`),
`shard_reader` (the read for a manifest's kind: token shards, or raw-text shards tokenized as
read). Used by ShardStream; prepared token shards are read in chunks by lanes.py instead.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import BinaryIO

import numpy as np

from data_pipeline.errors import DataError, error_text
from data_pipeline.prefetch import prefetched
from data_pipeline.raw import FORMAT as RAW_FORMAT
from data_pipeline.raw import tokenize_sample
from data_pipeline.redact import redact_text
from data_pipeline.sources import is_url, open_stream, with_retries
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


def shard_reader(manifest: dict) -> Callable[[dict], list[np.ndarray]]:
    """read(shard) -> token arrays, for the kind of dataset `manifest` describes."""
    dtype = np.dtype(manifest["dtype"])
    if manifest["format"] != RAW_FORMAT:
        return partial(read_shard, dtype=dtype)
    tok, field = tokenizer_from_dict(manifest["tokenizer"]), manifest["options"].text_field
    return partial(read_shard, dtype=dtype, tokenize=lambda sample, url: tokenize_sample(sample, url, tok, field))
