"""What text may say about credentials: never their value. Redaction (`redact_url`,
`redact_text`, `is_secret_name`, `REDACTED`): the password of a URL's userinfo, secret query
parameters (presigned URLs' signatures) and `Bearer TOKEN`s replaced by REDACTED, which
`DataError` applies to its message; and `http_error_text`, a 401 or 403 described by where the
refused credentials came from (data_pipeline.credentials finds them) or how to give some.

Imports nothing of trainctl: errors.py and credentials.py both build on it.
"""

from __future__ import annotations

import re

# Secrets never written down: a run folder, W&B and the console get REDACTED in their place.
REDACTED = "***"
SECRET_WORDS = ("TOKEN", "KEY", "SECRET", "PASSWORD", "PASSWD", "CREDENTIAL", "SIGNATURE", "AUTH")
SECRET_PARAMS = ("sig", "pwd", "pass", "code")  # query parameters that are secrets by their whole name
URL_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")
BEARER_RE = re.compile(r"(?i)\b(bearer|basic)(\s+)[A-Za-z0-9._~+/=-]{8,}")

TOKEN_ENV = "TRAINCTL_HTTP_TOKEN"
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
