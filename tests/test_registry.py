"""The name registries: duplicate and malformed names are refused, unknown names list what exists, and every class
name a shipped YAML uses resolves to a component of the kind its slot takes."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lightning_transfer import registry
from lightning_transfer._config import _import_class
from lightning_transfer.backbones.base import Backbone
from lightning_transfer.heads.base import Head
from lightning_transfer.strategies.base import AdaptationStrategy
from lightning_transfer.test_time.base import TestTimeAdaptation

REPO = Path(__file__).resolve().parents[1]
SLOTS = {"backbone": Backbone, "adaptation": AdaptationStrategy, "test_time": TestTimeAdaptation, "head": Head}


def test_a_taken_name_is_refused_naming_its_owner_and_the_same_class_may_register_again():
    reg: registry.Registry = registry.Registry("widget")

    class Widget:
        pass

    class Other:
        pass

    reg.register("widget")(Widget)
    reg.register("widget")(Widget)  # re-importing a module registers the same class again
    with pytest.raises(ValueError, match=r"widget name 'widget' is taken by .*Widget"):
        reg.register("widget")(Other)
    assert reg.get("widget") is Widget and len(reg) == 1


@pytest.mark.parametrize("name", ["LoRA", "2lora", "lo-ra", ""])
def test_a_name_that_is_not_lower_case_snake_is_refused(name):
    with pytest.raises(ValueError, match="must be lower case"):
        registry.Registry("widget").register(name)


@pytest.mark.parametrize("reg", [registry.BACKBONES, registry.STRATEGIES, registry.TEST_TIME, registry.HEADS,
                                 registry.DATAMODULES], ids=lambda r: r.kind)
def test_unknown_names_list_every_registered_one_and_class_names_also_resolve(reg):
    assert len(reg) > 0
    with pytest.raises(KeyError) as err:
        reg.get("no_such_component")
    message = str(err.value)
    assert "no_such_component" in message and all(name in message for name in reg.names())
    assert reg.find("no_such_component") is None
    for name, cls in reg.items():
        assert reg.get(cls.__name__) is cls and reg.get(name) is cls and cls.registry_name == name


def _class_paths(node, slot: str | None = None):
    """(slot, class_path) of every component in a parsed YAML."""
    if isinstance(node, dict):
        if "class_path" in node:
            yield slot, node["class_path"]
        for key, value in node.items():
            yield from _class_paths(value, key if key in SLOTS or key == "data" else slot)
    elif isinstance(node, list):
        for value in node:
            yield from _class_paths(value, slot)


YAMLS = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", YAMLS)
def test_every_class_a_shipped_yaml_names_resolves_to_its_slot_s_kind(path):
    for slot, class_path in _class_paths(yaml.safe_load((REPO / path).read_text())):
        cls = _import_class(class_path)
        assert isinstance(cls, type), (path, class_path)
        if slot in SLOTS:
            assert issubclass(cls, SLOTS[slot]), (path, slot, class_path)
        if slot == "data" and "." not in class_path:
            assert class_path.lower() in registry.DATAMODULES, (path, class_path)
