"""Test and benchmark helpers: CIFAR and ImageNet faked as if prepared, and ImageNet archives fabricated.

`mock_prepared` fakes CIFAR and ImageNet with `tfds.testing.mock_data`. `write_imagenet_archives` goes one step
further back: it writes the two archives a user downloads, in their real layout and with their real quirks, so
that TFDS's own imagenet2012 builder prepares them exactly as it prepares the real ones.

`mock_data` alone fakes examples but leaves the builders unprepared and their split sizes unknown;
writing the dataset_info a real preparation would leave makes `is_prepared()` and the split sizes
match the fake data, so the pipelines run exactly as on real files.
"""
from __future__ import annotations

import contextlib
import io
import os
import tarfile
from typing import Callable, Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image
from tensorflow_datasets.core import splits as splits_lib

MOCK_SPLITS = {"cifar10": ("train", "test"), "cifar100": ("train", "test"), "imagenet2012": ("train", "validation")}


def write_metadata(root: str, name: str, num_examples: int, splits: Sequence[str]) -> None:
    """Writes the dataset_info.json of a prepared `name` with `num_examples` per split (array_record) and
    empty files where its shards would be."""
    builder = tfds.builder(name, data_dir=root)
    os.makedirs(builder.data_dir, exist_ok=True)
    builder.info.set_splits(splits_lib.SplitDict([
        splits_lib.SplitInfo(name=split, shard_lengths=[num_examples], num_bytes=0, filename_template=None)
        for split in splits
    ]))
    builder.info.set_file_format("array_record", override=True, override_if_initialized=True)
    builder.info.write_to_directory(builder.data_dir)
    for split in splits:  # empty stand-ins for the shard files, which mock_data never opens
        for path in builder.info.splits[split].filepaths:
            open(path, "ab").close()


@contextlib.contextmanager
def mock_prepared(root: str, num_examples: int, as_data_source_fn: Callable | None = None) -> Iterator[None]:
    """CIFAR-10/100 and ImageNet faked with `num_examples` examples per split, as if prepared in `root`."""
    for name, splits in MOCK_SPLITS.items():
        write_metadata(root, name, num_examples, splits)
    with tfds.testing.mock_data(num_examples=num_examples, data_dir=root, policy=tfds.testing.MockPolicy.USE_FILES,
                                as_data_source_fn=as_data_source_fn):
        yield


IMAGENET_TRAIN_ARCHIVE = "ILSVRC2012_img_train.tar"
IMAGENET_VAL_ARCHIVE = "ILSVRC2012_img_val.tar"


def imagenet_synsets() -> list[str]:
    """The 1,000 ILSVRC-2012 synset ids in label order, from the labels file that ships inside tfds."""
    from tensorflow_datasets.datasets.imagenet2012 import imagenet_common

    return imagenet_common.label_names_file().read_text().split()


def _special_names() -> tuple[list[str], list[str]]:
    from tensorflow_datasets.datasets.imagenet2012 import imagenet2012_dataset_builder as builder

    return list(builder.CMYK_IMAGES), list(builder.PNG_IMAGES)


def _encoded(pixels: np.ndarray, file_format: str, quality: int) -> bytes:
    image = Image.fromarray(pixels)
    if file_format == "CMYK":
        image, file_format = image.convert("CMYK"), "JPEG"
    buffer = io.BytesIO()
    image.save(buffer, format=file_format, **({"quality": quality} if file_format == "JPEG" else {}))
    return buffer.getvalue()


def _add(archive: tarfile.TarFile, name: str, payload: bytes) -> None:
    member = tarfile.TarInfo(name)
    member.size = len(payload)
    archive.addfile(member, io.BytesIO(payload))


def write_imagenet_archives(manual_dir: str, *, images_per_synset: int = 1, num_val: int = 300,
                            image_shape: tuple[int, int] = (40, 48), make_pixels: Callable | None = None,
                            quality: int = 90) -> dict[str, int]:
    """Writes ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in the real layout, with fabricated images.

    Train: one inner `n########.tar` per synset (all 1,000, which tfds's label list requires), each with
    `images_per_synset` JPEGs `n########_<k>.JPEG`, plus the files the imagenet2012 builder special-cases
    under their real names: its 22 CMYK JPEGs as real CMYK JPEGs and its PNG-disguised `.JPEG` as a real
    PNG. Validation: `ILSVRC2012_val_########.JPEG`, 1..num_val, flat. `make_pixels(rng, (h, w))` gives
    each image's uint8 RGB pixels (default: smooth random colours). Returns the number of images per split.
    """
    os.makedirs(manual_dir, exist_ok=True)
    rng = np.random.default_rng(0)
    make_pixels = make_pixels or _smooth_pixels
    cmyk, png = _special_names()
    extra: dict[str, list[tuple[str, str]]] = {}
    for name in cmyk:
        extra.setdefault(name.split("_")[0], []).append((name, "CMYK"))
    for name in png:
        extra.setdefault(name.split("_")[0], []).append((name, "PNG"))

    def shape(i: int) -> tuple[int, int]:
        return image_shape if i % 2 else image_shape[::-1]

    num_train = 0
    with tarfile.open(os.path.join(manual_dir, IMAGENET_TRAIN_ARCHIVE), "w") as train:
        for synset in imagenet_synsets():
            inner_buffer = io.BytesIO()
            with tarfile.open(fileobj=inner_buffer, mode="w") as inner:
                files = [(f"{synset}_{k + 1}.JPEG", "JPEG") for k in range(images_per_synset)]
                for i, (name, file_format) in enumerate(files + extra.get(synset, [])):
                    _add(inner, name, _encoded(make_pixels(rng, shape(i)), file_format, quality))
                    num_train += 1
            _add(train, f"{synset}.tar", inner_buffer.getvalue())
    with tarfile.open(os.path.join(manual_dir, IMAGENET_VAL_ARCHIVE), "w") as val:
        for i in range(1, num_val + 1):
            _add(val, f"ILSVRC2012_val_{i:08d}.JPEG", _encoded(make_pixels(rng, shape(i)), "JPEG", quality))
    return {"train": num_train, "validation": num_val}


def _smooth_pixels(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    coarse = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(coarse).resize(shape[::-1], Image.BILINEAR))
