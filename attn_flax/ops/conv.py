"""A 2-D convolution whose passes run as matrix products on CPU where XLA:CPU is slow, and a drop-in for ``nn.Conv``.

XLA:CPU's convolutions are fast for wide layers but slow elsewhere (2 cores, jax 0.10, REFERENCE.md section 4): the
weight gradient of a 3x3 conv runs at about 6 GFLOP/s against about 90 forward, 64-channel convs at half the
speed of 128-channel ones, thin convs (CBAM's 7x7 2 -> 1) at 0.3 GFLOP/s, and maps smaller than the kernel (3x3 on
2x2) in a generic loop at 2 GFLOP/s. A convolution is a sum over kernel taps of matrix products,

    y[n, o]          = sum_t x_pad[n, s*o + d*t] w[t]            (w[t]: C_in x C_out)
    dw               = g^T  im2col(x_pad)                        one (C_out x KH*KW*C_in) product
    dx_pad[n, s*o+d*t] += g[n, o] w[t]^T                          one product per tap, scattered back

so on CPU this module computes (measured per pass on 2 cores, XLA's time first):

- 3x3 stride-1 convs (every such conv of the ResNets): all three passes by Winograd's F(2x2, 3x3)
  (:mod:`attn_flax.ops.winograd`) over batch chunks, 2.25x fewer multiplies, results within about 1e-6 of the
  output scale. Forward and input gradient (itself a stride-1 3x3 conv of the cotangent with the flipped
  kernel): 103 -> 45 ms at 128x32x32x64 -> 64 and 71 -> 37 at 128x8x8x256 -> 256 on jax 0.10 (jax 0.12: 53 -> 41,
  58 -> 35); weight gradient, against the im2col product below: 93 -> 83 and 63 -> 34 ms;
- other weight gradients as the im2col product above, summed in float32 (float64 for float64 inputs) over batch chunks of about 2,048
  rows (a ``lax.scan``) so each chunk's columns stay in cache: 1,188 -> 82 ms for 128x32x32x64 -> 64 3x3;
- on jax < 0.11, the forward pass and the stride-1 input gradient of other spatial convs with at most 64 input
  channels (BAM's dilated 3x3, ResNet-18's first stride-2 3x3) as chunked im2col products: 140 -> 73 ms at the
  size above, 77 -> 38 ms for 128x32x32x64 -> 128 at stride 2;
- maps smaller than the kernel: one im2col product forward, per-tap products for the input gradient
  (267 -> 3.6 ms for 32x2x2x512 -> 512);
- thin stride-1 convs (C_in x C_out < 256) forward and input gradient as sums of shifted windows times kernel
  entries (:func:`shifted_conv`), one fused elementwise loop: 65 -> 1 ms at 128x32x32, 7x7 2 -> 1;
- strided convs' input gradient as per-tap products placed back with interior padding: 104 -> 60 ms for
  128x32x32x64 -> 128 3x3 stride 2, 31 -> 24 for 128x8x8x256 -> 512 (jax 0.12 alike).

Everything else stays XLA's. The CPU paths are chosen per platform when the computation is lowered
(``lax.platform_dependent``), so a jit placed on a GPU or TPU keeps XLA's native convolutions even if it is traced
on a host whose default backend is the CPU. ``impl`` forces either path ('xla', or 'matmul' on every platform), for
tests and benchmarks; :func:`default_impl` changes the default of every :class:`Conv` in a scope.
"""
import contextlib
import functools
from collections.abc import Iterator, Sequence
from typing import Any, Callable, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax.linen.dtypes import promote_dtype
from jax import lax

from attn_flax.ops import winograd
from attn_flax.ops.dtypes import accumulation_dtype

IMPLS = ("auto", "xla", "matmul")
_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")
_TARGET_CHUNK_ROWS = 2048  # rows of one chunk's products; 1k-4k measured alike, 32k 2x slower
_WINOGRAD_CHUNK_ROWS = 8192  # output rows of one Winograd chunk: 45 ms against 61 unchunked (128x32x32x64 -> 64)
# jax 0.10's XLA:CPU runs <= 64-channel convs through YNNPACK at half the speed of its 128-channel ones (140 ms for
# 128x32x32x64 -> 64 3x3); jax >= 0.11 runs them at 62 ms, ahead of chunked im2col (73 ms), so it keeps its own.
_IM2COL_MAX_FEATURES = 64 if tuple(int(v) for v in jax.__version_info__[:2]) < (0, 11) else 0

