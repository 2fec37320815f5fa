"""Pre-activation ResNets for CIFAR: PreResNet (He et al., ECCV 2016), Wide ResNet (Zagoruyko & Komodakis, BMVC 2016).

Both are the CIFAR backbones of the BAM paper's Table 3 (Park et al., BMVC 2018) and share one block, the
pre-activation basic block of "Identity Mappings in Deep Residual Networks":

    y = ReLU(BN(x));  out = attention(conv3x3(dropout(ReLU(BN(conv3x3(y)))))) + shortcut

where the shortcut is ``x`` itself, or a strided 1x1 conv of the pre-activated ``y`` when the shape changes (the
first block of a stage shares its BN-ReLU with the projection, as He et al.'s and Zagoruyko's code do). Nothing
follows the addition; the network ends in BN -> ReLU -> global average pool -> classifier, and starts with a bare
3x3 conv of 16 channels (no BN, no ReLU: the first block pre-activates it).

- PreResNet-d: (d - 2) / 6 blocks per stage, widths 16/32/64 (PreResNet-110: 18 blocks per stage).
- WRN-d-k: (d - 4) / 6 blocks per stage, widths 16k/32k/64k, optional dropout between the two convs (the WRN
  paper's 0.3 on some runs; default 0, as the BAM paper does not mention it).

Attention goes where the ResNet places it: a ``'block'`` module on the residual branch after the second conv and
before the addition (there is no BN there in a pre-activation block), a ``'stage'`` module (BAM) after stages 1
and 2, where the resolution halves. Parameter names follow :mod:`attn_flax.models.resnet`
(``stem_conv``, ``stage{s}_block{b}/{bn1,conv1,bn2,conv2,downsample_conv,attention}``, ``stage{s}_attention``),
plus ``final_bn`` before the pool. Every conv is Kaiming-normal fan-out, as the factories of :class:`ResNet` make
them (the WRN code's choice; these networks have no official checkpoint whose naming rule would say otherwise).
"""
import functools
from typing import Callable, ClassVar, Optional

import jax.numpy as jnp
from flax import linen as nn

from attn_flax.models.resnet import ResidualBlock, ResNet, _pad


class PreActBlock(ResidualBlock):
    """The pre-activation basic block (He et al., 2016, Fig. 1b): BN-ReLU-conv-BN-ReLU-conv plus the shortcut.

    Attributes as :class:`ResidualBlock`, plus ``dropout_rate`` between the two convs (Wide ResNet); dropout
    needs a ``'dropout'`` rng in training when the rate is not 0.
    """

    expansion: ClassVar[int] = 1
    dropout_rate: float = 0.0

    def __post_init__(self):
        if self.groups != 1 or self.width_per_group != 64:
            raise ValueError(f"PreActBlock supports only groups=1 and width_per_group=64 (got {self.groups}, "
                             f"{self.width_per_group})")
        if self.zero_init_last_bn:
            raise ValueError("a pre-activation block ends in a conv, not a BatchNorm: zero_init_last_bn does not "
                             "apply; leave it False")
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        y = nn.relu(self.norm(name="bn1")(x))
        shortcut = x
        if self.strides != 1 or x.shape[-1] != self.features:
            shortcut = self.conv(self.features, (1, 1), strides=self.strides, padding=_pad(1),
                                 name="downsample_conv")(y)
        y = self.conv(self.features, (3, 3), strides=self.strides, padding=_pad(3), name="conv1")(y)
        y = nn.relu(self.norm(name="bn2")(y))
        y = nn.Dropout(self.dropout_rate, deterministic=not train)(y)
        y = self.conv(self.features, (3, 3), padding=_pad(3), name="conv2")(y)
        if self.attention is not None:
            y = self.attention(name="attention")(y, train=train)
        return y + shortcut


class PreActResNet(ResNet):
    """A CIFAR pre-activation ResNet: bare 3x3 stem conv, stages of :class:`PreActBlock`, BN-ReLU, pool, classifier.

    Attributes as :class:`ResNet` (``stem`` must be ``'cifar'``: these are 32x32 networks), plus ``stem_width``
    (16 in both papers, whatever the widening factor) and ``dropout_rate`` for every block.
    """

    stem: str = "cifar"
    stem_width: Optional[int] = 16
    dropout_rate: float = 0.0

    def __post_init__(self):
        if self.stem != "cifar":
            raise ValueError(f"pre-activation ResNets are CIFAR networks (stem 'cifar'); got stem={self.stem!r}")
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        conv, norm = self._layers(train)
        x = conv(self.stem_width, (3, 3), padding=_pad(3), name="stem_conv")(jnp.asarray(x, self.dtype))
        x = self._stages(x, conv, norm, train=train, dropout_rate=self.dropout_rate)
        x = nn.relu(norm(name="final_bn")(x))
        return self._head(x)


def preresnet(depth: int) -> Callable[..., PreActResNet]:
    """PreResNet-``depth`` for CIFAR (He et al., 2016): 6n + 2 layers, n basic pre-activation blocks per stage."""
    if (depth - 2) % 6:
        raise ValueError(f"PreResNet depth must be 6n + 2 (20, 56, 110, ...), got {depth}")
    return functools.partial(PreActResNet, stage_sizes=((depth - 2) // 6,) * 3, block_cls=PreActBlock,
                             widths=(16, 32, 64))


def wide_resnet(depth: int, widen: int) -> Callable[..., PreActResNet]:
    """WRN-``depth``-``widen`` for CIFAR (Zagoruyko & Komodakis, 2016): (d - 4) / 6 blocks per stage, widths
    16k/32k/64k."""
    if (depth - 4) % 6:
        raise ValueError(f"Wide ResNet depth must be 6n + 4 (16, 22, 28, 40, ...), got {depth}")
    return functools.partial(PreActResNet, stage_sizes=((depth - 4) // 6,) * 3, block_cls=PreActBlock,
                             widths=(16 * widen, 32 * widen, 64 * widen))
