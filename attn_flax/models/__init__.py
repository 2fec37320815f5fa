"""The backbones of the CBAM/BAM papers' tables, built by name with any registered attention.

ResNets and ResNeXts (:mod:`.resnet`), CIFAR pre-activation ResNets and Wide ResNets (:mod:`.preact`), MobileNet v1
(:mod:`.mobilenet`). CIFAR-only and ImageNet-only networks carry their stem in :data:`STEM_OF`; asking one for the
other stem fails in one line.

    >>> from attn_flax import models
    >>> model = models.create_model('resnet50', num_classes=1000, attention='cbam')
    >>> variables = model.init(rng, images, train=False)          # images: [N, H, W, 3]
    >>> logits = model.apply(variables, images, train=False)        # [N, 1000], float32

Variants are one ``functools.partial`` of :class:`ResNet` away, e.g. a ResNeXt:
``functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=Bottleneck, groups=32, width_per_group=4)``.

A network of your own takes attention without editing its code (:mod:`attn_flax.models.insertion`):

    >>> model = models.with_attention(MyNet(), 'cbam', after='Block_*')   # after each Block_i's output
"""
import functools
from typing import Any, Optional

import jax.numpy as jnp

from attn_flax import attention as attention_lib
from attn_flax.models.insertion import WithAttention, with_attention
from attn_flax.models.mobilenet import DepthwiseSeparable, MobileNet, mobilenet_v1
from attn_flax.models.preact import PreActBlock, PreActResNet, preresnet, wide_resnet
from attn_flax.models.resnet import STEMS, BasicBlock, Bottleneck, ModuleDef, ResNet

ResNet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), block_cls=BasicBlock)
ResNet34 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=BasicBlock)
ResNet50 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=Bottleneck)
ResNet101 = functools.partial(ResNet, stage_sizes=(3, 4, 23, 3), block_cls=Bottleneck)
ResNet152 = functools.partial(ResNet, stage_sizes=(3, 8, 36, 3), block_cls=Bottleneck)
ResNeXt50_32x4d = functools.partial(ResNet50, groups=32, width_per_group=4)
ResNeXt101_32x4d = functools.partial(ResNet101, groups=32, width_per_group=4)
WideResNet50_2 = functools.partial(ResNet50, width_per_group=128)
# The CBAM paper's ImageNet WideResNet-18 (widen 1.5 and 2.0): ResNet-18 with every block width scaled and the
# 64-channel stem kept, as Zagoruyko & Komodakis widen a ResNet (the paper's 25.88M and 45.62M; widening the stem
# too would give 25.90M and 45.69M).
WideResNet18_1_5 = functools.partial(ResNet18, widths=(96, 192, 384, 768), stem_width=64)
WideResNet18_2 = functools.partial(ResNet18, widths=(128, 256, 512, 1024), stem_width=64)
# ResNeXt-29 for CIFAR (Xie et al., 2017, Sec. 5.3): 3 stages of 3 bottlenecks, outputs 256/512/1024, cardinality
# 8 or 16 of width 64 in the first stage (doubling with the stage), the 3x3 CIFAR stem of 64 channels.
ResNeXt29_8x64d = functools.partial(ResNet, stage_sizes=(3, 3, 3), block_cls=Bottleneck, widths=(64, 128, 256),
                                    groups=8, width_per_group=64)
ResNeXt29_16x64d = functools.partial(ResNeXt29_8x64d, groups=16)
PreResNet56 = preresnet(56)
PreResNet110 = preresnet(110)
WRN16_8 = wide_resnet(16, 8)
WRN28_8 = wide_resnet(28, 8)
WRN28_10 = wide_resnet(28, 10)
MobileNetV1 = mobilenet_v1(1.0)

