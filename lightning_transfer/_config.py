"""Record how an object was constructed, so a checkpoint can rebuild it without pickling code.

Every configurable family (Backbone, AdaptationStrategy, TestTimeAdaptation) inherits :class:`RecordsInitArgs`.
The outermost ``__init__`` call of each instance is captured as ``{"class_path": ..., "init_args": {...}}``, the same
shape jsonargparse and LightningCLI use, so a module built in Python and one built from YAML save the same
hyperparameters and reload through the same code path.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from typing import Any

_PRIMITIVES = (str, int, float, bool, type(None))


def to_config(value: Any) -> Any:
    """Turn a constructor argument into plain data (safe for ``torch.load(weights_only=True)``)."""
    if isinstance(value, _PRIMITIVES):
        return value
    if isinstance(value, RecordsInitArgs):
        return value.init_config()
    if isinstance(value, (list, tuple)):
        return [to_config(v) for v in value]
    if isinstance(value, dict):
        return {str(k): to_config(v) for k, v in value.items()}
    if hasattr(value, "__fspath__"):
        return str(value)
    raise TypeError(
        f"cannot record constructor argument of type {type(value).__name__}: use plain values "
        "(str, int, float, bool, list, dict) or another lightning_transfer component"
    )


def _recorded_arguments(signature: inspect.Signature, arguments: dict[str, Any], owner: str) -> dict[str, Any]:
    """The bound constructor arguments (``self`` left out), with ``**kwargs`` spread into them: a subclass that
    forwards ``lr=0.01`` to its parent through ``**kwargs`` must reload with ``lr=0.01``, not the parent's default."""
    recorded: dict[str, Any] = {}
    for name, value in list(arguments.items())[1:]:
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            recorded.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            if value:
                raise TypeError(f"{owner} was given {len(value)} extra positional argument(s) {value!r} for *{name}: "
                                "pass every option by keyword, so that it is recorded and reloads")
        else:
            recorded[name] = value
    return recorded


def _add_forwarded_defaults(owner: type, defined_in: type, init_args: dict[str, Any]) -> None:
    """The defaults of the parent constructors that ``**kwargs`` forwards to, where not given: the record then equals
    the one LightningCLI builds (jsonargparse follows ``**kwargs`` to the parents and passes every option)."""
    mro = owner.__mro__
    for parent in mro[mro.index(defined_in) + 1:]:
        init = parent.__dict__.get("__init__")
        if init is None:
            continue
        signature = inspect.signature(getattr(init, "__wrapped__", init))
        for name, param in list(signature.parameters.items())[1:]:
            if param.kind in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY) and param.default is not param.empty:
                init_args.setdefault(name, param.default)
        if not any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values()):
            return


def build_component(value: Any, base: type) -> Any:
    """``value`` itself, or the object a ``{"class_path": ..., "init_args": {...}}`` config describes.

    Checkpoints record components in that shape (:meth:`RecordsInitArgs.init_config`); ``load_from_checkpoint``
    passes them back to the constructor. The class must be a subclass of ``base``: a config read from a file never
    makes this call anything else. Nested component configs in ``init_args`` are built the same way.
    """
    if not isinstance(value, dict) or "class_path" not in value:
        return value
    cls = _import_class(str(value["class_path"]))
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise TypeError(f"class_path {value['class_path']!r} is not a {base.__name__}: a checkpoint or config names "
                        f"its components by their class paths; pass one of a {base.__name__} subclass")
    init_args = {k: build_component(v, RecordsInitArgs) for k, v in (value.get("init_args") or {}).items()}
    return cls(**init_args)


def _import_class(path: str) -> Any:
    module_name, _, name = path.rpartition(".")
    if not module_name:  # a short class name: the registries know every shipped component
        from lightning_transfer import registry

        for reg in (registry.BACKBONES, registry.STRATEGIES, registry.TEST_TIME, registry.HEADS):
            found = reg.find(name)
            if found is not None:
                return found
        raise TypeError(f"unknown component {path!r}: give its full class path (package.module.Class)")
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as err:
        raise TypeError(f"cannot import {path!r} ({err}): is the package that defines it installed?") from err


class RecordsInitArgs:
    """Mixin that records the outermost constructor call as a class_path/init_args config."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is None or getattr(init, "_records_init_args", False):
            return
        signature = inspect.signature(init)

        @functools.wraps(init)
        def wrapped(self: Any, *args: Any, **kw: Any) -> None:
            outermost = "_init_config" not in self.__dict__
            if outermost:
                bound = signature.bind(self, *args, **kw)
                bound.apply_defaults()
                init_args = _recorded_arguments(signature, bound.arguments, type(self).__qualname__)
                if any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values()):
                    _add_forwarded_defaults(type(self), cls, init_args)
                # set before init so nested super().__init__ calls do not overwrite it
                self.__dict__["_init_config"] = {"class_path": f"{type(self).__module__}.{type(self).__qualname__}"}
                self.__dict__["_init_args_raw"] = init_args
            init(self, *args, **kw)

        wrapped._records_init_args = True  # type: ignore[attr-defined]
        cls.__init__ = wrapped  # type: ignore[method-assign]

    def init_config(self) -> dict[str, Any]:
        """``{"class_path": "pkg.mod.Class", "init_args": {...}}`` as given to the constructor."""
        own_path = f"{type(self).__module__}.{type(self).__qualname__}"
        config = dict(self.__dict__.get("_init_config") or {"class_path": own_path})
        config["init_args"] = {k: to_config(v) for k, v in (self.__dict__.get("_init_args_raw") or {}).items()}
        return config
