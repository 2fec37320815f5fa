"""Where a network attends: its spatial attention maps and Grad-CAM, and a figure of both for one image.

Attention maps come out of the model itself: the attention modules sow their gates into the ``intermediates``
collection (CBAM: ``stage{s}_block{b}/attention/spatial_attention`` [N, H, W, 1]; BAM:
``stage{s}_attention/spatial_attention``, the channel mean of its 3-D map), read here with
``model.apply(..., mutable=['intermediates'])``. A CBAM stage with several blocks is shown as the mean of its
blocks' maps (all blocks of a stage share one resolution).

Grad-CAM (Selvaraju et al., ICCV 2017) of a layer with activations A (channels k) for class c:
``ReLU(sum_k alpha_k A_k)`` with ``alpha_k`` the spatial mean of ``d y_c / d A_k``. The gradient is taken with
respect to a zero perturbation added to the layer's output through ``nn.intercept_methods``, so the model's code
is untouched and any layer can be chosen; the default is the last block of the last stage, as in the CBAM
paper's figure.
"""
import dataclasses
import re
from typing import Any, Mapping, Optional, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

_STAGE_MODULE = re.compile(r"stage(\d+)_(?:block\d+|attention)")
SPATIAL_MAP = "spatial_attention"


def attention_intermediates(model: nn.Module, variables: Mapping[str, Any], images: jax.Array
                            ) -> dict[str, Any]:
    """Everything the model sows into ``intermediates`` in inference mode, as a nested dict."""
    _, state = model.apply(dict(variables), images, train=False, mutable=["intermediates"])
    return flax.core.unfreeze(state.get("intermediates", {}))


def stage_spatial_maps(intermediates: Mapping[str, Any]) -> dict[int, jax.Array]:
    """Stage number -> its spatial attention map [N, h, w], the mean over the stage's modules that sow one.

    Empty for attentions without a spatial map (SE, ECA, CBAM with ``spatial=False``) and for a plain ResNet.
    """
    per_stage: dict[int, list[jax.Array]] = {}
    for path, value in flax.traverse_util.flatten_dict(dict(intermediates)).items():
        match = _STAGE_MODULE.fullmatch(path[0])
        if match and path[-1] == SPATIAL_MAP:
            per_stage.setdefault(int(match.group(1)), []).extend(v[..., 0] for v in value)
    return {s: jnp.mean(jnp.stack(maps), axis=0) for s, maps in sorted(per_stage.items())}


def upsample(maps: jax.Array, size: int) -> jax.Array:
    """Bilinear resize of maps [N, h, w] to [N, size, size]; a convex combination, so values keep their range."""
    return jax.image.resize(maps, (maps.shape[0], size, size), method="bilinear")


def last_stage_layer(model: nn.Module) -> tuple[str, ...]:
    """The module path of a ResNet's last block (the input of its global pool): Grad-CAM's usual layer."""
    return (f"stage{len(model.stage_sizes)}_block{model.stage_sizes[-1] - 1}",)


def _apply_perturbed(model: nn.Module, variables: Mapping[str, Any], images: jax.Array, layer: tuple[str, ...],
                     delta: Optional[jax.Array]) -> tuple[jax.Array, jax.Array]:
    """Logits of the model with ``delta`` added to ``layer``'s output, and that (perturbed) output."""
    captured = []

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        scope = context.module.scope
        if context.method_name == "__call__" and scope is not None and tuple(scope.path) == layer:
            out = out if delta is None else out + delta
            captured.append(out)
        return out

    with nn.intercept_methods(interceptor):
        logits = model.apply(dict(variables), images, train=False)
    if not captured:
        raise ValueError(f"the model has no module at {'/'.join(layer)}; pass a module path such as "
                         f"{last_stage_layer(model) if hasattr(model, 'stage_sizes') else ('name',)}")
    return logits, captured[0]


@dataclasses.dataclass(frozen=True)
class GradCam:
    """Grad-CAM maps [N, h, w] (non-negative, not normalised), the classes they explain [N] and the logits."""

    maps: jax.Array
    classes: jax.Array
    logits: jax.Array


