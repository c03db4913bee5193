"""Sources: the same dataset over a real HTTP server on 127.0.0.1 gives the same batches
as from the local folder; transient failures are retried by the one policy (the server
counts the attempts, an injected clock records the waits); bad shards are named."""

from __future__ import annotations

import email.utils
import shutil
import socket
import tarfile
import time
import urllib.parse
from pathlib import Path

import pytest
import torch
from cli_helpers import SHAKESPEARE
from http_helpers import DROP, basic, bearer, serve, stall, status
from s3_helpers import s3_server

from data_pipeline import (
    DataError,
    TokenStream,
    dataset_stream,
    load_manifest,
    open_dataset,
    prepare,
    redact,
    sources,
    val_share,
)
from data_pipeline.shardreads import shard_reader

TIMEOUT_S = 0.4  # the client's timeout in the tests that stall (sources.TIMEOUT_S, 60 s in use)
STALL = stall(2.0)  # a server silent for longer than that: a real socket timeout on the client
SCHEDULE = [0.5, 1.0, 2.0, 4.0, 8.0]  # BACKOFF_S * 2**k before retry k


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("src")
    (root / "t.txt").write_text(SHAKESPEARE.read_text()[:20_000])
    prepare([str(root / "t.txt")], str(root / "d"), shard_size_bytes=6_000, sample_tokens=500)
    return root


@pytest.fixture(scope="module")
def httpd(data):
    with serve(data) as httpd:
        yield httpd


@pytest.fixture
def server(httpd):
    """The server's URL; `httpd.handler.faults` and `.hits` start empty in every test."""
    httpd.handler.faults.clear()
    httpd.handler.hits.clear()
    return f"http://127.0.0.1:{httpd.server_address[1]}"


@pytest.fixture(autouse=True)
def slept(monkeypatch):
    """The waits of every retry (sources.SLEEP, the clock with_retries uses when given none),
    recorded instead of slept."""
    waits: list[float] = []
    monkeypatch.setattr(sources, "SLEEP", waits.append)
    return waits


@pytest.fixture
def short_timeout(monkeypatch):
    """The client's timeout shortened for a test that stalls (only there: a loaded machine
    could make a healthy answer take longer than that)."""
    monkeypatch.setattr(sources, "TIMEOUT_S", TIMEOUT_S)


def whole_split(path, split) -> torch.Tensor:
    """Every shard of a split read whole (read_shard: raw-text shards are read so), in order."""
    m = open_dataset(path)
    read = shard_reader(m)
    return torch.cat([torch.from_numpy(a.astype("int64")) for s in m["splits"][split]["shards"] for a in read(s)])


def batches(path, steps=12, state=None):
    s = dataset_stream(path, "train", 32, 4, 0, 1, seed=3, shuffle_buffer=64)
    if state:
        s.load_state_dict(state)
    it = iter(s)
    return [next(it) for _ in range(steps)], s.state_dict()


def test_http_gives_the_same_batches_as_the_local_folder(data, server):
    local, _ = batches(str(data / "d"), 40)  # crosses an epoch end
    remote, _ = batches(f"{server}/d", 40)
    assert all(torch.equal(a, b) for a, b in zip(local, remote))
    assert len(load_manifest(f"{server}/d/manifest.json")["splits"]["train"]["shards"]) > 2
    for r in range(2):  # each rank's share of the validation set, read by its chunks' ranges
        here, there = val_share(str(data / "d"), "val", 32, r, 2), val_share(f"{server}/d", "val", 32, r, 2)
        assert len(here.rows) > 10 and (here.rows == there.rows).all()
    _, state = batches(f"{server}/d", 17)
    resumed, _ = batches(f"{server}/d", 23, state)
    assert all(torch.equal(a, b) for a, b in zip(local[17:], resumed))


