"""attn_flax.training.durations: every duration a config gives in epochs or steps, in steps, in one place."""
import importlib

import pytest

from attn_flax.training import config_checks, durations
from configs import default


def config(**fields):
    c = default.get_config()
    c.update(fields)
    return c


def test_itstime_is_every_multiple_of_the_period_and_the_last_step():
    assert [s for s in range(1, 11) if durations.itstime(s, 4, 10)] == [4, 8, 10]
    assert [s for s in range(1, 11) if durations.itstime(s, 4, 10, last=False)] == [4, 8]
    assert [s for s in range(1, 4) if durations.itstime(s, 1, 3)] == [1, 2, 3]


def test_the_default_run_in_steps():
    """50,000 examples at batch 128: 1.25 epochs -> 489 steps (rounded up); periods given in steps stay."""
    steps = durations.resolve(config(), 50_000)
    assert steps == durations.Durations(steps_per_epoch=50_000 / 128, total=489, log=50, eval=10_000,
                                        checkpoint=500)


def test_periods_in_epochs_keep_their_meaning_when_the_batch_size_changes():
    """ImageNet evaluates every 5 epochs: 6,256 steps at batch 1024, 25,023 at batch 256 (1,281,167 images)."""
    imagenet = importlib.import_module("configs.imagenet").get_config("resnet50,cbam")
    assert durations.resolve(imagenet, 1_281_167).eval == round(5 * 1_281_167 / 1024) == 6256
    imagenet.batch_size = 256
    assert durations.resolve(imagenet, 1_281_167).eval == 25_023
    cifar = importlib.import_module("configs.cifar100").get_config("resnet18,bam")
    steps = durations.resolve(cifar, 50_000)
    assert (steps.eval, steps.checkpoint, steps.total) == (3906, 3906, 78_125)


def test_positive_steps_win_over_epochs_and_a_period_is_at_least_one_step():
    c = config(eval_every_steps=7, eval_every_epochs=3.0, log_every_steps=-1, log_every_epochs=1e-6)
    steps = durations.resolve(c, 50_000)
    assert (steps.eval, steps.log) == (7, 1)


@pytest.mark.parametrize("fields, message", [
    (dict(eval_every_steps=0), "eval_every_steps=0 must be a positive number of steps, or -1 to take it from "
                               "eval_every_epochs (0 would never happen)"),
    (dict(checkpoint_every_steps=-1), "checkpoint_every_epochs=None must be > 0 when checkpoint_every_steps is -1"),
    (dict(log_every_steps=-1, log_every_epochs=-2.0), "log_every_epochs=-2.0 must be > 0 when log_every_steps is -1"),
    (dict(num_train_steps=-1, num_epochs=0.0), "num_epochs=0.0 must be > 0 when num_train_steps is -1"),
])
def test_a_duration_that_cannot_happen_is_refused(fields, message):
    with pytest.raises(config_checks.ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config_checks.check_values(config(**fields))