Pairs = tuple[tuple[int, int], tuple[int, int]]
PaddingLike = Union[str, int, Sequence[Union[int, tuple[int, int]]]]

_default_impl = ["auto"]


@contextlib.contextmanager
def default_impl(impl: str) -> Iterator[None]:
    """Within this scope, convs built with ``impl='auto'``-by-default use ``impl`` instead (at trace time)."""
    _check_impl(impl)
    _default_impl.append(impl)
    try:
        yield
    finally:
        _default_impl.pop()


def _check_impl(impl: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"conv impl {impl!r} is not one of {', '.join(IMPLS)}")


def explicit_padding(padding: PaddingLike, in_shape: Sequence[int], kernel_shape: Sequence[int],
                     strides: Sequence[int], dilation: Sequence[int]) -> Pairs:
    """``nn.Conv``'s padding forms ('SAME', 'VALID', an int, ints or pairs per axis) as (low, high) pairs."""
    if isinstance(padding, str):
        if padding.upper() not in ("SAME", "VALID"):
            raise ValueError(f"padding {padding!r} is not supported here; use 'SAME', 'VALID', an int or pairs, "
                             "or nn.Conv for circular/reflect/causal padding")
        dilated = [(k - 1) * d + 1 for k, d in zip(kernel_shape, dilation)]
        return tuple(lax.padtype_to_pads(in_shape, dilated, strides, padding.upper()))
    if isinstance(padding, int):
        return ((padding, padding),) * 2
    pairs = tuple((p, p) if isinstance(p, int) else tuple(p) for p in padding)
    if len(pairs) != 2 or any(len(p) != 2 for p in pairs):
        raise ValueError(f"padding {padding!r} must be an int or two ints/(low, high) pairs")
    return pairs


def output_size(size: int, kernel: int, stride: int, dilation: int, pad: tuple[int, int]) -> int:
    """Output length of one spatial axis."""
    return (size + pad[0] + pad[1] - (kernel - 1) * dilation - 1) // stride + 1


def xla_conv(x: jax.Array, kernel: jax.Array, strides: tuple[int, int], padding: Pairs,
             dilation: tuple[int, int], precision: Any = None) -> jax.Array:
    """XLA's native NHWC/HWIO convolution, the forward pass of every path."""
    return lax.conv_general_dilated(x, kernel, strides, padding, rhs_dilation=dilation,
                                    dimension_numbers=_DIMENSION_NUMBERS, precision=precision)


def shifted_conv(x: jax.Array, kernel: jax.Array, padding: Pairs, dilation: tuple[int, int]) -> jax.Array:
    """A stride-1 conv as a sum over taps and input channels of shifted windows times a kernel row, in float32 (float64 for float64 inputs).

    XLA fuses it into one elementwise loop over the output; for thin convs (CBAM's 7x7 2 -> 1) that runs at memory
    speed, where XLA:CPU's convolution emitter reaches about 0.3 GFLOP/s.
    """
    wide = accumulation_dtype(x.dtype, kernel.dtype)
    x = pad_spatial(x, padding).astype(wide)
    kernel = kernel.astype(wide)
    out_hw = tuple(output_size(x.shape[1 + a], kernel.shape[a], 1, dilation[a], (0, 0)) for a in range(2))
    terms = []
    for i in range(kernel.shape[0]):
        for j in range(kernel.shape[1]):
            window = tap_window(x, (i, j), out_hw, (1, 1), dilation)
            terms.extend(window[..., c:c + 1] * kernel[i, j, c] for c in range(kernel.shape[2]))
    while len(terms) > 1:  # pairwise, so rounding grows with log(taps), not with their number
        terms = [a + b for a, b in zip(terms[::2], terms[1::2])] + terms[len(terms) - len(terms) % 2:]
    return terms[0]


def shifted_input_grad(g: jax.Array, kernel: jax.Array, in_shape: Sequence[int], padding: Pairs,
                       dilation: tuple[int, int]) -> jax.Array:
    """The input gradient of a stride-1 conv: :func:`shifted_conv` of the cotangent with the flipped kernel."""
    flipped, pads = _input_grad_as_conv(kernel, in_shape, g.shape, padding, dilation)
    return shifted_conv(g, flipped, pads, dilation)