@pytest.mark.parametrize("fault", [status(503), DROP], ids=["503", "drop"])
def test_transient_failures_are_retried(data, server, httpd, slept, fault):
    local = whole_split(str(data / "d"), "train")
    httpd.handler.faults.update(
        {"/d/manifest.json": [fault] * 2, "/d/train-000001.tar": [fault] * 2, "/d/train-000002.tar": [fault]}
    )
    remote = whole_split(f"{server}/d", "train")
    assert len(local) > 10_000 and torch.equal(local, remote)
    assert httpd.handler.faults == {"/d/manifest.json": [], "/d/train-000001.tar": [], "/d/train-000002.tar": []}
    assert httpd.handler.hits["/d/train-000001.tar"] >= 3
    assert len(slept) == 5 and set(slept) <= {0.5, 1.0}  # one wait per failure, each read on its own schedule


def _read_whole(url, sleep):
    return sources.read_bytes(url, sleep=sleep)


def _read_range(url, sleep):
    return sources.with_retries(lambda: sources.read_range(url, 1_000, 3_000), url, sleep=sleep)


READERS = {"read_bytes": (_read_whole, slice(None)), "read_range": (_read_range, slice(1_000, 4_000))}


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize(
    "fault",
    [status(503), status(500), status(408), status(429), status(429, Retry_After="0"), DROP, STALL],
    ids=["503", "500", "408", "429", "429-retry-after-0", "drop", "stall"],
)
def test_each_transient_failure_is_retried_on_the_backoff_schedule(data, server, httpd, reader, fault, request):
    """Three failures, then the right bytes on the fourth request, after waits of 0.5, 1 and
    2 s (a Retry-After shorter than the backoff does not shorten it)."""
    if fault is STALL:
        request.getfixturevalue("short_timeout")
    read, part = READERS[reader]
    httpd.handler.faults["/d/train-000000.tar"] = [fault] * 3
    waits = []
    assert read(f"{server}/d/train-000000.tar", waits.append) == (data / "d" / "train-000000.tar").read_bytes()[part]
    assert httpd.handler.hits["/d/train-000000.tar"] == 4
    assert waits == SCHEDULE[:3]


def test_retry_after_is_honoured_when_longer_than_the_backoff_and_capped(data, server, httpd):
    in_20_s = email.utils.formatdate(time.time() + 20, usegmt=True)
    httpd.handler.faults["/d/manifest.json"] = [
        status(429, Retry_After="3"),  # seconds, longer than the backoff (1st: 0.5)
        status(503, Retry_After="3600"),  # capped at RETRY_AFTER_MAX_S
        status(429, Retry_After=in_20_s),  # an HTTP date: about 20 s from now
        status(429, Retry_After="soon"),  # unreadable: the backoff (4th: 4)
    ]
    waits = []
    assert sources.read_bytes(f"{server}/d/manifest.json", waits.append) == (data / "d" / "manifest.json").read_bytes()
    assert httpd.handler.hits["/d/manifest.json"] == 5
    assert waits[:2] == [3.0, sources.RETRY_AFTER_MAX_S] and 18 <= waits[2] <= 20 and waits[3] == 4.0


@pytest.mark.parametrize("code, reason", [(404, "Not Found"), (403, "Forbidden"), (400, "Bad Request")])
def test_a_non_transient_answer_is_not_retried(server, httpd, code, reason):
    """One request, no wait, and the answer named."""
    url = f"{server}/d/train-000000.tar"
    httpd.handler.faults["/d/train-000000.tar"] = [status(code)] * 3
    waits = []
    with pytest.raises(DataError) as e:
        sources.read_bytes(url, waits.append)
    hint = f": no credentials were sent; to send some, {redact.HOW}" if code == 403 else ""
    assert str(e.value) == f"cannot read {url}: HTTP {code} {reason}{hint}"
    assert httpd.handler.hits["/d/train-000000.tar"] == 1 and waits == []


def test_a_missing_file_over_http_is_not_retried(server, httpd):
    url = f"{server}/d/no-such-file.tar"
    waits = []
    with pytest.raises(DataError, match=r"^cannot read \S+/d/no-such-file.tar: HTTP 404 File not found$"):
        sources.with_retries(lambda: sources.read_range(url, 0, 10), url, sleep=waits.append)
    assert httpd.handler.hits["/d/no-such-file.tar"] == 1 and waits == []


