"""The attention registry: a short name -> a module class and where it goes in a network.

A network never imports an attention class. It receives an :class:`AttentionFactory` (from :func:`factory`)
and asks it for fresh modules; ``factory.placement`` says whether one goes inside every residual block
(``'block'``: SE, ECA, CBAM) or once after each of the first stages (``'stage'``: BAM at the bottlenecks).
Users add their own module with :func:`register`; it must accept ``__call__(x, *, train)`` on NHWC input and
return the same shape.
"""
import dataclasses
from typing import Any, Callable, Literal

from flax import linen as nn

Placement = Literal["block", "stage"]
PLACEMENTS = ("block", "stage")


@dataclasses.dataclass(frozen=True)
class _Entry:
    module_cls: Callable[..., nn.Module]
    placement: Placement


_REGISTRY: dict[str, _Entry] = {}


def register(name: str, module_cls: Callable[..., nn.Module], *, placement: Placement,
             overwrite: bool = False) -> None:
    """Registers ``module_cls`` under ``name``, placed in every residual block or at stage boundaries."""
    if placement not in PLACEMENTS:
        raise ValueError(f"placement {placement!r} is not one of {', '.join(PLACEMENTS)}")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"attention {name!r} is already registered; pass overwrite=True to replace it")
    _REGISTRY[name] = _Entry(module_cls, placement)


def available() -> tuple[str, ...]:
    """The registered attention names, sorted."""
    return tuple(sorted(_REGISTRY))


def _entry(name: str) -> _Entry:
    if name not in _REGISTRY:
        raise ValueError(f"unknown attention {name!r}; valid names: {', '.join(available())}")
    return _REGISTRY[name]


def options(name: str) -> tuple[str, ...]:
    """The options ``create(name, ...)`` accepts: the module's dataclass fields (Flax's ``name`` aside)."""
    module_cls = _entry(name).module_cls
    return tuple(f.name for f in dataclasses.fields(module_cls) if f.name not in ("parent", "name"))


def placement(name: str) -> Placement:
    """Where a registered attention goes: ``'block'`` (every residual block) or ``'stage'`` (stage ends)."""
    return _entry(name).placement


def _check_options(name: str, given: dict[str, Any]) -> None:
    valid = options(name)
    unknown = sorted(set(given) - set(valid) - {"name", "parent"})
    if unknown:
        raise ValueError(f"attention {name!r} takes no option {', '.join(map(repr, unknown))}; "
                         f"valid options: {', '.join(valid)}")


def create(name: str, /, **options: Any) -> nn.Module:
    """Builds the attention module registered as ``name`` with the given options (and Flax ``name=``)."""
    _check_options(name, options)
    return _entry(name).module_cls(**options)


@dataclasses.dataclass(frozen=True)
class AttentionFactory:
    """A registered attention with its options, ready to build one fresh module per place in a network.

    Hashable and immutable, so it can be a field of a Flax module. Call it with the keyword arguments a network
    adds (``dtype``, ``param_dtype``, ``name``) to get a module.
    """

    name: str
    options: tuple[tuple[str, Any], ...] = ()

    @property
    def placement(self) -> Placement:
        return placement(self.name)

    def takes(self, option: str) -> bool:
        """Whether the module has the field ``option`` (a network passes ``bn_group_size`` only where it is)."""
        return option in options(self.name)

    def __call__(self, **network_options: Any) -> nn.Module:
        return create(self.name, **{**dict(self.options), **network_options})


def factory(name: str, /, **options: Any) -> AttentionFactory:
    """An :class:`AttentionFactory` for ``name``; unknown names, options and bad option values fail here, before
    any tracing (building one unbound module runs the module's own checks)."""
    create(name, **options)
    return AttentionFactory(name, tuple(sorted(options.items())))
