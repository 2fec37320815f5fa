"""BAM: Bottleneck Attention Module (Park, Woo, Lee, Kweon; BMVC 2018).

One 3D attention map from two branches computed on the same input (paper Eqs. 1-4):

    F' = F + F * M(F) = F * (1 + M(F))
    M(F)   = sigmoid(M_c(F) + M_s(F))                                   combine='sum' (paper, default)
    M(F)   = sigmoid(M_c(F) * M_s(F))                                   combine='product' (official code)
    M_c(F) = BN(MLP(AvgPool(F))) = W1(ReLU(BN(W0 AvgPool(F) + b0))) + b1     [N, 1, 1, C]
    M_s(F) = f3_1x1(f2_3x3(f1_3x3(f0_1x1(F))))                          [N, H, W, 1]

where f0 reduces C to C/r, f1 .. fn are 3x3 convs with dilation d (each conv -> BN -> ReLU) and the last 1x1
conv maps to one channel with no BN. The paper's ablation prefers the sum, which is the default; the released
weights were trained with the product, which ``attn_flax.convert`` selects when it loads them.

The official code has two bugs that are not reproduced: its channel gate references an undefined
``gate_activation`` (a NameError at build time), and it average-pools with a kernel of H only, which is wrong on
non-square maps; here the pooling is global over H and W.

Initialisation as the official ResNet's name-based init: convs Kaiming-normal fan-out, BN scale 1, every bias 0,
MLP weights PyTorch-default uniform. BatchNorm momentum 0.9 in Flax terms (PyTorch's default 0.1), eps 1e-5.
The map M is sown into ``intermediates`` as ``attention`` and its channel mean as ``spatial_attention``.
"""
from typing import Any, Callable, Optional

import jax.numpy as jnp
from flax import linen as nn

from attn_flax import ops
from attn_flax.attention.common import hidden_width
from attn_flax.ops import initializers, reductions

COMBINES = ("sum", "product")


class BAMChannelGate(nn.Module):
    """M_c: global average pool -> FC -> BN -> ReLU -> FC. Returns logits [N, 1, 1, C] (no sigmoid)."""

    reduction: int = 16
    bn_group_size: Optional[int] = None
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        channels = x.shape[-1]
        dense = lambda features, name: nn.Dense(  # noqa: E731
            features, kernel_init=initializers.torch_default_uniform, bias_init=initializers.zeros,
            dtype=self.dtype, param_dtype=self.param_dtype, name=name)
        pooled = reductions.mean(x, (1, 2))
        hidden = dense(hidden_width(channels, self.reduction), "fc_0")(pooled)
        hidden = nn.relu(_batch_norm(self, "bn_0", train)(hidden))
        return dense(channels, "fc_final")(hidden)[:, None, None, :]


class BAMSpatialGate(nn.Module):
    """M_s: 1x1 reduce, ``num_dilated_convs`` dilated 3x3 convs, 1x1 to one map. Returns logits [N, H, W, 1]."""

    reduction: int = 16
    dilation: int = 4
    num_dilated_convs: int = 2
    bn_group_size: Optional[int] = None
    dtype: Any = None
    param_dtype: Any = jnp.float32
    conv: Callable[..., nn.Module] = ops.Conv

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        width = hidden_width(x.shape[-1], self.reduction)
        conv = lambda features, size, dilation, name: self.conv(  # noqa: E731
            features, (size, size), padding=dilation * (size // 2), kernel_dilation=dilation,
            kernel_init=initializers.conv_kaiming_fan_out, bias_init=initializers.zeros,
            dtype=self.dtype, param_dtype=self.param_dtype, name=name)
        h = conv(width, 1, 1, "conv_reduce")(x)
        h = nn.relu(_batch_norm(self, "bn_reduce", train)(h))
        for i in range(self.num_dilated_convs):
            h = conv(width, 3, self.dilation, f"conv_dilated_{i}")(h)
            h = nn.relu(_batch_norm(self, f"bn_dilated_{i}", train)(h))
        return conv(1, 1, 1, "conv_final")(h)


class BAM(nn.Module):
    """BAM on an NHWC map; returns F * (1 + M(F)), same shape. See the module docstring for the equations.

    Attributes:
      reduction: reduction ratio r of both branches (paper: 16).
      dilation: dilation d of the spatial branch's 3x3 convs (paper: 4).
      num_dilated_convs: number of dilated 3x3 convs in the spatial branch (paper: 2).
      combine: 'sum' (paper, default) or 'product' (official code; needed for its released weights).
      bn_group_size: examples per BatchNorm statistic in training (None: the whole batch); see ``ops.BatchNorm``.
      conv: the spatial branch's conv module (``nn.Conv``'s signature); a network passes its own.
    """

    reduction: int = 16
    dilation: int = 4
    num_dilated_convs: int = 2
    combine: str = "sum"
    bn_group_size: Optional[int] = None
    dtype: Any = None
    param_dtype: Any = jnp.float32
    conv: Callable[..., nn.Module] = ops.Conv

    def __post_init__(self):
        if self.combine not in COMBINES:
            raise ValueError(f"BAM combine {self.combine!r} is not one of {', '.join(COMBINES)}")
        if self.reduction < 1 or self.dilation < 1 or self.num_dilated_convs < 0:
            raise ValueError("BAM needs reduction >= 1, dilation >= 1 and num_dilated_convs >= 0, got "
                             f"{self.reduction}, {self.dilation}, {self.num_dilated_convs}")
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        channel = BAMChannelGate(self.reduction, self.bn_group_size, dtype=self.dtype,
                                 param_dtype=self.param_dtype, name="channel")(x, train=train)
        spatial = BAMSpatialGate(self.reduction, self.dilation, self.num_dilated_convs, self.bn_group_size,
                                 dtype=self.dtype, param_dtype=self.param_dtype, conv=self.conv,
                                 name="spatial")(x, train=train)
        logits = channel + spatial if self.combine == "sum" else channel * spatial
        attention = nn.sigmoid(logits)
        self.sow("intermediates", "attention", attention)
        self.sow("intermediates", "spatial_attention", jnp.mean(attention, axis=-1, keepdims=True))
        return x * (1 + attention)


def _batch_norm(module: nn.Module, name: str, train: bool) -> ops.BatchNorm:
    return ops.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                         group_size=module.bn_group_size, dtype=module.dtype, param_dtype=module.param_dtype,
                         name=name, parent=module)
