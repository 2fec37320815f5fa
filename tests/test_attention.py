"""Attention modules against an independent NumPy computation of their equations, plus invariants and factory.

Every module is run with random parameters and random BatchNorm statistics (at initialisation the CBAM
spatial BN scale is zero, which would hide a wrong spatial branch), in train and eval mode.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from attn_flax import attention

RTOL = 2e-5
ATOL = 2e-5


# ----------------------------------------------------------------------------- NumPy reference

def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def dense(x, p):
    return x @ np.asarray(p["kernel"], np.float64) + np.asarray(p["bias"], np.float64)


def conv2d(x, kernel, *, dilation=1, bias=None):
    """'Same' NHWC convolution with HWIO kernel, stride 1, zero padding dilation * (k // 2)."""
    kernel = np.asarray(kernel, np.float64)
    kh, kw, _, _ = kernel.shape
    ph, pw = dilation * (kh // 2), dilation * (kw // 2)
    padded = np.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0)))
    height, width = x.shape[1:3]
    out = 0.0
    for a in range(kh):
        for b in range(kw):
            window = padded[:, a * dilation:a * dilation + height, b * dilation:b * dilation + width, :]
            out = out + np.einsum("nhwc,co->nhwo", window, kernel[a, b])
    return out if bias is None else out + np.asarray(bias, np.float64)


def batch_norm(x, params, stats, *, train, eps=1e-5):
    """BN over every axis but the last; train mode uses the batch's biased statistics."""
    axes = tuple(range(x.ndim - 1))
    if train:
        mean, var = x.mean(axis=axes), x.var(axis=axes)
    else:
        mean, var = np.asarray(stats["mean"], np.float64), np.asarray(stats["var"], np.float64)
    return (x - mean) / np.sqrt(var + eps) * np.asarray(params["scale"]) + np.asarray(params["bias"])


def global_pool(x, kind):
    if kind == "avg":
        return x.mean(axis=(1, 2))
    if kind == "max":
        return x.max(axis=(1, 2))
    if kind == "lp":
        return np.sqrt((x ** 2).sum(axis=(1, 2)))
    return np.log(np.exp(x).sum(axis=(1, 2)))


def ref_cbam_channel_gate(x, p, pool_types):
    mlp = lambda v: dense(np.maximum(dense(v, p["fc1"]), 0), p["fc2"])  # noqa: E731
    return sigmoid(sum(mlp(global_pool(x, kind)) for kind in pool_types))[:, None, None, :]


def ref_cbam_spatial_gate(x, p, stats, *, train, norm):
    pooled = np.concatenate([x.max(axis=-1, keepdims=True), x.mean(axis=-1, keepdims=True)], axis=-1)
    logits = conv2d(pooled, p["conv"]["kernel"], bias=None if norm else p["conv"]["bias"])
    if norm:
        logits = batch_norm(logits, p["bn"], stats["bn"], train=train)
    return sigmoid(logits)


def ref_cbam(x, variables, *, train, order="channel_first", pool_types=("avg", "max"), spatial=True,
             spatial_norm=True):
    p, s = variables["params"], variables.get("batch_stats", {})
    mc = lambda f: ref_cbam_channel_gate(f, p["ChannelGate"], pool_types)  # noqa: E731
    ms = lambda f: ref_cbam_spatial_gate(f, p["SpatialGate"], s.get("SpatialGate"), train=train,  # noqa: E731
                                         norm=spatial_norm)
    if not spatial:
        return x * mc(x)
    if order == "channel_first":
        f = x * mc(x)
        return f * ms(f)
    if order == "spatial_first":
        f = x * ms(x)
        return f * mc(f)
    return x * mc(x) * ms(x)


