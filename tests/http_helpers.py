"""A real HTTP server on 127.0.0.1 for tests: serves a folder with Range requests (as
nginx, S3 and GCS do: 206 with the asked bytes) and counts requests and bytes sent per
client, the client being the first part of the path (`/rank3/d/train-000000.tar` serves
`d/train-000000.tar` and counts it for `rank3`) or `-`, and requests per path (`hits`).
`faults` makes a path's next requests fail, one `Fault` each: an HTTP status (with
headers such as Retry-After), a stall longer than the client's timeout, a body cut off.
`auth` makes it demand credentials (401 without the Authorization header it names: `basic`,
`bearer`); `redirects` sends a path's requests elsewhere (302); `authorizations` records
the Authorization header (or None) each request came with."""

from __future__ import annotations

import base64
import collections
import contextlib
import dataclasses
import functools
import http.server
import os
import re
import threading
import time
from collections.abc import Iterator


@dataclasses.dataclass(frozen=True)
class Fault:
    """How one request fails: `status` answers it with that HTTP status (and `headers`);
    `stall_s` sends nothing for that long, then closes; `drop` sends the headers and half
    the body, then hangs up (the client sees a truncated body)."""

    status: int = 0
    headers: tuple[tuple[str, str], ...] = ()
    stall_s: float = 0.0
    drop: bool = False


def status(code: int, **headers: str) -> Fault:
    """An HTTP error answer, e.g. status(429, Retry_After="3") (underscores become dashes)."""
    return Fault(status=code, headers=tuple((k.replace("_", "-"), v) for k, v in headers.items()))


DROP = Fault(drop=True)


def stall(seconds: float) -> Fault:
    return Fault(stall_s=seconds)


def basic(user: str, password: str) -> str:
    """The Authorization header of HTTP Basic credentials."""
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def bearer(token: str) -> str:
    return f"Bearer {token}"


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    clients: tuple[str, ...] = ()  # path prefixes counted as clients
    sent: collections.Counter = collections.Counter()
    requests: collections.Counter = collections.Counter()
    hits: collections.Counter = collections.Counter()  # requests per path (without the client part)
    faults: dict[str, list[Fault]] = {}  # path -> how its next requests fail, one Fault each
    auth: str | None = None  # the Authorization header every request must carry (401 without)
    redirects: dict[str, str] = {}  # path -> where a 302 sends its requests
    authorizations: list[tuple[str, str | None]] = []  # (path, Authorization header) of each request
    lock = threading.Lock()

    def log_message(self, *args):
        pass

    def _client(self) -> str:
        head, _, rest = self.path.lstrip("/").partition("/")
        if head in self.clients:
            self.path = "/" + rest
            return head
        return "-"

    def do_GET(self):
        client = self._client()
        match = re.fullmatch(r"bytes=(\d+)-(\d+)", self.headers.get("Range", ""))
        path = self.translate_path(self.path)
        with self.lock:
            type(self).requests[client] += 1
            type(self).hits[self.path] += 1
            type(self).authorizations.append((self.path, self.headers.get("Authorization")))
            pending = self.faults.get(self.path)
            fault = pending.pop(0) if pending else None
        if self.path in self.redirects:
            self.send_response(302)
            self.send_header("Location", self.redirects[self.path])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if self.auth is not None and self.headers.get("Authorization") != self.auth:
            scheme = self.auth.split()[0]
            fault = status(401, WWW_Authenticate=f'{scheme} realm="test"' if scheme == "Basic" else scheme)
        if fault is not None:
            self._fail(fault, path, match)
            return
        if match is None or not os.path.isfile(path):
            super().do_GET()
            if os.path.isfile(path):
                with self.lock:
                    type(self).sent[client] += os.path.getsize(path)
            return
        start, end = int(match[1]), int(match[2])
        size = os.path.getsize(path)
        if start >= size:
            self.send_error(416, "range not satisfiable")
            return
        end = min(end, size - 1)
        with open(path, "rb") as f:
            f.seek(start)
            body = f.read(end - start + 1)
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        with self.lock:
            type(self).sent[client] += len(body)

    def _fail(self, fault: Fault, path: str, match: re.Match | None) -> None:
        self.close_connection = True
        if fault.stall_s:
            time.sleep(fault.stall_s)  # the client has given up by now: nothing is sent
            return
        if fault.drop:
            with open(path, "rb") as f:
                body = f.read()
            if match is not None:
                body = body[int(match[1]) : int(match[2]) + 1]
            self.send_response(206 if match is not None else 200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
            return
        body = f"{fault.status}\n".encode()
        self.send_response(fault.status)
        for key, value in fault.headers:
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@contextlib.contextmanager
def serve(
    folder, handler: type[RangeHandler] = RangeHandler, clients: tuple[str, ...] = (), auth: str | None = None
) -> Iterator[http.server.ThreadingHTTPServer]:
    """`http://127.0.0.1:PORT` serving `folder` until the block ends (the server; its
    `handler` holds the counters and faults); counters start at zero. `auth`: the
    Authorization header it demands (`basic(...)`, `bearer(...)`), 401 without it."""
    handler = type(
        "Handler",
        (handler,),
        {
            "clients": clients,
            "sent": collections.Counter(),
            "requests": collections.Counter(),
            "hits": collections.Counter(),
            "faults": {},
            "auth": auth,
            "redirects": {},
            "authorizations": [],
        },
    )
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(folder)))
    httpd.handler = handler
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield httpd
    finally:
        httpd.shutdown()
        httpd.server_close()
