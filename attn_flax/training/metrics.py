"""Metrics of a run: ``WORKDIR/metrics.jsonl`` (one JSON object per event) and TensorBoard event files, and the
training metrics gathered between two logging steps.

Only process 0 writes; other processes get a writer that does nothing, so callers need no condition.
"""
import contextlib
import json
import time
from typing import Any, Mapping, Optional

import jax
import numpy as np
from flax.metrics import tensorboard

from attn_flax import paths


def _plain(value: Any) -> Any:
    if isinstance(value, (np.generic, np.ndarray)):
        return value.item()
    return value


class MetricsWriter:
    """Appends metric events; resuming a run keeps appending to the same files.

    Each event is flushed as it is written, so a killed run keeps its metrics; on ``gs://`` (which has no
    append) TensorFlow's file system re-uploads ``metrics.jsonl`` at each flush, a few kB per logging step.
    """

    def __init__(self, workdir: paths.PathLike, *, enabled: bool = True):
        self._enabled = enabled
        if enabled:
            root = paths.resolve(workdir)
            root.mkdir(parents=True, exist_ok=True)
            self._files = contextlib.ExitStack()  # epath's open is a context manager on gs://, a file locally
            self._jsonl = self._files.enter_context((root / "metrics.jsonl").open("a"))
            self._tensorboard = tensorboard.SummaryWriter(str(root / "tensorboard"))

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        if not self._enabled:
            return
        record = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                self._tensorboard.scalar(key, value, int(step))
        self._tensorboard.flush()

    def close(self) -> None:
        if self._enabled:
            self._files.close()
            self._tensorboard.close()


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    """All events of ``WORKDIR/metrics.jsonl``, in order."""
    with (paths.resolve(workdir) / "metrics.jsonl").open() as f:
        return [json.loads(line) for line in f if line.strip()]


def last_eval_metrics(workdir: str) -> dict[str, Any]:
    """The newest eval event of ``WORKDIR/metrics.jsonl`` without its step ({} when there is none)."""
    try:
        rows = [r for r in read_metrics(workdir) if "eval_accuracy" in r]
    except FileNotFoundError:
        return {}
    return {k: v for k, v in rows[-1].items() if k != "step"} if rows else {}


class TrainMetrics:
    """The train step's metrics between two logging steps, summarised into one event.

    Steps are dispatched asynchronously: :meth:`add` keeps each step's metrics on the device, :meth:`fetch`
    brings what is pending to the host (the loop checks the losses it returns), and :meth:`summary` averages
    everything fetched since the last summary (the learning rate: its last value) and adds the throughput of the
    timed steps. The first step of a process compiles: :meth:`add` times it on its own (``first_step_seconds``
    in the next summary) and starts the throughput clock after it.
    """

    def __init__(self, batch_size: int):
        self._batch_size = batch_size
        self._pending: list[tuple[int, Any]] = []
        self._fetched: list[dict[str, float]] = []
        self._compile_seconds: Optional[float] = None
        self._first = True
        self.restart_clock()

    def restart_clock(self) -> None:
        """Starts timing anew (after a summary, and after work that is not training, such as an evaluation)."""
        self._clock, self._timed_steps = time.perf_counter(), 0

    def add(self, step: int, metrics: Mapping[str, jax.Array]) -> None:
        self._pending.append((step, metrics))
        self._timed_steps += 1
        if self._first:
            jax.block_until_ready(metrics)
            self._compile_seconds, self._first = time.perf_counter() - self._clock, False
            self.restart_clock()

    def fetch(self) -> list[tuple[int, dict[str, float]]]:
        """The pending steps' metrics as floats, moved to the host."""
        rows = [(s, {k: float(v) for k, v in m.items()}) for s, m in jax.device_get(self._pending)]
        self._pending.clear()
        self._fetched.extend(m for _, m in rows)
        return rows

    def summary(self) -> dict[str, float]:
        """The mean of the fetched steps' metrics, with ``steps_per_second``, ``examples_per_second`` and, once,
        ``first_step_seconds``; forgets them and restarts the clock."""
        out = {k: float(np.mean([m[k] for m in self._fetched])) for k in self._fetched[0] if k != "learning_rate"}
        out["learning_rate"] = self._fetched[-1]["learning_rate"]
        elapsed = time.perf_counter() - self._clock
        if self._timed_steps:
            out["steps_per_second"] = self._timed_steps / elapsed
            out["examples_per_second"] = self._timed_steps * self._batch_size / elapsed
        if self._compile_seconds is not None:
            out["first_step_seconds"], self._compile_seconds = self._compile_seconds, None
        self._fetched.clear()
        self.restart_clock()
        return out
