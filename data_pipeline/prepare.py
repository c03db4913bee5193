"""`trainctl prepare`: text files to WebDataset token shards plus a manifest.json.

Deterministic (sorted inputs, fixed tar metadata, results written in file order whoever
tokenizes), so the same inputs give byte-identical shards. The dataset is built aside and
moved into place with manifest.json last, so a folder holding a manifest is complete.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import json
import multiprocessing
import os
import posixpath
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from data_pipeline import examples, readers
from data_pipeline.errors import DataError
from data_pipeline.manifest import FORMAT, SPLITS, is_val, load_manifest
from data_pipeline.prefetch import prefetched
from data_pipeline.shards import CHUNK_BYTES, RemoteOut, ShardWriter, check_out
from data_pipeline.sources import is_url
from data_pipeline.tokenizer import ByteTokenizer, build_tokenizer, parse_spec, token_dtype, tokenizer_from_dict

T = TypeVar("T")
# map_fn(fn, items, *args): fn(item, *args) of each item, in order, wherever it runs.
Mapper = Callable[..., Iterator[Any]]

# Datasets prepared on the fly (data.path naming raw text, or stdlib) are small: shards of
# 8 MB give the per-epoch shard shuffle something to permute.
AUTO_SHARD_BYTES = 8 * 2**20
# encode_file tokenizes a file's documents this much text at a time.
BATCH_BYTES = 16 * 2**20
# prepare names at most this many skipped items (--on-error skip), then counts the rest.
SKIP_WARNINGS = 10


def expand_inputs(inputs: list[str], skip_empty: bool = False) -> list[str]:
    """Sorted files named by `inputs` (files, folders, globs, URLs); DataError when there is no text.

    A file named directly must hold text (unless `skip_empty`); empty files found through a
    folder or a glob are skipped, and so are a folder's hidden files and folders (.git,
    .cache). A URL (http(s)://, s3://, ...) names one file, as it is.
    """
    files: list[str] = []
    for item in inputs:
        if is_url(item) and not item.startswith("file://"):
            found = [item]
        elif os.path.isfile(item):
            if os.path.getsize(item) == 0 and not skip_empty:
                raise DataError(f"input file {item} has no text: remove it from the inputs or fill it")
            found = [item]
        elif os.path.isdir(item):
            found = sorted(  # hidden files and folders (.git, .cache, ...) are not input
                str(p)
                for p in Path(item).rglob("*")
                if p.is_file() and not any(part.startswith(".") for part in p.relative_to(item).parts)
            )
        else:
            found = sorted(p for p in glob.glob(item, recursive=True) if os.path.isfile(p))
        if not found and os.path.isdir(item):
            raise DataError(
                f"input folder '{item}' holds no files (hidden ones are not read): give text files, a folder of "
                "them or a quoted glob"
            )
        if not found:
            raise DataError(f"input '{item}' matches no files: give text files, a folder or a quoted glob")
        files += found
    files = sorted(set(files), key=files.index)
    nonempty = [f for f in files if is_url(f) or os.path.getsize(f) > 0]
    if not nonempty:
        raise DataError(f"the inputs {' '.join(inputs)} hold no text (every file is empty)")
    return nonempty


def split_documents(
    path: str, val_fraction: float, text_field: str, skips: readers.Skips | None = None
) -> Iterator[tuple[str, bytes]]:
    """(split, text) for each non-empty document part of one input file, in file order,
    streaming. A plain text file is one document whose byte tail `val_fraction` is
    validation (as nanoGPT splits its text); the documents of the other formats go whole
    to the split `is_val` picks."""
    skips = skips or readers.Skips()
    if readers.kind(path) == "text":
        raw = readers.read_text(path)
        if (problem := readers.head_problem(path, raw[: readers.HEAD_BYTES])) is not None:
            skips.file(f"{path} is {problem}")
            return
        cut = int(len(raw) * (1 - val_fraction))
        yield from ((split, text) for split, text in (("train", raw[:cut]), ("val", raw[cut:])) if text)
        return
    with contextlib.closing(readers.documents(path, text_field, skips)) as docs:
        for text in docs:
            if text:
                yield ("val" if is_val(text, val_fraction) else "train"), text


def corpus_sample(
    files: list[str],
    text_field: str = "text",
    budget_bytes: int = 16 * 2**20,
    piece_bytes: int = 1 << 16,
    on_error: str = "fail",
    fmt: str = "text",
) -> Iterator[str]:
    """Text for training a tokenizer: up to `budget_bytes`, an equal share from the head of
    each file (at least one piece each, in file order), so one large file does not dominate.
    Only the head is read. Bad input fails here already under `on_error="fail"`; skipped
    items are counted later, when the files are tokenized. For `fmt` chat or
    prompt-completion, the texts of the examples."""
    share = max(piece_bytes, budget_bytes // len(files))
    used = 0
    for path in files:
        limit = min(share, budget_bytes - used)
        if readers.kind(path) == "text" and not is_url(path) and fmt == "text":
            with open(path, "rb") as f:
                head = f.read(limit)
        else:
            taken, size = [], -1
            found = (
                split_documents(path, 0.0, text_field, readers.Skips(on_error))
                if fmt == "text"
                else (("train", t.encode()) for t in examples.example_texts(path, fmt, on_error))
            )
            with contextlib.closing(found) as docs:
                for _, text in docs:
                    taken.append(text)
                    size += len(text) + 1
                    if size >= limit:
                        break
            head = b"\n".join(taken)[:limit]
        used += len(head)
        for start in range(0, len(head), piece_bytes):
            yield head[start : start + piece_bytes].decode("utf-8", errors="replace")
        if used >= budget_bytes:
            return


def encode_documents(tok, texts: list[bytes], piece_chars: int = 1 << 20) -> list[np.ndarray]:
    """The token ids of each document. For `tokenizers`, all the documents of a file go in
    one batch, on all cores, long ones cut into pieces at line ends, so memory stays
    bounded and the result does not depend on the machine."""
    if isinstance(tok, ByteTokenizer):
        return [tok.encode(raw) for raw in texts]
    pieces, owner = [], []
    for i, raw in enumerate(texts):
        text, start = raw.decode("utf-8", errors="replace"), 0
        while start < len(text):
            end = text.find("\n", start + piece_chars)
            end = len(text) if end < 0 else end + 1
            pieces.append(text[start:end])
            owner.append(i)
            start = end
    out: list[list[np.ndarray]] = [[] for _ in texts]
    for i, ids in zip(owner, tok.encode_many(pieces)):
        out[i].append(ids)
    return [np.concatenate(parts) if parts else np.zeros(0, dtype=tok.dtype) for parts in out]


@functools.lru_cache(maxsize=4)
def _tokenizer(spec: str):
    return tokenizer_from_dict(json.loads(spec))


def encode_file(path: str, tokenizer: str, val_fraction: float, text_field: str, on_error: str = "fail") -> dict:
    """One input file's document parts, tokenized: `tokens` (every part's ids followed by
    end-of-text, concatenated), `ends` (where each part ends in it), `splits` (index into
    SPLITS) and `sizes` (input bytes) per part, and `skipped` (readers.Skips.as_dict). A
    pure function of its arguments (`tokenizer` is the tokenizer's JSON), so it runs the
    same in a worker process or a Ray task on another node; a few flat arrays pass between
    processes far faster than one per document.

    The text is read streaming and tokenized BATCH_BYTES at a time; the result holds the
    whole file's tokens."""
    tok = _tokenizer(tokenizer)
    dtype = token_dtype(tok.vocab_size)
    eot = np.array([tok.eot], dtype=dtype)
    skips = readers.Skips(on_error)
    chunks: list[np.ndarray] = []
    lengths: list[int] = []
    splits: list[int] = []
    sizes: list[int] = []
    batch: list[bytes] = []
    batch_bytes = 0

    def flush() -> None:
        pieces = []
        for ids in encode_documents(tok, batch):
            pieces += [ids.astype(dtype, copy=False), eot]
            lengths.append(len(ids) + 1)
        if pieces:
            chunks.append(np.concatenate(pieces))
        batch.clear()

    for split, text in split_documents(path, val_fraction, text_field, skips):
        batch.append(text)
        splits.append(SPLITS.index(split))
        sizes.append(len(text))
        batch_bytes += len(text)
        if batch_bytes >= BATCH_BYTES:
            flush()
            batch_bytes = 0
    flush()
    return {
        "tokens": np.concatenate(chunks) if chunks else np.zeros(0, dtype),
        "ends": np.cumsum(np.array(lengths, dtype=np.int64)),
        "splits": np.array(splits, dtype=np.uint8),
        "sizes": np.array(sizes, dtype=np.int64),
        "skipped": skips.as_dict(),
    }


def _one_thread_each() -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the processes already use every core


def process_map(fn: Callable[..., T], items: list, *args, workers: int) -> Iterator[T]:
    """fn(item, *args) of each item, in order, in `workers` local processes, at most two
    items per worker in flight."""
    # Spawned, not forked: the caller may hold threads (a Ray worker, the tokenizers pool).
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_one_thread_each)
    try:
        for _, future in prefetched(items, lambda item: pool.submit(fn, item, *args), 2 * workers):
            yield future.result()
    finally:
        pool.shutdown(cancel_futures=True)


