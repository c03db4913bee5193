"""Where data comes from: local paths, http(s):// and other fsspec URLs, opened as byte
streams, and the one retry policy: transient network errors (refused, reset, timeout,
truncated, HTTP 5xx/408/429) retried `RETRIES` times with backoff, anything else a
DataError at once, naming the URL.
"""

from __future__ import annotations

import http.client
import os
import posixpath
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import BinaryIO, TypeVar

from data_pipeline.errors import DataError

RETRIES = 5
BACKOFF_S = 0.5
TIMEOUT_S = 60
T = TypeVar("T")


def is_url(path: str | os.PathLike) -> bool:
    """A URL (any scheme://, file:// too), not a plain local path: opened by urllib or
    fsspec (open_stream reads file:// ones as local files). Checkpoint paths use it too."""
    return "://" in str(path)


def join(root: str, name: str) -> str:
    """`name` inside the folder `root` (a local folder or a URL prefix)."""
    return posixpath.join(root, name) if is_url(root) else os.path.join(root, name)


def parent(path: str) -> str:
    return posixpath.dirname(path) if is_url(path) else os.path.dirname(os.path.abspath(path))


def transient(error: BaseException) -> bool:
    """Worth another try: the network, not the request, failed."""
    if isinstance(error, urllib.error.HTTPError):
        return error.code >= 500 or error.code in (408, 429)
    if isinstance(error, (FileNotFoundError, PermissionError, IsADirectoryError)):
        return False
    return isinstance(error, (urllib.error.URLError, ConnectionError, TimeoutError, http.client.HTTPException, OSError))


def with_retries(
    fn: Callable[[], T], what: str, retries: int | None = None, failed: Callable[[BaseException], str] | None = None
) -> T:
    """fn(), retried on transient errors; DataError naming `what` when it keeps failing
    (or saying `failed(error)`, where given)."""
    retries = RETRIES if retries is None else retries
    for attempt in range(retries + 1):
        try:
            return fn()
        except DataError:
            raise
        except Exception as e:  # noqa: BLE001 - sorted into transient or not just below
            if not transient(e) or attempt == retries:
                if failed is not None:
                    raise DataError(failed(e)) from None
                tries = f" after {attempt + 1} tries" if attempt else ""
                raise DataError(f"cannot read {what}{tries}: {describe_error(e)}") from None
            time.sleep(BACKOFF_S * 2**attempt)
    raise AssertionError("unreachable")


def describe_error(e: BaseException) -> str:
    if isinstance(e, urllib.error.HTTPError):
        return f"HTTP {e.code} {e.reason}"
    if isinstance(e, urllib.error.URLError):
        return str(e.reason)
    return f"{type(e).__name__}: {e}"


class PipeStream:
    """The stdout of a `pipe:COMMAND` URL; a command that fails is an unreadable shard."""

    def __init__(self, command: str):
        self.command = command
        self.proc = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def read(self, n: int = -1) -> bytes:
        data = self.proc.stdout.read(n)
        if not data and self.proc.wait() != 0:
            err = self.proc.stderr.read().decode(errors="replace").strip().splitlines()
            raise BrokenPipeError(
                f"`{self.command}` exited with status {self.proc.returncode}" + (f": {err[-1]}" if err else "")
            )
        return data

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.proc.stdout.close()
        self.proc.stderr.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_stream(url: str) -> BinaryIO:
    """A readable binary stream for a local path or URL (no retries: see `with_retries`).
    `pipe:` URLs are opened here; whether they are allowed is decided where they are named."""
    if url.startswith("pipe:"):
        return PipeStream(url[len("pipe:") :])
    if url.startswith("file://"):
        url = url[len("file://") :]
    if url.startswith(("http://", "https://")):
        return urllib.request.urlopen(url, timeout=TIMEOUT_S)
    if is_url(url):
        import fsspec

        try:
            return fsspec.open(url, "rb").open()
        except (ImportError, ValueError) as e:  # no backend for the scheme (s3fs, gcsfs, ...)
            raise DataError(f"cannot open {url}: {e}") from None
    return open(url, "rb")


def read_bytes(url: str) -> bytes:
    """The whole content of a (small) file, such as a manifest."""

    def fetch() -> bytes:
        with open_stream(url) as f:
            return f.read()

    return with_retries(fetch, url)


def read_range(url: str, start: int, size: int) -> bytes:
    """Bytes [start, start+size) of a local file or URL, in one request (an HTTP Range
    request, fsspec's cat_file(start, end)); no retries: see `with_retries`.
    Fewer bytes than asked: ConnectionError from a URL (a dropped connection, worth a
    retry), EOFError from a local file (truncated, not worth one)."""
    if url.startswith("file://"):
        url = url[len("file://") :]
    if url.startswith(("http://", "https://")):
        request = urllib.request.Request(url, headers={"Range": f"bytes={start}-{start + size - 1}"})
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            if response.status != 206:
                raise DataError(
                    f"{url} ignores HTTP Range requests (status {response.status}): serve the dataset from a "
                    "server that supports them, or copy it to local disk"
                )
            data = response.read(size)
    elif is_url(url):
        import fsspec

        try:
            fs, path = fsspec.core.url_to_fs(url)
        except (ImportError, ValueError) as e:
            raise DataError(f"cannot open {url}: {e}") from None
        data = fs.cat_file(path, start=start, end=start + size)
    else:
        with open(url, "rb") as f:
            f.seek(start)
            data = f.read(size)
        if len(data) != size:
            raise EOFError(f"the file ends {size - len(data):,} bytes short of the range at offset {start:,}")
    if len(data) != size:
        raise ConnectionError(f"read {len(data):,} of {size:,} bytes at offset {start:,}")
    return data
