"""ResNets with attention: the papers' parameter counts, the official placement and initialisation, forward passes
under jit in float32 and bfloat16, non-square inputs and batch 1, and the injectable conv."""
import functools
from typing import ClassVar

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from attn_flax import attention as attention_lib
from attn_flax import models

DEPTHS = (18, 34, 50, 101, 152)
ATTENTIONS = (None, "se", "eca", "cbam", "bam")
TINY_WIDTHS = (8, 16, 32, 64)


def count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@functools.lru_cache(maxsize=None)
def abstract_variables(name: str, attention, stem: str = "imagenet", num_classes: int = 1000):
    model = models.create_model(name, num_classes=num_classes, attention=attention, stem=stem)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))


def tiny(attention=None, *, block_cls=models.BasicBlock, dtype=jnp.float32, **options) -> models.ResNet:
    factory = models.attention_factory(attention, **options)
    return models.ResNet(stage_sizes=(1, 1, 1, 1), block_cls=block_cls, num_classes=5, widths=TINY_WIDTHS,
                         stem="cifar", attention=factory, dtype=dtype)


def flat(tree) -> dict[str, np.ndarray]:
    return {"/".join(k): v for k, v in flax.traverse_util.flatten_dict(flax.core.unfreeze(tree)).items()}


@pytest.mark.parametrize("name, attention, millions", [
    ("resnet18", None, 11.69), ("resnet50", None, 25.56), ("resnet50", "se", 28.09), ("resnet50", "cbam", 28.09),
    ("resnet50", "bam", 25.92), ("resnet101", None, 44.55), ("resnet101", "cbam", 49.33)])
def test_parameter_counts_equal_the_papers(name, attention, millions):
    assert round(count(abstract_variables(name, attention)["params"]) / 1e6, 2) == millions


@pytest.mark.parametrize("name, expected", [("resnext50_32x4d", 25_028_904), ("wide_resnet50_2", 68_883_240)])
def test_grouped_and_wide_variants_match_torchvision_counts(name, expected):
    assert count(abstract_variables(name, None)["params"]) == expected


@pytest.mark.parametrize("depth, attention, stem",
                         [(d, a, "imagenet") for d in DEPTHS for a in ATTENTIONS]
                         + [(d, a, "cifar") for d in (18, 50) for a in ATTENTIONS])
def test_parameter_counts_equal_the_pytorch_reference(depth, attention, stem):
    """Every depth x attention (the CIFAR stem differs in conv1 only: checked on 18 and 50)."""
    pytest.importorskip("torch")
    import torch
    import torch_reference

    num_classes = 1000 if stem == "imagenet" else 10
    with torch.device("meta"):
        reference = torch_reference.ResNet(depth, stem, num_classes, attention)
    ours = abstract_variables(f"resnet{depth}", attention, stem, num_classes)
    assert count(ours["params"]) == torch_reference.count_parameters(reference)
    buffers = sum(b.numel() for name, b in reference.named_buffers() if not name.endswith("num_batches_tracked"))
    assert count(ours["batch_stats"]) == buffers


def test_create_model_rejects_unknown_names_listing_the_valid_ones():
    with pytest.raises(ValueError, match="resnet18, resnet34, resnet50, resnet101, resnet152"):
        models.create_model("resnet20", num_classes=10)
    with pytest.raises(ValueError, match="valid names: bam, cbam, eca, se"):
        models.create_model("resnet18", num_classes=10, attention="gc")
    with pytest.raises(ValueError, match="valid stems: imagenet, cifar"):
        models.create_model("resnet18", num_classes=10, stem="mnist")
    with pytest.raises(ValueError, match="without an attention"):
        models.create_model("resnet18", num_classes=10, reduction=8)
    with pytest.raises(ValueError, match="takes no option 'combine'"):
        models.create_model("resnet18", num_classes=10, attention="cbam", combine="product")
    with pytest.raises(ValueError, match="attention 42 is none of: a name"):
        models.ResNet18(num_classes=10, attention=42)
    with pytest.raises(ValueError, match="give its options by keyword"):
        models.ResNet18(num_classes=10, attention=functools.partial(attention_lib.CBAM, 8))
    with pytest.raises(ValueError, match="is not a flax.linen.Module subclass"):
        models.create_model("resnet18", num_classes=10, attention=dict)


