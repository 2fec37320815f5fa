"""One data-parallel mesh over every device of every process; parameters replicated, batches split.

``jax.jit`` with these shardings replaces ``pmap``: the batch axis of every input is sharded over the
``data`` axis, so BatchNorm's batch statistics (a mean over that axis) are global without any collective
written by hand.
"""
from typing import Mapping

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def data_mesh() -> Mesh:
    """A 1-D mesh over ``jax.devices()`` (all processes), axis type Auto so XLA propagates shardings."""
    return Mesh(np.asarray(jax.devices()), (DATA_AXIS,), axis_types=(AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def check_batch_size(global_batch_size: int, mesh: Mesh, grad_accum_steps: int = 1) -> None:
    """Raises ValueError unless every device gets an equal share of every micro-batch."""
    devices = mesh.devices.size
    if global_batch_size % (devices * grad_accum_steps):
        raise ValueError(
            f"batch_size {global_batch_size} must be divisible by the number of devices ({devices})"
            + (f" times grad_accum_steps ({grad_accum_steps})" if grad_accum_steps > 1 else "")
            + f"; use a multiple of {devices * grad_accum_steps}")


def global_batch(local_batch: Mapping[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """Joins each process's share of the batch into global arrays sharded along the batch axis."""
    return {key: jax.make_array_from_process_local_data(sharding, np.asarray(value))
            for key, value in local_batch.items()}
