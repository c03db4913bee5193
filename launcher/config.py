"""Loading a job config: defaults, then the YAML file, then dotted `key=value` overrides.

The schema is trainer.config.JobConfig. This module turns every way a user can get it
wrong into one `ConfigError` line that names the key, the file and what to do; the CLI
prints it and exits 2. Relative paths are made absolute against the directory trainctl
was started in, because Ray workers run in a directory of their own.
"""

from __future__ import annotations

import difflib
import os
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from trainer.config import JobConfig, eval_batches_moved


class ConfigError(ValueError):
    """A config problem, stated in one line for the user."""


def load_config(
    path: str | os.PathLike | None,
    overrides: list[str] = (),
    base_dir: str | None = None,
    model_folder_optional: bool = False,
) -> JobConfig:
    """Build the validated config; `path=None` means defaults plus overrides only.
    `model_folder_optional` (plan): a `model.init_from` folder that is not here is skipped,
    the `model:` section taken as written.

    >>> cfg = load_config("configs/tiny-cpu.yaml", ["train.max_steps=10"])
    """
    where = str(path) if path is not None else "the command line"
    tree: dict[str, Any] = {}
    if path is not None:
        tree = _read_yaml(Path(path))
    for item in overrides:
        _apply_override(tree, item)
    if isinstance(tree.get("model"), dict) and tree["model"].get("init_from"):
        from trainer.hf import HFError, resolve

        base = os.path.join(base_dir or os.getcwd(), os.path.expanduser(str(tree["model"]["init_from"])))
        if model_folder_optional and "://" not in base and not os.path.exists(os.path.join(base, "config.json")):
            print(
                f"trainctl: note: model.init_from {tree['model']['init_from']} is not here: using the model "
                "section as written",
                file=sys.stderr,
            )
        else:
            try:
                resolve(tree, base_dir or os.getcwd())
            except HFError as e:
                raise ConfigError(str(e)) from None
    moved = eval_batches_moved(tree)
    if moved is not None:
        if any(item.partition("=")[0] == "train.eval_batches" for item in overrides):
            where = "the command-line overrides"
        raise ConfigError(f"{moved} (in {where})")
    try:
        cfg = JobConfig.model_validate(tree)
    except ValidationError as e:
        key = ".".join(str(part) for part in e.errors()[0]["loc"])
        if any(item.partition("=")[0] == key for item in overrides):
            where = "the command-line overrides"  # the bad key came from there, not from the file
        raise ConfigError(_describe(e, where)) from None
    return resolve_paths(cfg, base_dir or os.getcwd())


class DuplicateKey(ValueError):
    """A key given twice in one mapping of a YAML text (YAML's last-one-wins would hide it)."""


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key written twice in one mapping, at any depth (PyYAML
    keeps the last silently), naming the dotted key and both lines. Keys a `<<: *anchor`
    merge brings in may be overridden: only the keys written in the mapping itself count.
    `key_prefix`: the dotted key the text is the value of (an override's), named instead of lines."""

    key_prefix = ""

    def construct_document(self, node):
        self.where: dict[int, str] = {}  # id(mapping node) -> its dotted key, for the message

        def walk(n, where: str) -> None:
            if isinstance(n, yaml.MappingNode) and id(n) not in self.where:
                self.where[id(n)] = where
                for k, v in n.value:
                    walk(v, f"{where}.{k.value}" if where else str(k.value))
            elif isinstance(n, yaml.SequenceNode):
                for i, v in enumerate(n.value):
                    walk(v, f"{where}.{i}" if where else str(i))

        walk(node, self.key_prefix)
        return super().construct_document(node)

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key, line = self.construct_object(key_node, deep=True), key_node.start_mark.line + 1
                try:
                    first = seen.get(key)
                except TypeError:  # an unhashable key: SafeLoader's own error names it
                    continue
                if first is not None:
                    where = getattr(self, "where", {}).get(id(node), "")
                    lines = f"on line {line}" if first == line else f"at line {first} and line {line}"
                    raise DuplicateKey(
                        f"key '{f'{where}.{key}' if where else key}' is given twice"
                        + ("" if self.key_prefix else f", {lines}")  # an override's one line says nothing
                        + ": keep one (YAML would silently use the last)"
                    )
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: Path) -> dict[str, Any]:
    if path.is_dir():
        raise ConfigError(f"config file {path} is a folder: give the path to a YAML job file (see configs/)")
    if not path.is_file():
        raise ConfigError(f"config file {path} not found: give the path to a YAML job file (see configs/)")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"{path} is not a YAML job file: byte {e.start:,} is not UTF-8 text (a binary file?): give a job file "
            "like those in configs/"
        ) from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {path} ({e.strerror}): check its permissions") from None
    try:
        tree = yaml.load(text, Loader=UniqueKeyLoader)
    except DuplicateKey as e:
        raise ConfigError(f"{path}: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}: YAML syntax error{at}: {problem}") from None
    if tree is None:
        raise ConfigError(
            f"{path} is empty (or holds only comments): write the job's sections in it (name, model, data, train, "
            "...), e.g. start from configs/tiny-cpu.yaml"
        )
    if not isinstance(tree, dict):
        raise ConfigError(
            f"{path}: a job file is a mapping of sections (name, model, data, train, ...), not a {type(tree).__name__}"
        )
    return tree


