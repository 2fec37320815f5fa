"""Stopping a diverged run before it is checkpointed: a non-finite loss, parameter or BatchNorm statistic.

The loop checks the training loss at every logging and checkpoint step and the whole state before each save, so
no checkpoint ever holds a NaN; the error is one line naming the first non-finite leaf, the checkpoint that
survives, and what to look at (the learning rate only when it is not already tiny).
"""
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from attn_flax.training.state import TrainState

SMALL_LEARNING_RATE = 1e-4
"""Below this learning rate a divergence is not the learning rate's doing."""


class NonFiniteLossError(FloatingPointError):
    """A training loss, parameter or BatchNorm statistic became NaN or infinite."""


def all_finite(state: TrainState) -> jax.Array:
    """True when every parameter and BatchNorm statistic is finite (one device-side reduction)."""
    leaves = jax.tree.leaves((state.params, state.batch_stats))
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def first_non_finite_leaf(state: TrainState) -> Optional[str]:
    """The path of the first parameter or BatchNorm statistic with a NaN or infinity, e.g.
    ``params/stage1_block0/attention/ChannelGate/fc1/kernel``; None when all are finite."""
    for path, leaf in jax.tree_util.tree_leaves_with_path({"params": state.params, "batch_stats": state.batch_stats}):
        if not np.all(np.isfinite(np.asarray(jax.device_get(leaf), np.float32))):
            return "/".join(str(getattr(key, "key", key)) for key in path)
    return None


def non_finite_error(what: str, step: int, state: TrainState, learning_rate: float,
                     last_checkpoint: Optional[int]) -> NonFiniteLossError:
    """One line: what became non-finite and where, which checkpoint survives, and what to look at."""
    leaf = first_non_finite_leaf(state)
    where = f"first non-finite leaf {leaf}" if leaf else "every parameter and BatchNorm statistic is still finite"
    kept = (f"the checkpoint at step {last_checkpoint} is kept and the same command resumes from it"
            if last_checkpoint is not None else "no checkpoint had been saved yet")
    advice = (f"lower the learning rate ({learning_rate:.3g} at that step) or check the data"
              if learning_rate >= SMALL_LEARNING_RATE else
              f"the learning rate was only {learning_rate:.3g}, so check the data and the model's numerics")
    return NonFiniteLossError(f"{what} at step {step} ({where}); {kept}; {advice}")
