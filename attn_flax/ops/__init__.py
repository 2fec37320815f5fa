"""The floor every layer builds on: operations with faster gradients on CPU than XLA's defaults (chosen per
platform at lowering time), and the initialisers and reductions shared by the attention modules and the networks.

    >>> from attn_flax import ops
    >>> conv = ops.Conv(64, (3, 3), padding=1)           # same parameters as nn.Conv(64, (3, 3), padding=1)
    >>> with ops.default_impl('xla'): ...                 # force XLA's native gradients in this scope
    >>> y = ops.max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)))  # nn.max_pool, fused gradient on CPU
    >>> ops.retain_freed_memory()                         # at program start: no page faults per CPU step
    >>> bn = ops.BatchNorm(momentum=0.9, group_size=64)   # PyTorch's running variance, statistics per 64 examples
    >>> from attn_flax.ops import initializers, reductions  # the official code's inits; float32-accumulated pools
"""
from attn_flax.ops.batch_norm import BatchNorm
from attn_flax.ops.conv import IMPLS, Conv, conv2d, default_impl
from attn_flax.ops.dtypes import accumulation_dtype
from attn_flax.ops.host_memory import retain_freed_memory
from attn_flax.ops.pool import max_pool

__all__ = ["IMPLS", "BatchNorm", "Conv", "accumulation_dtype", "conv2d", "default_impl", "max_pool",
           "retain_freed_memory"]