def _apply_override(tree: dict[str, Any], item: str) -> None:
    key, sep, raw = item.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r} is not of the form section.key=value (e.g. train.lr=3e-4)")
    try:
        loader = type("OverrideLoader", (UniqueKeyLoader,), {"key_prefix": key})
        value = yaml.load(raw, Loader=loader) if raw != "" else ""
    except DuplicateKey as e:
        raise ConfigError(f"override {item!r}: {e}") from None
    except yaml.YAMLError:
        value = raw
    node = tree
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: {part} is a value, not a section")
        node = child
    node[parts[-1]] = value


def _describe(error: ValidationError, where: str) -> str:
    """The first validation problem as one line: key, what is wrong, what to do."""
    err = error.errors()[0]
    loc = [str(p) for p in err["loc"]]
    key = ".".join(loc)
    kind = err["type"]
    if kind == "extra_forbidden":
        hint = _nearest(loc)
        return f"unknown key '{key}' in {where}" + (f": did you mean '{hint}'?" if hint else "")
    msg = err["msg"].removeprefix("Value error, ")
    if kind == "value_error" or not key:
        return f"{msg} (in {where})"
    if kind == "literal_error":
        return f"{key}={err['input']!r} is not allowed in {where}: {msg.lower()}"
    return f"{key}={err['input']!r} in {where}: {msg.lower()}"


def _nearest(loc: list[str]) -> str | None:
    """Closest valid dotted key to an unknown one, for the 'did you mean' hint."""
    model: type[BaseModel] = JobConfig
    for part in loc[:-1]:
        field = model.model_fields.get(part)
        annotation = field.annotation if field else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    match = difflib.get_close_matches(loc[-1], list(model.model_fields), n=1, cutoff=0.5)
    return ".".join(loc[:-1] + match) if match else None


def resolve_paths(cfg: JobConfig, base_dir: str) -> JobConfig:
    """Make the config's relative paths absolute against `base_dir`."""

    def absolute(p: str) -> str:
        if "://" in p or p.startswith("pipe:") or os.path.isabs(p):
            return p
        return os.path.normpath(os.path.join(base_dir, os.path.expanduser(p)))

    if cfg.data.path != "stdlib":
        cfg.data.path = absolute(cfg.data.path)
    for source in cfg.data.sources or []:
        if source.path != "stdlib":
            source.path = absolute(source.path)
    cfg.data.cache_dir = absolute(cfg.data.cache_dir)
    cfg.checkpoint.storage_path = absolute(cfg.checkpoint.storage_path)
    cfg.checkpoint.local_path = absolute(cfg.checkpoint.local_path)
    return cfg
