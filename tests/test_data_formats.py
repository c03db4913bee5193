"""prepare's input formats: the same documents as .jsonl, .jsonl.gz, .jsonl.zst and .parquet,
local or over HTTP, give byte-identical shards; bad input fails as one line naming the file
and line, or is skipped and counted; the validation split is a hash of each document."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from cli_helpers import SHAKESPEARE

from data_pipeline import DataError, prepare

FORMATS = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet")


def make_docs(n: int = 240) -> list[str]:
    src = SHAKESPEARE.read_text()
    return [f"doc {i} — ünï\n" + src[i * 301 : i * 301 + 50 + (i * 37) % 400] for i in range(n)]


def write(path: Path, docs: list[str], field: str = "text") -> Path:
    """`docs` in the format `path`'s name says (parquet in several row groups)."""
    lines = "".join(json.dumps({"id": i, field: d}) + "\n" for i, d in enumerate(docs)).encode()
    name = path.name
    if name.endswith(".jsonl"):
        path.write_bytes(lines)
    elif name.endswith(".gz"):
        path.write_bytes(gzip.compress(lines, mtime=0))
    elif name.endswith(".zst"):
        path.write_bytes(zstandard.ZstdCompressor(write_checksum=True).compress(lines))
    else:
        table = pa.table({"id": list(range(len(docs))), field: docs})
        pq.write_table(table, path, row_group_size=50)
    return path


def shards(out: Path) -> dict:
    """What must be identical: each shard's sha256, and the manifest's splits and counts."""
    manifest = json.loads((out / "manifest.json").read_text())
    return {
        "shards": {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.tar"))},
        **{k: manifest[k] for k in ("splits", "input_bytes", "skipped")},
    }


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("served")

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_every_format_local_or_http_gives_the_same_shards(tmp_path, server):
    root, url = server
    docs = make_docs()
    results = {}
    for ext in FORMATS:
        src = write(tmp_path / f"docs{ext}", docs)
        write(root / f"docs{ext}", docs)
        results[ext] = shards(Path(prepare([str(src)], str(tmp_path / f"out{ext}"), shard_size_bytes=8_000)["root"]))
        http_out = tmp_path / f"http{ext}"
        results["http " + ext] = shards(
            Path(prepare([f"{url}/docs{ext}"], str(http_out), shard_size_bytes=8_000)["root"])
        )
    plain = results[".jsonl"]
    assert len(plain["shards"]) > 4 and plain["skipped"] == {"documents": 0, "files": 0}
    assert plain["splits"]["train"]["documents"] + plain["splits"]["val"]["documents"] == len(docs)
    assert plain["input_bytes"] == sum(len(d.encode()) for d in docs)
    assert all(r == plain for r in results.values()), [k for k, r in results.items() if r != plain]


def test_the_val_split_is_a_hash_of_each_document_whatever_its_file(tmp_path):
    from data_pipeline.prepare import split_documents

    docs = make_docs(400)
    expected = {
        d.encode()
        for d in docs
        if int.from_bytes(hashlib.blake2b(d.encode(), digest_size=8).digest(), "big") < 0.25 * 2**64
    }
    assert 60 < len(expected) < 140  # about a quarter
    one = write(tmp_path / "all.jsonl", docs)
    parts = [write(tmp_path / "a.parquet", docs[300:]), write(tmp_path / "b.jsonl.zst", docs[:300][::-1])]
    for files in ([one], parts):
        got = [(split, text) for f in files for split, text in split_documents(str(f), 0.25, "text")]
        assert len(got) == len(docs) and {text for split, text in got if split == "val"} == expected


def corrupt_gz(path: Path, docs: list[str]) -> Path:
    data = bytearray(gzip.compress("".join(json.dumps({"text": d}) + "\n" for d in docs).encode(), mtime=0))
    data[-8] ^= 0xFF  # the CRC32 in the trailer: every line decompresses, the check at the end fails
    path.write_bytes(bytes(data))
    return path


def test_a_corrupt_gz_fails_as_one_line_and_leaves_nothing(tmp_path):
    docs = make_docs(30)
    write(tmp_path / "good.jsonl", docs)
    corrupt_gz(tmp_path / "c4-0001.jsonl.gz", docs)
    repo = Path(__file__).resolve().parents[1]
    r = subprocess.run(
        [sys.executable, "-m", "launcher.cli", "prepare", "good.jsonl", "c4-0001.jsonl.gz", "--out", "d"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(repo)},
        timeout=120,
    )
    assert r.returncode == 2, r.stderr
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith("trainctl: error: c4-0001.jsonl.gz line ") and "not a readable gzip file" in line
    assert line.endswith("fix the file or pass --on-error skip")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c4-0001.jsonl.gz", "good.jsonl"]


def test_a_corrupt_gz_or_zst_is_skipped_and_counted(tmp_path, capsys):
    docs = make_docs(60)
    write(tmp_path / "good.jsonl", docs[:30])
    corrupt_gz(tmp_path / "bad.jsonl.gz", docs[30:])
    data = bytearray(write(tmp_path / "bad.jsonl.zst", docs).read_bytes())
    data[0] ^= 0xFF  # not a zstandard frame
    (tmp_path / "bad.jsonl.zst").write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"bad.jsonl.zst line 1: not a readable zstandard file"):
        prepare([str(tmp_path / "bad.jsonl.zst")], str(tmp_path / "fail"))
    assert not (tmp_path / "fail").exists()
    files = [str(tmp_path / n) for n in ("good.jsonl", "bad.jsonl.gz", "bad.jsonl.zst")]
    m = prepare(files, str(tmp_path / "out"), on_error="skip")
    assert m["skipped"] == {"documents": 0, "files": 2}
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["skipped"] == m["skipped"]
    assert 30 <= m["splits"]["train"]["documents"] + m["splits"]["val"]["documents"] <= 60  # the .gz's lines read
    err = capsys.readouterr().err
    assert "prepare: skipped " + str(tmp_path / "bad.jsonl.gz") + " line " in err and "gzip" in err


