"""Loading the official PyTorch CBAM/BAM ResNet weights (Jongchan/attention-module) into attn_flax models.

The released checkpoints (ResNet50+CBAM 77.62 top-1, ResNet50+BAM 76.86) are ``.pth.tar`` files holding
``{'epoch', 'arch', 'state_dict', 'best_prec1', 'optimizer'}``, saved from a ``DataParallel`` model (keys start
with ``module.``). :func:`from_official` maps such a state dict onto the matching :mod:`attn_flax.models` ResNet;
BAM is built with ``combine='product'``, which is what the official code computes.

Layouts: a PyTorch Conv2d weight (out, in, kh, kw) becomes a Flax kernel (kh, kw, in, out), a Linear weight
(out, in) becomes (in, out); BatchNorm ``weight``/``bias`` become ``scale``/``bias`` in ``params`` and
``running_mean``/``running_var`` become ``mean``/``var`` in ``batch_stats``; ``num_batches_tracked`` is dropped.

Command line (torch is needed only here: ``pip install attn_flax[torch]``)::

    python -m attn_flax.convert --checkpoint RESNET50_CBAM.pth.tar --depth 50 --attention cbam \
        --stem imagenet --output converted/resnet50_cbam

writes ``DIR/model.json`` (what :func:`load_converted` needs to rebuild the model) and ``DIR/variables`` (an
Orbax checkpoint of ``{'params', 'batch_stats'}``).
"""
import argparse
import io
import json
import re
import sys
from typing import Any, Mapping, Optional, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import linen as nn

from attn_flax import cli, models, paths

DEPTHS = (18, 34, 50, 101, 152)
ATTENTIONS = (None, "cbam", "bam")
OFFICIAL_ATTENTION_OPTIONS = {None: {}, "cbam": {}, "bam": {"combine": "product"}}
MODEL_FILE = "model.json"
VARIABLES_DIR = "variables"

_MODULE_NAMES = {
    "stem_conv": "conv1",
    "stem_bn": "bn1",
    "head": "fc",
    "downsample_conv": "downsample.0",
    "downsample_bn": "downsample.1",
    "attention": "cbam",
    "fc1": "mlp.1",
    "fc2": "mlp.3",
    "SpatialGate": "SpatialGate.spatial",
    "channel": "channel_att.gate_c",
    "spatial": "spatial_att.gate_s",
    "fc_0": "gate_c_fc_0",
    "bn_0": "gate_c_bn_1",
    "fc_final": "gate_c_fc_final",
    "conv_reduce": "gate_s_conv_reduce0",
    "bn_reduce": "gate_s_bn_reduce0",
    "conv_final": "gate_s_conv_final",
}
_MODULE_PATTERNS = (
    (re.compile(r"stage(\d+)_block(\d+)"), r"layer\1.\2"),
    (re.compile(r"stage(\d+)_attention"), r"bam\1"),
    (re.compile(r"conv_dilated_(\d+)"), r"gate_s_conv_di_\1"),
    (re.compile(r"bn_dilated_(\d+)"), r"gate_s_bn_di_\1"),
)
_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean",
               "var": "running_var"}


SHOWN_KEYS = 3
"""Keys an error message names per kind of mismatch; the full lists are the error's attributes."""
_STAGE_SIZES = {((2, 2, 2, 2), False): 18, ((3, 4, 6, 3), False): 34, ((3, 4, 6, 3), True): 50,
                ((3, 4, 23, 3), True): 101, ((3, 8, 36, 3), True): 152}


