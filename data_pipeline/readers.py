"""Input file → its documents, streaming: `.jsonl`, `.jsonl.gz`, `.jsonl.zst`, `.parquet`,
raw-text `.tar` shards, and plain text (the whole file, one document).

Local paths or URLs (http(s)://, s3:// and any fsspec URL, through `sources.open_stream`,
opened with the retry policy). Compressed files are decompressed as they are read (gzip,
zstandard), parquet is read a batch of rows of the one text column at a time, so a
file's text is never held whole in memory. Bad input (a corrupt compressed file, a
parquet file without the text column, a line that is not UTF-8 or not JSON or lacks the
field) is a DataError naming the file and the line or row under `--on-error fail`; under
`skip` it is passed over and counted in a `Skips`.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import shutil
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from data_pipeline.errors import DataError, error_text
from data_pipeline.redact import redact_text
from data_pipeline.sources import describe_error, is_url, open_stream, read_bytes, with_retries

ON_ERROR = ("fail", "skip")
FIX = "fix the file or pass --on-error skip"
FIELD_HINT = "pass --text-field with the field that holds the text, or --on-error skip"
NOTES_KEPT = 10  # skipped items named per file (prepare prints at most this many in all)
PARQUET_BATCH_ROWS = 4096
READ_BUFFER = 1 << 20


def kind(path: str) -> str:
    """How `path` is read: jsonl (also .jsonl.gz, .jsonl.zst), parquet, tar or text."""
    name = path.split("?")[0] if is_url(path) else path
    if name.endswith((".jsonl", ".jsonl.gz", ".jsonl.zst")):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(".tar"):
        return "tar"
    return "text"


HEAD_BYTES = 8000  # git's test for binary files: a NUL byte among the first 8000 bytes
INPUT_HELP = "give text, .jsonl(.gz|.zst), .parquet or raw-text .tar files, or remove it from the inputs"


def head_problem(path: str, head: bytes) -> str | None:
    """What an input file is instead of what its name says, from its first HEAD_BYTES bytes
    (e.g. "binary, not text (...)"), or None when they agree: a tar header for .tar, no NUL
    byte in text and .jsonl. Compressed .jsonl and .parquet files are left to their readers,
    which name what is wrong."""
    name = path.split("?")[0] if is_url(path) else path
    if kind(path) == "tar":
        from data_pipeline.raw import tar_header_problem

        problem = tar_header_problem(head)
        return f"not a tar file ({problem})" if problem else None
    if kind(path) == "parquet" or name.endswith((".gz", ".zst")) and kind(path) == "jsonl":
        return None
    nul = head.find(b"\0", 0, HEAD_BYTES)
    return f"binary, not text (byte {nul:,} is a NUL byte)" if nul >= 0 else None


def check_heads(files: list[str]) -> None:
    """DataError naming the first local file whose first bytes are not what its name says
    (`head_problem`): a binary file among text, random bytes named .tar. URLs are checked as
    they are read."""
    for path in files:
        if is_url(path) and not path.startswith("file://"):
            continue
        try:
            with open(path.removeprefix("file://"), "rb") as f:
                head = f.read(HEAD_BYTES)
        except OSError as e:
            raise DataError(f"cannot read {path} ({e.strerror})") from None
        if (problem := head_problem(path, head)) is not None:
            raise DataError(f"{path} is {problem}: {INPUT_HELP}")


class Skips:
    """Bad input met while reading one file: under `fail` a DataError at once, under `skip`
    counted (`documents`, `files`: the rest of a corrupt file, or all of it) with the first
    NOTES_KEPT items named in `notes`."""

    def __init__(self, on_error: str = "fail"):
        if on_error not in ON_ERROR:
            raise DataError(f"--on-error={on_error} must be fail or skip")
        self.on_error, self.documents, self.files, self.notes = on_error, 0, 0, []

    def _note(self, message: str, fix: str) -> None:
        if self.on_error == "fail":
            raise DataError(f"{message}{fix}")
        if len(self.notes) < NOTES_KEPT:
            self.notes.append(redact_text(message))  # printed by prepare, kept in manifest.json

    def document(self, message: str, hint: str | None = FIX) -> None:
        """One bad document (a line, a row, a sample): raise, or count and go on. Without
        `hint` the message already says what to fix."""
        self._note(message, f": {hint}" if hint else ", or pass --on-error skip")
        self.documents += 1

    def file(self, message: str, hint: str = FIX) -> None:
        """A file (or its rest) that cannot be read on: raise, or count and stop reading it."""
        self._note(message, f": {hint}")
        self.files += 1

    def as_dict(self) -> dict:
        return {"documents": self.documents, "files": self.files, "notes": self.notes}


def _open(path: str) -> BinaryIO:
    return with_retries(lambda: open_stream(path), path)


class ZstdReader(io.RawIOBase):
    """The decompressed bytes of a zstandard stream of one or more frames, decoded by
    zstandard's decompressobj a chunk at a time. zstandard's own `stream_reader` ends
    silently at a truncated frame; this raises EOFError there, as gzip does."""

    def __init__(self, raw: BinaryIO):
        import zstandard

        self.raw, self.dctx = raw, zstandard.ZstdDecompressor()
        self.obj, self.in_frame, self.pending = self.dctx.decompressobj(), False, memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self.pending:
            data = self.raw.read(READ_BUFFER)
            if not data:
                if self.in_frame:
                    raise EOFError("the zstandard stream ended in the middle of a frame (truncated)")
                return 0
            out = []
            while data:
                out.append(self.obj.decompress(data))
                self.in_frame = not self.obj.eof
                data = b""
                if self.obj.eof:  # the next frame starts in what is left over
                    data, self.obj = self.obj.unused_data, self.dctx.decompressobj()
            self.pending = memoryview(b"".join(out))
        n = min(len(buffer), len(self.pending))
        buffer[:n] = self.pending[:n]
        self.pending = self.pending[n:]
        return n


def _jsonl_lines(path: str, raw: BinaryIO) -> tuple[BinaryIO, tuple[type[BaseException], ...], str]:
    """The decompressed byte stream of a .jsonl(.gz|.zst) file, the errors that mean it is
    corrupt, and what it should have been."""
    if path.split("?")[0].endswith(".gz"):
        return gzip.GzipFile(fileobj=raw, mode="rb"), (gzip.BadGzipFile, EOFError, zlib.error), "gzip"
    if path.split("?")[0].endswith(".zst"):
        import zstandard

        return io.BufferedReader(ZstdReader(raw), READ_BUFFER), (zstandard.ZstdError, EOFError), "zstandard"
    return raw, (), "text"


def _jsonl_values(path: str, skips: Skips) -> Iterator[tuple[int, object]]:
    """(line number, parsed JSON value) of each non-blank line of a .jsonl, .jsonl.gz or
    .jsonl.zst file; lines that are not UTF-8 or not JSON, and a corrupt stream, go to `skips`."""
    with contextlib.ExitStack() as stack:
        raw = stack.enter_context(_open(path))
        lines, corrupt, what = _jsonl_lines(path, raw)
        stack.enter_context(lines)
        n = 0
        try:
            for n, line in enumerate(lines, 1):  # noqa: B007 - n names the line a corrupt stream stopped at
                if not line.strip():
                    continue
                try:
                    text = line.decode("utf-8")
                except UnicodeDecodeError as e:
                    skips.document(f"{path} line {n:,}: not valid UTF-8 ({e.reason} at byte {e.start})")
                    continue
                try:
                    record = json.loads(text)
                except ValueError as e:
                    skips.document(f"{path} line {n:,} is not valid JSON ({e})")
                    continue
                yield n, record
        except corrupt as e:
            skips.file(f"{path} line {n + 1:,}: not a readable {what} file ({describe_error(e)})")


def jsonl_documents(path: str, text_field: str, skips: Skips) -> Iterator[bytes]:
    """The `text_field` of each line of a .jsonl, .jsonl.gz or .jsonl.zst file, as UTF-8."""
    for n, record in _jsonl_values(path, skips):
        if not isinstance(record, dict) or text_field not in record:
            skips.document(f"{path} line {n:,} has no '{text_field}' field", FIELD_HINT)
            continue
        value = record[text_field]
        yield (value if isinstance(value, str) else str(value)).encode()


def _seekable(path: str, stack: contextlib.ExitStack) -> BinaryIO | str:
    """What pyarrow can read a parquet file from: the path itself when local, a seekable
    fsspec file (s3:// and the like), or else (http) a temporary copy on disk."""
    if not is_url(path) or path.startswith("file://"):
        return path.removeprefix("file://")
    f = stack.enter_context(_open(path))
    if getattr(f, "seekable", lambda: False)():
        return f
    copy = stack.enter_context(tempfile.TemporaryFile(prefix="trainctl-parquet-"))
    shutil.copyfileobj(f, copy, READ_BUFFER)
    copy.seek(0)
    return copy


def parquet_documents(path: str, text_field: str, skips: Skips) -> Iterator[bytes]:
    """The `text_field` column of a parquet file, a batch of rows at a time, as UTF-8."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with contextlib.ExitStack() as stack:
        row = 0
        try:
            pf = pq.ParquetFile(_seekable(path, stack))
            names = pf.schema_arrow.names
            if text_field not in names:
                skips.file(f"{path} has no '{text_field}' column (it has {', '.join(names)})", FIELD_HINT)
                return
            for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[text_field]):
                for value in batch.column(0).to_pylist():
                    row += 1
                    if isinstance(value, str):
                        yield value.encode()
                    elif isinstance(value, bytes):
                        try:
                            value.decode("utf-8")
                        except UnicodeDecodeError as e:
                            skips.document(f"{path} row {row:,}: not valid UTF-8 ({e.reason} at byte {e.start})")
                            continue
                        yield value
                    elif value is None:
                        skips.document(f"{path} row {row:,}: '{text_field}' is null")
                    else:
                        yield str(value).encode()
        except (pa.ArrowException, OSError) as e:
            where = f" row {row + 1:,}" if row else ""
            skips.file(f"{path}{where}: not a readable parquet file ({describe_error(e)})")


def parquet_records(path: str, fields: tuple[str, ...], skips: Skips) -> Iterator[tuple[str, dict]]:
    """("PATH row N", {field: value}) of each row of a parquet file, with the columns of
    `fields` it has (a list of structs comes as a list of dicts), a batch of rows at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with contextlib.ExitStack() as stack:
        row = 0
        try:
            pf = pq.ParquetFile(_seekable(path, stack))
            columns = [f for f in fields if f in pf.schema_arrow.names]
            if not columns:
                names = ", ".join(pf.schema_arrow.names)
                skips.file(f"{path} has none of the columns {', '.join(fields)} (it has {names})", FIX)
                return
            for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=columns):
                for record in batch.to_pylist():
                    row += 1
                    yield f"{path} row {row:,}", record
        except (pa.ArrowException, OSError) as e:
            where = f" row {row + 1:,}" if row else ""
            skips.file(f"{path}{where}: not a readable parquet file ({describe_error(e)})")


