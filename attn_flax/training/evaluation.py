"""Scoring a model: top-1, top-5 and loss over a whole eval split, every example counted exactly once.

The split is read by :func:`attn_flax.data.eval_batches` (the last batch padded with masked examples) and scored
by the one eval step (:func:`attn_flax.training.steps.make_eval_step`) compiled over the data mesh by
:func:`compile_eval_step`, which the training loop and ``eval.py`` share, so a checkpoint scored later gives the
``eval_*`` numbers its run wrote to ``metrics.jsonl``.
"""
from typing import Any, Callable, Optional

import flax
import jax
import jax.numpy as jnp
from flax import linen as nn

from attn_flax import data
from attn_flax.training import sharding, steps

EvalStep = Callable[[Any, steps.Batch], steps.Metrics]


@flax.struct.dataclass
class EvalState:
    """What the eval step reads of a :class:`~attn_flax.training.state.TrainState`: a model's variables."""

    params: Any
    batch_stats: Any


def compile_eval_step(model: nn.Module, mesh: jax.sharding.Mesh) -> EvalStep:
    """``eval_step(state, batch) -> sums``, jitted with the state replicated and the batch split over ``mesh``;
    ``state`` is anything with ``params`` and ``batch_stats`` (an :class:`EvalState` or a ``TrainState``)."""
    replicated = sharding.replicated(mesh)
    return jax.jit(steps.make_eval_step(model), in_shardings=(replicated, sharding.batch_sharded(mesh)),
                   out_shardings=replicated)


def evaluate(model: nn.Module, variables: dict[str, Any], dataset: str, *, batch_size: int,
             data_dir: Optional[str] = None, mesh: Optional[jax.sharding.Mesh] = None,
             image_size: Optional[int] = None) -> dict[str, float]:
    """``eval_loss``, ``eval_accuracy``, ``eval_top5_accuracy`` (5+ classes) and ``eval_examples`` of ``model``.

    ``batch_size`` is global and must split evenly over the mesh's devices (ValueError otherwise); the dataset
    must have as many classes as the model has outputs (ValueError otherwise).
    """
    mesh = mesh if mesh is not None else sharding.data_mesh()
    sharding.check_batch_size(batch_size, mesh)
    info = data.dataset_info(dataset, data_dir=data_dir, image_size=image_size)
    num_outputs = variables["params"]["head"]["kernel"].shape[-1]
    if num_outputs != info.num_classes:
        raise ValueError(f"the model has {num_outputs} outputs but {dataset} has {info.num_classes} classes; "
                         "evaluate on the dataset the model was trained for")
    state = jax.device_put(EvalState(variables["params"], variables.get("batch_stats", {})),
                           sharding.replicated(mesh))
    return evaluate_split(compile_eval_step(model, mesh), state, dataset, batch_size=batch_size, data_dir=data_dir,
                          mesh=mesh, num_classes=info.num_classes, image_size=info.image_size)


def evaluate_split(eval_step: EvalStep, state: Any, dataset: str, *, batch_size: int, data_dir: Optional[str],
                   mesh: jax.sharding.Mesh, num_classes: int, image_size: Optional[int] = None) -> dict[str, float]:
    """Runs ``eval_step`` (:func:`compile_eval_step`) over the whole split and summarises the sums."""
    batch_sharding = sharding.batch_sharded(mesh)
    totals = None
    for local in data.eval_batches(dataset, global_batch_size=batch_size, process_index=jax.process_index(),
                                   process_count=jax.process_count(), data_dir=data_dir, image_size=image_size):
        sums = eval_step(state, sharding.global_batch(local, batch_sharding))
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    totals = {k: float(v) for k, v in jax.device_get(totals).items()}
    return steps.summarize_eval(totals, num_classes)
