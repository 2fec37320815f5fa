"""ECA: Efficient Channel Attention (Wang, Wu, Zhu, Li, Zuo, Hu; CVPR 2020).

    F' = sigmoid(conv1d_k(AvgPool(F))) * F      a 1-D conv across the channel axis, no bias

with the kernel size adapted to the channel count (paper Eq. 12, gamma = 2, b = 1):

    k = |log2(C) / gamma + b / gamma|_odd       (truncate, then round up to odd: C=64 -> 3, 256..1024 -> 5, 2048 -> 7)

Initialisation: the conv keeps PyTorch's default uniform init, as in the official ECA code.
The gate is sown into ``intermediates`` as ``channel_attention`` [N, 1, 1, C].
"""
import math
from typing import Any, Callable, Optional

import jax.numpy as jnp
from flax import linen as nn

from attn_flax import ops
from attn_flax.ops import initializers, reductions



def adaptive_kernel_size(channels: int, gamma: int = 2, b: int = 1) -> int:
    """ECA's kernel size rule: int(|log2(C)/gamma + b/gamma|), made odd by adding one when even."""
    t = int(abs(math.log2(channels) / gamma + b / gamma))
    return t if t % 2 else t + 1


class ECA(nn.Module):
    """Efficient Channel Attention on an NHWC map; returns the rescaled map, same shape.

    Attributes:
      kernel_size: the 1-D conv's size; None (default) picks it from the channel count by the paper's rule.
      gamma, b: the constants of that rule (paper: 2 and 1).
      conv: the 1-D conv module (``nn.Conv``'s signature, a kernel of one size on [N, C, 1]); a network passes
        its own.
    """

    kernel_size: Optional[int] = None
    gamma: int = 2
    b: int = 1
    dtype: Any = None
    param_dtype: Any = jnp.float32
    conv: Callable[..., nn.Module] = ops.Conv

    def __post_init__(self):
        if self.kernel_size is not None and (self.kernel_size < 1 or self.kernel_size % 2 == 0):
            raise ValueError(f"ECA kernel_size must be a positive odd number or None, got {self.kernel_size}")
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        del train
        channels = x.shape[-1]
        k = self.kernel_size or adaptive_kernel_size(channels, self.gamma, self.b)
        pooled = reductions.mean(x, (1, 2))
        logits = self.conv(1, (k,), padding=k // 2, use_bias=False,
                           kernel_init=initializers.torch_default_uniform, dtype=self.dtype,
                           param_dtype=self.param_dtype, name="conv")(pooled[:, :, None])
        gate = nn.sigmoid(logits[:, :, 0])[:, None, None, :]
        self.sow("intermediates", "channel_attention", gate)
        return x * gate
