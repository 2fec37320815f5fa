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
import contextlib
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


@contextlib.contextmanager
def _quiet_absl():
    """Silences absl's warnings for the block (Orbax warns that a read-only manager is read-only)."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def latest_meta(workdir: str) -> Optional[dict[str, Any]]:
    """The ``meta`` (step, seed, dataset, batch size) of ``WORKDIR/checkpoints``' newest checkpoint whose meta
    reads, or None when there is none. Reads only: creates, moves and deletes nothing, so it can run before a
    run is allowed to touch the workdir."""
    directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    if not os.path.isdir(directory):
        return None
    with _quiet_absl():
        manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True,
                                                                                         create=False))
        try:
            for step in sorted(manager.all_steps(), reverse=True):
                try:
                    restored = manager.restore(step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))
                except Exception:  # noqa: BLE001 - an unreadable one is dealt with by restore_latest
                    continue
                return dict(restored[META])
        finally:
            manager.close()
    return None


class _DropOrbaxErrors(logging.Filter):
    """Drops the error records (with their tracebacks) that Orbax logs from its background save threads: the
    failure reaches the run as an exception, which :func:`save` reports in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.ERROR and f"{os.sep}orbax{os.sep}" in record.pathname)


@contextlib.contextmanager
def save_errors_in_one_line():
    """While the block runs, a failed save is reported once, by :func:`save`, not also by Orbax's logs."""
    logger, drop = logging.getLogger("absl"), _DropOrbaxErrors()
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def _reason(err: BaseException) -> str:
    while err.__cause__ is not None:
        err = err.__cause__
    text = str(err).splitlines()[0] if str(err) else ""
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _ensure_directory(manager: ocp.CheckpointManager) -> None:
    """Recreates the checkpoint directory if it vanished during the run (saying so: the checkpoints in it are
    gone); raises :class:`CheckpointError` when something else stands at its path."""
    directory = os.fspath(manager.directory)
    if os.path.isdir(directory):
        return
    if os.path.exists(directory):
        raise CheckpointError(f"cannot save checkpoints: {directory} is no longer a directory; move what is there "
                              "away, then the same command resumes from the newest checkpoint left, if any")
    logging.warning("the checkpoint directory %s was removed during the run; saving the next checkpoints in a new "
                    "one (the removed ones are gone)", directory)
    if jax.process_index() == 0:
        os.makedirs(directory, exist_ok=True)
    manager.reload()


def save(manager: ocp.CheckpointManager, state: TrainState, meta: dict[str, Any]) -> None:
    """Starts saving ``state`` at ``meta['step']`` (returns before the write finishes when async). Raises
    :class:`CheckpointError` in one line when this save or an earlier asynchronous one failed."""
    step = int(meta["step"])
    _ensure_directory(manager)
    try:
        manager.save(step, args=ocp.args.Composite(**{STATE: ocp.args.StandardSave(state),
                                                      META: ocp.args.JsonSave(meta)}), force=True)
    except Exception as err:  # noqa: BLE001 - whatever the storage raised, the run stops with one line
        raise CheckpointError(f"saving the checkpoint at step {step} in {manager.directory} failed "
                              f"({_reason(err)}); check that the directory exists and can be written, then the "
                              "same command resumes from the newest checkpoint saved") from err


def finish(manager: ocp.CheckpointManager) -> None:
    """Waits for the pending save and closes ``manager``; raises :class:`CheckpointError` if that save failed."""
    try:
        manager.wait_until_finished()
    except Exception as err:  # noqa: BLE001
        raise CheckpointError(f"saving the last checkpoint in {manager.directory} failed ({_reason(err)}); check "
                              "that the directory exists and can be written, then the same command resumes from the "
                              "newest checkpoint saved") from err
    finally:
        manager.close()


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
