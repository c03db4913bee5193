"""prepare: text files to token shards that plain tar and plain webdataset read, and back."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from cli_helpers import SHAKESPEARE

from data_pipeline import ByteTokenizer, DataError, load_manifest, prepare, resolve_dataset, tokenizer_from_dict
from data_pipeline.resolve import stdlib_files


@pytest.fixture
def texts(tmp_path):
    src = SHAKESPEARE.read_text()
    (tmp_path / "a.txt").write_text(src[:50_000])
    (tmp_path / "b.txt").write_text("héllo wörld — ünïcode\n" * 300)
    return tmp_path


def test_byte_tokenizer_round_trip_and_dict():
    tok = ByteTokenizer()
    text = "Tschüß, 世界!\n"
    ids = tok.encode(text)
    assert ids.dtype == np.uint16 and len(ids) == len(text.encode())
    assert tok.decode([*ids.tolist(), tok.eot]) == text
    assert tokenizer_from_dict(tok.to_dict()).vocab_size == 257


def test_prepare_shards_read_by_tar_and_webdataset_and_round_trip(texts):
    m = prepare(
        [str(texts / "a.txt"), str(texts / "b.txt")], str(texts / "out"), shard_size_bytes=20_000, sample_tokens=1000
    )
    train, val = m["splits"]["train"], m["splits"]["val"]
    assert train["documents"] == val["documents"] == 2
    a, b = (texts / "a.txt").read_bytes(), (texts / "b.txt").read_bytes()
    assert train["tokens"] + val["tokens"] == len(a) + len(b) + 4  # one end-of-text per document part
    assert len(train["shards"]) > 3 and all(s["tokens"] <= 11_000 for s in train["shards"])

    listing = subprocess.run(
        ["tar", "-tf", str(texts / "out" / "train-000000.tar")], capture_output=True, text=True, check=True
    ).stdout.split()
    assert listing[:3] == ["000000000.tokens", "000000001.tokens", "000000002.tokens"]

    urls = [s["url"] for s in train["shards"]]
    samples = list(wds.WebDataset(urls, shardshuffle=False))
    assert len(samples) == train["samples"]
    ids = np.concatenate([np.frombuffer(s["tokens"], dtype=np.uint16) for s in samples])
    assert len(ids) == train["tokens"] and max(len(s["tokens"]) // 2 for s in samples) == 1000
    docs = ids.tolist()
    first_eot = docs.index(256)
    cut_a = int(len(a) * 0.9)
    assert bytes(docs[:first_eot]) == a[:cut_a]  # the head of a.txt, then end-of-text, then b.txt's head
    assert ByteTokenizer().decode(docs[first_eot + 1 :]) == b[: int(len(b) * 0.9)].decode()

    val_ids = np.concatenate(
        [
            np.frombuffer(s["tokens"], dtype=np.uint16)
            for s in wds.WebDataset([s["url"] for s in val["shards"]], shardshuffle=False)
        ]
    )
    assert bytes(val_ids[: len(a) - cut_a].tolist()) == a[cut_a:] and val_ids[len(a) - cut_a] == 256


def test_manifest_records_sizes_and_checksums(texts):
    import hashlib

    m = prepare([str(texts / "a.txt")], str(texts / "out"), shard_size_bytes=30_000)
    for s in m["splits"]["train"]["shards"] + m["splits"]["val"]["shards"]:
        data = Path(s["url"]).read_bytes()
        assert s["bytes"] == len(data) and s["sha256"] == hashlib.sha256(data).hexdigest()
    assert m["tokenizer"] == {"name": "byte", "vocab_size": 257, "eot": 256} and m["dtype"] == "uint16"
    assert load_manifest(str(texts / "out" / "manifest.json"))["splits"] == m["splits"]


def test_rerun_gives_byte_identical_shards(texts):
    inputs = [str(texts / "a.txt"), str(texts / "b.txt")]
    prepare(inputs, str(texts / "one"), shard_size_bytes=20_000)
    prepare(inputs, str(texts / "two"), shard_size_bytes=20_000, name="one")
    one = sorted(p.name for p in (texts / "one").iterdir())
    assert one == sorted(p.name for p in (texts / "two").iterdir()) and len(one) > 3
    for name in one:
        assert (texts / "one" / name).read_bytes() == (texts / "two" / name).read_bytes(), name


def test_folder_and_glob_inputs_skip_empty_files(texts):
    (texts / "sub").mkdir()
    (texts / "sub" / "c.txt").write_text("x" * 100)
    (texts / "sub" / "empty.txt").write_text("")
    m = prepare([str(texts / "sub")], str(texts / "out1"))
    assert m["input_files"] == 1 and m["splits"]["train"]["tokens"] == 91
    m = prepare([str(texts / "*.txt")], str(texts / "out2"), val_fraction=0)
    assert m["input_files"] == 2 and m["splits"]["val"]["tokens"] == 0 and m["splits"]["val"]["shards"] == []


@pytest.mark.parametrize(
    "inputs, kwargs, fragment",
    [
        (["nothing/*.txt"], {}, "matches no files"),
        (["empty.txt"], {}, "input file empty.txt has no text"),
        (["a.txt"], {"tokenizer": "wordpiece"}, "unknown tokenizer 'wordpiece'"),
        (["a.txt"], {"val_fraction": 1.0}, "--val-fraction=1.0 must be in [0, 1)"),
        # files that are not what their names say, named before anything is written
        (["a.txt", "prog.bin"], {}, "prog.bin is binary, not text (byte 7 is a NUL byte): give text, .jsonl"),
        (["junk.tar"], {}, "junk.tar is not a tar file (its first 512 bytes are no tar header)"),
        (["a.txt"], {"out_dir": "a.txt/out"}, "--out a.txt/out: " + "{texts}/a.txt is a file, not a folder"),
    ],
)
def test_prepare_bad_input_writes_nothing(texts, monkeypatch, inputs, kwargs, fragment):
    import random

    monkeypatch.chdir(texts)
    (texts / "empty.txt").write_text("")
    junk = random.Random(0).randbytes(4096)
    (texts / "prog.bin").write_bytes(b"\x7fELF\x02\x01\x01\x00" + junk)
    (texts / "junk.tar").write_bytes(junk)
    kwargs = {"out_dir": "out", **kwargs}
    fragment = fragment.replace("{texts}", str(texts))
    before = sorted(p.name for p in texts.rglob("*"))
    with pytest.raises(DataError, match=None) as e:
        prepare(inputs, **kwargs)
    assert fragment in str(e.value)
    assert sorted(p.name for p in texts.rglob("*")) == before


def test_binary_inputs_are_skipped_on_request_and_hidden_folders_are_not_input(texts, capsys):
    """--on-error skip passes over a binary file found in a folder (named, counted); a
    folder's hidden files and folders (.git, .cache) are not read at all."""
    (texts / "sub" / ".cache" / "old").mkdir(parents=True)
    (texts / "sub" / "c.txt").write_text("x" * 100)
    (texts / "sub" / "logo.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(200))
    (texts / "sub" / ".cache" / "old" / "train-000000.tar").write_bytes(bytes(1024))
    with pytest.raises(DataError, match=r"logo.png is binary, not text \(byte 8 is a NUL byte\)"):
        prepare([str(texts / "sub")], str(texts / "out1"))
    assert not (texts / "out1").exists()
    m = prepare([str(texts / "sub")], str(texts / "out2"), on_error="skip")
    assert m["input_files"] == 2 and m["skipped"]["files"] == 1 and m["splits"]["train"]["tokens"] == 91
    assert "prepare: skipped " + str(texts / "sub" / "logo.png") + " is binary, not text" in capsys.readouterr().err


def test_prepare_refuses_to_overwrite_without_flag(texts):
    out = texts / "out"
    prepare([str(texts / "a.txt")], str(out))
    manifest = (out / "manifest.json").read_text()
    with pytest.raises(DataError, match="already holds a dataset: pass --overwrite"):
        prepare([str(texts / "b.txt")], str(out))
    assert (out / "manifest.json").read_text() == manifest
    (texts / "notes").mkdir()
    (texts / "notes" / "keep.md").write_text("mine")
    with pytest.raises(DataError, match="not empty and holds no dataset"):
        prepare([str(texts / "b.txt")], str(texts / "notes"), overwrite=True)
    assert (texts / "notes" / "keep.md").read_text() == "mine"
    m = prepare([str(texts / "b.txt")], str(out), overwrite=True)
    assert (
        m["input_files"] == 1 and json.loads((out / "manifest.json").read_text())["splits"]["train"]["documents"] == 1
    )
    assert not [p for p in texts.iterdir() if ".partial" in p.name]


def test_resolve_prepares_raw_text_once_into_the_cache(texts):
    cache = texts / "cache"
    first = resolve_dataset(str(texts / "a.txt"), str(cache))
    assert Path(first).name.startswith("a-byte-") and resolve_dataset(str(texts / "a.txt"), str(cache)) == first
    assert resolve_dataset(first, str(cache)) == first
    (texts / "a.txt").write_text("changed text " * 100)
    assert resolve_dataset(str(texts / "a.txt"), str(cache)) != first  # an edited input gets a new folder


def test_stdlib_corpus_is_the_standard_librarys_source():
    files = stdlib_files()
    names = {Path(f).name for f in files}
    assert {"os.py", "json", "tarfile.py"} & names >= {"os.py", "tarfile.py"}
    assert sum(Path(f).stat().st_size for f in files) > 10 * 2**20
    assert not any("site-packages" in f for f in files)


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["empty.txt", "--out", "d"], "input file empty.txt has no text"),
        (["nothing/*.txt", "--out", "d"], "input 'nothing/*.txt' matches no files"),
        (["a.txt", "--out", "d", "--val-fraction", "1.5"], "--val-fraction=1.5 must be in [0, 1)"),
        (["a.txt", "--out", "a.txt"], "--out a.txt is a file"),
        (["a.txt", "--out", "d", "--workers", "0"], "--workers=0 must be at least 1"),
        (["a.txt", "--out", "d", "--chunk-mb", "0"], "the chunk size (--chunk-mb) is 0 bytes: give a positive size"),
        (["a.txt", "--out", "d", "--address", "127.0.0.1:1"], "--address 127.0.0.1:1: no Ray cluster answers there"),
    ],
)
def test_cli_prepare_bad_input_is_one_line_exit_2(texts, args, fragment):
    import os
    import sys

    (texts / "empty.txt").write_text("")
    before = sorted(p.name for p in texts.rglob("*"))
    repo = Path(__file__).resolve().parents[1]
    r = subprocess.run(
        [sys.executable, "-m", "launcher.cli", "prepare", *args],
        cwd=texts,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(repo)},
        timeout=120,
    )
    assert r.returncode == 2 and r.stderr.startswith("trainctl: error: "), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and fragment in r.stderr
    assert sorted(p.name for p in texts.rglob("*")) == before


