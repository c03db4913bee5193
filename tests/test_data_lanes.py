"""Per-rank reads (data_pipeline.lanes): the same global batches for 1-4 ranks and any
number of loader workers, exact resume on another number of ranks, each rank reading only
its share through a real HTTP server, every chunk checked before use, old manifests."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from cli_helpers import SHAKESPEARE
from http_helpers import serve

from data_pipeline import DataError, Loader, TokenStream, load_manifest, prepare

G, T = 12, 32


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """tinyshakespeare in 4 KB chunks (~60 windows each), shards of 64 KB."""
    root = tmp_path_factory.mktemp("lanes")
    prepare([str(SHAKESPEARE)], str(root / "d"), shard_size_bytes=64 << 10, chunk_bytes=4 << 10, sample_tokens=512)
    return root


def global_batches(path, world, steps, workers=0, state=None, group=None, **kw):
    """The global batches (ranks' rows concatenated) of `steps` steps, and the position after."""
    loaders = [
        Loader(TokenStream(path, "train", T, G // world, r, world, seed=5, **kw), workers, group=group)
        for r in range(world)
    ]
    for loader in loaders:
        if state:
            loader.load_state_dict(state)
    its = [iter(loader) for loader in loaders]
    batches = [torch.cat([next(it) for it in its]) for _ in range(steps)]
    return batches, loaders[0].state_dict()


def test_the_global_batches_do_not_depend_on_ranks_or_workers(data):
    path = str(data / "d")
    one, _ = global_batches(path, 1, 40)
    assert len({tuple(b.flatten().tolist()) for b in one}) == 40
    for world, workers in ((2, 0), (3, 0), (4, 0), (1, 2), (3, 2)):
        other, _ = global_batches(path, world, 40, workers)
        assert all(torch.equal(a, b) for a, b in zip(one, other)), (world, workers)
    # each row is a window of the text: 33 consecutive bytes of tinyshakespeare
    text = SHAKESPEARE.read_bytes()
    assert all(bytes(row.tolist()) in text for row in one[0])


def test_ranks_that_split_lanes_unevenly_still_make_the_single_rank_batches(data):
    """Fewer lanes than ranks (2 lanes, 4 ranks: ranks share a lane), ranks not dividing
    the lanes (4 lanes, 3 ranks; 6 lanes, 4 ranks: a rank holds parts of two), and fewer
    chunks than lanes (a 3-chunk split read by 12 lanes): each rank's rows are its slice of
    the single-rank global batch, and the ranks together make that batch."""
    tiny = data / "tiny"
    if not tiny.exists():
        (data / "tiny.txt").write_bytes(SHAKESPEARE.read_bytes()[:12_000])
        prepare([str(data / "tiny.txt")], str(tiny), shard_size_bytes=16 << 10, chunk_bytes=4 << 10)
    assert len(TokenStream(str(tiny), "train", T, G, 0, 1).table) < G  # fewer chunks than lanes
    cases = [("d", 2, 4), ("d", 4, 3), ("d", 6, 4), ("tiny", 12, 4), ("tiny", 12, 3)]
    for name, lanes, world in cases:
        path, steps = str(data / name), 30
        alone, _ = global_batches(path, 1, steps, lanes=lanes)
        assert len({tuple(b.flatten().tolist()) for b in alone}) == steps
        rows = G // world
        for r in range(world):
            stream = TokenStream(path, "train", T, rows, r, world, seed=5, lanes=lanes)
            assert stream.lanes == lanes
            it = iter(Loader(stream, 0))
            mine = [next(it) for _ in range(steps)]
            assert all(torch.equal(a, alone[k][r * rows : (r + 1) * rows]) for k, a in enumerate(mine)), (
                name,
                lanes,
                world,
                r,
            )
        union, _ = global_batches(path, world, steps, lanes=lanes)
        assert all(torch.equal(a, b) for a, b in zip(alone, union)), (name, lanes, world)


def test_a_stop_on_2_ranks_resumes_on_3_with_the_identical_continuation(data):
    """Across an epoch end: a small split (the first 40 KB of the text) has a short epoch."""
    small = data / "small"
    if not small.exists():
        (data / "small.txt").write_bytes(SHAKESPEARE.read_bytes()[:40_000])
        prepare([str(data / "small.txt")], str(small), shard_size_bytes=16 << 10, chunk_bytes=4 << 10)
    path = str(small)
    steps = TokenStream(path, "train", T, G, 0, 1, seed=5).steps_per_epoch
    straight, end = global_batches(path, 2, steps + 30)
    assert end["epoch"] == 1
    _, state = global_batches(path, 2, steps - 10, workers=2)
    resumed, state = global_batches(path, 3, 40, workers=1, state=state)
    assert all(torch.equal(a, b) for a, b in zip(straight[steps - 10 :], resumed)) and state == end


def test_each_of_4_ranks_reads_about_a_quarter_over_http(data):
    with serve(data, clients=("one", "r0", "r1", "r2", "r3", "w2")) as httpd:
        url = f"http://127.0.0.1:{httpd.server_address[1]}"
        steps = 150  # each lane passes through about 3 chunks
        alone, _ = global_batches(f"{url}/one/d", 1, steps, group=2)  # 2 steps a round: little read ahead
        sent = httpd.handler.sent
        for r in range(4):
            loader = Loader(TokenStream(f"{url}/r{r}/d", "train", T, G // 4, r, 4, seed=5), 0, group=2)
            it = iter(loader)
            rows = [next(it) for _ in range(steps)]
            assert all(torch.equal(a, alone[k][r * 3 : r * 3 + 3]) for k, a in enumerate(rows))
        manifest = len((data / "d" / "manifest.json").read_bytes())
        one = sent["one"] - manifest
        shares = [(sent[f"r{r}"] - manifest) / one for r in range(4)]
        assert all(share <= 0.35 for share in shares) and 0.9 < sum(shares) < 1.2, shares
        # two loader workers split the rank's reads: together no more than one process reads
        global_batches(f"{url}/w2/d", 1, steps, workers=2, group=2)
        assert sent["w2"] - manifest <= 1.1 * one
        requests = httpd.handler.requests
        assert requests["one"] < 12 * 5 + 2  # one request per chunk: 12 lanes x ~3-4 chunks, and the manifest


def _flip(data, tmp_path, at: int = 3000):
    """A copy of the dataset with one byte flipped inside the first chunk of train-000001.tar."""
    copy = tmp_path / "d"
    shutil.copytree(data / "d", copy)
    shard = copy / "train-000001.tar"
    raw = bytearray(shard.read_bytes())
    raw[at] ^= 0x01
    shard.write_bytes(bytes(raw))
    return str(copy)


def test_a_flipped_byte_is_caught_and_named_under_both_policies(data, tmp_path, capfd):
    path = _flip(data, tmp_path)
    stream = TokenStream(path, "train", T, G, 0, 1, seed=5)
    bad = next(c for c in range(len(stream.table)) if stream.table.urls[c].endswith("train-000001.tar"))
    steps = stream.steps_per_epoch
    with pytest.raises(DataError, match=r"^chunk \S+train-000001.tar bytes 0-\S+ fails its sha256 check"):
        global_batches(path, 2, steps)
    # skip: named once per reader, every rank makes the epoch's steps, and the result is the same for 1 or 3 ranks
    one, end = global_batches(path, 1, steps, on_error="skip")
    three, end3 = global_batches(path, 3, steps, on_error="skip")
    assert end == end3 and end["epoch"] == 1 and all(torch.equal(a, b) for a, b in zip(one, three))
    err = capfd.readouterr().err
    assert f"skipping a chunk (data.on_error=skip): chunk {stream.table.name(bad)} fails its sha256 check" in err


def test_an_old_manifest_reads_whole_shards_with_a_notice(data, tmp_path, capfd):
    copy = tmp_path / "old"
    shutil.copytree(data / "d", copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            del shard["chunks"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    batches, _ = global_batches(str(copy), 2, 5)
    err = capfd.readouterr().err
    assert err.count("was prepared without per-chunk checksums: each rank reads whole shards") == 1
    text = SHAKESPEARE.read_bytes()
    assert all(bytes(row.tolist()) in text for b in batches for row in b)
    stream = TokenStream(str(copy), "train", T, G, 0, 1)
    assert len(stream.table) == len(manifest["splits"]["train"]["shards"])


def test_resume_with_other_lanes_is_refused_in_one_line(data):
    _, state = global_batches(str(data / "d"), 1, 2)
    with pytest.raises(DataError, match=r"^the saved data position has 12 lanes but this job has 6: resume with"):
        TokenStream(str(data / "d"), "train", T, G, 0, 1, seed=5, lanes=6).load_state_dict(state)


def test_a_lane_frees_each_piece_it_has_passed(data, monkeypatch):
    """Pieces of 8 windows (512 bytes) in chunks of ~60: a lane holds what is left of its
    chunk, about half of one on average, plus the next one read a few steps ahead."""
    from data_pipeline import lanes

    monkeypatch.setattr(lanes, "PIECE_BYTES", 512)
    monkeypatch.setattr(lanes, "PIECE_BUDGET", 0)
    manifest = load_manifest(str(data / "d"))
    chunks = [c for s in manifest["splits"]["train"]["shards"] for c in s["chunks"]]
    mean_chunk = np.mean([c[2] for c in chunks]) * 2  # bytes of tokens
    loader = Loader(TokenStream(str(data / "d"), "train", T, G, 0, 1, seed=5), 0, group=2)  # reads 8 steps ahead
    it = iter(loader)
    held = []
    for _ in range(600):
        next(it)
        held.append(loader.held_bytes)
    assert 0.3 * 12 * mean_chunk < np.mean(held) < 0.8 * 12 * mean_chunk, np.mean(held) / (12 * mean_chunk)


def test_chunks_are_whole_members_with_their_sha256_and_the_shard_stays_a_plain_tar(data):
    import hashlib
    import tarfile

    manifest = load_manifest(str(data / "d"))
    assert manifest["chunk_bytes"] == 4 << 10
    for shard in manifest["splits"]["train"]["shards"][:3]:
        raw = open(shard["url"], "rb").read()
        with tarfile.open(shard["url"]) as tar:  # the stdlib reader sees the same members
            members = tar.getmembers()
        starts = [m.offset for m in members]  # each member's header
        end = 0
        for offset, size, _tokens, sha in shard["chunks"]:
            assert offset == end and offset in starts  # contiguous, starting at a member's header
            end = offset + size
            assert end in starts or end == members[-1].offset_data + -(-members[-1].size // 512) * 512
            assert hashlib.sha256(raw[offset:end]).hexdigest() == sha
            assert 4 << 10 <= size < (4 << 10) + 1536 or end == shard["chunks"][-1][0] + shard["chunks"][-1][1]
        assert sum(c[2] for c in shard["chunks"]) == shard["tokens"] and raw[end:].strip(b"\0") == b""


def test_mixed_sources_are_read_per_rank_too(data):
    """data.sources: the same global batches for 1 or 4 ranks and 2 loader workers, and each
    of 4 ranks reads about a quarter of the bytes over HTTP."""
    from data_pipeline import MixedStream

    small = data / "small"
    if not small.exists():
        (data / "small.txt").write_bytes(SHAKESPEARE.read_bytes()[:40_000])
        prepare([str(data / "small.txt")], str(small), shard_size_bytes=16 << 10, chunk_bytes=4 << 10)
    with serve(data, clients=("one", "r0", "r1", "r2", "r3", "w")) as httpd:
        url = f"http://127.0.0.1:{httpd.server_address[1]}"

        def run(client, world, rank, workers=0, steps=100):
            sources = [(f"{url}/{client}/d", 3), (f"{url}/{client}/small", 1)]
            stream = MixedStream(sources, T, G // world, rank, world, seed=9)
            it = iter(Loader(stream, workers, group=2))
            return [next(it) for _ in range(steps)], stream

        alone, stream = run("one", 1, 0)
        assert stream.per_rank and stream.lanes == 12
        for r in range(4):
            rows, _ = run(f"r{r}", 4, r)
            assert all(torch.equal(a, alone[k][r * 3 : r * 3 + 3]) for k, a in enumerate(rows))
        two, _ = run("w", 1, 0, workers=2)
        assert all(torch.equal(a, b) for a, b in zip(alone, two))
        sent = httpd.handler.sent
        manifests = len((data / "d" / "manifest.json").read_bytes()) + len((small / "manifest.json").read_bytes())
        shares = [(sent[f"r{r}"] - manifests) / (sent["one"] - manifests) for r in range(4)]
        assert all(share <= 0.4 for share in shares), shares


def test_skip_gives_up_after_a_run_of_failed_chunks(data, tmp_path):
    """The storage gone: skip stops after 16 chunks in a row fail, instead of trying them all."""
    copy = tmp_path / "gone"
    shutil.copytree(data / "d", copy)
    for shard in copy.glob("train-*.tar"):
        shard.unlink()
    with pytest.raises(DataError, match=r"^16 chunks in a row of \S+gone failed \(data.on_error=skip\): the storage"):
        next(iter(TokenStream(str(copy), "train", T, G, 0, 1, on_error="skip")))
