"""CBAM: Convolutional Block Attention Module (Woo, Park, Lee, Kweon; ECCV 2018).

Channel attention, then spatial attention on the channel-refined map (paper Eq. 1):

    F'  = M_c(F) * F
    F'' = M_s(F') * F'
    M_c(F) = sigmoid(MLP(AvgPool(F)) + MLP(MaxPool(F)))          (Eq. 2, one MLP shared by both poolings)
    M_s(F) = sigmoid(BN(conv7x7([MaxPool_c(F); AvgPool_c(F)])))  (Eq. 3, as the official code computes it)

Differences between the paper and the official code, exposed as options:
- the spatial gate's BatchNorm is in the official code only (``spatial_norm=True`` keeps it);
- the official code stacks the channel poolings as [max, mean] (the paper writes [avg; max]); we follow the
  code so that its weights load unchanged;
- ``pool_types`` adds the code's ``lp`` and ``lse`` poolings; ``spatial=False`` is the code's ``no_spatial``.

``order`` is the paper's arrangement ablation (Sec. 4.1): ``'channel_first'`` (Eq. 1, the default),
``'spatial_first'`` (the two gates swapped) and ``'parallel'``, for which the paper gives no equation: both gates
are computed from the input and applied together, F'' = M_c(F) * M_s(F) * F.

Initialisation as the official code: MLP weights PyTorch-default uniform, biases 0, the 7x7 conv Kaiming-normal
fan-out, and the spatial BN scale 0 so that every spatial gate starts at sigmoid(0) = 0.5.
The gates are sown into the ``intermediates`` collection (``channel_attention`` [N, 1, 1, C] and
``spatial_attention`` [N, H, W, 1]) for visualisation.
"""
from typing import Any, Callable, Optional, Sequence

import jax.numpy as jnp
from flax import linen as nn

from attn_flax import ops
from attn_flax.attention.common import hidden_width
from attn_flax.ops import initializers, reductions

ORDERS = ("channel_first", "spatial_first", "parallel")


class ChannelGate(nn.Module):
    """M_c: pooled descriptors through one shared MLP, summed, sigmoid. Returns the gate [N, 1, 1, C]."""

    reduction: int = 16
    pool_types: Sequence[str] = ("avg", "max")
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        channels = x.shape[-1]
        dense = lambda features, name: nn.Dense(  # noqa: E731
            features, kernel_init=initializers.torch_default_uniform, bias_init=initializers.zeros,
            dtype=self.dtype, param_dtype=self.param_dtype, name=name)
        fc1 = dense(hidden_width(channels, self.reduction), "fc1")
        fc2 = dense(channels, "fc2")
        pooled = jnp.concatenate([reductions.global_pool(x, p) for p in self.pool_types])  # one MLP pass for all
        logits = jnp.sum(fc2(nn.relu(fc1(pooled))).reshape(len(self.pool_types), x.shape[0], channels), axis=0)
        return nn.sigmoid(logits)[:, None, None, :]


class SpatialGate(nn.Module):
    """M_s: [max, mean] over channels, a k x k conv to one map, optional BN, sigmoid. Returns [N, H, W, 1]."""

    kernel_size: int = 7
    norm: bool = True
    bn_group_size: Optional[int] = None
    dtype: Any = None
    param_dtype: Any = jnp.float32
    conv: Callable[..., nn.Module] = ops.Conv

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        pooled = jnp.concatenate(
            [reductions.reduce_max(x, -1, True),
             reductions.mean(x, -1, keepdims=True)], axis=-1)
        logits = self.conv(1, (self.kernel_size, self.kernel_size), padding=self.kernel_size // 2,
                           use_bias=not self.norm, kernel_init=initializers.conv_kaiming_fan_out,
                           bias_init=initializers.zeros, dtype=self.dtype, param_dtype=self.param_dtype,
                           name="conv")(pooled)
        if self.norm:
            logits = ops.BatchNorm(use_running_average=not train, momentum=0.99, epsilon=1e-5,
                                   group_size=self.bn_group_size, scale_init=initializers.zeros,
                                   dtype=self.dtype, param_dtype=self.param_dtype, name="bn")(logits)
        return nn.sigmoid(logits)


class CBAM(nn.Module):
    """CBAM on an NHWC map; returns the refined map, same shape. See the module docstring for the equations.

    Attributes:
      reduction: channel-MLP reduction ratio r (paper: 16).
      kernel_size: spatial-gate conv size (paper: 7, better than 3).
      pool_types: channel-gate poolings, any of 'avg', 'max', 'lp', 'lse' (paper: avg and max).
      order: 'channel_first' (paper), 'spatial_first' or 'parallel' (the paper's arrangement ablation).
      spatial: False gives the channel gate alone (the official ``no_spatial``).
      spatial_norm: BatchNorm after the 7x7 conv (official code: True; the paper does not mention it). Without
        it the conv has a bias, initialised to 0.
      bn_group_size: examples per BatchNorm statistic in training (None: the whole batch); see ``ops.BatchNorm``.
      conv: the spatial gate's conv module (``nn.Conv``'s signature); a network passes its own.
    """

    reduction: int = 16
    kernel_size: int = 7
    pool_types: Sequence[str] = ("avg", "max")
    order: str = "channel_first"
    spatial: bool = True
    spatial_norm: bool = True
    bn_group_size: Optional[int] = None
    dtype: Any = None
    param_dtype: Any = jnp.float32
    conv: Callable[..., nn.Module] = ops.Conv

    def __post_init__(self):
        if self.order not in ORDERS:
            raise ValueError(f"CBAM order {self.order!r} is not one of {', '.join(ORDERS)}")
        unknown = [p for p in self.pool_types if p not in reductions.POOL_TYPES]
        if unknown or not self.pool_types:
            raise ValueError(f"CBAM pool_types {tuple(self.pool_types)!r} must be a non-empty subset of "
                             f"{', '.join(reductions.POOL_TYPES)}")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"CBAM kernel_size must be a positive odd number, got {self.kernel_size}")
        if self.reduction < 1:
            raise ValueError(f"CBAM reduction must be >= 1, got {self.reduction}")
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        channel_gate = ChannelGate(self.reduction, tuple(self.pool_types), dtype=self.dtype,
                                   param_dtype=self.param_dtype, name="ChannelGate")
        spatial_gate = SpatialGate(self.kernel_size, self.spatial_norm, self.bn_group_size, dtype=self.dtype,
                                   param_dtype=self.param_dtype, conv=self.conv, name="SpatialGate")

        def apply_channel(f):
            gate = channel_gate(f)
            self.sow("intermediates", "channel_attention", gate)
            return gate

        def apply_spatial(f):
            gate = spatial_gate(f, train=train)
            self.sow("intermediates", "spatial_attention", gate)
            return gate

        if not self.spatial:
            return x * apply_channel(x)
        if self.order == "channel_first":
            refined = x * apply_channel(x)
            return refined * apply_spatial(refined)
        if self.order == "spatial_first":
            refined = x * apply_spatial(x)
            return refined * apply_channel(refined)
        return x * apply_channel(x) * apply_spatial(x)