def test_create_model_passes_attention_options_to_the_factory():
    model = models.create_model("resnet50", num_classes=10, attention="bam", combine="product")
    assert model.attention == attention_lib.factory("bam", combine="product")
    assert models.create_model("resnet18", num_classes=10, attention="none").attention is None
    assert set(models.available()) >= {"resnet18", "resnet34", "resnet50", "resnet101", "resnet152"}


@pytest.mark.parametrize("attention", ["cbam", "se", "eca"])
def test_block_attention_sits_in_every_block(attention):
    params = abstract_variables("resnet34", attention)["params"]
    blocks = [k for k in params if "_block" in k]
    assert len(blocks) == 16
    assert all("attention" in params[b] for b in blocks)
    assert not any(k.endswith("_attention") for k in params)


def test_bam_sits_after_stages_one_two_and_three():
    params = abstract_variables("resnet50", "bam")["params"]
    stage_modules = sorted(k for k in params if k.endswith("_attention"))
    assert stage_modules == ["stage1_attention", "stage2_attention", "stage3_attention"]
    widths = [params[k]["channel"]["fc_final"]["kernel"].shape[1] for k in stage_modules]
    assert widths == [256, 512, 1024]
    assert not any("attention" in params[k] for k in params if "_block" in k)


def test_parameter_names_are_the_documented_checkpoint_format():
    params = abstract_variables("resnet50", "cbam")["params"]
    assert {"stem_conv", "stem_bn", "head", "stage4_block2"} <= set(params)
    assert set(params["stage1_block0"]) == {"conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "attention",
                                            "downsample_conv", "downsample_bn"}
    assert "downsample_conv" not in params["stage1_block1"]
    assert params["stage2_block0"]["conv2"]["kernel"].shape == (3, 3, 128, 128)


def test_initialisation_follows_the_official_code():
    model = models.ResNet(stage_sizes=(1, 1), block_cls=models.BasicBlock, num_classes=10, widths=(64, 128),
                          stem="cifar", attention=attention_lib.factory("cbam"))
    init = jax.jit(functools.partial(model.init, train=False))
    params = flat(init(jax.random.key(0, impl="rbg"), jnp.zeros((1, 8, 8, 3)))["params"])
    for path, value in params.items():
        if path.endswith("/bias") or path.endswith("SpatialGate/bn/scale"):
            assert not np.any(value), path
        elif path.endswith("/scale"):
            np.testing.assert_array_equal(value, 1.0, err_msg=path)
    np.testing.assert_allclose(params["stage2_block0/conv2/kernel"].std(), np.sqrt(2.0 / (3 * 3 * 128)), rtol=0.03)
    np.testing.assert_allclose(params["head/kernel"].std(), np.sqrt(2.0 / 128), rtol=0.1)
    shortcut = np.abs(params["stage2_block0/downsample_conv/kernel"])
    assert 0.95 / np.sqrt(64) < shortcut.max() <= 1 / np.sqrt(64)


def test_zero_init_last_bn_zeroes_only_the_last_norm_of_each_block():
    model = models.ResNet(stage_sizes=(2,), block_cls=models.Bottleneck, num_classes=3, widths=(4,), stem="cifar",
                          zero_init_last_bn=True)
    init = jax.jit(functools.partial(model.init, train=False))
    params = init(jax.random.key(0, impl="rbg"), jnp.zeros((1, 4, 4, 3)))["params"]
    for block in ("stage1_block0", "stage1_block1"):
        assert not np.any(params[block]["bn3"]["scale"]), block
        np.testing.assert_array_equal(params[block]["bn2"]["scale"], 1.0)
    np.testing.assert_array_equal(params["stage1_block0"]["downsample_bn"]["scale"], 1.0)


def random_variables(model: nn.Module, image_shape, seed: int = 0):
    """Random, non-trivial variables of ``model``'s shapes from NumPy (model.init's RNG is slow to compile on CPU)."""
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(image_shape), train=False))
    rng = np.random.default_rng(seed)

    def fill(path, spec):
        leaf = path[-1].key
        if leaf in ("scale", "var"):
            value = rng.uniform(0.5, 1.5, spec.shape)
        elif leaf == "kernel":
            value = rng.normal(0, np.sqrt(2.0 / np.prod(spec.shape[:-1])), spec.shape)
        else:
            value = rng.normal(0, 0.1, spec.shape)
        return jnp.asarray(value, spec.dtype)

    return jax.tree_util.tree_map_with_path(fill, abstract)


