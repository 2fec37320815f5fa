"""MobileNet v1 (Howard et al., 2017) with a pluggable attention, as the CBAM and BAM papers' ImageNet tables use it.

The network (paper's Table 1, 224x224 input): a 3x3 stride-2 conv of 32 channels -> BN -> ReLU, then 13
depthwise-separable blocks, each a depthwise 3x3 conv -> BN -> ReLU and a pointwise 1x1 conv -> BN -> ReLU, of
widths 64, 128 (/2), 128, 256 (/2), 256, 512 (/2), 5 x 512, 1024 (/2), 1024; global average pool and a fully
connected classifier. The width multiplier alpha scales every width (the stem's too): :func:`mobilenet_v1`.

The blocks are grouped by resolution into five stages, (1, 2, 2, 6, 2) blocks of widths 64/128/256/512/1024, the
first at stride 1 and every later one opening with a stride-2 block, so :class:`ResNet`'s stage loop, conv/norm
factories, attention placement and head build the network. Where attention goes, as the papers' parameter counts
imply (``docs/models.md`` has the arithmetic):

- a ``'block'`` module (SE, CBAM, ECA) after BOTH the depthwise and the pointwise BN-ReLU of every block: the CBAM
  paper's MobileNet +SE/+CBAM 5.07M from 4.23M is 0.84M of gates, which 26 modules give (0.83M) and 13 after
  the pointwise convs alone do not (0.49M, 4.72M in all);
- a ``'stage'`` module (BAM) after stages 1-4, i.e. before each of the four stride-2 blocks, at 64, 128, 256 and
  512 channels: the BAM paper's 4.32M from 4.23M.

Parameter names: ``stem_conv``, ``stem_bn``, ``stage{s}_block{b}/{conv1,bn1,dw_attention,conv2,bn2,attention}``
(conv1 depthwise, conv2 pointwise), ``stage{s}_attention``, ``head``. Initialisation as :class:`ResNet`'s
factories (convs Kaiming-normal fan-out, classifier Kaiming-normal fan-in, BN scale 1, biases 0).
"""
import functools
from typing import Callable, ClassVar, Optional

import jax.numpy as jnp
from flax import linen as nn

from attn_flax.models.resnet import ResidualBlock, ResNet, _pad

STAGE_SIZES = (1, 2, 2, 6, 2)
WIDTHS = (64, 128, 256, 512, 1024)
STEM_WIDTH = 32


class DepthwiseSeparable(ResidualBlock):
    """Depthwise 3x3 conv -> BN -> ReLU -> [attention] -> pointwise 1x1 conv -> BN -> ReLU -> [attention].

    No shortcut: it takes :class:`ResidualBlock`'s fields only so that :class:`ResNet`'s stage loop builds it.
    ``features`` is the pointwise conv's output width; ``strides`` the depthwise conv's.
    """

    expansion: ClassVar[int] = 1

    def __post_init__(self):
        if self.groups != 1 or self.width_per_group != 64 or self.zero_init_last_bn:
            raise ValueError("a depthwise-separable block takes no groups, width_per_group or zero_init_last_bn "
                             f"(got {self.groups}, {self.width_per_group}, {self.zero_init_last_bn})")
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        channels = x.shape[-1]
        y = self.conv(channels, (3, 3), strides=self.strides, padding=_pad(3), feature_group_count=channels,
                      name="conv1")(x)
        y = nn.relu(self.norm(name="bn1")(y))
        if self.attention is not None:
            y = self.attention(name="dw_attention")(y, train=train)
        y = self.conv(self.features, (1, 1), padding=_pad(1), name="conv2")(y)
        y = nn.relu(self.norm(name="bn2")(y))
        if self.attention is not None:
            y = self.attention(name="attention")(y, train=train)
        return y


class MobileNet(ResNet):
    """MobileNet v1 on :class:`ResNet`'s machinery: its own stem (3x3/2 conv, ``stem_width`` channels), stages of
    :class:`DepthwiseSeparable` blocks, the ResNet head. ``stem`` must be ``'imagenet'`` (a 224x224 network)."""

    stem_width: Optional[int] = STEM_WIDTH

    def __post_init__(self):
        if self.stem != "imagenet":
            raise ValueError(f"MobileNet v1 is an ImageNet network (stem 'imagenet'); got stem={self.stem!r}")
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        conv, norm = self._layers(train)
        x = conv(self.stem_width, (3, 3), strides=2, padding=_pad(3), name="stem_conv")(jnp.asarray(x, self.dtype))
        x = nn.relu(norm(name="stem_bn")(x))
        x = self._stages(x, conv, norm, train=train)
        return self._head(x)


def mobilenet_v1(alpha: float = 1.0) -> Callable[..., MobileNet]:
    """MobileNet v1 with width multiplier ``alpha`` (1.0, 0.75, 0.5, 0.25 in the paper): every width int(w * alpha)."""
    if alpha <= 0:
        raise ValueError(f"the width multiplier alpha must be positive, got {alpha}")
    return functools.partial(MobileNet, stage_sizes=STAGE_SIZES, block_cls=DepthwiseSeparable,
                             widths=tuple(int(w * alpha) for w in WIDTHS), stem_width=int(STEM_WIDTH * alpha))
