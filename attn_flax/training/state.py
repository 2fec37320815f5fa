"""The training state: everything a run needs to continue exactly, as one pytree of arrays.

The model and optimiser are not in it (they are code, rebuilt from the config), so the state checkpoints as
plain arrays. ``rng`` is the run's training key as raw ``uint32`` key data (typed keys have had Orbax restore
bugs); a train step draws from ``fold_in(rng, step)``, so randomness is a pure function of the key and the step
and a resumed run draws exactly what an uninterrupted one would. The ResNets draw nothing yet (no dropout or
stochastic depth); the key is there so that a model that does needs no change to checkpoints or resumption.
"""
from typing import Any, Optional

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
    rng: jax.Array


TRAIN_RNG_STREAM = 1  # the training key is fold_in(init key, 1): independent of the initialisation draws


def step_rng(state: TrainState) -> jax.Array:
    """The typed PRNG key of the step ``state.step`` is about to take."""
    return jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)


def init_train_state(model: nn.Module, tx: optax.GradientTransformation, rng: jax.Array,
                     image_shape: tuple[int, ...]) -> TrainState:
    """Initialises parameters on a dummy batch of one image of ``image_shape`` (H, W, C); ``rng`` is a typed key."""
    variables = model.init(rng, jnp.zeros((1, *image_shape), jnp.float32), train=False)
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params),
                      rng=jax.random.key_data(jax.random.fold_in(rng, TRAIN_RNG_STREAM)))


def abstract_state(model: nn.Module, image_shape: tuple[int, ...], sharding: jax.sharding.Sharding,
                   tx: Optional[optax.GradientTransformation] = None) -> Any:
    """The shapes of what a checkpoint restores onto ``sharding``, as ``jax.ShapeDtypeStruct`` s, computed without
    running anything: the whole :class:`TrainState` for training (with ``tx``), or only the model's variables
    ``{'params', 'batch_stats'}`` for scoring (without: no optimiser is needed)."""
    if tx is None:
        shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, *image_shape), jnp.float32),
                                                   train=False))
        shapes = {"params": shapes["params"], "batch_stats": shapes.get("batch_stats", {})}
    else:
        shapes = jax.eval_shape(lambda: init_train_state(model, tx, jax.random.key(0), image_shape))
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes)
