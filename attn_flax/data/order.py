"""Which example each process reads at each step: pure functions of (seed, step, process).

Training reads an infinite stream made of the epochs' orders laid end to end: epoch e is a
permutation of the example indices that depends only on (seed, e), and global step s takes stream
positions [s*B, (s+1)*B). Epoch boundaries roll over inside a batch, so no example is dropped and
every epoch shows each example exactly once. Process p of P takes the contiguous slice
[p*B/P, (p+1)*B/P) of every global batch, so the union over processes is the single-process batch,
and a stream started at step k is the uninterrupted stream from step k on. Evaluation uses the same
layout over the positions 0..ceil(N/B)*B - 1; positions past N are padding, masked out.
"""
from __future__ import annotations

import numpy as np


def local_batch_size(global_batch_size: int, process_count: int) -> int:
    """Each process's share of the global batch; a ValueError when it does not divide evenly."""
    if global_batch_size <= 0 or global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size={global_batch_size} must be a positive multiple of process_count={process_count}"
        )
    return global_batch_size // process_count


def batch_positions(step: int, global_batch_size: int, process_index: int, process_count: int) -> np.ndarray:
    """Stream positions read by one process at one global step."""
    local = local_batch_size(global_batch_size, process_count)
    start = step * global_batch_size + process_index * local
    return np.arange(start, start + local, dtype=np.int64)


def epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
    """The order of epoch `epoch`: a permutation of range(num_examples), a pure function of (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


class TrainOrder:
    """Maps training stream positions to example indices, caching the last two epochs' permutations."""

    def __init__(self, seed: int, num_examples: int):
        if num_examples <= 0:
            raise ValueError("the training split is empty")
        self.seed = seed
        self.num_examples = num_examples
        self._permutations: dict[int, np.ndarray] = {}

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._permutations:
            self._permutations = {e: p for e, p in self._permutations.items() if e >= epoch - 1}
            self._permutations[epoch] = epoch_permutation(self.seed, epoch, self.num_examples)
        return self._permutations[epoch]

    def indices(self, positions: np.ndarray) -> np.ndarray:
        """Example indices at the given stream positions."""
        epochs, offsets = np.divmod(positions, self.num_examples)
        out = np.empty_like(positions)
        for epoch in np.unique(epochs):
            selected = epochs == epoch
            out[selected] = self._permutation(int(epoch))[offsets[selected]]
        return out


def num_eval_batches_for(num_examples: int, global_batch_size: int) -> int:
    """Number of (padded) evaluation batches every process runs."""
    return -(-num_examples // global_batch_size)


def eval_positions(batch: int, global_batch_size: int, process_index: int, process_count: int,
                   num_examples: int) -> tuple[np.ndarray, np.ndarray]:
    """Example indices and validity mask of one process's share of evaluation batch `batch`.

    Padding positions repeat the last example (so every slot holds a decodable image) with mask False.
    """
    positions = batch_positions(batch, global_batch_size, process_index, process_count)
    valid = positions < num_examples
    return np.minimum(positions, num_examples - 1), valid
