"""The repo stands alone: no file of the project refers to a path outside it (CI clones the
repo by itself, so a path to something beside the clone works here and nowhere else), and
every dataset a shipped config reads is in the repo."""

from __future__ import annotations

import io
import os
import re
import subprocess
import tokenize
from pathlib import Path

import pytest
import yaml

from data_pipeline.sources import is_url

REPO = Path(__file__).resolve().parents[1]
UP = ".." + "/"  # spelled so that this file does not hold what it looks for
# A `../` path starts a word (after a space, quote, `=`, `(`...: not inside a/../b) and
# names something: a name or more `..`.
CLIMB = re.compile(r"(?<![\w.~$/}\\-])((?:\.\./)+(?:\.\.(?![\w.])|[\w$@{][^\s'\"`)\]>,;:*?|]*))")
PARENTS = re.compile(r"__file__\)(?:\.resolve\(\)|\.absolute\(\))?(\.parents\[(\d+)\]|(?:\.parent\b)+)")
ROOT_PARENT = re.compile(r"\b(?:REPO|ROOT|REPO_ROOT|PROJECT_ROOT)\.parent\b")
# Absolute paths of a developer's machine: the workspace checkouts sit in here, home folders.
# (Scratch space such as /tmp, and the cluster's own mount points, /shared in the templates,
# are fine; so is whatever folder a clone sits in, /tmp in CI say.)
ABSOLUTE_RE = re.compile(r"(?<![\w.~-])/(?:work|home|Users)/[\w.-]")
# Words about the world outside that are not paths the project reads.
ALLOWED: dict[tuple[str, str], str] = {  # (file, text on the line): why it may refer outside
    ("tests/test_self_contained.py", '    ("tests/test_'): "this list itself",
    ("tests/test_config.py", "name=../x"): "a run name that tries to climb out, refused",
    ("tests/test_security.py", "../../../etc"): "a `latest` file that points out of its folder, ignored",
    ("tests/test_security.py", "../etc"): "tags that try to climb out, refused",
    ("tests/test_security.py", "../../x"): "an object store's file name that tries to climb out, refused",
    ("tests/test_security.py", "../../escaped"): "an object store's file name that tries to climb out, refused",
}
# What the project ships as data, not code or docs: not read for references.
DATA = ("tests/data/",)
MD_LINK = re.compile(r"\]\(\s*$")  # just before a path: it is a Markdown link's target


def project_files() -> list[str]:
    """Every file a commit would hold: tracked, or new and not ignored."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return sorted({f for f in out.split("\0") if f and (REPO / f).is_file()})


def read_text(rel: str) -> str | None:
    try:
        data = (REPO / rel).read_bytes()
    except FileNotFoundError:  # gone since git listed it (an editor's temporary file)
        return None
    if b"\0" in data[:8192]:
        return None
    try:
        return data.decode()
    except UnicodeDecodeError:
        return None


def escapes(base: Path, path: str) -> bool:
    return not Path(os.path.normpath(base / path)).is_relative_to(REPO)


def joined_literals(text: str) -> set[tuple[int, int]]:
    """(line, column) of the Python string literals appended to another path: after `/` or
    as a later argument of join/joinpath. Their `../` climbs from that path, not from the
    repo (e.g. a test's tmp_path)."""
    out, calls, prev = set(), [], None
    strings = {tokenize.STRING, getattr(tokenize, "FSTRING_START", tokenize.STRING)}
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(text).readline))
    except (tokenize.TokenError, SyntaxError):
        return out
    for tok in tokens:
        if tok.type in (tokenize.NL, tokenize.NEWLINE, tokenize.COMMENT, tokenize.INDENT, tokenize.DEDENT):
            continue
        if tok.type == tokenize.OP and tok.string in "([{":
            calls.append([prev.string if prev is not None and prev.type == tokenize.NAME else "", 0])
        elif tok.type == tokenize.OP and tok.string in ")]}" and calls:
            calls.pop()
        elif tok.type == tokenize.OP and tok.string == "," and calls:
            calls[-1][1] += 1
        elif tok.type in strings:
            after_slash = prev is not None and prev.type == tokenize.OP and prev.string == "/"
            later_arg = bool(calls) and calls[-1][0] in ("join", "joinpath") and calls[-1][1] > 0
            if after_slash or later_arg:
                out.add(tok.start)
        prev = tok
    return out