def test_jsonl_and_raw_tar_inputs_keep_documents_whole(tmp_path):
    import hashlib

    docs = [f"document {i}: " + "word " * (10 + i) for i in range(10)]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"body": d, "id": i}) for i, d in enumerate(docs)) + "\n\n")
    with wds.TarWriter(str(tmp_path / "b.tar")) as sink:
        for i, d in enumerate(docs):
            sink.write({"__key__": f"{i:03d}", **({"txt": d} if i % 2 else {"json": json.dumps({"body": d}).encode()})})
    m = prepare(
        [str(tmp_path / "a.jsonl"), str(tmp_path / "b.tar")], str(tmp_path / "out"), val_fraction=0.2, text_field="body"
    )
    # each document goes whole to the split a hash of its text picks, the same in both files
    val = [d for d in docs if int.from_bytes(hashlib.blake2b(d.encode(), digest_size=8).digest(), "big") < 0.2 * 2**64]
    assert (
        val
        and m["splits"]["train"]["documents"] == 20 - 2 * len(val)
        and m["splits"]["val"]["documents"] == 2 * len(val)
    )
    ids = np.concatenate(
        [
            np.frombuffer(s["tokens"], dtype=np.uint16)
            for s in wds.WebDataset([s["url"] for s in m["splits"]["val"]["shards"]], shardshuffle=False)
        ]
    )
    got = [ByteTokenizer().decode(part) for part in np.split(ids, np.flatnonzero(ids == 256) + 1) if len(part)]
    assert got == val + val  # in file order, whole
    assert m["input_bytes"] == 2 * sum(len(d) for d in docs)


