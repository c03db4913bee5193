"""Mixing: realised proportions follow the weights, the mix is deterministic, independent
of the number of ranks and exactly resumable."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import SHAKESPEARE

from data_pipeline import DataError, MixedStream, prepare
from data_pipeline.resolve import stdlib_files


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Three byte-level datasets of recognisably different text."""
    root = tmp_path_factory.mktemp("mix")
    texts = {
        "verse": SHAKESPEARE.read_bytes()[:200_000],
        "code": b"".join(Path(f).read_bytes() for f in stdlib_files()[:40])[:200_000],
        "digits": b" ".join(str(i).encode() for i in range(40_000))[:30_000],  # small: runs through epochs
    }
    for name, text in texts.items():
        (root / f"{name}.txt").write_bytes(text)
        prepare([str(root / f"{name}.txt")], str(root / name))  # one shard each: windows are contiguous text
    return root, texts


def mixed(root, world=1, rank=0, micro=25, accum=4, **kw):
    return MixedStream(
        [(str(root / "verse"), 5), (str(root / "code"), 3), (str(root / "digits"), 2)],
        32,
        micro,
        rank,
        world,
        grad_accum_steps=accum,
        seed=11,
        shuffle_buffer=256,
        **kw,
    )


def which(window: torch.Tensor, texts: dict) -> str:
    """The source a window came from (its head or its tail: a window may join two shards)."""
    data = bytes(t for t in window.tolist() if t < 256)
    for piece in (data[:24], data[-24:]):
        found = [name for name, text in texts.items() if piece in text]
        if len(found) == 1:
            return found[0]
    raise AssertionError(f"window {data!r} matches no single source")


def test_realised_proportions_follow_the_weights(sources):
    root, texts = sources
    stream = mixed(root)
    it = iter(stream)
    seen = {name: 0 for name in texts}
    for _ in range(100 * 4):  # 100 steps x global batch 100 = 10,000 sequences
        for window in next(it):
            seen[which(window, texts)] += 1
    assert sum(seen.values()) == 10_000
    for name, weight in (("verse", 0.5), ("code", 0.3), ("digits", 0.2)):
        assert abs(seen[name] / 10_000 - weight) < 0.02, seen
    assert stream.proportions() == {str(root / n): seen[n] / 10_000 for n in texts}


def test_mix_is_world_size_independent_and_resumes_exactly(sources):
    root, _ = sources

    def run(world, steps, state=None):
        streams = [mixed(root, world, r, micro=100 // world, accum=1) for r in range(world)]
        for s in streams:
            if state:
                s.load_state_dict(state)
        its = [iter(s) for s in streams]
        return [torch.cat([next(it) for it in its]) for _ in range(steps)], streams[0].state_dict()

    one, end = run(1, 60)  # the smallest source runs past an epoch end
    assert max(max(e) for e in end["lane_epoch"]) >= 1
    four, _ = run(4, 60)
    assert all(torch.equal(a, b) for a, b in zip(one, four))
    _, state = run(2, 25)
    resumed, state = run(5, 35, state)
    assert all(torch.equal(a, b) for a, b in zip(one[25:], resumed)) and state == end


def test_mix_bad_input(sources, tmp_path):
    root, _ = sources
    with pytest.raises(DataError, match=r"weights \[1.0, -1.0\] must all be positive"):
        MixedStream([(str(root / "verse"), 1), (str(root / "code"), -1)], 32, 2, 0, 1)
    prepare([str(root / "verse.txt")], str(tmp_path / "bpe"), tokenizer="bpe:300")
    with pytest.raises(DataError, match="data.sources use different tokenizers"):
        MixedStream([(str(root / "verse"), 1), (str(tmp_path / "bpe"), 1)], 32, 2, 0, 1)
    state = mixed(root).state_dict()
    other = MixedStream([(str(root / "verse"), 1)], 32, 25, 0, 1, grad_accum_steps=4, seed=11)
    with pytest.raises(DataError, match="the saved data position mixes"):
        other.load_state_dict(state)
    assert np.isclose(mixed(root).weights.sum(), 1.0)


def test_raw_text_sources_mix_the_same_for_any_ranks_and_workers(sources, tmp_path):
    """A raw-text source (read whole on every rank) mixed with a prepared one: the same global
    batches on 1 or 2 ranks, in process or through 2 loader workers."""
    import webdataset as wds

    from data_pipeline import Loader, RawOptions

    root, texts = sources
    with wds.TarWriter(str(tmp_path / "raw-000000.tar")) as sink:
        for k in range(40):
            sink.write({"__key__": f"{k:04d}", "txt": texts["verse"][k * 2_000 : (k + 1) * 2_000].decode()})
    spec = str(tmp_path / "raw-{000000..000000}.tar")

    def run(world, workers):
        out = []
        for rank in range(world):
            stream = MixedStream(
                [(str(root / "code"), 1), (spec, 1)], 32, 8 // world, rank, world, seed=3, raw=RawOptions()
            )
            assert not stream.per_rank
            it = iter(Loader(stream, workers, group=2))
            out.append([next(it) for _ in range(20)])
        return [torch.cat([o[k] for o in out]) for k in range(20)]

    one = run(1, 0)
    assert all(which(w, texts) in ("code", "verse") for b in one for w in b)
    for world, workers in ((2, 0), (1, 2)):
        assert all(torch.equal(a, b) for a, b in zip(one, run(world, workers)))
