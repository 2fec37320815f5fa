"""The backbones of the BAM and CBAM papers' tables: parameter counts against the papers, attention placement and
forward passes of tiny variants of each new family (MobileNet v1, the pre-activation PreResNet/WRN, ResNeXt-29).

Counts are trainable parameters (no BatchNorm statistics), from shapes only (``jax.eval_shape`` of ``init``).
Each row gives our exact count and whether it rounds to the paper's printed number; the rows that do not are
the discrepancies docs/models.md records with their likely causes.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from attn_flax import models

ATTENTIONS = (None, "se", "cbam", "bam")

# (model, attention, classes, the paper's millions, our exact count, rounds to the paper's number)
# BAM paper (Park et al., BMVC 2018), Table 3 (CIFAR-100) and Table 4 (ImageNet).
BAM_CIFAR100 = [
    ("resnet50", None, 23.71, 23_705_252, True), ("resnet50", "bam", 24.07, 24_063_319, False),
    ("resnet50", "se", 26.24, 26_236_244, True),
    ("preresnet110", None, 1.726, 1_736_372, False), ("preresnet110", "bam", 1.733, 1_736_791, False),
    ("wrn28_8", None, 23.40, 23_401_012, True), ("wrn28_8", "bam", 23.42, 23_422_830, True),
    ("wrn28_8", "se", 23.58, 23_576_852, True),
    ("wrn28_10", None, 36.54, 36_536_884, True), ("wrn28_10", "bam", 36.57, 36_570_756, True),
    ("resnext29_8x64d", None, 34.52, 34_518_948, True), ("resnext29_8x64d", "bam", 34.61, 34_604_822, False),
    ("resnext29_8x64d", "se", 35.04, 35_040_756, True),
]
# BAM Table 4 and CBAM paper (Woo et al., ECCV 2018) Table 4 (ImageNet-1K); the ResNet-50/101 rows are in
# tests/test_resnet.py.
IMAGENET = [
    ("resnet18", "bam", 11.71, 11_712_503, True), ("resnet18", "se", 11.78, 11_778_592, True),
    ("resnet18", "cbam", 11.78, 11_779_392, True),
    ("resnet34", None, 21.80, 21_797_672, True), ("resnet34", "cbam", 21.96, 21_960_468, True),
    ("resnet101", "bam", 44.91, 44_907_227, True),
    ("wrn18_1_5", None, 25.88, 25_875_816, True), ("wrn18_1_5", "se", 26.07, 26_074_716, True),
    ("wrn18_1_5", "cbam", 26.08, 26_075_516, True), ("wrn18_1_5", "bam", 25.93, 25_926_933, True),
    ("wrn18_2", None, 45.62, 45_618_216, True), ("wrn18_2", "se", 45.97, 45_970_456, True),
    ("wrn18_2", "cbam", 45.97, 45_971_256, True), ("wrn18_2", "bam", 45.71, 45_708_547, True),
    ("resnext50_32x4d", "se", 27.56, 27_559_896, True), ("resnext50_32x4d", "cbam", 27.56, 27_561_496, True),
    ("resnext50_32x4d", "bam", 25.39, 25_386_971, True),
    ("resnext101_32x4d", None, 44.18, 44_177_704, True), ("resnext101_32x4d", "se", 48.96, 48_955_416, True),
    ("resnext101_32x4d", "cbam", 48.96, 48_958_716, True),
    ("mobilenet_v1", None, 4.23, 4_231_976, True), ("mobilenet_v1", "se", 5.07, 5_072_114, True),
    ("mobilenet_v1", "cbam", 5.07, 5_074_714, True), ("mobilenet_v1", "bam", 4.32, 4_323_480, True),
]
PAPER_ROWS = ([(m, a, "cifar", 100, *rest) for m, a, *rest in BAM_CIFAR100]
              + [(m, a, "imagenet", 1000, *rest) for m, a, *rest in IMAGENET])


def count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@functools.lru_cache(maxsize=None)
def abstract_params(name: str, attention, stem: str, num_classes: int):
    model = models.create_model(name, num_classes=num_classes, attention=attention, stem=stem)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))["params"]


def decimals(millions: float) -> int:
    return len(repr(millions).partition(".")[2])


@pytest.mark.parametrize("name, attention, stem, num_classes, paper, ours, matches", PAPER_ROWS,
                         ids=[f"{r[0]}-{r[1]}" for r in PAPER_ROWS])
def test_parameter_counts_against_the_papers(name, attention, stem, num_classes, paper, ours, matches):
    n = count(abstract_params(name, attention, stem, num_classes))
    assert n == ours
    assert (round(n / 1e6, decimals(paper)) == paper) == matches


def test_each_network_keeps_its_own_stem_and_rejects_the_other():
    assert models.create_model("wrn28_10", num_classes=100).stem == "cifar"
    assert models.create_model("mobilenet_v1", num_classes=1000).stem == "imagenet"
    assert models.create_model("resnet50", num_classes=10).stem == "imagenet"
    with pytest.raises(ValueError, match="preresnet110 is a network for CIFAR only .* configs/cifar100.py"):
        models.create_model("preresnet110", num_classes=1000, stem="imagenet")
    with pytest.raises(ValueError, match="mobilenet_v1 is a network for ImageNet only .* configs/imagenet.py"):
        models.create_model("mobilenet_v1", num_classes=100, stem="cifar")


def test_family_constructors_check_their_arguments():
    with pytest.raises(ValueError, match="6n \\+ 2"):
        models.preresnet(100)
    with pytest.raises(ValueError, match="6n \\+ 4"):
        models.wide_resnet(26, 10)
    with pytest.raises(ValueError, match="alpha must be positive"):
        models.mobilenet_v1(0.0)
    assert models.mobilenet_v1(0.5).keywords["widths"] == (32, 64, 128, 256, 512)
    with pytest.raises(ValueError, match="zero_init_last_bn does not apply"):
        models.WRN16_8(num_classes=10, zero_init_last_bn=True).init(
            jax.random.key(0), jnp.zeros((1, 8, 8, 3)), train=False)


# Tiny variants of each new family: 3 stages, a few channels, 16x16 inputs, batch 2. They take flax's nn.Conv,
# which compiles in a fraction of ops.Conv's time on CPU; the grouped and depthwise convs run through XLA's native
# conv in both, and ops.Conv's own path is tested with the ResNets (tests/test_conv.py, tests/test_resnet.py).
TINY = {
    "preact": functools.partial(models.PreActResNet, stage_sizes=(2, 1, 1), block_cls=models.PreActBlock,
                                widths=(16, 32, 32), stem_width=8),
    "mobilenet": functools.partial(models.MobileNet, stage_sizes=(1, 2, 1), block_cls=models.DepthwiseSeparable,
                                   widths=(16, 32, 32), stem_width=8),
    "resnext29": functools.partial(models.ResNet, stage_sizes=(1, 1, 1), block_cls=models.Bottleneck,
                                   widths=(8, 16, 16), groups=2, width_per_group=16, stem="cifar"),
}


def random_variables(abstract):
    """Random parameters and BatchNorm statistics of the given shapes (running variances positive), no init."""
    rng = np.random.default_rng(0)

    def fill(path, leaf):
        if jax.tree_util.keystr(path).endswith("['var']"):
            return jnp.asarray(rng.uniform(0.5, 1.5, leaf.shape), leaf.dtype)
        return jnp.asarray(rng.normal(0.0, 0.2, leaf.shape), leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, abstract)


@pytest.fixture(scope="module", params=[(f, a) for f in TINY for a in ATTENTIONS],
                ids=[f"{f}-{a}" for f in TINY for a in ATTENTIONS])
def tiny_run(request):
    """One tiny network per family x attention, run once in each mode under jit (shared by the tests)."""
    family, attention = request.param
    model = TINY[family](num_classes=5, attention=models.attention_factory(attention), conv=nn.Conv)
    images = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
    variables = random_variables(jax.eval_shape(lambda: model.init(jax.random.key(0), images, train=False)))
    train_logits, updates = jax.jit(functools.partial(model.apply, train=True, mutable=["batch_stats"]))(
        variables, images)
    eval_logits = jax.jit(functools.partial(model.apply, train=False))(variables, images)
    return family, attention, model, variables, train_logits, eval_logits, updates


def test_tiny_variants_run_in_both_modes(tiny_run):
    _, _, _, variables, train_logits, eval_logits, updates = tiny_run
    for logits in (train_logits, eval_logits):
        assert logits.shape == (2, 5) and logits.dtype == jnp.float32
        assert bool(jnp.all(jnp.isfinite(logits)))
    assert jax.tree.structure(updates["batch_stats"]) == jax.tree.structure(variables["batch_stats"])


def test_block_attention_in_every_block_and_bam_only_at_stage_boundaries(tiny_run):
    family, attention, model, variables, *_ = tiny_run
    params = variables["params"]
    blocks = [k for k in params if "_block" in k]
    assert len(blocks) == sum(model.stage_sizes)
    stage_modules = sorted(k for k in params if k.endswith("_attention"))
    in_blocks = {b: sorted(k for k in params[b] if "attention" in k) for b in blocks}
    if attention == "bam":
        assert stage_modules == ["stage1_attention", "stage2_attention"]
        assert not any(in_blocks.values())
    elif attention is None:
        assert not stage_modules and not any(in_blocks.values())
    else:
        assert not stage_modules
        expected = ["attention", "dw_attention"] if family == "mobilenet" else ["attention"]
        assert all(names == expected for names in in_blocks.values())


def test_preact_block_ends_without_batch_norm_and_the_network_with_one():
    params = abstract_params("wrn16_8", None, "cifar", 10)
    assert {"stem_conv", "final_bn", "head"} <= set(params) and "stem_bn" not in params
    assert set(params["stage1_block0"]) == {"bn1", "conv1", "bn2", "conv2", "downsample_conv"}
    assert set(params["stage1_block1"]) == {"bn1", "conv1", "bn2", "conv2"}
    assert params["stem_conv"]["kernel"].shape == (3, 3, 3, 16)
    assert params["stage3_block1"]["conv2"]["kernel"].shape == (3, 3, 512, 512)


def test_mobilenet_layers_follow_the_paper():
    params = abstract_params("mobilenet_v1", None, "imagenet", 1000)
    assert params["stem_conv"]["kernel"].shape == (3, 3, 3, 32)
    assert params["stage1_block0"]["conv1"]["kernel"].shape == (3, 3, 1, 32)  # depthwise
    assert params["stage1_block0"]["conv2"]["kernel"].shape == (1, 1, 32, 64)  # pointwise
    assert [k for k in params if k.startswith("stage4_block")] == [f"stage4_block{b}" for b in range(6)]
    assert params["head"]["kernel"].shape == (1024, 1000)


def test_resnext29_has_the_papers_widths():
    params = abstract_params("resnext29_16x64d", None, "cifar", 100)
    assert params["stage1_block0"]["conv2"]["kernel"].shape == (3, 3, 64, 1024)  # 16 groups of 64
    assert params["stage3_block2"]["conv3"]["kernel"].shape == (1, 1, 4096, 1024)
    assert params["stem_conv"]["kernel"].shape == (3, 3, 3, 64)
