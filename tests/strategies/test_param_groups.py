"""Which parameters get weight decay: biases, norms, learned tokens and positions do not; every weight matrix does."""

from __future__ import annotations

import pytest
import torch

from lightning_transfer.backbones.base import Backbone
from lightning_transfer.module import TransferModule
from lightning_transfer.strategies.base import no_weight_decay
from lightning_transfer.strategies.coop import CoOp
from lightning_transfer.strategies.full import FullFinetune
from lightning_transfer.strategies.lora import LoRA
from lightning_transfer.strategies.vqt import VQT
from tests.helpers.models import tiny_vit
from tests.helpers.text_models import tiny_bert


def _undecayed(module: TransferModule) -> set[str]:
    groups = module.adaptation.param_groups(module.backbone, module.head)
    names = {id(p): n for n, p in module.adaptation.named_trainable(module.backbone, module.head)}
    return {names[id(p)] for g in groups if g.get("weight_decay") == 0.0 for p in g["params"]}


@pytest.mark.parametrize(("name", "shape", "decayed"), [
    ("backbone.model.cls_token", (1, 1, 8), False),
    ("backbone.model.pos_embed", (1, 5, 8), False),
    ("adaptation.queries", (2, 1, 8), False),  # VQT's query tokens: the substring "query" never matched them
    ("adaptation.ctx", (4, 8), False),
    ("backbone.model.embeddings.position_embeddings.weight", (40, 8), False),
    ("backbone.model.encoder.layer.0.attention.self.query.weight", (8, 8), True),  # a projection, like key
    ("backbone.model.encoder.layer.0.attention.self.query.lora_A.default.weight", (2, 8), True),
    ("backbone.model.blocks.0.norm1.weight", (8,), False),
    ("head.fc.bias", (5,), False),
    ("head.fc.weight", (5, 8), True),
])
def test_no_weight_decay_matches_whole_name_components(name, shape, decayed):
    # the names the backbones and strategies declare (each declares its own tokens)
    names = Backbone.no_weight_decay_names | VQT.no_weight_decay_names | CoOp.no_weight_decay_names
    assert no_weight_decay(name, torch.zeros(shape), names) is not decayed


def test_a_strategys_no_decay_names_are_its_own():
    assert "queries" in VQT.no_weight_decay_names and "queries" not in CoOp.no_weight_decay_names
    assert not no_weight_decay("adaptation.queries", torch.zeros(2, 1, 8))  # decayed without VQT's names


def test_lora_on_bert_decays_the_query_adapters_like_the_value_ones():
    module = TransferModule(tiny_bert(), LoRA(r=2, target_modules=["query", "value"]), num_classes=3)
    lora = {n for n, _ in module.adaptation.named_trainable(module.backbone, module.head) if "lora_" in n}
    assert any(".query." in n for n in lora) and any(".value." in n for n in lora)
    assert not lora & _undecayed(module)


def test_vqt_queries_and_vit_tokens_are_not_decayed():
    vqt = TransferModule(tiny_vit(), VQT(num_queries=2), num_classes=5)
    assert _undecayed(vqt) == {"adaptation.queries", "head.fc.bias"}
    full = _undecayed(TransferModule(tiny_vit(), FullFinetune(), num_classes=5))
    assert {"backbone.model.cls_token", "backbone.model.pos_embed"} <= full
    assert not any(n.endswith(("qkv.weight", "fc1.weight", "head.fc.weight")) for n in full)
