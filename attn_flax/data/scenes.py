"""Cluttered-scene images for the offline dataset: one shape to find among distractors.

Each 32x32 RGB scene holds one object whose *shape* is the class (ten shapes, all symmetric under a
left-right flip so that flip augmentation keeps the label), drawn at a random position, a random size
of 8-16 pixels and a random colour, on a smooth random background with 4-9 small distractors (thin
line segments and dots, never one of the class shapes). Colour and position carry no information
about the class, so a network must find the object before it can name it. Scenes are drawn in
fixed-size chunks, each from its own NumPy generator seeded with (seed, split, chunk), so any prefix
of a split is reproducible on its own and different splits use independent streams.
"""
from __future__ import annotations

import numpy as np

IMAGE_SIZE = 32
CHUNK_SIZE = 250
CLASS_NAMES = (
    "square", "disk", "triangle", "plus", "ring", "diamond", "x_cross", "tee", "frame", "letter_h",
)
SPLIT_STREAMS = {"train": 0, "test": 1}

_SUPERSAMPLE = 2
_MIN_SIDE, _MAX_SIDE = 8.0, 16.0
_MAX_DISTRACTORS = 9
_WINDOW = 12


def _class_mask(k: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Coverage of class shape k at object coordinates (u, v), both in [-1, 1] across the object."""
    au, av = np.abs(u), np.abs(v)
    box = np.maximum(au, av) <= 1.0
    if k in (1, 4):
        radius = np.sqrt(u * u + v * v)
        return radius <= 1.0 if k == 1 else (radius <= 1.0) & (radius >= 0.55)
    masks = {
        0: lambda: box,
        2: lambda: (av <= 1.0) & (au <= (v + 1.0) / 2.0),
        3: lambda: box & ((au <= 0.3) | (av <= 0.3)),
        5: lambda: au + av <= 1.0,
        6: lambda: box & ((np.abs(u - v) <= 0.45) | (np.abs(u + v) <= 0.45)),
        7: lambda: box & ((v <= -0.45) | (au <= 0.3)),
        8: lambda: box & (np.maximum(au, av) >= 0.55),
        9: lambda: box & ((au >= 0.6) | (av <= 0.25)),
    }
    return masks[k]()


def _shape_mask(label: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Coverage of each image's own class shape; u is [n, 1, W] and v is [n, H, 1]."""
    out = np.zeros((label.shape[0], v.shape[1], u.shape[2]), dtype=bool)
    for k in range(len(CLASS_NAMES)):
        rows = np.flatnonzero(label == k)
        if rows.size:
            out[rows] = _class_mask(k, u[rows], v[rows])
    return out


def _background(rng: np.random.Generator, n: int) -> np.ndarray:
    """Smooth random colour fields: a 4x4 grid of colours upsampled bilinearly, plus a mean colour."""
    grid = rng.uniform(-0.25, 0.25, size=(n, 4, 4, 3)).astype(np.float32)
    base = rng.uniform(0.2, 0.8, size=(n, 1, 1, 3)).astype(np.float32)
    coords = np.linspace(0.0, 3.0, IMAGE_SIZE, dtype=np.float32)
    lo = np.minimum(np.floor(coords).astype(int), 2)
    frac = coords - lo
    rows = grid[:, lo] * (1 - frac)[None, :, None, None] + grid[:, lo + 1] * frac[None, :, None, None]
    cols = rows[:, :, lo] * (1 - frac)[None, None, :, None] + rows[:, :, lo + 1] * frac[None, None, :, None]
    return np.clip(base + cols, 0.0, 1.0)


def _paint(image: np.ndarray, coverage: np.ndarray, colour: np.ndarray) -> np.ndarray:
    """Alpha-blends a colour into images with per-pixel coverage in [0, 1]."""
    alpha = coverage[..., None]
    return image * (1.0 - alpha) + colour[:, None, None, :] * alpha


def _downsample(mask: np.ndarray) -> np.ndarray:
    """Averages supersampled boolean masks back to the image grid (anti-aliased coverage)."""
    n, h, w = mask.shape
    s = _SUPERSAMPLE
    return mask.reshape(n, h // s, s, w // s, s).mean(axis=(2, 4), dtype=np.float32)


def _distractor_coverage(rng: np.random.Generator, n: int) -> np.ndarray:
    """Coverage of one distractor per image, in a local window: a thin segment of 4-9 px or a dot."""
    is_line = rng.random(n) < 0.6
    angle = rng.uniform(0, np.pi, size=n).astype(np.float32)
    half = rng.uniform(2.0, 4.5, size=n).astype(np.float32)[:, None, None]
    radius = rng.uniform(0.75, 1.5, size=n).astype(np.float32)[:, None, None]
    dy, dx = np.sin(angle)[:, None, None], np.cos(angle)[:, None, None]
    centre = _WINDOW / 2
    grid = (np.arange(_WINDOW * _SUPERSAMPLE, dtype=np.float32) + 0.5) / _SUPERSAMPLE - centre
    ry, rx = grid[None, :, None], grid[None, None, :]
    along = np.clip(ry * dy + rx * dx, -half, half)
    line = np.hypot(ry - along * dy, rx - along * dx) <= 0.55
    dot = np.hypot(ry, rx) <= radius
    return _downsample(np.where(is_line[:, None, None], line, dot))


def _paint_distractors(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """Paints 4-9 random-colour distractors per image at uniform random positions."""
    n = image.shape[0]
    pad = _WINDOW // 2
    canvas = np.pad(image, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    count = rng.integers(4, _MAX_DISTRACTORS + 1, size=n)
    rows = np.arange(n)[:, None, None]
    offsets = np.arange(_WINDOW)
    for k in range(_MAX_DISTRACTORS):
        coverage = _distractor_coverage(rng, n) * (k < count)[:, None, None]
        colour = rng.uniform(0, 1, size=(n, 3)).astype(np.float32)
        top, left = rng.integers(0, IMAGE_SIZE, size=(2, n))
        ys = (top[:, None] + offsets)[:, :, None]
        xs = (left[:, None] + offsets)[:, None, :]
        canvas[rows, ys, xs] = _paint(canvas[rows, ys, xs], coverage, colour)
    return canvas[:, pad:pad + IMAGE_SIZE, pad:pad + IMAGE_SIZE]


def _object_colour(rng: np.random.Generator, background_mean: np.ndarray) -> np.ndarray:
    """Random colours at least 0.45 (Euclidean, RGB in [0, 1]) away from each scene's mean background."""
    n = background_mean.shape[0]
    colour = rng.uniform(0, 1, size=(n, 3)).astype(np.float32)
    for _ in range(20):
        close = np.linalg.norm(colour - background_mean, axis=-1) < 0.45
        if not close.any():
            break
        colour[close] = rng.uniform(0, 1, size=(int(close.sum()), 3))
    return colour


def render_chunk(seed: int, split: str, chunk: int, count: int = CHUNK_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Draws scenes `chunk*CHUNK_SIZE ...` of a split: uint8 images [count, 32, 32, 3] and int64 labels."""
    rng = np.random.default_rng([seed, SPLIT_STREAMS[split], chunk])
    n = count
    labels = rng.integers(0, len(CLASS_NAMES), size=n)
    image = _background(rng, n)
    grid = (np.arange(IMAGE_SIZE * _SUPERSAMPLE, dtype=np.float32) + 0.5) / _SUPERSAMPLE
    y, x = grid[None, :, None], grid[None, None, :]
    image = _paint_distractors(rng, image)
    side = rng.uniform(_MIN_SIDE, _MAX_SIDE, size=n).astype(np.float32)
    half_h = side / 2 * rng.uniform(0.85, 1.15, size=n)
    half_w = side / 2 * rng.uniform(0.85, 1.15, size=n)
    cy = rng.uniform(half_h, IMAGE_SIZE - half_h)
    cx = rng.uniform(half_w, IMAGE_SIZE - half_w)
    u = ((x - cx[:, None, None]) / half_w[:, None, None]).astype(np.float32)
    v = ((y - cy[:, None, None]) / half_h[:, None, None]).astype(np.float32)
    coverage = _downsample(_shape_mask(labels, u, v))
    image = _paint(image, coverage, _object_colour(rng, image.mean(axis=(1, 2))))
    noise = rng.normal(0, 0.03, size=image.shape).astype(np.float32)
    pixels = np.clip(np.rint((image + noise) * 255.0), 0, 255).astype(np.uint8)
    return pixels, labels.astype(np.int64)


def render_split(seed: int, split: str, num_examples: int) -> tuple[np.ndarray, np.ndarray]:
    """Draws the first `num_examples` scenes of a split, chunk by chunk (a prefix of any larger split)."""
    images, labels = [], []
    for chunk, start in enumerate(range(0, num_examples, CHUNK_SIZE)):
        chunk_images, chunk_labels = render_chunk(seed, split, chunk)
        take = min(CHUNK_SIZE, num_examples - start)
        images.append(chunk_images[:take])
        labels.append(chunk_labels[:take])
    return np.concatenate(images), np.concatenate(labels)
