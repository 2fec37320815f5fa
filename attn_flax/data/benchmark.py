"""Pipeline throughput: images per second of each train and eval stream on this machine.

    python -m attn_flax.data.benchmark [--batches 50] [--data_dir DIR]

CIFAR-10 runs under `tfds.testing.mock_data` (50,000 fake 32x32 examples, the real reading and
augmentation code). ImageNet runs the real JPEG path on 256 synthetic 500x375 JPEGs (the median
ImageNet size), served through a faked `tfds.data_source`. The offline dataset is the real one,
prepared on first use in DIR (default ~/tensorflow_datasets).
"""
from __future__ import annotations

import argparse
import io
import tempfile
import time
from typing import Iterator

import numpy as np
from PIL import Image

import attn_flax.data as data
from attn_flax.data.testing import mock_prepared

_JPEG_SHAPE = (375, 500)


def _synthetic_jpegs(count: int) -> list[dict]:
    rng = np.random.default_rng(0)
    records = []
    for i in range(count):
        small = rng.integers(0, 256, size=(12, 16, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize(_JPEG_SHAPE[::-1], Image.BICUBIC)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        records.append({"image": buffer.getvalue(), "label": i % 1000})
    return records


def _rate(batches: Iterator[dict], num_batches: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        next(batches)
    start, count = time.perf_counter(), 0
    for _ in range(num_batches):
        count += len(next(batches)["label"])
    return count / (time.perf_counter() - start)


def _report(name: str, batch_size: int, num_batches: int, data_dir: str | None) -> None:
    train = data.train_batches(name, global_batch_size=batch_size, seed=0, data_dir=data_dir)
    train_rate = _rate(train, num_batches)
    evaluation = data.eval_batches(name, global_batch_size=batch_size, data_dir=data_dir)
    eval_rate = _rate(evaluation, min(num_batches, len(evaluation) - 2))
    print(f"{name:18s} batch {batch_size:4d}   train {train_rate:9.0f} img/s   eval {eval_rate:9.0f} img/s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=50)
    parser.add_argument("--data_dir", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        with mock_prepared(root, 50_000):
            _report("cifar10", 256, args.batches, None)
        records = _synthetic_jpegs(256)
        with mock_prepared(root, len(records), as_data_source_fn=lambda *a, **k: records):
            _report("imagenet2012", 64, max(2, args.batches // 5), None)
    _report(data.DEFAULT_DATASET, 256, args.batches, args.data_dir)


if __name__ == "__main__":
    main()
