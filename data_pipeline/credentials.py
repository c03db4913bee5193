"""Credentials for http(s) reads, and secrets kept out of what is printed or written.

Every http(s) request trainctl makes (`sources.open_stream`, `sources.read_range`: data,
`prepare` inputs, `model.init_from`) asks `http_auth` for its Authorization header, from
the first of:

1. the URL's userinfo, `http://USER:PASSWORD@host/...` (percent-encoded where needed):
   HTTP Basic; urllib would take it for part of the host name, so it leaves the URL;
2. `TRAINCTL_HTTP_TOKEN`: `HOST=TOKEN` entries (comma-separated; `HOST:PORT=TOKEN` for one
   port), each token sent as `Authorization: Bearer TOKEN` to its host only;
3. for the Hugging Face hub (huggingface.co, hf.co, and HF_ENDPOINT's host): `HF_TOKEN`,
   else the token `hf auth login` stored (HF_TOKEN_PATH, else HF_HOME/token, else
   ~/.cache/huggingface/token), as a bearer token;
4. `~/.netrc` (or the file NETRC names): the host's `machine` entry, HTTP Basic.

A userinfo whose password is the redaction mark (`user:***@`, as config.yaml keeps it) is no
credential: the others are looked up instead. The header goes to the URL's own origin only:
a redirect to another host (the hub's CDN, whose URLs are presigned) gets that host's own
credentials from 2-4, or none. A 401 or 403 is described by `redact.http_error_text`, naming
where the refused credentials came from (an `Auth`'s `source`, never its value) or how to give
some.

Redaction (`redact_url`, `redact_text`, `is_secret_name`, `REDACTED`) is data_pipeline.redact's,
below this module and errors.py.
"""

from __future__ import annotations

import base64
import dataclasses
import os
import re
import urllib.parse

from data_pipeline.errors import DataError
from data_pipeline.redact import REDACTED, TOKEN_ENV

HUB_HOSTS = ("huggingface.co", "hf.co")


@dataclasses.dataclass(frozen=True)
class Auth:
    """An Authorization header's value and where it came from (for messages: never the value)."""

    header: str
    source: str


def split_userinfo(url: str) -> tuple[str, str | None, str | None]:
    """(the URL without its userinfo, the user, the password), both decoded; (url, None,
    None) when it has none."""
    scheme, sep, rest = url.partition("://")
    cut = min((i for i in (rest.find("/"), rest.find("?"), rest.find("#")) if i >= 0), default=len(rest))
    netloc = rest[:cut]
    if not sep or "@" not in netloc:
        return url, None, None
    userinfo, host = netloc.rsplit("@", 1)
    user, colon, password = userinfo.partition(":")
    clean = f"{scheme}://{host}{rest[cut:]}"
    return clean, urllib.parse.unquote(user), urllib.parse.unquote(password) if colon else None


def basic(user: str, password: str | None, source: str) -> Auth:
    raw = f"{user}:{password or ''}".encode()
    return Auth("Basic " + base64.b64encode(raw).decode("ascii"), source)


def http_auth(url: str) -> tuple[str, Auth | None]:
    """(the URL to request, without userinfo; the credentials to send with it, or None)."""
    clean, user, password = split_userinfo(url)
    if user is not None and REDACTED not in (user, password):
        return clean, basic(user, password, "the URL's user:password")
    return clean, env_auth(clean)


def env_auth(url: str) -> Auth | None:
    """The credentials for `url` from the environment or ~/.netrc (2-4 of the module's list)."""
    parts = urllib.parse.urlsplit(url)
    host = (parts.hostname or "").lower()
    if not host or parts.scheme not in ("http", "https"):
        return None
    port = parts.port or (443 if parts.scheme == "https" else 80)
    if (token := env_token(host, port)) is not None:
        return Auth(f"Bearer {token}", TOKEN_ENV)
    if host in hub_hosts():
        if token := os.environ.get("HF_TOKEN", "").strip():
            return Auth(f"Bearer {token}", "HF_TOKEN")
        if (stored := hf_stored_token()) is not None:
            return Auth(f"Bearer {stored[1]}", f"the Hugging Face token in {stored[0]}")
    return netrc_auth(host)


def env_token(host: str, port: int) -> str | None:
    """TRAINCTL_HTTP_TOKEN's token for host (an entry for HOST:PORT first, then for HOST)."""
    value = os.environ.get(TOKEN_ENV, "").strip()
    if not value:
        return None
    tokens: dict[str, str] = {}
    for n, entry in enumerate(e for e in re.split(r"[,\s]+", value) if e):
        name, eq, token = entry.partition("=")
        if not eq or not name or not token or "/" in name:
            raise DataError(  # never the value: it holds tokens
                f"{TOKEN_ENV}: entry {n + 1} is not HOST=TOKEN: give comma-separated HOST=TOKEN (or "
                "HOST:PORT=TOKEN) entries, each token sent to its host only"
            )
        tokens.setdefault(name.lower(), token)
    return tokens.get(f"{host}:{port}", tokens.get(host))


def hub_hosts() -> set[str]:
    hosts = set(HUB_HOSTS)
    if endpoint := os.environ.get("HF_ENDPOINT"):
        hosts.add((urllib.parse.urlsplit(endpoint).hostname or "").lower())
    return hosts


def hf_stored_token() -> tuple[str, str] | None:
    """(file, token) of the token `hf auth login` stored, as huggingface_hub finds it."""
    path = os.environ.get("HF_TOKEN_PATH")
    if not path:
        home = os.environ.get("HF_HOME") or os.path.join(
            os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface"
        )
        path = os.path.join(home, "token")
    try:
        with open(path) as f:
            token = f.read().strip()
    except OSError:
        return None
    return (path, token) if token else None


_NETRC: dict[tuple[str, int], object] = {}  # (path, mtime) -> parsed file


def netrc_auth(host: str) -> Auth | None:
    """The host's login and password in ~/.netrc (or NETRC's file), its `default` entry else."""
    import netrc

    path = os.environ.get("NETRC") or os.path.expanduser("~/.netrc")
    try:
        mtime = os.stat(path).st_mtime_ns
    except OSError:
        return None
    parsed = _NETRC.get((path, mtime))
    if parsed is None:
        try:
            # the default file (None) gets Python's check that only its owner can read it
            parsed = netrc.netrc(None if "NETRC" not in os.environ else path)
        except netrc.NetrcParseError as e:  # its message may quote a token of the file: not shown
            why = "other users can read it: chmod 600 it" if "permissive" in str(e) else f"line {e.lineno}"
            raise DataError(f"{path} is not a usable netrc file ({why})") from None
        except OSError:
            return None
        _NETRC.clear()
        _NETRC[path, mtime] = parsed
    entry = parsed.authenticators(host)  # type: ignore[attr-defined]
    if entry is None:
        return None
    login, _, password = entry
    return basic(login or "", password, path)