def encoded_files(
    files: list[str],
    tokenizer: str,
    val_fraction: float,
    text_field: str,
    workers: int = 1,
    map_fn: Mapper | None = None,
    on_error: str = "fail",
    fmt: str = "text",
) -> Iterator[dict]:
    """encode_file (or for `fmt` chat and prompt-completion examples.encode_examples) of
    each file, in file order: here (workers=1), in `workers` local processes, or through
    `map_fn` (cluster.local_ray.ray_mapper: Ray tasks on a cluster). At most a few files per
    worker are in flight, so memory stays bounded whatever the corpus size."""
    fn, args = encode_file, (tokenizer, val_fraction, text_field, on_error)
    if fmt != "text":
        fn, args = examples.encode_examples, (tokenizer, val_fraction, fmt, on_error)
    if map_fn is not None:
        yield from map_fn(fn, files, *args)
    elif workers <= 1 or len(files) < 2:
        yield from (fn(f, *args) for f in files)
    else:
        yield from process_map(fn, files, *args, workers=workers)


def prepare(
    inputs: list[str],
    out_dir: str,
    tokenizer: str = "byte",
    val_fraction: float = 0.1,
    shard_size_bytes: int = 256 * 2**20,
    sample_tokens: int = 8192,
    chunk_bytes: int = CHUNK_BYTES,
    name: str | None = None,
    overwrite: bool = False,
    skip_empty: bool = False,
    progress: bool = False,
    text_field: str = "text",
    workers: int = 1,
    map_fn: Mapper | None = None,
    on_error: str = "fail",
    format: str = "text",
    seq_len: int | None = None,
) -> dict:
    """Tokenize `inputs` into shards and manifest.json in `out_dir`; returns the manifest.

    Files are tokenized in `workers` processes, or through `map_fn` (Ray tasks on a
    cluster: cluster.local_ray.ray_mapper), and written in file order here, so the shards
    are the same byte for byte whatever the parallelism.

    A text file is one document (its tail `val_fraction` of bytes goes to val); a .jsonl
    (.jsonl.gz, .jsonl.zst) file holds one document per line in `text_field`, a .parquet
    file one per row of the `text_field` column, a .tar raw-text WebDataset shard one per
    sample: each of those goes whole to val when its hash says so (`is_val`). Inputs may
    be URLs (data_pipeline.readers).

    `format` "chat" or "prompt-completion" reads fine-tuning examples from .jsonl(.gz|.zst)
    or .parquet records instead, flags their tokens and packs them whole into rows of
    `seq_len` + 1 tokens, one training window each (data_pipeline.examples): uint32 tokens,
    the manifest's `examples`, `seq_len`, `row_tokens`, `flags` and per-split counts.

    Bad input (data_pipeline.readers) raises DataError under `on_error="fail"`; under
    "skip" it is passed over, named in a warning (the first SKIP_WARNINGS) and counted in
    the manifest's `skipped`.
    """
    examples.check_options(format, seq_len)
    if not 0 <= val_fraction < 1:
        raise DataError(f"--val-fraction={val_fraction} must be in [0, 1)")
    if shard_size_bytes < 1 or sample_tokens < 1:
        raise DataError("the shard size and sample size must be positive")
    if chunk_bytes < 1:
        raise DataError(
            f"the chunk size (--chunk-mb) is {chunk_bytes} bytes: give a positive size, e.g. --chunk-mb 3.5"
        )
    if workers < 1:
        raise DataError(f"--workers={workers} must be at least 1")
    readers.Skips(on_error)  # checks the value
    parse_spec(tokenizer)
    if (error := examples.no_template(format, tokenizer)) is not None:
        raise error
    files = expand_inputs(inputs, skip_empty)
    if on_error == "fail":  # a binary or misnamed input, named before anything is written
        readers.check_heads(files)
    remote = RemoteOut(out_dir, overwrite) if is_url(out_dir) else None
    if remote is None:
        check_out(out_dir, overwrite)
    tok = build_tokenizer(tokenizer, corpus_sample(files, text_field, on_error=on_error, fmt=format))
    packed = format != "text"
    if packed:
        examples.check_tokenizer(tok, format, tokenizer)
    dtype = np.dtype(np.uint32) if packed else token_dtype(tok.vocab_size)

    if remote is not None:  # staged here one shard at a time
        tmp = tempfile.mkdtemp(prefix="trainctl-prepare-")
    else:  # built beside out_dir and moved into place at the end
        parent = os.path.dirname(os.path.abspath(out_dir))
        os.makedirs(parent, exist_ok=True)
        tmp = os.path.join(parent, f".{os.path.basename(os.path.abspath(out_dir))}.partial-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    try:
        writers = {
            split: ShardWriter(tmp, split, shard_size_bytes, remote and remote.upload, chunk_bytes) for split in SPLITS
        }
        docs = dict.fromkeys(SPLITS, 0)
        skipped, warned = {"documents": 0, "files": 0}, 0
        t0, t_report, n_bytes, n_tokens = time.perf_counter(), time.perf_counter(), 0, 0
        tty = sys.stderr.isatty()  # a bar that redraws itself on a terminal, plain lines in a log
        encoded = encoded_files(
            files, json.dumps(tok.to_dict()), val_fraction, text_field, workers, map_fn, on_error, format
        )
        if packed:  # whole examples into rows of one window; a sample holds whole rows
            packers = {split: examples.Packer(seq_len + 1, tok.pad_id) for split in SPLITS}
            rows = {split: examples.RowSamples(writers[split].write, seq_len + 1, sample_tokens) for split in SPLITS}
        for i, parts in enumerate(encoded):
            begin = 0
            for split, end in zip(parts["splits"].tolist(), parts["ends"].tolist()):
                doc, split = parts["tokens"][begin:end], SPLITS[split]
                if packed:
                    rows[split].add(packers[split].add(doc))
                else:
                    for start in range(0, len(doc), sample_tokens):
                        writers[split].write(doc[start : start + sample_tokens])
                docs[split] += 1
                begin = end
            for note in parts["skipped"]["notes"][: max(SKIP_WARNINGS - warned, 0)]:
                print(f"{chr(10) if progress and tty else ''}prepare: skipped {note}", file=sys.stderr, flush=True)
            warned += len(parts["skipped"]["notes"])
            skipped["documents"] += parts["skipped"]["documents"]
            skipped["files"] += parts["skipped"]["files"]
            n_bytes += int(parts["sizes"].sum())
            n_tokens += len(parts["tokens"]) - (0 if packed else len(parts["splits"]))  # not counting end-of-text
            now = time.perf_counter()
            if progress and (now - t_report > (1 if tty else 10) or i == len(files) - 1):
                t_report = now
                print(
                    ("\r" if tty else "")
                    + f"prepare: {i + 1}/{len(files)} files, {sum(docs.values()):,} documents, {n_tokens:,} tokens, "
                    f"{n_bytes / 2**20 / max(now - t0, 1e-9):.1f} MB/s",
                    end="" if tty else "\n",
                    file=sys.stderr,
                    flush=True,
                )
        if progress and tty:
            print(file=sys.stderr)
        if skipped["documents"] + skipped["files"] > min(warned, SKIP_WARNINGS):
            print(
                f"prepare: skipped {skipped['documents']:,} documents and {skipped['files']:,} files "
                f"(--on-error skip) in all, {min(warned, SKIP_WARNINGS)} named above; the counts are in manifest.json",
                file=sys.stderr,
                flush=True,
            )
        counts = dict.fromkeys(SPLITS, {})
        if packed:
            for split in SPLITS:
                rows[split].add(packers[split].finish())
                rows[split].flush()
                counts[split] = packers[split].counts()
        splits = {split: {"documents": docs[split], **counts[split], **w.finish()} for split, w in writers.items()}
        manifest = {
            "format": FORMAT,
            "name": name
            or (posixpath.basename(out_dir.rstrip("/")) if remote else os.path.basename(os.path.abspath(out_dir))),
            "tokenizer": tok.to_dict(),
            "dtype": dtype.name,
            "sample_tokens": sample_tokens,
            "chunk_bytes": chunk_bytes,
            "val_fraction": val_fraction,
            "input_files": len(files),
            "input_bytes": n_bytes,
            "skipped": skipped,
            **(
                {
                    "examples": format,
                    "seq_len": seq_len,
                    "row_tokens": seq_len + 1,
                    "flags": examples.FLAGS,
                    "pad_id": tok.pad_id,
                }
                if packed
                else {}
            ),
            "splits": splits,
        }
        Path(tmp, "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
        if remote is not None:
            remote.finish(os.path.join(tmp, "manifest.json"), manifest)
            shutil.rmtree(tmp)
            return load_manifest(out_dir)
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if remote is not None:
            remote.abort()
        raise
    return load_manifest(out_dir)


def summarize(manifest: dict) -> str:
    """One line per split: what `prepare` wrote."""
    tok = manifest["tokenizer"]
    tokens = sum(s["tokens"] for s in manifest["splits"].values())
    lines = [
        f"dataset {manifest['root']}: {tok['name']} tokenizer (vocab {tok['vocab_size']:,}), {manifest['dtype']} tokens, "
        f"{manifest['input_bytes'] / max(tokens, 1):.2f} input bytes per token"
    ]
    skipped = manifest.get("skipped") or {}
    if any(skipped.values()):
        lines[0] += f"; skipped {skipped['documents']:,} bad documents and {skipped['files']:,} bad files"
    fmt = manifest.get("examples")
    if fmt:
        lines[0] += (
            f"; {fmt} examples packed into rows of {manifest['row_tokens']:,} tokens (data.seq_len={manifest['seq_len']})"
        )
    for split, s in manifest["splits"].items():
        size = sum(x["bytes"] for x in s["shards"])
        lines.append(
            f"  {split:<5} {s['documents']:>8,} {'examples ' if fmt else 'documents'} {s['tokens']:>14,} tokens "
            f"{len(s['shards']):>5} shards {size / 2**20:>9.1f} MB"
        )
        if fmt:
            lines[-1] += (
                f": {s['trained_tokens']:,} trained, {s['padding_tokens']:,} padding; "
                f"{s['truncated']:,} examples truncated to {manifest['row_tokens']:,} tokens"
            )
    return "\n".join(lines)
