"""Learning-rate schedules and the SGD optimiser of the papers, built from optax pieces.

The official recipe: SGD with momentum 0.9, learning rate 0.1 per 256 examples, weight decay 1e-4 on every
parameter (added to the gradient before momentum, as PyTorch's SGD does), decayed x0.1 every 30 epochs.
"""
from typing import Any

import jax
import ml_collections
import optax

from attn_flax.training.durations import epochs_to_steps

SCHEDULES = ("step", "cosine", "constant")


def peak_learning_rate(config: ml_collections.ConfigDict) -> float:
    """``base_learning_rate`` is per 256 examples; the peak scales linearly with the global batch."""
    return config.base_learning_rate * config.batch_size / 256


def learning_rate_schedule(config: ml_collections.ConfigDict, num_train_steps: int,
                           steps_per_epoch: float) -> optax.Schedule:
    """Linear warmup over ``warmup_epochs``, then ``schedule``: 'step' (x``decay_factor`` at each of
    ``decay_epochs``), 'cosine' (to zero at the last step) or 'constant'; epochs become steps by
    :func:`attn_flax.training.durations.epochs_to_steps`."""
    peak = peak_learning_rate(config)
    warmup_steps = epochs_to_steps(config.warmup_epochs, steps_per_epoch)
    if config.schedule == "step":
        boundaries = {epochs_to_steps(e, steps_per_epoch) - warmup_steps: config.decay_factor
                      for e in config.decay_epochs}
        main = optax.piecewise_constant_schedule(peak, {b: f for b, f in boundaries.items() if b > 0})
    elif config.schedule == "cosine":
        main = optax.cosine_decay_schedule(peak, max(num_train_steps - warmup_steps, 1))
    elif config.schedule == "constant":
        main = optax.constant_schedule(peak)
    else:
        raise ValueError(f"unknown schedule {config.schedule!r}; valid: {', '.join(SCHEDULES)}")
    if warmup_steps <= 0:
        return main
    warmup = optax.linear_schedule(0.0, peak, warmup_steps)
    return optax.join_schedules([warmup, main], [warmup_steps])


def decay_mask(params: Any, exclude_norm_and_bias: bool) -> Any:
    """True where weight decay applies: everywhere (official code), or only on conv/dense kernels."""
    if not exclude_norm_and_bias:
        return jax.tree.map(lambda _: True, params)
    return jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key == "kernel", params)


def create_optimizer(config: ml_collections.ConfigDict, schedule: optax.Schedule) -> optax.GradientTransformation:
    """PyTorch-equivalent SGD: g + wd * p (masked), then momentum (optionally Nesterov), then -lr."""
    return optax.chain(
        optax.add_decayed_weights(config.weight_decay,
                                  mask=lambda p: decay_mask(p, config.weight_decay_exclude_norm_and_bias)),
        optax.sgd(schedule, momentum=config.momentum or None, nesterov=config.nesterov),
    )