def _input_grad_as_conv(kernel: jax.Array, in_shape: Sequence[int], out_shape: Sequence[int], padding: Pairs,
                        dilation: tuple[int, int]) -> tuple[jax.Array, Pairs]:
    """A stride-1 conv's input gradient is a stride-1 conv of the cotangent: this kernel (flipped, in and out
    swapped) and padding."""
    flipped = jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2)
    low = [dilation[a] * (kernel.shape[a] - 1) - padding[a][0] for a in range(2)]
    pads = tuple((low[a], in_shape[1 + a] - out_shape[1 + a] + dilation[a] * (kernel.shape[a] - 1) - low[a])
                 for a in range(2))
    return flipped, pads


def im2col_conv(x: jax.Array, kernel: jax.Array, strides: tuple[int, int], padding: Pairs,
                dilation: tuple[int, int]) -> jax.Array:
    """A conv as one matrix product: every tap's window side by side ([N*OH*OW, KH*KW*C_in]) times the kernel.

    For maps smaller than the kernel's extent (ResNet-50's last stage at 64x64 inputs: 3x3 convs on 2x2 maps) XLA:CPU
    swaps the operands' roles and runs a generic loop at about 2 GFLOP/s (267 ms for 32x2x2x512 -> 512, measured on 2
    cores); the product takes 3.6 ms. The copies of the input it makes are small exactly when the map is.
    """
    out_hw = _out_shape(x.shape, kernel.shape, strides, padding, dilation)[1:3]
    columns = _columns(pad_spatial(x, padding), kernel.shape[:2], out_hw, strides, dilation)
    y = lax.dot_general(columns, kernel.reshape(-1, kernel.shape[-1]), (((1,), (0,)), ((), ())),
                        preferred_element_type=accumulation_dtype(columns.dtype, kernel.dtype))
    return y.reshape(x.shape[:1] + out_hw + kernel.shape[-1:])


def chunked_im2col_conv(x: jax.Array, kernel: jax.Array, strides: tuple[int, int], padding: Pairs,
                        dilation: tuple[int, int], target_rows: int = _TARGET_CHUNK_ROWS) -> jax.Array:
    """:func:`im2col_conv` over batch chunks of about ``target_rows`` output rows, so each chunk's columns stay in
    cache: 73 ms against XLA:CPU's 140 ms for a 128x32x32x64 -> 64 3x3 conv (2 cores, jax 0.10)."""
    out_hw = _out_shape(x.shape, kernel.shape, strides, padding, dilation)[1:3]
    conv = functools.partial(im2col_conv, kernel=kernel, strides=strides, padding=padding, dilation=dilation)
    return _map_over_chunks(conv, x, chunk_size(x.shape[0], out_hw, target_rows))


def _columns(x: jax.Array, kernel_hw: tuple[int, int], out_hw: tuple[int, int], strides: tuple[int, int],
             dilation: tuple[int, int]) -> jax.Array:
    """im2col of a padded input: row (n, oh, ow) holds the window tap by tap, [N*OH*OW, KH*KW*C]."""
    windows = [tap_window(x, (i, j), out_hw, strides, dilation) for i in range(kernel_hw[0])
               for j in range(kernel_hw[1])]
    columns = jnp.stack(windows, axis=-2)  # XLA:CPU builds this in one pass; a concatenate takes two
    return columns.reshape(-1, columns.shape[-2] * columns.shape[-1])


def _map_over_chunks(fn: Callable[[jax.Array], jax.Array], x: jax.Array, chunk: int) -> jax.Array:
    """``fn`` applied to batch chunks of ``x`` in a ``lax.map``, the remainder separately, outputs concatenated."""
    batch = x.shape[0]
    full = batch // chunk
    if full <= 1:
        return fn(x)
    y = lax.map(fn, x[:full * chunk].reshape((full, chunk) + x.shape[1:]))
    y = y.reshape((full * chunk,) + y.shape[2:])
    return y if full * chunk == batch else jnp.concatenate([y, fn(x[full * chunk:])])


def _conv_favours_im2col(in_features: int, kernel_shape: Sequence[int]) -> bool:
    """Spatial convs with few input channels that are not thin, where XLA:CPU's convolution is slowest (see above):
    140 -> 73 ms for 128x32x32x64 -> 64 3x3, 77 -> 38 at stride 2 to 128 (jax 0.12's own strided conv: 27). Thin
    convs have their own paths; the 7x7 stem (3 channels) is one, and XLA is as fast or faster there (8 / 145 ms
    against im2col's 8 / 180 at 32x64x64 and 32x224x224)."""
    return (kernel_shape[0] * kernel_shape[1] > 1 and in_features <= _IM2COL_MAX_FEATURES
            and not _small_channels(kernel_shape))


