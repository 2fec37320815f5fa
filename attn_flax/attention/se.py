"""SE: Squeeze-and-Excitation (Hu, Shen, Sun; CVPR 2018), the channel-attention baseline of both papers.

    F' = sigmoid(W2 ReLU(W1 AvgPool(F) + b1) + b2) * F        W1: C -> C/r, W2: C/r -> C, r = 16

Initialisation as the official ResNet code applies to every module: weights PyTorch-default uniform, biases 0.
The gate is sown into ``intermediates`` as ``channel_attention`` [N, 1, 1, C].
"""
from typing import Any

import jax.numpy as jnp
from flax import linen as nn

from attn_flax.attention.common import hidden_width
from attn_flax.ops import initializers, reductions


class SE(nn.Module):
    """Squeeze-and-Excitation on an NHWC map; returns the rescaled map, same shape.

    Attributes:
      reduction: reduction ratio r of the bottleneck MLP (paper: 16).
    """

    reduction: int = 16
    dtype: Any = None
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        if self.reduction < 1:
            raise ValueError(f"SE reduction must be >= 1, got {self.reduction}")
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        del train
        channels = x.shape[-1]
        dense = lambda features, name: nn.Dense(  # noqa: E731
            features, kernel_init=initializers.torch_default_uniform, bias_init=initializers.zeros,
            dtype=self.dtype, param_dtype=self.param_dtype, name=name)
        pooled = reductions.mean(x, (1, 2))
        hidden = nn.relu(dense(hidden_width(channels, self.reduction), "fc1")(pooled))
        gate = nn.sigmoid(dense(channels, "fc2")(hidden))[:, None, None, :]
        self.sow("intermediates", "channel_attention", gate)
        return x * gate
