"""Metrics of a run: ``WORKDIR/metrics.jsonl`` (one JSON object per event) and TensorBoard event files.

Only process 0 writes; other processes get a writer that does nothing, so callers need no condition.
"""
import json
import os
from typing import Any, Mapping

import numpy as np
from flax.metrics import tensorboard


def _plain(value: Any) -> Any:
    if isinstance(value, (np.generic, np.ndarray)):
        return value.item()
    return value


class MetricsWriter:
    """Appends metric events; resuming a run keeps appending to the same files."""

    def __init__(self, workdir: str, *, enabled: bool = True):
        self._enabled = enabled
        if enabled:
            os.makedirs(workdir, exist_ok=True)
            self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")
            self._tensorboard = tensorboard.SummaryWriter(os.path.join(workdir, "tensorboard"))

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
            self._jsonl.close()
            self._tensorboard.close()


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    """All events of ``WORKDIR/metrics.jsonl``, in order."""
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
