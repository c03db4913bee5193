"""A batch's rows as the model's inputs, targets and attention segments: `Targets`.

Built once per run from the datasets' manifests and the `data:` section (build.py), used by
every training and validation step (loop.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trainer.model import document_segments


@dataclass(frozen=True)
class Targets:
    """How a batch's rows (B, T+1) become inputs, targets and attention segments.

    Pre-training rows are plain token ids: every next token is a target, and with `eot`
    attention stays inside each end-of-text-delimited document. Chat and prompt-completion
    datasets (`flags` from their manifest) carry per-token flags above the id bits: a target
    that starts an example or is padding is never trained, a prompt token only with
    `train_on="all"`, and with `segments` each packed example attends only to itself."""

    eot: int | None = None  # pre-training rows: document masking by end-of-text
    flags: dict | None = None  # {"shift", "prompt", "start", "pad"}: rows carry flags
    train_on: str = "assistant"
    segments: bool = False  # document masking for flagged rows

    def split(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(idx, targets, segments) for a (B, T+1) batch; untrained targets are -100."""
        if self.flags is None:
            idx = batch[:, :-1]  # (B, T)
            return idx, batch[:, 1:], None if self.eot is None else document_segments(idx, self.eot)
        f = self.flags
        tokens, flags = batch & ((1 << f["shift"]) - 1), batch >> f["shift"]  # (B, T+1) each
        idx, out = tokens[:, :-1], flags[:, 1:]  # (B, T): inputs, and the flags of their targets
        never = f["start"] | f["pad"] | (f["prompt"] if self.train_on == "assistant" else 0)
        targets = tokens[:, 1:].masked_fill((out & never) != 0, -100)  # (B, T)
        segments = None
        if self.segments:
            starts = ((flags[:, :-1] & f["start"]) != 0).long()  # (B, T)
            segments = starts.cumsum(dim=1)
            if self.eot is not None:  # pre-training rows mixed in: their documents end at end-of-text
                plain = starts.sum(dim=1, keepdim=True) == 0  # (B, 1)
                segments = torch.where(plain, document_segments(idx, self.eot), segments)
        return idx, targets, segments