def ref_bam(x, variables, *, train, combine, num_dilated_convs=2, dilation=4):
    p, s = variables["params"], variables["batch_stats"]
    pc, sc = p["channel"], s["channel"]
    hidden = np.maximum(batch_norm(dense(x.mean(axis=(1, 2)), pc["fc_0"]), pc["bn_0"], sc["bn_0"],
                                   train=train), 0)
    mc = dense(hidden, pc["fc_final"])[:, None, None, :]
    ps, ss = p["spatial"], s["spatial"]
    h = conv2d(x, ps["conv_reduce"]["kernel"], bias=ps["conv_reduce"]["bias"])
    h = np.maximum(batch_norm(h, ps["bn_reduce"], ss["bn_reduce"], train=train), 0)
    for i in range(num_dilated_convs):
        conv = ps[f"conv_dilated_{i}"]
        h = conv2d(h, conv["kernel"], dilation=dilation, bias=conv["bias"])
        h = np.maximum(batch_norm(h, ps[f"bn_dilated_{i}"], ss[f"bn_dilated_{i}"], train=train), 0)
    ms = conv2d(h, ps["conv_final"]["kernel"], bias=ps["conv_final"]["bias"])
    m = sigmoid(mc + ms if combine == "sum" else mc * ms)
    return x * (1 + m)


def ref_se(x, variables):
    p = variables["params"]
    return x * sigmoid(dense(np.maximum(dense(x.mean(axis=(1, 2)), p["fc1"]), 0), p["fc2"]))[:, None, None, :]


