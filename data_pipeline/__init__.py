"""Data: text to WebDataset token shards (`prepare`), the tokenizer, and the resumable
per-rank stream of token batches (`TokenStream`)."""

from data_pipeline.errors import DataError
from data_pipeline.prepare import default_corpus, load_manifest, prepare, summarize
from data_pipeline.resolve import resolve_dataset
from data_pipeline.loader import Loader
from data_pipeline.mix import MixedStream
from data_pipeline.raw import RawOptions
from data_pipeline.stream import TokenStream, eval_batches, open_dataset
from data_pipeline.tokenizer import ByteTokenizer, build_tokenizer, tokenizer_from_dict

__all__ = ["ByteTokenizer", "DataError", "Loader", "MixedStream", "RawOptions", "TokenStream", "build_tokenizer", "default_corpus", "eval_batches",
           "load_manifest", "open_dataset", "prepare", "resolve_dataset", "summarize", "tokenizer_from_dict"]
