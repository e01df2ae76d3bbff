"""Record how an object was constructed, so a checkpoint can rebuild it without pickling code.

Every configurable family (Backbone, AdaptationStrategy, TestTimeAdaptation) inherits :class:`RecordsInitArgs`.
The outermost ``__init__`` call of each instance is captured as ``{"class_path": ..., "init_args": {...}}``, the same
shape jsonargparse and LightningCLI use, so a module built in Python and one built from YAML save the same
hyperparameters and reload through the same code path.
"""

from __future__ import annotations

import functools
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
                init_args = {k: v for k, v in list(bound.arguments.items())[1:] if k not in ("args", "kwargs")}
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