def ref_eca(x, variables):
    w = np.asarray(variables["params"]["conv"]["kernel"], np.float64)[:, 0, 0]
    k = len(w)
    y = np.pad(x.mean(axis=(1, 2)), ((0, 0), (k // 2, k // 2)))
    channels = x.shape[-1]
    logits = sum(w[t] * y[:, t:t + channels] for t in range(k))
    return x * sigmoid(logits)[:, None, None, :]


# ----------------------------------------------------------------------------- helpers

def small(name, **options):
    """The module registered as ``name``, with reduction 4 where it has a reduction (narrow test maps)."""
    if "reduction" in attention.options(name):
        options.setdefault("reduction", 4)
    return attention.create(name, **options)


def make_input(shape=(3, 9, 13, 32), seed=0):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def randomized_variables(module, x, seed=1):
    """Initialised variables with every parameter and BN statistic replaced by random values."""
    variables = module.init(jax.random.key(seed), x, train=False)
    keys = iter(jax.random.split(jax.random.key(seed + 100), 1000))

    def rand_param(leaf):
        return 0.5 * jax.random.normal(next(keys), leaf.shape, leaf.dtype)

    def rand_stat(path, leaf):
        if path[-1].key == "var":
            return jax.random.uniform(next(keys), leaf.shape, leaf.dtype, 0.5, 1.5)
        return 0.3 * jax.random.normal(next(keys), leaf.shape, leaf.dtype)

    out = {"params": jax.tree.map(rand_param, variables["params"])}
    if "batch_stats" in variables:
        out["batch_stats"] = jax.tree_util.tree_map_with_path(rand_stat, variables["batch_stats"])
    return out


def run(module, variables, x, *, train):
    """Applies the module under jit; returns (output, new batch_stats or None, intermediates)."""
    mutable = ["intermediates"] + (["batch_stats"] if train else [])
    fn = jax.jit(lambda v, x: module.apply(v, x, train=train, mutable=mutable))
    y, state = fn(variables, x)
    return y, state.get("batch_stats"), state.get("intermediates", {})


def assert_matches(y, expected):
    np.testing.assert_allclose(np.asarray(y, np.float64), expected, rtol=RTOL, atol=ATOL)


# ----------------------------------------------------------------------------- parity with NumPy

@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("order", ["channel_first", "spatial_first", "parallel"])
def test_cbam_matches_numpy(order, train):
    module = attention.CBAM(reduction=4, order=order)
    x = make_input()
    variables = randomized_variables(module, x)
    y, _, _ = run(module, variables, x, train=train)
    assert_matches(y, ref_cbam(np.asarray(x, np.float64), variables, train=train, order=order))


@pytest.mark.parametrize("options", [
    dict(pool_types=("avg", "max", "lp", "lse")),
    dict(pool_types=("avg",), kernel_size=3),
    dict(spatial=False),
    dict(spatial_norm=False),
], ids=["all-pools", "avg-k3", "channel-only", "no-spatial-bn"])
@pytest.mark.parametrize("train", [False, True])
def test_cbam_options_match_numpy(options, train):
    module = attention.CBAM(reduction=4, **options)
    x = make_input()
    variables = randomized_variables(module, x)
    y, _, _ = run(module, variables, x, train=train)
    kw = {k: v for k, v in options.items() if k in ("pool_types", "spatial", "spatial_norm")}
    assert_matches(y, ref_cbam(np.asarray(x, np.float64), variables, train=train, **kw))


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("combine", ["sum", "product"])
def test_bam_matches_numpy(combine, train):
    module = attention.BAM(reduction=4, combine=combine)
    x = make_input()
    variables = randomized_variables(module, x)
    y, _, _ = run(module, variables, x, train=train)
    assert_matches(y, ref_bam(np.asarray(x, np.float64), variables, train=train, combine=combine))


def test_bam_depth_and_dilation_options_match_numpy():
    module = attention.BAM(reduction=8, dilation=2, num_dilated_convs=1)
    x = make_input()
    variables = randomized_variables(module, x)
    y, _, _ = run(module, variables, x, train=True)
    assert_matches(y, ref_bam(np.asarray(x, np.float64), variables, train=True, combine="sum",
                              num_dilated_convs=1, dilation=2))
    assert "conv_dilated_1" not in variables["params"]["spatial"]


@pytest.mark.parametrize("train", [False, True])
def test_se_matches_numpy(train):
    module = attention.SE(reduction=4)
    x = make_input()
    variables = randomized_variables(module, x)
    y, _, _ = run(module, variables, x, train=train)
    assert_matches(y, ref_se(np.asarray(x, np.float64), variables))


@pytest.mark.parametrize("kernel_size", [None, 5])
def test_eca_matches_numpy(kernel_size):
    module = attention.ECA(kernel_size=kernel_size)
    x = make_input()
    variables = randomized_variables(module, x)
    y, _, _ = run(module, variables, x, train=True)
    assert_matches(y, ref_eca(np.asarray(x, np.float64), variables))


# ----------------------------------------------------------------------------- BatchNorm behaviour

@pytest.mark.parametrize("name, bn_path, momentum", [
    ("cbam", ("SpatialGate", "bn"), 0.99),
    ("bam", ("spatial", "bn_reduce"), 0.9),
    ("bam", ("channel", "bn_0"), 0.9),
])
def test_batch_stats_follow_the_official_momentum(name, bn_path, momentum):
    """Running statistics move by PyTorch's momentum (CBAM's BasicConv: 0.01, BAM: default 0.1)."""
    module = small(name)
    x = make_input()
    variables = randomized_variables(module, x)
    _, stats, inter = run(module, variables, x, train=True)
    old, new = variables["batch_stats"], stats
    for key in bn_path:
        old, new = old[key], new[key]
    # The BN input is not observable from outside, so check the update's shape: mean moves from the old value by
    # exactly (1 - momentum) of the distance to some batch mean; with two steps on the same batch the second move
    # is `momentum` times the first.
    _, stats2, _ = run(module, {"params": variables["params"], "batch_stats": stats}, x, train=True)
    newer = stats2
    for key in bn_path:
        newer = newer[key]
    first = np.asarray(new["mean"]) - np.asarray(old["mean"])
    second = np.asarray(newer["mean"]) - np.asarray(new["mean"])
    np.testing.assert_allclose(second, momentum * first, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("name", ["cbam", "bam"])
def test_eval_uses_running_stats_and_train_uses_the_batch(name):
    """In eval mode an example's output does not depend on the rest of its batch; in train mode it does."""
    module = small(name)
    x = make_input((4, 6, 6, 32))
    variables = randomized_variables(module, x)
    full, _, _ = run(module, variables, x, train=False)
    alone, _, _ = run(module, variables, x[:1], train=False)
    np.testing.assert_allclose(np.asarray(alone[0]), np.asarray(full[0]), rtol=1e-5, atol=1e-6)
    full, _, _ = run(module, variables, x, train=True)
    alone, _, _ = run(module, variables, x[:2], train=True)
    assert not np.allclose(np.asarray(alone[0]), np.asarray(full[0]), rtol=1e-3, atol=1e-4)


# ----------------------------------------------------------------------------- invariants

@pytest.mark.parametrize("name", ["se", "eca", "cbam", "bam"])
@pytest.mark.parametrize("shape", [(2, 9, 13, 32), (1, 5, 3, 32)], ids=["9x13", "batch1-5x3"])
@pytest.mark.parametrize("train", [False, True])
def test_shape_kept_and_gates_in_unit_interval(name, shape, train):
    module = small(name)
    x = make_input(shape)
    variables = randomized_variables(module, x)
    y, _, inter = run(module, variables, x, train=train)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert np.all(np.isfinite(np.asarray(y)))
    gates = jax.tree.leaves(inter)
    assert gates, "every module sows its attention maps"
    for gate in gates:
        g = np.asarray(gate)  # sigmoid of random weights may round to exactly 0 or 1 in float32
        assert np.all(g >= 0) and np.all(g <= 1) and np.ptp(g) > 0
    _, _, inter = run(module, module.init(jax.random.key(0), x, train=False), x, train=train)
    for gate in jax.tree.leaves(inter):
        assert np.all(np.asarray(gate) > 0) and np.all(np.asarray(gate) < 1)


@pytest.mark.parametrize("name", ["se", "eca", "cbam", "bam"])
def test_bfloat16_activations(name):
    """dtype=bfloat16 computes in bfloat16 with float32 params, close to the float32 result."""
    x = make_input((2, 8, 12, 32))
    module32 = small(name)
    module16 = small(name, dtype=jnp.bfloat16)
    variables = randomized_variables(module32, x)
    y32, _, _ = run(module32, variables, x, train=False)
    y16, _, _ = run(module16, variables, x.astype(jnp.bfloat16), train=False)
    assert y16.dtype == jnp.bfloat16
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(module16.init(
        jax.random.key(0), x.astype(jnp.bfloat16), train=False)))
    np.testing.assert_allclose(np.asarray(y16, np.float32), np.asarray(y32), rtol=0.05, atol=0.05)


# ----------------------------------------------------------------------------- initialisation

def test_cbam_spatial_gate_starts_at_one_half():
    """Official init: spatial BN scale 0, so sigmoid(BN(.)) = sigmoid(0) = 0.5 everywhere at init."""
    module = attention.CBAM()
    x = make_input((2, 8, 8, 64))
    variables = module.init(jax.random.key(0), x, train=False)
    assert np.all(np.asarray(variables["params"]["SpatialGate"]["bn"]["scale"]) == 0)
    _, inter = module.apply(variables, x, train=False, mutable=["intermediates"])
    np.testing.assert_array_equal(np.asarray(inter["intermediates"]["spatial_attention"][0]), 0.5)


@pytest.mark.parametrize("name", ["se", "cbam", "bam"])
def test_init_biases_zero_and_mlp_uniform(name):
    module = attention.create(name)
    x = make_input((2, 8, 8, 256))
    params = module.init(jax.random.key(0), x, train=False)["params"]
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        key = jax.tree_util.keystr(path)
        leaf = np.asarray(leaf)
        if key.endswith("['bias']"):
            assert np.all(leaf == 0), key
        if "fc" in key and key.endswith("['kernel']"):
            bound = 1 / np.sqrt(leaf.shape[0])
            assert np.abs(leaf).max() <= bound and np.abs(leaf).max() > 0.8 * bound, key


def test_bam_convs_are_kaiming_normal_fan_out():
    module = attention.BAM()
    x = make_input((1, 8, 8, 512))
    kernel = np.asarray(module.init(jax.random.key(0), x, train=False)["params"]["spatial"]["conv_reduce"]["kernel"])
    fan_out = kernel.shape[-1] * kernel.shape[0] * kernel.shape[1]
    assert kernel.std() == pytest.approx(np.sqrt(2.0 / fan_out), rel=0.05)
    assert np.abs(kernel).max() > 2.5 * kernel.std()  # an untruncated normal, as PyTorch's


# ----------------------------------------------------------------------------- ECA kernel rule

@pytest.mark.parametrize("channels, k", [(64, 3), (128, 5), (256, 5), (512, 5), (1024, 5), (2048, 7)])
def test_eca_adaptive_kernel_size(channels, k):
    assert attention.adaptive_kernel_size(channels) == k
    params = jax.eval_shape(lambda: attention.ECA().init(jax.random.key(0), jnp.zeros((1, 2, 2, channels)),
                                                         train=False))["params"]
    assert params["conv"]["kernel"].shape == (k, 1, 1)


# ----------------------------------------------------------------------------- parameter counts

def count_params(module, channels):
    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, 8, 8, channels)), train=False))
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(shapes["params"]))