def _winograd_fits(kernel_shape: Sequence[int], strides: tuple[int, int], dilation: tuple[int, int]) -> bool:
    """3x3 stride-1 undilated convs that are not thin: :func:`chunked_winograd_conv` on CPU."""
    return (tuple(kernel_shape[:2]) == (3, 3) and strides == (1, 1) and dilation == (1, 1)
            and not _small_channels(kernel_shape))


def chunked_winograd_conv(x: jax.Array, kernel: jax.Array, padding: Pairs,
                          target_rows: int = _WINOGRAD_CHUNK_ROWS) -> jax.Array:
    """:func:`attn_flax.ops.winograd.winograd_conv` over batch chunks of about ``target_rows`` output rows, the
    kernel transformed once.

    2 cores, per 3x3 conv, XLA's time first (jax 0.10 / 0.12): 128x32x32x64 -> 64 103 / 53 -> 45 ms,
    128x16x16x128 49 / 50 -> 36, 128x8x8x256 71 / 58 -> 37, 128x4x4x512 55 / 64 -> 48.
    """
    out_hw = _out_shape(x.shape, kernel.shape, (1, 1), padding, (1, 1))[1:3]
    conv = functools.partial(winograd.transformed_conv, u=winograd.kernel_transform(kernel), padding=padding)
    return _map_over_chunks(conv, x, chunk_size(x.shape[0], out_hw, target_rows))


def _thin(kernel_shape: Sequence[int], strides: tuple[int, int]) -> bool:
    """Thin stride-1 convs (CBAM's 7x7 2 -> 1): forward and input gradient as shifted sums on CPU."""
    return _small_channels(kernel_shape) and strides == (1, 1)


def _smaller_than_kernel(in_shape: Sequence[int], out_shape: Sequence[int], kernel_shape: Sequence[int],
                         dilation: tuple[int, int]) -> bool:
    """Input or output maps narrower than the kernel's extent, where XLA:CPU's convolutions take a slow loop."""
    extent = [(kernel_shape[a] - 1) * dilation[a] + 1 for a in range(2)]
    return any(1 < extent[a] and min(in_shape[1 + a], out_shape[1 + a]) < extent[a] for a in range(2))


def _out_shape(x_shape: Sequence[int], kernel_shape: Sequence[int], strides: tuple[int, int], padding: Pairs,
               dilation: tuple[int, int]) -> tuple[int, ...]:
    return (x_shape[0],) + tuple(output_size(x_shape[1 + a], kernel_shape[a], strides[a], dilation[a], padding[a])
                                 for a in range(2)) + (kernel_shape[3],)


def _forward(x: jax.Array, kernel: jax.Array, strides: tuple[int, int], padding: Pairs, dilation: tuple[int, int],
             precision: Any, impl: str) -> jax.Array:
    """XLA's conv, except on CPU ('auto') or everywhere ('matmul'): thin stride-1 convs as :func:`shifted_conv`,
    convs on maps smaller than the kernel as :func:`im2col_conv`, other narrow convs (jax < 0.11) as
    :func:`chunked_im2col_conv`."""
    out_dtype = jnp.result_type(x, kernel)
    if _thin(kernel.shape, strides):
        replacement = lambda a, b: shifted_conv(a, b, padding, dilation).astype(out_dtype)  # noqa: E731
    elif _smaller_than_kernel(x.shape, _out_shape(x.shape, kernel.shape, strides, padding, dilation), kernel.shape,
                              dilation):
        replacement = lambda a, b: im2col_conv(a, b, strides, padding, dilation).astype(out_dtype)  # noqa: E731
    elif _winograd_fits(kernel.shape, strides, dilation):
        replacement = lambda a, b: chunked_winograd_conv(a, b, padding).astype(out_dtype)  # noqa: E731
    elif _conv_favours_im2col(kernel.shape[2], kernel.shape):
        replacement = lambda a, b: chunked_im2col_conv(a, b, strides, padding, dilation).astype(out_dtype)  # noqa: E731
    else:
        return xla_conv(x, kernel, strides, padding, dilation, precision)
    if impl == "matmul":
        return replacement(x, kernel)
    native = functools.partial(xla_conv, strides=strides, padding=padding, dilation=dilation, precision=precision)
    return lax.platform_dependent(x, kernel, cpu=replacement, default=native)


