"""ImageNet-style views of encoded images in Pillow and NumPy: random-area crop for training, centre crop for eval.

Both views read only the window they need: the crop box is computed from the image header, the JPEG is decoded
at the smallest DCT scale (1, 1/2, 1/4, 1/8; Pillow's `draft`) that still covers the box at the output size,
and the box is resized straight to `size` x `size` (bilinear, antialiased on downscaling: the filter of the
official PyTorch recipe, torchvision's `RandomResizedCrop` / `Resize` on PIL images). Evaluation takes the
window that "resize the shorter side to 256, take the central 224" would keep, without materialising the
256-side image. Training randomness (Szegedy et al., 2015: area 8-100 %, aspect ratio 3/4-4/3, 10 attempts,
then the whole image; flip half) comes from a counter-based hash of (seed, stream position), so an example's
view is a pure function of where it sits in the stream and a resumed stream repeats it exactly.

No TensorFlow here: this module runs in Grain's reader threads and worker processes, and Pillow releases the
GIL while it decodes and resizes.
"""
from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image

from attn_flax.data import preprocess

AREA_RANGE = (0.08, 1.0)
ASPECT_RANGE = (3.0 / 4.0, 4.0 / 3.0)
MAX_ATTEMPTS = 10
EVAL_RESIZE = 256
EVAL_CROP = 224

Box = tuple[float, float, float, float]
"""A window of the image as (left, top, right, bottom) in pixels, Pillow's order."""


def _uniform(seed: int, position: int, stream: int) -> float:
    """A float in [0, 1) that depends only on (seed, position, stream)."""
    bits = preprocess.random_bits(seed, np.array([position], np.int64), stream)[0]
    return float(bits >> np.uint64(11)) * 2.0 ** -53


def random_crop_box(width: int, height: int, seed: int, position: int) -> Box:
    """The training window: 8-100 % of the area at aspect ratio 3/4-4/3, placed uniformly at random.

    Up to 10 (area, ratio) draws; the first that fits inside the image wins, else the whole image (as
    `tf.image.sample_distorted_bounding_box` and the Flax example fall back).
    """
    log_low, log_high = math.log(ASPECT_RANGE[0]), math.log(ASPECT_RANGE[1])
    for attempt in range(MAX_ATTEMPTS):
        stream = 16 + 4 * attempt
        area = width * height * (AREA_RANGE[0] + (AREA_RANGE[1] - AREA_RANGE[0]) * _uniform(seed, position, stream))
        ratio = math.exp(log_low + (log_high - log_low) * _uniform(seed, position, stream + 1))
        crop_width = round(math.sqrt(area * ratio))
        crop_height = round(math.sqrt(area / ratio))
        if 0 < crop_width <= width and 0 < crop_height <= height:
            left = math.floor(_uniform(seed, position, stream + 2) * (width - crop_width + 1))
            top = math.floor(_uniform(seed, position, stream + 3) * (height - crop_height + 1))
            return float(left), float(top), float(left + crop_width), float(top + crop_height)
    return 0.0, 0.0, float(width), float(height)


def center_crop_box(width: int, height: int, size: int = EVAL_CROP) -> Box:
    """The window kept by "resize the shorter side to round(size * 256 / 224), take the central size x size"."""
    side = min(width, height) * size / round(size * EVAL_RESIZE / EVAL_CROP)
    left, top = (width - side) / 2.0, (height - side) / 2.0
    return left, top, left + side, top + side


def flips(seed: int, position: int) -> bool:
    """Whether the training view at this stream position is mirrored left-right (half of them)."""
    return _uniform(seed, position, 2) >= 0.5


def _open(encoded: bytes) -> Image.Image:
    try:
        return Image.open(io.BytesIO(encoded))
    except Exception as error:  # Pillow raises UnidentifiedImageError, OSError, ...
        raise ValueError(f"an example's image could not be decoded ({error}); the dataset files may be "
                         "corrupt: prepare it again") from None


def crop_resize(image: Image.Image, box: Box, size: int) -> np.ndarray:
    """`box` of `image` resized to size x size RGB uint8, decoding a JPEG at the coarsest DCT scale that keeps
    at least `size` pixels across the box (Pillow's `draft`)."""
    width, height = image.size
    left, top, right, bottom = box
    wanted = (math.ceil(width * size / (right - left)), math.ceil(height * size / (bottom - top)))
    if image.format == "JPEG":
        image.draft(image.mode, wanted)
    scale_x, scale_y = image.size[0] / width, image.size[1] / height
    image = image.convert("RGB")
    scaled = (left * scale_x, top * scale_y, right * scale_x, bottom * scale_y)
    return np.asarray(image.resize((size, size), Image.BILINEAR, box=scaled))


def decode_random_crop(encoded: bytes, seed: int, position: int, size: int) -> np.ndarray:
    """Training view of one encoded image: random-area crop resized to size x size, flipped half the time."""
    image = _open(encoded)
    pixels = crop_resize(image, random_crop_box(*image.size, seed, position), size)
    return pixels[:, ::-1] if flips(seed, position) else pixels


def decode_center_crop(encoded: bytes, size: int) -> np.ndarray:
    """Evaluation view of one encoded image: the central crop of the 256-side resize, as size x size uint8."""
    image = _open(encoded)
    return crop_resize(image, center_crop_box(*image.size, size), size)