class CheckpointMismatchError(ValueError):
    """A state dict that does not fit the model, summarised in a few lines: per kind (missing keys, unexpected
    keys, wrong shapes) the count and the first :data:`SHOWN_KEYS`, and the settings the checkpoint's keys point
    to. The full lists are the attributes ``missing``, ``unexpected`` and ``wrong_shapes``."""

    def __init__(self, missing: Sequence[str], unexpected: Sequence[str], wrong_shapes: Sequence[str],
                 context: str, looks_like: Optional[str] = None):
        self.missing, self.unexpected, self.wrong_shapes = list(missing), list(unexpected), list(wrong_shapes)
        parts = [f"the state dict does not match {context}:"]
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected),
                             ("wrong shapes", wrong_shapes)):
            if items:
                more = f", ... and {len(items) - SHOWN_KEYS} more" if len(items) > SHOWN_KEYS else ""
                parts.append(f"  {title} ({len(items)}): " + ", ".join(items[:SHOWN_KEYS]) + more)
        hint = "check --depth, --attention and --stem against the checkpoint"
        parts.append(hint + (f"; its keys look like {looks_like}" if looks_like else ""))
        super().__init__("\n".join(parts))


def describe_state_dict(weights: Mapping[str, Any]) -> Optional[str]:
    """The converter flags an official state dict's keys point to (``--depth=50 --attention=cbam
    --stem=imagenet``), as far as they tell; None when they do not look like an official ResNet."""
    blocks: dict[int, int] = {}
    for key in weights:
        if match := re.match(r"layer(\d+)\.(\d+)\.", key):
            stage, block = int(match[1]), int(match[2])
            blocks[stage] = max(blocks.get(stage, 0), block + 1)
    if sorted(blocks) != [1, 2, 3, 4]:
        return None
    flags = []
    depth = _STAGE_SIZES.get((tuple(blocks[s] for s in (1, 2, 3, 4)), "layer1.0.conv3.weight" in weights))
    if depth:
        flags.append(f"--depth={depth}")
    attention = ("cbam" if any(".cbam." in key for key in weights)
                 else "bam" if any(key.startswith("bam") for key in weights) else "none")
    flags.append(f"--attention={attention}")
    stem_kernel = getattr(weights.get("conv1.weight"), "shape", (0,))[-1]
    if stem_kernel in (7, 3):
        flags.append(f"--stem={'imagenet' if stem_kernel == 7 else 'cifar'}")
    return " ".join(flags)


def official_key(path: Sequence[str]) -> str:
    """The official state-dict key of a Flax variable path, e.g. ('stage1_block0', 'conv1', 'kernel')."""
    *modules, leaf = path
    return ".".join([_official_module_name(m) for m in modules] + [_LEAF_NAMES[leaf]])


def _official_module_name(name: str) -> str:
    for pattern, replacement in _MODULE_PATTERNS:
        if pattern.fullmatch(name):
            return pattern.sub(replacement, name)
    return _MODULE_NAMES.get(name, name)


def _to_flax_layout(value: np.ndarray, leaf: str) -> np.ndarray:
    """Torch layout -> Flax layout: Conv (O, I, *k) -> (*k, I, O), Linear (O, I) -> (I, O); others unchanged."""
    if leaf == "kernel":
        return np.transpose(value, tuple(range(2, value.ndim)) + (1, 0))
    return value


def _to_torch_shape(shape: Sequence[int], leaf: str) -> tuple[int, ...]:
    if leaf == "kernel":
        return (shape[-1], shape[-2]) + tuple(shape[:-2])
    return tuple(shape)


def _as_numpy(value: Any) -> np.ndarray:
    """A NumPy array from a NumPy array or a torch tensor (any device; half precisions widened to float32)."""
    if hasattr(value, "detach"):
        value = value.detach().cpu()
        value = (value.float() if value.is_floating_point() and value.element_size() < 4 else value).numpy()
    return np.asarray(value)


def _attention_name(attention: Optional[str]) -> Optional[str]:
    return None if attention is None or attention.lower() == "none" else attention.lower()


