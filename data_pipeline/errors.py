"""The one error type the data pipeline raises for bad or unreadable data.

The launcher prints it as one line and exits 2; inside a worker it names the shard or the
file so the job's failure message says what to fix. Its message never shows a Python
object's repr (`<... object at 0x...>`): some libraries put their stream objects in an
exception's args (webdataset adds the tar stream and the URL), which `error_text` leaves out
and DataError itself strips as a last resort. Nor a secret: DataError redacts the URLs in its
message (`redact.redact_text`), so no error or warning made of one shows a password.
"""

from __future__ import annotations

import re

from data_pipeline.redact import http_error_text, redact_text

# `<data_pipeline.shardreads.HashingReader object at 0x7f...>`, `<_io.BufferedReader name='x'>`
OBJECT_REPR = re.compile(r"<(?:[A-Za-z_][\w.]*\.)?([A-Za-z_]\w*)(?: object at 0x[0-9a-fA-F]+| name=[^<>]*)>")


def without_reprs(text: str) -> str:
    """`text` with each object repr replaced by its class name."""
    return OBJECT_REPR.sub(r"\1", text)


def error_text(e: BaseException, *known: str) -> str:
    """`Type: message` of an exception, for a one-line error: an HTTP error as `HTTP 404 Not
    Found`, the objects (streams, file handles) a library put in its args left out, and
    args equal to `known` (the URL the message names already) too."""
    import urllib.error

    if isinstance(e, urllib.error.HTTPError):
        return http_error_text(e.code, e.reason, getattr(e, "trainctl_credentials", None))
    if isinstance(e, urllib.error.URLError):
        return str(e.reason)
    plain = [a for a in e.args if isinstance(a, (str, int, float))]
    if len(plain) == len(e.args) and (len(e.args) == 1 or not known):
        text = str(e)
    else:
        text = ", ".join(str(a) for a in plain if a not in known)
    return without_reprs(f"{type(e).__name__}: {text}" if text else type(e).__name__)


class DataError(ValueError):
    """Data that cannot be used as given: missing, empty, corrupt, or not fitting the job.
    Its message has no object reprs and no secrets (URLs redacted)."""

    def __init__(self, message: object = "", *args: object):
        super().__init__(redact_text(without_reprs(str(message))), *args)