@pytest.mark.parametrize("name, expected", [
    # SE: two FCs with bias, 256 -> 16 -> 256.
    ("se", 256 * 16 + 16 + 16 * 256 + 256),
    # ECA: one 1-D kernel of 5 taps for C=256.
    ("eca", 5),
    # CBAM: the SE-sized MLP, a 7x7x2 conv with no bias, one BN (scale, bias).
    ("cbam", 256 * 16 + 16 + 16 * 256 + 256 + 7 * 7 * 2 + 2),
    # BAM: channel FC+BN1d+FC; spatial 1x1 reduce + BN, 2 x (3x3 + BN), 1x1 to one map.
    ("bam", (256 * 16 + 16) + 2 * 16 + (16 * 256 + 256)
            + (256 * 16 + 16) + 2 * 16 + 2 * (9 * 16 * 16 + 16 + 2 * 16) + (16 + 1)),
])
def test_parameter_count_on_256_channels(name, expected):
    assert count_params(attention.create(name), 256) == expected


# ----------------------------------------------------------------------------- factory and registry

def test_registry_lists_the_four_modules_and_their_placement():
    assert set(attention.available()) >= {"se", "eca", "cbam", "bam"}
    assert [attention.placement(n) for n in ("se", "eca", "cbam", "bam")] == ["block", "block", "block", "stage"]
    assert isinstance(attention.create("cbam", reduction=8), attention.CBAM)
    assert attention.create("bam", combine="product").combine == "product"


