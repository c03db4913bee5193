"""Tokenizers: text bytes to token ids and back, and a dict form that travels with the data.

The byte-level tokenizer is built in: ids 0..255 are the bytes of the UTF-8 text, id 256
is end-of-text, which separates documents. Its dict form goes into manifest.json and into
every checkpoint, so a checkpoint can be sampled from without the dataset.

>>> tok = ByteTokenizer()
>>> tok.encode("hi").tolist(), tok.decode([104, 105, 256])
([104, 105], 'hi')
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

from data_pipeline.errors import DataError


class ByteTokenizer:
    """UTF-8 bytes as tokens, plus one end-of-text token."""

    name = "byte"
    vocab_size = 257
    eot = 256

    def encode(self, text: str | bytes) -> np.ndarray:
        data = text.encode("utf-8") if isinstance(text, str) else text
        return np.frombuffer(data, dtype=np.uint8).astype(np.uint16)

    def decode(self, ids: Iterable[int]) -> str:
        """Text for `ids`; end-of-text tokens are dropped, broken UTF-8 becomes U+FFFD."""
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def to_dict(self) -> dict:
        return {"name": self.name, "vocab_size": self.vocab_size, "eot": self.eot}


def build_tokenizer(spec: str) -> ByteTokenizer:
    """The tokenizer named by a `--tokenizer` / `data.tokenizer` value."""
    if spec == "byte":
        return ByteTokenizer()
    raise DataError(f"unknown tokenizer '{spec}': use 'byte'")


def tokenizer_from_dict(d: dict) -> ByteTokenizer:
    """The tokenizer saved by `to_dict()` in a manifest or a checkpoint."""
    if d.get("name") == "byte":
        return ByteTokenizer()
    raise DataError(f"unknown tokenizer {d.get('name')!r} in the dataset or checkpoint")


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every id."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)
