"""Sampling text from a finished run or a checkpoint, on the CPU, without DeepSpeed's engine."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from data_pipeline import tokenizer_from_dict
from trainer import checkpoint
from trainer.config import JobConfig
from trainer.model import Transformer


def load_model(ckpt: Path):
    """(model in eval mode, tokenizer) from a checkpoint folder."""
    cfg = JobConfig.model_validate(yaml.safe_load((ckpt / "config.yaml").read_text()))
    if "lora" in checkpoint.meta(ckpt):  # the adapters alone: on their base
        from trainer import hf, lora

        model = lora.apply(hf.load_model(cfg.model, checkpoint.meta(ckpt)["lora"]["base"]), cfg.train.lora)
        model.load_state_dict(checkpoint.load_model_state(ckpt), strict=False)
    else:
        model = Transformer(cfg.model)
        model.load_state_dict(checkpoint.load_model_state(ckpt))
    model.eval()
    return model, tokenizer_from_dict(checkpoint.meta(ckpt)["tokenizer"])


def load_any(path: str | Path):
    """(model in eval mode, tokenizer) from a run, a checkpoint, an export folder or a Hugging
    Face model folder."""
    folder = Path(path)
    if (folder / "trainctl_export.json").is_file() or (folder / "config.json").is_file():  # export or HF folder
        from trainer.export import load_export

        model, tok_dict = load_export(folder)
        return model, tokenizer_from_dict(tok_dict)
    return load_model(checkpoint.find_checkpoint(path))


def prompt_ids(tok, prompt: str, chat: bool = False) -> list[int]:
    """The prompt's token ids as a model's users give them: with `chat`, the user's message
    rendered by the chat template (which writes its own special tokens); else as
    `tokenizer(prompt)` (a BOS the tokenizer adds first, as prompt-completion data trains
    with), less an end-of-text token the tokenizer would add after it."""
    if chat:
        return tok.encode(tok.render_chat([{"role": "user", "content": prompt}], add_generation_prompt=True)).tolist()
    ids, _, added = tok.encode_special(prompt)
    if len(ids) and added[-1] and ids[-1] == tok.eot:
        ids = ids[:-1]
    return ids.tolist()


def sample(
    path: str | Path,
    prompt: str = "\n",
    max_new_tokens: int = 200,
    temperature: float = 0.8,
    top_k: int | None = 200,
    seed: int = 0,
    chat: bool = False,
) -> str:
    """The prompt's continuation as text, from a run, a checkpoint, an export folder or a
    Hugging Face model folder. With `chat`, the prompt is a user's message put through the
    tokenizer's chat template, and the reply ends at the end-of-turn token.

    >>> print(sample("runs/tiny-cpu", prompt="def ", max_new_tokens=100))  # doctest: +SKIP
    """
    model, tok = load_any(path)
    if chat and getattr(tok, "chat_template", None) is None:
        raise ValueError(f"{path}'s tokenizer has no chat template: leave out --chat")
    ids = prompt_ids(tok, prompt, chat)
    if len(ids) == 0:
        ids = [tok.eot]
    idx = torch.tensor([list(ids)], dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    stop = tok.eot if chat else None
    out = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k, generator=gen, stop=stop)
    reply = out[0, len(ids) :].tolist()
    if chat and stop in reply:
        reply = reply[: reply.index(stop)]
    return tok.decode(reply)


@torch.no_grad()
def continue_prompts(model: Transformer, prompts: torch.Tensor, max_new_tokens: int, seed: int) -> torch.Tensor:
    """Continuations (B, max_new_tokens) of `prompts` (B, T) from a model being trained:
    in eval mode for the call, with a generator of its own (training's randomness is left
    as it was). Under ZeRO-3 every rank must call it (each forward gathers the weights)."""
    was_training = model.training
    model.eval()
    gen = torch.Generator(device=prompts.device).manual_seed(seed)
    out = model.generate(prompts, max_new_tokens, temperature=0.8, top_k=200, generator=gen)
    model.train(was_training)
    return out[:, prompts.shape[1] :]
