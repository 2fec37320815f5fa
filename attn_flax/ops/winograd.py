"""3x3 stride-1 convolutions by Winograd's minimal filtering F(2x2, 3x3), for CPU.

Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks" (CVPR 2016): each 2x2 output tile of a 3x3
convolution is

    Y = A^T [ (G w G^T) (.) (B^T d B) ] A                 d: the 4x4 input tile, (.) elementwise,

so a layer becomes a transform of the input tiles (V = B^T d B, additions only), 16 matrix products over channels
(M[a, b] = V[a, b] U[a, b], U = G w G^T) and a transform of the products back to outputs (additions only):
16 multiplies per 4 outputs where direct convolution takes 36, 2.25x fewer FLOPs. With these small integer
transforms float32 results differ from direct convolution by about 1e-6 of the output scale (the larger
F(4x4, 3x3) tiles run no faster here and lose an order of magnitude of accuracy). Used by :mod:`attn_flax.ops.conv`
on CPU for all three passes: the forward, the input gradient (itself a stride-1 3x3 conv) and the weight gradient
(the same transforms, transposed).
"""
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from attn_flax.ops.dtypes import accumulation_dtype

# F(2x2, 3x3): input transform B^T (4x4), kernel transform G (4x3), output transform A^T (2x4).
_BT = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], np.float32)
_G = np.array([[1, 0, 0], [.5, .5, .5], [.5, -.5, .5], [0, 0, 1]], np.float32)
_AT = np.array([[1, 1, 1, 0], [0, 1, -1, -1]], np.float32)
TILE = 2  # outputs per tile side
_INPUT_TILE = TILE + 2


def _combine(coefficients: Sequence[float], arrays: Sequence[jax.Array]) -> jax.Array:
    """sum_i c_i a_i over the non-zero coefficients; the transforms' coefficients are 0, +-1 and +-0.5."""
    total = None
    for c, a in zip(coefficients, arrays):
        if c == 0:
            continue
        term = a if c == 1 else -a if c == -1 else a * c
        total = term if total is None else total + term
    return total


def _sandwich(matrix: np.ndarray, grid: Sequence[Sequence[jax.Array]]) -> list[list[jax.Array]]:
    """``matrix @ grid @ matrix^T`` for a 2-D grid of arrays (every transform here): rows first, then columns."""
    rows = [[_combine(matrix[a], [grid[i][j] for i in range(len(grid))]) for j in range(len(grid[0]))]
            for a in range(matrix.shape[0])]
    return [[_combine(matrix[b], rows[a]) for b in range(matrix.shape[0])] for a in range(matrix.shape[0])]


def kernel_transform(kernel: jax.Array) -> list[list[jax.Array]]:
    """U[a][b] = (G w G^T)[a, b] per (C_in, C_out) pair, each [C_in, C_out] in the accumulation dtype, as elementwise sums (an
    einsum here is a [16*C_in*C_out, 3] matrix product: 29 ms for 512 -> 512, against 1 ms)."""
    w = kernel.astype(accumulation_dtype(kernel.dtype))
    return _sandwich(_G, [[w[i, j] for j in range(3)] for i in range(3)])


def input_transform(x_padded: jax.Array, tiles_hw: tuple[int, int]) -> list[list[jax.Array]]:
    """V[a][b] = (B^T d B)[a, b] for every tile d of a padded input, each [N, TH, TW, C]: additions of strided
    windows, which XLA fuses into one pass over the input."""
    th, tw = tiles_hw
    d = [[lax.slice(x_padded, (0, i, j, 0), (x_padded.shape[0], i + TILE * (th - 1) + 1, j + TILE * (tw - 1) + 1,
                                             x_padded.shape[3]), (1, TILE, TILE, 1))
          for j in range(_INPUT_TILE)] for i in range(_INPUT_TILE)]
    return _sandwich(_BT, d)


def output_transform(m: list[list[jax.Array]]) -> jax.Array:
    """Y = A^T M A per tile, interleaved back into maps: 4x4 lists of [N, TH, TW, C] -> [N, 2*TH, 2*TW, C]."""
    y = _sandwich(_AT, m)
    y = jnp.stack([jnp.stack(y[r], axis=3) for r in range(TILE)], axis=2)  # [N, TH, r, TW, s, C]
    n, th, _, tw, _, c = y.shape
    return y.reshape(n, TILE * th, TILE * tw, c)


