"""Attention modules for convolutional networks and the registry that builds them by name.

    >>> from attn_flax import attention
    >>> cbam = attention.create('cbam', reduction=16)
    >>> variables = cbam.init(rng, x, train=False)            # x: [N, H, W, C]
    >>> y = cbam.apply(variables, x, train=False)               # same shape as x

Registered: ``'se'`` (SENet), ``'eca'`` (ECA-Net), ``'cbam'`` (CBAM) go inside every residual block;
``'bam'`` (BAM) goes once at each stage boundary. A network takes a name, a module class or a
``functools.partial`` of one (:func:`factory`).
"""
from attn_flax.attention.bam import BAM
from attn_flax.attention.cbam import CBAM, ChannelGate, SpatialGate
from attn_flax.attention.eca import ECA, adaptive_kernel_size
from attn_flax.attention.registry import (
    AttentionFactory,
    AttentionSpec,
    Placement,
    available,
    create,
    factory,
    options,
    placement,
    register,
)
from attn_flax.attention.se import SE

register("se", SE, placement="block")
register("eca", ECA, placement="block")
register("cbam", CBAM, placement="block")
register("bam", BAM, placement="stage")

__all__ = [
    "BAM", "CBAM", "ECA", "SE", "ChannelGate", "SpatialGate", "AttentionFactory", "AttentionSpec", "Placement",
    "adaptive_kernel_size", "available", "create", "factory", "options", "placement", "register",
]
