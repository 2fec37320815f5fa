"""Durations of a run in steps: what a config gives in epochs or in steps is converted here, and only here.

A config states each duration once, in the unit that keeps its meaning when the batch size changes:

- the run's length: ``num_train_steps`` (> 0), or ``num_train_steps = -1`` and ``num_epochs``;
- each periodic action ``X`` in :data:`PERIODIC` (log, eval, checkpoint): ``X_every_steps`` (> 0), or
  ``X_every_steps = -1`` and ``X_every_epochs``;
- the schedule's ``warmup_epochs`` and ``decay_epochs``.

Steps given as a positive number win, as they do for the run's length. An epoch is
``num_train_examples / batch_size`` steps (not rounded); a duration in epochs becomes the nearest whole number of
steps, at least 1 for a period, and the run's length is rounded up so that it covers every epoch asked for.
:func:`itstime` then decides every periodic action of the loop (log, eval, checkpoint, the preemption check).
"""
import dataclasses
import math

import ml_collections

PERIODIC = ("log", "eval", "checkpoint")
"""The periodic actions of the loop; each has ``X_every_steps`` and ``X_every_epochs`` config fields."""
FROM_EPOCHS = -1
"""The value of a ``*_steps`` field that says: take this duration from its ``*_epochs`` field."""


def steps_per_epoch(num_train_examples: int, batch_size: int) -> float:
    """How many global batches make one pass over the training split (not rounded)."""
    return num_train_examples / batch_size


def epochs_to_steps(epochs: float, per_epoch: float) -> int:
    """The nearest whole number of steps to ``epochs`` epochs."""
    return int(round(epochs * per_epoch))


def train_steps(config: ml_collections.ConfigDict, num_train_examples: int) -> int:
    """``num_train_steps`` when positive, else ``num_epochs`` worth of global batches, rounded up."""
    if config.num_train_steps != FROM_EPOCHS:
        return int(config.num_train_steps)
    return math.ceil(config.num_epochs * steps_per_epoch(num_train_examples, config.batch_size))


def period(config: ml_collections.ConfigDict, action: str, per_epoch: float) -> int:
    """Steps between two ``action`` events: ``{action}_every_steps``, or ``{action}_every_epochs`` (at least 1)."""
    every_steps = config[f"{action}_every_steps"]
    if every_steps != FROM_EPOCHS:
        return int(every_steps)
    return max(1, epochs_to_steps(config[f"{action}_every_epochs"], per_epoch))


@dataclasses.dataclass(frozen=True)
class Durations:
    """The run's length and the period of each of its periodic actions, in steps (the learning-rate schedule
    converts its own epochs with :func:`epochs_to_steps`)."""

    steps_per_epoch: float
    total: int
    log: int
    eval: int
    checkpoint: int


def resolve(config: ml_collections.ConfigDict, num_train_examples: int) -> Durations:
    """The run's durations in steps, for a config whose values passed ``config_checks.check_values``."""
    per_epoch = steps_per_epoch(num_train_examples, config.batch_size)
    return Durations(
        steps_per_epoch=per_epoch,
        total=train_steps(config, num_train_examples),
        **{action: period(config, action, per_epoch) for action in PERIODIC})


def itstime(step: int, every: int, total: int, *, last: bool = True) -> bool:
    """Whether a periodic action with period ``every`` is due after ``step`` of ``total``: at every multiple of
    ``every``, and (with ``last``) at the final step whatever the period."""
    return step % every == 0 or (last and step == total)
