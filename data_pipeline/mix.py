"""Mixing several datasets by weight, deterministically and resumably: each global-batch
slot's source is drawn by a generator seeded by (seed, step), and each source is its own
TokenStream of one window per step, so the mix, like the rest of the order, is a pure
function of the position.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from data_pipeline.errors import DataError
from data_pipeline.lanes import TokenStream
from data_pipeline.raw import RawOptions
from data_pipeline.stream import BatchStream


class MixedStream(BatchStream):
    """TokenStream's interface over several weighted sources."""

    def __init__(
        self,
        sources: list[tuple[str, float]],
        seq_len: int,
        micro_batch_size: int,
        rank: int,
        world_size: int,
        grad_accum_steps: int = 1,
        seed: int = 0,
        shuffle_buffer: int = 8192,
        on_error: str = "fail",
        raw: RawOptions | None = None,
    ):
        if not sources:
            raise DataError("data.sources is empty: give at least one {path, weight}")
        weights = np.array([w for _, w in sources], dtype=np.float64)
        if (weights <= 0).any() or not np.isfinite(weights).all():
            raise DataError(f"data.sources weights {weights.tolist()} must all be positive numbers")
        self.weights = weights / weights.sum()
        self.names = [path for path, _ in sources]
        # Each source: its own order (seed + index), one window per step.
        self.subs = [
            TokenStream(
                path,
                "train",
                seq_len,
                1,
                0,
                1,
                seed=seed + 1009 * i,
                shuffle_buffer=shuffle_buffer,
                on_error=on_error,
                raw=raw,
            )
            for i, (path, _) in enumerate(sources)
        ]
        if any(s.manifest["tokenizer"] != self.subs[0].manifest["tokenizer"] for s in self.subs):
            raise DataError("data.sources use different tokenizers: prepare them all with the same --tokenizer")
        self.manifest = self.subs[0].manifest
        super().__init__(seq_len, micro_batch_size, rank, world_size, grad_accum_steps, seed)
        self.step = 0
        self.taken = np.zeros(len(sources), dtype=np.int64)  # windows drawn from each source so far

    @property
    def epoch(self) -> int:
        return self.subs[0].epoch

    @property
    def skipped(self) -> list[str]:
        return [url for s in self.subs for url in s.skipped]

    def proportions(self) -> dict[str, float]:
        """The realised share of each source so far."""
        total = max(int(self.taken.sum()), 1)
        return {name: int(n) / total for name, n in zip(self.names, self.taken)}

    def slots(self, step: int) -> np.ndarray:
        """The source of each of the step's global-batch slots."""
        return np.random.default_rng([self.seed, 7919, step]).choice(
            len(self.subs), size=self.global_batch, p=self.weights
        )

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "seed": self.seed,
            "global_batch": self.global_batch,
            "seq_len": self.seq_len,
            "sources": [s.state_dict() for s in self.subs],
            "names": self.names,
            "taken": self.taken.tolist(),
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("names") != self.names:
            raise DataError(
                f"the saved data position mixes {state.get('names')} but this job mixes {self.names}: "
                "resume with the same data.sources or start a fresh run"
            )
        self._check_state(state)
        for sub, sub_state in zip(self.subs, state["sources"]):
            sub.load_state_dict(sub_state)
        self.step, self.taken = state["step"], np.array(state["taken"], dtype=np.int64)

    def position(self) -> dict:
        return {**super().position(), "mix": self.proportions()}

    def _batches(self) -> Iterator[list[torch.Tensor]]:
        """Each step's global batch, a (T+1,) window per slot; every rank draws every window."""
        its = [iter(s) for s in self.subs]
        while True:
            slots = self.slots(self.step)
            batch = [next(its[i])[0] for i in slots]
            np.add.at(self.taken, slots, 1)
            self.step += 1
            yield batch

    def _rank_rows(self, rows: list[torch.Tensor]) -> np.ndarray:
        return torch.stack(rows).numpy()
