"""Training and evaluation batch streams: per process, deterministic, exactly resumable.

Both streams are index based (see `order`): each batch is a pure function of (seed, step, process),
so a stream started at step k equals the uninterrupted stream from step k on, and evaluation covers
every example exactly once with masked padding. Small fixed-size datasets (CIFAR, the offline
dataset) are read once into memory as uint8 and augmented in NumPy on a background thread. Large
datasets (ImageNet) are read by random access through `tfds.data_source` (array_record files) and
decoded in a parallel, deterministic tf.data map; there each process reads only its own examples.
"""
from __future__ import annotations

import itertools
import queue
import threading
from typing import Callable, Iterator

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from attn_flax.data import catalog, jpeg, order, preprocess

PREFETCH_BATCHES = 4
_PAD_FRACTION = 8


class Batches(Iterator[dict]):
    """An iterator of batches that also knows how many it yields (`len`), for progress bars."""

    def __init__(self, batches: Iterator[dict], num_batches: int):
        self._batches = batches
        self.num_batches = num_batches

    def __iter__(self) -> "Batches":
        return self

    def __next__(self) -> dict:
        return next(self._batches)

    def __len__(self) -> int:
        return self.num_batches


def _prefetch(batches: Iterator[dict], size: int = PREFETCH_BATCHES) -> Iterator[dict]:
    """Runs `batches` on a daemon thread, `size` batches ahead; the thread stops when the consumer does."""
    buffer: queue.Queue = queue.Queue(maxsize=size)
    stop = threading.Event()
    done = object()

    def produce() -> None:
        try:
            for batch in batches:
                while not stop.is_set():
                    try:
                        buffer.put(batch, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            buffer.put(done)
        except BaseException as error:  # re-raised in the consumer
            buffer.put(error)

    threading.Thread(target=produce, daemon=True).start()
    try:
        while True:
            item = buffer.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


def _load_in_memory(builder: tfds.core.DatasetBuilder, split: str) -> tuple[np.ndarray, np.ndarray]:
    """The whole split as uint8 RGB images [N, H, W, 3] and int32 labels [N]."""
    data = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
    images = preprocess.to_rgb(np.asarray(data["image"], dtype=np.uint8))
    return images, np.asarray(data["label"], dtype=np.int32)


def _random_access(builder: tfds.core.DatasetBuilder, split: str):
    """A random-access source of {'image': encoded bytes, 'label'} records (array_record files)."""
    try:
        return builder.as_data_source(split=split, decoders={"image": tfds.decode.SkipDecoding()})
    except (NotImplementedError, ValueError) as error:
        raise catalog.DatasetNotPreparedError(
            f"dataset {builder.name!r} in {builder.data_dir} has no random-access files ({error.__class__.__name__}); "
            f"convert it with `tfds convert_format --dataset_dir={builder.data_dir} --out_file_format=array_record`"
        ) from None


def _is_jpeg(builder: tfds.core.DatasetBuilder) -> bool:
    return getattr(builder.info.features["image"], "encoding_format", None) == "jpeg"


def _small_batch(images: np.ndarray, labels: np.ndarray, indices: np.ndarray, info: catalog.DatasetInfo,
                 dtype, augment: Callable[[np.ndarray], np.ndarray] | None) -> dict:
    pixels = images[indices]
    if augment is not None:
        pixels = augment(pixels)
    return {"image": preprocess.normalise(pixels, info.mean, info.std, dtype), "label": labels[indices]}


def _records(source, index_batches: Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]):
    """Yields (encoded image, label, stream position, valid) per example, in stream order."""
    for indices, positions, valid in index_batches:
        for index, position, is_valid in zip(indices, positions, valid):
            record = source[int(index)]
            yield record["image"], np.int32(record["label"]), np.int64(position), bool(is_valid)


