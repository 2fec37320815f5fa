"""The attention registry: a short name -> a module class and where it goes in a network.

A network never imports an attention class. It receives an :class:`AttentionFactory` (from :func:`factory`)
and asks it for fresh modules; ``factory.placement`` says whether one goes inside every residual block
(``'block'``: SE, ECA, CBAM) or once after each of the first stages (``'stage'``: BAM at the bottlenecks).

The contract of an attention module: a ``flax.linen.Module`` subclass whose ``__call__(x, *, train)`` takes NHWC
input and returns the same shape. Its dataclass fields are its options; a network passes ``dtype``,
``param_dtype``, ``bn_group_size`` and ``conv`` (its own conv module) only to modules that declare them.

Three ways to name one, all accepted wherever a name is (``create_model``, ``--config.attention``):

- a name given to :func:`register` (``'cbam'``);
- an import path ``'package.module:ClassName'``, imported and registered under that path on first use, placed
  by the class attribute ``placement: ClassVar[str]`` (``'block'`` when absent);
- a name an installed package declares in the entry-point group ``attn_flax.attention``
  (``[project.entry-points."attn_flax.attention"] my_gate = "my_package.gates:MyGate"``).

In Python a network also takes the module itself, as timm's ``get_attn`` does: :func:`factory` accepts a name, a
module class (``CBAM``, or a class of your own, registered under its import path on first use) or a
``functools.partial`` of one (``partial(CBAM, reduction=8)``), with the same placement rules.
"""
import dataclasses
import functools
import importlib
import importlib.metadata
import inspect
from typing import Any, Callable, Literal, Optional, Union

from flax import linen as nn

Placement = Literal["block", "stage"]
PLACEMENTS = ("block", "stage")
ENTRY_POINT_GROUP = "attn_flax.attention"
NETWORK_OPTIONS = ("dtype", "param_dtype", "bn_group_size", "conv")
"""Options a network passes to the modules that declare them."""


@dataclasses.dataclass(frozen=True)
class _Entry:
    module_cls: Callable[..., nn.Module]
    placement: Placement


_REGISTRY: dict[str, _Entry] = {}


def _check_contract(name: str, module_cls: Any) -> None:
    """Raises ValueError unless ``module_cls`` is a Flax module whose ``__call__`` takes ``train`` by keyword."""
    if not (isinstance(module_cls, type) and issubclass(module_cls, nn.Module)):
        raise ValueError(f"attention {name!r}: {module_cls!r} is not a flax.linen.Module subclass; register a "
                         "class such as `class MyGate(nn.Module)` with `__call__(self, x, *, train)`")
    params = inspect.signature(module_cls.__call__).parameters.values()
    takes_train = any(p.name == "train" and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params)
    if not takes_train and not any(p.kind == p.VAR_KEYWORD for p in params):
        raise ValueError(f"attention {name!r}: {module_cls.__name__}.__call__ must take the keyword argument "
                         "`train` (def __call__(self, x, *, train): ...), the network calls it as m(x, train=...)")


def register(name: str, module_cls: Callable[..., nn.Module], *, placement: Placement,
             overwrite: bool = False) -> None:
    """Registers ``module_cls`` under ``name``, placed in every residual block or at stage boundaries; checks
    the contract (a Flax module whose ``__call__`` takes ``train``) here rather than at the first trace."""
    if placement not in PLACEMENTS:
        raise ValueError(f"placement {placement!r} is not one of {', '.join(PLACEMENTS)}")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"attention {name!r} is already registered; pass overwrite=True to replace it")
    _check_contract(name, module_cls)
    _REGISTRY[name] = _Entry(module_cls, placement)


def _entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def available() -> tuple[str, ...]:
    """The registered attention names and those installed packages declare as entry points, sorted."""
    return tuple(sorted(set(_REGISTRY) | set(_entry_points())))