_MODELS = {
    "resnet18": ResNet18,
    "resnet34": ResNet34,
    "resnet50": ResNet50,
    "resnet101": ResNet101,
    "resnet152": ResNet152,
    "resnext50_32x4d": ResNeXt50_32x4d,
    "resnext101_32x4d": ResNeXt101_32x4d,
    "wide_resnet50_2": WideResNet50_2,
    "wrn18_1_5": WideResNet18_1_5,
    "wrn18_2": WideResNet18_2,
    "mobilenet_v1": MobileNetV1,
    "resnext29_8x64d": ResNeXt29_8x64d,
    "resnext29_16x64d": ResNeXt29_16x64d,
    "preresnet56": PreResNet56,
    "preresnet110": PreResNet110,
    "wrn16_8": WRN16_8,
    "wrn28_8": WRN28_8,
    "wrn28_10": WRN28_10,
}
MODEL_NAMES = tuple(_MODELS)
STEM_OF = {"mobilenet_v1": "imagenet", "wrn18_1_5": "imagenet", "wrn18_2": "imagenet",
           "resnext101_32x4d": "imagenet", "resnext29_8x64d": "cifar", "resnext29_16x64d": "cifar",
           "preresnet56": "cifar", "preresnet110": "cifar", "wrn16_8": "cifar", "wrn28_8": "cifar",
           "wrn28_10": "cifar"}
"""The networks built for one input size only: CIFAR (32x32, stem 'cifar') or ImageNet (224x224, 'imagenet'), as
their papers define them. The ResNets take either stem."""
_DATASET_OF_STEM = {"cifar": "CIFAR", "imagenet": "ImageNet"}


def available() -> tuple[str, ...]:
    """The model names :func:`create_model` accepts."""
    return MODEL_NAMES


def attention_factory(attention: attention_lib.AttentionSpec, **options: Any
                      ) -> Optional[attention_lib.AttentionFactory]:
    """The factory for an attention name, module class, ``functools.partial`` or factory; None or 'none' gives
    None (a plain ResNet). See :func:`attn_flax.attention.factory`."""
    return attention_lib.factory(attention, **options)


def create_model(name: str, *, num_classes: int, attention: attention_lib.AttentionSpec = None,
                 stem: Optional[str] = None, dtype: Any = jnp.float32, zero_init_last_bn: bool = False,
                 bn_group_size: Optional[int] = None, **attention_options: Any) -> ResNet:
    """Builds ``name`` (see :func:`available`) with the named attention in the paper's placement.

    ``stem`` None is the network's own (:data:`STEM_OF`; 'imagenet' for the ResNets); ``stem='cifar'`` gives a
    ResNet the official CIFAR stem (3x3 conv, no max-pool). A CIFAR-only network asked for the ImageNet stem, or
    the reverse, raises ValueError. ``attention`` is a registered
    name (``attn_flax.attention.available()``), an import path, an ``AttentionFactory``, a module class or a
    ``functools.partial`` of one, or None/'none'; ``attention_options`` go to that module, e.g.
    ``combine='product'`` for BAM as the official code computes it. ``bn_group_size`` computes BatchNorm
    statistics over groups of that many examples in training (None: the whole batch).
    """
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(MODEL_NAMES)}")
    own = STEM_OF.get(name)
    if stem is None:
        stem = own or "imagenet"
    elif own is not None and stem != own:
        config = "configs/cifar100.py" if own == "cifar" else "configs/imagenet.py"
        raise ValueError(f"{name} is a network for {_DATASET_OF_STEM[own]} only (stem {own!r}) and cannot take "
                         f"stem {stem!r}; use it with a config such as {config}")
    return _MODELS[name](num_classes=num_classes, stem=stem, dtype=dtype, zero_init_last_bn=zero_init_last_bn,
                         bn_group_size=bn_group_size, attention=attention_factory(attention, **attention_options))


__all__ = [
    "MODEL_NAMES", "STEMS", "STEM_OF", "BasicBlock", "Bottleneck", "DepthwiseSeparable", "MobileNet", "MobileNetV1",
    "ModuleDef", "PreActBlock", "PreActResNet", "PreResNet56", "PreResNet110", "ResNet", "ResNet18", "ResNet34",
    "ResNet50", "ResNet101", "ResNet152", "ResNeXt29_8x64d", "ResNeXt29_16x64d", "ResNeXt50_32x4d",
    "ResNeXt101_32x4d", "WRN16_8", "WRN28_8", "WRN28_10", "WideResNet18_1_5", "WideResNet18_2", "WideResNet50_2",
    "WithAttention", "attention_factory", "available", "create_model", "mobilenet_v1", "preresnet", "wide_resnet",
    "with_attention",
]
