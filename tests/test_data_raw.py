"""Raw-text WebDataset shards written by plain `webdataset.ShardWriter` (.txt, .json,
.jsonl samples), read without a prepare step and tokenized as they stream."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import webdataset as wds
from cli_helpers import SHAKESPEARE

from data_pipeline import DataError, RawOptions, dataset_stream, open_dataset, val_share


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """4 shards of 30 documents each: .txt, .json {"body": ...} and .jsonl samples."""
    root = tmp_path_factory.mktemp("raw")
    text = SHAKESPEARE.read_text()[:60_000]
    docs = [text[i : i + 500] for i in range(0, len(text), 500)]
    expected = []
    for s in range(4):
        with wds.TarWriter(str(root / f"raw-{s:06d}.tar")) as sink:
            for k, doc in enumerate(docs[s * 30 : (s + 1) * 30]):
                key = f"{s:02d}{k:04d}"
                if k % 3 == 0:
                    sink.write({"__key__": key, "txt": doc})
                elif k % 3 == 1:
                    sink.write({"__key__": key, "json": json.dumps({"body": doc, "id": key}).encode()})
                else:
                    halves = [doc[:250], doc[250:]]
                    sink.write({"__key__": key, "jsonl": "\n".join(json.dumps({"body": h}) for h in halves).encode()})
                    expected += [h.encode() + b"\x00EOT" for h in halves]
                    continue
                expected.append(doc.encode() + b"\x00EOT")
    return root, str(root / "raw-{000000..000003}.tar"), expected


OPTS = RawOptions(text_field="body")


def token_stream(expected: list[bytes]) -> list[int]:
    out = []
    for doc in expected:
        out += list(doc[:-4]) + [256]
    return out


def test_raw_shards_stream_the_documents_in_order(corpus):
    _, spec, expected = corpus
    # one lane: every shard in turn
    stream = dataset_stream(spec, "train", 32, 4, 0, 1, shuffle=False, raw=OPTS, lanes=1)
    assert stream.steps_per_epoch is None and stream.manifest["tokenizer"]["name"] == "byte"
    it, rows = iter(stream), []
    while (batch := next(it)) is not None and stream.epoch == 0:  # raw epochs roll over when the data runs out
        rows += batch.tolist()
    flat = rows[0] + [t for row in rows[1:] for t in row[1:]]  # windows overlap by one token
    want = token_stream(expected)
    assert flat == want[: len(flat)] and len(want) - len(flat) < 4 * 32 + 32  # only the last partial batch is dropped


def test_raw_order_is_world_size_independent_and_resumes_by_replay(corpus):
    _, spec, _ = corpus

    def run(world, steps, state=None):
        streams = [
            dataset_stream(spec, "train", 32, 12 // world, r, world, seed=5, shuffle_buffer=50, raw=OPTS)
            for r in range(world)
        ]
        for s in streams:
            if state:
                s.load_state_dict(state)
        its = [iter(s) for s in streams]
        return [torch.cat([next(it) for it in its]) for _ in range(steps)], streams[0].state_dict()

    one, end = run(1, 400)  # crosses several epoch ends of each lane (about 150 steps each)
    assert end["step"] == 400 and end["lanes"] == 4
    two, _ = run(2, 400)
    assert all(torch.equal(a, b) for a, b in zip(one, two))
    _, state = run(3, 170)
    resumed, state = run(2, 230, state)
    assert all(torch.equal(a, b) for a, b in zip(one[170:], resumed)) and state == end


def test_raw_shards_are_partitioned_and_each_rank_reads_only_its_lanes(corpus):
    """4 shards in 4 lanes: each of 2 ranks reads 2 shards an epoch, over a real HTTP server;
    2 loader workers of one rank split its lanes and give the same batches."""
    from http_helpers import serve

    from data_pipeline import Loader

    root, _, _ = corpus
    with serve(root, clients=("r0", "r1", "one", "w")) as httpd:
        url = f"http://127.0.0.1:{httpd.server_address[1]}"

        def rows(client, world, rank, workers=0, steps=100):
            s = dataset_stream(
                f"{url}/{client}/raw-{{000000..000003}}.tar", "train", 32, 12 // world, rank, world, seed=5, raw=OPTS
            )
            it = iter(Loader(s, workers, group=2))
            return [next(it) for _ in range(steps)], s

        alone, stream = rows("one", 1, 0)
        assert stream.lanes == 4
        for rank in (0, 1):
            mine, _ = rows(f"r{rank}", 2, rank)
            assert all(torch.equal(a, b[rank * 6 : rank * 6 + 6]) for a, b in zip(mine, alone))
        two, _ = rows("w", 1, 0, workers=2)
        assert all(torch.equal(a, b) for a, b in zip(alone, two))
        sent = httpd.handler.sent
        # 100 steps is under one epoch of any lane: the ranks read disjoint halves of what one rank reads
        assert sent["r0"] + sent["r1"] == sent["one"] == sent["w"] and 0.3 < sent["r0"] / sent["one"] < 0.7


def test_raw_source_has_no_validation_split(corpus):
    _, spec, _ = corpus
    none = val_share(spec, "val", 32, 0, 1, raw=OPTS)
    assert none.total == 0 and none.rows.shape == (0, 33)


def test_pipe_urls_only_when_allowed(corpus, monkeypatch):
    from data_pipeline import sources

    monkeypatch.setattr(sources, "BACKOFF_S", 0.01)  # a failing command is retried like a network error
    root, spec, _ = corpus
    pipe = f"pipe:cat {root}/raw-{{000000..000003}}.tar"
    with pytest.raises(DataError, match="is a pipe: URL, which runs a shell command: set data.allow_pipe=true"):
        open_dataset(pipe, OPTS)
    allowed = RawOptions(text_field="body", allow_pipe=True)
    a = iter(dataset_stream(spec, "train", 32, 4, 0, 1, seed=2, raw=OPTS))
    b = iter(dataset_stream(pipe, "train", 32, 4, 0, 1, seed=2, raw=allowed))
    assert all(torch.equal(next(a), next(b)) for _ in range(60))
    failing = iter(dataset_stream("pipe:exit 3 # x.tar", "train", 32, 4, 0, 1, raw=allowed))
    with pytest.raises(DataError, match="exited with status 3"):
        next(failing)


@pytest.mark.parametrize(
    "options, spec_suffix, fragment",
    [
        (RawOptions(), "", "sample 000001's .json has no 'text' field: set data.text_field"),
        (RawOptions(tokenizer="bpe:512", text_field="body"), "", "is trained on the corpus by `trainctl prepare`"),
        (OPTS, "nope", "4 of 4 shards do not exist, the first"),
    ],
)
def test_raw_bad_input(corpus, options, spec_suffix, fragment):
    _, spec, _ = corpus
    with pytest.raises(DataError) as e:
        it = iter(
            dataset_stream(spec.replace("raw-", f"raw{spec_suffix}-"), "train", 32, 4, 0, 1, shuffle=False, raw=options)
        )
        for _ in range(200):
            next(it)
    assert fragment in str(e.value)


def test_sample_without_text(tmp_path):
    with wds.TarWriter(str(tmp_path / "x.tar")) as sink:
        sink.write({"__key__": "a", "png": b"\x89PNG"})
    with pytest.raises(DataError, match=r"sample a has no .txt, .json or .jsonl member \(it has \['png'\]\)"):
        next(iter(dataset_stream(str(tmp_path / "x.tar"), "train", 8, 1, 0, 1)))
    assert np.dtype(open_dataset(str(tmp_path / "x.tar"))["dtype"]) == np.uint16


def test_raw_shards_are_checked_before_launch(corpus, tmp_path):
    """`check_shards` (the launcher's look before Ray starts): every local shard begins with a
    tar header and the first one's first sample holds text; each refusal names the file and
    what data.path takes, without a Python object's repr."""
    import gzip
    import random

    from http_helpers import serve

    from data_pipeline.raw import check_shards

    root, spec, _ = corpus
    check_shards(open_dataset(spec, OPTS), "body")  # good shards pass
    with serve(root) as httpd:
        url = f"http://127.0.0.1:{httpd.server_port}/raw-{{000000..000003}}.tar"
        check_shards(open_dataset(url, OPTS), "body")  # a URL: the first shard's first sample only
        assert {k: v for k, v in httpd.handler.hits.items() if k.endswith(".tar")} == {"/raw-000000.tar": 1}
    (tmp_path / "gz").mkdir()
    (tmp_path / "gz" / "a.tar").write_bytes(gzip.compress((root / "raw-000000.tar").read_bytes()))
    check_shards(open_dataset(str(tmp_path / "gz" / "a.tar"), OPTS), "body")  # tarfile reads it: so may we

    def refused(name: str, write, text_field: str = "body") -> str:
        path = tmp_path / name
        write(path)
        with pytest.raises(DataError) as e:
            check_shards(open_dataset(str(path), OPTS), text_field)
        assert "\n" not in str(e.value) and " at 0x" not in str(e.value) and "<" not in str(e.value)
        return str(e.value)

    junk = random.Random(0).randbytes(4096)
    assert refused("junk.tar", lambda p: p.write_bytes(junk)) == (
        f"data.path: {tmp_path}/junk.tar is not a tar file (its first 512 bytes are no tar header): give "
        "WebDataset .tar shards of .txt, .json or .jsonl samples, raw text (a file, folder or glob) or a prepared "
        "dataset folder (`trainctl prepare`)"
    )
    assert "x.tar is not a tar file (6 bytes, less than one 512-byte tar header)" in refused(
        "x.tar", lambda p: p.write_text("hello\n")
    )

    def tar_of(sample):
        def write(path):
            with wds.TarWriter(str(path)) as sink:
                if sample:
                    sink.write(sample)

        return write

    assert "is not a tar file (an empty tar: its first block is all zeros)" in refused("none.tar", tar_of(None))
    assert "sample a has no .txt, .json or .jsonl member (it has ['png'])" in refused(
        "png.tar", tar_of({"__key__": "a", "png": b"\x89PNG"})
    )
    assert "sample a's .json has no 'text' field: set data.text_field" in refused(
        "json.tar", tar_of({"__key__": "a", "json": b'{"body": "x"}'}), "text"
    )
    (tmp_path / "two").mkdir()
    (tmp_path / "two" / "s-0.tar").write_bytes((root / "raw-000000.tar").read_bytes())
    (tmp_path / "two" / "s-1.tar").write_bytes(junk)  # a bad shard after a good one is named too
    with pytest.raises(DataError, match=r"s-1.tar is not a tar file"):
        check_shards(open_dataset(str(tmp_path / "two" / "s-{0..1}.tar"), OPTS), "body")


def test_unreadable_tar_messages_hold_no_object_repr(tmp_path):
    """webdataset adds its stream object to a tar error's args: the messages leave it out
    (it used to read `ReadError: ('invalid header', <...HashingReader object at 0x...>, ...)`)."""
    import random

    from data_pipeline import readers
    from data_pipeline.errors import DataError as PlainDataError
    from data_pipeline.shardreads import read_shard

    junk = tmp_path / "junk.tar"
    junk.write_bytes(random.Random(0).randbytes(4096))
    with pytest.raises(DataError) as e:
        read_shard({"url": str(junk)}, np.dtype(np.uint16), lambda sample, url: [])
    assert str(e.value) == (
        f"shard {junk} is unreadable (ReadError: invalid header): prepare the dataset again or check the storage"
    )
    with pytest.raises(DataError) as e:
        list(readers.documents(str(junk), "text", readers.Skips("fail")))
    assert (
        str(e.value)
        == f"{junk} is not a readable tar file (ReadError: invalid header): fix the file or pass --on-error skip"
    )
    # the last resort: whatever a library puts in a message, DataError shows no object repr
    assert str(PlainDataError("x (<a.b.Reader object at 0x7f00>, <_io.BufferedReader name='/y'>)")) == (
        "x (Reader, BufferedReader)"
    )
