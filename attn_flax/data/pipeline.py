"""Training and evaluation batch streams on Grain: per process, deterministic, exactly resumable.

Both streams are index based (see `order`): each batch is a pure function of (seed, step, process), so a
stream started at step k equals the uninterrupted stream from step k on, and evaluation covers every example
exactly once with masked padding. Each stream is a Grain `MapDataset` whose element i is batch i, so Grain's
reader threads (and, on request, worker processes) compute batches in parallel while the order stays fixed,
whatever the number of threads or workers; the iterator's Grain state (`Batches.get_state`) restores it too.

- Small fixed-size datasets (CIFAR, the offline dataset) are read once into memory as uint8; a batch is
  gathered and augmented (pad-crop-flip) in vectorised NumPy, a few threads ahead of the consumer.
- Large datasets (ImageNet) are read by random access from TFDS's array_record files (`tfds.data_source`);
  each example is decoded in Pillow at the crop it needs (`jpeg`) and normalised, in Grain's reader threads
  (Pillow and NumPy release the GIL) or in `workers` processes. Each process reads only its own examples.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any, Iterator

import grain
import numpy as np
from absl import flags
import tensorflow_datasets as tfds

from attn_flax.data import catalog, jpeg, order, preprocess

SMALL_READ_THREADS = 2
PREFETCH_BATCHES = 4
_PAD_FRACTION = 8
WORKERS_ENV = "ATTN_FLAX_DATA_WORKERS"


class Batches(Iterator[dict]):
    """An iterator of batch dicts over a Grain iterator: `len` (for progress bars, None when infinite),
    `get_state`/`set_state` (Grain's checkpointable position) and `close` (stops reader threads and workers)."""

    def __init__(self, iterator: grain.DatasetIterator, num_batches: int | None):
        self._iterator = iterator
        self.num_batches = num_batches

    def __iter__(self) -> "Batches":
        return self

    def __next__(self) -> dict:
        return next(self._iterator)

    def __len__(self) -> int:
        if self.num_batches is None:
            raise TypeError("the training stream is infinite")
        return self.num_batches

    def get_state(self) -> dict[str, Any]:
        """Grain's state of the iterator: `set_state` on a fresh stream of the same arguments resumes here."""
        return self._iterator.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self._iterator.set_state(state)

    def close(self) -> None:
        close = getattr(self._iterator, "close", None)
        if close is not None:
            close()


def _num_workers(workers: int | None) -> int:
    if workers is None:
        workers = int(os.environ.get(WORKERS_ENV, "0") or 0)
    if workers < 0:
        raise ValueError(f"workers={workers} must be 0 (decode in threads of this process) or a number of processes")
    return workers


def _read_threads() -> int:
    return max(2, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 2)


def _iterate(dataset: grain.MapDataset, num_threads: int, workers: int) -> grain.DatasetIterator:
    """Batch i of `dataset` is computed by one of `num_threads` threads (in each of `workers` processes, when
    there are any); the iterator yields batches in index order, at most a few ahead of the consumer."""
    threads = max(1, num_threads // max(workers, 1))
    iterable = dataset.to_iter_dataset(grain.ReadOptions(num_threads=threads,
                                                         prefetch_buffer_size=max(PREFETCH_BATCHES, 2 * threads)))
    if workers:
        if not flags.FLAGS.is_parsed():  # Grain reads its absl flags when it starts workers; no script parsed them
            flags.FLAGS.mark_as_parsed()
        iterable = iterable.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=2))
    return iter(iterable)


def _load_in_memory(builder: tfds.core.DatasetBuilder, split: str) -> tuple[np.ndarray, np.ndarray]:
    """The whole split as uint8 RGB images [N, H, W, 3] and int32 labels [N]."""
    data = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
    images = preprocess.to_rgb(np.asarray(data["image"], dtype=np.uint8))
    return images, np.asarray(data["label"], dtype=np.int32)


def _random_access(builder: tfds.core.DatasetBuilder, split: str):
    """A random-access source of {'image': encoded bytes, 'label'} records (array_record files)."""
    return catalog.random_access_builder(builder).as_data_source(split=split,
                                                               decoders={"image": tfds.decode.SkipDecoding()})


