"""Global poolings over the spatial axes of an NHWC map, as the CBAM channel gate uses them.

Reductions run in float32 whatever the activation dtype, since a bfloat16 sum over thousands of positions
loses most of its mantissa; the result is cast back to the input dtype.

:func:`reduce_max` is ``jnp.max`` with the same gradient (the cotangent shared equally among tied maxima) in fewer
full-size passes: JAX's rule recomputes the maximum into a full-size broadcast and materialises the tie mask in
float32; this one keeps the maximum from the forward pass and counts ties in int32. In a CBAM module's forward
and backward at 128x32x32x64 on 2 cores the two max poolings' gradient fusions take 19 ms instead of 44 ms.
"""
import functools
from collections.abc import Sequence
from typing import Union

import jax
import jax.numpy as jnp
from jax.scipy.special import logsumexp

POOL_TYPES = ("avg", "max", "lp", "lse")


def global_pool(x: jnp.ndarray, pool_type: str) -> jnp.ndarray:
    """Pools ``x`` [N, H, W, C] over H and W to [N, C].

    ``avg``: mean; ``max``: maximum; ``lp``: the L2 norm sqrt(sum x^2) (PyTorch ``lp_pool2d`` with p=2 over the
    whole map); ``lse``: log-sum-exp. These are the official CBAM code's four pool types.
    """
    x32 = x.astype(jnp.float32)
    if pool_type == "avg":
        pooled = jnp.mean(x32, axis=(1, 2))
    elif pool_type == "max":
        pooled = reduce_max(x32, (1, 2))
    elif pool_type == "lp":
        pooled = jnp.sqrt(jnp.sum(jnp.square(x32), axis=(1, 2)))
    elif pool_type == "lse":
        pooled = logsumexp(x32, axis=(1, 2))
    else:
        raise ValueError(f"unknown pool type {pool_type!r}; valid: {', '.join(POOL_TYPES)}")
    return pooled.astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def reduce_max(x: jnp.ndarray, axis: Union[int, Sequence[int]], keepdims: bool = False) -> jnp.ndarray:
    """``jnp.max(x, axis, keepdims=keepdims)`` whose gradient is jnp.max's, computed in two fused passes."""
    return jnp.max(x, axis=axis, keepdims=keepdims)


def _reduce_max_fwd(x, axis, keepdims):
    m = jnp.max(x, axis=axis, keepdims=True)
    return (m if keepdims else jnp.squeeze(m, axis)), (x, m)


def _reduce_max_bwd(axis, keepdims, residuals, g):
    x, m = residuals
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    g = g if keepdims else jnp.expand_dims(g, axes)
    tied = x == m
    counts = jnp.sum(tied.astype(jnp.int32), axis=axes, keepdims=True).astype(g.dtype)
    return (jnp.where(tied, g / counts, jnp.zeros((), g.dtype)).astype(x.dtype),)


reduce_max.defvjp(_reduce_max_fwd, _reduce_max_bwd)
