"""ops.max_pool: nn.max_pool's values and gradients (ties included), elementwise on CPU only."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from attn_flax import ops

PAD = ((1, 1), (1, 1))


def _value_and_grad(pool, x, g):
    y, vjp = jax.vjp(lambda a: pool(a, (3, 3), (2, 2), PAD), x)
    return y, vjp(g)[0]


@pytest.mark.parametrize("shape", [(2, 9, 9, 3), (2, 8, 10, 4), (1, 2, 2, 1)])
@pytest.mark.parametrize("ties", [False, True], ids=["random", "ties"])
def test_max_pool_equals_nn_max_pool(shape, ties):
    x = np.random.RandomState(0).randn(*shape).astype(np.float32)
    if ties:  # a post-ReLU map: many zeros and repeated values share windows
        x = np.maximum(np.round(x), 0)
    x = jnp.asarray(x)
    out_shape = nn.max_pool(x, (3, 3), (2, 2), PAD).shape
    g = jnp.asarray(np.random.RandomState(1).randn(*out_shape), jnp.float32)
    y_ref, dx_ref = _value_and_grad(nn.max_pool, x, g)
    y, dx = jax.jit(lambda a, b: _value_and_grad(ops.max_pool, a, b))(x, g)
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_allclose(dx, dx_ref, rtol=0, atol=1e-6)
    if ties:
        assert float(jnp.sum(dx)) == pytest.approx(float(jnp.sum(g)), rel=1e-5), "each gradient lands once"


def test_max_pool_is_elementwise_on_cpu_and_native_elsewhere():
    x = jnp.zeros((2, 8, 8, 4))
    f = jax.grad(lambda a: jnp.sum(ops.max_pool(a, (3, 3), (2, 2), PAD) ** 2))
    cpu_hlo = jax.jit(f).lower(x).as_text(dialect="hlo")
    assert "select-and-scatter" not in cpu_hlo and "reduce-window" not in cpu_hlo
    gpu_hlo = jax.jit(f).trace(x).lower(lowering_platforms=("cuda",)).as_text(dialect="hlo")
    assert "reduce-window" in gpu_hlo or "select-and-scatter" in gpu_hlo