@pytest.fixture(scope="module", params=[None, "se", "eca", "cbam", "bam"])
def tiny_model(request):
    """A one-block-per-stage BasicBlock ResNet of widths 8..64 with each attention, random variables."""
    model = tiny(request.param)
    return model, random_variables(model, (1, 16, 24, 3))


def _images(shape, seed=0):
    return jax.random.normal(jax.random.key(seed), shape)


def test_forward_under_jit_in_float32_and_bfloat16_on_non_square_inputs_and_batch_one(tiny_model):
    model, variables = tiny_model
    images = _images((2, 16, 24, 3))
    logits = jax.jit(functools.partial(model.apply, train=False))(variables, images)
    assert logits.shape == (2, 5) and logits.dtype == jnp.float32
    assert np.all(np.isfinite(logits))
    single = jax.jit(functools.partial(model.apply, train=False))(variables, images[1:])
    np.testing.assert_allclose(single, logits[1:], rtol=1e-5, atol=1e-5)

    bf16 = model.clone(dtype=jnp.bfloat16)
    abstract = jax.eval_shape(lambda: bf16.init(jax.random.key(0), images, train=False))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(abstract))
    bf16_logits = jax.jit(functools.partial(bf16.apply, train=False))(variables, images)
    assert bf16_logits.dtype == jnp.float32
    scale = float(np.abs(logits).max())
    np.testing.assert_allclose(bf16_logits, logits, atol=0.05 * scale)


def test_train_mode_on_batch_one_updates_every_batch_norm(tiny_model):
    model, variables = tiny_model
    logits, updates = jax.jit(functools.partial(model.apply, train=True, mutable=["batch_stats"]))(
        variables, _images((1, 16, 24, 3), seed=3))
    assert logits.shape == (1, 5) and np.all(np.isfinite(logits))
    before, after = flat(variables["batch_stats"]), flat(updates["batch_stats"])
    assert before.keys() == after.keys()
    assert not [k for k in before if np.allclose(before[k], after[k])]


def test_stem_variants():
    images = jnp.zeros((1, 32, 48, 3))
    for stem, kernel in (("imagenet", 7), ("cifar", 3)):
        model = models.ResNet(stage_sizes=(1, 1, 1, 1), block_cls=models.BasicBlock, num_classes=3,
                              widths=TINY_WIDTHS, stem=stem)
        variables = jax.eval_shape(lambda m=model: m.init(jax.random.key(0), images, train=False))
        assert variables["params"]["stem_conv"]["kernel"].shape == (kernel, kernel, 3, 8)


def test_bottleneck_groups_and_widths_give_resnext():
    model = models.ResNet(stage_sizes=(1, 1), block_cls=models.Bottleneck, num_classes=3, widths=(8, 16),
                          stem="cifar", groups=4, width_per_group=8)
    variables = random_variables(model, (2, 8, 8, 3))
    assert variables["params"]["stage2_block0"]["conv2"]["kernel"].shape == (3, 3, 8 // 4, 16 * 8 // 64 * 4)
    logits = jax.jit(functools.partial(model.apply, train=False))(variables, _images((2, 8, 8, 3)))
    assert logits.shape == (2, 3) and np.all(np.isfinite(logits))
    with pytest.raises(ValueError, match="BasicBlock supports only groups=1"):
        models.BasicBlock(8, conv=nn.Conv, norm=nn.BatchNorm, groups=2)


class _CountingConv(nn.Conv):
    """An nn.Conv that sows a marker: stands in for a drop-in conv implementation."""

    def __call__(self, inputs):
        self.sow("intermediates", "conv_called", True)
        return super().__call__(inputs)


def test_conv_implementation_is_injectable():
    images = _images((2, 16, 16, 3))
    model = tiny("cbam")
    variables = random_variables(model, images.shape)
    reference = jax.jit(functools.partial(model.apply, train=False))(variables, images)
    swapped = functools.partial(model.clone(conv=_CountingConv).apply, train=False, mutable=["intermediates"])
    logits, state = jax.jit(swapped)(variables, images)
    np.testing.assert_allclose(logits, reference, rtol=1e-5, atol=1e-6)  # ops.Conv vs nn.Conv: summation order
    markers = [k for k in flat(state["intermediates"]) if k.endswith("conv_called")]
    assert len(markers) == 1 + 4 * 2 + 3 + 4  # stem, blocks, shortcuts, and CBAM's spatial gate in every block


@pytest.mark.parametrize("attention, convs_per_module, modules", [("cbam", 1, 4), ("bam", 4, 3), ("eca", 1, 4)])
def test_the_network_conv_reaches_every_attention_module_with_a_conv(attention, convs_per_module, modules):
    """Like dtype, the network's conv goes to each attention module that declares a ``conv`` field."""
    model = tiny(attention).clone(conv=_CountingConv)
    images = jnp.zeros((1, 16, 16, 3))
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), images, train=False))
    _, state = jax.eval_shape(lambda v: model.apply(v, images, train=False, mutable=["intermediates"]), variables)
    markers = [k for k in flat(state["intermediates"]) if k.endswith("conv_called") and "attention" in k]
    assert len(markers) == convs_per_module * modules
    assert attention_lib.create(attention).conv is models.ResNet.conv  # the same default as the network's


