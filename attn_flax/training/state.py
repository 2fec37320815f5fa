"""The training state: everything a run needs to continue exactly, as one pytree of arrays.

The model and optimiser are not in it (they are code, rebuilt from the config), so the state checkpoints as
plain arrays. There is no RNG: the ResNets draw none in training, and initialisation uses ``config.seed``.
"""
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax import linen as nn


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any


def init_train_state(model: nn.Module, tx: optax.GradientTransformation, rng: jax.Array,
                     image_shape: tuple[int, ...]) -> TrainState:
    """Initialises parameters on a dummy batch of one image of ``image_shape`` (H, W, C)."""
    variables = model.init(rng, jnp.zeros((1, *image_shape), jnp.float32), train=False)
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params))