def test_unknown_name_names_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown attention 'cbma'.*bam, cbam, eca, se"):
        attention.create("cbma")
    with pytest.raises(ValueError, match="valid names"):
        attention.placement("nope")
    with pytest.raises(ValueError, match="valid names"):
        attention.factory("nope")


def test_unknown_option_names_the_valid_ones():
    with pytest.raises(ValueError, match=r"'se' takes no option 'kernel_size'; valid options: reduction"):
        attention.create("se", kernel_size=7)
    with pytest.raises(ValueError, match="valid options: reduction, dilation, num_dilated_convs, combine"):
        attention.factory("bam", order="parallel")


@pytest.mark.parametrize("name, options, message", [
    ("cbam", dict(order="sideways"), "order 'sideways' is not one of channel_first, spatial_first, parallel"),
    ("cbam", dict(pool_types=("avg", "median")), "pool_types"),
    ("cbam", dict(kernel_size=4), "kernel_size must be a positive odd number"),
    ("bam", dict(combine="max"), "combine 'max' is not one of sum, product"),
    ("eca", dict(kernel_size=2), "kernel_size must be a positive odd number"),
    ("se", dict(reduction=0), "reduction must be >= 1"),
])
def test_bad_option_values_fail_at_construction(name, options, message):
    with pytest.raises(ValueError, match=message):
        attention.create(name, **options)
    with pytest.raises(ValueError, match=message):
        attention.factory(name, **options)


