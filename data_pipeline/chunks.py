"""A split's chunks (`ChunkTable`): whole tar members of ~4 MB, each with its byte range,
token count and sha256 in the manifest, read with one ranged request and checked before any
token is handed on. What TokenStream's lanes and the validation set read.
"""

from __future__ import annotations

import hashlib

import numpy as np

from data_pipeline.errors import DataError
from data_pipeline.sources import describe_error, read_range, with_retries
from data_pipeline.ustar import token_members


class ChunkTable:
    """A split's chunks in manifest order, as arrays: url, byte offset, bytes, tokens, sha256.

    A shard listed without `chunks` (a manifest from before they existed) is one chunk: the
    whole shard, checked against its sha256 (`whole` says so)."""

    def __init__(self, shards: list[dict]):
        rows, self.whole = [], 0
        for shard in shards:
            if shard.get("chunks") is None:
                self.whole += 1
                rows.append((shard["url"], 0, shard["bytes"], shard["tokens"], shard["sha256"]))
            else:
                rows += [(shard["url"], *chunk) for chunk in shard["chunks"]]
        self.urls = [r[0] for r in rows]
        self.offsets = np.array([r[1] for r in rows], dtype=np.int64)
        self.sizes = np.array([r[2] for r in rows], dtype=np.int64)
        self.tokens = np.array([r[3] for r in rows], dtype=np.int64)
        self.sha256 = [r[4] for r in rows]

    def __len__(self) -> int:
        return len(self.urls)

    def name(self, c: int) -> str:
        return f"{self.urls[c]} bytes {self.offsets[c]:,}-{self.offsets[c] + self.sizes[c]:,}"

    def read(self, c: int, dtype: np.dtype) -> np.ndarray:
        """Chunk c's tokens, its bytes read in one request and checked against its sha256
        before any token is handed on. DataError naming the shard and byte range when it
        cannot be read (after retries), fails the check or holds other tokens than listed."""
        url, start, size = self.urls[c], int(self.offsets[c]), int(self.sizes[c])
        data = with_retries(
            lambda: read_range(url, start, size),
            url,
            failed=lambda e: (
                f"chunk {self.name(c)} is unreadable ({describe_error(e)}): prepare the dataset again or check the storage"
            ),
        )
        if hashlib.sha256(data).hexdigest() != self.sha256[c]:
            raise DataError(
                f"chunk {self.name(c)} fails its sha256 check against the manifest: it is corrupt; "
                "prepare the dataset again"
            )
        arrays = token_members(data, dtype, url)
        tokens = np.concatenate(arrays) if len(arrays) != 1 else arrays[0]
        if len(tokens) != self.tokens[c]:
            raise DataError(
                f"chunk {self.name(c)} holds {len(tokens):,} tokens but the manifest says {self.tokens[c]:,}: "
                "prepare the dataset again"
            )
        return tokens
