"""PeftMethod: any peft tuner that injects layers (IA3, LoHa, LoKr, VeRA, BOFT, ...) from a config dict."""

from __future__ import annotations

import warnings
from typing import Any

from torch import nn

from lightning_transfer.backbones.base import Backbone
from lightning_transfer.registry import register_strategy
from lightning_transfer.strategies._peft import (
    PeftInjected,
    expand_targets,
    qv_targets,
)
from lightning_transfer.strategies.base import freeze

# config keys that hold module names and so accept the same shorthands as ``target_modules``
_MODULE_LIST_KEYS = ("target_modules", "feedforward_modules")


def peft_config_from_dict(method: str, config: dict[str, Any]) -> Any:
    """Build peft's config object for ``method`` (a ``PeftType`` name, case-insensitive) from plain values."""
    from peft import PeftType
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    try:
        peft_type = PeftType[method.upper()]
    except KeyError:
        raise ValueError(f"unknown peft method {method!r}; peft offers {sorted(t.name for t in PeftType)}") from None
    config_cls = PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type)

    def injectable(t: Any) -> bool:
        tuner = PEFT_TYPE_TO_TUNER_MAPPING.get(t)
        cls = PEFT_TYPE_TO_CONFIG_MAPPING.get(t)
        return (tuner is not None and cls is not None and not getattr(tuner, "uses_shared_state", True)
                and not cls().is_prompt_learning if cls is not None and _constructible(cls) else False)

    if not injectable(peft_type):
        with warnings.catch_warnings():  # building every config class to list them warns about missing fields
            warnings.simplefilter("ignore")
            names = sorted(t.name for t in PEFT_TYPE_TO_TUNER_MAPPING if injectable(t))
        raise ValueError(f"peft method {method!r} cannot be injected in place (prompt learning or shared state); "
                         f"injectable methods: {names}")
    assert config_cls is not None
    try:
        return config_cls(**config)
    except TypeError as err:
        raise ValueError(f"bad config for peft method {method!r} ({config_cls.__name__}): {err}") from err


def _constructible(cls: type) -> bool:
    try:
        cls()
    except Exception:  # configs with required fields
        return False
    return True


@register_strategy("peft_method")
class PeftMethod(PeftInjected):
    """Any in-place peft tuner chosen by name and a config dict, e.g. IA3 (arXiv:2205.05638), LoHa/LoKr (2309.14859).

    New peft methods need no code here: ``method: LOKR, config: {r: 8, target_modules: qv}``. The config is peft's
    own (``IA3Config``, ``LoHaConfig``, ...); ``target_modules`` / ``feedforward_modules`` may also be ``"qv"``
    (query/value projections, fused ``qkv`` split) or ``"default"`` (the backbone's ``lora_target_modules``), and
    default to ``"default"``. Every peft method offered here starts as the identity when its ``init_weights`` is
    left at peft's default; LoRA has its own strategy (:class:`~lightning_transfer.strategies.lora.LoRA`).

    Args:
        method: peft method name (``PeftType``): ``IA3``, ``LOHA``, ``LOKR``, ``VERA``, ``BOFT``, ``OFT``, ...
        config: keyword arguments of that method's peft config class.
    """

    def __init__(self, method: str = "IA3", config: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.method = method
        self.config = dict(config or {})
        if self.config.pop("peft_type", method).upper() != method.upper():
            raise ValueError(f"config peft_type {config['peft_type']!r} contradicts method {method!r}")  # type: ignore
        self.config.setdefault("target_modules", "default")
        if method.upper() == "IA3":  # IA3 rescales the input of these (none: every target's output is rescaled)
            self.config.setdefault("feedforward_modules", [])
        for key in ("modules_to_save", "bias"):  # would train pretrained weights behind the strategy's back
            if self.config.get(key) not in (None, "none"):
                raise ValueError(f"config {key}={self.config[key]!r} would train pretrained weights; drop it (the head "
                                 "is trained anyway; use BitFit or FullFinetune to train backbone weights)")
        # validate the method name and options now, not at attach time
        peft_config_from_dict(method, {**self.config, **{k: ["x"] for k in _MODULE_LIST_KEYS if k in self.config}})
        self.peft_config: Any = None

    def _resolve(self, backbone: Backbone, value: Any, key: str) -> Any:
        if value == "qv":
            return qv_targets(backbone)
        if value == "default":
            if not backbone.lora_target_modules:
                raise ValueError(f"{backbone.identity()} suggests no target modules: give config.{key} as a list")
            value = backbone.lora_target_modules
        if isinstance(value, str):  # peft's own regular-expression form
            return value
        return expand_targets(backbone, list(value), self.config.get("layers_to_transform"), f"config.{key}")

    def _attach(self, backbone: Backbone, head: nn.Module | None) -> None:
        from peft import inject_adapter_in_model

        freeze(backbone)
        config = dict(self.config)
        config.pop("layers_to_transform", None)  # applied while resolving module names
        for key in _MODULE_LIST_KEYS:
            if key in config:
                config[key] = self._resolve(backbone, config[key], key)
        if isinstance(config.get("feedforward_modules"), list) and isinstance(config["target_modules"], list):
            missing = set(config["feedforward_modules"]) - set(config["target_modules"])
            if missing:
                raise ValueError(f"feedforward_modules must be a subset of target_modules; not targeted: "
                                 f"{sorted(missing)[:4]}")
        self.peft_config = peft_config_from_dict(self.method, config)
        inject_adapter_in_model(self.peft_config, backbone)

