"""Fine-tuning data (`prepare --format chat|prompt-completion`): a Hugging Face tokenizer
folder, per-token loss flags (only assistant turns trained), whole examples packed into rows
of exactly one training window, those rows carried through lanes, loader workers, resume,
validation and mixing with pre-training data, and bad input as one line naming the fix; the
tokens of a chat checked against transformers' own apply_chat_template."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from data_pipeline import (
    FLAG_PAD,
    FLAG_PROMPT,
    FLAG_SHIFT,
    FLAG_START,
    TOKEN_MASK,
    DataError,
    Loader,
    MixedStream,
    TokenStream,
    build_tokenizer,
    load_manifest,
    prepare,
    summarize,
    tokenizer_from_dict,
    val_share,
)
from data_pipeline.examples import encode_examples
from data_pipeline.shardreads import read_shard

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + "
    "'\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
WORDS = "the quick brown fox jumps over a lazy dog while seven wizards hum softly near old river banks".split()
T, G = 31, 6  # rows of 32 tokens; global batch 6 (1, 2 or 3 ranks)


# Llama 3's layout: <|begin_of_text|> from the template (and from the tokenizer's own
# post-processor, which a chat's encoding must not add again), a system turn by default.
LLAMA3 = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
    "{% set messages = messages[1:] %}{% else %}{% set system = 'You are a helpful assistant.' %}{% endif %}"
    "{{ '<|start_header_id|>system<|end_header_id|>\\n\\n' + system + '<|eot_id|>' }}"
    "{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + "
    "message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def write_folder(
    path, config: dict | None, jinja: str | None = None, specials: list[str] | None = None, bos: str | None = None
) -> str:
    """A Hugging Face tokenizer folder: a tiny byte-level BPE with ChatML's special tokens
    (or `specials`; `bos`: a post-processor that puts it before every encoding)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = specials or ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=specials,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([" ".join(WORDS)] * 20, trainer=trainer)
    if bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, specials.index(bos))]
        )
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "tokenizer.json"), "w") as f:
        f.write(tok.to_str())
    if config is not None:
        with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
            json.dump(config, f)
    if jinja is not None:
        with open(os.path.join(path, "chat_template.jinja"), "w") as f:
            f.write(jinja)
    return str(path)


def sentence(i: int, n: int) -> str:
    return " ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(n))


def write_jsonl(path, records) -> str:
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return str(path)


