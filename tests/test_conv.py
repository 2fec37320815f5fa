"""attn_flax.ops.conv: the matrix-product gradients equal XLA's native ones, and Conv is a drop-in for nn.Conv."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from attn_flax import ops
from attn_flax.ops import conv as conv_lib
from attn_flax.ops import winograd

# (batch, height, width, in, out, kernel, stride, padding, dilation): every conv shape the ResNets and the
# attention modules use, plus the awkward cases (non-square input, batch 1, a batch the chunks do not divide).
SHAPES = {
    "3x3_stride1": (4, 8, 8, 8, 16, 3, 1, 1, 1),
    "3x3_stride2": (4, 9, 9, 8, 16, 3, 2, 1, 1),
    "1x1_stride1": (4, 8, 8, 16, 32, 1, 1, 0, 1),
    "1x1_stride2": (4, 8, 8, 16, 32, 1, 2, 0, 1),
    "7x7_stride2_stem": (2, 16, 16, 3, 16, 7, 2, 3, 1),
    "3x3_dilation4_bam": (2, 12, 12, 16, 16, 3, 1, 4, 4),
    "3x3_dilation4_bam_thin": (2, 12, 12, 4, 4, 3, 1, 4, 4),
    "7x7_cbam_spatial": (3, 8, 8, 2, 1, 7, 1, 3, 1),
    "non_square": (3, 6, 10, 8, 16, 3, 2, 1, 1),
    "batch1": (1, 8, 8, 16, 16, 3, 1, 1, 1),
    "same_padding_stride2": (2, 7, 7, 16, 16, 3, 2, "SAME", 1),
    "3x3_stride2_odd_non_square": (3, 9, 7, 16, 24, 3, 2, 1, 1),
    "asymmetric_pairs": (2, 7, 9, 16, 16, 3, 1, ((0, 2), (1, 0)), 1),
    "3x3_on_2x2_map": (2, 2, 2, 16, 16, 3, 1, 1, 1),
    "3x3_stride2_to_2x2_map": (2, 4, 4, 16, 16, 3, 2, 1, 1),
    "3x3_on_1x3_map": (3, 1, 3, 16, 8, 3, 1, 1, 1),
    "3x3_stride1_odd_non_square": (3, 7, 9, 16, 8, 3, 1, 1, 1),
    "3x3_stride1_valid": (2, 9, 8, 16, 16, 3, 1, 0, 1),
}


def _operands(shape, dtype=jnp.float32, seed=0):
    """Input, kernel (unit-variance outputs) and a seed for the output cotangent, from NumPy (nothing to compile)."""
    n, h, w, cin, cout, k, _, _, _ = shape
    rng = np.random.RandomState(seed)
    x = jnp.asarray(rng.randn(n, h, w, cin), jnp.float32).astype(dtype)
    kernel = jnp.asarray(rng.randn(k, k, cin, cout) / np.sqrt(k * k * cin), jnp.float32).astype(dtype)
    return x, kernel, seed + 1


def _grads(shape, impl, x, kernel, seed):
    """The conv's output and its (input, kernel) gradients for a random output cotangent."""
    _, _, _, _, _, _, stride, padding, dilation = shape
    f = functools.partial(ops.conv2d, strides=(stride, stride), padding=padding, dilation=(dilation, dilation),
                          impl=impl)
    y, vjp = jax.vjp(f, x, kernel)
    g = jnp.asarray(np.random.RandomState(seed).randn(*y.shape), y.dtype)
    return y, vjp(g)


def _assert_close(actual, expected, rtol):
    actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
    scale = max(np.abs(expected).max(), 1e-6)
    np.testing.assert_allclose(actual / scale, expected / scale, atol=rtol, rtol=0)


@pytest.mark.parametrize("name,impl", [(name, "matmul") for name in sorted(SHAPES)]
                         + [(name, "auto") for name in ("3x3_stride2", "7x7_cbam_spatial", "3x3_on_2x2_map",
                                                        "3x3_stride2_to_2x2_map", "3x3_stride1_odd_non_square",
                                                        "3x3_stride2_odd_non_square")])
