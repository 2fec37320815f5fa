"""Max pooling whose gradient runs as one fused elementwise pass on CPU, and a drop-in for ``nn.max_pool``.

JAX differentiates ``lax.reduce_window`` max pooling through XLA's select-and-scatter, which XLA:CPU expands into
index tensors and a variadic reduce-window (the ResNet stem's 3x3/2 pool at 32x32x32x64 on 2 cores: about 30 ms of
iota, reduce-window and scatter fusions per step). The pooled maximum is a maximum over the window's taps,

    y[n, o] = max_t x_pad[n, s*o + t],

and its gradient goes, for each output, to the first tap (row-major) that holds the maximum, as XLA's
select-and-scatter (and PyTorch) route it:

    dx_pad[n, s*o + t] += g[n, o] * [t == tap[n, o]],   tap[n, o] = the first t with x_pad[n, s*o + t] == y[n, o]

which :func:`max_pool` computes with shifted strided windows and interior-padded placements, all elementwise. The
forward pass keeps ``tap`` (int8, computed beside the maximum with a strict ``>``), so the backward pass never
compares ``x`` with ``y`` again: XLA may recompute ``x`` (the BatchNorm and ReLU before the pool) inside a backward
fusion with other rounding, and a comparison there could find no tap and drop that output's gradient.
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


def _windows(x, window, strides, padding):
    xp, out_hw = pad_spatial(x, padding, value=-jnp.inf), _out_hw(x, window, strides, padding)
    return [tap_window(xp, tap, out_hw, strides, (1, 1)) for tap in _taps(window)]


def _shifted_max(x, window, strides, padding):
    return functools.reduce(jnp.maximum, _windows(x, window, strides, padding))


def _shifted_max_and_tap(x, window, strides, padding):
    """The pooled maximum and, per output, the index of the first tap (row-major) that holds it."""
    windows = _windows(x, window, strides, padding)
    tap_dtype = jnp.int8 if len(windows) <= 127 else jnp.int32
    best, tap = windows[0], jnp.zeros(windows[0].shape, tap_dtype)
    for t, w in enumerate(windows[1:], start=1):
        better = w > best
        best, tap = jnp.where(better, w, best), jnp.where(better, jnp.asarray(t, tap_dtype), tap)
    return best, tap


def _first_max_grad(tap_of_max, g, x_shape, window, strides, padding):
    """Routes each output's cotangent to the tap of its window that the forward pass recorded."""
    padded_hw = tuple(x_shape[1 + a] + sum(padding[a]) for a in range(2))
    total = None
    for t, tap in enumerate(_taps(window)):
        hit = tap_of_max == t
        placed = place_tap(jnp.where(hit, g, jnp.zeros((), g.dtype)), tap, padded_hw, strides, (1, 1))
        total = placed if total is None else total + placed
    return pad_spatial(total, padding, sign=-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _max_pool(x, window, strides, padding):
    return lax.platform_dependent(x, cpu=lambda a: _shifted_max(a, window, strides, padding),
                                  default=lambda a: _native(a, window, strides, padding))


def _max_pool_fwd(x, window, strides, padding):
    def native(a):
        y = _native(a, window, strides, padding)
        return y, jnp.zeros(y.shape, jnp.int8 if len(_taps(window)) <= 127 else jnp.int32)

    y, tap = lax.platform_dependent(x, cpu=lambda a: _shifted_max_and_tap(a, window, strides, padding),
                                    default=native)
    return y, (x, tap)


def _max_pool_bwd(window, strides, padding, residuals, g):
    x, tap = residuals

    def native(a, b):
        return jax.vjp(lambda v: _native(v, window, strides, padding), a)[1](b)[0]

    return (lax.platform_dependent(
        x, tap, g, cpu=lambda a, t, c: _first_max_grad(t, c, a.shape, window, strides, padding).astype(a.dtype),
        default=lambda a, t, c: native(a, c)),)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)
