"""Attention inserted into a network you wrote, without editing its code.

    >>> from attn_flax import models
    >>> model = models.with_attention(MyNet(), 'cbam', after='Block_*', reduction=8)
    >>> variables = model.init(rng, images, train=False)   # MyNet's variables + variables['params']['attention']
    >>> logits = model.apply(variables, images, train=True, mutable=['batch_stats'])

:func:`with_attention` returns a :class:`WithAttention` module. While it runs the user's module it intercepts
(``flax.linen.intercept_methods``) the ``__call__`` of every submodule; when the submodule matches the rule
``after``, the attention is applied to that call's output. The attention modules are ordinary Flax submodules
of the wrapper, so ``init``, gradients, ``mutable=['batch_stats']``, ``jax.jit`` and checkpoints treat them as any
other layer.

Variables. The user's module shares the wrapper's scope (``flax.linen.share_scope``), so its variables keep the
names and places they have in the bare network (a checkpoint of the bare network loads into the wrapped one);
the attention modules live under one more top-level key, ``'attention'``, keyed by the matched submodule's path
relative to the user's module: ``params['attention']['Block_0']``, ``params['attention']['Block_1/bn2']`` (and
``batch_stats['attention'][...]`` for modules with BatchNorm, e.g. BAM). The names depend only on the network,
so the same network gives the same names every time. A wrapped network built inside another network's compact
method keeps the name Flax gives the user's module there (``CNN_0``), with ``'attention'`` inside it.

The rule ``after``: one of, or a list/tuple of (a submodule matches when any does):

- a path pattern, matched segment by segment against the submodule's path (``'Block_1/bn2'``): ``*``, ``?``
  and ``[...]`` as in ``fnmatch`` within one segment, ``**`` for any number of segments (``'Block_*'``,
  ``'*/bn2'``, ``'**/bn2'``);
- a module class: every submodule that is an instance of it (``nn.BatchNorm``, your block class);
- a predicate ``f(path: str, module: nn.Module) -> bool``.

Train mode: when the user's ``__call__`` has a parameter ``train``, its value (given by keyword or by position,
else its default) is the attention's ``train``; otherwise the wrapper takes a keyword ``train`` (default False)
that it passes to the attention modules only, not to the user's module.

Limits: the attention goes after a submodule's ``__call__`` only (not after other methods, plain functions such
as ``nn.relu``, or the user's module itself), and only on 4-D NHWC outputs; one attention per matched module, so
a module called twice (a shared layer) applies the same attention module, with the same parameters, after each
call, as editing that module's code would; submodules inside lifted transforms (``nn.scan``, ``nn.remat``,
``nn.vmap``) cannot get attention from outside the transform; a user's module with its own submodule or variable
named ``attention`` collides with the wrapper's key (an error says so). The placement a registered attention
declares (``'block'``/``'stage'``, for :class:`~attn_flax.models.ResNet`) plays no part here: the rule decides.
"""
import fnmatch
import inspect
from typing import Any, Callable, Optional, Sequence, Union

import jax.numpy as jnp
from flax import errors
from flax import linen as nn

from attn_flax import attention as attention_lib

Rule = Union[str, type, Callable[[str, nn.Module], bool]]
"""A path pattern, a module class or a predicate ``f(path, module) -> bool`` (see the module docstring)."""
KEY = "attention"
"""The top-level key under which the wrapper keeps its attention modules' variables."""
_SHOWN = 12
"""Submodule paths listed in the error when a rule matches nothing."""


def with_attention(module: nn.Module, attention: attention_lib.AttentionSpec = "cbam", *,
                   after: Union[Rule, Sequence[Rule]], **attention_options: Any) -> "WithAttention":
    """``module`` with the attention (any spec :func:`attn_flax.attention.factory` accepts, with its options)
    applied after the ``__call__`` output of every submodule that ``after`` matches; see the module docstring."""
    return WithAttention(module=module, attention=_factory(attention, **attention_options), after=_rules(after))


def _factory(attention: attention_lib.AttentionSpec, **options: Any) -> attention_lib.AttentionFactory:
    factory = attention_lib.factory(attention, **options)
    if factory is None:
        raise ValueError("with_attention needs an attention (a name such as 'cbam', a module class or a partial), "
                         f"got {attention!r}; use the module itself for a network without attention")
    return factory


def _rules(after: Union[Rule, Sequence[Rule]]) -> tuple[Rule, ...]:
    rules = tuple(after) if isinstance(after, (list, tuple)) else (after,)
    if not rules:
        raise ValueError("after=() matches nothing; give a path pattern ('Block_*'), a module class or a predicate")
    for rule in rules:
        if not (isinstance(rule, str) or isinstance(rule, type) or callable(rule)):
            raise ValueError(f"after={rule!r} is not a rule; give a path pattern ('Block_*', '*/bn2'), a module "
                             "class (nn.BatchNorm) or a predicate f(path, module) -> bool")
    return rules


def _path_matches(pattern: Sequence[str], path: Sequence[str]) -> bool:
    """``fnmatch`` segment by segment; a ``**`` segment matches any number of segments (none included)."""
    if not pattern:
        return not path
    if pattern[0] == "**":
        return any(_path_matches(pattern[1:], path[i:]) for i in range(len(path) + 1))
    return bool(path) and fnmatch.fnmatchcase(path[0], pattern[0]) and _path_matches(pattern[1:], path[1:])


