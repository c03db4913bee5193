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
credentials from 2-4, or none. A 401 or 403 is described by `http_error_text`, naming where
the refused credentials came from (never their value) or how to give some.

Redaction (`redact_url`, `redact_text`): the password of a URL's userinfo, secret query
parameters (presigned URLs' signatures) and `Bearer TOKEN`s replaced by REDACTED. Data
errors (`DataError`) and the data pipeline's warnings are redacted where they are made;
trainer/config.py redacts a config tree with these, cluster/ray_job.py the workers' output.
"""

from __future__ import annotations

import base64
import dataclasses
import os
import re
import urllib.parse

from data_pipeline.errors import DataError

# Secrets never written down: a run folder, W&B and the console get REDACTED in their place.
REDACTED = "***"
SECRET_WORDS = ("TOKEN", "KEY", "SECRET", "PASSWORD", "PASSWD", "CREDENTIAL", "SIGNATURE", "AUTH")
SECRET_PARAMS = ("sig", "pwd", "pass", "code")  # query parameters that are secrets by their whole name
URL_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")
BEARER_RE = re.compile(r"(?i)\b(bearer|basic)(\s+)[A-Za-z0-9._~+/=-]{8,}")

TOKEN_ENV = "TRAINCTL_HTTP_TOKEN"
HUB_HOSTS = ("huggingface.co", "hf.co")
HOW = (  # no URL in it: a message holding one is redacted
    "give them in the URL (USER:PASSWORD@ before the host), set "
    f"{TOKEN_ENV}=HOST=TOKEN for a bearer token (HF_TOKEN for huggingface.co), or add the host to ~/.netrc"
)


def is_secret_name(name: str) -> bool:
    """Whether an environment variable or query parameter of this name holds a secret
    (HF_TOKEN, AWS_SECRET_ACCESS_KEY, X-Amz-Signature, X-Amz-Credential, sig, ...)."""
    upper = name.upper()
    return any(word in upper for word in SECRET_WORDS) or name.lower() in SECRET_PARAMS


def redact_url(url: str) -> str:
    """`url` with the password of its userinfo (`user:***@host`; a lone user name, often a
    token, as `***@host`) and the values of its secret query parameters (presigned URLs'
    X-Amz-Signature, X-Amz-Credential, X-Amz-Security-Token, Azure's sig, token=, ...)
    replaced by REDACTED; anything else, and a string that is no URL, as it is.

    >>> redact_url("https://me:hunter2@host/d/x.tar?X-Amz-Signature=abc&part=1")
    'https://me:***@host/d/x.tar?X-Amz-Signature=***&part=1'
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    cut = min((i for i in (rest.find("/"), rest.find("?"), rest.find("#")) if i >= 0), default=len(rest))
    netloc, tail = rest[:cut], rest[cut:]
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        user, colon, _ = userinfo.partition(":")
        netloc = f"{user}:{REDACTED}@{host}" if colon else f"{REDACTED}@{host}"
    path, q, query = tail.partition("?")
    if q:
        query, h, fragment = query.partition("#")
        params = []
        for param in query.split("&"):
            key, eq, value = param.partition("=")
            params.append(f"{key}={REDACTED}" if eq and value and is_secret_name(key) else param)
        tail = f"{path}?{'&'.join(params)}{h}{fragment}"
    return f"{scheme}://{netloc}{tail}"


def redact_text(text: str) -> str:
    """`text` (a path, a `pipe:` command, an error message, a line of output) with every URL in
    it redacted (`redact_url`) and `Bearer TOKEN`-style credentials replaced by REDACTED."""
    text = URL_RE.sub(lambda m: redact_url(m.group(0)), text)
    return BEARER_RE.sub(lambda m: f"{m.group(1)}{m.group(2)}{REDACTED}", text)


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


def http_error_text(code: int, reason: str, source: str | None) -> str:
    """`HTTP 401 Unauthorized` and, for a 401 or 403, what to do: the credentials that were
    refused (named by where they came from), or how to give some."""
    text = f"HTTP {code} {reason}"
    if code == 401 and source:
        return f"{text}: the server refused the credentials from {source}; check them ({HOW})"
    if code == 403 and source:
        return f"{text}: the credentials from {source} do not give access to it"
    if code in (401, 403):
        return f"{text}: no credentials were sent; to send some, {HOW}"
    return text
