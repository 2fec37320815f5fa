"""ImageNet-style views of encoded images in TensorFlow: random-area crop for training, centre crop for eval.

Both views decode only the window they keep (`tf.image.decode_and_crop_jpeg`: rows below the window are not
decoded, columns outside it are not transformed) and resize it straight to `size` x `size` with bicubic
interpolation: the views of the Flax ImageNet example, whose pipeline is the throughput reference
(`attn_flax.data.benchmark`). Training: a window of 8-100 % of the area at aspect ratio 3/4-4/3 (Szegedy et
al., 2015; `sample_distorted_bounding_box`, 10 attempts, then the whole image), flipped half the time; all of
its randomness is stateless, seeded by (seed, stream position), so an example's view is a pure function of
where it sits in the stream and a resumed stream repeats it exactly. Evaluation: the central square of side
224/256 of the shorter side, i.e. the window "resize the shorter side to 256, take the central 224" keeps.
Non-JPEG encodings (PNG datasets on the generic path) are decoded whole, then cropped.
"""
from __future__ import annotations

from typing import Sequence

import tensorflow as tf

AREA_RANGE = (0.08, 1.0)
ASPECT_RANGE = (3.0 / 4.0, 4.0 / 3.0)
EVAL_RESIZE = 256
EVAL_CROP = 224
RESIZE_METHOD = "bicubic"


def _shape(encoded: tf.Tensor, is_jpeg: bool) -> tf.Tensor:
    if is_jpeg:
        return tf.image.extract_jpeg_shape(encoded)[:2]
    return tf.shape(tf.io.decode_image(encoded, channels=3, expand_animations=False))[:2]


def _decode_window(encoded: tf.Tensor, window: tf.Tensor, is_jpeg: bool) -> tf.Tensor:
    """The [top, left, height, width] window of the image as uint8 RGB, decoding as little as the format allows."""
    if is_jpeg:
        return tf.image.decode_and_crop_jpeg(encoded, window, channels=3)
    image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    return tf.slice(image, [window[0], window[1], 0], [window[2], window[3], 3])


def random_crop_window(image_shape: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """[top, left, height, width] of a crop covering 8-100% of the area with aspect ratio 3/4-4/3."""
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.concat([image_shape, [3]], 0),
        bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], tf.float32, [1, 1, 4]),
        seed=seed,
        min_object_covered=0.1,
        aspect_ratio_range=ASPECT_RANGE,
        area_range=AREA_RANGE,
        max_attempts=10,
        use_image_if_no_bounding_boxes=True,
    )
    return tf.stack([begin[0], begin[1], size[0], size[1]])


def center_crop_window(image_shape: tf.Tensor, size: int = EVAL_CROP) -> tf.Tensor:
    """[top, left, side, side] of the central square of side size/round(size*256/224) of the shorter side."""
    height, width = image_shape[0], image_shape[1]
    fraction = size / round(size * EVAL_RESIZE / EVAL_CROP)
    side = tf.cast(fraction * tf.cast(tf.minimum(height, width), tf.float32), tf.int32)
    return tf.stack([(height - side + 1) // 2, (width - side + 1) // 2, side, side])


def _resize(image: tf.Tensor, size: int) -> tf.Tensor:
    """Bicubic resize to size x size, float32; like the reference, not clipped (bicubic overshoots 0-255 a little
    near sharp edges; clipping costs about 8% of the view's CPU time)."""
    return tf.image.resize(image, [size, size], method=RESIZE_METHOD)


def decode_random_crop(encoded: tf.Tensor, seed: tf.Tensor, size: int, is_jpeg: bool = True) -> tf.Tensor:
    """Training view: the random-area window decoded, resized to size x size (float32), flipped half the time;
    `seed` is a [2] int64 tensor, e.g. (run seed, stream position)."""
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, num=2))
    window = random_crop_window(_shape(encoded, is_jpeg), crop_seed)
    image = _resize(_decode_window(encoded, window, is_jpeg), size)
    return tf.image.stateless_random_flip_left_right(image, flip_seed)


def decode_center_crop(encoded: tf.Tensor, size: int, is_jpeg: bool = True) -> tf.Tensor:
    """Evaluation view: the central window decoded and resized to size x size (float32)."""
    window = center_crop_window(_shape(encoded, is_jpeg), size)
    return _resize(_decode_window(encoded, window, is_jpeg), size)


def normalise(image: tf.Tensor, mean: Sequence[float], std: Sequence[float]) -> tf.Tensor:
    """(pixels / 255 - mean) / std per channel, float32."""
    scale = tf.constant([1.0 / (255.0 * s) for s in std], tf.float32)
    offset = tf.constant([m / s for m, s in zip(mean, std)], tf.float32)
    return tf.cast(image, tf.float32) * scale - offset