def grad_cam(model: nn.Module, variables: Mapping[str, Any], images: jax.Array,
             classes: Optional[jax.Array] = None, layer: Optional[Sequence[str]] = None) -> GradCam:
    """Grad-CAM of ``layer`` (default :func:`last_stage_layer`) for ``classes`` (default: the predicted ones)."""
    layer = tuple(layer) if layer is not None else last_stage_layer(model)
    images = jnp.asarray(images)
    _, activation = jax.eval_shape(lambda x: _apply_perturbed(model, variables, x, layer, None), images)

    @jax.jit
    def compute(variables, images, classes):
        def score(delta):
            logits, activations = _apply_perturbed(model, variables, images, layer, delta)
            targets = jnp.argmax(logits, axis=-1) if classes is None else classes
            chosen = jnp.take_along_axis(logits, targets[:, None], axis=-1)
            return jnp.sum(chosen), (activations, targets, logits)

        grads, (activations, targets, logits) = jax.grad(score, has_aux=True)(
            jnp.zeros(activation.shape, activation.dtype))
        alpha = jnp.mean(grads.astype(jnp.float32), axis=(1, 2))
        maps = nn.relu(jnp.einsum("nhwk,nk->nhw", activations.astype(jnp.float32), alpha))
        return maps, targets, logits

    maps, targets, logits = compute(dict(variables), images, None if classes is None else jnp.asarray(classes))
    return GradCam(maps, targets, logits)


@dataclasses.dataclass(frozen=True)
class ModelView:
    """A model's attention on a batch: stage label -> spatial map [N, h, w], Grad-CAM scaled to [0, 1] per
    image [N, h, w], the predicted classes, their softmax probabilities and the classes Grad-CAM explains [N]."""

    maps: dict[str, np.ndarray]
    grad_cam: np.ndarray
    predictions: np.ndarray
    classes: np.ndarray
    probabilities: np.ndarray


def explain(model: nn.Module, variables: Mapping[str, Any], images: jax.Array, *,
            classes: Optional[jax.Array] = None, size: Optional[int] = None) -> ModelView:
    """Spatial attention maps and Grad-CAM of ``model`` on ``images``; with ``size``, both bilinearly upsampled
    to ``size`` x ``size`` (the image size)."""
    maps = {f"stage {s}": m for s, m in stage_spatial_maps(attention_intermediates(model, variables, images)).items()}
    cam = grad_cam(model, variables, images, classes)
    heat = normalise_per_image(cam.maps)
    if size is not None:
        maps = {label: upsample(m, size) for label, m in maps.items()}
        heat = upsample(heat, size)
    probabilities = jax.nn.softmax(cam.logits.astype(jnp.float32), axis=-1)
    predictions = jnp.argmax(cam.logits, axis=-1)
    return ModelView({label: np.asarray(m) for label, m in maps.items()}, np.asarray(heat),
                     np.asarray(predictions), np.asarray(cam.classes),
                     np.asarray(jnp.take_along_axis(probabilities, predictions[:, None], axis=-1)[:, 0]))


def normalise_per_image(maps: jax.Array) -> jax.Array:
    """Non-negative maps [N, h, w] scaled so that each image's maximum is 1 (all-zero maps stay zero)."""
    peak = jnp.max(maps, axis=(1, 2), keepdims=True)
    return jnp.where(peak > 0, maps / jnp.where(peak > 0, peak, 1.0), 0.0)