def tap_window(x: jax.Array, tap: tuple[int, int], out_hw: tuple[int, int], strides: tuple[int, int],
                dilation: tuple[int, int]) -> jax.Array:
    """The input positions kernel tap ``tap`` meets, [N, OH, OW, C], from a padded input."""
    start = (0, tap[0] * dilation[0], tap[1] * dilation[1], 0)
    limit = (x.shape[0], start[1] + (out_hw[0] - 1) * strides[0] + 1, start[2] + (out_hw[1] - 1) * strides[1] + 1,
             x.shape[3])
    return lax.slice(x, start, limit, (1, strides[0], strides[1], 1))


def pad_spatial(x: jax.Array, padding: Pairs, sign: int = 1, value: float = 0.0) -> jax.Array:
    """Pads (sign 1) H and W with ``value``, or crops them (sign -1); ``lax.pad`` takes negative padding as cropping."""
    (top, bottom), (left, right) = padding
    config = [(0, 0, 0), (sign * top, sign * bottom, 0), (sign * left, sign * right, 0), (0, 0, 0)]
    return lax.pad(x, jnp.array(value, x.dtype), config)


def place_tap(values: jax.Array, tap: tuple[int, int], padded_hw: Sequence[int], strides: tuple[int, int],
              dilation: tuple[int, int]) -> jax.Array:
    """The inverse of :func:`tap_window`: [N, OH, OW, C] values put back at the padded positions tap ``tap`` met,
    zeros elsewhere (an interior-padded ``lax.pad``)."""
    config = [(0, 0, 0)] + [(tap[a] * dilation[a],
                             padded_hw[a] - tap[a] * dilation[a] - (values.shape[1 + a] - 1) * strides[a] - 1,
                             strides[a] - 1) for a in range(2)] + [(0, 0, 0)]
    return lax.pad(values, jnp.zeros((), values.dtype), config)


def _chunk_weight_grad(x: jax.Array, g: jax.Array, kernel_hw: tuple[int, int], strides: tuple[int, int],
                       padding: Pairs, dilation: tuple[int, int]) -> jax.Array:
    """The transposed weight gradient [C_out, KH*KW*C_in] (float32, or float64) of one batch chunk: ``g^T`` times its im2col."""
    columns = _columns(pad_spatial(x, padding), kernel_hw, g.shape[1:3], strides, dilation)
    return lax.dot_general(g.reshape(-1, g.shape[-1]), columns, (((0,), (0,)), ((), ())),
                           preferred_element_type=accumulation_dtype(g.dtype, columns.dtype))


