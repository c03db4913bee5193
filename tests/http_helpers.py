"""A real HTTP server on 127.0.0.1 for tests: serves a folder with Range requests (as
nginx, S3 and GCS do: 206 with the asked bytes) and counts requests and bytes sent per
client, the client being the first part of the path (`/rank3/d/train-000000.tar` serves
`d/train-000000.tar` and counts it for `rank3`) or `-`."""

from __future__ import annotations

import collections
import contextlib
import functools
import http.server
import os
import re
import threading
from collections.abc import Iterator


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    clients: tuple[str, ...] = ()  # path prefixes counted as clients
    sent: collections.Counter = collections.Counter()
    requests: collections.Counter = collections.Counter()
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


@contextlib.contextmanager
def serve(folder, handler: type[RangeHandler] = RangeHandler, clients: tuple[str, ...] = ()) -> Iterator[str]:
    """`http://127.0.0.1:PORT` serving `folder` until the block ends; counters start at zero."""
    handler = type(
        "Handler", (handler,), {"clients": clients, "sent": collections.Counter(), "requests": collections.Counter()}
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
