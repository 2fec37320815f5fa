"""Preemption: a ``SIGTERM`` (a preemption notice, ``scancel``, ``docker stop``) ends the run at a step where it
saves a checkpoint, so the same command continues it.

With one process the loop installs its own ``SIGTERM`` handler, which sets a flag the loop reads after each step.
Under ``jax.distributed`` JAX's preemption sync manager owns ``SIGTERM``: the notice reaching any one process is
propagated through the coordination service, and every process stops at the same step, the one Orbax's
``CheckpointManager.reached_preemption(step)`` returns true for.
"""
import contextlib
import signal
import threading
from typing import Iterator

import jax
import orbax.checkpoint as ocp


@contextlib.contextmanager
def sigterm_flag() -> Iterator[threading.Event]:
    """An event set by SIGTERM while the block runs (the previous handler is restored after it).

    No handler is installed under ``jax.distributed`` (JAX's sync manager owns the signal there) nor outside the
    main thread (Python allows handlers only there).
    """
    event = threading.Event()
    if jax.process_count() > 1 or threading.current_thread() is not threading.main_thread():
        yield event
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: event.set())
    try:
        yield event
    finally:
        signal.signal(signal.SIGTERM, previous)


def preempted(manager: ocp.CheckpointManager, step: int, sigterm: threading.Event) -> bool:
    """True at the step where the run should save and stop: SIGTERM seen (one process), or the step all
    processes agreed on through JAX's preemption sync point (several processes)."""
    if jax.process_count() > 1:
        return manager.reached_preemption(step)
    return sigterm.is_set()
