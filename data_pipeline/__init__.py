"""Data for training: text to token shards (`prepare`), tokenizers, and the resumable
per-rank batch streams (`dataset_stream`: a `TokenStream` or, for raw-text shards, a
ShardStream; `MixedStream`; all `BatchStream`s, batched by `Loader`). Fine-tuning examples
carry per-token loss flags in each value's high byte: token = value & TOKEN_MASK, flags =
value >> FLAG_SHIFT, of FLAG_PROMPT, FLAG_START, FLAG_PAD (data_pipeline.examples).

The torch-importing modules (batchstream and the streams built on it: shardstream, lanes,
streams, mix; loader) load on first use, so a process that only prepares data (a `prepare
--workers` process, a Ray task) starts in a fraction of a second. Nothing here imports Ray
(cluster/local_ray.py runs `prepare --address`).
"""

import importlib

from data_pipeline.errors import DataError
from data_pipeline.examples import FLAG_PAD, FLAG_PROMPT, FLAG_SHIFT, FLAG_START, TOKEN_MASK
from data_pipeline.manifest import load_manifest, open_dataset
from data_pipeline.prepare import prepare, summarize
from data_pipeline.raw import RawOptions
from data_pipeline.resolve import default_corpus, resolve_dataset
from data_pipeline.tokenizer import ByteTokenizer, build_tokenizer, tokenizer_from_dict
from data_pipeline.validation import val_share

_LAZY = {
    "BatchStream": "batchstream",
    "Loader": "loader",
    "MixedStream": "mix",
    "TokenStream": "lanes",
    "dataset_stream": "streams",
}

__all__ = [
    "FLAG_PAD",
    "FLAG_PROMPT",
    "FLAG_SHIFT",
    "FLAG_START",
    "TOKEN_MASK",
    "BatchStream",
    "ByteTokenizer",
    "DataError",
    "Loader",
    "MixedStream",
    "RawOptions",
    "TokenStream",
    "build_tokenizer",
    "dataset_stream",
    "default_corpus",
    "load_manifest",
    "open_dataset",
    "prepare",
    "resolve_dataset",
    "summarize",
    "tokenizer_from_dict",
    "val_share",
]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"data_pipeline.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'data_pipeline' has no attribute {name!r}")
