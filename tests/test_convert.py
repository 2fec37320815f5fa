"""Loading official-format PyTorch weights: key mapping, error reporting, the Orbax round trip and the CLI; with
torch, logits equal to an independent PyTorch implementation of the official ResNet in eval and train mode."""
import functools
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from attn_flax import convert, models

PARITY_CASES = [  # depth, stem, attention, image height x width (non-square where it costs nothing)
    (18, "cifar", "cbam", (32, 40)),
    (34, "imagenet", "bam", (64, 96)),
    (50, "imagenet", "cbam", (64, 64)),
    (50, "imagenet", "bam", (64, 80)),
]


@pytest.fixture(scope="module")
def torch_reference():
    pytest.importorskip("torch")
    import torch_reference as reference

    return reference


def relative_error(ours, reference) -> float:
    return float(np.max(np.abs(np.asarray(ours) - reference)) / np.max(np.abs(reference)))


def random_official_state_dict(depth, attention, stem, num_classes=10, seed=0) -> dict[str, np.ndarray]:
    """Random arrays under every official key the model needs, in PyTorch layouts (torch not required)."""
    model = convert.official_model(depth, attention, stem, num_classes)
    rng = np.random.default_rng(seed)
    return {key: rng.uniform(0.5, 1.5, shape).astype(np.float32) if key.endswith("running_var")
            else rng.normal(0, 0.1, shape).astype(np.float32)
            for key, (_, shape, _) in convert.official_layout(model).items()}


def forward(model, variables, images_nchw, train=False):
    images = np.ascontiguousarray(np.transpose(images_nchw, (0, 2, 3, 1)))
    apply = functools.partial(model.apply, train=train, mutable=["batch_stats"] if train else False)
    return jax.jit(apply)(variables, images)


@pytest.mark.parametrize("path, key", [
    (("stem_conv", "kernel"), "conv1.weight"),
    (("stem_bn", "mean"), "bn1.running_mean"),
    (("stage1_block0", "downsample_conv", "kernel"), "layer1.0.downsample.0.weight"),
    (("stage4_block2", "downsample_bn", "var"), "layer4.2.downsample.1.running_var"),
    (("stage3_block5", "attention", "ChannelGate", "fc1", "kernel"), "layer3.5.cbam.ChannelGate.mlp.1.weight"),
    (("stage3_block5", "attention", "ChannelGate", "fc2", "bias"), "layer3.5.cbam.ChannelGate.mlp.3.bias"),
    (("stage1_block0", "attention", "SpatialGate", "conv", "kernel"), "layer1.0.cbam.SpatialGate.spatial.conv.weight"),
    (("stage1_block0", "attention", "SpatialGate", "bn", "scale"), "layer1.0.cbam.SpatialGate.spatial.bn.weight"),
    (("stage2_attention", "channel", "fc_0", "kernel"), "bam2.channel_att.gate_c.gate_c_fc_0.weight"),
    (("stage2_attention", "channel", "bn_0", "var"), "bam2.channel_att.gate_c.gate_c_bn_1.running_var"),
    (("stage2_attention", "channel", "fc_final", "bias"), "bam2.channel_att.gate_c.gate_c_fc_final.bias"),
    (("stage1_attention", "spatial", "conv_reduce", "bias"), "bam1.spatial_att.gate_s.gate_s_conv_reduce0.bias"),
    (("stage1_attention", "spatial", "bn_reduce", "scale"), "bam1.spatial_att.gate_s.gate_s_bn_reduce0.weight"),
    (("stage3_attention", "spatial", "conv_dilated_1", "kernel"), "bam3.spatial_att.gate_s.gate_s_conv_di_1.weight"),
    (("stage3_attention", "spatial", "bn_dilated_0", "mean"), "bam3.spatial_att.gate_s.gate_s_bn_di_0.running_mean"),
    (("stage3_attention", "spatial", "conv_final", "kernel"), "bam3.spatial_att.gate_s.gate_s_conv_final.weight"),
    (("head", "kernel"), "fc.weight"),
])
def test_official_key_names(path, key):
    assert convert.official_key(path) == key


