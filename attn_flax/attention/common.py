"""Helpers shared by the attention modules; no module imports another attention module for them.

timm keeps its ``make_divisible`` in a neutral ``layers/helpers.py`` for the same reason: SE, CBAM and BAM all size
their reduction MLPs with :func:`hidden_width`, and none of them should depend on another.
"""


def hidden_width(channels: int, reduction: int) -> int:
    """Width of a reduction MLP: C // r as the official code, but never zero on narrow test networks."""
    return max(channels // reduction, 1)
