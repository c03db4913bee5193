"""Sources: the same dataset over a real HTTP server on 127.0.0.1 gives the same batches
as from the local folder; transient failures are retried; bad shards are named."""

from __future__ import annotations

import functools
import http.server
import shutil
import socket
import tarfile
import threading
from pathlib import Path

import pytest
import torch
from cli_helpers import SHAKESPEARE
from http_helpers import RangeHandler
from s3_helpers import s3_server

from data_pipeline import DataError, TokenStream, eval_batches, load_manifest, prepare, sources


class Handler(RangeHandler):
    """Serves a folder; `fail` maps a path to how many of its next requests fail
    (503, or a connection dropped halfway through the body)."""

    fail: dict[str, int] = {}
    mode = "503"
    paths: list[str] = []

    def do_GET(self):
        type(self).paths.append(self.path)
        left = self.fail.get(self.path, 0)
        if left:
            self.fail[self.path] = left - 1
            if self.mode == "503":
                self.send_error(503, "busy")
                return
            body = (Path(self.directory) / self.path.lstrip("/")).read_bytes()
            if "Range" in self.headers:  # bytes=a-b
                start, end = map(int, self.headers["Range"].removeprefix("bytes=").split("-"))
                body = body[start : end + 1]
            self.send_response(206 if "Range" in self.headers else 200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])  # then hang up: the client sees a truncated body
            self.close_connection = True
            return
        super().do_GET()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("src")
    (root / "t.txt").write_text(SHAKESPEARE.read_text()[:20_000])
    prepare([str(root / "t.txt")], str(root / "d"), shard_size_bytes=6_000, sample_tokens=500)
    return root


@pytest.fixture(scope="module")
def server(data):
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(data)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch):
    monkeypatch.setattr(sources, "BACKOFF_S", 0.01)  # every retry goes through sources.with_retries
    Handler.fail, Handler.mode, Handler.paths = {}, "503", []


def batches(path, steps=12, state=None):
    s = TokenStream(path, "train", 32, 4, 0, 1, seed=3, shuffle_buffer=64)
    if state:
        s.load_state_dict(state)
    it = iter(s)
    return [next(it) for _ in range(steps)], s.state_dict()


def test_http_gives_the_same_batches_as_the_local_folder(data, server):
    local, _ = batches(str(data / "d"), 40)  # crosses an epoch end
    remote, _ = batches(f"{server}/d", 40)
    assert all(torch.equal(a, b) for a, b in zip(local, remote))
    assert len(load_manifest(f"{server}/d/manifest.json")["splits"]["train"]["shards"]) > 2
    assert all(
        torch.equal(a, b)
        for a, b in zip(
            eval_batches(str(data / "d"), "val", 32, 4, 0, 1), eval_batches(f"{server}/d", "val", 32, 4, 0, 1)
        )
    )
    _, state = batches(f"{server}/d", 17)
    resumed, _ = batches(f"{server}/d", 23, state)
    assert all(torch.equal(a, b) for a, b in zip(local[17:], resumed))


@pytest.mark.parametrize("mode", ["503", "drop"])
def test_transient_failures_are_retried(data, server, mode):
    local = eval_batches(str(data / "d"), "train", 32, 4, 0, 1)  # every train shard, in order
    Handler.mode = mode
    Handler.fail = {"/d/manifest.json": 2, "/d/train-000001.tar": 2, "/d/train-000002.tar": 1}
    remote = eval_batches(f"{server}/d", "train", 32, 4, 0, 1)
    assert len(local) == len(remote) > 100 and all(torch.equal(a, b) for a, b in zip(local, remote))
    assert Handler.fail == {"/d/manifest.json": 0, "/d/train-000001.tar": 0, "/d/train-000002.tar": 0}
    assert Handler.paths.count("/d/train-000001.tar") >= 3


def test_a_shard_that_keeps_failing_is_named(server):
    Handler.fail = {"/d/train-000001.tar": 100}
    with pytest.raises(DataError, match=r"shard http://127.0.0.1:\d+/d/train-000001.tar is unreadable \(HTTP 503"):
        eval_batches(f"{server}/d", "train", 32, 4, 0, 1)
    assert Handler.paths.count("/d/train-000001.tar") == sources.RETRIES + 1  # bounded


def test_missing_shard_is_not_retried(data, server, tmp_path):
    copy = data / "missing"
    shutil.copytree(data / "d", copy)
    (copy / "train-000000.tar").unlink()
    with pytest.raises(DataError, match=r"missing/train-000000.tar is unreadable \(HTTP 404"):
        eval_batches(f"{server}/missing", "train", 32, 4, 0, 1)
    assert Handler.paths.count("/missing/train-000000.tar") == 1


def test_unreachable_server(monkeypatch):
    monkeypatch.setattr(sources, "RETRIES", 2)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nobody listens there
    with pytest.raises(
        DataError, match=rf"cannot read http://127.0.0.1:{port}/d/manifest.json after 3 tries: .*refused"
    ):
        load_manifest(f"http://127.0.0.1:{port}/d")


def _rewrite_member(shard: Path, change) -> None:
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tar:
        for i, (m, payload) in enumerate(members):
            m, payload = change(i, m, payload)
            import io

            m.size = len(payload)
            tar.addfile(m, io.BytesIO(payload))


def test_sha256_mismatch_is_a_corrupt_shard(data, tmp_path):
    copy = tmp_path / "d"
    shutil.copytree(data / "d", copy)
    flip = lambda i, m, p: (m, p[:10] + bytes([p[10] ^ 1]) + p[11:]) if i == 0 else (m, p)  # noqa: E731
    _rewrite_member(copy / "train-000000.tar", flip)  # same token count, a valid tar, one byte off
    with pytest.raises(DataError, match="train-000000.tar fails its sha256 check against the manifest"):
        eval_batches(str(copy), "train", 32, 4, 0, 1)