def test_round_trip_through_the_official_format_infers_num_classes_and_keeps_every_value():
    state = random_official_state_dict(18, "cbam", "cifar", num_classes=7)
    wrapped = {"epoch": 100, "arch": "resnet", "best_prec1": 77.62, "optimizer": {},
               "state_dict": {f"module.{k}": v for k, v in state.items()}
               | {"module.bn1.num_batches_tracked": np.int64(3)}}
    model, variables = convert.from_official(wrapped, depth=18, attention="cbam", stem="cifar")
    assert model.num_classes == 7 and set(variables) == {"params", "batch_stats"}
    assert variables["params"]["stage1_block0"]["conv1"]["kernel"].shape == (3, 3, 64, 64)
    assert variables["params"]["head"]["kernel"].shape == (512, 7)
    back = convert.to_official(variables)
    assert back.keys() == state.keys()
    for key in state:
        np.testing.assert_array_equal(back[key], state[key], err_msg=key)


def test_bam_is_built_with_the_official_product_combination():
    model, _ = convert.from_official(random_official_state_dict(18, "bam", "cifar"), depth=18, attention="bam",
                                     stem="cifar")
    assert dict(model.attention.options) == {"combine": "product"}


def test_mismatched_state_dicts_raise_one_error_listing_every_problem():
    state = random_official_state_dict(18, "cbam", "cifar")
    del state["layer2.1.bn2.running_var"]
    state["layer9.0.conv1.weight"] = np.zeros((1,))
    state["layer1.0.conv1.weight"] = np.zeros((64, 64, 1, 1), np.float32)
    with pytest.raises(convert.CheckpointMismatchError) as error:
        convert.from_official(state, depth=18, attention="cbam", stem="cifar")
    message = str(error.value)
    assert "missing keys (1): layer2.1.bn2.running_var" in message
    assert "unexpected keys (1): layer9.0.conv1.weight" in message
    assert "layer1.0.conv1.weight: checkpoint (64, 64, 1, 1), model (64, 64, 3, 3)" in message
    with pytest.raises(convert.CheckpointMismatchError, match=r"unexpected keys \(\d+\): layer1.0.cbam"):
        convert.from_official(random_official_state_dict(18, "cbam", "cifar"), depth=18, attention=None,
                              stem="cifar")
    with pytest.raises(convert.CheckpointMismatchError, match="conv1.weight: checkpoint"):
        convert.from_official(random_official_state_dict(18, None, "cifar"), depth=18, attention=None,
                              stem="imagenet")
    with pytest.raises(ValueError, match="no attention 'se'"):
        convert.from_official(state, depth=18, attention="se", stem="cifar")


def zeros_official_state_dict(depth, attention, stem, num_classes=1000) -> dict[str, np.ndarray]:
    """Every official key at its shape, without the cost of random values (for error messages only)."""
    model = convert.official_model(depth, attention, stem, num_classes)
    return {key: np.zeros(shape, np.float32) for key, (_, shape, _) in convert.official_layout(model).items()}


def test_a_wrong_architecture_is_summarised_in_a_few_lines_with_the_settings_the_keys_point_to():
    """ResNet-50 + CBAM weights given as ResNet-101 without attention: hundreds of keys, a few lines."""
    state = zeros_official_state_dict(50, "cbam", "imagenet")
    with pytest.raises(convert.CheckpointMismatchError) as error:
        convert.from_official(state, depth=101, attention=None, stem="cifar")
    message = str(error.value)
    lines = message.splitlines()
    assert len(lines) <= 5 and max(map(len, lines)) < 400, message
    assert len(error.value.unexpected) > 100 and len(error.value.missing) > 100  # the full lists stay available
    assert f"unexpected keys ({len(error.value.unexpected)}): " in message
    assert f"... and {len(error.value.missing) - convert.SHOWN_KEYS} more" in message
    assert lines[-1].endswith("its keys look like --depth=50 --attention=cbam --stem=imagenet")
    bam = zeros_official_state_dict(18, "bam", "cifar")
    assert convert.describe_state_dict(bam) == "--depth=18 --attention=bam --stem=cifar"
    assert convert.describe_state_dict({"fc.weight": np.zeros((10, 512))}) is None


def test_saved_conversion_loads_back_as_the_same_model_and_variables(tmp_path):
    model, variables = convert.from_official(random_official_state_dict(18, "bam", "cifar"), depth=18,
                                             attention="bam", stem="cifar")
    spec = convert.model_spec(model, 18, "bam", "cifar")
    assert spec == {"model": "resnet18", "depth": 18, "attention": "bam", "attention_options": {"combine": "product"},
                    "stem": "cifar", "num_classes": 10}
    convert.save_converted(tmp_path / "converted", spec, variables)
    loaded_model, loaded = convert.load_converted(tmp_path / "converted")
    assert loaded_model == model
    assert jax.tree.structure(loaded) == jax.tree.structure(variables)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(variables)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("depth, stem, attention, size", PARITY_CASES)
