"""ImageNet-style preprocessing of encoded images in TensorFlow: random-area crop and center crop.

Training decodes only the sampled crop window of a JPEG (`tf.image.decode_and_crop_jpeg`), resizes it
to `size` and flips half the images; all randomness is stateless, seeded per example, so a stream
can resume exactly. Evaluation resizes the shorter side to 256 and takes the central 224 x 224.
Non-JPEG encodings (PNG datasets on the generic path) are decoded whole, then cropped.
"""
from __future__ import annotations

from typing import Sequence

import tensorflow as tf

AREA_RANGE = (0.08, 1.0)
ASPECT_RANGE = (3.0 / 4.0, 4.0 / 3.0)
EVAL_RESIZE = 256


def _shape(encoded: tf.Tensor, is_jpeg: bool) -> tf.Tensor:
    if is_jpeg:
        return tf.image.extract_jpeg_shape(encoded)
    return tf.shape(tf.io.decode_image(encoded, channels=3, expand_animations=False))


def _decode(encoded: tf.Tensor, is_jpeg: bool) -> tf.Tensor:
    if is_jpeg:
        return tf.io.decode_jpeg(encoded, channels=3)
    return tf.io.decode_image(encoded, channels=3, expand_animations=False)


def random_crop_window(image_shape: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """[top, left, height, width] of a crop covering 8-100% of the area with aspect ratio 3/4-4/3."""
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        image_shape,
        bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], tf.float32, [1, 1, 4]),
        seed=seed,
        min_object_covered=0.1,
        aspect_ratio_range=ASPECT_RANGE,
        area_range=AREA_RANGE,
        max_attempts=10,
        use_image_if_no_bounding_boxes=True,
    )
    return tf.stack([begin[0], begin[1], size[0], size[1]])


def decode_random_crop(encoded: tf.Tensor, seed: tf.Tensor, size: int, is_jpeg: bool) -> tf.Tensor:
    """Training view: random-area crop decoded with the JPEG, resized to size x size, random flip."""
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, num=2))
    window = random_crop_window(_shape(encoded, is_jpeg), crop_seed)
    if is_jpeg:
        crop = tf.image.decode_and_crop_jpeg(encoded, window, channels=3)
    else:
        crop = tf.slice(_decode(encoded, False), [window[0], window[1], 0], [window[2], window[3], 3])
    image = tf.image.resize(crop, [size, size], method="bilinear", antialias=True)
    return tf.image.stateless_random_flip_left_right(image, flip_seed)


def resize_shorter_side(image: tf.Tensor, side: int) -> tf.Tensor:
    """Resizes (bilinear, antialiased) so that the shorter side is `side`, keeping the aspect ratio."""
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = side / tf.reduce_min(shape)
    new_shape = tf.cast(tf.round(shape * scale), tf.int32)
    new_shape = tf.maximum(new_shape, side)
    return tf.image.resize(image, new_shape, method="bilinear", antialias=True)


def center_crop(image: tf.Tensor, size: int) -> tf.Tensor:
    """The central size x size window (top/left offsets rounded down)."""
    shape = tf.shape(image)
    top, left = (shape[0] - size) // 2, (shape[1] - size) // 2
    return image[top:top + size, left:left + size]


def decode_center_crop(encoded: tf.Tensor, size: int, is_jpeg: bool) -> tf.Tensor:
    """Evaluation view: shorter side resized to 256 (scaled with `size`), then the central crop."""
    resize_side = round(size * EVAL_RESIZE / 224)
    image = resize_shorter_side(tf.cast(_decode(encoded, is_jpeg), tf.float32), resize_side)
    return center_crop(image, size)


def normalise(image: tf.Tensor, mean: Sequence[float], std: Sequence[float]) -> tf.Tensor:
    """(pixels / 255 - mean) / std per channel, float32."""
    mean = tf.constant(mean, tf.float32)
    std = tf.constant(std, tf.float32)
    return (tf.cast(image, tf.float32) / 255.0 - mean) / std
