"""A config tree's secrets: `redact` (what a run writes down and prints), and the private
Ray's workers' config with its secrets carried apart from their arguments (`secrets_apart`,
`secrets_back`, `SECRETS_ENV`). Works on plain trees (dicts, lists, strings); torch-free.
"""

from __future__ import annotations

from typing import Any

from data_pipeline.redact import REDACTED, is_secret_name, redact_text


def redact(tree: Any, env: bool = False) -> Any:
    """A copy of a config tree (plain dicts, lists, strings) with its secrets replaced by
    REDACTED: the credentials in every URL (`redact_text`), and the values of `cluster.env`
    variables whose names say they are secrets (`is_secret_name`: HF_TOKEN, WANDB_API_KEY,
    AWS_SECRET_ACCESS_KEY, ...)."""
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            if env and isinstance(value, str) and is_secret_name(str(key)):
                out[key] = REDACTED if value else value
            else:
                out[key] = redact(value, env=key == "env" and isinstance(value, dict))
        return out
    if isinstance(tree, list):
        return [redact(v) for v in tree]
    if isinstance(tree, str):
        return redact_text(tree)
    return tree


# The private Ray's workers get the config with its secrets as REDACTED in their arguments, and
# the real values in this variable, inherited from the launcher (cluster/ray_job.py's
# `connect`): Ray logs a runtime_env's variables in its session logs, not an inherited one.
SECRETS_ENV = "TRAINCTL_CONFIG_SECRETS"


def secrets_apart(tree: Any) -> tuple[Any, str]:
    """(`redact(tree)`, the JSON of [where, redacted, real value] for each value it redacted,
    "" when none): the second undoes the first in `secrets_back`."""
    import json

    redacted = redact(tree)
    found: list[list[Any]] = []

    def walk(real: Any, red: Any, where: list) -> None:
        if isinstance(real, dict):
            for key in real:
                walk(real[key], red[key], [*where, key])
        elif isinstance(real, list):
            for i, (a, b) in enumerate(zip(real, red)):
                walk(a, b, [*where, i])
        elif real != red:
            found.append([where, red, real])

    walk(tree, redacted, [])
    return redacted, json.dumps(found) if found else ""


def secrets_back(tree: Any, secrets: str | None) -> Any:
    """A copy of `tree` with the values `secrets_apart` redacted put back: each where it is
    still the redacted value it was (a tree with the real ones, or another job's, stays as it is)."""
    import copy
    import json

    if not secrets:
        return tree
    tree = copy.deepcopy(tree)
    for where, red, real in json.loads(secrets):
        node = tree
        try:
            for key in where[:-1]:
                node = node[key]
            if node[where[-1]] == red:
                node[where[-1]] = real
        except (KeyError, IndexError, TypeError):
            continue
    return tree
