"""Global poolings and reductions over the axes of an NHWC map, shared by the attention modules and the networks.

Reductions run in at least float32 (:func:`accumulation_dtype`), since a bfloat16 sum over thousands of positions
loses most of its mantissa, and in float64 for a float64 input; the result is cast back to the input dtype.

:func:`reduce_max` is ``jnp.max`` whose gradient goes to the first maximum of each window (row-major), as
``torch.max(dim)`` and PyTorch's max pooling route it; ``jnp.max`` and ``torch.amax`` share it among exact ties,
which only differs where values tie exactly. The forward pass keeps one int32 index per window and the backward
pass is one elementwise select against it. A rule that compares ``x`` with its maximum again in the backward pass,
and divides by a tie count taken elsewhere, is not safe under XLA: XLA recomputes ``x`` (the BatchNorm before the
pooling) inside each fusion, with other rounding in a reduction fusion than in an elementwise one, so the mask and
the count disagree and the gradient becomes g / 0 (ResNet-18 + CBAM at 224x224: 109 non-finite gradient leaves).
"""
import functools
from collections.abc import Sequence
from typing import Union

import jax
import jax.numpy as jnp
from jax.scipy.special import logsumexp

from attn_flax.ops.dtypes import accumulation_dtype

POOL_TYPES = ("avg", "max", "lp", "lse")


def mean(x: jnp.ndarray, axis: Union[int, Sequence[int]], keepdims: bool = False) -> jnp.ndarray:
    """``jnp.mean`` accumulated in :func:`accumulation_dtype`, returned in ``x.dtype``."""
    return jnp.mean(x.astype(accumulation_dtype(x.dtype)), axis=axis, keepdims=keepdims).astype(x.dtype)


def global_pool(x: jnp.ndarray, pool_type: str) -> jnp.ndarray:
    """Pools ``x`` [N, H, W, C] over H and W to [N, C].

    ``avg``: mean; ``max``: maximum; ``lp``: the L2 norm sqrt(sum x^2) (PyTorch ``lp_pool2d`` with p=2 over the
    whole map); ``lse``: log-sum-exp. These are the official CBAM code's four pool types.
    """
    wide = x.astype(accumulation_dtype(x.dtype))
    if pool_type == "avg":
        pooled = jnp.mean(wide, axis=(1, 2))
    elif pool_type == "max":
        pooled = reduce_max(x, (1, 2))
    elif pool_type == "lp":
        pooled = jnp.sqrt(jnp.sum(jnp.square(wide), axis=(1, 2)))
    elif pool_type == "lse":
        pooled = logsumexp(wide, axis=(1, 2))
    else:
        raise ValueError(f"unknown pool type {pool_type!r}; valid: {', '.join(POOL_TYPES)}")
    return pooled.astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def reduce_max(x: jnp.ndarray, axis: Union[int, Sequence[int]], keepdims: bool = False) -> jnp.ndarray:
    """``jnp.max(x, axis, keepdims=keepdims)`` whose gradient goes to the first maximum of each window."""
    return jnp.max(x, axis=axis, keepdims=keepdims)


def _axes(axis: Union[int, Sequence[int]], ndim: int) -> tuple[int, ...]:
    return tuple(sorted(a % ndim for a in ((axis,) if isinstance(axis, int) else axis)))


def _window_positions(shape: Sequence[int], axes: tuple[int, ...]) -> tuple[jnp.ndarray, int]:
    """Each element's row-major position within its reduction window (int32, broadcastable to ``shape``), and
    the window size."""
    positions, size = jnp.zeros((), jnp.int32), 1
    for a in reversed(axes):
        iota_shape = tuple(d if i == a else 1 for i, d in enumerate(shape))
        positions = positions + jax.lax.broadcasted_iota(jnp.int32, iota_shape, a) * size
        size *= shape[a]
    return positions, size


def first_max_index(x: jnp.ndarray, m: jnp.ndarray, axes: tuple[int, ...]) -> jnp.ndarray:
    """The position (as :func:`_window_positions` numbers it) of the first element of each window equal to its
    maximum ``m`` (reduced axes kept), falling back to ``argmax`` where no element equals ``m``.

    The fallback is what makes the gradient safe: XLA may recompute ``x`` (say the BatchNorm before the pooling)
    inside this fusion with other rounding than where it computed ``m``, and then no element equals ``m``. An
    index, unlike a mask and a count derived in two places, always names exactly one element.
    """
    positions, size = _window_positions(x.shape, axes)
    first = jnp.min(jnp.where(x == m, positions, size), axis=axes, keepdims=True)

    def argmax(_):
        kept = tuple(a for a in range(x.ndim) if a not in axes)
        flat = jnp.transpose(x, kept + axes).reshape(tuple(x.shape[a] for a in kept) + (size,))
        return jax.lax.expand_dims(jnp.argmax(flat, axis=-1).astype(jnp.int32), axes)

    return jax.lax.cond(jnp.all(first < size), lambda _: first, argmax, None)


def _reduce_max_fwd(x, axis, keepdims):
    axes = _axes(axis, x.ndim)
    m = jnp.max(x, axis=axes, keepdims=True)
    index = first_max_index(x, m, axes)
    window = jnp.zeros(tuple(d if a in axes else 0 for a, d in enumerate(x.shape)), x.dtype)  # shape, dtype only
    return (m if keepdims else jnp.squeeze(m, axes)), (index, window)


def _reduce_max_bwd(axis, keepdims, residuals, g):
    index, window = residuals
    axes = _axes(axis, index.ndim)
    shape = tuple(window.shape[a] if a in axes else d for a, d in enumerate(index.shape))
    g = g if keepdims else jnp.expand_dims(g, axes)
    positions, _ = _window_positions(shape, axes)
    return (jnp.where(positions == index, g, jnp.zeros((), g.dtype)).astype(window.dtype),)


reduce_max.defvjp(_reduce_max_fwd, _reduce_max_bwd)
