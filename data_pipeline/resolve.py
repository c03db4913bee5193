"""From `data.path` to a prepared dataset folder: a prepared dataset is used as it is; raw
text or `stdlib` (the Python standard library's source, `default_corpus`) is prepared once
into a cache folder named by a hash of its inputs, so later runs and other ranks find it
ready and an edited input gets a new folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import sysconfig
from pathlib import Path

from data_pipeline.errors import DataError
from data_pipeline.manifest import FORMAT
from data_pipeline.prepare import AUTO_SHARD_BYTES, expand_inputs, prepare
from data_pipeline.raw import is_shard_list
from data_pipeline.readers import check_heads
from data_pipeline.shards import CHUNK_BYTES
from data_pipeline.sources import is_url


def tokenizer_tag(tokenizer: str) -> tuple[str, str]:
    """(a name for cache folders, what identifies the tokenizer) for a `data.tokenizer` spec:
    a tokenizer file or model folder is named by its base name and identified by its
    tokenizer.json's content, so an edited file is a new dataset."""
    if tokenizer == "byte" or tokenizer.startswith("bpe:"):
        return tokenizer.replace(":", ""), tokenizer
    file = os.path.join(tokenizer, "tokenizer.json") if os.path.isdir(tokenizer) else tokenizer
    if not os.path.isfile(file):
        return "tok", tokenizer
    h = hashlib.sha256()
    # A model folder's chat template and special tokens decide the loss flags and the packing too.
    extra = (
        ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja") if os.path.isdir(tokenizer) else ()
    )
    for path in [file] + [os.path.join(tokenizer, n) for n in extra if os.path.isfile(os.path.join(tokenizer, n))]:
        with open(path, "rb") as f:
            h.update(f.read())
    digest = h.hexdigest()
    name = os.path.basename(os.path.normpath(tokenizer if os.path.isdir(tokenizer) else os.path.dirname(file)))
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name) or "tok", digest


def _fingerprint(
    paths: list[str], tokenizer: str, val_fraction: float, text_field: str, fmt: str = "text", seq_len=None
) -> str:
    tokenizer = tokenizer_tag(tokenizer)[1]
    what = [AUTO_SHARD_BYTES, CHUNK_BYTES, tokenizer, val_fraction, text_field] + (
        [fmt, seq_len] if fmt != "text" else []
    )
    h = hashlib.sha256(json.dumps(what).encode())
    for p in paths:
        st = os.stat(p)
        h.update(f"{os.path.abspath(p)}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    return h.hexdigest()[:16]


def resolve_dataset(
    path: str,
    cache_dir: str,
    tokenizer: str = "byte",
    val_fraction: float = 0.1,
    text_field: str = "text",
    fmt: str = "text",
    seq_len: int | None = None,
) -> str:
    """The prepared dataset folder for `path`, preparing raw files into cache_dir if needed
    (`fmt` chat or prompt-completion: records packed into rows of seq_len + 1 tokens).

    >>> resolve_dataset("data/tinyshakespeare.txt", ".cache/trainctl")  # doctest: +SKIP
    '.cache/trainctl/tinyshakespeare-3f9a...'
    """
    if is_shard_list(path):  # raw-text WebDataset shards: read as they are, no prepare step
        return path
    if path == "stdlib":
        return default_corpus(cache_dir, tokenizer, val_fraction)
    if is_url(path) or os.path.isfile(os.path.join(path, "manifest.json")):  # a URL names a prepared dataset
        return path
    if path.endswith("manifest.json") and os.path.isfile(path):
        return os.path.dirname(path)
    try:
        files = expand_inputs([path])
    except DataError as e:
        raise DataError(f"data.path: {e}") from None
    stem = Path(files[0]).stem if len(files) == 1 else Path(path.split("*")[0].rstrip("/")).name or "data"
    h = _fingerprint(files, tokenizer, val_fraction, text_field, fmt, seq_len)
    out = os.path.join(cache_dir, f"{stem}-{tokenizer_tag(tokenizer)[0]}-{h}")
    if not os.path.isfile(os.path.join(out, "manifest.json")):
        try:
            check_heads(files)  # a binary file, or random bytes named .tar, before anything is written
        except DataError as e:
            raise DataError(f"data.path: {e}") from None
        if os.path.exists(cache_dir) and not os.path.isdir(cache_dir):
            raise DataError(f"data.cache_dir {cache_dir} is a file: set data.cache_dir to a folder")
        prepare(
            [path],
            out,
            tokenizer=tokenizer,
            val_fraction=val_fraction,
            shard_size_bytes=AUTO_SHARD_BYTES,
            overwrite=True,
            text_field=text_field,
            format=fmt,
            seq_len=seq_len if fmt != "text" else None,
        )
    return out


def stdlib_files() -> list[str]:
    """The Python standard library's own .py source files (no site-packages)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(
        str(p)
        for p in root.rglob("*.py")
        if "site-packages" not in p.parts and "dist-packages" not in p.parts and p.is_file()
    )


def default_corpus(cache_dir: str, tokenizer: str = "byte", val_fraction: float = 0.1) -> str:
    """The prepared standard-library corpus in `cache_dir`, preparing it on first use.

    Its folder name hashes the Python version and the file list, so a different Python
    gets its own copy.
    """
    files = stdlib_files()
    if not files:
        raise DataError("found no standard-library source on this Python: set data.path to your own text")
    h = hashlib.sha256(
        json.dumps(
            [
                FORMAT,
                AUTO_SHARD_BYTES,
                CHUNK_BYTES,
                sys.version,
                tokenizer_tag(tokenizer)[1],
                val_fraction,
                len(files),
                sum(os.path.getsize(f) for f in files),
            ]
        ).encode()
    ).hexdigest()[:16]
    out = os.path.join(cache_dir, f"stdlib-{tokenizer_tag(tokenizer)[0]}-{h}")
    if not os.path.isfile(os.path.join(out, "manifest.json")):
        print(
            f"trainctl: preparing the standard library's source ({len(files)} files) into {out}",
            file=sys.stderr,
            flush=True,
        )
        prepare(
            files,
            out,
            tokenizer=tokenizer,
            val_fraction=val_fraction,
            shard_size_bytes=AUTO_SHARD_BYTES,
            name="stdlib",
            overwrite=True,
            skip_empty=True,
            progress=True,
        )
    return out
