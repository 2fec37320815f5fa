"""ResNets with a pluggable attention module (He et al., CVPR 2016; as built by the CBAM/BAM official code).

The network follows ``MODELS/model_resnet.py`` of the official CBAM/BAM code (Jongchan/attention-module):

- ImageNet stem: conv 7x7 stride 2 -> BN -> ReLU -> max-pool 3x3 stride 2 (padding 1); CIFAR stem: conv 3x3
  stride 1 -> BN -> ReLU, no pool. Four stages of widths 64/128/256/512 and strides 1/2/2/2, global average
  pool, a fully connected classifier.
- Blocks: :class:`BasicBlock` (ResNet-18/34) and :class:`Bottleneck` (ResNet-50/101/152, expansion 4, stride
  on the 3x3 conv). The shortcut is a strided 1x1 conv -> BN when the shape changes.
- Attention placed as the papers place it: a ``'block'`` module (CBAM, SE, ECA) on the residual branch after
  its last BatchNorm and before the addition; a ``'stage'`` module (BAM) after every stage but the last, i.e.
  after stages 1, 2 and 3.

Initialisation as the official code's name-based rule: convs Kaiming-normal fan-out, the classifier
Kaiming-normal fan-in, BN scale 1 and bias 0, every bias 0. The shortcut conv is the exception that rule makes:
its parameter is named ``downsample.0.weight``, which does not contain ``conv``, so it keeps PyTorch's default
uniform init; we do the same. ``zero_init_last_bn`` (off by default, not in the official code) starts every
residual branch at zero (Goyal et al., 2017).

Convolution and normalisation are injected as module factories (``conv``, ``norm``), so a different conv
implementation replaces ``nn.Conv`` without touching the blocks; a block receives its attention as a factory
and never knows which module it holds. Parameter names (the checkpoint format, see ``attn_flax.convert``):
``stem_conv``, ``stem_bn``, ``stage{s}_block{b}/{conv1,bn1,conv2,bn2[,conv3,bn3],downsample_conv,
downsample_bn,attention}``, ``stage{s}_attention`` and ``head``, with stages numbered from 1 and blocks from 0.

Under ``dtype=jnp.bfloat16`` every layer computes in bfloat16 while parameters stay in ``param_dtype``
(float32); pooled reductions run in float32 and the logits are returned in float32 (float64 for a float64 model).
"""
import functools
from typing import Any, Callable, ClassVar, Optional, Sequence

import jax.numpy as jnp
from flax import linen as nn

from attn_flax import ops
from attn_flax import attention as attention_lib
from attn_flax.ops import initializers, reductions

ModuleDef = Any
STEMS = ("imagenet", "cifar")


