"""Which datasets the pipelines read, what they hold, and whether they are ready to read.

Known names get their own normalisation statistics; any other TFDS dataset with an `image` and a
`ClassLabel` `label` feature goes through the generic path (small fixed-size images: the CIFAR recipe
at their own size; larger or variable-size images: the ImageNet recipe at 224). Preparation is never
started implicitly, except for the offline dataset, which needs no download.
"""
from __future__ import annotations

import dataclasses
import os

import tensorflow_datasets as tfds
from etils import epath

from attn_flax.data import offline

DEFAULT_DATASET = offline.NAME
SUPPORTED_DATASETS = (offline.NAME, "cifar10", "cifar100", "imagenet2012")
SMALL_IMAGE_MAX_SIDE = 64
LARGE_IMAGE_SIZE = 224

IMAGENET_ARCHIVES = ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
_STATISTICS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet2012": (IMAGENET_MEAN, IMAGENET_STD),
    offline.NAME: ((0.502, 0.499, 0.500), (0.212, 0.211, 0.212)),
}


class DatasetNotPreparedError(RuntimeError):
    """The dataset's files are not in the data directory and would need a download."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What the training loop needs to know about a dataset.

    `image_size` is the side of the square images the pipelines yield (the model input side).
    `recipe` is 'small' (whole split in memory, pad-crop-flip at native size) or 'large' (JPEG or
    other encoded images read by random access, random-area crop / resize-and-center-crop to 224).
    `mean` and `std` are per-channel statistics of [0, 1] pixels used for normalisation.
    """

    name: str
    num_classes: int
    num_train_examples: int
    num_eval_examples: int
    image_size: int
    train_split: str
    eval_split: str
    recipe: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    class_names: tuple[str, ...]


def base_name(name: str) -> str:
    return name.split(":")[0].split("/")[0]


