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

from attn_flax.data import offline

DEFAULT_DATASET = offline.NAME
SUPPORTED_DATASETS = (offline.NAME, "cifar10", "cifar100", "imagenet2012")
SMALL_IMAGE_MAX_SIDE = 64
LARGE_IMAGE_SIZE = 224

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


def _base_name(name: str) -> str:
    return name.split(":")[0].split("/")[0]


def _default_data_dir() -> str:
    return os.path.expanduser(os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets"))


def _not_prepared_message(name: str, data_dir: str | None) -> str:
    root = data_dir or _default_data_dir()
    message = (
        f"dataset {name!r} is not prepared in {root} and will not be downloaded here: on a machine with "
        f"network run `tfds build {_base_name(name)} --data_dir={root}` (or pass data_dir= pointing at a "
        f"prepared copy)"
    )
    if _base_name(name) == "imagenet2012":
        message += (
            f"; ImageNet needs a manual download: put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar "
            f"in {root}/downloads/manual and add --file_format=array_record (random access is required)"
        )
    return message


def _check_features(name: str, builder: tfds.core.DatasetBuilder) -> None:
    features = builder.info.features
    keys = set(features.keys()) if hasattr(features, "keys") else set()
    if "image" not in keys or "label" not in keys or not isinstance(features["label"], tfds.features.ClassLabel):
        raise ValueError(
            f"dataset {name!r} is not an image-classification dataset: it needs an 'image' feature and a "
            f"ClassLabel 'label' feature (it has {sorted(keys)})"
        )


def load_builder(name: str, data_dir: str | None = None) -> tfds.core.DatasetBuilder:
    """Returns the TFDS builder for `name`, prepared; prepares the offline dataset on first use."""
    if _base_name(name) not in set(tfds.list_builders()):
        raise ValueError(
            f"unknown dataset {name!r}: supported are {', '.join(SUPPORTED_DATASETS)}, and any TFDS "
            f"image-classification dataset (a registered name with 'image' and ClassLabel 'label' features)"
        )
    builder = tfds.builder(name, data_dir=data_dir)
    _check_features(name, builder)
    if not builder.is_prepared():
        if _base_name(name) != offline.NAME:
            raise DatasetNotPreparedError(_not_prepared_message(name, data_dir))
        builder.download_and_prepare()
    return builder


def _recipe(image_shape: tuple) -> tuple[str, int]:
    height, width = image_shape[0], image_shape[1]
    if height is not None and height == width and height <= SMALL_IMAGE_MAX_SIDE:
        return "small", int(height)
    return "large", LARGE_IMAGE_SIZE


def eval_split_name(builder: tfds.core.DatasetBuilder) -> str:
    """The held-out split: 'validation' where it exists (ImageNet), else 'test'."""
    return "validation" if "validation" in builder.info.splits else "test"


def info_from_builder(name: str, builder: tfds.core.DatasetBuilder) -> DatasetInfo:
    """Builds the `DatasetInfo` of a prepared builder."""
    features = builder.info.features
    recipe, image_size = _recipe(tuple(features["image"].shape))
    mean, std = _STATISTICS.get(_base_name(name), (IMAGENET_MEAN, IMAGENET_STD))
    eval_split = eval_split_name(builder)
    splits = builder.info.splits
    return DatasetInfo(
        name=name,
        num_classes=features["label"].num_classes,
        num_train_examples=splits["train"].num_examples,
        num_eval_examples=splits[eval_split].num_examples,
        image_size=image_size,
        train_split="train",
        eval_split=eval_split,
        recipe=recipe,
        mean=mean,
        std=std,
        class_names=tuple(features["label"].names),
    )


def dataset_info(name: str, *, data_dir: str | None = None) -> DatasetInfo:
    """Describes dataset `name` (a TFDS name, e.g. 'cifar10'); prepares the offline dataset if needed.

    Raises ValueError for an unknown or non-classification dataset and DatasetNotPreparedError when
    the files are missing and would need a download.
    """
    return info_from_builder(name, load_builder(name, data_dir))