def _decoded_batches(source, index_batches, local_batch: int, decode: Callable, info: catalog.DatasetInfo,
                     dtype) -> Iterator[dict]:
    """Decodes records in a parallel, order-preserving tf.data map and batches them as NumPy dicts."""
    signature = (
        tf.TensorSpec((), tf.string), tf.TensorSpec((), tf.int32), tf.TensorSpec((), tf.int64),
        tf.TensorSpec((), tf.bool),
    )
    dataset = tf.data.Dataset.from_generator(lambda: _records(source, index_batches), output_signature=signature)

    def prepare(encoded, label, position, valid):
        image = jpeg.normalise(decode(encoded, position), info.mean, info.std)
        return {"image": image, "label": label, "mask": valid, "index_position": position}

    dataset = dataset.map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    dataset = dataset.batch(local_batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    options = tf.data.Options()
    options.deterministic = True
    dataset = dataset.with_options(options)
    for batch in dataset.as_numpy_iterator():
        batch["image"] = batch["image"].astype(dtype, copy=False)
        yield batch


def train_batches(name: str, *, global_batch_size: int, seed: int, start_step: int = 0, process_index: int = 0,
                  process_count: int = 1, data_dir: str | None = None, cache: bool = False, dtype=np.float32,
                  with_index: bool = False) -> Iterator[dict]:
    """Infinite training stream of this process's share of each global batch, from `start_step` on.

    Yields {'image': [B/P, S, S, 3] `dtype` normalised, 'label': [B/P] int32} (plus 'index', the
    example indices, when `with_index`). Epoch e's order is a permutation that depends only on
    (seed, e); epochs follow each other without dropping a remainder (a batch may straddle two
    epochs); augmentation is seeded by (seed, stream position). The stream started at step k is
    therefore exactly the uninterrupted stream from step k on, for the same `process_count`, and the
    processes' shares concatenated in process order form the single-process global batch.
    `cache` is accepted for interface stability: small datasets are always held in memory and large
    ones are read by random access, so there is nothing further to cache.
    """
    del cache
    local_batch = order.local_batch_size(global_batch_size, process_count)
    builder = catalog.load_builder(name, data_dir)
    info = catalog.info_from_builder(name, builder)

    def positions_from(step: int) -> Iterator[np.ndarray]:
        for s in itertools.count(step):
            yield order.batch_positions(s, global_batch_size, process_index, process_count)

    if info.recipe == "small":
        images, labels = _load_in_memory(builder, info.train_split)
        stream = order.TrainOrder(seed, len(labels))
        pad = info.image_size // _PAD_FRACTION

        def small_batches() -> Iterator[dict]:
            for positions in positions_from(start_step):
                indices = stream.indices(positions)
                augment = lambda pixels: preprocess.pad_crop_flip(pixels, seed, positions, pad)  # noqa: E731
                batch = _small_batch(images, labels, indices, info, dtype, augment)
                if with_index:
                    batch["index"] = indices
                yield batch

        return _prefetch(small_batches())

    source = _random_access(builder, info.train_split)
    stream = order.TrainOrder(seed, len(source))
    is_jpeg = _is_jpeg(builder)

    def index_batches():
        for positions in positions_from(start_step):
            indices = stream.indices(positions)
            yield indices, positions, np.ones_like(positions, dtype=bool)

    def decode(encoded, position):
        return jpeg.decode_random_crop(encoded, tf.stack([tf.constant(seed, tf.int64), position]), info.image_size,
                                       is_jpeg)

    def large_batches() -> Iterator[dict]:
        for batch in _decoded_batches(source, index_batches(), local_batch, decode, info, dtype):
            out = {"image": batch["image"], "label": batch["label"]}
            if with_index:
                out["index"] = stream.indices(batch["index_position"])
            yield out

    return large_batches()


def num_eval_batches(name: str, *, global_batch_size: int, data_dir: str | None = None) -> int:
    """How many batches `eval_batches` yields on every process."""
    info = catalog.dataset_info(name, data_dir=data_dir)
    return order.num_eval_batches_for(info.num_eval_examples, global_batch_size)


def eval_batches(name: str, *, global_batch_size: int, process_index: int = 0, process_count: int = 1,
                 data_dir: str | None = None, dtype=np.float32, with_index: bool = False) -> Batches:
    """One pass over the evaluation split: every example exactly once over all processes.

    Yields {'image', 'label', 'mask'} with 'mask' bool, True for real examples; every process yields
    the same number of batches (`len()` of the result), each of size global_batch_size // process_count;
    the last global batch is padded with masked copies of the last example. Global batch b holds
    examples [b*B, (b+1)*B), split into contiguous per-process slices. With `with_index`, 'index' gives
    each slot's example index. Small images are only normalised; large ones are resized (shorter side
    256) and center-cropped to 224.
    """
    order.local_batch_size(global_batch_size, process_count)
    builder = catalog.load_builder(name, data_dir)
    info = catalog.info_from_builder(name, builder)
    local_batch = global_batch_size // process_count

    if info.recipe == "small":
        images, labels = _load_in_memory(builder, info.eval_split)
        num_examples = len(labels)
    else:
        source = _random_access(builder, info.eval_split)
        num_examples = len(source)
    num_batches = order.num_eval_batches_for(num_examples, global_batch_size)

    def index_batches():
        for b in range(num_batches):
            indices, valid = order.eval_positions(b, global_batch_size, process_index, process_count, num_examples)
            yield indices, order.batch_positions(b, global_batch_size, process_index, process_count), valid

    if info.recipe == "small":
        def small_batches() -> Iterator[dict]:
            for indices, _, valid in index_batches():
                batch = _small_batch(images, labels, indices, info, dtype, None)
                batch["mask"] = valid
                if with_index:
                    batch["index"] = indices
                yield batch

        return Batches(_prefetch(small_batches()), num_batches)

    is_jpeg = _is_jpeg(builder)

    def decode(encoded, position):
        del position
        return jpeg.decode_center_crop(encoded, info.image_size, is_jpeg)

    def large_batches() -> Iterator[dict]:
        for batch in _decoded_batches(source, index_batches(), local_batch, decode, info, dtype):
            out = {"image": batch["image"], "label": batch["label"], "mask": batch["mask"]}
            if with_index:
                out["index"] = np.minimum(batch["index_position"], num_examples - 1)
            yield out

    return Batches(large_batches(), num_batches)