def references_outside(rel: str, text: str) -> list[str]:
    """`file:line: what` for each reference in this file to a path outside the repo.

    A `../` path must stay in the repo both from this file's folder and from the repo root:
    job configs' paths are relative to the folder trainctl runs in, and so are the paths in
    code, scripts and the commands in docs (run from the root). A Markdown link is relative
    to its file alone; a Python literal appended to another path (after `/`, or a later
    argument of a join) climbs from that path, a test's tmp_path say."""
    found = []
    here = (REPO / rel).parent
    depth = len(Path(rel).parts) - 1  # folders between the repo root and this file
    joined = joined_literals(text) if rel.endswith(".py") and CLIMB.search(text) else set()
    for n, line in enumerate(text.splitlines(), 1):
        if any(rel == f and allowed in line for f, allowed in ALLOWED):
            continue
        for m in CLIMB.finditer(line):
            # a literal that begins with this `../` (its prefix and quotes just before) and is
            # appended to another path
            if any((n, col) in joined for col in range(m.start() - 5, m.start())):
                continue
            link = rel.endswith(".md") and MD_LINK.search(line[: m.start()])
            bases = [here] if link else [here, REPO]
            if any(escapes(base, m.group(1)) for base in bases):
                found.append(f"{rel}:{n}: {m.group(1)}")
        if rel.endswith(".py"):
            for m in PARENTS.finditer(line):
                up = int(m.group(2)) + 1 if m.group(2) else m.group(1).count(".parent")
                if up > depth + 1:  # parents[depth] is the repo root
                    found.append(f"{rel}:{n}: {m.group(0)} (the folder above the repo)")
            for m in ROOT_PARENT.finditer(line):
                found.append(f"{rel}:{n}: {m.group(0)} (the folder above the repo)")
        for m in ABSOLUTE_RE.finditer(line):
            found.append(f"{rel}:{n}: {line[m.start() :].split()[0]} (an absolute path of this machine)")
    return found


def test_no_file_refers_to_a_path_outside_the_repo():
    files = project_files()
    assert "README.md" in files and "configs/shakespeare-char.yaml" in files
    found = []
    for rel in (f for f in files if not f.startswith(DATA)):
        text = read_text(rel)
        if text is not None:
            found += references_outside(rel, text)
    assert not found, "paths outside the repo (put what they name inside it):\n" + "\n".join(found)


@pytest.mark.parametrize(
    "rel, text, bad",
    [
        (
            "configs/x.yaml",
            "  path: " + UP + "shared/data/t.txt   # c",
            True,
        ),  # configs/ + ../ is in the repo, the root's is not
        ("configs/x.yaml", "  path: tests/data/t.txt", False),
        ("README.md", "See `" + UP + "shared/DESIGN.md`", True),
        ("cluster/kuberay/README.md", "see [the README](" + UP + UP + "README.md)", False),  # a link, from its folder
        ("cluster/kuberay/README.md", "see [x](" + UP + UP + UP + "x.md)", True),
        ("benchmarks/b.py", '"""    python benchmarks/b.py [--text ' + UP + 'shared/t.txt]"""', True),
        ("benchmarks/b.py", 'ap.add_argument("--text", default="' + UP + 'corpus.txt")', True),
        ("tests/t.py", 'p = tmp_path / "' + UP + 'sibling"', False),  # climbs from tmp_path
        ("tests/t.py", 'p = os.path.join(tmp, "' + UP + 'sibling")', False),
        ("tests/t.py", 'p = open("' + UP + 'sibling")', True),
        ("tests/t.py", 'p = f"{tmp}/' + UP + 'x"', False),
        ("tests/t.py", "X = Path(__file__).resolve()" + ".parents[2] / 'shared'", True),
        ("tests/t.py", "REPO = Path(__file__).resolve().parents[1]", False),
        ("tests/t.py", "X = Path(__file__)" + ".parent.parent.parent", True),
        ("tests/t.py", "X = Path(__file__)" + ".parent.parent", False),
        ("tests/t.py", "X = REPO" + ".parent / 'shared'", True),
        ("launcher/x.py", "log_path.parent.mkdir()", False),
        ("README.md", "writes to /shared/runs on every node", False),  # a mount point on the cluster
        ("benchmarks/b.py", 'ap.add_argument("--work", default="/tmp/bench")', False),  # scratch space
        ("README.md", "reads " + "/wo" + "rk/shared/data", True),
        ("README.md", "`cd " + UP + "..` then", True),
        ("README.md", "a `" + UP + "` in prose names nothing", False),
    ],
)
def test_what_counts_as_a_reference_outside(rel, text, bad):
    assert bool(references_outside(rel, text)) == bad, references_outside(rel, text)


def local_paths(cfg: dict) -> list[tuple[str, str]]:
    data = cfg.get("data") or {}
    paths = [("data.path", data["path"])] if "path" in data else []
    paths += [(f"data.sources[{i}].path", s["path"]) for i, s in enumerate(data.get("sources") or [])]
    if str(data.get("tokenizer", "")).endswith(".json"):
        paths.append(("data.tokenizer", data["tokenizer"]))
    return [(k, p) for k, p in paths if p != "stdlib" and not is_url(p) and not p.startswith("pipe:")]


def test_every_local_dataset_of_a_shipped_config_is_in_the_repo():
    """trainctl resolves a config's relative paths against the folder it runs in: the repo
    root. The GPU configs name datasets you prepare into data/ (their headers say so); any
    other local path must be a file the repo holds."""
    files = set(project_files())
    checked = 0
    for config in sorted((REPO / "configs").glob("*.yaml")):
        for key, path in local_paths(yaml.safe_load(config.read_text())):
            where = Path(os.path.normpath(REPO / os.path.expanduser(path)))
            assert where.is_relative_to(REPO), f"{config.name}: {key} {path} is outside the repo"
            rel = where.relative_to(REPO).as_posix()
            if rel.startswith("data/"):
                continue
            assert rel in files or any(f.startswith(rel + "/") for f in files), (
                f"{config.name}: {key} {path} is not a file or folder of the repo"
            )
            checked += 1
    assert checked  # configs/shakespeare-char.yaml reads tests/data/tinyshakespeare.txt