def _register_loaded(name: str, module_cls: Any) -> None:
    place = getattr(module_cls, "placement", "block")
    if place not in PLACEMENTS:
        raise ValueError(f"attention {name!r}: its class attribute placement={place!r} is not one of "
                         f"{', '.join(PLACEMENTS)}")
    register(name, module_cls, placement=place)


def _import_path(name: str) -> Any:
    module_name, _, attribute = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"attention {name!r}: cannot import {module_name!r} ({err}); put its folder on "
                         "PYTHONPATH or install its package") from err
    if not attribute or not hasattr(module, attribute):
        raise ValueError(f"attention {name!r}: module {module_name!r} has no attribute {attribute!r}; write "
                         "'package.module:ClassName'")
    return getattr(module, attribute)


def _entry(name: str) -> _Entry:
    if name not in _REGISTRY:
        if ":" in name:
            _register_loaded(name, _import_path(name))
        elif name in (points := _entry_points()):
            _register_loaded(name, points[name].load())
        else:
            raise ValueError(f"unknown attention {name!r}; valid names: {', '.join(available())}, or an import "
                             "path 'package.module:ClassName'")
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
                         + (f"valid options: {', '.join(valid)}" if valid else "it declares no options (dataclass "
                            "fields)"))


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
        """A fresh module; of :data:`NETWORK_OPTIONS` only those the module declares are passed on."""
        passed = {k: v for k, v in network_options.items() if k not in NETWORK_OPTIONS or self.takes(k)}
        return create(self.name, **{**dict(self.options), **passed})


AttentionSpec = Union[None, str, Callable[..., nn.Module], AttentionFactory]
"""What a network's ``attention`` accepts: None or ``'none'``, a name, an :class:`AttentionFactory`, a module class
or a ``functools.partial`` of one."""
NONE = ("none",)


def _name_of_class(module_cls: Any) -> str:
    """The name a module class is known by: the first name it is registered under, else its import path
    ``module:QualName``, registered on first use with the placement of its class attribute ``placement``
    (``'block'`` when absent), as an import-path name would be."""
    for name, entry in _REGISTRY.items():
        if entry.module_cls is module_cls:
            return name
    _check_contract(repr(module_cls), module_cls)
    name = f"{module_cls.__module__}:{module_cls.__qualname__}"
    if name in _REGISTRY:  # a class defined again under the same path (a re-run notebook cell): the newest wins
        del _REGISTRY[name]
    _register_loaded(name, module_cls)
    return name


def factory(attention: AttentionSpec, /, **options: Any) -> Optional[AttentionFactory]:
    """An :class:`AttentionFactory` for a name, a module class, a ``functools.partial`` of one (its keywords are
    options) or a factory, with ``options`` added; None or ``'none'`` gives None (no attention). Placement follows
    the registry: a registered class keeps its registered placement, another class its ``placement`` attribute.
    Unknown names, options and bad option values fail here, before any tracing (building one unbound module runs
    the module's own checks)."""
    if attention is None or (isinstance(attention, str) and attention.lower() in NONE):
        if options:
            raise ValueError(f"attention options {sorted(options)} given without an attention module")
        return None
    if isinstance(attention, AttentionFactory):
        name, options = attention.name, {**dict(attention.options), **options}
    elif isinstance(attention, str):
        name = attention if ":" in attention or attention in available() else attention.lower()
    elif isinstance(attention, functools.partial):
        if attention.args:
            raise ValueError(f"attention partial {attention!r}: give its options by keyword "
                             "(functools.partial(CBAM, reduction=8)), positional arguments are not options")
        return factory(attention.func, **{**attention.keywords, **options})
    elif isinstance(attention, type):
        name = _name_of_class(attention)
    else:
        raise ValueError(f"attention {attention!r} is none of: a name ({', '.join(available())}), an import path "
                         "'package.module:ClassName', an AttentionFactory, a flax.linen.Module class or a "
                         "functools.partial of one")
    create(name, **options)
    return AttentionFactory(name, tuple(sorted(options.items())))