class _UserStageGate(nn.Module):
    """An unregistered module placed at stage ends by its class attribute."""

    scale: float = 1.0
    placement: ClassVar[str] = "stage"

    @nn.compact
    def __call__(self, x, *, train):
        return x * self.scale


def _attention_layout(model):
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)), train=False))["params"]
    return jax.tree.map(lambda a: a.shape, params)


@pytest.mark.parametrize("given, name, options", [
    ("CBAM", "cbam", {}),
    (attention_lib.factory("cbam", reduction=4), "cbam", {"reduction": 4}),
    (attention_lib.CBAM, "cbam", {}),
    (functools.partial(attention_lib.CBAM, reduction=4), "cbam", {"reduction": 4}),
    (functools.partial(attention_lib.BAM, combine="product"), "bam", {"combine": "product"}),
    (attention_lib.BAM, "bam", {}),
])
def test_attention_given_as_name_factory_class_or_partial(given, name, options):
    """As timm's factory: a name, a factory, a module class or a partial of one give the same network, placed by
    the registry (BAM's class at the stage ends, as the name 'bam')."""
    expected = attention_lib.factory(name, **options)
    assert models.attention_factory(given) == expected
    reference = tiny(name, **options)
    direct = models.ResNet(stage_sizes=(1, 1, 1, 1), block_cls=models.BasicBlock, num_classes=5,
                           widths=TINY_WIDTHS, stem="cifar", attention=given)
    assert _attention_layout(direct) == _attention_layout(reference)
    created = models.create_model("resnet18", num_classes=5, stem="cifar", attention=given)
    assert created.attention == expected


def _attention_paths(model):
    """The paths of the attention modules the network calls (Flax's captured intermediates, shapes only)."""
    images = jnp.zeros((1, 16, 16, 3))
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), images, train=False))
    _, state = jax.eval_shape(lambda v: model.apply(v, images, train=False, capture_intermediates=True,
                                                    mutable=["intermediates"]), variables)
    return sorted({k.rsplit("/", 1)[0] for k in flat(state["intermediates"]) if "attention/__call__" in k})


def test_an_unregistered_class_or_partial_is_placed_by_its_placement_attribute():
    stage = tiny(functools.partial(_UserStageGate, scale=2.0))
    assert _attention_paths(stage) == ["stage1_attention", "stage2_attention", "stage3_attention"]
    assert dict(models.attention_factory(stage.attention).options) == {"scale": 2.0}
    block = models.create_model("resnet18", num_classes=5, attention=_CountingGate, bias=1.0)
    assert block.attention.placement == "block" and block.attention.options == (("bias", 1.0),)
    assert _attention_paths(tiny(_CountingGate)) == [f"stage{s}_block0/attention" for s in range(1, 5)]


class _CountingGate(nn.Module):
    """An unregistered module without a placement attribute: in every block."""

    bias: float = 0.0

    @nn.compact
    def __call__(self, x, *, train):
        return x + self.bias
