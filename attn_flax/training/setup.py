"""From a config to a run that can start: everything checked and built that needs no compilation.

:func:`prepare` validates the config against the registries, the dataset and the devices and builds the model,
optimiser, schedule and durations (a user's typo fails in seconds, in one line, as :class:`ConfigError`);
:func:`check_workdir` says, reading only, whether the config may continue what a workdir holds. Both run before
``train.py`` writes anything. :func:`build_model` is the one place a config becomes a network, for training and
for loading a trained model alike.
"""
import dataclasses
import json
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import linen as nn

from attn_flax import data, models, paths
from attn_flax.training import checkpoints, config_checks, durations, optim, sharding
from attn_flax.training.config_checks import ConfigError

RESUME_FIELDS = ("seed", "dataset", "batch_size")
"""Fields a checkpoint's meta records: they fix the input stream, so a run resumes only with the same values."""
ARCHITECTURE_FIELDS = ("model", "attention", "attention_options", "stem", "widths", "stage_sizes")
"""Fields of ``config.json`` that fix the parameters' shapes: a checkpoint restores only into the same ones."""
CONFIG_FILE = "config.json"


def attention_options(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The attention options the config sets (unset placeholders are left to the module's defaults)."""
    return {k: (tuple(v) if isinstance(v, list) else v) for k, v in config.attention_options.items()
            if v is not None}


def build_model(config: ml_collections.ConfigDict, num_classes: int) -> nn.Module:
    """The config's network with its attention; ``widths``/``stage_sizes`` override the depth's defaults."""
    model = models.create_model(config.model, num_classes=num_classes, attention=config.attention,
                                stem=config.stem, dtype=jnp.bfloat16 if config.half_precision else jnp.float32,
                                zero_init_last_bn=config.zero_init_last_bn,
                                bn_group_size=config.get("bn_group_size"), **attention_options(config))
    overrides = {k: tuple(config[k]) for k in ("widths", "stage_sizes") if config.get(k) is not None}
    return model.clone(**overrides) if overrides else model


@dataclasses.dataclass(frozen=True)
class Run:
    """Everything the training loop needs, built and checked before any compilation."""

    config: ml_collections.ConfigDict
    info: data.DatasetInfo
    model: nn.Module
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    mesh: jax.sharding.Mesh
    steps: durations.Durations

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.info.image_size, self.info.image_size, 3)


def _check_topology(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> None:
    sharding.check_batch_size(config.batch_size, mesh, config.grad_accum_steps)
    if config.batch_size % jax.process_count():
        raise ValueError(f"batch_size {config.batch_size} must be divisible by the number of processes "
                         f"({jax.process_count()})")


def prepare(config: ml_collections.ConfigDict) -> Run:
    """Validates the config against the registries, the dataset and the devices; raises :class:`ConfigError`."""
    config_checks.check_values(config)
    try:
        build_model(config, num_classes=2)  # a bad model or attention is reported before the dataset is touched
        info = data.dataset_info(config.dataset, data_dir=config.data_dir, image_size=config.get("image_size"))
        model = build_model(config, info.num_classes)
        mesh = sharding.data_mesh()
        _check_topology(config, mesh)
        steps = durations.resolve(config, info.num_train_examples)
        schedule = optim.learning_rate_schedule(config, steps.total, steps.steps_per_epoch)
        tx = optim.create_optimizer(config, schedule)
    except (ValueError, TypeError, data.DatasetNotPreparedError) as err:
        raise ConfigError(str(err).splitlines()[0]) from err
    return Run(config, info, model, tx, schedule, mesh, steps)


def run_meta(config: ml_collections.ConfigDict, step: int) -> dict[str, Any]:
    """The JSON saved beside each checkpoint: the step and the :data:`RESUME_FIELDS`."""
    return {"step": step, **{k: config[k] for k in RESUME_FIELDS}}


def _as_json(value: Any) -> Any:
    return json.loads(json.dumps(value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value,
                                 default=list))


def check_workdir(config: ml_collections.ConfigDict, workdir: str) -> Optional[dict[str, Any]]:
    """Whether ``config`` may run in ``workdir``, checked without writing, preparing or compiling anything.

    Returns the meta of the newest checkpoint there (None for a new run). Raises :class:`ConfigError` when the
    workdir is a file, or when its checkpoint was made with other :data:`RESUME_FIELDS` or, per its
    ``config.json``, another architecture (:data:`ARCHITECTURE_FIELDS`): such a run cannot continue that one.
    """
    root = paths.resolve(workdir)
    if root.exists() and not root.is_dir():
        raise ConfigError(f"--workdir {workdir} is a file, not a directory; give a directory path (it is created "
                          "if missing)")
    meta = checkpoints.latest_meta(workdir)
    if meta is None:
        return None
    changed = [(k, meta.get(k), config[k]) for k in RESUME_FIELDS if meta.get(k) != config[k]]
    saved_config = root / CONFIG_FILE
    if saved_config.is_file():
        saved = json.loads(saved_config.read_text())
        changed += [(k, saved.get(k), config.get(k)) for k in ARCHITECTURE_FIELDS
                    if k in saved and _as_json(saved[k]) != _as_json(config.get(k))]
    if changed:
        key, before, now = changed[0]
        raise ConfigError(f"the checkpoint at step {meta['step']} in {workdir} was made with {key}={before!r}, the "
                          f"config says {_as_json(now)!r}; use a new --workdir or the original value")
    return meta


def write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    """``WORKDIR/config.json``: the resolved config of a run that starts (process 0 only)."""
    if jax.process_index() == 0:
        root = paths.resolve(workdir)
        root.mkdir(parents=True, exist_ok=True)
        (root / CONFIG_FILE).write_text(config.to_json_best_effort(indent=2, sort_keys=True))
