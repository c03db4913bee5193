"""Tokenizers behind one interface (`encode`, `decode`, `vocab_size`, `eot`, `to_dict`):
`byte` (ids 0..255, end-of-text 256), `bpe:VOCAB_SIZE` (byte-level BPE that `prepare`
trains on the corpus) or a Hugging Face tokenizer.json. The dict form travels in
manifest.json and every checkpoint, so a checkpoint samples without the dataset.

>>> tok = ByteTokenizer()
>>> tok.encode("hi").tolist(), tok.decode([104, 105, 256])
([104, 105], 'hi')
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator

import numpy as np

from data_pipeline.errors import DataError

EOT_NAMES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eot_id|>")


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


class HFTokenizer:
    """A Hugging Face `tokenizers` tokenizer (trained BPE, or a tokenizer.json file)."""

    def __init__(self, tokenizer_json: str, name: str):
        from tokenizers import Tokenizer

        try:
            self.tok = Tokenizer.from_str(tokenizer_json)
        except Exception as e:  # the Rust side raises plain Exceptions for bad JSON
            raise DataError(f"the tokenizer file is not a valid Hugging Face tokenizer.json ({e})") from None
        self.name, self.json = name, tokenizer_json
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        ids = [self.tok.token_to_id(t) for t in EOT_NAMES]
        found = [i for i in ids if i is not None]
        if not found:
            raise DataError(
                f"the tokenizer has none of the end-of-text tokens {', '.join(EOT_NAMES)}: add one as a special token"
            )
        self.eot = found[0]
        self.dtype = token_dtype(self.vocab_size)

    def encode(self, text: str | bytes) -> np.ndarray:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return np.array(self.tok.encode(text, add_special_tokens=False).ids, dtype=self.dtype)

    def encode_many(self, texts: list[str]) -> list[np.ndarray]:
        """Several texts at once, on all cores (the Rust side parallelises the batch)."""
        return [np.array(e.ids, dtype=self.dtype) for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def to_dict(self) -> dict:
        return {"name": self.name, "vocab_size": self.vocab_size, "eot": self.eot, "json": self.json}


def train_bpe(texts: Iterator[str], vocab_size: int) -> HFTokenizer:
    """Byte-level BPE with `<|endoftext|>`, trained on `texts`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return HFTokenizer(tok.to_str(), "bpe")


def parse_spec(spec: str) -> tuple[str, str | int | None]:
    """('byte', None), ('bpe', vocab_size) or ('file', path); DataError for anything else."""
    if spec == "byte":
        return "byte", None
    if spec.startswith("bpe:"):
        size = spec[4:]
        if not size.isdigit() or not 256 + 1 < int(size) <= 2**20:
            raise DataError(
                f"tokenizer '{spec}': give bpe:VOCAB_SIZE with a size between 258 and {2**20}, e.g. bpe:8192"
            )
        return "bpe", int(size)
    if spec.endswith(".json") or os.path.isfile(spec):
        if not os.path.isfile(spec):
            raise DataError(f"tokenizer file {spec} not found: give the path to a Hugging Face tokenizer.json")
        return "file", spec
    raise DataError(f"unknown tokenizer '{spec}': use byte, bpe:VOCAB_SIZE or the path to a tokenizer.json")


def build_tokenizer(spec: str, sample: Iterator[str] | None = None):
    """The tokenizer named by `--tokenizer` / `data.tokenizer`; BPE trains on `sample`."""
    kind, arg = parse_spec(spec)
    if kind == "byte":
        return ByteTokenizer()
    if kind == "bpe":
        return train_bpe(sample if sample is not None else iter(()), arg)
    with open(arg, encoding="utf-8") as f:
        return HFTokenizer(f.read(), "file")


def tokenizer_from_dict(d: dict):
    """The tokenizer saved by `to_dict()` in a manifest or a checkpoint."""
    if d.get("name") == "byte":
        return ByteTokenizer()
    if "json" in d:
        return HFTokenizer(d["json"], d["name"])
    raise DataError(f"unknown tokenizer {d.get('name')!r} in the dataset or checkpoint")


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every id."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)
