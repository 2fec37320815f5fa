"""Test and benchmark helpers: CIFAR and ImageNet faked with `tfds.testing.mock_data` as if prepared.

`mock_data` alone fakes examples but leaves the builders unprepared and their split sizes unknown;
writing the dataset_info a real preparation would leave makes `is_prepared()` and the split sizes
match the fake data, so the pipelines run exactly as on real files.
"""
from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterator, Sequence

import tensorflow_datasets as tfds
from tensorflow_datasets.core import splits as splits_lib

MOCK_SPLITS = {"cifar10": ("train", "test"), "cifar100": ("train", "test"), "imagenet2012": ("train", "validation")}


def write_metadata(root: str, name: str, num_examples: int, splits: Sequence[str]) -> None:
    """Writes the dataset_info.json of a prepared `name` with `num_examples` per split (array_record)."""
    builder = tfds.builder(name, data_dir=root)
    os.makedirs(builder.data_dir, exist_ok=True)
    builder.info.set_splits(splits_lib.SplitDict([
        splits_lib.SplitInfo(name=split, shard_lengths=[num_examples], num_bytes=0, filename_template=None)
        for split in splits
    ]))
    builder.info.set_file_format("array_record", override=True, override_if_initialized=True)
    builder.info.write_to_directory(builder.data_dir)


@contextlib.contextmanager
def mock_prepared(root: str, num_examples: int, as_data_source_fn: Callable | None = None) -> Iterator[None]:
    """CIFAR-10/100 and ImageNet faked with `num_examples` examples per split, as if prepared in `root`."""
    for name, splits in MOCK_SPLITS.items():
        write_metadata(root, name, num_examples, splits)
    with tfds.testing.mock_data(num_examples=num_examples, data_dir=root, policy=tfds.testing.MockPolicy.USE_FILES,
                                as_data_source_fn=as_data_source_fn):
        yield
