"""Contract cases of the memory-efficient strategies (VQT, SHERL); both need a token backbone.

Besides the tiny ViT, both run on the tiny Hugging Face CLIP image tower (``clip``) and on the tiny BERT reading
Digits images as pixel tokens (``bert``), so the whole suite also goes through the HF query paths.
"""

from tests.helpers.text_models import pixel_bert
from tests.helpers.tiny_clip import tiny_clip

FACTORIES = {"clip": tiny_clip, "bert": pixel_bert}

CASES = {
    "vqt": [
        {"init_args": {}},
        {"init_args": {"num_queries": 3, "pooling": "mean", "query_dropout": 0.0, "group_lasso": 1e-3}},
        {"init_args": {"num_queries": 2}, "backbones": ["clip", "bert"]},
    ],
    "sherl": [
        {"init_args": {}},
        {"init_args": {"late_blocks": 2, "projection": "linear_norm", "shallow_layers": [0, 2, 3]}},
        {"init_args": {"reduction": 2, "projection": "relu_linear"}, "backbones": ["clip", "bert"]},
    ],
}