def clean_state_dict(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Unwraps ``{'state_dict': ...}``, strips DataParallel's ``module.`` prefix, drops ``num_batches_tracked``."""
    if "state_dict" in state_dict and isinstance(state_dict["state_dict"], Mapping):
        state_dict = state_dict["state_dict"]
    cleaned = {}
    for key, value in state_dict.items():
        key = key[len("module."):] if key.startswith("module.") else key
        if not key.endswith("num_batches_tracked"):
            cleaned[key] = _as_numpy(value)
    return cleaned


def official_model(depth: int, attention: Optional[str], stem: str, num_classes: int) -> nn.Module:
    """The attn_flax ResNet that computes what the official code computes for these settings."""
    attention = _attention_name(attention)
    if depth not in DEPTHS:
        raise ValueError(f"unsupported depth {depth}; valid depths: {', '.join(map(str, DEPTHS))}")
    if attention not in ATTENTIONS:
        raise ValueError(f"the official checkpoints have no attention {attention!r}; valid: none, cbam, bam")
    return models.create_model(f"resnet{depth}", num_classes=num_classes, attention=attention, stem=stem,
                               **OFFICIAL_ATTENTION_OPTIONS[attention])


def abstract_variables(model: nn.Module) -> dict[str, Any]:
    """Shapes and dtypes of ``model``'s variables, without computing them."""
    return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))


def official_layout(model: nn.Module) -> dict[str, tuple[tuple[str, ...], tuple[int, ...], Any]]:
    """Every official state-dict key ``model`` needs -> (its Flax variable path, the PyTorch shape, dtype)."""
    layout = {}
    for (collection, *path), spec in flax.traverse_util.flatten_dict(abstract_variables(model)).items():
        layout[official_key(path)] = ((collection, *path), _to_torch_shape(spec.shape, path[-1]), spec.dtype)
    return layout


def from_official(state_dict: Mapping[str, Any], *, depth: int, attention: Optional[str],
                  stem: str) -> tuple[nn.Module, dict[str, Any]]:
    """An official-format state dict -> (model, ``{'params', 'batch_stats'}``); ``num_classes`` from ``fc.weight``.

    ``state_dict`` may carry DataParallel's ``module.`` prefix or be the official ``{'state_dict': ...}``
    wrapper; values are NumPy arrays or torch tensors. Raises :class:`CheckpointMismatchError` with every
    missing key, unexpected key and wrong shape (its message summarises them in a few lines).
    """
    weights = clean_state_dict(state_dict)
    context = f"resnet{depth} stem={stem} attention={attention}"
    if "fc.weight" not in weights:
        raise CheckpointMismatchError(["fc.weight"], [], [], context, describe_state_dict(weights))
    model = official_model(depth, attention, stem, num_classes=int(weights["fc.weight"].shape[0]))
    layout = official_layout(model)

    missing = [key for key in layout if key not in weights]
    unexpected = sorted(set(weights) - set(layout))
    wrong_shapes = [f"{key}: checkpoint {tuple(weights[key].shape)}, model {shape}"
                    for key, (_, shape, _) in layout.items() if key in weights and weights[key].shape != shape]
    if missing or unexpected or wrong_shapes:
        raise CheckpointMismatchError(missing, unexpected, wrong_shapes, context, describe_state_dict(weights))
    converted = {path: jnp.array(_to_flax_layout(weights[key], path[-1]), dtype=dtype, copy=True)
                 for key, (path, _, dtype) in layout.items()}
    return model, flax.traverse_util.unflatten_dict(converted)


