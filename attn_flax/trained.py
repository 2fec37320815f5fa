"""A trained model and its variables, from a training workdir or from a converted official checkpoint.

A training workdir (``train.py --workdir=DIR``) holds ``config.json`` and ``checkpoints/<step>/{state,meta}``: the
model is rebuilt from the config exactly as the trainer builds it (:func:`attn_flax.training.setup.build_model`)
and the parameters and BatchNorm statistics of the newest readable checkpoint are restored onto the data mesh,
reading nothing else (no optimiser, no training batch size: a checkpoint scores on any number of devices). A
converted directory (``python -m attn_flax.convert``) holds ``model.json`` and ``variables/`` and is read by
:func:`attn_flax.convert.load_converted`.
"""
import dataclasses
import json
from typing import Any, Optional

import ml_collections
from flax import linen as nn

from attn_flax import convert, data, paths
from attn_flax.training import checkpoints, setup, sharding
from attn_flax.training.config_checks import ConfigError
from attn_flax.training.state import abstract_state

class LoadError(ValueError):
    """The directory holds no model this package can load; the message says what was wrong."""


@dataclasses.dataclass(frozen=True)
class TrainedModel:
    """A model, its ``{'params', 'batch_stats'}``, where it came from and, for a workdir, its config and step."""

    model: nn.Module
    variables: dict[str, Any]
    source: str
    config: Optional[ml_collections.ConfigDict] = None
    step: Optional[int] = None


def _tuples(value: Any) -> Any:
    """JSON lists back to the tuples the configs use (``widths``, ``stage_sizes``, ``decay_epochs``...)."""
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value


def read_config(workdir: str) -> ml_collections.ConfigDict:
    """The run's config from ``WORKDIR/config.json``, with JSON lists turned back into tuples."""
    path = paths.resolve(workdir) / setup.CONFIG_FILE
    if not path.is_file():
        raise LoadError(f"{workdir} is not a training workdir: it has no {setup.CONFIG_FILE} (train.py writes one); "
                        "for a converted official checkpoint use --checkpoint")
    return ml_collections.ConfigDict(_tuples(json.loads(path.read_text())))


def from_workdir(workdir: str, config: Optional[ml_collections.ConfigDict] = None) -> TrainedModel:
    """The model of a training run and the parameters and BatchNorm statistics of its newest readable checkpoint.

    Arrays come back replicated on :func:`attn_flax.training.sharding.data_mesh`. Raises :class:`LoadError` when
    the directory is no workdir or holds no checkpoint, ``ConfigError`` when its config cannot be built (e.g. the
    dataset is not prepared here) and ``checkpoints.CheckpointError`` when no checkpoint is readable or the
    checkpoint does not fit the config's model.
    """
    config = config if config is not None else read_config(workdir)
    if not checkpoints.has_checkpoint(workdir):
        raise LoadError(f"{workdir} has no checkpoint yet: train longer (checkpoint_every_steps="
                        f"{config.get('checkpoint_every_steps')}) or pass the workdir of a finished run")
    try:
        info = data.dataset_info(config.dataset, data_dir=config.data_dir, image_size=config.get("image_size"))
        model = setup.build_model(config, info.num_classes)
    except (ValueError, data.DatasetNotPreparedError) as err:
        raise ConfigError(str(err).splitlines()[0]) from err
    target = abstract_state(model, (info.image_size, info.image_size, 3), sharding.replicated(sharding.data_mesh()))
    restored = checkpoints.restore_variables(workdir, target)
    if restored is None:
        raise LoadError(f"{workdir} has no checkpoint yet")
    variables, meta = restored
    return TrainedModel(model, dict(variables), source=str(paths.resolve(workdir)), config=config,
                        step=int(meta["step"]))


def from_converted(directory: str) -> TrainedModel:
    """A converted official checkpoint (``model.json`` + ``variables/``); raises :class:`LoadError` if absent."""
    if not (paths.resolve(directory) / convert.MODEL_FILE).is_file():
        raise LoadError(f"{directory} is not a converted checkpoint: it has no {convert.MODEL_FILE} (write one with "
                        "python -m attn_flax.convert); for a training run use --workdir")
    model, variables = convert.load_converted(directory)
    return TrainedModel(model, dict(variables), source=str(paths.resolve(directory)))