def test_user_can_register_a_new_module():
    class Identity(nn.Module):
        scale: float = 1.0

        @nn.compact
        def __call__(self, x, *, train):
            return x * self.scale

    attention.register("test_identity", Identity, placement="block")
    try:
        assert "test_identity" in attention.available()
        factory = attention.factory("test_identity", scale=2.0)
        assert factory.placement == "block"
        x = make_input((1, 4, 4, 8))
        np.testing.assert_allclose(factory(name="att").apply({}, x, train=False), 2 * x)
        with pytest.raises(ValueError, match="already registered"):
            attention.register("test_identity", Identity, placement="block")
        with pytest.raises(ValueError, match="placement 'everywhere'"):
            attention.register("test_other", Identity, placement="everywhere")
    finally:
        attention.registry._REGISTRY.pop("test_identity", None)


def test_factory_is_hashable_and_builds_fresh_modules():
    factory = attention.factory("cbam", reduction=8, order="parallel")
    assert hash(factory) == hash(attention.factory("cbam", order="parallel", reduction=8))
    first, second = factory(dtype=jnp.bfloat16), factory()
    assert first is not second
    assert (first.reduction, first.order, first.dtype) == (8, "parallel", jnp.bfloat16)
    assert dataclasses.replace(factory, options=()).placement == "block"


# ----------------------------------------------------------------------------- fast paths, gradients as XLA's

