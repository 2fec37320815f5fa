"""Every shipped config resolves to a buildable run description: a known model, attention and schedule."""
import importlib

import jax
import numpy as np
import pytest

from attn_flax import attention, models
from attn_flax.training import durations, optim, setup

ARCHS = [f"{m},{a}" for m in ("resnet18", "resnet50") for a in ("none", "se", "eca", "cbam", "bam")]
IMAGENET_ARCHS = [f"{m},{a}" for m in ("resnet50", "resnet101") for a in ("none", "se", "eca", "cbam", "bam")]
# The BAM/CBAM papers' other backbones, one attention each (tests/test_backbones.py covers every pairing).
PAPER_CIFAR_ARCHS = ["preresnet110,bam", "wrn28_10,se", "wrn16_8,none", "resnext29_8x64d,cbam"]
PAPER_IMAGENET_ARCHS = ["mobilenet_v1,cbam", "wrn18_1_5,bam", "resnext101_32x4d,se"]
CASES = ([("cifar10", a, 10, 50_000) for a in ARCHS] + [("cifar100", a, 100, 50_000) for a in ARCHS]
         + [("imagenet", a, 1000, 1_281_167) for a in IMAGENET_ARCHS]
         + [("cifar100", a, 100, 50_000) for a in PAPER_CIFAR_ARCHS]
         + [("imagenet", a, 1000, 1_281_167) for a in PAPER_IMAGENET_ARCHS])


@pytest.mark.parametrize("name, arch, num_classes, num_train", CASES)
def test_config_resolves(name, arch, num_classes, num_train):
    config = importlib.import_module(f"configs.{name}").get_config(arch)
    model_name, attention_name = arch.split(",")
    assert (config.model, config.attention) == (model_name, attention_name)
    assert config.model in models.available()
    assert config.attention == "none" or config.attention in attention.available()
    model = setup.build_model(config, num_classes)
    assert model.num_classes == num_classes and model.stem == ("imagenet" if name == "imagenet" else "cifar")
    steps = durations.resolve(config, num_train)
    schedule = optim.learning_rate_schedule(config, steps.total, steps.steps_per_epoch)
    assert float(schedule(steps.total // 2)) > 0
    doc = importlib.import_module(f"configs.{name}").__doc__
    assert f"--config=configs/{name}.py:" in doc and "Hardware" in doc and "Expected" in doc


def test_imagenet_resnet50_cbam_has_the_papers_parameter_count():
    config = importlib.import_module("configs.imagenet").get_config("resnet50,cbam")
    model = setup.build_model(config, 1000)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), np.zeros((1, 224, 224, 3), np.float32),
                                               train=False))
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes["params"]))
    assert round(count / 1e6, 2) == 28.09


@pytest.mark.parametrize("name, arch, message", [
    ("imagenet", "wrn28_10,bam", "wrn28_10 is a network for CIFAR only (stem 'cifar') and cannot take stem "
                                 "'imagenet'; use it with a config such as configs/cifar100.py"),
    ("cifar100", "mobilenet_v1,cbam", "mobilenet_v1 is a network for ImageNet only (stem 'imagenet') and cannot "
                                      "take stem 'cifar'; use it with a config such as configs/imagenet.py")])
def test_a_network_for_the_other_dataset_fails_in_prepare_in_one_line(name, arch, message):
    config = importlib.import_module(f"configs.{name}").get_config(arch)
    with pytest.raises(setup.ConfigError) as err:
        setup.prepare(config)
    assert str(err.value) == message


def test_default_config_is_small_and_offline():
    config = importlib.import_module("configs.default").get_config()
    assert config.dataset == "attn_flax_shapes" and config.attention == "cbam"
    assert durations.train_steps(config, 50_000) <= 2_000


def test_imagenet_normalises_groups_of_64_as_the_official_runs():
    config = importlib.import_module("configs.imagenet").get_config("resnet50,bam")
    assert config.bn_group_size == 64 and setup.build_model(config, 1000).bn_group_size == 64
    assert importlib.import_module("configs.default").get_config().bn_group_size is None


def test_a_bn_group_size_that_does_not_divide_the_batch_fails_in_prepare(data_dir):
    import tiny_runs

    with pytest.raises(setup.ConfigError, match="bn_group_size 6 must be at least 2 and divide the 16 examples"):
        setup.prepare(tiny_runs.config(data_dir, bn_group_size=6))
    with pytest.raises(setup.ConfigError, match="divide the 8 examples of each"):
        setup.prepare(tiny_runs.config(data_dir, bn_group_size=16, grad_accum_steps=2))
    assert setup.prepare(tiny_runs.config(data_dir, bn_group_size=8)).model.bn_group_size == 8
