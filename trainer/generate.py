"""Sampling text from a finished run or a checkpoint, on the CPU, without DeepSpeed's engine."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from data_pipeline import tokenizer_from_dict
from trainer import checkpoint
from trainer.config import JobConfig
from trainer.model import ModelConfig, Transformer


class NoCheckpoint(FileNotFoundError):
    """The path holds no complete checkpoint."""


def find_checkpoint(path: str | Path) -> Path:
    """A run folder (its latest whole checkpoint), a checkpoints folder, or a checkpoint
    itself (NoCheckpoint if it is damaged); any of these may be an object-store URL, whose
    checkpoint is downloaded into a local cache first."""
    if checkpoint.is_url(str(path)):
        return _find_remote(str(path).rstrip("/"))
    p = Path(path)
    if (p / checkpoint.COMPLETE).is_file():
        why = checkpoint.damage(p)
        if why:
            raise NoCheckpoint(f"checkpoint {p} is damaged ({why}): give an earlier one")
        return p
    for root in (p / "checkpoints", p):
        try:
            found = checkpoint.find_latest(root)
        except checkpoint.CheckpointError as e:
            raise NoCheckpoint(str(e)) from None
        if found is not None:
            return found
    raise NoCheckpoint(f"no complete checkpoint in {p}: give a run folder (checkpoint.storage_path/NAME) or a checkpoint folder")


def _find_remote(url: str) -> Path:
    parent, tag = url.rsplit("/", 1)
    try:
        if tag.startswith("step_"):
            store = checkpoint.Store(checkpoint.url_cache(parent), parent)
            if tag in store.tags():
                return store.fetch(tag)
        for root in (f"{url}/checkpoints", url):
            found = checkpoint.Store(checkpoint.url_cache(root), root).latest()
            if found is not None:
                return found
    except checkpoint.CheckpointError as e:
        raise NoCheckpoint(str(e)) from None
    except Exception as e:  # noqa: BLE001 - network, credentials, a missing bucket alike
        raise NoCheckpoint(f"cannot read {url} ({type(e).__name__}: {e}): check the URL and the credentials") from None
    raise NoCheckpoint(f"no complete checkpoint in {url}: give a run folder (checkpoint.storage_path/NAME) or a checkpoint folder")


def load_model(ckpt: Path):
    """(model in eval mode, tokenizer) from a checkpoint folder."""
    cfg = JobConfig.model_validate(yaml.safe_load((ckpt / "config.yaml").read_text()))
    model = Transformer(ModelConfig(**cfg.model.model_dump()))
    model.load_state_dict(checkpoint.load_model_state(ckpt))
    model.eval()
    return model, tokenizer_from_dict(checkpoint.meta(ckpt)["tokenizer"])


def sample(path: str | Path, prompt: str = "\n", max_new_tokens: int = 200, temperature: float = 0.8,
           top_k: int | None = 200, seed: int = 0) -> str:
    """The prompt's continuation as text, from a run, a checkpoint or an export folder.

    >>> print(sample("runs/tiny-cpu", prompt="def ", max_new_tokens=100))  # doctest: +SKIP
    """
    if (Path(path) / "trainctl_export.json").is_file():  # an export folder
        from trainer.export import load_export

        model, tok_dict = load_export(Path(path))
        tok = tokenizer_from_dict(tok_dict)
    else:
        model, tok = load_model(find_checkpoint(path))
    ids = tok.encode(prompt)
    if len(ids) == 0:
        ids = [tok.eot]
    idx = torch.tensor([list(ids)], dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    out = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k, generator=gen)
    return tok.decode(out[0, len(ids):].tolist())


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
    return out[:, prompts.shape[1]:]