def test_eval_logits_equal_the_pytorch_reference(torch_reference, depth, stem, attention, size):
    import torch

    reference = torch_reference.randomize_(torch_reference.ResNet(depth, stem, 10, attention), seed=depth).eval()
    images = np.random.default_rng(depth).normal(size=(2, 3, *size)).astype(np.float32)
    with torch.no_grad():
        expected = reference(torch.from_numpy(images)).numpy()
    model, variables = convert.from_official(reference.state_dict(), depth=depth, attention=attention, stem=stem)
    assert relative_error(forward(model, variables, images), expected) < 1e-4


def test_parity_is_sensitive_to_the_bam_combination(torch_reference):
    import torch

    reference = torch_reference.randomize_(torch_reference.ResNet(18, "cifar", 10, "bam")).eval()
    images = np.random.default_rng(0).normal(size=(2, 3, 16, 16)).astype(np.float32)
    with torch.no_grad():
        expected = reference(torch.from_numpy(images)).numpy()
    model, variables = convert.from_official(reference.state_dict(), depth=18, attention="bam", stem="cifar")
    assert relative_error(forward(model, variables, images), expected) < 1e-4
    paper_sum = models.create_model("resnet18", num_classes=10, attention="bam", stem="cifar")
    assert relative_error(forward(paper_sum, variables, images), expected) > 1e-2


def test_train_mode_equals_the_pytorch_reference(torch_reference):
    """Batch statistics, logits and the running-statistics update agree, the running variance included: PyTorch
    updates it with the unbiased batch variance (times n / (n - 1), n = 24 values per channel in the last stage
    here), and so does ``ops.BatchNorm`` (Flax's ``nn.BatchNorm`` would differ by 4% there)."""
    import torch

    reference = torch_reference.randomize_(torch_reference.ResNet(18, "cifar", 10, "cbam")).train()
    images = np.random.default_rng(1).normal(size=(4, 3, 16, 24)).astype(np.float32)
    model, variables = convert.from_official(reference.state_dict(), depth=18, attention="cbam", stem="cifar")
    with torch.no_grad():
        expected = reference(torch.from_numpy(images)).numpy()
    logits, updates = forward(model, variables, images, train=True)
    assert relative_error(logits, expected) < 1e-4
    updated = convert.to_official(updates)
    torch_updated = convert.clean_state_dict(reference.state_dict())
    assert updated.keys() == {k for k in torch_updated if k.endswith(("running_mean", "running_var"))}
    for key, value in updated.items():
        assert relative_error(value, torch_updated[key]) < 1e-5, key


def test_command_line_converts_an_official_checkpoint_file(torch_reference, tmp_path):
    import torch

    reference = torch_reference.randomize_(torch_reference.ResNet(18, "cifar", 10, "cbam")).eval()
    checkpoint = tmp_path / "RESNET18_CIFAR_CBAM.pth.tar"
    torch.save({"epoch": 3, "arch": "resnet", "best_prec1": torch.tensor(50.0), "optimizer": {"state": {}},
                "state_dict": {f"module.{k}": v for k, v in reference.state_dict().items()}}, checkpoint)
    output = tmp_path / "converted"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-m", "attn_flax.convert", "--checkpoint", str(checkpoint),
                             "--depth", "18", "--attention", "cbam", "--stem", "cifar", "--output", str(output)],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    spec = json.loads((output / convert.MODEL_FILE).read_text())
    assert spec | {"source": None} == {"model": "resnet18", "depth": 18, "attention": "cbam",
                                       "attention_options": {}, "stem": "cifar", "num_classes": 10,
                                       "source": None}

    model, variables = convert.load_converted(output)
    images = np.random.default_rng(2).normal(size=(2, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        expected = reference(torch.from_numpy(images)).numpy()
    assert relative_error(forward(model, variables, images), expected) < 1e-4

    assert convert.main(["--checkpoint", str(checkpoint), "--depth", "34", "--attention", "cbam",
                         "--stem", "cifar", "--output", str(tmp_path / "wrong")]) == 1
    assert not (tmp_path / "wrong").exists()
    assert convert.main(["--checkpoint", str(checkpoint), "--depth", "18", "--attention", "cbam",
                         "--stem", "cifar", "--output", str(output)]) == 1
