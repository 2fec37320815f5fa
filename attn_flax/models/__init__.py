"""ResNets of the CBAM/BAM papers, built by name with any registered attention.

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
from attn_flax.models.resnet import STEMS, BasicBlock, Bottleneck, ModuleDef, ResNet

ResNet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), block_cls=BasicBlock)
ResNet34 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=BasicBlock)
ResNet50 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=Bottleneck)
ResNet101 = functools.partial(ResNet, stage_sizes=(3, 4, 23, 3), block_cls=Bottleneck)
ResNet152 = functools.partial(ResNet, stage_sizes=(3, 8, 36, 3), block_cls=Bottleneck)
ResNeXt50_32x4d = functools.partial(ResNet50, groups=32, width_per_group=4)
WideResNet50_2 = functools.partial(ResNet50, width_per_group=128)

_MODELS = {
    "resnet18": ResNet18,
    "resnet34": ResNet34,
    "resnet50": ResNet50,
    "resnet101": ResNet101,
    "resnet152": ResNet152,
    "resnext50_32x4d": ResNeXt50_32x4d,
    "wide_resnet50_2": WideResNet50_2,
}
MODEL_NAMES = tuple(_MODELS)


def available() -> tuple[str, ...]:
    """The model names :func:`create_model` accepts."""
    return MODEL_NAMES


def attention_factory(attention: attention_lib.AttentionSpec, **options: Any
                      ) -> Optional[attention_lib.AttentionFactory]:
    """The factory for an attention name, module class, ``functools.partial`` or factory; None or 'none' gives
    None (a plain ResNet). See :func:`attn_flax.attention.factory`."""
    return attention_lib.factory(attention, **options)


def create_model(name: str, *, num_classes: int, attention: attention_lib.AttentionSpec = None,
                 stem: str = "imagenet", dtype: Any = jnp.float32, zero_init_last_bn: bool = False,
                 bn_group_size: Optional[int] = None, **attention_options: Any) -> ResNet:
    """Builds ``name`` (see :func:`available`) with the named attention in the paper's placement.

    ``stem='cifar'`` gives the official CIFAR stem (3x3 conv, no max-pool). ``attention`` is a registered
    name (``attn_flax.attention.available()``), an import path, an ``AttentionFactory``, a module class or a
    ``functools.partial`` of one, or None/'none'; ``attention_options`` go to that module, e.g.
    ``combine='product'`` for BAM as the official code computes it. ``bn_group_size`` computes BatchNorm
    statistics over groups of that many examples in training (None: the whole batch).
    """
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(MODEL_NAMES)}")
    return _MODELS[name](num_classes=num_classes, stem=stem, dtype=dtype, zero_init_last_bn=zero_init_last_bn,
                         bn_group_size=bn_group_size, attention=attention_factory(attention, **attention_options))


__all__ = [
    "MODEL_NAMES", "STEMS", "BasicBlock", "Bottleneck", "ModuleDef", "ResNet", "ResNet18", "ResNet34",
    "ResNet50", "ResNet101", "ResNet152", "ResNeXt50_32x4d", "WideResNet50_2", "WithAttention",
    "attention_factory", "available", "create_model", "with_attention",
]
