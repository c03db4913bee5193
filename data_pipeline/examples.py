"""Fine-tuning examples (`prepare --format chat|prompt-completion`): records → token ids with
per-token loss flags → whole examples packed into rows of exactly one training window.

A stored token is a uint32: the id in the low 24 bits, flags in the high byte (`value =
id | flags << FLAG_SHIFT`): FLAG_PROMPT (not trained when only the answers are), FLAG_START
(an example's first token; also padding's first), FLAG_PAD (filler, never trained).
Pre-training data has no flags (the bits are 0), so mixed sources share one form.

Chat: the tokenizer's chat template renders the messages (transformers' own renderer); an
assistant turn's text is what rendering up to it adds after the generation prompt (its
content and end-of-turn token; what the template writes after the tokenizer's eos token,
such as ChatML's newline, is not trained). The full text is tokenized once, with offsets;
tokens starting inside an assistant turn are trained, the rest flagged FLAG_PROMPT.
Prompt-completion: prompt + completion tokenized as the tokenizer does on its own (its BOS
first, if it adds one), tokens starting inside the prompt flagged FLAG_PROMPT, + [eot].

Packing (`Packer`): rows of seq_len + 1 tokens, so that a window (inputs row[:-1], targets
row[1:]) is one row. Each example goes whole into the first open row with room (first fit
over PACK_OPEN_ROWS open rows, in input order, so deterministic); with none and all rows
open, the fullest is closed and padded. An example longer than a row keeps its first
seq_len + 1 tokens (counted as truncated); no row starts inside an example.
"""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import Iterator

import numpy as np

from data_pipeline import readers
from data_pipeline.errors import DataError
from data_pipeline.manifest import SPLITS, is_val

FLAG_SHIFT = 24
TOKEN_MASK = (1 << FLAG_SHIFT) - 1  # token id = value & TOKEN_MASK, flags = value >> FLAG_SHIFT
FLAG_PROMPT, FLAG_START, FLAG_PAD = 1, 2, 4
FLAGS = {"shift": FLAG_SHIFT, "prompt": FLAG_PROMPT, "start": FLAG_START, "pad": FLAG_PAD}
FORMATS = ("text", "chat", "prompt-completion")
ROLES = ("system", "user", "assistant", "tool")
FIELDS = {"chat": ("messages",), "prompt-completion": ("prompt", "completion")}
PACK_OPEN_ROWS = 64
CHAT_HINT = "give each record a 'messages' list of {role, content} messages, or pass --on-error skip"
ROLE_HINT = f"use one of the roles {', '.join(ROLES)}, or pass --on-error skip"
PC_HINT = "give each record 'prompt' and 'completion' strings, or pass --on-error skip"


def check_options(fmt: str, seq_len: int | None) -> None:
    """`prepare`'s --format and --seq-len, checked before anything is read."""
    if fmt not in FORMATS:
        raise DataError(f"--format {fmt}: use {', '.join(FORMATS)}")
    if fmt == "text":
        if seq_len is not None:
            raise DataError("--seq-len packs fine-tuning examples: drop it, or use --format chat or prompt-completion")
        return
    if seq_len is None:
        raise DataError(
            f"--format {fmt} packs examples into rows of one training sequence: give --seq-len, the data.seq_len "
            "you will train with (e.g. --seq-len 2048)"
        )
    if not isinstance(seq_len, int) or seq_len < 1:
        raise DataError(f"--seq-len {seq_len} must be a positive number of tokens, e.g. --seq-len 2048")


def no_template(fmt: str, spec: str) -> DataError | None:
    """The error for --format chat with a tokenizer that cannot have a chat template (byte,
    bpe:N, a bare tokenizer.json), known before it is built; None otherwise."""
    from data_pipeline.tokenizer import HF, parse_spec

    if fmt == "chat" and parse_spec(spec)[0] != HF:
        return DataError(
            f"tokenizer {spec} has no chat template: --format chat needs a Hugging Face model folder whose "
            "tokenizer_config.json (or chat_template.jinja) has one; or use --format prompt-completion"
        )
    return None