def chats(n: int) -> list[dict]:
    """Conversations of one or two turns, of lengths from a few tokens to longer than a row."""
    out = []
    for i in range(n):
        messages = [{"role": "user", "content": f"{i} {sentence(i, i % 4)}"}]  # each one different
        messages.append({"role": "assistant", "content": sentence(i + 1, 1 + i % 9)})
        if i % 3 == 0:
            messages = [{"role": "system", "content": "be brief"}, *messages]
            messages += [{"role": "user", "content": "and"}, {"role": "assistant", "content": sentence(i, 2)}]
        out.append({"messages": messages})
    return out


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A tokenizer folder, a chat dataset and a text dataset with the same tokenizer."""
    root = tmp_path_factory.mktemp("chat")
    folder = write_folder(root / "tok", {"eos_token": "<|im_end|>", "chat_template": CHATML, "bos_token": None})
    chat = write_jsonl(root / "chat.jsonl", chats(700))
    prepare([chat], str(root / "c"), tokenizer=folder, format="chat", seq_len=T, chunk_bytes=2 << 10, sample_tokens=64)
    (root / "text.txt").write_text("\n".join(sentence(i, 12) for i in range(1500)))
    prepare([str(root / "text.txt")], str(root / "t"), tokenizer=folder, chunk_bytes=4 << 10)
    return root, folder


def stored_rows(path: str, split: str) -> np.ndarray:
    """Every row a split holds, in shard order, as (rows, T+1) uint32."""
    m = load_manifest(path)
    tokens = np.concatenate([a for s in m["splits"][split]["shards"] for a in read_shard(s, np.dtype(np.uint32))])
    return tokens.reshape(-1, m["row_tokens"])


def segments(row: np.ndarray) -> list[np.ndarray]:
    """A row cut at its START flags: its examples, then its padding."""
    starts = np.flatnonzero((row >> FLAG_SHIFT) & FLAG_START)
    return np.split(row, starts[1:])


@pytest.mark.timeout(180)
def test_a_model_folder_tokenizer_and_its_dict(work, tmp_path):
    _, folder = work
    tok = build_tokenizer(folder)
    assert (tok.name, tok.eot, tok.pad_id, tok.chat_template) == ("hf", 2, 2, CHATML)  # eot: eos <|im_end|>
    again = tokenizer_from_dict(json.loads(json.dumps(tok.to_dict())))
    assert again.to_dict() == tok.to_dict() and again.eot == 2
    # transformers 5's layout: chat_template.jinja beside, special tokens as {"content": ...}
    other = write_folder(
        tmp_path / "v5",
        {"eos_token": {"content": "<|im_end|>"}, "pad_token": {"content": "<|endoftext|>"}},
        jinja=CHATML,
    )
    tok5 = build_tokenizer(other)
    assert (tok5.eot, tok5.pad_id, tok5.chat_template, tok5.to_dict()["pad_token"]) == (2, 0, CHATML, "<|endoftext|>")
    # without a config: no template, and the end-of-text rule of a bare tokenizer.json
    bare = build_tokenizer(write_folder(tmp_path / "bare", None))
    assert (bare.eot, bare.chat_template) == (0, None)
    # the dicts of before (a tokenizer.json file, trained BPE) keep their keys and load as they did
    old = {"name": "file", "vocab_size": bare.vocab_size, "eot": 0, "json": bare.json}
    assert tokenizer_from_dict(old).to_dict() == old
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"^tokenizer folder \S+empty has no tokenizer.json: give a Hugging Face"):
        build_tokenizer(str(tmp_path / "empty"))


@pytest.mark.timeout(180)
def test_only_the_assistant_turns_and_their_end_tokens_are_trained(work, tmp_path):
    _, folder = work
    tok = build_tokenizer(folder)
    record = {
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "the fox"},
            {"role": "assistant", "content": "jumps over"},
            {"role": "user", "content": "and the dog"},
            {"role": "assistant", "content": "a lazy dog"},
        ]
    }
    path = write_jsonl(tmp_path / "one.jsonl", [record])
    out = encode_examples(path, json.dumps(tok.to_dict()), 0.0, "chat")
    values = out["tokens"]
    ids, flags = values & TOKEN_MASK, values >> FLAG_SHIFT
    text = tok.render_chat(record["messages"])
    assert ids.tolist() == tok.encode(text).tolist()
    im_end = tok.tok.token_to_id("<|im_end|>")
    assert ids[flags == 0].tolist() == [*tok.encode("jumps over"), im_end, *tok.encode("a lazy dog"), im_end]
    assert flags[0] == FLAG_START | FLAG_PROMPT and set(flags[1:].tolist()) == {0, FLAG_PROMPT}
    # the newline ChatML writes after <|im_end|> is the prompt's, as is each turn's header
    assert ids[-1] == tok.encode("\n")[0] and flags[-1] == FLAG_PROMPT
    # the same example, packed and stored
    prepare([path], str(tmp_path / "d"), tokenizer=folder, format="chat", seq_len=127, val_fraction=0.0)
    row = stored_rows(str(tmp_path / "d"), "train")[0]
    assert row[: len(values)].tolist() == values.tolist()
    pad = row[len(values) :]
    assert pad[0] == 2 | (FLAG_PAD | FLAG_START) << FLAG_SHIFT and set(pad[1:].tolist()) == {2 | FLAG_PAD << FLAG_SHIFT}


@pytest.mark.parametrize("template", ["chatml", "llama3"])
def test_a_chat_is_the_tokens_transformers_gives_it(tmp_path, template):
    """Each conversation's tokens are those of transformers' own
    `AutoTokenizer.apply_chat_template(tokenize=True)` on the same folder: ChatML, and a
    Llama 3 style template (the tokenizer's BOS once, a default system turn when the chat
    has none)."""
    from transformers import AutoTokenizer

    if template == "chatml":
        folder = write_folder(tmp_path / "tok", {"eos_token": "<|im_end|>", "chat_template": CHATML})
    else:
        config = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "chat_template": LLAMA3}
        folder = write_folder(tmp_path / "tok", config, specials=LLAMA3_SPECIALS, bos="<|begin_of_text|>")
    records = chats(6)  # with a system turn and without, one and two exchanges
    path = write_jsonl(tmp_path / "chats.jsonl", records)
    tok = build_tokenizer(folder)
    out = encode_examples(path, json.dumps(tok.to_dict()), 0.0, "chat")
    ours = np.split(out["tokens"] & TOKEN_MASK, out["ends"][:-1])
    hf = AutoTokenizer.from_pretrained(folder)
    for record, ids in zip(records, ours, strict=True):
        want = hf.apply_chat_template(record["messages"], tokenize=True)
        want = want["input_ids"] if hasattr(want, "keys") else want
        assert ids.tolist() == list(want), record
    if template == "llama3":  # the BOS once, and the default system turn exactly where the chat has none
        bos = hf.convert_tokens_to_ids("<|begin_of_text|>")
        for record, ids in zip(records, ours):
            assert ids[0] == bos and bos not in ids[1:].tolist()
            defaulted = record["messages"][0]["role"] != "system"
            assert ("system<|end_header_id|>\n\nYou are a helpful assistant." in hf.decode(ids)) == defaulted
        assert {r["messages"][0]["role"] for r in records} == {"system", "user"}


@pytest.mark.timeout(180)
def test_prompt_completion_trains_the_completion_and_end_of_text(work, tmp_path):
    _, folder = work
    tok = build_tokenizer(folder)
    path = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "the quick fox", "completion": " jumps over", "id": 7}])
    values = encode_examples(path, json.dumps(tok.to_dict()), 0.0, "prompt-completion")["tokens"]
    prompt, completion = tok.encode("the quick fox").tolist(), tok.encode(" jumps over").tolist()
    assert (values & TOKEN_MASK).tolist() == prompt + completion + [tok.eot]
    flags = (values >> FLAG_SHIFT).tolist()
    assert flags == [FLAG_START | FLAG_PROMPT] + [FLAG_PROMPT] * (len(prompt) - 1) + [0] * (len(completion) + 1)


@pytest.mark.timeout(180)
def test_whole_examples_packed_into_rows_truncating_only_the_too_long(work):
    root, folder = work
    m = load_manifest(str(root / "c"))
    assert (m["dtype"], m["examples"], m["seq_len"], m["row_tokens"], m["pad_id"]) == ("uint32", "chat", T, T + 1, 2)
    assert m["flags"] == {"shift": 24, "prompt": 1, "start": 2, "pad": 4}
    tok = json.dumps(build_tokenizer(folder).to_dict())
    encoded = encode_examples(str(root / "chat.jsonl"), tok, m["val_fraction"], "chat")
    for split_index, split in enumerate(("train", "val")):
        s, rows = m["splits"][split], stored_rows(str(root / "c"), split)
        ends = encoded["ends"][encoded["splits"] == split_index]
        starts = np.concatenate([[0], encoded["ends"][:-1]])[encoded["splits"] == split_index]
        wanted = [encoded["tokens"][a:b][: T + 1] for a, b in zip(starts, ends)]  # each example, cut to a row
        assert s["examples"] == s["documents"] == len(wanted) and s["rows"] == len(rows)
        assert s["truncated"] == sum(b - a > T + 1 for a, b in zip(starts, ends)) > 0
        got, padding = [], 0
        for row in rows:
            assert (row[0] >> FLAG_SHIFT) & FLAG_START  # no row begins inside an example
            parts = segments(row)
            if (parts[-1][0] >> FLAG_SHIFT) & FLAG_PAD:  # padding last, its own segment, all PAD
                assert set((parts[-1] >> FLAG_SHIFT).tolist()) <= {FLAG_PAD, FLAG_PAD | FLAG_START}
                padding += len(parts.pop())
            got += [p.tolist() for p in parts]
        # every example exactly once, whole (or its first row's worth), in some row
        assert sorted(got) == sorted(w.tolist() for w in wanted)
        assert s["padding_tokens"] == padding < 0.1 * rows.size
        assert s["trained_tokens"] == int(np.count_nonzero(rows >> FLAG_SHIFT == 0))
        # chunks, and the samples in them, close only between rows
        assert all(c[2] % (T + 1) == 0 for shard in s["shards"] for c in shard["chunks"])
        assert len([c for shard in s["shards"] for c in shard["chunks"]]) > 5 or split == "val"
    text = summarize(m)
    assert "chat examples packed into rows of 32 tokens (data.seq_len=31)" in text
    assert f"{m['splits']['train']['truncated']:,} examples truncated to 32 tokens" in text
    # .parquet records (messages as a list of structs) make the same dataset
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = [json.loads(line) for line in open(root / "chat.jsonl")]
    pq.write_table(pa.Table.from_pylist(records), root / "chat.parquet")
    p = prepare(
        [str(root / "chat.parquet")],
        str(root / "p"),
        tokenizer=folder,
        format="chat",
        seq_len=T,
        chunk_bytes=2 << 10,
        sample_tokens=64,
    )
    assert [s["sha256"] for s in p["splits"]["train"]["shards"]] == [
        s["sha256"] for s in m["splits"]["train"]["shards"]
    ]


@pytest.mark.timeout(180)
def test_a_run_with_another_seq_len_is_refused_naming_both(work):
    root, _ = work
    path = str(root / "c")
    fix = (
        rf"^dataset {path} is packed for seq_len 31 \(prepare --seq-len 31\) but data.seq_len is 64: "
        r"set data.seq_len=31 or prepare it again with --seq-len 64$"
    )
    with pytest.raises(DataError, match=fix):
        TokenStream(path, "train", 64, 2, 0, 1)
    with pytest.raises(DataError, match=fix):
        val_share(path, "val", 64, 0, 1)
    with pytest.raises(DataError, match=fix.replace(path, str(root / "c"))):
        MixedStream([(str(root / "t"), 1), (path, 1)], 64, 2, 0, 1)


def global_batches(path, world, steps, workers=0, state=None):
    loaders = [Loader(TokenStream(path, "train", T, G // world, r, world, seed=3), workers) for r in range(world)]
    for loader in loaders:
        if state:
            loader.load_state_dict(state)
    its = [iter(loader) for loader in loaders]
    return [torch.cat([next(it) for it in its]) for _ in range(steps)], loaders[0].state_dict()


@pytest.mark.timeout(300)
def test_each_window_is_one_stored_row_with_its_flags_and_resume_is_exact(work):
    root, _ = work
    path = str(root / "c")
    rows = stored_rows(path, "train")
    known = {tuple(r) for r in rows.tolist()}
    per_epoch = TokenStream(path, "train", T, G, 0, 1, seed=3).steps_per_epoch
    assert per_epoch == len(rows) // G  # every row a window: no offset, no overlap
    straight, end = global_batches(path, 1, per_epoch + 10)
    assert end["epoch"] == 1
    first_epoch = [tuple(r) for b in straight[:per_epoch] for r in b.tolist()]
    assert set(first_epoch) <= known and len(set(first_epoch)) == per_epoch * G  # rows, each at most once an epoch
    assert straight[0].dtype == torch.int64 and (straight[0] >> FLAG_SHIFT).max() > 0  # the flags came through
    # stopped on 2 ranks with 2 loader workers, resumed on 3 ranks: the same rows
    _, state = global_batches(path, 2, per_epoch - 5, workers=2)
    resumed, state = global_batches(path, 3, 15, workers=1, state=state)
    assert all(torch.equal(a, b) for a, b in zip(straight[per_epoch - 5 :], resumed)) and state == end
    # validation: the val split's rows, in order, split over the ranks
    val = stored_rows(path, "val")
    joined = np.concatenate([val_share(path, "val", T, r, 2).rows for r in range(2)])
    assert (joined == val).all()


@pytest.mark.timeout(300)
def test_mixed_with_pretraining_text_the_rows_keep_their_flags(work):
    root, _ = work
    chat, text = str(root / "c"), str(root / "t")
    known = {tuple(r) for r in stored_rows(chat, "train").tolist()}
    text_tokens = np.concatenate(
        [a for s in load_manifest(text)["splits"]["train"]["shards"] for a in read_shard(s, np.dtype(np.uint16))]
    ).tobytes()

    def run(world, workers):
        loaders = [
            Loader(MixedStream([(text, 1), (chat, 1)], T, G // world, r, world, seed=9), workers, group=1)
            for r in range(world)
        ]
        its = [iter(loader) for loader in loaders]
        return [torch.cat([next(it) for it in its]) for _ in range(30)]

    one = run(1, 0)
    kinds = {"chat": 0, "text": 0}
    for row in torch.cat(one).tolist():
        if tuple(row) in known:
            kinds["chat"] += 1
        else:  # a window of the text: no flags, consecutive tokens
            assert max(row) < 2**16 and np.array(row, np.uint16).tobytes() in text_tokens
            kinds["text"] += 1
    assert min(kinds.values()) > 50
    # on 2 ranks through 2 loader workers (uint16 text rows and uint32 chat rows widened together): the same
    assert all(torch.equal(a, b) for a, b in zip(one, run(2, 2)))


def bad(tmp_path, records, **kw):
    return [write_jsonl(tmp_path / "bad.jsonl", records)], kw


@pytest.mark.parametrize(
    "records, kw, message",
    [
        (
            [{"messages": [{"role": "user", "content": "hi"}]}, {"text": "hello"}],
            {},
            r"bad.jsonl line 2 has no 'messages' list: give each record a 'messages' list of \{role, content\}",
        ),
        (
            [{"messages": [{"role": "user", "content": "hi"}, {"role": "narrator", "content": "then"}]}],
            {},
            r"bad.jsonl line 1: message 2 has role 'narrator': use one of the roles system, user, assistant, tool, "
            r"or pass --on-error skip",
        ),
        (
            [{"messages": "hi"}],
            {},
            r"bad.jsonl line 1: 'messages' is a str, not a list: give each record a 'messages' list",
        ),
        (
            [{"messages": [{"role": "user", "content": "hi"}]}],
            {"tokenizer": "NOTEMPLATE"},
            r"tokenizer \S+notemplate has no chat template: --format chat needs a Hugging Face model folder whose "
            r"tokenizer_config.json \(or chat_template.jinja\) has one; or use --format prompt-completion",
        ),
        (
            [{"messages": [{"role": "user", "content": "hi"}]}],
            {"tokenizer": "byte"},
            r"^tokenizer byte has no chat template: --format chat needs a Hugging Face model folder",
        ),
        (
            [{"messages": [{"role": "user", "content": "hi"}]}],
            {"seq_len": None},
            r"--format chat packs examples into rows of one training sequence: give --seq-len, the data.seq_len "
            r"you will train with \(e.g. --seq-len 2048\)",
        ),
        (
            [{"prompt": "a", "completion": "b"}, {"prompt": "a"}],
            {"format": "prompt-completion"},
            r"bad.jsonl line 2 has no 'completion' field, not a string: give each record 'prompt' and 'completion' "
            r"strings, or pass --on-error skip",
        ),
        (
            [{"prompt": 3, "completion": "b"}],
            {"format": "prompt-completion"},
            r"bad.jsonl line 1 has a int as its 'prompt' field, not a string",
        ),
    ],
)
@pytest.mark.timeout(180)
def test_bad_input_is_one_line_naming_the_fix_and_writes_nothing(work, tmp_path, records, kw, message):
    _, folder = work
    if kw.get("tokenizer") == "NOTEMPLATE":
        kw["tokenizer"] = write_folder(tmp_path / "notemplate", {"eos_token": "<|im_end|>"})
    inputs, kw = bad(tmp_path, records, **kw)
    options = {"tokenizer": folder, "format": "chat", "seq_len": T, **kw}
    before = set(os.listdir(tmp_path))
    with pytest.raises(DataError, match=message) as e:
        prepare(inputs, str(tmp_path / "out"), **options)
    assert "\n" not in str(e.value)
    assert set(os.listdir(tmp_path)) == before  # no output folder, no partial one beside it


@pytest.mark.timeout(180)
def test_bad_records_are_skipped_and_counted_under_on_error_skip(work, tmp_path, capsys):
    _, folder = work
    records = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "the fox"}]},
        {"messages": [{"role": "narrator", "content": "then"}]},
        {"text": "no messages"},
    ]
    path = write_jsonl(tmp_path / "some.jsonl", records)
    m = prepare([path], str(tmp_path / "d"), tokenizer=folder, format="chat", seq_len=T, on_error="skip")
    assert m["skipped"]["documents"] == 2 and m["splits"]["train"]["examples"] + m["splits"]["val"]["examples"] == 1
    assert "some.jsonl line 2: message 1 has role 'narrator'" in capsys.readouterr().err