def test_gradients_equal_xla(name, impl, monkeypatch):
    if impl == "matmul":  # the im2col forward and input gradient, which only jax < 0.11 uses by default
        monkeypatch.setattr(conv_lib, "_IM2COL_MAX_FEATURES", 64)
    shape = SHAPES[name]
    x, kernel, kg = _operands(shape)
    y_ref, (dx_ref, dw_ref) = _grads(shape, "xla", x, kernel, kg)
    y, (dx, dw) = jax.jit(lambda a, b: _grads(shape, impl, a, b, kg))(x, kernel)
    _assert_close(y, y_ref, 1e-6)
    _assert_close(dx, dx_ref, 1e-5)
    _assert_close(dw, dw_ref, 1e-5)


@pytest.mark.parametrize("chunk", [1, 3, 4])
def test_weight_grad_batch_chunks_with_remainder(chunk):
    shape = (7, 6, 6, 8, 8, 3, 2, 1, 1)
    x, kernel, kg = _operands(shape)
    _, (_, dw_ref) = _grads(shape, "xla", x, kernel, kg)
    g = jnp.asarray(np.random.RandomState(kg).randn(7, 3, 3, 8), jnp.float32)
    dw = jax.jit(functools.partial(conv_lib.matmul_weight_grad, kernel_hw=(3, 3), strides=(2, 2),
                                   padding=((1, 1), (1, 1)), dilation=(1, 1), chunk=chunk))(x, g)
    _assert_close(dw, dw_ref, 1e-5)


@pytest.mark.parametrize("chunk", [1, 3])
def test_winograd_weight_grad_batch_chunks_with_remainder(chunk):
    shape = (7, 6, 5, 8, 16, 3, 1, ((0, 2), (1, 1)), 1)
    x, kernel, kg = _operands(shape)
    _, (_, dw_ref) = _grads(shape, "xla", x, kernel, kg)
    g = jnp.asarray(np.random.RandomState(kg).randn(7, 6, 5, 16), jnp.float32)
    dw = jax.jit(functools.partial(conv_lib.winograd_weight_grad, padding=shape[7], chunk=chunk))(x, g)
    _assert_close(dw, dw_ref, 2e-6)


def test_bfloat16_gradients_accumulate_in_float32():
    shape = (4, 6, 6, 16, 16, 3, 1, 1, 1)
    x, kernel, kg = _operands(shape, jnp.bfloat16)
    _, (dx_ref, dw_ref) = _grads(shape, "xla", x.astype(jnp.float32), kernel.astype(jnp.float32), kg)
    _, (dx, dw) = jax.jit(lambda a, b: _grads(shape, "matmul", a, b, kg))(x, kernel)
    assert dx.dtype == jnp.bfloat16 and dw.dtype == jnp.bfloat16
    _assert_close(dx, dx_ref, 2e-2)
    _assert_close(dw, dw_ref, 2e-2)


@pytest.mark.parametrize("kwargs", [
    dict(features=16, kernel_size=(3, 3), strides=2, padding=((1, 1), (1, 1)), use_bias=False),
    dict(features=8, kernel_size=(3, 3), padding=4, kernel_dilation=4),
    dict(features=1, kernel_size=(7, 7), padding=3, use_bias=False),
    dict(features=16, kernel_size=(3, 3), padding="SAME", dtype=jnp.bfloat16),
    dict(features=16, kernel_size=(3, 3), padding=1, feature_group_count=4),
])
def test_conv_module_matches_nn_conv(kwargs):
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 9, 9, 8))
    reference, ours = nn.Conv(**kwargs), ops.Conv(**kwargs)
    params_ref = reference.init(jax.random.PRNGKey(2), x)
    params = ours.init(jax.random.PRNGKey(2), x)
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(params_ref)
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, params_ref)
    _assert_close(ours.apply(params, x), reference.apply(params_ref, x), 1e-6)


@pytest.mark.parametrize("kwargs", [
    dict(features=1, kernel_size=(5,), padding=2, use_bias=False),  # ECA's conv across channels
    dict(features=4, kernel_size=3, strides=2, padding="SAME"),
    dict(features=4, kernel_size=(3,), padding=((2, 0),), kernel_dilation=2),
])
def test_conv_module_matches_nn_conv_in_1d(kwargs):
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 11, 3))
    reference, ours = nn.Conv(**kwargs), ops.Conv(**kwargs)
    params_ref, params = reference.init(jax.random.PRNGKey(2), x), ours.init(jax.random.PRNGKey(2), x)
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, params_ref)  # same (k, C_in, C_out) kernel
    for impl in ("auto", "xla"):
        _assert_close(ours.clone(impl=impl).apply(params, x), reference.apply(params_ref, x), 1e-6)
    grad = lambda m, p: jax.grad(lambda q: jnp.sum(jnp.sin(m.apply(q, x))))(p)  # noqa: E731
    jax.tree_util.tree_map(lambda a, b: _assert_close(a, b, 1e-6), grad(ours, params), grad(reference, params_ref))


