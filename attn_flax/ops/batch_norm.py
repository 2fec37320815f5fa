"""BatchNorm as PyTorch trains it, with statistics over groups of examples, and Flax's variable names.

In training mode each group of ``group_size`` consecutive examples is normalised with its own statistics over
(examples, spatial positions), as ``nn.DataParallel`` or unsynchronised per-device BatchNorm compute them
(the official CBAM/BAM ImageNet runs: batch 256 on 4 GPUs, 64 examples per statistic); ``group_size=None`` takes
the whole batch, which under ``jax.jit`` with a sharded batch is the global batch. With n values per statistic,

    y          = scale * (x - mean_g) / sqrt(var_g + eps) + bias,    var_g the biased variance of group g
    running    = momentum * running + (1 - momentum) * batch
    batch_mean = mean over groups of mean_g,   batch_var = mean over groups of var_g * n / (n - 1)

so the running variance is updated with the unbiased batch variance, as ``torch.nn.BatchNorm*d`` does (Flax's
``nn.BatchNorm`` uses the biased one, a factor (n - 1) / n smaller: 3/4 for BAM's channel-gate BatchNorm1d
at batch 4). Where groups are used their statistics are averaged, as per-device BatchNorm with averaged statistics
gives (PyTorch's DataParallel keeps replica 0's instead). Parameters ``scale``/``bias`` and statistics
``batch_stats/mean``/``var`` are named as Flax's, so checkpoints and converted weights load unchanged.
"""
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from flax import linen as nn

from attn_flax.ops.dtypes import accumulation_dtype

Initializer = Callable[..., jax.Array]


def group_statistics(x: jax.Array, group_size: Optional[int]) -> tuple[jax.Array, jax.Array, int]:
    """Per-group mean and biased variance over all axes but the last, [G, C] each, and the count per statistic.

    ``x`` is [B, ..., C]; ``group_size`` must divide B (None: one group of the whole batch).
    """
    batch = x.shape[0]
    size = batch if group_size is None else group_size
    if size < 1 or batch % size:
        raise ValueError(f"bn_group_size {group_size} must divide the batch of {batch} examples that reaches a "
                         "BatchNorm (per micro-batch with grad_accum_steps); choose a divisor or None")
    grouped = x.reshape((batch // size, size) + x.shape[1:]).astype(accumulation_dtype(x.dtype))
    axes = tuple(range(1, grouped.ndim - 1))
    mean = jnp.mean(grouped, axis=axes)
    var = jnp.mean(jnp.square(grouped - jnp.expand_dims(mean, axes)), axis=axes)
    count = grouped.size // (grouped.shape[0] * grouped.shape[-1])
    return mean, var, count


class BatchNorm(nn.Module):
    """``nn.BatchNorm`` over the last axis with PyTorch's running-variance update and per-group statistics.

    Attributes:
      use_running_average: normalise with the stored statistics (evaluation) instead of the batch's.
      momentum: Flax convention, ``running = momentum * running + (1 - momentum) * batch`` (PyTorch's 0.1 is 0.9).
      epsilon: added to the variance.
      group_size: examples per statistic in training (None: the whole batch).
      unbiased_running_var: update the running variance with the unbiased batch variance (PyTorch); False gives
        Flax's biased update.
      dtype: output dtype (None: the input's, promoted with the parameters'); statistics are computed in at least
        float32. param_dtype, scale_init, bias_init: as ``nn.BatchNorm``.
    """

    use_running_average: Optional[bool] = None
    momentum: float = 0.99
    epsilon: float = 1e-5
    group_size: Optional[int] = None
    unbiased_running_var: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    scale_init: Initializer = nn.initializers.ones_init()
    bias_init: Initializer = nn.initializers.zeros_init()

    @nn.compact
    def __call__(self, x: jax.Array, use_running_average: Optional[bool] = None) -> jax.Array:
        use_running_average = nn.merge_param("use_running_average", self.use_running_average, use_running_average)
        features = x.shape[-1]
        stat_dtype = accumulation_dtype(self.param_dtype)
        running_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((features,), stat_dtype))
        running_var = self.variable("batch_stats", "var", lambda: jnp.ones((features,), stat_dtype))
        scale = self.param("scale", self.scale_init, (features,), self.param_dtype) if self.use_scale else None
        bias = self.param("bias", self.bias_init, (features,), self.param_dtype) if self.use_bias else None

        if use_running_average:
            mean, var = running_mean.value[None], running_var.value[None]
            groups = 1
        else:
            group = None if self.is_initializing() else self.group_size
            mean, var, count = group_statistics(x, group)
            groups = mean.shape[0]
            if not self.is_initializing():
                correction = count / (count - 1) if self.unbiased_running_var and count > 1 else 1.0
                m = self.momentum
                running_mean.value = m * running_mean.value + (1 - m) * jnp.mean(mean, axis=0)
                running_var.value = m * running_var.value + (1 - m) * jnp.mean(var, axis=0) * correction

        wide = accumulation_dtype(x.dtype, self.param_dtype)
        stat_shape = (groups, 1) + (1,) * (x.ndim - 2) + (features,)
        multiplier = jax.lax.rsqrt(var.astype(wide) + self.epsilon)
        if scale is not None:
            multiplier = multiplier * scale.astype(wide)
        grouped = x.reshape((groups, x.shape[0] // groups) + x.shape[1:])
        y = (grouped - mean.astype(wide).reshape(stat_shape)) * multiplier.reshape(stat_shape)
        if bias is not None:
            y = y + bias.astype(wide)
        out_dtype = self.dtype or jnp.result_type(x.dtype, self.param_dtype)
        return y.reshape(x.shape).astype(out_dtype)
