"""The jitted train and eval steps: pure functions of (state, batch).

A train step may split its batch into ``grad_accum_steps`` micro-batches (a ``lax.scan``), averaging their
gradients and threading BatchNorm statistics through them, so a large global batch fits a small device.
The eval step returns sums (loss, correct top-1, correct top-5, count) over the examples whose mask is 1, so
padded examples never count and the totals over a split are exact.
"""
from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn

from attn_flax import ops
from attn_flax.training.state import TrainState, step_rng

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """Per-example softmax cross-entropy against one-hot labels smoothed by ``label_smoothing``, in at least float32."""
    dtype = ops.accumulation_dtype(logits.dtype)
    targets = jax.nn.one_hot(labels, logits.shape[-1], dtype=dtype)
    if label_smoothing:
        targets = optax.smooth_labels(targets, label_smoothing)
    return optax.softmax_cross_entropy(logits.astype(dtype), targets)


def _split_micro_batches(x: jax.Array, num: int) -> jax.Array:
    """[B, ...] -> [num, B / num, ...], micro-batch j holding examples j, j + num, ... so that each device's
    contiguous shard of the batch splits evenly among the micro-batches (no data moves between devices)."""
    return jnp.swapaxes(x.reshape(x.shape[0] // num, num, *x.shape[1:]), 0, 1)


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, schedule: optax.Schedule, *,
                    label_smoothing: float = 0.0, grad_accum_steps: int = 1
                    ) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
    """Returns ``train_step(state, batch) -> (state, metrics)`` with loss, accuracy and learning rate."""

    def loss_fn(params, batch_stats, images, labels, rng):
        logits, updates = model.apply({"params": params, "batch_stats": batch_stats}, images, train=True,
                                      mutable=["batch_stats"], rngs={"dropout": rng})
        loss = jnp.mean(cross_entropy(logits, labels, label_smoothing))
        correct = jnp.sum(jnp.argmax(logits, -1) == labels)
        return loss, (updates["batch_stats"], correct)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def gradients(state: TrainState, batch: Batch):
        rng = step_rng(state)
        if grad_accum_steps == 1:
            (loss, (batch_stats, correct)), grads = grad_fn(state.params, state.batch_stats, batch["image"],
                                                            batch["label"], rng)
            return loss, correct, batch_stats, grads

        def micro_step(carry, micro):
            loss_sum, correct_sum, batch_stats, grad_sum = carry
            images, labels, index = micro
            (loss, (batch_stats, correct)), grads = grad_fn(state.params, batch_stats, images, labels,
                                                            jax.random.fold_in(rng, index))
            grad_sum = jax.tree.map(jnp.add, grad_sum, grads)
            return (loss_sum + loss, correct_sum + correct, batch_stats, grad_sum), None

        micro = (_split_micro_batches(batch["image"], grad_accum_steps),
                 _split_micro_batches(batch["label"], grad_accum_steps), jnp.arange(grad_accum_steps))
        zeros = jax.tree.map(jnp.zeros_like, state.params)
        init = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32), state.batch_stats, zeros)
        (loss_sum, correct, batch_stats, grad_sum), _ = jax.lax.scan(micro_step, init, micro)
        grads = jax.tree.map(lambda g: g / grad_accum_steps, grad_sum)
        return loss_sum / grad_accum_steps, correct, batch_stats, grads

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        loss, correct, batch_stats, grads = gradients(state, batch)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        new_state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                                  batch_stats=batch_stats, opt_state=opt_state)
        metrics = {"train_loss": loss, "train_accuracy": correct / batch["label"].shape[0],
                   "learning_rate": schedule(state.step)}
        return new_state, metrics

    return train_step


def make_eval_step(model: nn.Module) -> Callable[[TrainState, Batch], Metrics]:
    """Returns ``eval_step(state, batch) -> sums`` over the batch's real (mask 1) examples."""

    def eval_step(state: TrainState, batch: Batch) -> Metrics:
        logits = model.apply({"params": state.params, "batch_stats": state.batch_stats}, batch["image"],
                             train=False)
        labels, mask = batch["label"], batch["mask"].astype(jnp.float32)
        top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
        return {
            "loss_sum": jnp.sum(cross_entropy(logits, labels) * mask),
            "correct": jnp.sum((jnp.argmax(logits, -1) == labels) * mask),
            "correct_top5": jnp.sum(jnp.any(top5 == labels[:, None], axis=-1) * mask),
            "count": jnp.sum(mask),
        }

    return eval_step


def summarize_eval(sums: dict[str, float], num_classes: int) -> dict[str, float]:
    """Turns eval sums into the logged metrics; top-5 only where there are at least 5 classes."""
    count = sums["count"]
    out = {"eval_loss": sums["loss_sum"] / count, "eval_accuracy": sums["correct"] / count,
           "eval_examples": int(round(count))}
    if num_classes >= 5:
        out["eval_top5_accuracy"] = sums["correct_top5"] / count
    return out
