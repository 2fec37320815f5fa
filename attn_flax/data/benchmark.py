"""Pipeline throughput, side by side with the Flax ImageNet example's tf.data pipeline on the same prepared data.

    python -m attn_flax.data.benchmark [--rounds 5] [--imagenet_dir DIR] [--work_dir DIR] [--json]

ImageNet: by default ILSVRC-2012 archives are fabricated in the real layout (1,000 synsets x 2 photo-like
500x375 JPEGs, the median ImageNet size, cut from matplotlib's sample photograph; 500 validation images),
prepared by TFDS's own builder as tfrecord, then given array_record shards of the same records by
`attn_flax.data.prepare`: the reference reads the tfrecord files, this project's Grain pipeline the
array_record ones. `--imagenet_dir` measures an ImageNet already prepared that way instead. The reference is
the Flax example's `input_pipeline.py` as it reads ImageNet: `as_dataset` (skip decoding), shuffle, repeat,
`map(decode_and_random_crop | decode_and_center_crop, AUTOTUNE)` (decode only the crop window, bicubic
resize, flip, normalise), batch, prefetch, with its tf.data options. Both run on every core this process may
use. Rounds alternate the two pipelines (each round a fresh iterator, 2 warm-up batches not timed), so load
from other processes hits both alike; the table gives the median and the range over rounds.
CIFAR-10 (under `tfds.testing.mock_data`, 50,000 examples) and the offline dataset (the real one) are
measured for this project's pipeline only.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from typing import Callable, Iterator

import numpy as np
from PIL import Image

import attn_flax.data as data
from attn_flax.data import catalog, prepare, testing

TRAIN_BATCH = 128
EVAL_BATCH = 50
WARMUP_BATCHES = 12  # more than either pipeline prefetches, so the timed batches are produced while timed
REFERENCE_CROP_PADDING = 32
REFERENCE_SHUFFLE = 16  # x batch size, as the Flax example


def host_cores() -> int:
    """Cores this process may run on (what both pipelines use)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {host_cores()} cores, Python {platform.python_version()}"


def _photo_pixels(photo: np.ndarray) -> Callable:
    """`make_pixels` for `testing.write_imagenet_archives`: random crops of a photograph, resized and flipped."""
    def make(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
        height, width = photo.shape[:2]
        crop_h, crop_w = int(rng.integers(height // 2, height)), int(rng.integers(width // 2, width))
        top, left = int(rng.integers(0, height - crop_h)), int(rng.integers(0, width - crop_w))
        image = Image.fromarray(photo[top:top + crop_h, left:left + crop_w]).resize(shape[::-1], Image.BICUBIC)
        pixels = np.asarray(image)
        return pixels[:, ::-1] if rng.integers(2) else pixels
    return make


def fabricated_imagenet(work_dir: str, images_per_synset: int = 2, num_val: int = 1500) -> str:
    """Prepares (once per `work_dir`) fabricated 500x375 ImageNet archives as tfrecord plus array_record."""
    import matplotlib.cbook
    import tensorflow_datasets as tfds

    data_dir = os.path.join(work_dir, "tfds")
    builder = tfds.builder("imagenet2012", data_dir=data_dir)
    if not builder.is_prepared():
        manual = os.path.join(work_dir, "manual")
        with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
            photo = np.asarray(Image.open(f).convert("RGB"))
        testing.write_imagenet_archives(manual, images_per_synset=images_per_synset, num_val=num_val,
                                        image_shape=(375, 500), make_pixels=_photo_pixels(photo))
        tfds.builder("imagenet2012", data_dir=data_dir, file_format="tfrecord").download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=manual))
    print(prepare.prepare("imagenet2012", data_dir=data_dir), file=sys.stderr, flush=True)
    return data_dir


# --- The reference: the Flax ImageNet example's input pipeline, written from its description ---

def _reference_normalise(image, dtype):
    import tensorflow as tf

    mean = tf.constant([255.0 * m for m in catalog.IMAGENET_MEAN], shape=[1, 1, 3])
    std = tf.constant([255.0 * s for s in catalog.IMAGENET_STD], shape=[1, 1, 3])
    return tf.image.convert_image_dtype((image - mean) / std, dtype)


def _reference_train_view(encoded, size: int):
    import tensorflow as tf

    shape = tf.image.extract_jpeg_shape(encoded)
    begin, crop, _ = tf.image.sample_distorted_bounding_box(
        shape, bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], tf.float32, [1, 1, 4]), min_object_covered=0.1,
        aspect_ratio_range=(3 / 4, 4 / 3), area_range=(0.08, 1.0), max_attempts=10,
        use_image_if_no_bounding_boxes=True)
    top, left, _ = tf.unstack(begin)
    height, width, _ = tf.unstack(crop)
    image = tf.image.decode_and_crop_jpeg(encoded, tf.stack([top, left, height, width]), channels=3)
    image = tf.image.resize([image], [size, size], method="bicubic")[0]
    return tf.image.random_flip_left_right(image)