def test_conv_kernel_rank_must_match_the_input():
    with pytest.raises(ValueError, match=r"1-D kernel_size 3 takes \[N, W, C\] input.*kernel_size=\(k, k\)"):
        ops.Conv(1, 3).init(jax.random.PRNGKey(0), jnp.zeros((1, 4, 4, 1)))
    with pytest.raises(ValueError, match="2-D kernel_size .* takes NHWC input"):
        ops.Conv(1, (3, 3)).init(jax.random.PRNGKey(0), jnp.zeros((1, 4, 1)))


class _TinyNet(nn.Module):
    """Stem, strided block with a 1x1 shortcut, a dilated conv, global pool: every conv kind in two layers."""

    conv: type = ops.Conv

    @nn.compact
    def __call__(self, x):
        x = nn.relu(self.conv(8, (7, 7), strides=2, padding=3, use_bias=False)(x))
        y = nn.relu(self.conv(16, (3, 3), strides=2, padding=1)(x))
        y = self.conv(16, (3, 3), padding=2, kernel_dilation=2)(y)
        x = nn.relu(y + self.conv(16, (1, 1), strides=2, padding=0, use_bias=False)(x))
        return nn.Dense(3)(jnp.mean(x, axis=(1, 2)))


def test_network_gradients_equal_across_impls_under_jit():
    x = jax.random.normal(jax.random.PRNGKey(0), (5, 16, 12, 3))
    labels = jnp.array([0, 1, 2, 0, 1])
    net = _TinyNet()
    params = net.init(jax.random.PRNGKey(1), x)

    def loss(p, impl):
        with ops.default_impl(impl):
            logits = net.apply(p, x)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1))

    grads = {impl: jax.jit(jax.grad(functools.partial(loss, impl=impl)))(params) for impl in ("xla", "auto")}
    jax.tree_util.tree_map(lambda a, b: _assert_close(a, b, 1e-5), grads["auto"], grads["xla"])


def _cpu_and_gpu_hlo(shape):
    """HLO of the conv's input and weight gradients, lowered for the CPU and for CUDA."""
    _, _, _, _, _, _, stride, padding, _ = shape
    x, kernel, _ = _operands(shape)
    f = jax.grad(lambda a, b: jnp.sum(ops.conv2d(a, b, (stride, stride), padding) ** 2), argnums=(0, 1))
    cpu_hlo = jax.jit(f).lower(x, kernel).as_text(dialect="hlo")
    gpu_hlo = jax.jit(f).trace(x, kernel).lower(lowering_platforms=("cuda",)).as_text(dialect="hlo")
    return cpu_hlo, gpu_hlo


def test_auto_uses_matmul_gradients_on_cpu_only(monkeypatch):
    cpu_hlo, gpu_hlo = _cpu_and_gpu_hlo((2, 8, 8, 16, 32, 3, 1, 1, 1))
    assert cpu_hlo.count("convolution(") == 0 and " dot(" in cpu_hlo, "CPU, 3x3 stride 1: Winograd and im2col"
    assert " dot(" not in gpu_hlo and gpu_hlo.count("convolution(") == 3
    cpu_hlo, _ = _cpu_and_gpu_hlo((2, 8, 8, 128, 128, 3, 2, 1, 1))
    assert cpu_hlo.count("convolution(") == 1 and " dot(" in cpu_hlo, "CPU, strided: XLA's forward only"
    monkeypatch.setattr(conv_lib, "_IM2COL_MAX_FEATURES", 64)  # jax < 0.11's setting
    cpu_hlo, gpu_hlo = _cpu_and_gpu_hlo((2, 8, 8, 64, 128, 3, 2, 1, 1))
    assert cpu_hlo.count("convolution(") == 0, "CPU, strided with 64 input channels: im2col forward"
    assert " dot(" not in gpu_hlo and gpu_hlo.count("convolution(") == 3


