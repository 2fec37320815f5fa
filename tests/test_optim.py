"""Schedules, the optimiser and the train step's pieces, checked against hand computations."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from attn_flax.training import optim, steps
from attn_flax.training.state import init_train_state
from configs import default


def config(**overrides):
    c = default.get_config()
    c.update(dict(batch_size=256, base_learning_rate=0.1, warmup_epochs=0.0))
    c.update(overrides)
    return c


def test_step_schedule_is_the_papers_decay():
    """lr 0.1 per 256 examples, x0.1 at epochs 30 and 60 (100 steps per epoch here)."""
    schedule = optim.learning_rate_schedule(config(schedule="step", decay_epochs=(30, 60)), 9000, 100)
    assert [float(schedule(s)) for s in (0, 2999, 3000, 5999, 6000, 8999)] == pytest.approx(
        [0.1, 0.1, 0.01, 0.01, 0.001, 0.001])


def test_linear_scaling_warmup_and_cosine():
    c = config(schedule="cosine", batch_size=512, warmup_epochs=1.0)
    schedule = optim.learning_rate_schedule(c, 1000, 100)
    assert optim.peak_learning_rate(c) == pytest.approx(0.2)
    assert float(schedule(0)) == 0.0
    assert float(schedule(50)) == pytest.approx(0.1)
    assert float(schedule(100)) == pytest.approx(0.2)
    assert float(schedule(550)) == pytest.approx(0.1, rel=1e-3)
    assert float(schedule(1000)) == pytest.approx(0.0, abs=1e-7)


def test_sgd_matches_pytorch_update_rule():
    """PyTorch SGD: d = g + wd * p; buf = m * buf + d; p -= lr * d (or lr * (d + m * buf) with Nesterov)."""
    for nesterov in (False, True):
        c = config(schedule="constant", weight_decay=0.1, momentum=0.9, nesterov=nesterov)
        tx = optim.create_optimizer(c, optax.constant_schedule(0.5))
        p = {"kernel": jnp.array([1.0, -2.0])}
        state = tx.init(p)
        buf = np.zeros(2)
        expected = np.array([1.0, -2.0])
        for g in ([0.3, 0.1], [-0.2, 0.4]):
            d = np.array(g) + 0.1 * expected
            buf = 0.9 * buf + d
            expected = expected - 0.5 * (d + 0.9 * buf if nesterov else buf)
            updates, state = tx.update({"kernel": jnp.array(g)}, state, p)
            p = optax.apply_updates(p, updates)
        np.testing.assert_allclose(p["kernel"], expected, rtol=1e-6)


def test_weight_decay_mask():
    params = {"conv": {"kernel": 1.0}, "bn": {"scale": 1.0, "bias": 1.0}, "head": {"kernel": 1.0, "bias": 1.0}}
    assert optim.decay_mask(params, False) == jax.tree.map(lambda _: True, params)
    assert optim.decay_mask(params, True) == {"conv": {"kernel": True}, "bn": {"scale": False, "bias": False},
                                              "head": {"kernel": True, "bias": False}}


def test_unknown_schedule_names_the_valid_ones():
    with pytest.raises(ValueError, match="valid: step, cosine, constant"):
        optim.learning_rate_schedule(config(schedule="linear"), 10, 1)


def test_label_smoothing_cross_entropy():
    logits = jnp.array([[2.0, 0.0, -1.0]])
    log_p = jax.nn.log_softmax(logits)[0]
    target = np.array([0.1 / 3, 0.9 + 0.1 / 3, 0.1 / 3])
    assert float(steps.cross_entropy(logits, jnp.array([1]), 0.1)[0]) == pytest.approx(-(target * log_p).sum())


class _Linear(nn.Module):
    @nn.compact
    def __call__(self, x, *, train):
        return nn.Dense(3)(x.reshape(x.shape[0], -1))


def test_gradient_accumulation_equals_one_big_batch():
    """Without BatchNorm, averaging micro-batch gradients is the full-batch gradient."""
    model, tx = _Linear(), optax.sgd(0.1, momentum=0.9)
    state = init_train_state(model, tx, jax.random.key(0), (2, 2, 1))
    batch = {"image": jax.random.normal(jax.random.key(1), (8, 2, 2, 1)),
             "label": jnp.array([0, 1, 2, 0, 1, 2, 0, 1])}
    full, m_full = steps.make_train_step(model, tx, optax.constant_schedule(0.1))(state, batch)
    accum, m_accum = steps.make_train_step(model, tx, optax.constant_schedule(0.1), grad_accum_steps=4)(state, batch)
    for a, b in zip(jax.tree.leaves(full.params), jax.tree.leaves(accum.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert float(m_accum["train_loss"]) == pytest.approx(float(m_full["train_loss"]), rel=1e-5)
    assert float(m_accum["train_accuracy"]) == float(m_full["train_accuracy"])


def test_eval_step_counts_only_masked_examples():
    model = _Linear()
    state = init_train_state(model, optax.sgd(0.1), jax.random.key(0), (2, 2, 1))
    images = jax.random.normal(jax.random.key(1), (6, 2, 2, 1))
    labels = jnp.array([0, 1, 2, 0, 1, 2])
    mask = jnp.array([1, 1, 1, 1, 0, 0])
    sums = steps.make_eval_step(model)(state, {"image": images, "label": labels, "mask": mask})
    logits = model.apply({"params": state.params}, images[:4], train=False)
    assert float(sums["count"]) == 4
    assert float(sums["correct"]) == float(jnp.sum(jnp.argmax(logits, -1) == labels[:4]))
    assert float(sums["loss_sum"]) == pytest.approx(float(jnp.sum(steps.cross_entropy(logits, labels[:4]))), rel=1e-6)
    summary = steps.summarize_eval({k: float(v) for k, v in sums.items()}, num_classes=3)
    assert summary["eval_examples"] == 4 and "eval_top5_accuracy" not in summary
