"""Prepares a dataset in the format the pipelines read, with TFDS's own builders and no apache_beam.

    python -m attn_flax.data.prepare imagenet2012 --data_dir=DIR [--manual_dir=DIR/downloads/manual]
    python -m attn_flax.data.prepare cifar10 --data_dir=DIR          # downloads: needs network

ImageNet: put the two archives of the manual download (ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar, from
image-net.org) in `manual_dir`; TFDS's imagenet2012 builder (which also repairs the 22 CMYK JPEGs and the PNG
named .JPEG) writes array_record files, which `tfds.data_source` and Grain read by random access. `tfds build`
and `tfds convert_format` import apache_beam at start-up; this calls the same builder through the Python API.
A dataset already prepared as tfrecord (e.g. copied from elsewhere) gets array_record copies of its shards next
to them, so both formats stay readable. Every problem is one line on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import os
import sys
import tarfile
import time

import tensorflow_datasets as tfds
from etils import epath

from attn_flax.data import catalog


class PrepareError(RuntimeError):
    """What is wrong with the inputs of a preparation, in one line with what to do."""


def _is_tar(path: epath.Path) -> bool:
    """Whether the file starts with a tar header (the 'ustar' magic at byte 257), read also from gs://."""
    with path.open("rb") as f:
        header = f.read(512)
    return len(header) == 512 and header[257:262] == b"ustar"


def _check_archives(manual_dir: str) -> None:
    for archive in catalog.IMAGENET_ARCHIVES:
        path = epath.Path(manual_dir) / archive
        if not path.is_file():
            raise PrepareError(
                f"{archive} is not in {manual_dir}: put {' and '.join(catalog.IMAGENET_ARCHIVES)} (the manual "
                f"download from image-net.org) there, or pass --manual_dir=<the folder that has them>")
        if not _is_tar(path):
            raise PrepareError(f"{path} is not a tar archive (truncated or a different file): download it again")


def add_array_record(builder: tfds.core.DatasetBuilder) -> None:
    """Writes an array_record copy of every tfrecord shard of a prepared builder and records the format.

    The records are the same serialized examples; `dataset_info.json` gains array_record as an alternative
    format, so `as_dataset` keeps reading tfrecord and `as_data_source` (of `tfds.builder_from_directory`,
    which reads the alternatives; see `catalog.random_access_builder`) reads array_record. Shards are written
    under a temporary name and renamed, so an interrupted run leaves no half shard behind.
    """
    import tensorflow as tf
    from array_record.python import array_record_module

    for split_name, split in builder.info.splits.items():
        template = split.filename_template
        for source, target in zip(template.sharded_filepaths(split.num_shards),
                                  template.replace(filetype_suffix="array_record").sharded_filepaths(split.num_shards)):
            if target.exists():
                continue
            partial = target.parent / f"{target.name}.incomplete"
            writer = array_record_module.ArrayRecordWriter(os.fspath(partial), "group_size:1")
            for record in tf.data.TFRecordDataset(os.fspath(source)).as_numpy_iterator():
                writer.write(record)
            writer.close()
            partial.rename(target)
        print(f"{builder.name} {split_name}: array_record shards written", flush=True)
    info = tfds.builder_from_directory(builder.data_dir).info
    if "array_record" not in {f.value for f in info.alternative_file_formats}:
        info.add_alternative_file_format("array_record")
    info.write_to_directory(builder.data_dir)


def prepare(name: str, *, data_dir: str | None = None, manual_dir: str | None = None) -> str:
    """Prepares `name` in `data_dir` (default ~/tensorflow_datasets); returns what was done, in one line.

    Datasets that are read by random access (ImageNet-style) are written as array_record; small ones as TFDS's
    default. Raises PrepareError (one line) for missing or damaged inputs.
    """
    data_dir = data_dir or catalog.default_data_dir()
    if catalog.base_name(name) not in set(tfds.list_builders()):
        raise PrepareError(f"unknown dataset {name!r}: give a TFDS name such as imagenet2012 or cifar10")
    builder = tfds.builder(name, data_dir=data_dir)
    large = catalog.recipe_of(builder) == "large"
    if builder.is_prepared():
        if large and "array_record" not in catalog.available_formats(builder):
            start = time.perf_counter()
            add_array_record(builder)
            return f"{name} in {builder.data_dir}: array_record added in {time.perf_counter() - start:.1f} s"
        return f"{name} is already prepared in {builder.data_dir}"
    manual = builder.MANUAL_DOWNLOAD_INSTRUCTIONS is not None
    manual_dir = manual_dir or str(epath.Path(data_dir) / "downloads" / "manual")
    if catalog.base_name(name) == "imagenet2012":
        _check_archives(manual_dir)
    elif manual and not epath.Path(manual_dir).is_dir():
        raise PrepareError(f"{name} needs a manual download in {manual_dir} (see its TFDS page); pass --manual_dir")
    builder = tfds.builder(name, data_dir=data_dir, **({"file_format": "array_record"} if large else {}))
    start = time.perf_counter()
    try:
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    except (tarfile.TarError, EOFError) as error:
        raise PrepareError(f"an archive in {manual_dir} is damaged ({error}): download it again") from None
    except OSError as error:
        raise PrepareError(f"preparing {name} in {data_dir} failed: {error}".splitlines()[0]) from None
    catalog.load_builder(name, data_dir)  # what the pipelines will check, checked now
    splits = ", ".join(f"{k} {v.num_examples}" for k, v in builder.info.splits.items())
    return f"{name} prepared in {builder.data_dir} ({splits} examples) in {time.perf_counter() - start:.1f} s"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", help="TFDS name, e.g. imagenet2012")
    parser.add_argument("--data_dir", default=None, help="TFDS data directory (default $TFDS_DATA_DIR or "
                        "~/tensorflow_datasets); pass the same one as --config.data_dir when training")
    parser.add_argument("--manual_dir", default=None, help="folder with the manually downloaded archives "
                        "(default DATA_DIR/downloads/manual)")
    args = parser.parse_args(argv)
    try:
        print(prepare(args.dataset, data_dir=args.data_dir, manual_dir=args.manual_dir), flush=True)
    except (PrepareError, catalog.DatasetNotPreparedError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
