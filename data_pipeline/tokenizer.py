"""Tokenizers behind one interface (`encode`, `encode_special`, `decode`, `vocab_size`,
`eot`, `pad_id`, `to_dict`): `byte` (ids 0..255, end-of-text 256), `bpe:VOCAB_SIZE`
(byte-level BPE that `prepare` trains on the corpus), a Hugging Face tokenizer.json, or a
Hugging Face model folder (`hf`: its tokenizer.json, and tokenizer_config.json's special
tokens and chat template). The dict form travels in manifest.json and every checkpoint, so a checkpoint
samples without the dataset.

>>> tok = ByteTokenizer()
>>> tok.encode("hi").tolist(), tok.decode([104, 105, 256])
([104, 105], 'hi')
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator

import numpy as np

from data_pipeline.errors import DataError

EOT_NAMES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eot_id|>")
HF = "hf"  # the name of a tokenizer read from a Hugging Face model folder


class ByteTokenizer:
    """UTF-8 bytes as tokens, plus one end-of-text token."""

    name = "byte"
    vocab_size = 257
    eot = pad_id = 256
    chat_template = None

    def encode(self, text: str | bytes) -> np.ndarray:
        data = text.encode("utf-8") if isinstance(text, str) else text
        return np.frombuffer(data, dtype=np.uint8).astype(np.uint16)

    def encode_special(self, text: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """HFTokenizer.encode_special: bytes add no special tokens; each starts at its character."""
        ids = self.encode(text)
        chars = np.cumsum([0] + [len(c.encode("utf-8")) for c in text])  # each character's first byte
        return ids, np.searchsorted(chars, np.arange(len(ids)), side="right") - 1, np.zeros(len(ids), dtype=bool)

    def decode(self, ids: Iterable[int]) -> str:
        """Text for `ids`; end-of-text tokens are dropped, broken UTF-8 becomes U+FFFD."""
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def to_dict(self) -> dict:
        return {"name": self.name, "vocab_size": self.vocab_size, "eot": self.eot}


class HFTokenizer:
    """A Hugging Face `tokenizers` tokenizer (trained BPE, a tokenizer.json file, or a model
    folder's: then also its special tokens and chat template).

    `eot` is the id of `eos_token` when one is named (a model folder's tokenizer_config.json),
    else the first of EOT_NAMES the vocabulary has; `pad_id` that of `pad_token`, else `eot`."""

    def __init__(
        self,
        tokenizer_json: str,
        name: str,
        chat_template: str | None = None,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
    ):
        from tokenizers import Tokenizer

        try:
            self.tok = Tokenizer.from_str(tokenizer_json)
        except Exception as e:  # the Rust side raises plain Exceptions for bad JSON
            raise DataError(f"the tokenizer file is not a valid Hugging Face tokenizer.json ({e})") from None
        self.name, self.json = name, tokenizer_json
        self.chat_template, self.bos_token, self.eos_token, self.pad_token = (
            chat_template,
            bos_token,
            eos_token,
            pad_token,
        )
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        if eos_token is not None:
            self.eot = self.tok.token_to_id(eos_token)
            if self.eot is None:
                raise DataError(
                    f"the tokenizer's eos_token {eos_token!r} is not in its tokenizer.json: "
                    "fix eos_token in tokenizer_config.json"
                )
        else:
            ids = [self.tok.token_to_id(t) for t in EOT_NAMES]
            found = [i for i in ids if i is not None]
            if not found:
                raise DataError(
                    f"the tokenizer has none of the end-of-text tokens {', '.join(EOT_NAMES)}: add one as a special token"
                )
            self.eot = found[0]
        pad = self.tok.token_to_id(pad_token) if pad_token is not None else None
        self.pad_id = self.eot if pad is None else pad
        self.dtype = token_dtype(self.vocab_size)
        self._chat = None  # transformers' tokenizer, built on first render_chat

    def encode(self, text: str | bytes) -> np.ndarray:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return np.array(self.tok.encode(text, add_special_tokens=False).ids, dtype=self.dtype)

    def encode_offsets(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """(ids, where each token starts in `text`, in characters)."""
        enc = self.tok.encode(text, add_special_tokens=False)
        return np.array(enc.ids, dtype=self.dtype), np.array([o[0] for o in enc.offsets], dtype=np.int64)

    def encode_special(self, text: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`text` as the tokenizer encodes it on its own, as `tokenizer(text)` does: with the
        special tokens its post-processor adds (Llama 3's <|begin_of_text|>; none for ChatML
        tokenizers). (ids, where each token starts in `text` in characters, whether the
        post-processor added it)."""
        enc = self.tok.encode(text, add_special_tokens=True)
        return (
            np.array(enc.ids, dtype=self.dtype),
            np.array([o[0] for o in enc.offsets], dtype=np.int64),
            np.array(enc.special_tokens_mask, dtype=bool),
        )

    def encode_many(self, texts: list[str]) -> list[np.ndarray]:
        """Several texts at once, on all cores (the Rust side parallelises the batch)."""
        return [np.array(e.ids, dtype=self.dtype) for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """`messages` as text, by the chat template, rendered by transformers itself (the
        renderer a model's users chat through), so training sees the same text."""
        if self._chat is None:
            from tokenizers import Tokenizer
            from transformers import PreTrainedTokenizerFast

            self._chat = PreTrainedTokenizerFast(
                tokenizer_object=Tokenizer.from_str(self.json),
                chat_template=self.chat_template,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
                pad_token=self.pad_token,
            )
        return self._chat.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def to_dict(self) -> dict:
        d = {"name": self.name, "vocab_size": self.vocab_size, "eot": self.eot, "json": self.json}
        if self.name == HF:
            d.update(
                chat_template=self.chat_template,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
                pad_token=self.pad_token,
            )
        return d


def _special(config: dict, key: str) -> str | None:
    """A special token of tokenizer_config.json: a string, or {"content": ...}."""
    value = config.get(key)
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def load_folder(folder: str) -> HFTokenizer:
    """The tokenizer of a Hugging Face model folder: tokenizer.json, and from
    tokenizer_config.json the bos/eos/pad tokens and the chat template (or
    chat_template.jinja beside it, where transformers 5 writes it)."""
    path = os.path.join(folder, "tokenizer.json")
    if not os.path.isfile(path):
        raise DataError(
            f"tokenizer folder {folder} has no tokenizer.json: give a Hugging Face model folder that holds one"
        )
    config: dict = {}
    config_path = os.path.join(folder, "tokenizer_config.json")
    if os.path.isfile(config_path):
        try:
            with open(config_path, encoding="utf-8") as f:
                config = json.load(f)
        except ValueError as e:
            raise DataError(f"{config_path} is not valid JSON ({e}): fix it or download the model again") from None
        if not isinstance(config, dict):
            raise DataError(f"{config_path} is not a JSON object: fix it or download the model again")
    template = config.get("chat_template")
    if isinstance(template, list):  # older files: named templates, the "default" one used
        template = next(
            (t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"), None
        )
    jinja = os.path.join(folder, "chat_template.jinja")
    if os.path.isfile(jinja):
        with open(jinja, encoding="utf-8") as f:
            template = f.read()
    with open(path, encoding="utf-8") as f:
        text = f.read()
    return HFTokenizer(
        text,
        HF,
        chat_template=template if isinstance(template, str) and template else None,
        bos_token=_special(config, "bos_token"),
        eos_token=_special(config, "eos_token"),
        pad_token=_special(config, "pad_token"),
    )


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
    """('byte', None), ('bpe', vocab_size), ('file', path) or ('hf', folder); DataError for
    anything else."""
    if spec == "byte":
        return "byte", None
    if spec.startswith("bpe:"):
        size = spec[4:]
        if not size.isdigit() or not 256 + 1 < int(size) <= 2**20:
            raise DataError(
                f"tokenizer '{spec}': give bpe:VOCAB_SIZE with a size between 258 and {2**20}, e.g. bpe:8192"
            )
        return "bpe", int(size)
    if os.path.isdir(spec):
        if not os.path.isfile(os.path.join(spec, "tokenizer.json")):
            raise DataError(
                f"tokenizer folder {spec} has no tokenizer.json: give a Hugging Face model folder that holds one"
            )
        return HF, spec
    if spec.endswith(".json") or os.path.isfile(spec):
        if not os.path.isfile(spec):
            raise DataError(f"tokenizer file {spec} not found: give the path to a Hugging Face tokenizer.json")
        return "file", spec
    raise DataError(
        f"unknown tokenizer '{spec}': use byte, bpe:VOCAB_SIZE, the path to a tokenizer.json or a Hugging Face "
        "model folder"
    )


def build_tokenizer(spec: str, sample: Iterator[str] | None = None):
    """The tokenizer named by `--tokenizer` / `data.tokenizer`; BPE trains on `sample`."""
    kind, arg = parse_spec(spec)
    if kind == "byte":
        return ByteTokenizer()
    if kind == "bpe":
        return train_bpe(sample if sample is not None else iter(()), arg)
    if kind == HF:
        return load_folder(arg)
    with open(arg, encoding="utf-8") as f:
        return HFTokenizer(f.read(), "file")


def tokenizer_from_dict(d: dict):
    """The tokenizer saved by `to_dict()` in a manifest or a checkpoint."""
    if d.get("name") == "byte":
        return ByteTokenizer()
    if "json" in d:
        extra = {k: d.get(k) for k in ("chat_template", "bos_token", "eos_token", "pad_token")}
        return HFTokenizer(d["json"], d["name"], **extra)
    raise DataError(f"unknown tokenizer {d.get('name')!r} in the dataset or checkpoint")


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every id."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)
