"""The order in which TokenStream reads a prepared split, a pure function of (seed, epoch,
step, global batch G, lanes P) and of nothing about the ranks or loader workers:

- a split is a list of chunks (data_pipeline.chunks); epoch e permutes them and picks a
  token offset o < T;
- chunk c gives windows of T+1 tokens at stride T from o, inside the chunk (packed
  fine-tuning rows: at stride T+1 from 0, so each window is one whole row); its windows
  are cut into pieces (64 KB with 512 lanes, 2 MB with 16: lanes.PIECE_BUDGET), the pieces
  permuted and the windows inside each piece permuted (from (seed, e, c)): `ChunkOrder`;
- the epoch's sequence is the chunks' windows in that order; it is cut into P equal lane
  slices of S·g windows (g = G/P rows per lane, S = steps in the epoch), each started (and
  wrapped around) partway into a chunk, lane p at fraction (p·0.618...) mod 1 of it, so the
  lanes cross chunk boundaries at evenly spread steps: `Layout`;
- row p·g + i of step s is window (s·g + i + rho_p) mod (S·g) of lane p's slice.
"""

from __future__ import annotations

import numpy as np

from data_pipeline.chunks import ChunkTable
from data_pipeline.windows import window_count


class Layout:
    """One epoch's order: the chunks' permutation, where each starts in the epoch's window
    sequence, the steps, and each lane's slice and rotation."""

    def __init__(
        self,
        table: ChunkTable,
        seq_len: int,
        global_batch: int,
        lanes: int,
        seed: int,
        epoch: int,
        shuffle: bool,
        stride: int | None = None,
    ):
        rng = np.random.default_rng([seed, epoch])
        self.perm = rng.permutation(len(table)) if shuffle else np.arange(len(table))
        self.offset = int(rng.integers(seq_len)) if shuffle else 0
        stride = stride or seq_len
        if stride > seq_len:  # packed rows: each window is a row, from the chunk's start
            self.offset = 0
        self.windows = window_count(table.tokens[self.perm] - self.offset, seq_len, stride)
        self.starts = np.concatenate([[0], np.cumsum(self.windows)])
        self.steps = int(self.starts[-1]) // global_batch
        self.per_lane = global_batch // lanes
        self.length = self.steps * self.per_lane  # windows in each lane's slice
        # Each lane starts partway into a chunk, lane p at fraction (p·0.618...) mod 1 of it, so the
        # lanes cross chunk boundaries at evenly spread steps and together hold about half a
        # chunk each (all starting at a boundary, they would hold whole chunks at once).
        self.rho = np.zeros(lanes, dtype=np.int64)
        if shuffle and self.length:
            base = np.arange(lanes, dtype=np.int64) * self.length
            first = np.minimum(np.searchsorted(self.starts, base), len(self.windows) - 1)
            fraction = (np.arange(lanes) * 0.6180339887498949) % 1.0
            start = self.starts[first] + (fraction * self.windows[first]).astype(np.int64)
            self.rho = (start - base) % self.length

    def locate(self, lane: int, v: int) -> tuple[int, int, int]:
        """(x, j, k) of lane `lane`'s v-th window: its place in the epoch's sequence, the
        chunk slot holding it, and its index in that chunk's order."""
        x, j, k, _ = self.locate_rows(np.array([lane]), np.array([v]))
        return int(x[0]), int(j[0]), int(k[0])

    def locate_rows(self, lanes: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, ...]:
        """locate() of many (lane, v) at once, and whether each is past its lane's wrap."""
        turn = lanes * self.length + self.rho[lanes]
        x = lanes * self.length + (v + self.rho[lanes]) % self.length
        j = np.searchsorted(self.starts, x, side="right") - 1
        return x, j, x - self.starts[j], x < turn

    def run_end(self, lane: int, x: int) -> int:
        """Where the lane's run of consecutive positions through x ends (its slice's end, or
        its rotation point after wrapping)."""
        turn = lane * self.length + int(self.rho[lane])
        return (lane + 1) * self.length if x >= turn else turn


class ChunkOrder:
    """The order of one chunk's windows in an epoch: pieces of `piece` consecutive windows,
    permuted, and the windows of each permuted (from (seed, epoch, chunk))."""

    def __init__(self, n: int, piece: int, seed: int, epoch: int, chunk: int, shuffle: bool):
        self.n, self.piece, self.key, self.shuffle = n, piece, (seed, epoch, chunk), shuffle
        count = -(-n // piece)
        sizes = np.full(count, piece, dtype=np.int64)
        sizes[-1] = n - piece * (count - 1)
        self.sigma = np.random.default_rng([seed, epoch, chunk, 2]).permutation(count) if shuffle else np.arange(count)
        self.sizes = sizes[self.sigma]
        self.starts = np.concatenate([[0], np.cumsum(self.sizes)])

    def slot(self, k: int) -> tuple[int, int]:
        """(piece slot q, index i inside it) of the chunk's k-th window in this order."""
        q = int(np.searchsorted(self.starts, k, side="right")) - 1
        return q, k - int(self.starts[q])

    def tau(self, q: int) -> np.ndarray:
        size = int(self.sizes[q])
        if not self.shuffle:
            return np.arange(size)
        return np.random.default_rng([*self.key, 3, int(self.sigma[q])]).permutation(size)
