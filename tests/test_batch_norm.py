"""ops.BatchNorm: nn.BatchNorm's names and forward pass, PyTorch's running-variance update, statistics per group of
examples (equal to separate computations on each group), on one device or a batch sharded over several."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax.sharding import NamedSharding, PartitionSpec as P

from attn_flax import ops
from attn_flax.training import sharding


def make_input(shape=(8, 5, 6, 16), seed=0):
    return jnp.asarray(np.random.RandomState(seed).randn(*shape).astype(np.float32) * 2 + 1)


def train_apply(module, variables, x):
    return module.apply(variables, x, use_running_average=False, mutable=["batch_stats"])


def test_forward_gradient_and_names_equal_flax_batch_norm():
    x = make_input()
    ours, flax_bn = ops.BatchNorm(momentum=0.9, unbiased_running_var=False), nn.BatchNorm(momentum=0.9)
    variables = flax_bn.init(jax.random.key(0), x, use_running_average=False)
    assert jax.tree.structure(ours.init(jax.random.key(0), x, use_running_average=False)) == \
        jax.tree.structure(variables)
    (y, stats), (y_ref, stats_ref) = train_apply(ours, variables, x), train_apply(flax_bn, variables, x)
    np.testing.assert_allclose(y, y_ref, atol=1e-6)
    for a, b in zip(jax.tree.leaves(stats), jax.tree.leaves(stats_ref)):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    grad = lambda m: jax.grad(lambda a: jnp.sum(jnp.sin(train_apply(m, variables, a)[0])))(x)  # noqa: E731
    np.testing.assert_allclose(grad(ours), grad(flax_bn), atol=1e-5)
    np.testing.assert_allclose(ours.apply(variables, x, use_running_average=True),
                               flax_bn.apply(variables, x, use_running_average=True), atol=1e-6)


@pytest.mark.parametrize("shape", [(8, 5, 6, 16), (4, 12)], ids=["nhwc", "batch_only"])
def test_running_variance_is_updated_with_the_unbiased_batch_variance(shape):
    """As torch.nn.BatchNorm2d / BatchNorm1d: n / (n - 1) times the biased variance (n = 4 for BAM's BatchNorm1d
    at batch 4)."""
    x = make_input(shape)
    module = ops.BatchNorm(momentum=0.9)
    variables = module.init(jax.random.key(0), x, use_running_average=False)
    _, stats = train_apply(module, variables, x)
    values = np.asarray(x, np.float64).reshape(-1, shape[-1])
    np.testing.assert_allclose(stats["batch_stats"]["var"], 0.9 + 0.1 * values.var(axis=0, ddof=1), rtol=1e-5)
    np.testing.assert_allclose(stats["batch_stats"]["mean"], 0.1 * values.mean(axis=0), rtol=1e-5, atol=1e-7)


def test_group_of_the_whole_batch_equals_no_groups():
    x = make_input()
    variables = ops.BatchNorm().init(jax.random.key(0), x, use_running_average=False)
    (y, stats), (y_ref, stats_ref) = (train_apply(ops.BatchNorm(group_size=8), variables, x),
                                      train_apply(ops.BatchNorm(), variables, x))
    np.testing.assert_array_equal(y, y_ref)
    for a, b in zip(jax.tree.leaves(stats), jax.tree.leaves(stats_ref)):
        np.testing.assert_array_equal(a, b)


def test_half_batch_groups_equal_two_separate_half_batch_computations():
    x = make_input()
    module = ops.BatchNorm(momentum=0.9, group_size=4)
    variables = ops.BatchNorm().init(jax.random.key(0), x, use_running_average=False)
    y, stats = train_apply(module, variables, x)
    halves = [train_apply(ops.BatchNorm(momentum=0.9), variables, x[i:i + 4]) for i in (0, 4)]
    np.testing.assert_allclose(y, jnp.concatenate([h[0] for h in halves]), atol=1e-6)
    for name in ("mean", "var"):  # the groups' statistics averaged, as per-device BatchNorm with averaged stats
        expected = np.mean([h[1]["batch_stats"][name] for h in halves], axis=0)
        np.testing.assert_allclose(stats["batch_stats"][name], expected, rtol=1e-6, atol=1e-7)
    whole, _ = train_apply(ops.BatchNorm(momentum=0.9), variables, x)
    assert float(jnp.max(jnp.abs(whole - y))) > 1e-2, "groups must change the normalisation"


def test_groups_on_a_batch_sharded_over_devices_equal_one_device():
    mesh = sharding.data_mesh()
    x = make_input((2 * mesh.devices.size, 5, 6, 16))
    module = ops.BatchNorm(group_size=x.shape[0] // 2)
    variables = ops.BatchNorm().init(jax.random.key(0), x, use_running_average=False)
    sharded = jax.device_put(x, NamedSharding(mesh, P("data")))
    y, stats = jax.jit(lambda v, a: train_apply(module, v, a))(variables, sharded)
    y_ref, stats_ref = train_apply(module, variables, x)
    np.testing.assert_allclose(y, y_ref, atol=1e-6)
    for a, b in zip(jax.tree.leaves(stats), jax.tree.leaves(stats_ref)):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_a_group_size_that_does_not_divide_the_batch_is_refused():
    x = make_input()
    variables = ops.BatchNorm().init(jax.random.key(0), x, use_running_average=False)
    with pytest.raises(ValueError, match="bn_group_size 3 must divide the batch of 8"):
        train_apply(ops.BatchNorm(group_size=3), variables, x)


def test_resnet_passes_the_group_size_to_its_batch_norms_and_to_cbam_and_bam():
    from attn_flax import models

    x = make_input((4, 16, 16, 3))
    for attention in ("cbam", "bam", "se"):
        model = models.create_model("resnet18", num_classes=3, attention=attention, stem="cifar")
        model = model.clone(widths=(8, 8, 8, 16), stage_sizes=(1, 1, 1, 1))
        variables = model.init(jax.random.key(0), x[:1], train=False)
        grouped = jax.jit(lambda v, a, m=model.clone(bn_group_size=2): m.apply(
            v, a, train=True, mutable=["batch_stats"]))(variables, x)
        separate = [model.apply(variables, x[i:i + 2], train=True, mutable=["batch_stats"]) for i in (0, 2)]
        np.testing.assert_allclose(grouped[0], jnp.concatenate([s[0] for s in separate]), atol=1e-5)
        averaged = jax.tree.map(lambda a, b: (a + b) / 2, separate[0][1], separate[1][1])
        for a, b in zip(jax.tree.leaves(grouped[1]), jax.tree.leaves(averaged)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