def _tiles(out_hw: Sequence[int]) -> tuple[int, int]:
    return tuple(-(-size // TILE) for size in out_hw)


def winograd_conv(x: jax.Array, kernel: jax.Array, padding: tuple[tuple[int, int], tuple[int, int]]) -> jax.Array:
    """A 3x3, stride-1, undilated NHWC x HWIO convolution with (low, high) ``padding``, in float32 (float64 for float64 inputs)."""
    if kernel.shape[:2] != (3, 3):
        raise ValueError(f"winograd_conv takes 3x3 kernels, got {kernel.shape[:2]}")
    return transformed_conv(x, kernel_transform(kernel), padding)


def transformed_conv(x: jax.Array, u: list[list[jax.Array]],
                     padding: tuple[tuple[int, int], tuple[int, int]]) -> jax.Array:
    """:func:`winograd_conv` given the transformed kernel, so batch chunks share one kernel transform.

    The input is padded so the output is a whole number of 2x2 tiles, and the surplus cropped at the end.
    """
    x_padded, out_hw, tiles_hw = _padded_for_tiles(x, padding)
    v = input_transform(x_padded, tiles_hw)
    n, c_in, c_out = x.shape[0], u[0][0].shape[0], u[0][0].shape[1]
    m = [[jnp.dot(v[a][b].reshape(-1, c_in), u[a][b], precision=lax.Precision.HIGHEST,
                  preferred_element_type=accumulation_dtype(v[a][b].dtype, u[a][b].dtype)).reshape((n,) + tiles_hw + (c_out,))
          for b in range(_INPUT_TILE)] for a in range(_INPUT_TILE)]
    return output_transform(m)[:, :out_hw[0], :out_hw[1]]


def _padded_for_tiles(x: jax.Array, padding: tuple[tuple[int, int], tuple[int, int]]
                      ) -> tuple[jax.Array, tuple[int, int], tuple[int, int]]:
    """The input, widened to the accumulation dtype, padded so the output is a whole number of 2x2 tiles; the output and tile counts."""
    out_hw = tuple(x.shape[1 + a] + padding[a][0] + padding[a][1] - 2 for a in range(2))
    tiles_hw = _tiles(out_hw)
    pads = [(0, 0, 0)] + [(padding[a][0], padding[a][1] + TILE * tiles_hw[a] - out_hw[a], 0)
                          for a in range(2)] + [(0, 0, 0)]
    wide = accumulation_dtype(x.dtype)
    return lax.pad(x.astype(wide), jnp.zeros((), wide), pads), out_hw, tiles_hw


def transformed_weight_grad(x: jax.Array, g: jax.Array,
                            padding: tuple[tuple[int, int], tuple[int, int]]) -> jax.Array:
    """The kernel gradient of :func:`winograd_conv` for output cotangent ``g`` in the transformed domain,
    [16, C_in, C_out] in the accumulation dtype (float32 or float64), so batch chunks' parts are summed before one :func:`untransform_weight_grad`.

    Transposing the forward pass: dM = A g A^T per output tile (the 2x2 cotangent tile spread over 4x4),
    dU[a, b] = V[a, b]^T dM[a, b] (16 products over tiles, 2.25x fewer multiplies than ``g^T im2col(x)``), and
    dw = G^T dU G.
    """
    x_padded, out_hw, tiles_hw = _padded_for_tiles(x, padding)
    v = input_transform(x_padded, tiles_hw)
    wide = accumulation_dtype(g.dtype)
    g = lax.pad(g.astype(wide), jnp.zeros((), wide),
                [(0, 0, 0)] + [(0, TILE * tiles_hw[a] - out_hw[a], 0) for a in range(2)] + [(0, 0, 0)])
    g_tiles = [[g[:, r::TILE, s::TILE] for s in range(TILE)] for r in range(TILE)]
    dm = _sandwich(_AT.T, g_tiles)
    c_in, c_out = x.shape[-1], g.shape[-1]
    return jnp.stack([lax.dot_general(v[a][b].reshape(-1, c_in), dm[a][b].reshape(-1, c_out),
                                      (((0,), (0,)), ((), ())), precision=lax.Precision.HIGHEST,
                                      preferred_element_type=accumulation_dtype(v[a][b].dtype, dm[a][b].dtype))
                      for a in range(_INPUT_TILE) for b in range(_INPUT_TILE)])


def untransform_weight_grad(du: jax.Array) -> jax.Array:
    """dw = G^T dU G per (C_in, C_out) pair: [16, C_in, C_out] -> [3, 3, C_in, C_out]."""
    du = du.reshape((_INPUT_TILE, _INPUT_TILE) + du.shape[1:])
    dw = _sandwich(_G.T, [[du[a, b] for b in range(_INPUT_TILE)] for a in range(_INPUT_TILE)])
    return jnp.stack([jnp.stack(row) for row in dw])

