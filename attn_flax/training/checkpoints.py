"""Orbax checkpoints of a run: ``WORKDIR/checkpoints/<step>/{state,meta}``.

``state`` is the :class:`TrainState` (parameters, optimiser state, BatchNorm statistics, step, RNG key), restored
straight onto the mesh's shardings; ``meta`` is JSON (step, seed, dataset, global batch size) that fixes the
position of the index-based input stream, so a resumed run sees exactly the examples an uninterrupted one would.
Saves are asynchronous and atomic: Orbax writes to ``<step>.orbax-checkpoint-tmp-*`` and renames it on commit,
so a process killed mid-save leaves only a temporary directory, which the next run's manager removes. A
checkpoint that cannot be read (corrupt, truncated, missing files) is skipped with a warning, the previous one is
used, and the unreadable one is moved to ``WORKDIR/checkpoints_damaged/<step>-<time>``: kept for inspection,
out of the way of the step's next save and of ``max_to_keep``, which then never counts it as a good checkpoint.

The workdir may be local or ``gs://BUCKET/...``: every path goes through ``etils.epath`` (:mod:`attn_flax.paths`).
In a multi-process run the processes agree on the step they restore: each checks which checkpoints it can read
on its own, and all restore the newest one that every process can read (:func:`agreed_step`).
"""
import contextlib
import functools
import logging
import os
import time
from typing import Any, Callable, Iterator, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from attn_flax import paths
from attn_flax.training.state import TrainState

STATE = "state"
META = "meta"
DAMAGED = "checkpoints_damaged"


class CheckpointError(RuntimeError):
    """No checkpoint in the directory could be restored, or one does not match the run."""


def directory(workdir: paths.PathLike) -> epath.Path:
    """``WORKDIR/checkpoints`` (absolute when local; a ``gs://`` workdir stays a ``gs://`` path)."""
    return paths.resolve(workdir) / "checkpoints"


def create_manager(workdir: str, *, keep: int, async_save: bool = True) -> ocp.CheckpointManager:
    """A manager of ``WORKDIR/checkpoints`` keeping the newest ``keep``; removes uncommitted (tmp) saves."""
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True,
                                           cleanup_tmp_directories=True)
    return ocp.CheckpointManager(directory(workdir), options=options)


def has_checkpoint(workdir: str) -> bool:
    """Whether ``WORKDIR/checkpoints`` holds a committed step."""
    path = directory(workdir)
    return path.is_dir() and any(child.name.isdigit() for child in path.iterdir())


@contextlib.contextmanager
def read_only_manager(workdir: str) -> Iterator[ocp.CheckpointManager]:
    """A manager of ``WORKDIR/checkpoints`` that creates, writes, moves and deletes nothing (a run still training
    there keeps its in-flight temporary saves); it reads ``state`` as a plain pytree, so that a part of it can be
    restored without the rest (:func:`restore_variables`)."""
    options = ocp.CheckpointManagerOptions(create=False, read_only=True, cleanup_tmp_directories=False,
                                           enable_async_checkpointing=False)
    with _quiet_absl():  # Orbax warns at every call that a read-only manager is read-only
        manager = ocp.CheckpointManager(directory(workdir), options=options, item_handlers={
            STATE: ocp.PyTreeCheckpointHandler(), META: ocp.JsonCheckpointHandler()})
        try:
            yield manager
        finally:
            manager.close()