def test_after_every_retry_fails_one_data_error_names_the_url_and_the_last_error(server, httpd, short_timeout):
    """RETRIES + 1 requests, the whole schedule waited, then one line: the URL, the number
    of tries and the last failure (a timeout here, after 503s and a 429)."""
    url = f"{server}/d/manifest.json"
    httpd.handler.faults["/d/manifest.json"] = [status(503)] * (sources.RETRIES - 1) + [status(429), STALL]
    waits = []
    with pytest.raises(DataError) as e:
        sources.read_bytes(url, waits.append)
    assert str(e.value) == f"cannot read {url} after {sources.RETRIES + 1} tries: TimeoutError: timed out"
    assert e.value.__cause__ is None and e.value.__suppress_context__  # no chained traceback under it
    assert httpd.handler.hits["/d/manifest.json"] == sources.RETRIES + 1 and waits == SCHEDULE


def test_a_stalled_server_costs_the_clients_timeout_not_the_stall(data, server, httpd, short_timeout):
    """The stall is a real socket timeout: each try gives up after TIMEOUT_S."""
    httpd.handler.faults["/d/manifest.json"] = [STALL] * 2
    t = time.perf_counter()
    assert sources.read_bytes(f"{server}/d/manifest.json", [].append) == (data / "d" / "manifest.json").read_bytes()
    assert 2 * TIMEOUT_S <= time.perf_counter() - t < STALL.stall_s


def test_a_shard_that_keeps_failing_is_named(server, httpd, slept):
    httpd.handler.faults["/d/train-000001.tar"] = [status(503)] * 100
    with pytest.raises(DataError, match=r"shard http://127.0.0.1:\d+/d/train-000001.tar is unreadable \(HTTP 503"):
        whole_split(f"{server}/d", "train")
    assert httpd.handler.hits["/d/train-000001.tar"] == sources.RETRIES + 1  # bounded
    assert slept == SCHEDULE


def test_missing_shard_is_not_retried(data, server, httpd, slept):
    copy = data / "missing"
    shutil.copytree(data / "d", copy)
    (copy / "train-000000.tar").unlink()
    with pytest.raises(DataError, match=r"missing/train-000000.tar is unreadable \(HTTP 404"):
        whole_split(f"{server}/missing", "train")
    assert httpd.handler.hits["/missing/train-000000.tar"] == 1 and slept == []


def test_unreachable_server(monkeypatch, slept):
    monkeypatch.setattr(sources, "RETRIES", 2)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nobody listens there
    with pytest.raises(
        DataError, match=rf"cannot read http://127.0.0.1:{port}/d/manifest.json after 3 tries: .*refused"
    ):
        load_manifest(f"http://127.0.0.1:{port}/d")
    assert slept == SCHEDULE[:2]


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
        whole_split(str(copy), "train")


def test_sample_without_tokens(data, tmp_path):
    copy = tmp_path / "d"
    shutil.copytree(data / "d", copy)
    rename = lambda i, m, p: (tarfile.TarInfo(m.name.replace(".tokens", ".txt")), p)  # noqa: E731
    _rewrite_member(copy / "val-000000.tar", rename)
    with pytest.raises(DataError, match=r"val-000000.tar: sample 000000000 has no .tokens member"):
        whole_split(str(copy), "val")


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
        next(iter(dataset_stream(f"{tmp_path}/train-{{000000..000001}}.tar", "train", 32, 1, 0, 1)))
    shutil.copy(data / "d" / "manifest.json", tmp_path / "manifest.json")
    (tmp_path / "extra-000000.tar").write_bytes((data / "d" / "train-000000.tar").read_bytes())
    with pytest.raises(DataError, match=r"1 of the shards, the first \S+extra-000000.tar, are not in \S+manifest.json"):
        dataset_stream(f"{tmp_path}/{{train,extra}}-000000.tar", "train", 32, 1, 0, 1)


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


# Credentials (data_pipeline/credentials.py): real servers on 127.0.0.1 that demand them.
USER, PASSWORD, TOKEN = "reader", "pw@5ecr3t:B/asic", "tok-5ecr3t-Bearer"
QUOTED = urllib.parse.quote(PASSWORD, safe="")  # as a password with @ : / is written in a URL


