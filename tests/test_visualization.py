"""visualize.py and attn_flax.visualization: maps from the model's intermediates, a real Grad-CAM, PNGs of the
expected size."""
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from PIL import Image

import tiny_runs
from attn_flax import models, trained, visualization

VISUALIZE = str(tiny_runs.REPO / "visualize.py")


@pytest.fixture(scope="module")
def cbam_run(root):
    return trained.from_workdir(tiny_runs.workdir(root, "cbam"))


@pytest.fixture(scope="module")
def images(root):
    return tiny_runs.eval_split(root)[0][:4]


def tiny_model(attention, stage_sizes=(1, 1, 1, 1)):
    model = models.create_model("resnet18", num_classes=10, attention=attention, stem="cifar")
    model = model.clone(widths=(8, 16, 16, 16), stage_sizes=stage_sizes)
    return model, model.init(jax.random.key(0, impl="rbg"), jnp.zeros((1, 32, 32, 3)), train=False)


def test_visualize_writes_one_png_per_image_of_the_expected_size(root, tmp_path):
    proc = subprocess.run(
        [sys.executable, VISUALIZE, f"--workdir={tiny_runs.workdir(root, 'cbam')}",
         f"--baseline_workdir={tiny_runs.workdir(root, 'none')}", f"--output={tmp_path}", "--num_images=3",
         "--panel_size=64"], env=tiny_runs.subprocess_env(), cwd=tiny_runs.REPO, capture_output=True, text=True,
        timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["figures"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"attention_{i:03d}.png" for i in range(3)]
    for path in tmp_path.iterdir():
        with Image.open(path) as png:
            assert png.size == visualization.figure_pixels(4, 2, 64)


def test_visualize_rejects_bad_inputs_in_one_line(root, tmp_path):
    proc = subprocess.run(
        [sys.executable, VISUALIZE, f"--workdir={tiny_runs.workdir(root, 'cbam')}", f"--output={tmp_path}",
         "--num_images=0"], env=tiny_runs.subprocess_env(), cwd=tiny_runs.REPO, capture_output=True, text=True,
        timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "--num_images must be between 1 and 100" in lines[0], \
        proc.stderr


def test_cbam_maps_per_stage_at_each_stage_resolution_and_upsampled_to_the_image_in_0_1(cbam_run, images):
    intermediates = visualization.attention_intermediates(cbam_run.model, cbam_run.variables, images)
    native = visualization.stage_spatial_maps(intermediates)
    assert {s: m.shape for s, m in native.items()} == {1: (4, 32, 32), 2: (4, 16, 16), 3: (4, 8, 8), 4: (4, 4, 4)}
    view = visualization.explain(cbam_run.model, cbam_run.variables, images, size=32)
    assert list(view.maps) == ["stage 1", "stage 2", "stage 3", "stage 4"]
    for label, upsampled in view.maps.items():
        assert upsampled.shape == (4, 32, 32), label
        assert 0.0 <= upsampled.min() and upsampled.max() <= 1.0, label
    np.testing.assert_allclose(view.maps["stage 1"], native[1], rtol=1e-6)
    assert view.grad_cam.shape == (4, 32, 32) and view.grad_cam.min() >= 0 and view.grad_cam.max() <= 1


def test_a_stage_map_is_the_mean_of_its_blocks_maps_and_channel_gates_give_none():
    gates = np.random.default_rng(0).uniform(size=(3, 2, 8, 8, 1)).astype(np.float32)
    intermediates = {
        "stage1_block0": {"attention": {"spatial_attention": (gates[0],), "channel_attention": (gates[0],)}},
        "stage1_block1": {"attention": {"spatial_attention": (gates[1],)}},
        "stage2_block0": {"attention": {"spatial_attention": (gates[2],)}},
        "stage3_block0": {"attention": {"channel_attention": (gates[2],)}},
    }
    maps = visualization.stage_spatial_maps(intermediates)
    assert list(maps) == [1, 2]
    np.testing.assert_allclose(maps[1], (gates[0, ..., 0] + gates[1, ..., 0]) / 2, rtol=1e-6)
    np.testing.assert_allclose(maps[2], gates[2, ..., 0])


def test_bam_gives_the_maps_after_stages_1_to_3_in_0_1():
    model, variables = tiny_model("bam")
    images = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    maps = visualization.stage_spatial_maps(visualization.attention_intermediates(model, variables, images))
    assert {s: m.shape for s, m in maps.items()} == {1: (2, 32, 32), 2: (2, 16, 16), 3: (2, 8, 8)}
    assert all(0 <= float(m.min()) and float(m.max()) <= 1 for m in maps.values())


class _Toy(nn.Module):
    """A feature layer and a non-linear head, so Grad-CAM's weights differ from position to position."""

    @nn.compact
    def __call__(self, x, train=False):
        features = nn.Conv(5, (3, 3), name="features")(x)
        hidden = jnp.tanh(features) * features[..., :1]
        return nn.Dense(3, name="head")(jnp.mean(hidden, axis=(1, 2)))


def test_grad_cam_is_relu_of_the_gradient_weighted_sum_of_the_layers_channels():
    model, x = _Toy(), jax.random.normal(jax.random.key(2), (2, 6, 6, 1))
    variables = model.init(jax.random.key(3), x)
    classes = jnp.array([2, 0])
    cam = visualization.grad_cam(model, variables, x, classes=classes, layer=("features",))

    activations = nn.Conv(5, (3, 3)).apply({"params": variables["params"]["features"]}, x)

    def head(a):
        return nn.Dense(3).apply({"params": variables["params"]["head"]},
                                 jnp.mean(jnp.tanh(a) * a[..., :1], axis=(1, 2)))

    gradient = jax.grad(lambda a: jnp.sum(head(a)[jnp.arange(2), classes]))(activations)
    alpha = gradient.mean(axis=(1, 2))
    expected = np.maximum(np.einsum("nhwk,nk->nhw", activations, alpha), 0)
    assert cam.maps.shape == (2, 6, 6) and np.all(np.asarray(cam.maps) >= 0)
    assert np.any(expected > 0) and np.any(expected == 0)
    np.testing.assert_allclose(cam.maps, expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(cam.classes, classes)


def test_grad_cam_of_a_resnet_is_its_class_activation_map(cbam_run, images):
    """Global pooling then a linear head: alpha_k = W[k, c] / (h w), so Grad-CAM = ReLU(sum_k W[k, c] A_k) / (h w)
    (Selvaraju et al., Sec. 3.1), with A the last block's output captured through capture_intermediates."""
    model, variables = cbam_run.model, cbam_run.variables
    cam = visualization.grad_cam(model, variables, images)
    logits, state = model.apply(variables, images, train=False, mutable=["intermediates"],
                                capture_intermediates=lambda mdl, method: mdl.name == "stage4_block0")
    activations = np.asarray(state["intermediates"]["stage4_block0"]["__call__"][0])
    predicted = np.asarray(logits).argmax(-1)
    kernel = np.asarray(variables["params"]["head"]["kernel"])[:, predicted].T
    expected = np.maximum(np.einsum("nhwk,nk->nhw", activations, kernel), 0) / (4 * 4)
    np.testing.assert_array_equal(cam.classes, predicted)
    np.testing.assert_allclose(cam.maps, expected, rtol=1e-4, atol=1e-6)


def test_grad_cam_names_a_missing_layer():
    model, variables = tiny_model(None)
    with pytest.raises(ValueError, match="no module at stage9_block0"):
        visualization.grad_cam(model, variables, jnp.zeros((1, 32, 32, 3)), layer=("stage9_block0",))


def _figure_rows():
    rng = np.random.default_rng(0)
    maps = {f"stage {s}": rng.uniform(size=(8, 8)) for s in (1, 2)}
    return [visualization.Explanation(visualization.row_title("CBAM", "circle", 0.873, "square"), maps,
                                      rng.uniform(size=(8, 8))),
            visualization.Explanation(visualization.row_title("ResNet", "square", 0.51, "square"), {},
                                      rng.uniform(size=(8, 8)))]


def _panels(fig):
    """Per row of the figure: the titles of its image panels, left to right; and the colour-bar axes."""
    images = [ax for ax in fig.axes if ax.images]
    bars = [ax for ax in fig.axes if not ax.images]
    rows = {}
    for ax in images:
        rows.setdefault(round(ax.get_position().y0, 3), []).append(ax)
    ordered = [sorted(r, key=lambda ax: ax.get_position().x0) for _, r in sorted(rows.items(), reverse=True)]
    return ordered, bars


def test_figure_rows_title_the_prediction_with_its_probability_and_collapse_when_there_are_no_maps():
    image = np.random.default_rng(1).uniform(size=(8, 8, 3))
    fig = visualization.figure(image, _figure_rows(), panel_pixels=64)
    rows, _ = _panels(fig)
    titles = [[ax.get_title(loc="left") or ax.get_title() for ax in row] for row in rows]
    assert titles == [["CBAM: circle 87%\ntrue: square", "stage 1", "stage 2", "Grad-CAM"],
                      ["ResNet: square 51%\ntrue: square", "Grad-CAM"]]
    assert rows[0][-1].get_position().x0 == rows[1][-1].get_position().x0, "Grad-CAMs in one column"
    np.testing.assert_allclose(fig.get_size_inches() * fig.dpi, visualization.figure_pixels(2, 2, 64))


def test_figure_draws_maps_over_the_grey_image_on_a_fixed_0_1_scale_with_a_colour_bar_each():
    image = np.random.default_rng(1).uniform(size=(8, 8, 3))
    fig = visualization.figure(image, _figure_rows(), panel_pixels=64)
    rows, bars = _panels(fig)
    picture, *overlays = rows[0]
    assert picture.images[0].get_array().shape == (8, 8, 3)  # the image itself, in colour, once per row
    for ax in overlays:
        backdrop, overlay = ax.images
        np.testing.assert_allclose(backdrop.get_array(), visualization.grey(image), rtol=1e-6)
        assert backdrop.get_cmap().name == "gray" and backdrop.get_clim() == (0.0, 1.0)
        assert overlay.get_clim() == (0.0, 1.0)
    assert [ax.images[1].get_cmap().name for ax in overlays] == ["viridis", "viridis", "inferno"]
    assert [(ax.get_ylabel(), ax.get_ylim()) for ax in bars] == [("gate", (0.0, 1.0)),
                                                                 ("Grad-CAM / max", (0.0, 1.0))]


def test_a_figure_without_gates_has_only_the_grad_cam_colour_bar():
    image = np.random.default_rng(1).uniform(size=(8, 8, 3))
    fig = visualization.figure(image, _figure_rows()[1:], panel_pixels=64)
    _, bars = _panels(fig)
    assert [ax.get_ylabel() for ax in bars] == ["Grad-CAM / max"]
    assert visualization.figure_pixels(0, 1, 64)[0] < visualization.figure_pixels(1, 1, 64)[0]


def test_grey_is_the_luminance_of_the_image():
    image = np.array([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 1.0, 1.0]]])
    np.testing.assert_allclose(visualization.grey(image), [[0.299, 0.587, 0.114, 1.0]], rtol=1e-6)


def test_explain_gives_the_softmax_probability_of_each_predicted_class():
    model, variables = tiny_model("cbam")
    images = jax.random.normal(jax.random.key(4), (3, 32, 32, 3))
    view = visualization.explain(model, variables, images)
    logits = np.asarray(model.apply(variables, images, train=False), np.float64)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    np.testing.assert_array_equal(view.predictions, logits.argmax(-1))
    np.testing.assert_allclose(view.probabilities, probs.max(-1), rtol=1e-5)
