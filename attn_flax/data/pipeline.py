"""Training and evaluation batch streams on Grain: per process, deterministic, exactly resumable.

Both streams are index based (see `order`): each batch is a pure function of (seed, step, process), so a
stream started at step k equals the uninterrupted stream from step k on, and evaluation covers every example
exactly once with masked padding. Each stream is a Grain `MapDataset` whose element i is this process's share
of batch i, computed by Grain's reader threads a few batches ahead; the order never depends on the threads.
`Batches.get_state()` / `set_state()` save and restore a stream's position.

- Small fixed-size datasets (CIFAR, the offline dataset) are read once into memory as uint8; a batch is
  gathered and augmented (pad-crop-flip) in vectorised NumPy.
- Large datasets (ImageNet): Grain reads each batch's records by random access from TFDS's array_record
  files (`tfds.data_source`, only this process's examples); their JPEGs are decoded at the window each view
  keeps (`jpeg`) in an order-preserving tf.data map, whose C++ threads decode in parallel without the GIL.
  Decoding in Grain instead (Pillow in its reader threads or worker processes) was measured at about 2x the
  CPU time per image (docs/data.md), so Grain does what it is good at here: random access, per-process
  sharding, prefetching and position; tf.data does the per-image decoding.
"""
from __future__ import annotations

import dataclasses
import sys
from typing import Any, Iterator

import grain
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from attn_flax.data import catalog, jpeg, order, preprocess

SMALL_READ_THREADS = 2
RECORD_READ_THREADS = 2
PREFETCH_BATCHES = 4
_PAD_FRACTION = 8


class Batches(Iterator[dict]):
    """An iterator of batch dicts over a Grain iterator: `len` (for progress bars, None when infinite),
    `get_state`/`set_state` (the stream's position, to save and restore) and `close` (stops the reader threads)."""

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


def _iterate(dataset: grain.MapDataset, num_threads: int) -> grain.DatasetIterator:
    """Element i of `dataset` is computed by one of `num_threads` threads; the iterator yields the elements in
    index order, at most a few ahead of the consumer."""
    return iter(dataset.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                                          prefetch_buffer_size=max(PREFETCH_BATCHES, num_threads))))


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
class _RecordBatch:
    """Step (training) or batch number (evaluation) -> this process's encoded records, in slot order."""

    source: Any
    layout: _Layout
    train_order: order.TrainOrder | None = None  # None: evaluation (every example once, then masked padding)

    def __call__(self, step: int) -> dict:
        positions = self.layout.positions(step)
        if self.train_order is not None:
            indices, valid = self.train_order.indices(positions), np.ones(len(positions), bool)
        else:
            indices, valid = order.eval_positions(step, self.layout.global_batch_size, self.layout.process_index,
                                                  self.layout.process_count, len(self.source))
        records = [self.source[int(i)] for i in indices]
        return {"encoded": np.array([r["image"] for r in records], dtype=object),
                "label": np.array([r["label"] for r in records], np.int32), "position": positions,
                "index": indices.astype(np.int64), "mask": valid}


_RECORD_DTYPES = {"encoded": tf.string, "label": tf.int32, "position": tf.int64, "index": tf.int64, "mask": tf.bool}