def test_sample_without_tokens(data, tmp_path):
    copy = tmp_path / "d"
    shutil.copytree(data / "d", copy)
    rename = lambda i, m, p: (tarfile.TarInfo(m.name.replace(".tokens", ".txt")), p)  # noqa: E731
    _rewrite_member(copy / "val-000000.tar", rename)
    with pytest.raises(DataError, match=r"val-000000.tar: sample 000000000 has no .tokens member"):
        eval_batches(str(copy), "val", 32, 4, 0, 1)


@pytest.mark.parametrize("content, fragment", [("{oops", "is not valid JSON"), ("[1, 2]", "is not a trainctl dataset")])
def test_malformed_manifest(tmp_path, content, fragment):
    (tmp_path / "manifest.json").write_text(content)
    with pytest.raises(DataError, match=fragment):
        load_manifest(str(tmp_path))


@pytest.fixture(scope="module")
def s3_bucket(data):
    """A real S3-compatible server (moto) on 127.0.0.1 holding the dataset under s3://data/d."""
    with s3_server("data") as (env, client):
        for path in (data / "d").iterdir():
            client.upload_file(str(path), "data", f"d/{path.name}")
        yield env


def test_s3_gives_the_same_batches_as_the_local_folder(data, s3_bucket, monkeypatch):
    for key, value in s3_bucket.items():  # endpoint and credentials from the usual AWS variables
        monkeypatch.setenv(key, value)
    local, _ = batches(str(data / "d"), 40)
    remote, _ = batches("s3://data/d", 40)
    assert all(torch.equal(a, b) for a, b in zip(local, remote))
    with pytest.raises(DataError, match="no-such-bucket"):
        load_manifest("s3://no-such-bucket/d")


def test_a_brace_list_of_token_shards_reads_them_through_the_manifest_beside_them(data, server):
    shards = sorted(p.name for p in (data / "d").glob("train-*.tar"))
    assert len(shards) >= 4
    every = f"{data}/d/train-{{000000..{len(shards) - 1:06d}}}.tar"
    local, _ = batches(str(data / "d"), 40)  # crosses an epoch end
    for spec in (every, f"{server}/d/train-{{000000..{len(shards) - 1:06d}}}.tar"):
        listed, _ = batches(spec, 40)
        assert all(torch.equal(a, b) for a, b in zip(local, listed))
    manifest = load_manifest(str(data / "d"))
    some = TokenStream(f"{data}/d/train-{{000001..000003}}.tar", "train", 32, 4, 0, 1)
    assert some.tokens == sum(s["tokens"] for s in manifest["splits"]["train"]["shards"][1:4])
    listed = [c[3] for s in manifest["splits"]["train"]["shards"][1:4] for c in s["chunks"]]
    assert some.table.sha256 == listed
    assert some.manifest["splits"]["val"]["shards"] == []


def test_token_shards_without_their_manifest(data, tmp_path):
    for name in ("train-000000.tar", "train-000001.tar"):
        shutil.copy(data / "d" / name, tmp_path / name)
    with pytest.raises(
        DataError, match=r"train-000000.tar holds token samples \(.tokens\) but no manifest.json beside it"
    ):
        next(iter(TokenStream(f"{tmp_path}/train-{{000000..000001}}.tar", "train", 32, 1, 0, 1)))
    shutil.copy(data / "d" / "manifest.json", tmp_path / "manifest.json")
    (tmp_path / "extra-000000.tar").write_bytes((data / "d" / "train-000000.tar").read_bytes())
    with pytest.raises(DataError, match=r"1 of the shards, the first \S+extra-000000.tar, are not in \S+manifest.json"):
        TokenStream(f"{tmp_path}/{{train,extra}}-000000.tar", "train", 32, 1, 0, 1)


def test_prepare_writes_to_an_object_store(data, s3_bucket, monkeypatch, tmp_path):
    for key, value in s3_bucket.items():
        monkeypatch.setenv(key, value)
    text = str(data / "t.txt")
    m = prepare([text], "s3://data/made", shard_size_bytes=6_000, sample_tokens=500)
    assert m["root"] == "s3://data/made" and len(m["splits"]["train"]["shards"]) > 2
    local, _ = batches(str(data / "d"), 40)
    remote, _ = batches("s3://data/made", 40)
    assert all(torch.equal(a, b) for a, b in zip(local, remote))
    import tempfile

    assert not list(Path(tempfile.gettempdir()).glob("trainctl-prepare-*"))  # the local staging copies are gone
    with pytest.raises(DataError, match="s3://data/made already holds a dataset: pass --overwrite"):
        prepare([text], "s3://data/made")
    (tmp_path / "small.txt").write_text("tiny\n" * 100)
    small = prepare([str(tmp_path / "small.txt")], "s3://data/made", overwrite=True)  # fewer shards: the rest go
    import fsspec

    fs, _ = fsspec.core.url_to_fs("s3://data/made")
    names = sorted(p.rsplit("/", 1)[1] for p in fs.ls("data/made", refresh=True))
    assert names == sorted(["manifest.json"] + [s["path"] for sp in small["splits"].values() for s in sp["shards"]])
    with pytest.raises(DataError, match="--out s3://no-such-bucket/x: no-such-bucket does not exist"):
        prepare([text], "s3://no-such-bucket/x")
