"""Prompt-completion examples are tokenized as the tokenizer tokenizes prompt + completion on
its own (issue 26, item 5): what `AutoTokenizer(prompt + completion)` gives, a Llama 3 style
tokenizer's BOS first, none for a ChatML (Qwen2) one, a BOS and an EOS where the
tokenizer.json's post-processor adds both, then the end-of-text token unless it ends the
text already; the loss flags cover the completion only. `trainctl generate --prompt` encodes its prompt the same way.
Real tokenizers, built with `tokenizers` in the test and read back by transformers."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from data_pipeline import FLAG_PROMPT, FLAG_SHIFT, FLAG_START, TOKEN_MASK, ByteTokenizer, build_tokenizer
from data_pipeline.examples import encode_examples, encode_prompt_completion
from trainer.generate import prompt_ids

WORDS = "the quick brown fox jumps over a lazy dog while seven wizards hum softly near old river banks".split()
EXAMPLES = [  # (prompt, completion, the tokens the completion trains decode to)
    ("Q: what jumps?\nA:", " the quick brown fox", " the quick brown fox"),
    ("the lazy dog", " sleeps near the old river.", " sleeps near the old river."),
    ("", "only a completion", "only a completion"),
    ("Übersetze: café ", "→ coffee ☕", "→ coffee ☕"),  # non-ASCII on both sides
    ("seven wizards hu", "m softly", " softly"),  # inside a word: "hum" starts in the prompt, is the prompt's
]
STYLES = {
    # Llama 3: tokenizer.json's post-processor adds <|begin_of_text|> (no add_bos_token in the config)
    "llama3": (["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"], "<|begin_of_text|> $A",
               {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}),
    # ChatML / Qwen2: no BOS at all
    "chatml": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, {"bos_token": None, "eos_token": "<|im_end|>"}),
    # a post-processor that adds BOS and EOS (the EOS is the end-of-text token: not added again). Flags
    # in tokenizer_config.json do not count: transformers 5 drops add_bos_token / add_eos_token there
    # when a tokenizer.json is present (its post-processor is the tokenizer's behaviour)
    "bos_eos": (["<s>", "</s>"], "<s> $A </s>", {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": False,
                                                 "add_eos_token": False}),
}  # fmt: skip


def write_folder(path, specials: list[str], template: str | None, config: dict) -> str:
    """A Hugging Face tokenizer folder: a small byte-level BPE (as Llama 3's and Qwen2's) with
    `specials`, the post-processor `template` adds (ByteLevel's before it, as Llama 3's file has)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=specials,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([" ".join(WORDS)] * 20, trainer=trainer)
    post = [processors.ByteLevel(trim_offsets=False)]
    if template is not None:
        named = [(t, tok.token_to_id(t)) for t in specials if t in template.split()]
        post.append(processors.TemplateProcessing(single=template, special_tokens=named))
    tok.post_processor = processors.Sequence(post)
    os.makedirs(path, exist_ok=True)
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({**config, "tokenizer_class": "PreTrainedTokenizerFast"}, f)
    return str(path)


@pytest.mark.parametrize("style", list(STYLES))
def test_prompt_completion_is_what_the_tokenizer_makes_of_the_text(style, tmp_path):
    from transformers import AutoTokenizer

    folder = write_folder(tmp_path / "tok", *STYLES[style])
    hf = AutoTokenizer.from_pretrained(folder)
    tok = build_tokenizer(folder)
    path = tmp_path / "pc.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c, _ in EXAMPLES))
    encoded = encode_examples(str(path), json.dumps(tok.to_dict()), 0.0, "prompt-completion")
    starts = np.concatenate([[0], encoded["ends"][:-1]])
    adds_bos = hf.bos_token is not None and hf("x")["input_ids"][0] == hf.bos_token_id
    assert adds_bos == (style != "chatml")
    for (prompt, completion, answer), a, b in zip(EXAMPLES, starts, encoded["ends"]):
        values = encoded["tokens"][a:b]
        ids, flags = (values & TOKEN_MASK).tolist(), (values >> FLAG_SHIFT).tolist()
        want = hf(prompt + completion)["input_ids"]
        assert ids == (want if want[-1] == tok.eot else [*want, tok.eot]), (prompt, completion)
        assert flags[0] & FLAG_START and all(not f & FLAG_START for f in flags[1:])
        trained = [i for i, f in zip(ids, flags) if not f & FLAG_PROMPT]
        assert trained[-1] == tok.eot and hf.decode(trained[:-1]) == answer  # the completion, and only it
        if prompt and adds_bos:  # the BOS is the prompt's, and it is not trained (it is never a target)
            assert ids[0] == hf.bos_token_id and flags[0] & FLAG_PROMPT
        # the prompt at inference: tokenizer(prompt), as `trainctl generate --prompt` now encodes it
        at_inference = hf(prompt)["input_ids"]
        if at_inference and at_inference[-1] == tok.eot and len(at_inference) > 1:
            at_inference = at_inference[:-1]  # a prompt does not end the text
        assert prompt_ids(tok, prompt) == at_inference


def test_the_byte_tokenizer_adds_nothing_and_splits_at_the_prompts_last_byte():
    values = encode_prompt_completion(ByteTokenizer(), "é:", "ß")  # 2-byte characters on both sides
    assert (values & TOKEN_MASK).tolist() == [*"é:".encode(), *"ß".encode(), 256]
    assert (values >> FLAG_SHIFT).tolist() == [FLAG_START | FLAG_PROMPT, FLAG_PROMPT, FLAG_PROMPT, 0, 0, 0]
    assert prompt_ids(ByteTokenizer(), "hi") == [104, 105]
