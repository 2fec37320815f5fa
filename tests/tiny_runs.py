"""Tiny training runs shared by the tool tests (eval, visualize): made once per test session, on disk.

Each run is 2 steps of a ResNet with widths (8, 16, 16, 16) and one block per stage on ``attn_flax_shapes/tiny``
(500 train / 100 eval 32x32 images), the sizes of ``tests/test_train.py`` so the persistent compilation cache
serves both.
"""
import functools
import os
import pathlib

import numpy as np
import tensorflow_datasets as tfds

from attn_flax import data
from attn_flax.data import catalog
from attn_flax.training import loop
from configs import default

REPO = pathlib.Path(__file__).resolve().parent.parent
TINY_DATASET = "attn_flax_shapes/tiny"


def subprocess_env() -> dict[str, str]:
    """The test process's environment (4 CPU devices) plus the repository's persistent compilation cache."""
    return {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(REPO / ".jax_cache"), "PYTHONUNBUFFERED": "1"}


@functools.cache
def data_dir(root: pathlib.Path) -> str:
    """A TFDS directory under ``root`` with the tiny offline dataset prepared."""
    path = root / "tfds"
    data.dataset_info(TINY_DATASET, data_dir=str(path))
    return str(path)


TINY_FIELDS = dict(dataset=TINY_DATASET, widths=(8, 16, 16, 16), stage_sizes=(1, 1, 1, 1), batch_size=16,
                   eval_batch_size=32, eval_every_steps=1000, keep_checkpoints=3)
"""The tiny run every training test shares, so the persistent compilation cache serves them all."""


def config(data_dir: str, **fields):
    """The default config with :data:`TINY_FIELDS`, ``data_dir`` and ``fields`` set."""
    c = default.get_config()
    c.update(dict(TINY_FIELDS, data_dir=data_dir, **fields))
    return c


def tiny_config(root: pathlib.Path, attention: str):
    return config(data_dir(root), num_train_steps=2, log_every_steps=2, checkpoint_every_steps=2,
                  attention=attention)


@functools.cache
def workdir(root: pathlib.Path, attention: str) -> str:
    """A finished 2-step training workdir of the tiny ResNet with ``attention`` ('none' for a plain ResNet)."""
    path = str(root / f"run_{attention}")
    loop.train_and_evaluate(tiny_config(root, attention), path)
    return path


def eval_split(root: pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
    """The whole tiny eval split read straight from TFDS: normalised float images [100, 32, 32, 3], labels."""
    builder = catalog.load_builder(TINY_DATASET, data_dir(root))
    info = catalog.info_from_builder(TINY_DATASET, builder)
    split = tfds.as_numpy(builder.as_dataset(split=info.eval_split, batch_size=-1))
    images = (split["image"].astype(np.float32) / 255.0 - np.asarray(info.mean)) / np.asarray(info.std)
    return images.astype(np.float32), split["label"].astype(np.int64)