@pytest.fixture
def no_credentials(monkeypatch, tmp_path):
    """None of this machine's credentials: no token variables, no netrc, no stored HF token."""
    for name in ("TRAINCTL_HTTP_TOKEN", "HF_TOKEN", "HF_ENDPOINT", "HF_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))


def shown(e: pytest.ExceptionInfo) -> str:
    text = str(e.value)
    assert PASSWORD not in text and QUOTED not in text and TOKEN not in text, text
    return text


def test_basic_credentials_in_the_url_read_a_dataset_and_are_never_shown(data, no_credentials):
    """http://USER:PASSWORD@host/... as data.path: HTTP Basic on every request (urllib took
    the userinfo for part of the host name: 'Name or service not known'); a server's 401
    says whose credentials it refused, or how to send some, never the password."""
    local, _ = batches(str(data / "d"), 12)
    with serve(data, auth=basic(USER, PASSWORD)) as httpd:
        port = httpd.server_address[1]
        remote, _ = batches(f"http://{USER}:{QUOTED}@127.0.0.1:{port}/d", 12)
        assert all(torch.equal(a, b) for a, b in zip(local, remote))
        assert {a for _, a in httpd.handler.authorizations} == {basic(USER, PASSWORD)}
        with pytest.raises(DataError) as e:
            load_manifest(f"http://127.0.0.1:{port}/d")
        assert shown(e) == (
            f"cannot read http://127.0.0.1:{port}/d/manifest.json: HTTP 401 Unauthorized: no credentials were sent; "
            f"to send some, {redact.HOW}"
        )
        with pytest.raises(DataError) as e:
            load_manifest(f"http://{USER}:not-{QUOTED}@127.0.0.1:{port}/d")
        assert shown(e) == (
            f"cannot read http://{USER}:***@127.0.0.1:{port}/d/manifest.json: HTTP 401 Unauthorized: the server "
            f"refused the credentials from the URL's user:password; check them ({redact.HOW})"
        )
        # `prepare` reads its inputs with them too; what it writes does not hold them
        url = f"http://{USER}:{QUOTED}@127.0.0.1:{port}/t.txt"
        m = prepare([url], str(data / "from-http"), shard_size_bytes=6_000, sample_tokens=500)
    assert m["splits"]["train"]["tokens"] == load_manifest(str(data / "d"))["splits"]["train"]["tokens"]
    assert not [p for p in (data / "from-http").rglob("*") if PASSWORD.encode() in p.read_bytes()]


def test_a_bearer_token_from_the_environment_goes_to_its_host_only(data, no_credentials, monkeypatch):
    """TRAINCTL_HTTP_TOKEN's HOST[:PORT]=TOKEN entries, HF_TOKEN for the hub (here HF_ENDPOINT's host)."""
    local, _ = batches(str(data / "d"), 4)
    with serve(data, auth=bearer(TOKEN)) as httpd:
        port = httpd.server_address[1]
        url = f"http://127.0.0.1:{port}/d"
        monkeypatch.setenv("TRAINCTL_HTTP_TOKEN", f"data.example.org=other-token, 127.0.0.1:{port}={TOKEN}")
        remote, _ = batches(url, 4)
        assert all(torch.equal(a, b) for a, b in zip(local, remote))
        monkeypatch.setenv("TRAINCTL_HTTP_TOKEN", f"127.0.0.1:{port + 1}={TOKEN}")  # another port: not sent
        with pytest.raises(DataError, match="HTTP 401 Unauthorized: no credentials were sent"):
            load_manifest(url)
        monkeypatch.setenv("TRAINCTL_HTTP_TOKEN", f"127.0.0.1=not-{TOKEN}")
        with pytest.raises(DataError) as e:
            load_manifest(url)
        assert shown(e).endswith(
            "HTTP 401 Unauthorized: the server refused the credentials from TRAINCTL_HTTP_TOKEN; "
            f"check them ({redact.HOW})"
        )
        monkeypatch.setenv("TRAINCTL_HTTP_TOKEN", TOKEN)  # no host: refused, the value not shown
        with pytest.raises(DataError) as e:
            load_manifest(url)
        assert shown(e).startswith("TRAINCTL_HTTP_TOKEN: entry 1 is not HOST=TOKEN")
        monkeypatch.delenv("TRAINCTL_HTTP_TOKEN")
        monkeypatch.setenv("HF_TOKEN", TOKEN)  # the hub's token goes to the hub only
        with pytest.raises(DataError, match="no credentials were sent"):
            load_manifest(url)
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")  # a hub mirror: this server
        assert load_manifest(url)["splits"]["train"]["tokens"] > 0


def test_netrc_and_a_redacted_password_falling_back_to_it(data, no_credentials, monkeypatch, tmp_path):
    (tmp_path / "netrc").write_text(f"machine 127.0.0.1 login {USER} password {PASSWORD}\n")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    with serve(data, auth=basic(USER, PASSWORD)) as httpd:
        port = httpd.server_address[1]
        assert load_manifest(f"http://127.0.0.1:{port}/d")["splits"]["train"]["tokens"] > 0
        # config.yaml keeps user:***@: no credential, the netrc's are sent
        assert sources.read_bytes(f"http://{USER}:***@127.0.0.1:{port}/d/manifest.json")
        with pytest.raises(DataError) as e:  # the URL's own come first
            load_manifest(f"http://{USER}:nope@127.0.0.1:{port}/d")
        assert "refused the credentials from the URL's user:password" in shown(e)
    (tmp_path / "netrc").write_text(f"{PASSWORD} machine 127.0.0.1\n")  # netrc's own error quotes the token
    with pytest.raises(DataError) as e:
        load_manifest(f"http://127.0.0.1:{port}/d")
    assert shown(e) == f"{tmp_path / 'netrc'} is not a usable netrc file (line 1)"


def test_credentials_follow_a_redirect_to_the_same_origin_only(data, no_credentials, monkeypatch):
    """As requests and curl do: another host (a CDN's presigned URL) never gets the first
    host's Authorization, only its own (TRAINCTL_HTTP_TOKEN, HF_TOKEN, netrc)."""
    with serve(data, auth=basic(USER, PASSWORD)) as first, serve(data) as other:
        a, b = first.server_address[1], other.server_address[1]
        first.handler.redirects["/here.json"] = "/d/manifest.json"
        first.handler.redirects["/there.json"] = f"http://127.0.0.1:{b}/d/manifest.json"
        for name in ("here", "there"):
            assert sources.read_bytes(f"http://{USER}:{QUOTED}@127.0.0.1:{a}/{name}.json")
        assert first.handler.authorizations == [  # the same origin's redirect kept them
            (path, basic(USER, PASSWORD)) for path in ("/here.json", "/d/manifest.json", "/there.json")
        ]
        assert other.handler.authorizations == [("/d/manifest.json", None)]
        monkeypatch.setenv("TRAINCTL_HTTP_TOKEN", f"127.0.0.1:{b}={TOKEN}")
        sources.read_bytes(f"http://{USER}:{QUOTED}@127.0.0.1:{a}/there.json")
        assert other.handler.authorizations[-1] == ("/d/manifest.json", bearer(TOKEN))


@pytest.mark.parametrize("key, file", [("data.path", "manifest.json"), ("model.init_from", "config.json")])
def test_refused_credentials_are_one_line_exit_2_and_nothing_written(data, no_credentials, tmp_path, key, file):
    from cli_helpers import trainctl_here

    (tmp_path / "job.yaml").write_text(
        f"name: locked\ndata: {{path: {data / 'd'}, seq_len: 32}}\ncluster: {{num_workers: 1}}\n"
        "checkpoint: {storage_path: runs}\n"
    )
    with serve(data, auth=basic(USER, PASSWORD)) as httpd:
        url = f"http://{USER}:not-{QUOTED}@127.0.0.1:{httpd.server_address[1]}/d"
        r = trainctl_here("run", "job.yaml", f"{key}={url}", cwd=tmp_path)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr == (
        f"trainctl: error: cannot read {redact.redact_url(url)}/{file}: HTTP 401 Unauthorized: the server "
        f"refused the credentials from the URL's user:password; check them ({redact.HOW})\n"
    )
    assert not (tmp_path / "runs").exists()
