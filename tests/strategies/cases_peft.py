"""Contract cases of the parameter-efficient strategies (LoRA, PeftMethod, Adapter, BitFit, NormTuning).

``bert`` is the tiny BERT reading Digits images as pixel tokens (tests/helpers/text_models.py), so every check of
the contract suite also runs through a Hugging Face BERT layer stack.
"""

from tests.helpers.text_models import pixel_bert

FACTORIES = {"bert": pixel_bert}

CASES = {
    "lora": [
        {"init_args": {"r": 4, "alpha": 4}, "backbones": ["vit"]},
        {"init_args": {"r": 2, "alpha": 8, "dropout": 0.1, "target_modules": "default", "use_dora": True},
         "backbones": ["vit"]},
        {"init_args": {"r": 2, "use_rslora": True, "layers_to_transform": [1, 2], "init_lora_weights": "gaussian"},
         "backbones": ["bert"]},
        {"init_args": {"r": 2, "target_modules": ["conv1", "conv2"]}, "backbones": ["cnn"]},
    ],
    "peft_method": [
        {"init_args": {"method": "IA3", "config": {"target_modules": ["attn.qkv", "mlp.fc2"],
                                                   "feedforward_modules": ["mlp.fc2"]}}, "backbones": ["vit"]},
        {"init_args": {"method": "LOHA", "config": {"r": 2, "alpha": 4, "target_modules": "qv"}},
         "backbones": ["vit", "bert"]},
        {"init_args": {"method": "LOKR", "config": {"r": 2, "target_modules": "default"}}, "backbones": ["vit"]},
    ],
    "adapter": [
        {"init_args": {"bottleneck": 8, "placement": "parallel"}, "backbones": ["vit"]},
        {"init_args": {"bottleneck": 4, "placement": "sequential", "activation": "gelu", "init": "bert",
                       "dropout": 0.1}, "backbones": ["bert"]},
        {"init_args": {"bottleneck": 4, "placement": "ffn", "scale": 2.0}, "backbones": ["vit"]},
    ],
    "bitfit": [{"init_args": {}, "backbones": ["vit", "cnn"]}],
    "norm_tuning": [{"init_args": {}, "backbones": ["cnn"]},
                    {"init_args": {"train_bias": False}, "backbones": ["bert"]}],
}
