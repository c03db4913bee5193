"""Raw-text WebDataset shards written by others (a .tar URL or brace list), tokenized as
they are read, without a prepare step. Their token counts are unknown until read, so an
epoch ends where the data ends and a resume replays the epoch up to its position.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from data_pipeline.errors import DataError, error_text
from data_pipeline.sources import is_url, open_stream, with_retries
from data_pipeline.tokenizer import build_tokenizer, parse_spec, token_dtype

FORMAT = "trainctl.raw-shards"


@dataclass(frozen=True)
class RawOptions:
    """How to read raw-text shards (ignored for prepared datasets)."""

    tokenizer: str = "byte"  # byte or a tokenizer.json path (BPE must be trained by `trainctl prepare`)
    text_field: str = "text"  # the document's field in .json / .jsonl members
    allow_pipe: bool = False  # `pipe:COMMAND` shard URLs run shell commands: off unless asked for


def is_shard_list(path: str) -> bool:
    return path.startswith("pipe:") or path.rstrip("}").endswith(".tar") or (".tar" in path and "{" in path)


def shard_urls(spec: str, allow_pipe: bool = False) -> list[str]:
    """The URLs of a brace-notation shard list, checked: pipe: only when allowed, local
    files must exist."""
    import os

    from braceexpand import braceexpand

    urls = list(braceexpand(spec))
    if any(u.startswith("pipe:") for u in urls) and not allow_pipe:
        raise DataError(
            f"data.path {spec!r} is a pipe: URL, which runs a shell command: set data.allow_pipe=true to allow it"
        )
    missing = [u for u in urls if not is_url(u) and not u.startswith("pipe:") and not os.path.isfile(u)]
    if missing:
        raise DataError(
            f"data.path {spec!r}: {len(missing)} of {len(urls)} shards do not exist, the first {missing[0]}: "
            "check the path and the brace range"
        )
    return urls


def raw_manifest(spec: str, options: RawOptions, urls: list[str] | None = None) -> dict:
    """A manifest for raw-text shards: the train split is every shard, there is no val split."""
    if parse_spec(options.tokenizer)[0] == "bpe":
        raise DataError(
            f"data.tokenizer={options.tokenizer} is trained on the corpus by `trainctl prepare`: "
            "for raw-text shards use byte or a tokenizer.json path"
        )
    tok = build_tokenizer(options.tokenizer)
    shards = [{"url": u, "path": u} for u in (urls or shard_urls(spec, options.allow_pipe))]
    return {
        "format": FORMAT,
        "name": spec,
        "root": spec,
        "tokenizer": tok.to_dict(),
        "dtype": token_dtype(tok.vocab_size).name,
        "splits": {"train": {"shards": shards}, "val": {"shards": []}},
        "options": options,
    }


RAW_HELP = (
    "give WebDataset .tar shards of .txt, .json or .jsonl samples, raw text (a file, folder or glob) or a "
    "prepared dataset folder (`trainctl prepare`)"
)


def tar_header_problem(head: bytes) -> str | None:
    """Why the first 512 bytes of a file are not a tar member's header, or None when they are."""
    import tarfile

    if head.startswith((b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")):
        return None  # a compressed tar (gzip, bzip2, xz), which tarfile reads too: its first sample tells
    if len(head) < tarfile.BLOCKSIZE:
        return f"{len(head):,} bytes, less than one 512-byte tar header"
    try:
        tarfile.TarInfo.frombuf(head[: tarfile.BLOCKSIZE], tarfile.ENCODING, "surrogateescape")
    except tarfile.EOFHeaderError:
        return "an empty tar: its first block is all zeros"
    except tarfile.HeaderError:
        return "its first 512 bytes are no tar header"
    return None


def check_shards(manifest: dict, text_field: str = "text") -> None:
    """Raw-text shards checked before a job starts, so a file that is not one fails here in
    one line (DataError) rather than in every worker after launch: each local shard must
    begin with a tar header, and the first shard's first sample (read through, local or a
    URL) must hold text (.txt, .json or .jsonl with `text_field`). `pipe:` shards are not
    run here."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    urls = [s["url"] for s in manifest["splits"]["train"]["shards"] if not s["url"].startswith("pipe:")]
    for url in urls:
        if is_url(url) and not url.startswith("file://"):
            continue
        with open(url.removeprefix("file://"), "rb") as f:
            problem = tar_header_problem(f.read(512))
        if problem:
            raise DataError(f"data.path: {url} is not a tar file ({problem}): {RAW_HELP}")
    if not urls:
        return
    url = urls[0]
    with with_retries(lambda: open_stream(url), url) as stream:
        try:
            first = next(group_by_keys(tar_file_expander([{"url": url, "stream": stream}])), None)
        except DataError:
            raise
        except Exception as e:  # noqa: BLE001 - a broken tar, named
            raise DataError(f"data.path: {url} is not a readable tar file ({error_text(e, url)}): {RAW_HELP}") from None
    if first is None:
        raise DataError(f"data.path: {url} holds no samples: {RAW_HELP}")
    documents(first, url, text_field)  # DataError when the sample holds no text


def json_text(raw: str | bytes, text_field: str, where: str, hint: str) -> str:
    """The text in one JSON record's `text_field`; DataError naming `where` otherwise."""
    try:
        record = json.loads(raw)
    except ValueError as e:
        raise DataError(f"{where} is not valid JSON ({e})") from None
    if not isinstance(record, dict) or text_field not in record:
        raise DataError(f"{where} has no '{text_field}' field: {hint}")
    return str(record[text_field])


def documents(sample: dict, url: str, text_field: str) -> list[str]:
    """The documents of one raw sample."""
    key = sample.get("__key__")
    if "txt" in sample:
        return [sample["txt"].decode("utf-8", errors="replace")]
    for ext in ("json", "jsonl"):
        if ext in sample:
            lines = sample[ext].decode("utf-8", errors="replace").splitlines() if ext == "jsonl" else [sample[ext]]
            return [
                json_text(
                    line,
                    text_field,
                    f"shard {url}: sample {key}'s .{ext}",
                    "set data.text_field to the field that holds the text",
                )
                for line in lines
                if str(line).strip()
            ]
    if "tokens" in sample:
        raise DataError(
            f"shard {url} holds token samples (.tokens) but no manifest.json beside it lists it: point "
            "data.path at the prepared dataset's folder, or keep its manifest.json beside the shards"
        )
    raise DataError(
        f"shard {url}: sample {key} has no .txt, .json or .jsonl member (it has {sorted(k for k in sample if not k.startswith('__'))})"
    )


def tokenize_sample(sample: dict, url: str, tok, text_field: str) -> list[np.ndarray]:
    """Token arrays for a raw sample's documents, each followed by end-of-text."""
    eot = np.array([tok.eot], dtype=token_dtype(tok.vocab_size))
    out = []
    for doc in documents(sample, url, text_field):
        out += [tok.encode(doc).astype(eot.dtype, copy=False), eot]
    return out