def to_official(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The inverse mapping: attn_flax variables -> an official-format state dict of NumPy arrays (no prefix)."""
    state = {}
    for (_, *path), value in flax.traverse_util.flatten_dict(dict(variables)).items():
        value, leaf = np.asarray(value), path[-1]
        if leaf == "kernel":
            value = np.transpose(value, (value.ndim - 1, value.ndim - 2) + tuple(range(value.ndim - 2)))
        state[official_key(path)] = value
    return state


def model_spec(model: nn.Module, depth: int, attention: Optional[str], stem: str) -> dict[str, Any]:
    """The ``model.json`` description of a converted official model: what :func:`load_converted` rebuilds."""
    attention = _attention_name(attention)
    return {"model": f"resnet{depth}", "depth": depth, "attention": attention,
            "attention_options": OFFICIAL_ATTENTION_OPTIONS[attention], "stem": stem,
            "num_classes": model.num_classes}


def save_converted(directory: paths.PathLike, spec: Mapping[str, Any], variables: Mapping[str, Any],
                   *, force: bool = False) -> epath.Path:
    """Writes ``model.json`` (the model spec) and an Orbax checkpoint of ``variables`` under ``directory``."""
    import orbax.checkpoint as ocp

    directory = paths.resolve(directory)  # local or gs://
    directory.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(directory / VARIABLES_DIR, dict(variables), force=force)
    (directory / MODEL_FILE).write_text(json.dumps(dict(spec), indent=2, sort_keys=True) + "\n")
    return directory


def load_converted(directory: paths.PathLike) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuilds the model described by ``DIR/model.json`` and restores its variables from ``DIR/variables``."""
    import orbax.checkpoint as ocp

    directory = paths.resolve(directory)
    spec = json.loads((directory / MODEL_FILE).read_text())
    model = models.create_model(spec["model"], num_classes=spec["num_classes"], attention=spec["attention"],
                                stem=spec["stem"], **spec.get("attention_options", {}))
    with ocp.StandardCheckpointer() as checkpointer:
        variables = checkpointer.restore(directory / VARIABLES_DIR, abstract_variables(model))
    return model, variables


class CheckpointReadError(ValueError):
    """The official checkpoint file is missing or cannot be read."""


def read_checkpoint(path: paths.PathLike) -> Mapping[str, Any]:
    """Reads an official ``.pth.tar`` (a bare state dict or the training wrapper) with ``weights_only=True``."""
    if not paths.resolve(path).is_file():
        raise CheckpointReadError(f"--checkpoint {path} does not exist; give the path of an official .pth.tar")
    try:
        import torch
    except ImportError as error:
        raise CheckpointReadError("reading a PyTorch checkpoint needs torch: pip install 'attn_flax[torch]'") \
            from error
    source = io.BytesIO(paths.resolve(path).read_bytes()) if paths.is_uri(path) else path  # torch opens local only
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - truncated, not a checkpoint, or pickled objects torch refuses
        reason = str(error).split(". ")[0] if str(error) else type(error).__name__
        raise CheckpointReadError(f"--checkpoint {path} cannot be read as a PyTorch checkpoint ({reason}); it may be "
                                  "truncated or not a .pth.tar: download it again") from error


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m attn_flax.convert``: an official ``.pth.tar`` -> an attn_flax checkpoint directory."""
    parser = argparse.ArgumentParser(
        prog="python -m attn_flax.convert",
        description="Converts an official CBAM/BAM ResNet checkpoint (Jongchan/attention-module .pth.tar) into an "
                    "attn_flax directory (model.json + Orbax variables) that attn_flax.convert.load_converted reads.")
    parser.add_argument("--checkpoint", required=True, help="official .pth.tar (or a bare state dict)")
    parser.add_argument("--depth", type=int, required=True, choices=DEPTHS)
    parser.add_argument("--attention", default="none", choices=("none", "cbam", "bam"))
    parser.add_argument("--stem", default="imagenet", choices=models.STEMS)
    parser.add_argument("--output", required=True, help="directory to write model.json and variables/ into")
    parser.add_argument("--force", action="store_true", help="overwrite an existing converted checkpoint")
    args = parser.parse_args(argv)

    if (paths.resolve(args.output) / VARIABLES_DIR).exists() and not args.force:
        print(f"{args.output} already holds a converted checkpoint; pass --force to overwrite it", file=sys.stderr)
        return 1
    try:
        state = read_checkpoint(args.checkpoint)
    except CheckpointReadError as error:
        cli.fail(parser.prog, str(error), 2)
    try:
        model, variables = from_official(state, depth=args.depth, attention=args.attention, stem=args.stem)
    except CheckpointMismatchError as error:
        print(error, file=sys.stderr)
        return 1
    spec = model_spec(model, args.depth, args.attention, args.stem)
    spec["source"] = paths.resolve(args.checkpoint).name
    output = save_converted(args.output, spec, variables, force=args.force)
    num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables["params"]))
    print(f"wrote {output}: {spec['model']} attention={spec['attention']} stem={spec['stem']} "
          f"num_classes={spec['num_classes']} params={num_params:,}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
