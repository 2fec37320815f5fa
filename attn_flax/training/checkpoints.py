"""Orbax checkpoints of a run: ``WORKDIR/checkpoints/<step>/{state,meta}``.

``state`` is the :class:`TrainState` (parameters, optimiser state, BatchNorm statistics, step, RNG key), restored
straight onto the mesh's shardings; ``meta`` is JSON (step, seed, dataset, global batch size) that fixes the
position of the index-based input stream, so a resumed run sees exactly the examples an uninterrupted one would.
Saves are asynchronous and atomic: Orbax writes to ``<step>.orbax-checkpoint-tmp-*`` and renames it on commit,
so a process killed mid-save leaves only a temporary directory, which the next run's manager removes. A
checkpoint that cannot be read (corrupt, truncated, missing files) is skipped with a warning, the previous one is
used, and the unreadable one is moved to ``WORKDIR/checkpoints_damaged/<step>-<time>``: kept for inspection,
out of the way of the step's next save and of ``max_to_keep``, which then never counts it as a good checkpoint.
"""
import logging
import os
import time
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from attn_flax.training.state import TrainState

STATE = "state"
META = "meta"
DAMAGED = "checkpoints_damaged"


class CheckpointError(RuntimeError):
    """No checkpoint in the directory could be restored, or one does not match the run."""


def create_manager(workdir: str, *, keep: int, async_save: bool = True) -> ocp.CheckpointManager:
    """A manager of ``WORKDIR/checkpoints`` keeping the newest ``keep``; removes uncommitted (tmp) saves."""
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True,
                                           cleanup_tmp_directories=True)
    return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"), options=options)


def save(manager: ocp.CheckpointManager, state: TrainState, meta: dict[str, Any]) -> None:
    """Starts saving ``state`` at ``meta['step']`` (returns before the write finishes when async)."""
    manager.save(int(meta["step"]),
                 args=ocp.args.Composite(**{STATE: ocp.args.StandardSave(state), META: ocp.args.JsonSave(meta)}),
                 force=True)


def restore_latest(manager: ocp.CheckpointManager, abstract_state: TrainState
                   ) -> Optional[tuple[TrainState, dict[str, Any]]]:
    """The newest readable checkpoint as (state, meta), or None when there is none.

    ``abstract_state`` is a pytree of ``jax.ShapeDtypeStruct`` with shardings, so arrays land directly on the
    mesh. A checkpoint that fails to restore (partial, corrupt, wrong structure) is reported and skipped; when
    an older one restores, the skipped ones are moved aside (:func:`move_aside`).
    """
    steps = sorted(manager.all_steps(), reverse=True)
    failures: list[tuple[int, str]] = []
    for step in steps:
        try:
            restored = manager.restore(step, args=ocp.args.Composite(
                **{STATE: ocp.args.StandardRestore(abstract_state), META: ocp.args.JsonRestore()}))
        except Exception as err:  # noqa: BLE001 - any unreadable checkpoint is skipped, the reason reported
            reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            logging.warning("checkpoint %d in %s cannot be restored (%s); trying an older one",
                            step, manager.directory, reason)
            failures.append((step, reason))
            continue
        if failures:
            move_aside(manager, [s for s, _ in failures])
        return restored[STATE], dict(restored[META])
    if failures:
        raise CheckpointError(
            f"none of the checkpoints in {manager.directory} could be restored ({failures[0][1]}); move the "
            "directory away to start afresh")
    return None


def move_aside(manager: ocp.CheckpointManager, steps: list[int]) -> None:
    """Moves checkpoints ``steps`` to ``WORKDIR/checkpoints_damaged/<step>-<unix time>`` (process 0 moves, every
    process waits for it) and makes ``manager`` forget them, so the run can save those steps again."""
    directory = os.fspath(manager.directory)
    if jax.process_index() == 0:
        damaged = os.path.join(os.path.dirname(directory), DAMAGED)
        os.makedirs(damaged, exist_ok=True)
        for step in steps:
            target = os.path.join(damaged, f"{step}-{int(time.time())}")
            os.rename(os.path.join(directory, str(step)), target)
            logging.warning("moved the unreadable checkpoint %d to %s", step, target)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("attn_flax_checkpoints_moved_aside")
    manager.reload()


def abstract(state_shape: Any, sharding: jax.sharding.Sharding) -> Any:
    """ShapeDtypeStructs of ``state_shape`` carrying ``sharding``, as Orbax restores onto a mesh."""
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), state_shape)
