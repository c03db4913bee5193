"""The stream: stages on plain lists, equal batches per rank, world-size-independent and
exactly resumable order, and a corrupt shard named in the error."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import SHAKESPEARE

from data_pipeline import DataError, TokenStream, prepare, val_share
from data_pipeline.chunks import ChunkTable
from data_pipeline.windows import row_batches, shuffle_order, skip_tokens, window_blocks


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Uneven shards: train 4,201 tokens in shards of 600 (the last one smaller), val 1,801."""
    root = tmp_path_factory.mktemp("stream")
    (root / "t.txt").write_text(SHAKESPEARE.read_text()[:6_000])
    prepare([str(root / "t.txt")], str(root / "d"), val_fraction=0.3, shard_size_bytes=1_200, sample_tokens=100)
    return str(root / "d")


def take(data, world, accum, steps, micro=3, state=None, **kw):
    """The global batches (concatenated over ranks and micro batches) of `steps` steps."""
    streams = [
        TokenStream(data, "train", 32, micro, r, world, grad_accum_steps=accum, seed=7, shuffle_buffer=40, **kw)
        for r in range(world)
    ]
    for s in streams:
        if state:
            s.load_state_dict(state)
    its = [iter(s) for s in streams]
    batches = [torch.cat([next(it) for it in its for _ in range(accum)]) for _ in range(steps)]
    return batches, streams[0].state_dict()


def windows_of(blocks):
    return [w.tolist() for b in blocks for w in b]


def test_windows_overlap_by_one_token_across_chunks():
    windows = windows_of(window_blocks([np.arange(5), np.arange(5, 9), np.arange(9, 13)], 4, 3, 2))
    assert windows == [[0, 1, 2, 3, 4], [4, 5, 6, 7, 8], [8, 9, 10, 11, 12]]
    assert windows_of(window_blocks([np.arange(13)], 4, None, 2)) == windows  # count None: as far as the data goes
    with pytest.raises(DataError, match="ended after 3 of 4"):
        list(window_blocks([np.arange(13)], 4, 4, 10))


def test_skip_and_batch_stages():
    assert [c.tolist() for c in skip_tokens([np.arange(3), np.arange(3, 6)], 4)] == [[4, 5]]
    blocks = [np.arange(4), np.arange(4, 5), np.arange(5, 11)]  # batches straddle blocks; the last incomplete one goes
    assert [b.tolist() for b in row_batches(blocks, 3)] == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert [b.tolist() for b in row_batches(blocks, 3, skip=5)] == [[5, 6, 7], [8, 9, 10]]