def check_tokenizer(tok, fmt: str, spec: str) -> None:
    """The tokenizer can make `fmt` examples: ids fit 24 bits, chat has a template."""
    if tok.vocab_size > TOKEN_MASK + 1:
        raise DataError(f"tokenizer {spec} has {tok.vocab_size:,} tokens: --format {fmt} stores ids in 24 bits")
    if fmt == "chat" and not getattr(tok, "chat_template", None):
        raise DataError(
            f"tokenizer {spec} has no chat template: --format chat needs a Hugging Face model folder whose "
            "tokenizer_config.json (or chat_template.jinja) has one; or use --format prompt-completion"
        )


def _flagged(ids: np.ndarray, flags: np.ndarray) -> np.ndarray:
    out = ids.astype(np.uint32) | (flags.astype(np.uint32) << FLAG_SHIFT)
    if len(out):
        out[0] |= FLAG_START << FLAG_SHIFT
    return out


def check_messages(messages, where: str) -> tuple[str, str] | None:
    """(what is wrong with a record's `messages`, the fix), or None when nothing is."""
    if messages is None:
        return f"{where} has no 'messages' list", CHAT_HINT
    if not isinstance(messages, list):
        return f"{where}: 'messages' is a {type(messages).__name__}, not a list", CHAT_HINT
    if not messages:
        return f"{where}: 'messages' is empty", CHAT_HINT
    for k, m in enumerate(messages, 1):
        if not isinstance(m, dict):
            return f"{where}: message {k} is a {type(m).__name__}, not a {{role, content}} object", CHAT_HINT
        if m.get("role") not in ROLES:
            return f"{where}: message {k} has role {m.get('role')!r}", ROLE_HINT
        if not isinstance(m.get("content"), str) and not (m.get("content") is None and m["role"] == "assistant"):
            return f"{where}: message {k}'s content is {type(m.get('content')).__name__}, not a string", readers.FIX
    return None


class BadExample(ValueError):
    """An example that cannot be encoded: `args` = (what is wrong, the fix)."""


def assistant_spans(tok, messages: list[dict], text: str, where: str) -> list[tuple[int, int]]:
    """The character spans of `text` (the whole conversation rendered) that the assistant
    turns add: render(messages[:i], add_generation_prompt=True) must be a prefix of
    render(messages[:i + 1]), itself a prefix of `text`. A span ends after the tokenizer's
    eos token when it holds one (ChatML's newline after <|im_end|> is not the model's)."""
    eos = getattr(tok, "eos_token", None)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = tok.render_chat(messages[:i], add_generation_prompt=True)
        upto = tok.render_chat(messages[: i + 1])
        if not upto.startswith(before) or not text.startswith(upto):
            raise BadExample(
                f"{where}: the chat template does not render the conversation up to message {i + 1} as the start of "
                "the whole, so its assistant turns cannot be found",
                "use a template that renders earlier turns the same whatever follows, or pass --on-error skip",
            )
        start, end = len(before), len(upto)
        if eos:
            k = text.rfind(eos, start, end)
            end = k + len(eos) if k >= 0 else end
        spans.append((start, end))
    return spans


def encode_chat(tok, messages: list[dict], where: str) -> tuple[np.ndarray, int]:
    """(flagged tokens, rendered bytes) of one checked conversation; BadExample when the
    template fails on it or its assistant turns cannot be found."""
    try:
        text = tok.render_chat(messages)
        spans = assistant_spans(tok, messages, text, where)
    except BadExample:
        raise
    except Exception as e:  # noqa: BLE001 - a template's own error (jinja2's and the like), named
        raise BadExample(f"{where}: the chat template fails on it ({type(e).__name__}: {e})", readers.FIX) from None
    ids, starts = tok.encode_offsets(text)
    trained = np.zeros(len(ids), dtype=bool)
    for start, end in spans:
        trained |= (starts >= start) & (starts < end)
    return _flagged(ids, np.where(trained, 0, FLAG_PROMPT)), len(text.encode())