@dataclasses.dataclass(frozen=True)
class _Layout:
    """Where each slot of this process's batches sits in the global stream (see `order`)."""

    global_batch_size: int
    process_index: int
    process_count: int

    @property
    def local_batch_size(self) -> int:
        return order.local_batch_size(self.global_batch_size, self.process_count)

    def positions(self, step: int) -> np.ndarray:
        return order.batch_positions(step, self.global_batch_size, self.process_index, self.process_count)

    def position(self, element: int) -> int:
        """Stream position of this process's `element`-th example (slot element % local of batch element // local)."""
        step, slot = divmod(element, self.local_batch_size)
        return step * self.global_batch_size + self.process_index * self.local_batch_size + slot


@dataclasses.dataclass(frozen=True)
class _SmallTrainBatch:
    """Step -> this process's augmented batch, from the in-memory split (vectorised over the batch)."""

    images: np.ndarray
    labels: np.ndarray
    stream: order.TrainOrder
    layout: _Layout
    info: catalog.DatasetInfo
    seed: int
    dtype: Any
    with_index: bool

    def __call__(self, step: int) -> dict:
        positions = self.layout.positions(step)
        indices = self.stream.indices(positions)
        pad = self.info.image_size // _PAD_FRACTION
        pixels = preprocess.pad_crop_flip(self.images[indices], self.seed, positions, pad)
        batch = {"image": preprocess.normalise(pixels, self.info.mean, self.info.std, self.dtype),
                 "label": self.labels[indices]}
        if self.with_index:
            batch["index"] = indices
        return batch


@dataclasses.dataclass(frozen=True)
class _SmallEvalBatch:
    """Eval batch number -> this process's normalised, masked share of it, from the in-memory split."""

    images: np.ndarray
    labels: np.ndarray
    layout: _Layout
    info: catalog.DatasetInfo
    dtype: Any
    with_index: bool

    def __call__(self, batch_number: int) -> dict:
        indices, valid = order.eval_positions(batch_number, self.layout.global_batch_size, self.layout.process_index,
                                              self.layout.process_count, len(self.labels))
        batch = {"image": preprocess.normalise(self.images[indices], self.info.mean, self.info.std, self.dtype),
                 "label": self.labels[indices], "mask": valid}
        if self.with_index:
            batch["index"] = indices
        return batch


@dataclasses.dataclass(frozen=True)
class _DecodedExample:
    """Element number -> one decoded, normalised example of this process's stream (train or eval view)."""

    source: Any
    layout: _Layout
    info: catalog.DatasetInfo
    dtype: Any
    train_order: order.TrainOrder | None = None  # None: evaluation (every example once, then masked padding)
    seed: int = 0

    def __call__(self, element: int) -> dict:
        position = self.layout.position(element)
        if self.train_order is not None:
            index = int(self.train_order.indices(np.array([position]))[0])
            valid = True
        else:
            index, valid = min(position, len(self.source) - 1), position < len(self.source)
        record = self.source[index]
        if self.train_order is not None:
            pixels = jpeg.decode_random_crop(record["image"], self.seed, position, self.info.image_size)
        else:
            pixels = jpeg.decode_center_crop(record["image"], self.info.image_size)
        return {"image": preprocess.normalise(pixels, self.info.mean, self.info.std, self.dtype),
                "label": np.int32(record["label"]), "mask": valid, "index": np.int64(index)}


def _without(keys: tuple[str, ...]):
    def drop(batch: dict) -> dict:
        return {k: v for k, v in batch.items() if k not in keys}
    return drop