def chunk_size(batch: int, out_hw: tuple[int, int], target_rows: int = _TARGET_CHUNK_ROWS) -> int:
    """Batch chunk whose products have about ``target_rows`` rows: small enough to stay in cache."""
    return int(max(1, min(batch, target_rows // max(1, out_hw[0] * out_hw[1]))))


def matmul_weight_grad(x: jax.Array, g: jax.Array, kernel_hw: tuple[int, int], strides: tuple[int, int],
                       padding: Pairs, dilation: tuple[int, int], chunk: Optional[int] = None) -> jax.Array:
    """The weight gradient as ``g^T im2col(x)`` products, summed in the accumulation dtype over batch chunks with a ``lax.scan``."""
    grad = functools.partial(_chunk_weight_grad, kernel_hw=kernel_hw, strides=strides, padding=padding,
                             dilation=dilation)
    total = _sum_over_chunks(grad, x, g, chunk or chunk_size(x.shape[0], g.shape[1:3]))
    return _untranspose(total, kernel_hw, x.shape[-1])


def winograd_weight_grad(x: jax.Array, g: jax.Array, padding: Pairs, chunk: Optional[int] = None) -> jax.Array:
    """The weight gradient of a 3x3 stride-1 conv by Winograd (:mod:`attn_flax.ops.winograd`), the transformed
    gradients summed in the accumulation dtype over batch chunks before the one transform back."""
    grad = functools.partial(winograd.transformed_weight_grad, padding=padding)
    total = _sum_over_chunks(grad, x, g, chunk or chunk_size(x.shape[0], g.shape[1:3], _WINOGRAD_CHUNK_ROWS))
    return winograd.untransform_weight_grad(total)


def _sum_over_chunks(fn: Callable[[jax.Array, jax.Array], jax.Array], x: jax.Array, g: jax.Array,
                     chunk: int) -> jax.Array:
    """sum of ``fn(x_chunk, g_chunk)`` over batch chunks: a ``lax.scan`` over the whole chunks, then the rest."""
    batch = x.shape[0]
    full = batch // chunk
    if full <= 1:
        return fn(x, g)
    split = lambda a: a[:full * chunk].reshape((full, chunk) + a.shape[1:])  # noqa: E731

    def body(total, xs):
        return total + fn(*xs), None

    zeros = jax.eval_shape(fn, x[:chunk], g[:chunk])
    total, _ = lax.scan(body, jnp.zeros(zeros.shape, zeros.dtype), (split(x), split(g)))
    if full * chunk < batch:
        total = total + fn(x[full * chunk:], g[full * chunk:])
    return total


def _untranspose(grad_t: jax.Array, kernel_hw: tuple[int, int], in_features: int) -> jax.Array:
    """[C_out, KH*KW*C_in] -> [KH, KW, C_in, C_out]."""
    return grad_t.T.reshape(kernel_hw + (in_features, grad_t.shape[0]))


def matmul_input_grad(g: jax.Array, kernel: jax.Array, in_shape: Sequence[int], strides: tuple[int, int],
                      padding: Pairs, dilation: tuple[int, int]) -> jax.Array:
    """The input gradient as per-tap products ``g w[t]^T``, each placed back by an interior-padded ``lax.pad``."""
    padded_hw = (in_shape[1] + padding[0][0] + padding[0][1], in_shape[2] + padding[1][0] + padding[1][1])
    g_rows = g.reshape(-1, g.shape[-1])
    total = None
    for i in range(kernel.shape[0]):
        for j in range(kernel.shape[1]):
            rows = lax.dot_general(g_rows, kernel[i, j], (((1,), (1,)), ((), ())),
                                   preferred_element_type=accumulation_dtype(g_rows.dtype, kernel.dtype))
            placed = place_tap(rows.reshape(g.shape[:3] + (kernel.shape[2],)), (i, j), padded_hw, strides, dilation)
            total = placed if total is None else total + placed
    return pad_spatial(total, padding, sign=-1).astype(g.dtype)


def _xla_grads(x: jax.Array, kernel: jax.Array, g: jax.Array, strides: tuple[int, int], padding: Pairs,
               dilation: tuple[int, int], precision: Any) -> tuple[jax.Array, jax.Array]:
    """XLA's own input and weight gradients (its transposed convolutions)."""
    _, vjp = jax.vjp(lambda a, b: xla_conv(a, b, strides, padding, dilation, precision), x, kernel)
    return vjp(g)


def _small_channels(kernel_shape: Sequence[int]) -> bool:
    """Convs with few channels (CBAM's 2 -> 1, BAM's C/16): per-tap products are too thin to pay off."""
    return kernel_shape[2] * kernel_shape[3] < 256


def _matmul_grads(x: jax.Array, kernel: jax.Array, g: jax.Array, strides: tuple[int, int], padding: Pairs,
                  dilation: tuple[int, int], precision: Any) -> tuple[jax.Array, jax.Array]:
    """Input and weight gradients from matrix products (im2col or per tap) where they beat XLA:CPU, else XLA's."""
    kernel_hw = kernel.shape[:2]
    xla_dx, xla_dw = None, None
    use_mm_dw = not _small_channels(kernel.shape)
    use_mm_dx = (_small_channels(kernel.shape) or strides != (1, 1)
                 or _smaller_than_kernel(x.shape, g.shape, kernel.shape, dilation)
                 or _winograd_fits(kernel.shape, strides, dilation)
                 or _conv_favours_im2col(kernel.shape[3], kernel.shape))
    if not (use_mm_dw and use_mm_dx):
        xla_dx, xla_dw = _xla_grads(x, kernel, g, strides, padding, dilation, precision)
    winograd_fits = (_winograd_fits(kernel.shape, strides, dilation)
                     and not _smaller_than_kernel(x.shape, g.shape, kernel.shape, dilation))
    if not use_mm_dw:
        dw = xla_dw
    elif winograd_fits:
        dw = winograd_weight_grad(x, g, padding).astype(kernel.dtype)
    else:
        dw = matmul_weight_grad(x, g, kernel_hw, strides, padding, dilation).astype(kernel.dtype)
    if not use_mm_dx:
        dx = xla_dx
    elif winograd_fits:
        flipped, pads = _input_grad_as_conv(kernel, x.shape, g.shape, padding, dilation)
        dx = chunked_winograd_conv(g, flipped, pads)
    elif strides == (1, 1) and _conv_favours_im2col(kernel.shape[3], kernel.shape):
        flipped, pads = _input_grad_as_conv(kernel, x.shape, g.shape, padding, dilation)
        dx = chunked_im2col_conv(g, flipped, (1, 1), pads, dilation)
    elif _thin(kernel.shape, strides):
        dx = shifted_input_grad(g, kernel, x.shape, padding, dilation)
    else:
        dx = matmul_input_grad(g, kernel, x.shape, strides, padding, dilation)
    return dx.astype(x.dtype), dw


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5, 6))
def _conv_with_grads(x: jax.Array, kernel: jax.Array, strides: tuple[int, int], padding: Pairs,
                     dilation: tuple[int, int], precision: Any, impl: str) -> jax.Array:
    return _forward(x, kernel, strides, padding, dilation, precision, impl)


def _conv_fwd(x, kernel, strides, padding, dilation, precision, impl):
    return _forward(x, kernel, strides, padding, dilation, precision, impl), (x, kernel)


def _conv_bwd(strides, padding, dilation, precision, impl, residuals, g):
    x, kernel = residuals
    args = (x, kernel, g)
    mm = functools.partial(_matmul_grads, strides=strides, padding=padding, dilation=dilation, precision=precision)
    if impl == "matmul":
        return mm(*args)
    native = functools.partial(_xla_grads, strides=strides, padding=padding, dilation=dilation, precision=precision)
    return lax.platform_dependent(*args, cpu=mm, default=native)


_conv_with_grads.defvjp(_conv_fwd, _conv_bwd)


def conv2d(x: jax.Array, kernel: jax.Array, strides: Sequence[int] = (1, 1), padding: PaddingLike = "VALID",
           dilation: Sequence[int] = (1, 1), *, impl: str = "auto", precision: Any = None) -> jax.Array:
    """NHWC x HWIO convolution: XLA's forward; gradients by per-tap products on CPU ('auto'), or forced.

    ``impl='auto'`` picks the matrix-product backward when lowered for the CPU and XLA's elsewhere;
    'matmul' uses it on every platform; 'xla' is plain ``lax.conv_general_dilated``.
    """
    _check_impl(impl)
    strides, dilation = tuple(int(s) for s in strides), tuple(int(d) for d in dilation)
    padding = explicit_padding(padding, x.shape[1:3], kernel.shape[:2], strides, dilation)
    if impl == "xla":
        return xla_conv(x, kernel, strides, padding, dilation, precision)
    return _conv_with_grads(x, kernel, strides, padding, dilation, precision, impl)


class Conv(nn.Module):
    """Drop-in for ``nn.Conv`` on NHWC maps and NWC sequences (same parameters, names, shapes and init) using
    :func:`conv2d`.

    Supports what the ResNets and attention modules use: 2-D kernels given as pairs on [N, H, W, C] input, 1-D
    kernels (an int or one size, as ``nn.Conv`` reads them; ECA's conv across channels) on [N, W, C] input,
    ``strides``, ``padding`` ('SAME', 'VALID', ints or pairs), ``kernel_dilation``, ``use_bias``,
    ``dtype``/``param_dtype``/``precision``. A 1-D conv runs as the 2-D conv of a one-row map with a 1 x k kernel;
    its parameter keeps ``nn.Conv``'s (k, C_in, C_out) shape. Grouped convs (``feature_group_count > 1``) run
    through XLA's native path. ``impl`` is 'auto' (matrix-product gradients when lowered for CPU), 'xla' or
    'matmul'; None takes :func:`default_impl`'s scope.
    """

    features: int
    kernel_size: Union[int, Sequence[int]]
    strides: Union[None, int, Sequence[int]] = 1
    padding: PaddingLike = "SAME"
    input_dilation: Union[None, int, Sequence[int]] = 1
    kernel_dilation: Union[None, int, Sequence[int]] = 1
    feature_group_count: int = 1
    use_bias: bool = True
    dtype: Optional[Any] = None
    param_dtype: Any = jnp.float32
    precision: Any = None
    kernel_init: Callable[..., jax.Array] = nn.linear.default_kernel_init
    bias_init: Callable[..., jax.Array] = nn.initializers.zeros_init()
    impl: Optional[str] = None

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        one_d = isinstance(self.kernel_size, (int, np.integer)) or len(self.kernel_size) == 1
        if one_d:
            if inputs.ndim != 3:
                raise ValueError(f"attn_flax.ops.Conv with the 1-D kernel_size {self.kernel_size!r} takes [N, W, C] "
                                 f"input, got shape {inputs.shape}; write kernel_size=(k, k) for a 2-D conv")
            kernel_size = (1, _single(self.kernel_size, "kernel_size"))
            strides = (1, _single(self.strides, "strides"))
            dilation = (1, _single(self.kernel_dilation, "kernel_dilation"))
            padding = self.padding if isinstance(self.padding, str) else ((0, 0), _single_padding(self.padding))
            inputs = inputs[:, None]
        else:
            if inputs.ndim != 4:
                raise ValueError(f"attn_flax.ops.Conv with the 2-D kernel_size {tuple(self.kernel_size)!r} takes NHWC "
                                 f"input, got shape {inputs.shape}")
            kernel_size = _pair(self.kernel_size, "kernel_size")
            strides, dilation = _pair(self.strides, "strides"), _pair(self.kernel_dilation, "kernel_dilation")
            padding = self.padding
        if _pair(self.input_dilation, "input_dilation") != (1, 1):
            raise ValueError("attn_flax.ops.Conv has no input_dilation; use nn.Conv for transposed convs")
        in_features = inputs.shape[-1]
        if in_features % self.feature_group_count:
            raise ValueError(f"{in_features} input channels are not divisible by feature_group_count "
                             f"{self.feature_group_count}")
        kernel_shape = kernel_size + (in_features // self.feature_group_count, self.features)
        kernel = self.param("kernel", self.kernel_init, kernel_shape[1:] if one_d else kernel_shape, self.param_dtype)
        kernel = kernel.reshape(kernel_shape)
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
        inputs, kernel, bias = promote_dtype(inputs, kernel, bias, dtype=self.dtype)
        impl = self.impl or _default_impl[-1]
        _check_impl(impl)
        if self.feature_group_count == 1:
            y = conv2d(inputs, kernel, strides, padding, dilation, impl=impl, precision=self.precision)
        else:
            padding = explicit_padding(padding, inputs.shape[1:3], kernel_size, strides, dilation)
            y = lax.conv_general_dilated(inputs, kernel, strides, padding, rhs_dilation=dilation,
                                         dimension_numbers=_DIMENSION_NUMBERS,
                                         feature_group_count=self.feature_group_count, precision=self.precision)
        if bias is not None:
            y = y + bias
        return y[:, 0] if one_d else y


def _single(value: Union[None, int, Sequence[int]], name: str) -> int:
    """An int (or None, meaning 1), or a length-1 sequence, for a 1-D conv."""
    if value is None:
        return 1
    if isinstance(value, (int, np.integer)):
        return int(value)
    if len(value) != 1:
        raise ValueError(f"{name} must be an int or one int for a 1-D conv, got {value!r}")
    return int(value[0])


def _single_padding(padding: PaddingLike) -> tuple[int, int]:
    """A 1-D conv's padding given as an int, one int or one (low, high) pair, as (low, high)."""
    if isinstance(padding, (int, np.integer)):
        return (int(padding), int(padding))
    if len(padding) != 1:
        raise ValueError(f"padding {padding!r} must be an int, one int or one (low, high) pair for a 1-D conv")
    pair = padding[0]
    return (int(pair), int(pair)) if isinstance(pair, (int, np.integer)) else tuple(int(p) for p in pair)


def _pair(value: Union[None, int, Sequence[int]], name: str) -> tuple[int, int]:
    """An int (or None, meaning 1) broadcast to (h, w), or a length-2 sequence."""
    if value is None:
        return (1, 1)
    if isinstance(value, (int, np.integer)):
        return (int(value), int(value))
    pair = tuple(int(v) for v in value)
    if len(pair) != 2:
        raise ValueError(f"{name} must be an int or two ints for a 2-D conv, got {value!r}")
    return pair
