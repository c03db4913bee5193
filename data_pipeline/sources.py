"""Where data comes from: local paths, http(s):// and other fsspec URLs, opened as byte
streams, and the one retry policy (`with_retries`): transient network errors (refused,
reset, timeout, truncated, HTTP 5xx/408/429) retried `RETRIES` times, waiting
BACKOFF_S * 2**k before retry k (0.5, 1, 2, 4, 8 s) or the server's Retry-After when that is
longer (capped at RETRY_AFTER_MAX_S); anything else a DataError at once, naming the URL
(redacted). http(s) requests carry the credentials `credentials.http_auth` finds for them.
"""

from __future__ import annotations

import datetime
import email.utils
import http.client
import os
import posixpath
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import BinaryIO, TypeVar

from data_pipeline import credentials
from data_pipeline.errors import DataError
from data_pipeline.redact import http_error_text, redact_text, redact_url

RETRIES = 5
BACKOFF_S = 0.5
RETRY_AFTER_MAX_S = 30.0  # a server's Retry-After is honoured up to this
TIMEOUT_S = 60  # seconds without a byte from an HTTP server before a read fails (a transient error)
SLEEP: Callable[[float], object] = time.sleep  # with_retries' clock when none is passed
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
    fn: Callable[[], T],
    what: str,
    retries: int | None = None,
    failed: Callable[[BaseException], str] | None = None,
    sleep: Callable[[float], object] | None = None,
) -> T:
    """fn(), retried on transient errors; DataError naming `what` and the last error when it
    keeps failing (or saying `failed(error)`, where given). Before retry k it calls
    `sleep` (SLEEP, time.sleep, unless given) with `retry_delay(k, error)`."""
    retries = RETRIES if retries is None else retries
    sleep = SLEEP if sleep is None else sleep
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
                raise DataError(f"cannot read {redact_text(what)}{tries}: {describe_error(e)}") from None
            sleep(retry_delay(attempt, e))
    raise AssertionError("unreachable")


def retry_delay(attempt: int, error: BaseException) -> float:
    """Seconds to wait before retry `attempt` (0 first): BACKOFF_S * 2**attempt, or the
    server's Retry-After (seconds or an HTTP date) when that is longer, at most RETRY_AFTER_MAX_S."""
    backoff = BACKOFF_S * 2**attempt
    asked = retry_after(error)
    return backoff if asked is None else max(backoff, min(asked, RETRY_AFTER_MAX_S))


def retry_after(error: BaseException) -> float | None:
    """An HTTP error's Retry-After in seconds from now, None when it has none or an unreadable one."""
    headers = getattr(error, "headers", None)
    value = (headers.get("Retry-After") if headers is not None else None) or ""
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # "-0000": an HTTP date is GMT
        when = when.replace(tzinfo=datetime.timezone.utc)
    return max(0.0, when.timestamp() - time.time())


def describe_error(e: BaseException) -> str:
    if isinstance(e, urllib.error.HTTPError):  # a 401/403 says whose credentials were refused, or how to send some
        return http_error_text(e.code, e.reason, getattr(e, "trainctl_credentials", None))
    if isinstance(e, urllib.error.URLError):
        return str(e.reason)
    return f"{type(e).__name__}: {e}"


class _Redirects(urllib.request.HTTPRedirectHandler):
    """A redirect keeps the request's Authorization only to the same origin (scheme, host,
    port); another host gets its own credentials (`credentials.env_auth`), or none."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is None:
            return None
        new.full_url = credentials.split_userinfo(new.full_url)[0]
        state = getattr(req, "trainctl_state", {})
        new.trainctl_state = state
        old, now = urllib.parse.urlsplit(req.full_url), urllib.parse.urlsplit(new.full_url)
        if (old.scheme, old.hostname, old.port) == (now.scheme, now.hostname, now.port) and req.has_header(
            "Authorization"
        ):
            new.add_unredirected_header("Authorization", req.get_header("Authorization"))
            return new
        auth = credentials.env_auth(new.full_url)
        state["source"] = auth.source if auth is not None else None
        if auth is not None:
            new.add_unredirected_header("Authorization", auth.header)
        return new


_OPENER = urllib.request.build_opener(_Redirects)


def http_open(url: str, headers: dict[str, str] | None = None):
    """The response to a GET of an http(s) URL, with its credentials (`credentials.http_auth`);
    an HTTPError carries where they came from (`trainctl_credentials`) for its message."""
    clean, auth = credentials.http_auth(url)
    request = urllib.request.Request(clean, headers=headers or {})
    state = {"source": auth.source if auth is not None else None}
    request.trainctl_state = state
    if auth is not None:
        request.add_unredirected_header("Authorization", auth.header)
    try:
        return _OPENER.open(request, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as e:
        e.trainctl_credentials = state["source"]
        raise


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
        return http_open(url)
    if is_url(url):
        import fsspec

        try:
            return fsspec.open(url, "rb").open()
        except (ImportError, ValueError) as e:  # no backend for the scheme (s3fs, gcsfs, ...)
            raise DataError(f"cannot open {url}: {e}") from None  # DataError redacts the URL
    return open(url, "rb")


def read_bytes(url: str, sleep: Callable[[float], object] | None = None) -> bytes:
    """The whole content of a (small) file, such as a manifest; retried (see `with_retries`)."""

    def fetch() -> bytes:
        with open_stream(url) as f:
            return f.read()

    return with_retries(fetch, url, sleep=sleep)


def read_range(url: str, start: int, size: int) -> bytes:
    """Bytes [start, start+size) of a local file or URL, in one request (an HTTP Range
    request, fsspec's cat_file(start, end)); no retries: see `with_retries`.
    Fewer bytes than asked: ConnectionError from a URL (a dropped connection, worth a
    retry), EOFError from a local file (truncated, not worth one)."""
    if url.startswith("file://"):
        url = url[len("file://") :]
    if url.startswith(("http://", "https://")):
        with http_open(url, {"Range": f"bytes={start}-{start + size - 1}"}) as response:
            if response.status != 206:
                raise DataError(
                    f"{redact_url(url)} ignores HTTP Range requests (status {response.status}): serve the dataset from a "
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