def matches(rules: Sequence[Rule], path: str, module: nn.Module) -> bool:
    """Whether a submodule at ``path`` (``'Block_1/bn2'``) matches any of ``rules``."""
    for rule in rules:
        if isinstance(rule, str):
            found = _path_matches(rule.strip("/").split("/"), path.split("/"))
        elif isinstance(rule, type):
            found = isinstance(module, rule)
        else:
            found = bool(rule(path, module))
        if found:
            return True
    return False


def _describe(rules: Sequence[Rule]) -> str:
    shown = [r.__name__ if isinstance(r, type) else repr(r) for r in rules]
    return shown[0] if len(shown) == 1 else f"({', '.join(shown)})"


class _Inserted(nn.Module):
    """The wrapper's ``'attention'`` subtree: one attention module per matched path, created on its first call."""

    attention: attention_lib.AttentionFactory

    @nn.compact
    def __call__(self, path: str, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        return self.attention(name=path)(x, train=train)


class WithAttention(nn.Module):
    """A user's module with attention after the submodules a rule matches; build it with :func:`with_attention`.

    Attributes:
      module: the user's Flax module (unbound); its variables keep their bare-network names.
      attention: the attention factory (:func:`attn_flax.attention.factory`).
      after: the rules, a tuple of path patterns, module classes and predicates.
    """

    module: nn.Module
    attention: attention_lib.AttentionFactory
    after: tuple[Rule, ...]

    def __post_init__(self):
        object.__setattr__(self, "after", _rules(self.after))  # WithAttention(..., after='Block_*') works too
        if not isinstance(self.attention, attention_lib.AttentionFactory):
            object.__setattr__(self, "attention", _factory(self.attention))
        super().__post_init__()

    def setup(self):
        nn.share_scope(self, self.module)

    @nn.compact
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        args, kwargs, train = self._train_mode(args, kwargs)
        prefix = tuple(self.scope.path)
        root = len(prefix)
        inserted: Optional[_Inserted] = None
        seen: dict[str, str] = {}
        applied: set[str] = set()
        running: list[tuple[str, ...]] = []
        applying = False

        def interceptor(next_fun, call_args, call_kwargs, context):
            nonlocal inserted, applying
            module = context.module
            if applying or context.method_name != "__call__" or module.scope is None:
                return next_fun(*call_args, **call_kwargs)
            full = tuple(module.scope.path)
            if len(full) <= root or full[:root] != prefix or full in running or isinstance(module, _Inserted):
                return next_fun(*call_args, **call_kwargs)
            path = "/".join(full[root:])
            seen.setdefault(path, type(module).__name__)
            running.append(full)
            try:
                y = next_fun(*call_args, **call_kwargs)
            finally:
                running.pop()
            if not matches(self.after, path, module):
                return y
            if not (hasattr(y, "ndim") and hasattr(y, "shape") and y.ndim == 4):
                shape = getattr(y, "shape", type(y).__name__)
                raise ValueError(f"with_attention: after={_describe(self.after)} matches {path!r} "
                                 f"({type(module).__name__}), whose output {shape} is not a 4-D NHWC feature map; "
                                 "narrow the rule to the submodules that output [N, H, W, C]")
            if module.scope.trace_level != self.scope.trace_level:
                raise ValueError(f"with_attention: after={_describe(self.after)} matches {path!r} "
                                 f"({type(module).__name__}), which runs inside a lifted transform (nn.remat, "
                                 "nn.scan, nn.vmap, ...) where attention cannot be added from outside; narrow the "
                                 "rule to modules outside the transform")
            if inserted is None:
                try:
                    inserted = _Inserted(self.attention, name=KEY, parent=self)
                except errors.NameInUseError:
                    raise ValueError(f"with_attention: {type(self.module).__name__} has a submodule or variable "
                                     f"named {KEY!r}, where the wrapper keeps its attention; rename it") from None
            applying = True
            try:
                y = inserted(path, y, train=train)
            finally:
                applying = False
            applied.add(path)
            return y

        with nn.intercept_methods(interceptor):
            out = self.module(*args, **kwargs)
        if not applied:
            paths = ", ".join(f"{p} ({t})" for p, t in list(seen.items())[:_SHOWN])
            more = f" and {len(seen) - _SHOWN} more" if len(seen) > _SHOWN else ""
            raise ValueError(f"with_attention: after={_describe(self.after)} matches no submodule of "
                             f"{type(self.module).__name__}; its called submodules are: {paths or 'none'}{more}")
        return out

    def _train_mode(self, args: tuple, kwargs: dict) -> tuple[tuple, dict, bool]:
        """The user's ``train`` argument (by keyword, position or default), else the wrapper's own ``train``."""
        signature = inspect.signature(type(self.module).__call__)
        parameter = signature.parameters.get("train")
        if parameter is None or parameter.kind not in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY):
            kwargs = dict(kwargs)
            return args, kwargs, bool(kwargs.pop("train", False))
        bound = signature.bind_partial(None, *args, **kwargs)
        train = bound.arguments.get("train", parameter.default)
        if train is inspect.Parameter.empty:
            raise TypeError(f"{type(self.module).__name__}.__call__ needs the argument 'train'")
        return args, kwargs, bool(train)


__all__ = ["KEY", "Rule", "WithAttention", "matches", "with_attention"]