@contextlib.contextmanager
def _quiet_absl():
    """Silences absl's warnings for the block."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def latest_meta(workdir: str) -> Optional[dict[str, Any]]:
    """The ``meta`` (step, seed, dataset, batch size) of ``WORKDIR/checkpoints``' newest committed checkpoint
    whose meta reads, or None when there is none.

    Reads only, so it can run before a run is allowed to touch the workdir, and by each process on its own (no
    collective: the processes of a multi-host run may call it at different moments, e.g. while process 0 creates
    the directory).
    """
    path = directory(workdir)
    if not path.is_dir():
        return None
    for step in sorted(ocp.path.step.checkpoint_steps(path), reverse=True):
        try:
            return _read_meta(path / str(step))
        except Exception:  # noqa: BLE001 - an unreadable one is dealt with by restore_latest
            continue
    return None


def _alone() -> ocp.options.MultiprocessingOptions:
    """Orbax options for reading with this process only (no barrier with the others)."""
    return ocp.options.MultiprocessingOptions(primary_host=jax.process_index(), active_processes={jax.process_index()})


def _read_meta(step_dir: epath.Path) -> dict[str, Any]:
    with _quiet_absl(), ocp.Checkpointer(ocp.JsonCheckpointHandler(), multiprocessing_options=_alone()) as reader:
        return dict(reader.restore(step_dir / META))


def check_readable(step_dir: epath.Path) -> None:
    """Raises when this process cannot read the checkpoint in ``step_dir``: its meta, or the description of its
    state's arrays (a missing ``state``, a damaged ``_METADATA``). Reads a few small files, with no collective."""
    _read_meta(step_dir)
    ocp.PyTreeCheckpointHandler(multiprocessing_options=_alone()).metadata(step_dir / STATE)


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
    directory = epath.Path(manager.directory)
    if directory.is_dir():
        return
    if directory.exists():
        raise CheckpointError(f"cannot save checkpoints: {directory} is no longer a directory; move what is there "
                              "away, then the same command resumes from the newest checkpoint left, if any")
    logging.warning("the checkpoint directory %s was removed during the run; saving the next checkpoints in a new "
                    "one (the removed ones are gone)", directory)
    if jax.process_index() == 0:
        directory.mkdir(parents=True, exist_ok=True)
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

    ``abstract_state`` (:func:`attn_flax.training.state.abstract_state`) carries shardings, so arrays land
    directly on the mesh. A checkpoint that fails to restore (partial, corrupt, wrong structure) is reported and
    skipped; when an older one restores, the skipped ones are moved aside (:func:`move_aside`).
    """
    return _newest_readable(manager, ocp.args.StandardRestore(abstract_state), move_damaged=True)


def restore_variables(workdir: str, abstract_variables: dict[str, Any]
                      ) -> Optional[tuple[dict[str, Any], dict[str, Any]]]:
    """The ``{'params', 'batch_stats'}`` of ``WORKDIR``'s newest readable checkpoint, and its meta; None when
    there is none. Reads only those two parts of the state (no optimiser state, no optimiser needed) and changes
    nothing on disk. Raises :class:`CheckpointError` when the checkpoint's shapes are not the model's."""
    restore_args = jax.tree.map(lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding, global_shape=s.shape,
                                                               dtype=s.dtype), abstract_variables)
    with read_only_manager(workdir) as manager:
        for step in sorted(manager.all_steps(), reverse=True)[:1]:
            _check_shapes(manager, step, abstract_variables)
        return _newest_readable(manager, ocp.args.PyTreeRestore(item=abstract_variables, restore_args=restore_args,
                                                                partial_restore=True), move_damaged=False)


def _check_shapes(manager: ocp.CheckpointManager, step: int, abstract_variables: dict[str, Any]) -> None:
    """Raises :class:`CheckpointError` naming the first array whose saved shape differs from the model's."""
    try:
        saved = manager.item_metadata(step)[STATE].tree
    except Exception:  # noqa: BLE001 - unreadable metadata: the restore reports it
        return
    for path, want in jax.tree_util.tree_leaves_with_path(abstract_variables):
        node = saved
        for key in path:
            node = node.get(str(getattr(key, "key", key)), {}) if isinstance(node, dict) else {}
        have = getattr(node, "shape", None)
        name = "/".join(str(getattr(key, "key", key)) for key in path)
        if have is None or tuple(have) != tuple(want.shape):
            raise CheckpointError(f"checkpoint {step} in {manager.directory} does not fit the model its config.json "
                                  f"describes: {name} is {'missing' if have is None else tuple(have)} there, the "
                                  f"model has {tuple(want.shape)}; was config.json edited?")