def encode_prompt_completion(tok, prompt: str, completion: str) -> np.ndarray:
    """prompt + completion as the tokenizer encodes the text on its own (`tokenizer(prompt +
    completion)`, as a model's users and TRL do: a BOS its post-processor adds, Llama 3's
    <|begin_of_text|>, comes first; ChatML tokenizers add none), then the end-of-text token
    unless that already ends it. The prompt, not trained when only answers are: the tokens
    that start inside it and the special tokens before it."""
    ids, starts, added = tok.encode_special(prompt + completion)
    content = np.flatnonzero(~added)
    before = np.arange(len(ids)) < (content[0] if len(content) else len(ids))  # BOS and the like
    flags = np.where((starts < len(prompt)) & ~added | added & before, FLAG_PROMPT, 0).astype(np.uint32)
    if not len(ids) or ids[-1] != tok.eot:
        ids, flags = np.append(ids, tok.eot), np.append(flags, np.uint32(0))
    return _flagged(ids.astype(np.uint32), flags)


def example_records(path: str, fmt: str, skips: readers.Skips) -> Iterator[tuple[str, object, bytes]]:
    """(where, the example's fields, its canonical bytes) of each good record of one file:
    chat → the messages, prompt-completion → (prompt, completion). Bad records go to
    `skips` (DataError naming file and line under --on-error fail). The canonical bytes
    (the fields as JSON) are what the val split hashes: the same example lands in the same
    split from .jsonl or .parquet."""
    with contextlib.closing(readers.records(path, FIELDS[fmt], skips)) as found:
        for where, record in found:
            if fmt == "chat":
                messages = record.get("messages")
                problem = check_messages(messages, where)
                if problem is not None:
                    skips.document(*problem)
                    continue
                fields = [{"role": m["role"], "content": m.get("content")} for m in messages]
                yield where, messages, json.dumps(fields, ensure_ascii=False).encode()
            else:
                bad = next((f for f in FIELDS[fmt] if not isinstance(record.get(f), str)), None)
                if bad is not None:
                    got = "no" if bad not in record or record[bad] is None else f"a {type(record[bad]).__name__} as its"
                    skips.document(f"{where} has {got} '{bad}' field, not a string", PC_HINT)
                    continue
                pair = (record["prompt"], record["completion"])
                yield where, pair, json.dumps(pair, ensure_ascii=False).encode()


def example_texts(path: str, fmt: str, on_error: str = "fail") -> Iterator[str]:
    """The texts of a file's examples (message contents; prompts and completions), for
    training a BPE tokenizer on them."""
    for _, fields, _ in example_records(path, fmt, readers.Skips(on_error)):
        if fmt == "chat":
            yield from (m.get("content") or "" for m in fields)
        else:
            yield from fields


@functools.lru_cache(maxsize=4)
def _tokenizer(spec: str):
    from data_pipeline.tokenizer import tokenizer_from_dict

    return tokenizer_from_dict(json.loads(spec))


def encode_examples(path: str, tokenizer: str, val_fraction: float, fmt: str, on_error: str = "fail") -> dict:
    """One input file's examples, tokenized and flagged: the same result as
    prepare.encode_file (`tokens` uint32 with flags, every example's end in `ends`, `splits`,
    `sizes`, `skipped`), so it runs in a worker process or a Ray task alike."""
    tok = _tokenizer(tokenizer)
    skips = readers.Skips(on_error)
    pieces: list[np.ndarray] = []
    splits: list[int] = []
    sizes: list[int] = []
    for where, fields, canonical in example_records(path, fmt, skips):
        if fmt == "chat":
            try:
                tokens, size = encode_chat(tok, fields, where)
            except BadExample as e:
                skips.document(*e.args)
                continue
        else:
            tokens, size = encode_prompt_completion(tok, *fields), len(fields[0].encode()) + len(fields[1].encode())
        pieces.append(tokens)
        splits.append(SPLITS.index("val" if is_val(canonical, val_fraction) else "train"))
        sizes.append(size)
    return {
        "tokens": np.concatenate(pieces) if pieces else np.zeros(0, np.uint32),
        "ends": np.cumsum(np.array([len(p) for p in pieces], dtype=np.int64)),
        "splits": np.array(splits, dtype=np.uint8),
        "sizes": np.array(sizes, dtype=np.int64),
        "skipped": skips.as_dict(),
    }


