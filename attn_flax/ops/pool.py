"""Max pooling whose gradient runs as one fused elementwise pass on CPU, and a drop-in for ``nn.max_pool``.

JAX differentiates ``lax.reduce_window`` max pooling through XLA's select-and-scatter, which XLA:CPU expands into
index tensors and a variadic reduce-window (the ResNet stem's 3x3/2 pool at 32x32x32x64 on 2 cores: about 30 ms of
iota, reduce-window and scatter fusions per step). The pooled maximum is a maximum over the window's taps,

    y[n, o] = max_t x_pad[n, s*o + t],

and its gradient goes, for each output, to the first tap (row-major) that holds the maximum, as XLA's
select-and-scatter (and PyTorch) route it:

    dx_pad[n, s*o + t] += g[n, o] * [t is the first tap with x_pad[n, s*o + t] == y[n, o]]

which :func:`max_pool` computes with shifted strided windows and interior-padded placements, all elementwise.
The CPU path is chosen at lowering (``lax.platform_dependent``); GPUs and TPUs keep ``lax.reduce_window``.
"""
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax import lax

from attn_flax.ops.conv import Pairs, output_size, pad_spatial, place_tap, tap_window


def max_pool(x: jax.Array, window: Sequence[int], strides: Sequence[int], padding: Pairs) -> jax.Array:
    """``nn.max_pool(x, window, strides, padding)`` for NHWC ``x`` with explicit (low, high) padding pairs."""
    return _max_pool(x, tuple(int(w) for w in window), tuple(int(s) for s in strides),
                     tuple(tuple(int(p) for p in pair) for pair in padding))


def _native(x, window, strides, padding):
    return nn.max_pool(x, window, strides=strides, padding=padding)


def _out_hw(x: jax.Array, window, strides, padding) -> tuple[int, int]:
    return tuple(output_size(x.shape[1 + a], window[a], strides[a], 1, padding[a]) for a in range(2))


def _taps(window):
    return [(i, j) for i in range(window[0]) for j in range(window[1])]


def _shifted_max(x, window, strides, padding):
    xp, out_hw = pad_spatial(x, padding, value=-jnp.inf), _out_hw(x, window, strides, padding)
    windows = [tap_window(xp, tap, out_hw, strides, (1, 1)) for tap in _taps(window)]
    return functools.reduce(jnp.maximum, windows)


def _first_max_grad(x, y, g, window, strides, padding):
    """Routes each output's cotangent to the first tap of its window that holds the maximum."""
    xp, out_hw = pad_spatial(x, padding, value=-jnp.inf), y.shape[1:3]
    taken = jnp.zeros(y.shape, bool)
    total = None
    for tap in _taps(window):
        hit = (tap_window(xp, tap, out_hw, strides, (1, 1)) == y) & ~taken
        taken = taken | hit
        placed = place_tap(jnp.where(hit, g, jnp.zeros((), g.dtype)), tap, xp.shape[1:3], strides, (1, 1))
        total = placed if total is None else total + placed
    return pad_spatial(total, padding, sign=-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _max_pool(x, window, strides, padding):
    return lax.platform_dependent(x, cpu=lambda a: _shifted_max(a, window, strides, padding),
                                  default=lambda a: _native(a, window, strides, padding))


def _max_pool_fwd(x, window, strides, padding):
    y = _max_pool(x, window, strides, padding)
    return y, (x, y)


def _max_pool_bwd(window, strides, padding, residuals, g):
    x, y = residuals

    def native(a, b):
        return jax.vjp(lambda v: _native(v, window, strides, padding), a)[1](b)[0]

    return (lax.platform_dependent(x, y, g, cpu=lambda a, b, c: _first_max_grad(a, b, c, window, strides, padding),
                                   default=lambda a, b, c: native(a, c)),)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)