def test_a_parquet_file_without_the_text_column(tmp_path):
    docs = make_docs(20)
    write(tmp_path / "a.parquet", docs)
    write(tmp_path / "b.parquet", docs, field="body")
    files = [str(tmp_path / "a.parquet"), str(tmp_path / "b.parquet")]
    with pytest.raises(DataError) as e:
        prepare(files, str(tmp_path / "fail"))
    assert str(e.value) == (
        f"{tmp_path / 'b.parquet'} has no 'text' column (it has id, body): "
        "pass --text-field with the field that holds the text, or --on-error skip"
    )
    assert not (tmp_path / "fail").exists()
    m = prepare(files, str(tmp_path / "out"), on_error="skip")
    assert m["skipped"] == {"documents": 0, "files": 1}
    assert m["splits"]["train"]["documents"] + m["splits"]["val"]["documents"] == 20


@pytest.mark.parametrize("ext", [".jsonl", ".jsonl.gz"])
def test_a_line_that_is_not_utf8(tmp_path, ext, capsys):
    lines = b'{"text": "fine"}\n{"text": "caf\xe9"}\n{"text": "also fine"}\n'
    path = tmp_path / f"a{ext}"
    path.write_bytes(gzip.compress(lines) if ext.endswith(".gz") else lines)
    with pytest.raises(DataError) as e:
        prepare([str(path)], str(tmp_path / "fail"))
    assert str(e.value).startswith(f"{path} line 2: not valid UTF-8 (")
    assert str(e.value).endswith("): fix the file or pass --on-error skip") and not (tmp_path / "fail").exists()
    m = prepare([str(path)], str(tmp_path / "out"), on_error="skip", val_fraction=0)
    assert m["skipped"] == {"documents": 1, "files": 0} and m["splits"]["train"]["documents"] == 2
    assert capsys.readouterr().err.count("prepare: skipped ") == 1


def test_skip_warnings_are_bounded_and_the_summary_counts(tmp_path, capsys):
    from data_pipeline import summarize

    bad = "".join('{"body": 1}\n' if i % 2 else json.dumps({"text": f"doc {i}"}) + "\n" for i in range(50))
    (tmp_path / "a.jsonl").write_text(bad)
    (tmp_path / "b.jsonl").write_text(bad)
    m = prepare([str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")], str(tmp_path / "out"), on_error="skip")
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 11 and all("has no 'text' field" in line for line in err[:10])
    assert err[-1].startswith("prepare: skipped 50 documents and 0 files (--on-error skip) in all, 10 named above")
    assert m["skipped"] == {"documents": 50, "files": 0}
    assert "skipped 50 bad documents and 0 bad files" in summarize(m).splitlines()[0]


@pytest.mark.parametrize("ext", [".jsonl.gz", ".jsonl.zst"])
def test_a_truncated_compressed_file_is_corrupt_not_short(tmp_path, ext):
    docs = make_docs(2000)  # several zstandard blocks: the first half decodes
    data = write(tmp_path / f"a{ext}", docs).read_bytes()
    (tmp_path / f"a{ext}").write_bytes(data[: len(data) // 2])
    with pytest.raises(
        DataError, match=r"a\.jsonl\.(gz|zst) line [\d,]+: not a readable (gzip|zstandard) file \(EOFError"
    ):
        prepare([str(tmp_path / f"a{ext}")], str(tmp_path / "fail"))
    m = prepare([str(tmp_path / f"a{ext}")], str(tmp_path / "out"), on_error="skip", val_fraction=0)
    assert m["skipped"] == {"documents": 0, "files": 1} and 0 < m["splits"]["train"]["documents"] < 2000