def records(path: str, fields: tuple[str, ...], skips: Skips) -> Iterator[tuple[str, dict]]:
    """("PATH line N" or "PATH row N", record) of each record of a .jsonl(.gz|.zst) file
    (each line a JSON object) or a .parquet file (its `fields` columns), streaming; DataError
    for other kinds of file."""
    if kind(path) == "parquet":
        yield from parquet_records(path, fields, skips)
        return
    if kind(path) != "jsonl":
        raise DataError(
            f"{path}: records (chat, prompt-completion) are read from .jsonl, .jsonl.gz, .jsonl.zst or .parquet "
            "files: convert it, or prepare it with --format text"
        )
    for n, record in _jsonl_values(path, skips):
        if not isinstance(record, dict):
            skips.document(f"{path} line {n:,} is not a JSON object")
            continue
        yield f"{path} line {n:,}", record


def tar_documents(path: str, text_field: str, skips: Skips) -> Iterator[bytes]:
    """The documents of a raw-text WebDataset shard, sample by sample (data_pipeline.raw)."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    from data_pipeline.raw import documents

    with _open(path) as f:
        try:
            for sample in group_by_keys(tar_file_expander([{"url": path, "stream": f}])):
                try:
                    docs = documents(sample, path, text_field)
                except DataError as e:
                    skips.document(str(e), None)
                    continue
                yield from (doc.encode() for doc in docs)
        except DataError:
            raise
        except Exception as e:  # noqa: BLE001 - a broken tar, named
            skips.file(f"{path} is not a readable tar file ({error_text(e, path)})")


def documents(path: str, text_field: str, skips: Skips) -> Iterator[bytes]:
    """Each document of a multi-document file (jsonl, parquet, tar) as UTF-8 bytes, streaming."""
    readers = {"jsonl": jsonl_documents, "parquet": parquet_documents, "tar": tar_documents}
    return readers[kind(path)](path, text_field, skips)


def read_text(path: str) -> bytes:
    """A plain text file, whole: it is one document."""
    return read_bytes(path) if is_url(path) else Path(path).read_bytes()