def train_batches(name: str, *, global_batch_size: int, seed: int, start_step: int = 0, process_index: int = 0,
                  process_count: int = 1, data_dir: str | None = None, cache: bool = False, dtype=np.float32,
                  with_index: bool = False, image_size: int | None = None, workers: int | None = None) -> Batches:
    """Infinite training stream of this process's share of each global batch, from `start_step` on.

    Yields {'image': [B/P, S, S, 3] `dtype` normalised, 'label': [B/P] int32} (plus 'index', the
    example indices, when `with_index`). Epoch e's order is a permutation that depends only on
    (seed, e); epochs follow each other without dropping a remainder (a batch may straddle two
    epochs); augmentation is seeded by (seed, stream position). The stream started at step k is
    therefore exactly the uninterrupted stream from step k on, for the same `process_count`, and the
    processes' shares concatenated in process order form the single-process global batch.
    `image_size` sets the crop side of ImageNet-style datasets (see `dataset_info`). `workers` Grain
    processes decode ImageNet-style examples (default: $ATTN_FLAX_DATA_WORKERS, else 0: threads of this
    process); the batches do not depend on it. `cache` is accepted for interface stability: small datasets
    are always held in memory and large ones are read by random access, so there is nothing to cache.
    """
    del cache
    layout = _Layout(global_batch_size, process_index, process_count)
    local_batch = layout.local_batch_size
    builder = catalog.load_builder(name, data_dir)
    info = catalog.info_from_builder(name, builder, image_size)
    endless = sys.maxsize // (2 * global_batch_size)

    if info.recipe == "small":
        images, labels = _load_in_memory(builder, info.train_split)
        make = _SmallTrainBatch(images, labels, order.TrainOrder(seed, len(labels)), layout, info, seed, dtype,
                                with_index)
        dataset = grain.MapDataset.range(start_step, endless).map(make)
        return Batches(_iterate(dataset, SMALL_READ_THREADS, 0), None)

    source = _random_access(builder, info.train_split)
    decode = _DecodedExample(source, layout, info, dtype, order.TrainOrder(seed, len(source)), seed)
    dataset = (grain.MapDataset.range(start_step * local_batch, endless * local_batch).map(decode)
               .batch(local_batch).map(_without(("mask",) if with_index else ("mask", "index"))))
    return Batches(_iterate(dataset, _read_threads(), _num_workers(workers)), None)


def num_eval_batches(name: str, *, global_batch_size: int, data_dir: str | None = None) -> int:
    """How many batches `eval_batches` yields on every process."""
    info = catalog.dataset_info(name, data_dir=data_dir)
    return order.num_eval_batches_for(info.num_eval_examples, global_batch_size)


def eval_batches(name: str, *, global_batch_size: int, process_index: int = 0, process_count: int = 1,
                 data_dir: str | None = None, dtype=np.float32, with_index: bool = False,
                 image_size: int | None = None, workers: int | None = None) -> Batches:
    """One pass over the evaluation split: every example exactly once over all processes.

    Yields {'image', 'label', 'mask'} with 'mask' bool, True for real examples; every process yields
    the same number of batches (`len()` of the result), each of size global_batch_size // process_count;
    the last global batch is padded with masked copies of the last example. Global batch b holds
    examples [b*B, (b+1)*B), split into contiguous per-process slices. With `with_index`, 'index' gives
    each slot's example index. Small images are only normalised; large ones are cropped to the window
    "resize the shorter side to 256, take the central 224" keeps, resized to `image_size` (224).
    """
    layout = _Layout(global_batch_size, process_index, process_count)
    order.local_batch_size(global_batch_size, process_count)
    builder = catalog.load_builder(name, data_dir)
    info = catalog.info_from_builder(name, builder, image_size)

    if info.recipe == "small":
        images, labels = _load_in_memory(builder, info.eval_split)
        num_batches = order.num_eval_batches_for(len(labels), global_batch_size)
        dataset = grain.MapDataset.range(num_batches).map(
            _SmallEvalBatch(images, labels, layout, info, dtype, with_index))
        return Batches(_iterate(dataset, SMALL_READ_THREADS, 0), num_batches)

    source = _random_access(builder, info.eval_split)
    num_batches = order.num_eval_batches_for(len(source), global_batch_size)
    dataset = (grain.MapDataset.range(num_batches * layout.local_batch_size)
               .map(_DecodedExample(source, layout, info, dtype)).batch(layout.local_batch_size)
               .map(_without(() if with_index else ("index",))))
    return Batches(_iterate(dataset, _read_threads(), _num_workers(workers)), num_batches)