def test_chunked_im2col_forward_with_a_remainder_chunk():
    shape = (7, 4, 5, 8, 16, 3, 1, 1, 1)
    x, kernel, kg = _operands(shape)
    y_ref, _ = _grads(shape, "xla", x, kernel, kg)
    pads = ((1, 1), (1, 1))
    y = jax.jit(functools.partial(conv_lib.chunked_im2col_conv, strides=(1, 1), padding=pads, dilation=(1, 1),
                                  target_rows=60))(x, kernel)  # chunks of 3 images: 3 + 3 + 1
    _assert_close(y, y_ref, 1e-6)


@pytest.mark.parametrize("padding", [((1, 1), (1, 1)), ((0, 2), (1, 0)), ((0, 0), (0, 0)), ((2, 2), (3, 1))])
@pytest.mark.parametrize("hw", [(8, 8), (7, 5), (4, 3)])
def test_winograd_conv_equals_xla(padding, hw):
    x = jnp.asarray(np.random.RandomState(0).randn(2, *hw, 8), jnp.float32)
    kernel = jnp.asarray(np.random.RandomState(1).randn(3, 3, 8, 16) / np.sqrt(72), jnp.float32)
    y = jax.jit(functools.partial(winograd.winograd_conv, padding=padding))(x, kernel)
    _assert_close(y, conv_lib.xla_conv(x, kernel, (1, 1), padding, (1, 1)), 2e-6)


def test_chunked_winograd_conv_with_a_remainder_chunk_and_bfloat16():
    x = jnp.asarray(np.random.RandomState(0).randn(7, 6, 6, 16), jnp.float32)
    kernel = jnp.asarray(np.random.RandomState(1).randn(3, 3, 16, 16) / 12, jnp.float32)
    pads = ((1, 1), (1, 1))
    y_ref = conv_lib.xla_conv(x, kernel, (1, 1), pads, (1, 1))
    conv = functools.partial(conv_lib.chunked_winograd_conv, padding=pads, target_rows=108)  # chunks 3 + 3 + 1
    _assert_close(jax.jit(conv)(x, kernel), y_ref, 2e-6)
    y16 = jax.jit(conv)(x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16))
    assert y16.dtype == jnp.float32, "transforms and products in float32; the caller casts"
    _assert_close(y16, y_ref, 2e-2)


def test_invalid_impl_and_padding_are_rejected():
    with pytest.raises(ValueError, match="impl"):
        ops.conv2d(jnp.zeros((1, 4, 4, 1)), jnp.zeros((3, 3, 1, 1)), impl="fast")
    with pytest.raises(ValueError, match="padding"):
        ops.Conv(1, (3, 3), padding="CIRCULAR").init(jax.random.PRNGKey(0), jnp.zeros((1, 4, 4, 1)))


def test_resnet_with_ops_conv_has_nn_conv_parameters_and_outputs():
    from attn_flax import models

    resnet = models.ResNet(stage_sizes=(1, 1), block_cls=models.Bottleneck, num_classes=3, widths=(8, 16),
                           stem="imagenet", attention=models.attention_factory("cbam", reduction=4))
    x = jnp.asarray(np.random.RandomState(0).randn(2, 16, 16, 3), jnp.float32)
    ours, reference = resnet.clone(conv=ops.Conv), resnet.clone(conv=nn.Conv)
    variables = jax.jit(functools.partial(ours.init, train=False))(jax.random.PRNGKey(0), x)
    variables_ref = jax.jit(functools.partial(reference.init, train=False))(jax.random.PRNGKey(0), x)
    assert jax.tree_util.tree_structure(variables) == jax.tree_util.tree_structure(variables_ref)
    jax.tree_util.tree_map(np.testing.assert_array_equal, variables, variables_ref)
    apply = lambda m: jax.jit(functools.partial(m.apply, train=True, mutable=["batch_stats"]))  # noqa: E731
    out, _ = apply(ours)(variables, x)
    out_ref, _ = apply(reference)(variables, x)
    _assert_close(out, out_ref, 1e-5)


def test_thin_conv_forward_and_input_grad_are_shifted_sums_on_cpu_only():
    x, kernel, _ = _operands(SHAPES["7x7_cbam_spatial"])
    f = jax.grad(lambda a: jnp.sum(ops.conv2d(a, kernel, padding=3) ** 2))
    cpu_hlo = jax.jit(f).lower(x).as_text(dialect="hlo")
    assert "convolution(" not in cpu_hlo, "CPU: forward and input gradient of a thin conv are elementwise sums"
    gpu_hlo = jax.jit(f).trace(x).lower(lowering_platforms=("cuda",)).as_text(dialect="hlo")
    assert gpu_hlo.count("convolution(") >= 2