def _reference_eval_view(encoded, size: int):
    import tensorflow as tf

    shape = tf.image.extract_jpeg_shape(encoded)
    height, width = shape[0], shape[1]
    side = tf.cast(size / (size + REFERENCE_CROP_PADDING) * tf.cast(tf.minimum(height, width), tf.float32),
                   tf.int32)
    top, left = ((height - side) + 1) // 2, ((width - side) + 1) // 2
    image = tf.image.decode_and_crop_jpeg(encoded, tf.stack([top, left, side, side]), channels=3)
    return tf.image.resize([image], [size, size], method="bicubic")[0]


def reference_batches(data_dir: str, split: str, batch_size: int, size: int = 224, dtype=None) -> Iterator[dict]:
    """The Flax example's tf.data pipeline over the tfrecord files of `data_dir`'s imagenet2012."""
    import tensorflow as tf
    import tensorflow_datasets as tfds

    dtype = dtype or tf.float32
    train = split == "train"
    builder = tfds.builder("imagenet2012", data_dir=data_dir)
    dataset = builder.as_dataset(split=split, decoders={"image": tfds.decode.SkipDecoding()})
    options = tf.data.Options()
    options.threading.private_threadpool_size = 48
    options.threading.max_intra_op_parallelism = 1
    dataset = dataset.with_options(options)
    if train:
        dataset = dataset.repeat().shuffle(REFERENCE_SHUFFLE * batch_size, seed=0)
    view = _reference_train_view if train else _reference_eval_view

    def decode(example):
        return {"image": _reference_normalise(view(example["image"], size), dtype), "label": example["label"]}

    dataset = dataset.map(decode, num_parallel_calls=tf.data.experimental.AUTOTUNE)
    dataset = dataset.batch(batch_size, drop_remainder=True)
    if not train:
        dataset = dataset.repeat()
    return iter(tfds.as_numpy(dataset.prefetch(10)))


# --- Measurement ---

def _rate(make: Callable[[], Iterator[dict]], num_batches: int, warmup: int) -> tuple[float, float]:
    """Images per second of `num_batches` batches of a fresh iterator, after `warmup` untimed ones, and images
    per CPU-second of this process (all its threads) over the same batches: the cost per core, which load
    from other processes on a shared machine does not inflate the way it inflates wall time."""
    batches = make()
    try:
        for _ in range(warmup):
            next(batches)
        start, cpu_start, count = time.perf_counter(), time.process_time(), 0
        for _ in range(num_batches):
            count += len(next(batches)["label"])
        return count / (time.perf_counter() - start), count / (time.process_time() - cpu_start)
    finally:
        close = getattr(batches, "close", None)
        if close is not None:
            close()


def interleaved(pipelines: dict[str, Callable[[], Iterator[dict]]], num_batches: int, rounds: int,
                warmup: int = WARMUP_BATCHES) -> dict[str, dict[str, float]]:
    """Median, min and max images/second of each pipeline over `rounds` rounds that alternate them, and the
    median images per CPU-second ('per_cpu_second')."""
    rates: dict[str, list[tuple[float, float]]] = {name: [] for name in pipelines}
    for r in range(rounds):
        names = list(pipelines) if r % 2 == 0 else list(pipelines)[::-1]
        for name in names:
            rates[name].append(_rate(pipelines[name], num_batches, warmup))
    out = {}
    for name, pairs in rates.items():
        wall, cpu = np.array(pairs).T
        out[name] = {"median": float(np.median(wall)), "min": float(wall.min()), "max": float(wall.max()),
                     "per_cpu_second": float(np.median(cpu)), "per_cpu_second_min": float(cpu.min()),
                     "per_cpu_second_max": float(cpu.max()), "rounds": len(pairs)}
    return out


def imagenet_results(data_dir: str, rounds: int, num_batches: int) -> dict:
    eval_batches_per_pass = data.num_eval_batches("imagenet2012", global_batch_size=EVAL_BATCH, data_dir=data_dir)
    eval_batches = max(1, min(num_batches, eval_batches_per_pass - WARMUP_BATCHES))

    def ours(split: str) -> Callable[[], Iterator[dict]]:
        if split == "train":
            return lambda: data.train_batches("imagenet2012", global_batch_size=TRAIN_BATCH, seed=0,
                                              data_dir=data_dir)
        return lambda: data.eval_batches("imagenet2012", global_batch_size=EVAL_BATCH, data_dir=data_dir)

    def reference(split: str) -> Callable[[], Iterator[dict]]:
        batch = TRAIN_BATCH if split == "train" else EVAL_BATCH
        return lambda: reference_batches(data_dir, split, batch)

    return {split: interleaved({"attn_flax (Grain)": ours(split), "Flax example (tf.data)": reference(split)},
                               num_batches if split == "train" else eval_batches, rounds)
            for split in ("train", "validation")}