def test_shuffle_is_a_seeded_permutation_within_blocks():
    chunks = [np.arange(41)]  # 10 windows of 4 tokens + 1
    out = [w[0] // 4 for w in windows_of(window_blocks(chunks, 4, 10, 4, shuffle_order(1, 0)))]
    assert sorted(out[:4]) == [0, 1, 2, 3] and sorted(out[4:8]) == [4, 5, 6, 7] and sorted(out[8:]) == [8, 9]
    assert out != list(range(10)) and out == [
        w[0] // 4 for w in windows_of(window_blocks(chunks, 4, 10, 4, shuffle_order(1, 0)))
    ]
    assert out != [w[0] // 4 for w in windows_of(window_blocks(chunks, 4, 10, 4, shuffle_order(1, 1)))]
    # any block rebuilds on its own: starting at block 1 gives the same order
    assert [w[0] // 4 for w in windows_of(window_blocks([np.arange(16, 41)], 4, 6, 4, shuffle_order(1, 0), 1))] == out[
        4:
    ]


def test_blocks_match_window_by_window_packing_for_any_chunking():
    """The vectorised stages equal the plain definition: windows cut one by one from the
    concatenated tokens, permuted within blocks, batched."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 257, 5_000).astype(np.uint16)
    cuts = np.sort(rng.choice(np.arange(1, 5_000), 60, replace=False))
    chunks = np.split(tokens, cuts)
    seq, count, block, rows = 16, 290, 37, 7
    plain = [tokens[i * seq : i * seq + seq + 1] for i in range(count)]
    order = shuffle_order(5, 2)
    expected = [
        plain[j * block + k] for j in range(-(-count // block)) for k in order(j, min(block, count - j * block))
    ]
    got = [r for b in row_batches(window_blocks(chunks, seq, count, block, order), rows) for r in b]
    assert len(got) == count // rows * rows and all(np.array_equal(a, b) for a, b in zip(got, expected))


def test_shards_are_uneven(data):
    from data_pipeline import load_manifest

    tokens = [s["tokens"] for s in load_manifest(data)["splits"]["train"]["shards"]]
    assert sum(tokens) == 4_201 and tokens[:-1] == [600] * 7 and tokens[-1] == 1


@pytest.mark.parametrize("world", [2, 3])
def test_every_rank_gets_the_same_number_of_batches_per_epoch(data, world):
    streams = [TokenStream(data, "train", 32, 4, r, world, seed=3) for r in range(world)]
    steps = streams[0].steps_per_epoch
    counts = []
    for s in streams:
        it, n = iter(s), 0
        while s.epoch == 0:
            batch = next(it)
            assert batch.shape == (4, 33) and batch.dtype == torch.int64
            n += 1
        counts.append(n)
    offset = streams[0].layout(0).offset
    windows = sum((600 - offset - 1) // 32 for _ in range(7))  # windows stay inside a chunk (here a shard)
    assert counts == [steps] * world and steps == windows // (4 * world) and steps > 2


def test_an_epoch_covers_every_window_once(data):
    """Every window of every chunk (from the epoch's offset, inside the chunk) at most once,
    and all but fewer than a global batch of them."""
    stream = TokenStream(data, "train", 32, 2, 0, 1, seed=5)
    offset, steps = stream.layout(0).offset, stream.steps_per_epoch
    expected = set()
    for url in stream.table.urls:
        flat = np.frombuffer(b"".join(_member_bytes(url)), dtype=np.uint16)
        expected |= {
            tuple(flat[offset + k * 32 : offset + k * 32 + 33].tolist())
            for k in range(max(len(flat) - offset - 1, 0) // 32)
        }
    it = iter(stream)
    seen = [tuple(row.tolist()) for _ in range(steps) for row in next(it)]
    assert len(seen) == len(set(seen)) == steps * 2 and set(seen) <= expected and len(expected) - len(seen) < 2


def _member_bytes(url):
    import tarfile

    with tarfile.open(url) as tar:
        return [tar.extractfile(m).read() for m in tar.getmembers()]


def test_global_order_does_not_depend_on_the_number_of_ranks(data):
    one, _ = take(data, 1, 4, 12)
    two, _ = take(data, 2, 2, 12)
    four, _ = take(data, 4, 1, 12)
    assert all(torch.equal(a, b) and torch.equal(a, c) for a, b, c in zip(one, two, four))
    assert len({tuple(b.flatten().tolist()) for b in one}) == 12


def test_resume_continues_the_same_sequence_on_another_world_size(data):
    straight, end = take(data, 2, 1, 25, micro=6)  # crosses two epochs' ends (about 10 steps each)
    assert end["epoch"] == 2
    _, state = take(data, 2, 1, 7, micro=6)
    assert state["step_in_epoch"] == 7 and state["epoch"] == 0
    resumed, state = take(data, 3, 1, 18, micro=4, state=state)  # 3 ranks x 4 = the same global batch of 12
    assert len(resumed) == 18 and all(torch.equal(a, b) for a, b in zip(straight[7:], resumed))
    assert state == end


def test_epochs_differ_and_shuffle_is_seeded(data):
    a, _ = take(data, 1, 1, 20, micro=12)
    b, _ = take(data, 1, 1, 20, micro=12)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    steps = TokenStream(data, "train", 32, 12, 0, 1).steps_per_epoch
    assert not torch.equal(a[0], a[steps])


def test_resume_with_another_global_batch_is_refused(data):
    _, state = take(data, 2, 1, 2)
    stream = TokenStream(data, "train", 32, 5, 0, 2)
    with pytest.raises(DataError, match="global_batch=6 but this job has 10"):
        stream.load_state_dict({**state, "seed": 0})


def test_too_little_data_for_one_global_batch(data):
    with pytest.raises(DataError, match="too few for one global batch of 4096 x 33 tokens"):
        TokenStream(data, "train", 32, 512, 0, 8)


def test_the_validation_set_is_the_same_for_any_world_size_and_each_rank_reads_its_share(data, monkeypatch):
    whole = val_share(data, "val", 32, 0, 1)
    assert whole.total == len(whole.rows) == (1_801 - 1) // 32 == 56
    val_text = SHAKESPEARE.read_bytes()[:6_000][4_200:]
    assert bytes(whole.rows[0].tolist()) == val_text[:33]
    assert (whole.rows[1:, 0] == whole.rows[:-1, 32]).all()  # consecutive windows, unshuffled
    read = []
    monkeypatch.setattr(
        ChunkTable, "read", lambda self, c, dtype, f=ChunkTable.read: read.append(c) or f(self, c, dtype)
    )
    for world in (1, 2, 3, 5):
        for count in (None, 20):
            shares, reads = [], []
            for r in range(world):
                read.clear()
                shares.append(val_share(data, "val", 32, r, world, count))
                reads.append(list(read))
            want = whole.rows[:count]
            assert all(s.total == len(want) for s in shares)
            assert (np.concatenate([s.rows for s in shares]) == want).all(), (world, count)
            # contiguous shares, rank 0's the largest; a rank reads only the chunks its windows lie in
            sizes = [len(s.rows) for s in shares]
            assert sizes == sorted(sizes, reverse=True) and sizes[0] - sizes[-1] <= 1
            if world == 5 and count is None:
                assert all(len(r) <= 2 for r in reads) and sorted({c for r in reads for c in r}) == [0, 1, 2]
    assert val_share(data, "val", 32, 1, 2, count=1).rows.shape == (0, 33)  # a rank past the set: none
    assert val_share(data, "nope", 32, 0, 1).total == 0


def test_corrupt_or_truncated_shard_is_named(data, tmp_path):
    import shutil

    copy = tmp_path / "d"
    shutil.copytree(data, copy)
    shard = copy / "train-000003.tar"
    shard.write_bytes(shard.read_bytes()[:1000])  # truncated mid-member
    stream = TokenStream(str(copy), "train", 32, 12, 0, 1, seed=7)
    with pytest.raises(
        DataError, match=r"chunk .*train-000003.tar bytes 0-6,144 is unreadable \(EOFError: the file ends"
    ):
        it = iter(stream)
        for _ in range(stream.steps_per_epoch):
            next(it)


def _break(data, tmp_path, names, how="truncate"):
    import shutil

    copy = tmp_path / "d"
    shutil.copytree(data, copy)
    for name in names:
        shard = copy / name
        if how == "truncate":
            shard.write_bytes(shard.read_bytes()[:700])
        else:
            shard.unlink()
    return str(copy)


@pytest.mark.parametrize("how", ["truncate", "missing"])
def test_skip_policy_passes_over_a_bad_shard_and_ranks_stay_equal(data, tmp_path, capfd, how):
    path = _break(data, tmp_path, ["train-000002.tar"], how)
    world = 2
    streams = [TokenStream(path, "train", 32, 3, r, world, seed=7, on_error="skip") for r in range(world)]
    steps = streams[0].steps_per_epoch
    counts = []
    for s in streams:
        it = iter(s)
        batches = [next(it) for _ in range(steps)]  # a whole epoch, as planned
        assert s.epoch == 1 and all(b.shape == (3, 33) for b in batches)
        counts.append(len(batches))
    skipped = [name for s in streams for name in s.skipped]  # a rank skips what it reads: its lanes' chunks
    assert skipped and all(name.startswith(str(Path(path, "train-000002.tar"))) for name in skipped)
    assert counts == [steps] * world
    assert "trainctl: warning: skipping a chunk (data.on_error=skip): chunk" in capfd.readouterr().err
    with pytest.raises(DataError, match="train-000002.tar"):
        it = iter(TokenStream(path, "train", 32, 3, 0, world, seed=7))  # the default policy is fail
        for _ in range(steps):
            next(it)


def test_skip_policy_with_nothing_left_stops(data, tmp_path):
    from data_pipeline import load_manifest

    names = [s["path"] for s in load_manifest(data)["splits"]["train"]["shards"]]
    path = _break(data, tmp_path, names, "missing")
    with pytest.raises(DataError, match="every chunk of .* failed"):
        next(iter(TokenStream(path, "train", 32, 3, 0, 1, on_error="skip")))


def test_validation_skips_the_windows_of_a_bad_chunk_the_same_for_any_world_size(data, tmp_path, capfd):
    path = _break(data, tmp_path, ["val-000001.tar"])
    whole = val_share(data, "val", 32, 0, 1).rows
    kept = [
        np.concatenate([val_share(path, "val", 32, r, w, on_error="skip").rows for r in range(w)]) for w in (1, 2, 3)
    ]
    # the windows touching val-000001.tar's 600 tokens (600..1,199) are gone, the rest kept in order
    touching = [k for k in range(len(whole)) if k * 32 < 1_200 and k * 32 + 33 > 600]
    assert all((k == np.delete(whole, touching, axis=0)).all() for k in kept)
    assert "trainctl: warning: skipping a chunk (data.on_error=skip): chunk" in capfd.readouterr().err
    with pytest.raises(DataError, match="val-000001.tar"):
        val_share(path, "val", 32, 0, 1)  # the default policy is fail


def take_loaded(data, world, workers, steps, state=None, micro=6, group=2, **kw):
    """Like take, through a Loader with `workers` DataLoader processes per rank, each
    handing over `group` steps at a time."""
    from data_pipeline import Loader

    loaders = [
        Loader(TokenStream(data, "train", 32, micro, r, world, seed=7, shuffle_buffer=40, **kw), workers, group=group)
        for r in range(world)
    ]
    for loader in loaders:
        if state:
            loader.load_state_dict(state)
    its = [iter(loader) for loader in loaders]
    batches = [torch.cat([next(it) for it in its]) for _ in range(steps)]
    return batches, loaders[0].state_dict()


def test_worker_processes_keep_the_order_and_the_position_exactly(data):
    straight, end = take(data, 2, 1, 25, micro=6)  # in-process reference, across two epoch ends
    for workers, group in ((1, 2), (3, 2), (2, 5), (2, 64)):
        loaded, state = take_loaded(data, 2, workers, 25, group=group)
        assert all(torch.equal(a, b) for a, b in zip(straight, loaded)) and state == end
    # Stop at step 11 with 3 workers (they have prefetched further), resume on 3 ranks with 2 workers.
    _, state = take_loaded(data, 2, 3, 11)
    assert (state["epoch"], state["step_in_epoch"]) == (
        1,
        11 - TokenStream(data, "train", 32, 12, 0, 1).steps_per_epoch,
    )
    resumed, state = take_loaded(data, 3, 2, 14, state=state, micro=4, group=3)
    assert all(torch.equal(a, b) for a, b in zip(straight[11:], resumed)) and state == end


def test_a_bad_shard_in_a_worker_process_is_one_named_error(data, tmp_path):
    path = _break(data, tmp_path, ["train-000003.tar"])
    with pytest.raises(DataError, match=r"^chunk \S+train-000003.tar bytes \S+ is unreadable"):
        take_loaded(path, 1, 2, 30)
    skipped, _ = take_loaded(path, 1, 2, 30, on_error="skip")
    assert len(skipped) == 30