@pytest.mark.parametrize("padding", [((3, 3), (3, 3)), ((0, 2), (4, 1)), "VALID"])
def test_shifted_sum_input_grad_equals_xla(padding):
    shape = (2, 9, 11, 2, 3, 5, 1, padding, 2)
    x, kernel, kg = _operands(shape)
    y_ref, (dx_ref, dw_ref) = _grads(shape, "xla", x, kernel, kg)
    y, (dx, dw) = jax.jit(lambda a, b: _grads(shape, "auto", a, b, kg))(x, kernel)
    _assert_close(y, y_ref, 1e-6)
    _assert_close(dx, dx_ref, 1e-5)
    _assert_close(dw, dw_ref, 1e-5)


@pytest.mark.parametrize("name", ["3x3_on_2x2_map", "3x3_stride2_to_2x2_map"])
def test_maps_smaller_than_the_kernel_use_products_on_cpu_only(name):
    n, h, w, cin, cout, k, stride, padding, _ = SHAPES[name]
    x, kernel, _ = _operands(SHAPES[name])
    f = jax.grad(lambda a, b: jnp.sum(ops.conv2d(a, b, strides=(stride, stride), padding=padding) ** 2), argnums=(0, 1))
    cpu_hlo = jax.jit(f).lower(x, kernel).as_text(dialect="hlo")
    assert "convolution(" not in cpu_hlo, "CPU: XLA's slow loop for maps smaller than the kernel must not appear"
    gpu_hlo = jax.jit(f).trace(x, kernel).lower(lowering_platforms=("cuda",)).as_text(dialect="hlo")
    assert gpu_hlo.count("convolution(") >= 3


on_gpu = pytest.mark.skipif(jax.default_backend() != "gpu",
                            reason="needs a GPU: JAX_PLATFORMS=cuda pytest tests/test_conv.py -k gpu")


def _custom_call_targets(compiled_text: str) -> list[str]:
    return sorted(t for t in compiled_text.split('custom_call_target="')[1:] for t in [t.split('"')[0]])


@on_gpu
@pytest.mark.parametrize("name", sorted(SHAPES))
def test_gpu_runs_the_same_kernels_as_xla(name):
    """On a GPU, 'auto' compiles to the library calls XLA's own path makes, with XLA's results.

    Results are compared to float32 tolerance, not bitwise: each compile autotunes its cuDNN algorithms afresh.
    TF32 is off (precision 'highest') so that two algorithms differ only in float32 rounding.
    """
    shape = SHAPES[name]
    x, kernel, kg = _operands(shape)
    with jax.default_matmul_precision("highest"):
        auto, xla = (jax.jit(lambda a, b, impl=impl: _grads(shape, impl, a, b, kg)) for impl in ("auto", "xla"))
        targets = _custom_call_targets(auto.lower(x, kernel).compile().as_text())
        assert targets == _custom_call_targets(xla.lower(x, kernel).compile().as_text())
        assert name == "7x7_cbam_spatial" or any("cudnn$conv" in t for t in targets), targets
        jax.tree_util.tree_map(lambda a, b: _assert_close(a, b, 1e-6), auto(x, kernel), xla(x, kernel))


@on_gpu
def test_gpu_resnet_train_gradients_equal_xla():
    from attn_flax import models

    resnet = models.ResNet(stage_sizes=(1, 1), block_cls=models.Bottleneck, num_classes=3, widths=(8, 16),
                           stem="imagenet", attention=models.attention_factory("cbam", reduction=4))
    x = jnp.asarray(np.random.RandomState(0).randn(4, 32, 32, 3), jnp.float32)
    variables = resnet.init(jax.random.PRNGKey(0), x, train=False)

    def grads(impl):
        def loss(params):
            with ops.default_impl(impl):
                logits, _ = resnet.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
            return jnp.sum(jax.nn.log_softmax(logits)[:, 0])
        step = jax.jit(jax.grad(loss))
        return _custom_call_targets(step.lower(variables["params"]).compile().as_text()), step(variables["params"])

    with jax.default_matmul_precision("highest"):
        (targets, auto), (targets_ref, xla) = grads("auto"), grads("xla")
    assert targets == targets_ref
    jax.tree_util.tree_map(lambda a, b: _assert_close(a, b, 1e-5), auto, xla)