def small_results(name: str, rounds: int, num_batches: int, data_dir: str | None) -> dict:
    def train() -> Iterator[dict]:
        return data.train_batches(name, global_batch_size=256, seed=0, data_dir=data_dir)

    def evaluation() -> Iterator[dict]:
        return data.eval_batches(name, global_batch_size=256, data_dir=data_dir)

    eval_batches = min(num_batches, data.num_eval_batches(name, global_batch_size=256, data_dir=data_dir) - 8)
    return {"train": interleaved({"attn_flax (Grain)": train}, num_batches, rounds, 8)["attn_flax (Grain)"],
            "eval": interleaved({"attn_flax (Grain)": evaluation}, eval_batches, rounds, 8)["attn_flax (Grain)"]}


def _span(stats: dict[str, float], per_cpu: bool = False) -> str:
    if per_cpu:
        return f"{stats['per_cpu_second']:,.0f} ({stats['per_cpu_second_min']:,.0f}-{stats['per_cpu_second_max']:,.0f})"
    return f"{stats['median']:,.0f} ({stats['min']:,.0f}-{stats['max']:,.0f})"


def format_table(result: dict) -> str:
    """Markdown tables: ImageNet side by side with the reference, then the small datasets (median, range)."""
    lines = [f"machine: {result['machine']}; {result['date']}; median (min-max) over {result['rounds']} rounds", "",
             f"| ImageNet pipeline | train img/s ({result['cores']} cores) | train img per CPU-s | "
             f"eval img/s ({result['cores']} cores) | eval img per CPU-s |", "|---|---|---|---|---|"]
    imagenet = result["imagenet2012"]
    for name in imagenet["train"]:
        train, val = imagenet["train"][name], imagenet["validation"][name]
        lines.append(f"| {name} | {_span(train)} | {_span(train, True)} | {_span(val)} | {_span(val, True)} |")
    ours, ref = (imagenet["train"][k] for k in ("attn_flax (Grain)", "Flax example (tf.data)"))
    ours_eval, ref_eval = (imagenet["validation"][k] for k in ("attn_flax (Grain)", "Flax example (tf.data)"))
    cpu_ratio = (ours["per_cpu_second"] / ref["per_cpu_second"],
                 ours_eval["per_cpu_second"] / ref_eval["per_cpu_second"])
    wall_ratio = ours["median"] / ref["median"], ours_eval["median"] / ref_eval["median"]
    lines += ["", f"ratio to the reference, per CPU-second: train {cpu_ratio[0]:.2f}x, eval {cpu_ratio[1]:.2f}x; "
                  f"wall: train {wall_ratio[0]:.2f}x, eval {wall_ratio[1]:.2f}x",
              f"host cores one accelerator at 5,000 img/s needs for training: "
              f"{5000 / ours['per_cpu_second']:.1f} with this project's pipeline, "
              f"{5000 / ref['per_cpu_second']:.1f} with the reference"]
    if "cifar10" in result:
        lines += ["", "| dataset (batch 256) | train img/s | eval img/s |", "|---|---|---|"]
        for name in ("cifar10", data.DEFAULT_DATASET):
            lines.append(f"| {name} | {_span(result[name]['train'])} | {_span(result[name]['eval'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="rounds alternating the pipelines")
    parser.add_argument("--batches", type=int, default=12, help="timed ImageNet batches per round")
    parser.add_argument("--small_batches", type=int, default=40, help="timed CIFAR/offline batches per round")
    parser.add_argument("--imagenet_dir", default=None, help="an imagenet2012 prepared as tfrecord + array_record")
    parser.add_argument("--work_dir", default=None, help="where fabricated ImageNet is kept (default: a temp dir)")
    parser.add_argument("--data_dir", default=None, help="TFDS dir of the offline dataset (default TFDS's)")
    parser.add_argument("--skip_small", action="store_true", help="ImageNet only")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the tables")
    args = parser.parse_args(argv)
    result = {"machine": machine(), "cores": host_cores(), "date": time.strftime("%Y-%m-%d"), "rounds": args.rounds}
    with tempfile.TemporaryDirectory() as scratch:
        imagenet_dir = args.imagenet_dir or fabricated_imagenet(args.work_dir or os.path.join(scratch, "imagenet"))
        result["imagenet2012"] = imagenet_results(imagenet_dir, args.rounds, args.batches)
        if not args.skip_small:
            with testing.mock_prepared(os.path.join(scratch, "mock"), 50_000):
                result["cifar10"] = small_results("cifar10", args.rounds, args.small_batches, None)
            result[data.DEFAULT_DATASET] = small_results(data.DEFAULT_DATASET, args.rounds, args.small_batches,
                                                         args.data_dir)
    print(json.dumps(result, indent=1) if args.json else format_table(result), flush=True)
    return result


if __name__ == "__main__":
    main()