def default_data_dir() -> str:
    return os.path.expanduser(os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets"))


def prepare_command(name: str, data_dir: str | None) -> str:
    """The command that prepares `name` in `data_dir` in the format the pipelines read (no apache_beam)."""
    return f"python -m attn_flax.data.prepare {base_name(name)} --data_dir={data_dir or default_data_dir()}"


def _not_prepared_message(name: str, data_dir: str | None) -> str:
    root = data_dir or default_data_dir()
    if base_name(name) == "imagenet2012":
        manual = str(epath.Path(root) / "downloads" / "manual")
        found = [f for f in IMAGENET_ARCHIVES if (epath.Path(manual) / f).exists()]
        where = (f"the archives are in {manual}" if len(found) == len(IMAGENET_ARCHIVES) else
                 f"put {' and '.join(IMAGENET_ARCHIVES)} (the manual download from image-net.org) in {manual}")
        return f"dataset {name!r} is not prepared in {root}: {where}, then run `{prepare_command(name, root)}`"
    return (f"dataset {name!r} is not prepared in {root} and will not be downloaded here: on a machine with "
            f"network run `{prepare_command(name, root)}` (or pass data_dir= pointing at a prepared copy)")


def _split_files(builder: tfds.core.DatasetBuilder, split: str, file_format: str) -> list[str]:
    """The names of the split's shard files in `file_format`."""
    info = builder.info.splits[split]
    if info.filename_template is None:  # metadata written without files (tfds.testing.mock_data)
        return []
    template = info.filename_template.replace(filetype_suffix=file_format)
    return [path.name for path in template.sharded_filepaths(info.num_shards)]


def random_access_builder(builder: tfds.core.DatasetBuilder) -> tfds.core.DatasetBuilder:
    """The builder whose `as_data_source` reads array_record: `builder` itself when that is its format, else the
    prepared folder read back (`tfds.builder_from_directory`), which, unlike a registered builder, knows the
    alternative formats dataset_info.json records (array_record added next to tfrecord by `prepare`)."""
    if builder.info.file_format is not None and builder.info.file_format.value == "array_record":
        return builder
    try:
        return tfds.builder_from_directory(builder.data_dir)
    except (ValueError, FileNotFoundError):  # no features.json: nothing beyond the registered builder's format
        return builder


def available_formats(builder: tfds.core.DatasetBuilder) -> set[str]:
    """The file formats a prepared dataset's folder holds, e.g. {'tfrecord', 'array_record'}."""
    return {f.value for f in random_access_builder(builder).info.available_file_formats()}


def check_readable(name: str, builder: tfds.core.DatasetBuilder, recipe: str, data_dir: str | None = None) -> None:
    """Raises DatasetNotPreparedError (one line, with the command that fixes it) when a prepared dataset lacks
    a split the pipelines read, the random-access files the 'large' recipe needs, or any of its shard files."""
    root = data_dir or default_data_dir()
    splits = builder.info.splits
    for split in ("train", eval_split_name(builder)):
        if split not in splits or splits[split].num_examples == 0:
            raise DatasetNotPreparedError(
                f"dataset {name!r} in {builder.data_dir} has no {split!r} split (it was prepared without it, e.g. "
                f"with an archive missing): delete that folder and run `{prepare_command(name, root)}`")
    formats = available_formats(builder)
    if recipe == "large" and "array_record" not in formats:
        raise DatasetNotPreparedError(
            f"dataset {name!r} in {builder.data_dir} is stored as {'/'.join(sorted(formats))}, which cannot be read "
            f"by random access: run `{prepare_command(name, root)}` to add array_record files (no apache_beam)")
    file_format = "array_record" if recipe == "large" else builder.info.file_format.value
    present = {path.name for path in epath.Path(builder.data_dir).iterdir()}  # one listing, also on gs://
    for split in ("train", eval_split_name(builder)):
        missing = [f for f in _split_files(builder, split, file_format) if f not in present]
        if missing:
            raise DatasetNotPreparedError(
                f"dataset {name!r} in {builder.data_dir} misses {len(missing)} of its {split!r} files (e.g. "
                f"{missing[0]}): copy them again, or delete that folder and run `{prepare_command(name, root)}`")


def _check_features(name: str, builder: tfds.core.DatasetBuilder) -> None:
    features = builder.info.features
    keys = set(features.keys()) if hasattr(features, "keys") else set()
    if "image" not in keys or "label" not in keys or not isinstance(features["label"], tfds.features.ClassLabel):
        raise ValueError(
            f"dataset {name!r} is not an image-classification dataset: it needs an 'image' feature and a "
            f"ClassLabel 'label' feature (it has {sorted(keys)})"
        )


def load_builder(name: str, data_dir: str | None = None) -> tfds.core.DatasetBuilder:
    """Returns the TFDS builder for `name`, prepared and readable; prepares the offline dataset on first use."""
    if base_name(name) not in set(tfds.list_builders()):
        raise ValueError(
            f"unknown dataset {name!r}: supported are {', '.join(SUPPORTED_DATASETS)}, and any TFDS "
            f"image-classification dataset (a registered name with 'image' and ClassLabel 'label' features)"
        )
    builder = tfds.builder(name, data_dir=data_dir)
    _check_features(name, builder)
    if not builder.is_prepared():
        if base_name(name) != offline.NAME:
            raise DatasetNotPreparedError(_not_prepared_message(name, data_dir))
        builder.download_and_prepare()
    check_readable(name, builder, recipe_of(builder), data_dir)
    return builder


def recipe_of(builder: tfds.core.DatasetBuilder) -> str:
    """'small' for fixed-size square images up to 64 pixels (read into memory), else 'large' (random access)."""
    return _recipe(tuple(builder.info.features["image"].shape))[0]


def _recipe(image_shape: tuple) -> tuple[str, int]:
    height, width = image_shape[0], image_shape[1]
    if height is not None and height == width and height <= SMALL_IMAGE_MAX_SIDE:
        return "small", int(height)
    return "large", LARGE_IMAGE_SIZE


def eval_split_name(builder: tfds.core.DatasetBuilder) -> str:
    """The held-out split: 'validation' where it exists (ImageNet), else 'test'."""
    return "validation" if "validation" in builder.info.splits else "test"


def _image_size(name: str, recipe: str, native: int, image_size: int | None) -> int:
    if image_size is None or image_size == native:
        return native
    if recipe == "small":
        raise ValueError(f"image_size={image_size} applies to datasets read at {LARGE_IMAGE_SIZE} (ImageNet-style "
                         f"crops); {name!r} is read at its native {native}x{native}: leave image_size unset")
    if not 16 <= image_size <= 1024:
        raise ValueError(f"image_size={image_size} must be between 16 and 1024 (the crop side the model sees; "
                         f"{LARGE_IMAGE_SIZE} is the papers')")
    return int(image_size)


def info_from_builder(name: str, builder: tfds.core.DatasetBuilder, image_size: int | None = None) -> DatasetInfo:
    """Builds the `DatasetInfo` of a prepared builder; `image_size` overrides the 'large' recipe's 224."""
    features = builder.info.features
    recipe, native_size = _recipe(tuple(features["image"].shape))
    mean, std = _STATISTICS.get(base_name(name), (IMAGENET_MEAN, IMAGENET_STD))
    eval_split = eval_split_name(builder)
    splits = builder.info.splits
    return DatasetInfo(
        name=name,
        num_classes=features["label"].num_classes,
        num_train_examples=splits["train"].num_examples,
        num_eval_examples=splits[eval_split].num_examples,
        image_size=_image_size(name, recipe, native_size, image_size),
        train_split="train",
        eval_split=eval_split,
        recipe=recipe,
        mean=mean,
        std=std,
        class_names=tuple(features["label"].names),
    )


def dataset_info(name: str, *, data_dir: str | None = None, image_size: int | None = None) -> DatasetInfo:
    """Describes dataset `name` (a TFDS name, e.g. 'cifar10'); prepares the offline dataset if needed.

    `image_size` (None: 224) sets the side of the crops of ImageNet-style datasets, e.g. 128 or 160 for
    low-resolution training; fixed-size small datasets are read at their native size only.
    Raises ValueError for an unknown or non-classification dataset or a bad image_size, and
    DatasetNotPreparedError (one line, with the command that fixes it) when the files are missing, would
    need a download, or are not in a format the pipelines read.
    """
    return info_from_builder(name, load_builder(name, data_dir), image_size)