@pytest.mark.parametrize(
    "content, fragment",
    [
        ('{"text": "a"}\n{"body": "b"}\n', "line 2 has no 'text' field: pass --text-field"),
        ('{"text": "a"}\nnot json\n', "line 2 is not valid JSON"),
    ],
)
def test_bad_jsonl_input(tmp_path, content, fragment):
    (tmp_path / "a.jsonl").write_text(content)
    with pytest.raises(DataError) as e:
        prepare([str(tmp_path / "a.jsonl")], str(tmp_path / "out"))
    assert fragment in str(e.value) and not (tmp_path / "out").exists()


def test_shards_are_byte_for_byte_what_tarfile_writes(tmp_path):
    """ShardWriter builds USTAR headers itself; the archive must be the one tarfile makes."""
    import io
    import tarfile

    from data_pipeline.shards import ShardWriter

    arrays = [np.arange(n, dtype=np.uint16) for n in (1, 255, 256, 257, 4096, 3)]
    writer = ShardWriter(str(tmp_path), "train", 1 << 30)
    for a in arrays:
        writer.write(a)
    shard = writer.finish()["shards"][0]
    with tarfile.open(tmp_path / "ref.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, a in enumerate(arrays):
            info = tarfile.TarInfo(f"{key:09d}.tokens")
            info.size, info.mtime, info.mode = a.nbytes, 0, 0o644
            tar.addfile(info, io.BytesIO(a.tobytes()))
    ours = (tmp_path / "train-000000.tar").read_bytes()
    assert ours == (tmp_path / "ref.tar").read_bytes() and shard["bytes"] == len(ours)


@pytest.mark.timeout(120)
def test_parallel_and_ray_prepare_write_the_same_bytes(texts):
    """--workers and --address only change who tokenizes: the shards are identical."""
    import os
    import sys

    for i in range(6):
        (texts / f"part{i}.jsonl").write_text(
            "\n".join(
                json.dumps({"text": f"{i}/{j} " + SHAKESPEARE.read_text()[j * 997 : j * 997 + 900]}) for j in range(40)
            )
        )
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo)}
    outs = {}
    for flags in (["--workers", "1"], ["--workers", "2"], ["--address", "local"]):
        out = texts / f"out{len(outs)}"
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "launcher.cli",
                "prepare",
                "part*.jsonl",
                "a.txt",
                "--out",
                str(out),
                "--tokenizer",
                "bpe:300",
                "--shard-size-mb",
                "0.02",
                *flags,
            ],
            cwd=texts,
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
        assert r.returncode == 0, r.stderr
        outs[" ".join(flags)] = {p.name: p.read_bytes() for p in out.iterdir() if p.suffix == ".tar"}
    plain = outs["--workers 1"]
    assert len(plain) > 4 and all(files == plain for files in outs.values())