def agreed_step(steps: list[int], readable: Callable[[int], bool]) -> Optional[int]:
    """The newest of ``steps`` that ``readable`` holds for on every process; None when there is none.

    Each process passes its own listing and its own check. With several processes this is a collective (every
    process calls it, equally often): they exchange their newest readable step and take the oldest of those,
    then check that every process can read that one, going further back until all can. So a host that cannot
    read step N makes all of them restore the same older step, instead of resuming from different steps.
    """
    bound = None
    while True:
        mine = next((s for s in sorted(steps, reverse=True) if (bound is None or s <= bound) and readable(s)), -1)
        if jax.process_count() == 1:
            return mine if mine >= 0 else None
        step = int(np.min(multihost_utils.process_allgather(np.int32(mine))))
        if step < 0:
            return None
        if np.all(multihost_utils.process_allgather(np.int32(step in steps and readable(step)))):
            return step
        bound = step - 1


def _newest_readable(manager: ocp.CheckpointManager, state_args: Any, *, move_damaged: bool
                     ) -> Optional[tuple[Any, dict[str, Any]]]:
    """Restores the newest checkpoint that every process can read with ``state_args`` (:func:`agreed_step`),
    warning about each newer one that does not read (all newer ones moved aside with ``move_damaged``); raises
    :class:`CheckpointError` when there are checkpoints but none reads."""
    base, failures = epath.Path(manager.directory), {}

    def failed(step: int, err: Exception) -> None:
        failures[step] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        logging.warning("checkpoint %d in %s cannot be restored (%s); trying an older one", step, base,
                        failures[step])

    @functools.cache
    def readable(step: int) -> bool:
        try:
            check_readable(base / str(step))
            return True
        except Exception as err:  # noqa: BLE001 - any unreadable checkpoint is skipped, the reason reported
            failed(step, err)
            return False

    steps = sorted(manager.all_steps())
    bound = None
    while (step := agreed_step([s for s in steps if bound is None or s <= bound], readable)) is not None:
        try:
            restored = manager.restore(step, args=ocp.args.Composite(**{STATE: state_args,
                                                                        META: ocp.args.JsonRestore()}))
        except Exception as err:  # noqa: BLE001 - e.g. array data damaged under intact metadata
            failed(step, err)
            bound = step - 1
            continue
        elsewhere = [s for s in steps if s > step and s not in failures]
        if elsewhere:
            logging.warning("checkpoint %s in %s cannot be read by every process of the run; all of them restore "
                            "step %d", ", ".join(map(str, elsewhere)), base, step)
        if move_damaged and (steps[-1] > step or jax.process_count() > 1):
            move_aside(manager, newer_than=step)
        return restored[STATE], dict(restored[META])
    if steps:
        reason = next(iter(failures.values()), "no step can be read by every process of the run")
        raise CheckpointError(f"none of the checkpoints in {base} could be restored ({reason}); move the "
                              "directory away to start afresh")
    return None


def move_aside(manager: ocp.CheckpointManager, *, newer_than: int) -> None:
    """Moves the checkpoints after step ``newer_than`` to ``WORKDIR/checkpoints_damaged/<step>-<unix time>``
    (process 0 lists and moves, every process waits for it) and makes ``manager`` forget them, so the run can save
    those steps again."""
    directory = epath.Path(manager.directory)
    if jax.process_index() == 0:
        damaged = directory.parent / DAMAGED
        damaged.mkdir(parents=True, exist_ok=True)
        for step in sorted(s for s in manager.all_steps() if s > newer_than):
            target = damaged / f"{step}-{int(time.time())}"
            (directory / str(step)).rename(target)
            logging.warning("moved the unreadable checkpoint %d to %s", step, target)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("attn_flax_checkpoints_moved_aside")
    manager.reload()