def _first_max_gradient(x: np.ndarray, g: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    """NumPy reference: each window's cotangent on its first (row-major) maximum."""
    kept = tuple(a for a in range(x.ndim) if a not in axes)
    flat = np.transpose(x, kept + axes).reshape(tuple(x.shape[a] for a in kept) + (-1,))
    onehot = np.eye(flat.shape[-1], dtype=x.dtype)[np.argmax(flat, axis=-1)]
    moved = (onehot * g.reshape(onehot.shape[:-1] + (1,))).reshape(tuple(x.shape[a] for a in kept + axes))
    return np.transpose(moved, np.argsort(kept + axes))


@pytest.mark.parametrize("axis,keepdims", [((1, 2), False), (-1, True), (-1, False)])
def test_reduce_max_gradient_goes_to_the_first_maximum_with_ties(axis, keepdims):
    from attn_flax.ops.reductions import reduce_max

    x = np.random.RandomState(0).randn(2, 5, 6, 8).astype(np.float32)
    x[0, 1:4, 2, 3] = x[0, :, :, 3].max() + 1.0  # a three-way tie in a spatial max
    x[1, 2, 3, 4:7] = x[1, 2, 3].max() + 1.0  # a three-way tie in a channel max
    g = np.random.RandomState(1).randn(*np.max(x, axis, keepdims=keepdims).shape).astype(np.float32)
    y, vjp = jax.vjp(lambda a: reduce_max(a, axis, keepdims), jnp.asarray(x))
    np.testing.assert_array_equal(y, np.max(x, axis, keepdims=keepdims))
    axes = tuple(sorted(a % 4 for a in ((axis,) if isinstance(axis, int) else axis)))
    dx = np.asarray(jax.jit(vjp)(jnp.asarray(g))[0])
    np.testing.assert_array_equal(dx, _first_max_gradient(x, g, axes))
    assert np.count_nonzero(dx) == g.size, "one element of each window takes the whole cotangent"


def test_reduce_max_index_falls_back_to_argmax_when_no_element_equals_the_maximum():
    """What XLA's recomputation with other rounding looks like: a maximum that matches no element of x."""
    from attn_flax.ops.reductions import first_max_index

    x = jnp.asarray(np.random.RandomState(2).randn(2, 4, 5, 3).astype(np.float32))
    m = jnp.max(x, axis=(1, 2), keepdims=True)
    expected = np.argmax(np.asarray(x).reshape(2, 20, 3), axis=1)[:, None, None, :]
    np.testing.assert_array_equal(jax.jit(first_max_index, static_argnums=2)(x, m, (1, 2)), expected)
    np.testing.assert_array_equal(jax.jit(first_max_index, static_argnums=2)(x, m * (1 + 1e-6) + 1e-6, (1, 2)),
                                  expected)


def test_reduce_max_gradient_is_finite_after_a_batch_norm_at_imagenet_map_sizes():
    """ResNet's last stage (7x7x512 at 224x224): XLA recomputes the BatchNorm inside the backward fusions with
    other rounding. The former rule (a tie mask and a tie count compared again there) gave g / 0 in ~1% of the
    channels; every seed tried failed."""
    from attn_flax.ops.reductions import reduce_max

    def loss(scale, x):
        normed = (x - jnp.mean(x, (0, 1, 2))) * jax.lax.rsqrt(jnp.var(x, (0, 1, 2)) + 1e-5) * scale
        return jnp.sum(reduce_max(normed, (1, 2)) * jnp.arange(512.0))

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    for seed in range(3):
        x = jax.random.normal(jax.random.key(seed), (2, 7, 7, 512))
        d_scale, dx = grad(jnp.ones(512), x)
        assert bool(jnp.all(jnp.isfinite(d_scale))) and bool(jnp.all(jnp.isfinite(dx)))
        ref_scale = jax.grad(lambda s: jnp.sum(jnp.max((x - jnp.mean(x, (0, 1, 2))) * jax.lax.rsqrt(
            jnp.var(x, (0, 1, 2)) + 1e-5) * s, (1, 2)) * jnp.arange(512.0)))(jnp.ones(512))
        np.testing.assert_allclose(d_scale, ref_scale, rtol=1e-5, atol=1e-4)


class _NativeSpatialGate(nn.Module):
    """CBAM's spatial gate as plain jnp.max and nn.Conv: XLA's native forward and gradients."""

    @nn.compact
    def __call__(self, x, *, train):
        pooled = jnp.concatenate([jnp.max(x, axis=-1, keepdims=True), jnp.mean(x, axis=-1, keepdims=True)], -1)
        logits = nn.Conv(1, (7, 7), padding=3, use_bias=False, name="conv")(pooled)
        return nn.sigmoid(nn.BatchNorm(use_running_average=not train, momentum=0.99, epsilon=1e-5,
                                       name="bn")(logits))


@pytest.mark.parametrize("train", [True, False])
def test_cbam_spatial_gate_gradients_equal_xla_native_path(train):
    """The CPU path (fused max gradient, shifted-sum 7x7 conv and its input gradient) against jnp.max/nn.Conv."""
    from attn_flax.attention.cbam import SpatialGate

    x = make_input((3, 9, 10, 32))
    variables = randomized_variables(SpatialGate(), x)

    def loss(params, a, module):
        y = module.apply({**variables, "params": params}, a, train=train, mutable=["batch_stats"])[0]
        return jnp.sum(jnp.sin(3 * y) * a[..., :1])

    grads, grads_ref = (jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)(variables["params"], x, m)
                        for m in (SpatialGate(), _NativeSpatialGate()))
    for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(grads_ref)):
        scale = float(np.abs(b).max())
        np.testing.assert_allclose(np.asarray(a) / scale, np.asarray(b) / scale, atol=1e-5, rtol=0)
