"""Checks of a config's values that need nothing but the config: no dataset, no devices, no compilation.

:func:`check_values` runs first in ``train.py``, before anything is prepared or written, so a value that cannot
describe a run (a negative learning rate, zero steps, a batch of no examples) fails in one line naming the field
and what to give instead, rather than training towards nonsense.
"""
from typing import Any, Callable, Optional

import ml_collections

from attn_flax.training import durations, optim


class ConfigError(ValueError):
    """The config cannot describe a run; the message says what to change."""


def _positive_int(value: Any) -> Optional[str]:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        return "must be a positive whole number"
    return None


def _non_negative(value: Any) -> Optional[str]:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        return "must be a number >= 0"
    return None


def _fraction(value: Any) -> Optional[str]:
    """In [0, 1): momentum, label smoothing."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        return "must be in [0, 1)"
    return None


def _decay_factor(value: Any) -> Optional[str]:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        return "must be in (0, 1] (the factor the learning rate is multiplied by at each decay epoch)"
    return None


def _schedule(value: Any) -> Optional[str]:
    return None if value in optim.SCHEDULES else f"must be one of {', '.join(optim.SCHEDULES)}"


RULES: dict[str, Callable[[Any], Optional[str]]] = {
    "batch_size": _positive_int,
    "eval_batch_size": _positive_int,
    "grad_accum_steps": _positive_int,
    "base_learning_rate": _non_negative,
    "schedule": _schedule,
    "warmup_epochs": _non_negative,
    "decay_factor": _decay_factor,
    "momentum": _fraction,
    "weight_decay": _non_negative,
    "label_smoothing": _fraction,
    "keep_checkpoints": _positive_int,
}
"""Field -> a function giving what is wrong with its value (None when the value is fine)."""


STEPS_OR_EPOCHS = {"num_train_steps": "num_epochs",
                   **{f"{a}_every_steps": f"{a}_every_epochs" for a in durations.PERIODIC}}
"""Each duration's steps field -> its epochs field, used when the steps field is -1 (``durations.FROM_EPOCHS``)."""


def _check_duration(config: ml_collections.ConfigDict, steps_field: str, epochs_field: str) -> None:
    steps = config.get(steps_field)
    if isinstance(steps, bool) or not isinstance(steps, int) or not (steps > 0 or steps == durations.FROM_EPOCHS):
        zero = " (0 would never happen)" if steps == 0 else ""
        raise ConfigError(f"{steps_field}={steps!r} must be a positive number of steps, or -1 to take it from "
                          f"{epochs_field}{zero}; set --config.{steps_field}")
    epochs = config.get(epochs_field)
    if steps == durations.FROM_EPOCHS and (isinstance(epochs, bool) or not isinstance(epochs, (int, float))
                                           or not epochs > 0):
        raise ConfigError(f"{epochs_field}={epochs!r} must be > 0 when {steps_field} is -1; set "
                          f"--config.{epochs_field} or --config.{steps_field}")


def check_values(config: ml_collections.ConfigDict) -> None:
    """Raises :class:`ConfigError` for the first field whose value cannot describe a run."""
    for field, rule in RULES.items():
        if field in config:
            problem = rule(config[field])
            if problem:
                raise ConfigError(f"{field}={config[field]!r} {problem}; set --config.{field}")
    for steps_field, epochs_field in STEPS_OR_EPOCHS.items():
        _check_duration(config, steps_field, epochs_field)
    if config.batch_size % config.grad_accum_steps:
        raise ConfigError(f"batch_size {config.batch_size} must be divisible by grad_accum_steps "
                          f"{config.grad_accum_steps}; set --config.batch_size or --config.grad_accum_steps")
    for epoch in config.get("decay_epochs") or ():
        if isinstance(epoch, bool) or not isinstance(epoch, (int, float)) or epoch < 0:
            raise ConfigError(f"decay_epochs={tuple(config.decay_epochs)!r}: every epoch must be a number >= 0; "
                              "set --config.decay_epochs")
    check_bn_group_size(config)


def check_bn_group_size(config: ml_collections.ConfigDict) -> None:
    """``bn_group_size``, when set, must be at least 2 and divide every (micro-)batch."""
    group, micro_batch = config.get("bn_group_size"), config.batch_size // config.grad_accum_steps
    if group is not None and (group < 2 or micro_batch % group):
        raise ConfigError(f"bn_group_size {group} must be at least 2 and divide the {micro_batch} examples of each "
                          "(micro-)batch (batch_size / grad_accum_steps); choose a divisor or leave it unset")