def _decoded_batches(records: Iterator[dict], view, local_batch: int, info: catalog.DatasetInfo, dtype,
                     keys: tuple[str, ...]) -> Iterator[dict]:
    """Decodes the record batches' images in a parallel, order-preserving tf.data map; yields NumPy batches."""
    signature = {k: tf.TensorSpec([None], dtype) for k, dtype in _RECORD_DTYPES.items()}
    dataset = tf.data.Dataset.from_generator(lambda: records, output_signature=signature).unbatch()

    def decode(example):
        image = jpeg.normalise(view(example["encoded"], example["position"]), info.mean, info.std)
        return {"image": image, **{k: example[k] for k in keys}}

    dataset = dataset.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    dataset = dataset.batch(local_batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    options = tf.data.Options()
    options.deterministic = True
    options.threading.max_intra_op_parallelism = 1  # parallel over images, not inside one image's ops
    for batch in dataset.with_options(options).as_numpy_iterator():
        batch["image"] = batch["image"].astype(dtype, copy=False)
        yield batch


class _LargeBatches(Batches):
    """Grain's record stream from a step on, decoded by tf.data; its state is the number of the next batch."""

    def __init__(self, make, first: int, num_batches: int | None):
        self._make, self._next = make, first
        super().__init__(make(first), num_batches)

    def __next__(self) -> dict:
        batch = next(self._iterator)
        self._next += 1
        return batch

    def get_state(self) -> dict[str, Any]:
        return {"next_batch": self._next}

    def set_state(self, state: dict[str, Any]) -> None:
        self.close()
        self._next = int(state["next_batch"])
        self._iterator = self._make(self._next)


def _large_batches(source, layout: _Layout, info: catalog.DatasetInfo, dtype, is_jpeg: bool, first: int,
                   num_batches: int | None, train_order: order.TrainOrder | None, seed: int,
                   keys: tuple[str, ...]) -> Batches:
    if train_order is not None:
        def view(encoded, position):
            return jpeg.decode_random_crop(encoded, tf.stack([tf.constant(seed, tf.int64), position]),
                                           info.image_size, is_jpeg)
    else:
        def view(encoded, position):
            del position
            return jpeg.decode_center_crop(encoded, info.image_size, is_jpeg)

    stop = num_batches if num_batches is not None else sys.maxsize // (2 * layout.global_batch_size)
    read = _RecordBatch(source, layout, train_order)

    def make(start: int) -> Iterator[dict]:
        records = _iterate(grain.MapDataset.range(start, stop).map(read), RECORD_READ_THREADS)
        return _decoded_batches(records, view, layout.local_batch_size, info, dtype, keys)

    return _LargeBatches(make, first, num_batches)


def _is_jpeg(builder: tfds.core.DatasetBuilder) -> bool:
    return getattr(builder.info.features["image"], "encoding_format", None) == "jpeg"


def train_batches(name: str, *, global_batch_size: int, seed: int, start_step: int = 0, process_index: int = 0,
                  process_count: int = 1, data_dir: str | None = None, cache: bool = False, dtype=np.float32,
                  with_index: bool = False, image_size: int | None = None) -> Batches:
    """Infinite training stream of this process's share of each global batch, from `start_step` on.

    Yields {'image': [B/P, S, S, 3] `dtype` normalised, 'label': [B/P] int32} (plus 'index', the
    example indices, when `with_index`). Epoch e's order is a permutation that depends only on
    (seed, e); epochs follow each other without dropping a remainder (a batch may straddle two
    epochs); augmentation is seeded by (seed, stream position). The stream started at step k is
    therefore exactly the uninterrupted stream from step k on, for the same `process_count`, and the
    processes' shares concatenated in process order form the single-process global batch.
    `image_size` sets the crop side of ImageNet-style datasets (see `dataset_info`). `cache` is accepted
    for interface stability: small datasets are always held in memory and large ones are read by random
    access, so there is nothing to cache.
    """
    del cache
    layout = _Layout(global_batch_size, process_index, process_count)
    order.local_batch_size(global_batch_size, process_count)
    builder = catalog.load_builder(name, data_dir)
    info = catalog.info_from_builder(name, builder, image_size)
    endless = sys.maxsize // (2 * global_batch_size)

    if info.recipe == "small":
        images, labels = _load_in_memory(builder, info.train_split)
        make = _SmallTrainBatch(images, labels, order.TrainOrder(seed, len(labels)), layout, info, seed, dtype,
                                with_index)
        dataset = grain.MapDataset.range(start_step, endless).map(make)
        return Batches(_iterate(dataset, SMALL_READ_THREADS), None)

    source = _random_access(builder, info.train_split)
    keys = ("label", "index") if with_index else ("label",)
    return _large_batches(source, layout, info, dtype, _is_jpeg(builder), start_step, None,
                          order.TrainOrder(seed, len(source)), seed, keys)


def num_eval_batches(name: str, *, global_batch_size: int, data_dir: str | None = None) -> int:
    """How many batches `eval_batches` yields on every process."""
    info = catalog.dataset_info(name, data_dir=data_dir)
    return order.num_eval_batches_for(info.num_eval_examples, global_batch_size)


def eval_batches(name: str, *, global_batch_size: int, process_index: int = 0, process_count: int = 1,
                 data_dir: str | None = None, dtype=np.float32, with_index: bool = False,
                 image_size: int | None = None) -> Batches:
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
        return Batches(_iterate(dataset, SMALL_READ_THREADS), num_batches)

    source = _random_access(builder, info.eval_split)
    num_batches = order.num_eval_batches_for(len(source), global_batch_size)
    keys = ("label", "mask", "index") if with_index else ("label", "mask")
    return _large_batches(source, layout, info, dtype, _is_jpeg(builder), 0, num_batches, None, 0, keys)
