"""Contract cases of the foundation strategies: registry name -> list of cases.

A case gives ``init_args`` for the strategy and, optionally, ``backbones`` (names in
``tests.helpers.models.BACKBONE_FACTORIES``); by default token strategies run on the tiny ViT and the others on
the tiny ViT and the tiny CNN. Each new strategy adds a ``cases_<topic>.py`` file next to this one.
"""

CASES = {
    "full": [{"init_args": {}}, {"init_args": {"layer_decay": 0.7, "backbone_lr_scale": 0.5}}],
    "linear_probe": [{"init_args": {}}, {"init_args": {"cache_features": True}}],
    "partial_freeze": [{"init_args": {"num_frozen_blocks": 2}}, {"init_args": {"num_frozen_blocks": -1}}],
}