class Packer:
    """Whole examples into rows of `row` tokens, first fit over at most `open_rows` open
    rows, in the order given (module docstring); rows come out as they close, padded with
    `pad_id` (FLAG_START | FLAG_PAD on the first pad token, FLAG_PAD after). Counts the
    examples, the truncated ones, padding and trained tokens (flag bits 0)."""

    def __init__(self, row: int, pad_id: int, open_rows: int = PACK_OPEN_ROWS):
        self.row, self.open_rows = row, open_rows
        self.pad = np.uint32(pad_id | FLAG_PAD << FLAG_SHIFT)
        self.parts: list[list[np.ndarray]] = []  # the open rows' examples
        self.fill: list[int] = []
        self.examples = self.truncated = self.padding = self.trained = self.rows = 0

    def add(self, example: np.ndarray) -> list[np.ndarray]:
        """Place one example; the rows that closed."""
        if len(example) > self.row:
            example, self.truncated = example[: self.row], self.truncated + 1
        self.examples += 1
        self.trained += int(np.count_nonzero(example >> FLAG_SHIFT == 0))
        n, closed = len(example), []
        i = next((i for i, f in enumerate(self.fill) if f + n <= self.row), None)
        if i is None:
            if len(self.fill) == self.open_rows:
                closed.append(self._close(int(np.argmax(self.fill))))
            self.parts.append([])
            self.fill.append(0)
            i = len(self.fill) - 1
        self.parts[i].append(example)
        self.fill[i] += n
        if self.fill[i] == self.row:
            closed.append(self._close(i))
        return closed

    def finish(self) -> list[np.ndarray]:
        """The rows still open, in the order they were opened."""
        return [self._close(0) for _ in range(len(self.fill))]

    def _close(self, i: int) -> np.ndarray:
        parts, fill = self.parts.pop(i), self.fill.pop(i)
        pad = np.full(self.row - fill, self.pad, dtype=np.uint32)
        if len(pad):
            pad[0] |= np.uint32(FLAG_START << FLAG_SHIFT)
        self.padding += len(pad)
        self.rows += 1
        return np.concatenate([*parts, pad])

    def counts(self) -> dict:
        return {
            "examples": self.examples,
            "truncated": self.truncated,
            "rows": self.rows,
            "padding_tokens": self.padding,
            "trained_tokens": self.trained,
        }


def window_stride(manifest: dict, seq_len: int, name: str | None = None) -> int:
    """How far apart the windows of seq_len + 1 tokens of a dataset start: seq_len (each
    token a target once; windows overlap by a token), or, for packed examples, seq_len + 1
    (each window is one whole row). DataError when packed rows do not fit `seq_len`."""
    packed = manifest.get("seq_len") if manifest.get("examples") else None
    if packed is None:
        return seq_len
    if packed != seq_len:
        name = name or manifest.get("name") or manifest.get("root")
        raise DataError(
            f"dataset {name} is packed for seq_len {packed} (prepare --seq-len {packed}) but data.seq_len is "
            f"{seq_len}: set data.seq_len={packed} or prepare it again with --seq-len {seq_len}"
        )
    return seq_len + 1


class RowSamples:
    """Packed rows grouped into tar samples of whole rows (as many as fit `sample_tokens`,
    at least one), handed to `write` (ShardWriter.write): chunks and shards then close only
    between rows."""

    def __init__(self, write, row: int, sample_tokens: int):
        self.write, self.per_sample, self.rows = write, max(sample_tokens // row, 1), []

    def add(self, rows: list[np.ndarray]) -> None:
        self.rows += rows
        while len(self.rows) >= self.per_sample:
            self.write(np.concatenate(self.rows[: self.per_sample]))
            del self.rows[: self.per_sample]

    def flush(self) -> None:
        if self.rows:
            self.write(np.concatenate(self.rows))
            self.rows = []
