"""A trained model and its variables, from a training workdir or from a converted official checkpoint.

A training workdir (``train.py --workdir=DIR``) holds ``config.json`` and ``checkpoints/<step>/{state,meta}``: the
model is rebuilt from the config exactly as the trainer builds it (:func:`attn_flax.training.loop.prepare`) and
the newest readable checkpoint is restored onto the data mesh with the trainer's own restore
(:func:`attn_flax.training.checkpoints.restore_latest`). A converted directory (``python -m attn_flax.convert``)
holds ``model.json`` and ``variables/`` and is read by :func:`attn_flax.convert.load_converted`.
"""
import dataclasses
import json
import os
from typing import Any, Optional

import jax
import ml_collections
import orbax.checkpoint as ocp
from flax import linen as nn

from attn_flax import convert
from attn_flax.training import checkpoints, loop, sharding
from attn_flax.training.state import init_train_state

CONFIG_FILE = "config.json"


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
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise LoadError(f"{workdir} is not a training workdir: it has no {CONFIG_FILE} (train.py writes one); "
                        "for a converted official checkpoint use --checkpoint")
    with open(path, encoding="utf-8") as f:
        return ml_collections.ConfigDict(_tuples(json.load(f)))


def _has_checkpoint(workdir: str) -> bool:
    directory = os.path.join(workdir, "checkpoints")
    return os.path.isdir(directory) and any(name.isdigit() for name in os.listdir(directory))


def _read_only_manager(workdir: str) -> ocp.CheckpointManager:
    """A manager of ``WORKDIR/checkpoints`` that writes and deletes nothing, so that a run still training in
    the workdir keeps its in-flight (temporary) saves."""
    options = ocp.CheckpointManagerOptions(create=False, read_only=True, cleanup_tmp_directories=False,
                                           enable_async_checkpointing=False)
    return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"), options=options)


def from_workdir(workdir: str, config: Optional[ml_collections.ConfigDict] = None) -> TrainedModel:
    """The model of a training run and the parameters and BatchNorm statistics of its newest readable checkpoint.

    Arrays come back replicated on :func:`attn_flax.training.sharding.data_mesh`. Raises :class:`LoadError` when
    the directory is no workdir or holds no checkpoint, ``loop.ConfigError`` when its config cannot be built
    (e.g. the dataset is not prepared here) and ``checkpoints.CheckpointError`` when no checkpoint is readable.
    """
    config = config if config is not None else read_config(workdir)
    if not _has_checkpoint(workdir):
        raise LoadError(f"{workdir} has no checkpoint yet: train longer (checkpoint_every_steps="
                        f"{config.get('checkpoint_every_steps')}) or pass the workdir of a finished run")
    run = loop.prepare(config)
    replicated = sharding.replicated(run.mesh)
    image_shape = (run.info.image_size, run.info.image_size, 3)
    shapes = jax.eval_shape(lambda rng: init_train_state(run.model, run.tx, rng, image_shape),
                            jax.random.key(config.seed))
    manager = _read_only_manager(workdir)
    try:
        restored = checkpoints.restore_latest(manager, checkpoints.abstract(shapes, replicated))
    finally:
        manager.close()
    if restored is None:
        raise LoadError(f"{workdir} has no checkpoint yet")
    state, meta = restored
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    return TrainedModel(run.model, variables, source=os.path.abspath(workdir), config=config,
                        step=int(meta["step"]))


def from_converted(directory: str) -> TrainedModel:
    """A converted official checkpoint (``model.json`` + ``variables/``); raises :class:`LoadError` if absent."""
    if not os.path.isfile(os.path.join(directory, convert.MODEL_FILE)):
        raise LoadError(f"{directory} is not a converted checkpoint: it has no {convert.MODEL_FILE} (write one with "
                        "python -m attn_flax.convert); for a training run use --workdir")
    model, variables = convert.load_converted(directory)
    return TrainedModel(model, dict(variables), source=os.path.abspath(directory))