def denormalise(images: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Normalised images [..., 3] back to displayable [0, 1] pixels."""
    return np.clip(np.asarray(images) * np.asarray(std) + np.asarray(mean), 0.0, 1.0)


def grey(image: np.ndarray) -> np.ndarray:
    """An RGB image [h, w, 3] in [0, 1] as its luminance (ITU-R BT.601 weights) [h, w]: the backdrop of an
    overlay, so that the map's colours are the only colours in the panel."""
    return np.asarray(image, np.float32)[..., :3] @ np.asarray([0.299, 0.587, 0.114], np.float32)


def row_title(model_label: str, predicted: str, probability: float, true: Optional[str] = None) -> str:
    """'CBAM: cat 87%' over 'true: dog': the model, its predicted class with its softmax probability, and the
    true class."""
    title = f"{model_label}: {predicted} {100 * probability:.0f}%"
    return title if true is None else f"{title}\ntrue: {true}"


@dataclasses.dataclass(frozen=True)
class Explanation:
    """One model's view of one image: title, stage label -> spatial map [h, w] in [0, 1], Grad-CAM [h, w]."""

    title: str
    maps: dict[str, np.ndarray]
    grad_cam: np.ndarray


GATE_CMAP = "viridis"
GRAD_CAM_CMAP = "inferno"
LAYOUT = dict(margin=0.06, gap=0.05, title=0.32, bar=0.1, bar_labels=0.5)
"""Sizes in the figure, as fractions of a panel's side: the outer margin, the gap between panels, the band above
each row for its title (two lines), a colour bar's width and the room right of it for its ticks and label."""


def colour_bars(num_maps: int) -> tuple[tuple[str, str], ...]:
    """(colour map, label) of each colour bar of :func:`figure`: the gates' when there are maps, Grad-CAM's."""
    gates = ((GATE_CMAP, "gate"),) if num_maps else ()
    return gates + ((GRAD_CAM_CMAP, "Grad-CAM / max"),)


def _frames(num_maps: int, num_rows: int) -> tuple[float, float, list[list[tuple[float, float]]],
                                                    list[float], float]:
    """The layout in panel units: width, height, the (left, bottom) of every panel per row, the left of every
    colour bar, and the bottom of the bars (they span the rows' panels)."""
    m, g, t = LAYOUT["margin"], LAYOUT["gap"], LAYOUT["title"]
    columns = num_maps + 2
    height = 2 * m + num_rows * (t + 1) + (num_rows - 1) * g
    bottoms = [height - m - (r + 1) * (t + 1) - r * g for r in range(num_rows)]
    lefts = [m + c * (1 + g) for c in range(columns)]
    bar_lefts, x = [], m + columns * (1 + g) - g
    for _ in colour_bars(num_maps):
        x += 2 * g
        bar_lefts.append(x)
        x += LAYOUT["bar"] + LAYOUT["bar_labels"]
    return x + m, height, [[(left, b) for left in lefts] for b in bottoms], bar_lefts, bottoms[-1]


def figure_pixels(num_maps: int, num_rows: int, panel_pixels: int) -> tuple[int, int]:
    """(width, height) in pixels of :func:`figure` with ``num_maps`` map columns and ``num_rows`` rows."""
    width, height, *_ = _frames(num_maps, num_rows)
    return round(width * panel_pixels), round(height * panel_pixels)


def figure(image: np.ndarray, rows: Sequence[Explanation], *, title: Optional[str] = None,
           panel_pixels: int = 160, dpi: int = 100, alpha: float = 0.6):
    """A matplotlib Figure: one row per model (image, each stage's spatial gate, Grad-CAM) and colour bars.

    Maps are drawn over the image in grey, so that they read on any image: gates on a fixed 0-1 scale
    (:data:`GATE_CMAP`; a gate is a sigmoid, its value means the same in every panel), Grad-CAM scaled to a
    maximum of 1 per image (:data:`GRAD_CAM_CMAP`). Each row's title (:func:`row_title`) stands over its image.
    A model without spatial maps (a plain ResNet, SE, ECA) gets no empty map panels, only the image and Grad-CAM,
    which stays in the last column so that the rows' Grad-CAMs can be compared. Maps of any resolution are
    stretched over the image (nearest neighbour when not upsampled beforehand). ``title``, if given, is drawn in
    the top margin. The figure is exactly :func:`figure_pixels` large when saved without ``bbox_inches``.
    """
    import matplotlib.cm
    import matplotlib.colors
    from matplotlib.figure import Figure

    labels = list(dict.fromkeys(label for row in rows for label in row.maps))
    width, height, frames, bar_lefts, bar_bottom = _frames(len(labels), len(rows))
    pixels = figure_pixels(len(labels), len(rows), panel_pixels)
    fig = Figure(figsize=(pixels[0] / dpi, pixels[1] / dpi), dpi=dpi)
    fontsize = max(6, panel_pixels // 18)
    if title:
        fig.suptitle(title, fontsize=fontsize, y=1 - LAYOUT["margin"] / 2 / height, va="center")

    def axes(left: float, bottom: float, w: float = 1.0, h: float = 1.0):
        return fig.add_axes((left / width, bottom / height, w / width, h / height))

    extent = (-0.5, image.shape[1] - 0.5, image.shape[0] - 0.5, -0.5)
    backdrop = grey(image)
    for row, row_frames in zip(rows, frames):
        panels = [(0, row.title, None, None)] + [
            (1 + i, label, row.maps[label], GATE_CMAP) for i, label in enumerate(labels) if label in row.maps] + [
            (len(labels) + 1, "Grad-CAM", row.grad_cam, GRAD_CAM_CMAP)]
        for column, label, overlay, cmap in panels:
            ax = axes(*row_frames[column])
            ax.set_axis_off()
            if overlay is None:
                ax.imshow(image, extent=extent, interpolation="nearest")
            else:
                ax.imshow(backdrop, cmap="gray", vmin=0.0, vmax=1.0, extent=extent, interpolation="nearest")
                ax.imshow(overlay, cmap=cmap, alpha=alpha, vmin=0.0, vmax=1.0, extent=extent,
                          interpolation="nearest")
            ax.set_title(label, fontsize=fontsize, loc="left" if overlay is None else "center")
    norm = matplotlib.colors.Normalize(0.0, 1.0)
    bar_height = frames[0][0][1] + 1 - bar_bottom
    for left, (cmap, label) in zip(bar_lefts, colour_bars(len(labels))):
        bar = fig.colorbar(matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap),
                           cax=axes(left, bar_bottom, LAYOUT["bar"], bar_height), ticks=[0, 0.5, 1])
        bar.ax.tick_params(labelsize=fontsize * 0.85)
        bar.set_label(label, fontsize=fontsize * 0.85)
    return fig
