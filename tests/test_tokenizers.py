"""Tokenizers: byte, BPE trained on the corpus, a tokenizer.json file — round trips,
compression, determinism, and the errors a user meets."""

from __future__ import annotations

import json

import numpy as np
import pytest
from cli_helpers import SHAKESPEARE

from data_pipeline import DataError, TokenStream, build_tokenizer, load_manifest, prepare, tokenizer_from_dict

TEXT = "ROMEO: Wherefore art thou — ünïcode, 世界, tabs\tand  spaces\n"


@pytest.fixture(scope="module")
def bpe_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("bpe")
    (root / "t.txt").write_text(SHAKESPEARE.read_text()[:300_000])
    prepare([str(root / "t.txt")], str(root / "d"), tokenizer="bpe:1024")
    return root


def test_bpe_round_trip_and_end_of_text(bpe_data):
    m = load_manifest(str(bpe_data / "d"))
    tok = tokenizer_from_dict(m["tokenizer"])
    assert m["tokenizer"]["name"] == "bpe" and tok.vocab_size == 1024 and m["dtype"] == "uint16"
    ids = tok.encode(TEXT)
    assert tok.decode(ids) == TEXT
    assert tok.eot == tok.tok.token_to_id("<|endoftext|>")
    assert tok.decode([*ids.tolist(), tok.eot]) == TEXT  # end-of-text never shows in text


def test_bpe_compresses_english(bpe_data):
    m = load_manifest(str(bpe_data / "d"))
    tokens = m["splits"]["train"]["tokens"] + m["splits"]["val"]["tokens"]
    assert m["input_bytes"] == 300_000
    assert m["input_bytes"] / tokens > 2.5


def test_bpe_prepare_is_byte_identical_on_rerun(bpe_data):
    prepare([str(bpe_data / "t.txt")], str(bpe_data / "again"), tokenizer="bpe:1024", name="d")
    for name in ("manifest.json", "train-000000.tar", "val-000000.tar"):
        assert (bpe_data / "d" / name).read_bytes() == (bpe_data / "again" / name).read_bytes(), name


def test_tokenizer_json_file_gives_the_same_tokens(bpe_data):
    tok_json = load_manifest(str(bpe_data / "d"))["tokenizer"]["json"]
    (bpe_data / "tokenizer.json").write_text(tok_json)
    m = prepare([str(bpe_data / "t.txt")], str(bpe_data / "f"), tokenizer=str(bpe_data / "tokenizer.json"))
    assert m["tokenizer"]["name"] == "file" and m["tokenizer"]["vocab_size"] == 1024
    a = TokenStream(str(bpe_data / "d"), "train", 64, 4, 0, 1, seed=1)
    b = TokenStream(str(bpe_data / "f"), "train", 64, 4, 0, 1, seed=1)
    ia, ib = iter(a), iter(b)
    for _ in range(5):
        assert np.array_equal(next(ia).numpy(), next(ib).numpy())


def test_byte_and_bpe_streams_hold_valid_ids(bpe_data):
    batch = next(iter(TokenStream(str(bpe_data / "d"), "train", 64, 8, 0, 1)))
    assert batch.shape == (8, 65) and 0 <= batch.min() and batch.max() < 1024


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ("bpe:abc", "give bpe:VOCAB_SIZE"),
        ("bpe:100", "between 258 and"),
        ("missing/tokenizer.json", "tokenizer file missing/tokenizer.json not found"),
        ("sentencepiece", "unknown tokenizer 'sentencepiece'"),
    ],
)
def test_bad_tokenizer_specs(tmp_path, monkeypatch, spec, fragment):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "t.txt").write_text("hello " * 100)
    with pytest.raises(DataError) as e:
        prepare(["t.txt"], "out", tokenizer=spec)
    assert fragment in str(e.value) and not (tmp_path / "out").exists()


def test_bad_tokenizer_files(tmp_path, bpe_data):
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(DataError, match="not a valid Hugging Face tokenizer.json"):
        build_tokenizer(str(tmp_path / "broken.json"))
    tree = json.loads(load_manifest(str(bpe_data / "d"))["tokenizer"]["json"])
    tree["added_tokens"] = []
    tree["model"]["vocab"].pop("<|endoftext|>")
    (tmp_path / "no_eot.json").write_text(json.dumps(tree))
    with pytest.raises(DataError, match="has none of the end-of-text tokens"):
        build_tokenizer(str(tmp_path / "no_eot.json"))


def test_batched_encoding_equals_one_by_one(bpe_data):
    import sys

    prepare_module = sys.modules["data_pipeline.prepare"]
    tok = tokenizer_from_dict(load_manifest(str(bpe_data / "d"))["tokenizer"])
    text = (bpe_data / "t.txt").read_bytes()
    docs = [text[i : i + 700] for i in range(0, 70_000, 700)] + [text[:20_000]]  # many short, one cut into pieces
    batched = prepare_module.encode_documents(tok, docs, piece_chars=2_000)
    assert len(batched) == len(docs)
    assert all(np.array_equal(b, tok.encode(d)) for b, d in zip(batched, docs))