def _pad(kernel_size: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """PyTorch's symmetric padding k // 2 (Flax's 'SAME' pads asymmetrically under stride 2)."""
    return ((kernel_size // 2, kernel_size // 2),) * 2


class ResidualBlock(nn.Module):
    """The fields every residual block takes; :class:`BasicBlock` and :class:`Bottleneck` add the layers.

    Attributes:
      features: the block's width ("planes"); its output has ``features * expansion`` channels.
      strides: stride of the block's strided conv and of the shortcut.
      conv, norm: conv and BatchNorm factories with everything but features/kernel/strides bound.
      attention: None, or a callable ``attention(name=...)`` returning a module called as ``m(y, train=...)``.
      groups, width_per_group: grouped/wide 3x3 conv (Bottleneck only).
      zero_init_last_bn: initialise the last BN scale to 0 (residual branch starts at zero).
    """

    features: int
    conv: ModuleDef
    norm: ModuleDef
    strides: int = 1
    attention: Optional[Callable[..., nn.Module]] = None
    groups: int = 1
    width_per_group: int = 64
    zero_init_last_bn: bool = False



class BasicBlock(ResidualBlock):
    """Two 3x3 convs (ResNet-18/34): out = ReLU(attention(BN(conv(ReLU(BN(conv(x)))))) + shortcut(x))."""

    expansion: ClassVar[int] = 1

    def __post_init__(self):
        if self.groups != 1 or self.width_per_group != 64:
            raise ValueError("BasicBlock supports only groups=1 and width_per_group=64; use Bottleneck for "
                             f"grouped or wide variants (got {self.groups}, {self.width_per_group})")
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        y = self.conv(self.features, (3, 3), strides=self.strides, padding=_pad(3), name="conv1")(x)
        y = nn.relu(self.norm(name="bn1")(y))
        y = self.conv(self.features, (3, 3), padding=_pad(3), name="conv2")(y)
        y = _last_norm(self, "bn2")(y)
        return _merge(self, x, y, train)


class Bottleneck(ResidualBlock):
    """1x1 reduce, 3x3 (strided, optionally grouped), 1x1 expand by 4 (ResNet-50/101/152, ResNeXt, Wide ResNet).

    The 3x3 conv has ``int(features * width_per_group / 64) * groups`` channels, as torchvision defines
    ResNeXt (``groups=32, width_per_group=4``) and Wide ResNet (``width_per_group=128``); the defaults give
    the official ResNet. Attributes as :class:`ResidualBlock`.
    """

    expansion: ClassVar[int] = 4

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        width = int(self.features * self.width_per_group / 64) * self.groups
        y = self.conv(width, (1, 1), padding=_pad(1), name="conv1")(x)
        y = nn.relu(self.norm(name="bn1")(y))
        y = self.conv(width, (3, 3), strides=self.strides, padding=_pad(3), feature_group_count=self.groups,
                      name="conv2")(y)
        y = nn.relu(self.norm(name="bn2")(y))
        y = self.conv(self.features * self.expansion, (1, 1), padding=_pad(1), name="conv3")(y)
        y = _last_norm(self, "bn3")(y)
        return _merge(self, x, y, train)


def _last_norm(block: nn.Module, name: str) -> nn.Module:
    scale_init = initializers.zeros if block.zero_init_last_bn else initializers.ones
    return block.norm(scale_init=scale_init, name=name, parent=block)


def _merge(block: nn.Module, x: jnp.ndarray, y: jnp.ndarray, train: bool) -> jnp.ndarray:
    """Attention on the residual branch, then the addition and the final ReLU."""
    if block.attention is not None:
        y = block.attention(name="attention", parent=block)(y, train=train)
    out_features = block.features * block.expansion
    if block.strides != 1 or x.shape[-1] != out_features:
        x = block.conv(out_features, (1, 1), strides=block.strides, padding=_pad(1),
                       kernel_init=initializers.torch_default_uniform, name="downsample_conv", parent=block)(x)
        x = block.norm(name="downsample_bn", parent=block)(x)
    return nn.relu(y + x)


class ResNet(nn.Module):
    """A ResNet whose blocks and stage boundaries hold modules from an attention factory.

    Attributes:
      stage_sizes: blocks per stage, e.g. (3, 4, 6, 3) for ResNet-50.
      block_cls: :class:`BasicBlock` or :class:`Bottleneck` (or any block with the same fields).
      num_classes: classifier outputs.
      widths: each stage's block width ("planes"); the stem has ``widths[0]`` channels.
      stem: 'imagenet' (7x7/2 conv + max-pool) or 'cifar' (3x3/1 conv, no pool).
      stem_width: the stem's channels; None gives ``widths[0]``. A widened ResNet keeps 64 (Zagoruyko &
        Komodakis widen the residual blocks only), which gives the CBAM paper's WideResNet-18 counts.
      attention: None, a registered name (``'cbam'``), an :class:`~attn_flax.attention.AttentionFactory`, a module
        class or a ``functools.partial`` of one (see :func:`attn_flax.attention.factory`). A ``'block'``
        attention gives one module per residual block, a ``'stage'`` one after every stage but the last.
      groups, width_per_group: grouped/wide Bottleneck variants (ResNeXt, Wide ResNet).
      zero_init_last_bn: start each block's last BN scale at zero.
      dtype: computation dtype of every layer; param_dtype: parameter dtype. Logits are float32.
      bn_group_size: examples per BatchNorm statistic in training, in the network and in attention modules that
        take ``bn_group_size`` (None: the whole batch, which under a sharded jit is the global batch).
      conv, norm: the convolution and BatchNorm modules (``nn.Conv``/``nn.BatchNorm`` signatures); ``conv`` also
        goes to the attention modules that declare a ``conv`` field (CBAM, BAM, ECA), as ``dtype`` does. The
        default ``attn_flax.ops.Conv`` has ``nn.Conv``'s parameters and forward pass, and on CPU computes its gradients
        as matrix products, which XLA:CPU runs faster than its own conv gradients. The default
        ``attn_flax.ops.BatchNorm`` has ``nn.BatchNorm``'s names and forward pass, and updates the running
        variance with the unbiased batch variance as PyTorch does (``nn.BatchNorm`` stores the biased one).
    """

    stage_sizes: Sequence[int]
    block_cls: ModuleDef
    num_classes: int
    widths: Sequence[int] = (64, 128, 256, 512)
    stem: str = "imagenet"
    stem_width: Optional[int] = None
    attention: attention_lib.AttentionSpec = None
    groups: int = 1
    width_per_group: int = 64
    zero_init_last_bn: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    bn_group_size: Optional[int] = None
    conv: ModuleDef = ops.Conv
    norm: ModuleDef = ops.BatchNorm

    def __post_init__(self):
        if self.stem not in STEMS:
            raise ValueError(f"unknown stem {self.stem!r}; valid stems: {', '.join(STEMS)}")
        attention_lib.factory(self.attention)  # an unknown name or a bad module fails here, not at the first trace
        if len(self.stage_sizes) != len(self.widths):
            raise ValueError(f"stage_sizes {tuple(self.stage_sizes)} and widths {tuple(self.widths)} must have "
                             "the same length")
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        conv, norm = self._layers(train)
        x = jnp.asarray(x, self.dtype)
        x = _stem(self.stem, self.stem_width or self.widths[0], conv, norm)(x)
        x = self._stages(x, conv, norm, train=train)
        return self._head(x)

    def _layers(self, train: bool) -> tuple[ModuleDef, ModuleDef]:
        """The conv and BatchNorm factories every layer of the network is built from (official init, dtypes)."""
        conv = functools.partial(self.conv, use_bias=False, kernel_init=initializers.conv_kaiming_fan_out,
                                 dtype=self.dtype, param_dtype=self.param_dtype)
        groups = {} if self.bn_group_size is None else {"group_size": self.bn_group_size}
        norm = functools.partial(self.norm, use_running_average=not train, momentum=0.9, epsilon=1e-5,
                                 scale_init=initializers.ones, bias_init=initializers.zeros,
                                 dtype=self.dtype, param_dtype=self.param_dtype, **groups)
        return conv, norm

    def _stages(self, x: jnp.ndarray, conv: ModuleDef, norm: ModuleDef, *, train: bool,
                first_strides: int = 1, **block_options: Any) -> jnp.ndarray:
        """The stages of ``block_cls`` blocks (stride 2 opening every stage after the first, ``first_strides``
        opening the first), a block attention in every block, a stage attention after every stage but the last."""
        block_attention, stage_attention = self._attention_factories()
        for s, (num_blocks, width) in enumerate(zip(self.stage_sizes, self.widths), start=1):
            for b in range(num_blocks):
                strides = 1 if b else (first_strides if s == 1 else 2)
                x = self.block_cls(width, conv=conv, norm=norm, strides=strides,
                                   attention=block_attention, groups=self.groups,
                                   width_per_group=self.width_per_group,
                                   zero_init_last_bn=self.zero_init_last_bn,
                                   name=f"stage{s}_block{b}", **block_options)(x, train=train)
            if stage_attention is not None and s < len(self.stage_sizes):
                x = stage_attention(name=f"stage{s}_attention")(x, train=train)
        return x

    def _head(self, x: jnp.ndarray) -> jnp.ndarray:
        """Global average pool and the classifier; float32 logits (float64 for a float64 model)."""
        pooled = reductions.mean(x, (1, 2))
        logits = nn.Dense(self.num_classes, kernel_init=initializers.dense_kaiming_fan_in,
                          bias_init=initializers.zeros, dtype=self.dtype, param_dtype=self.param_dtype,
                          name="head")(pooled)
        return logits.astype(ops.accumulation_dtype(logits.dtype))

    def _attention_factories(self) -> tuple[Optional[Callable[..., nn.Module]], Optional[Callable[..., nn.Module]]]:
        attention = attention_lib.factory(self.attention)
        if attention is None:
            return None, None
        groups = {} if self.bn_group_size is None else {"bn_group_size": self.bn_group_size}
        bound = functools.partial(attention, dtype=self.dtype, param_dtype=self.param_dtype, conv=self.conv,
                                  **groups)
        return (bound, None) if attention.placement == "block" else (None, bound)


def _stem(stem: str, features: int, conv: ModuleDef, norm: ModuleDef) -> Callable[[jnp.ndarray], jnp.ndarray]:
    """The official stems: ImageNet conv 7x7/2 -> BN -> ReLU -> max-pool 3x3/2; CIFAR conv 3x3/1 -> BN -> ReLU."""
    kernel, strides = (7, 2) if stem == "imagenet" else (3, 1)
    stem_conv = conv(features, (kernel, kernel), strides=strides, padding=_pad(kernel), name="stem_conv")
    stem_bn = norm(name="stem_bn")

    def apply(x: jnp.ndarray) -> jnp.ndarray:
        x = nn.relu(stem_bn(stem_conv(x)))
        if stem == "imagenet":
            x = ops.max_pool(x, (3, 3), strides=(2, 2), padding=_pad(3))
        return x

    return apply
