"""Contract cases of the CLIP strategies (ZeroShotCLIP, CoOp, CoCoOp) on a tiny random Hugging Face CLIP and on a
tiny random OpenAI-style CLIP ResNet (``CLIPResNetBackbone``, the RN50 recipes' backbone).

``ZeroShotCLIP`` trains nothing (``trains_nothing = True``): the suite's freezing, one-step and fit-based checks
must read that flag (see the issue-5 report); its evaluation checks apply unchanged.
"""

from tests.helpers.tiny_clip import tiny_clip, tiny_clip_dir, tiny_clip_resnet

FACTORIES = {"clip": tiny_clip, "clip_rn": tiny_clip_resnet}
# the CLI arguments that select the same tiny CLIP (the YAML test cannot use the digits ViT for CLIP strategies)
CLI_BACKBONES = {"clip": lambda: ["--model.backbone=lightning_transfer.backbones.hf_clip.HFCLIPBackbone",
                                  f"--model.backbone.model_name_or_path={tiny_clip_dir()}"]}

CASES = {
    "zeroshot_clip": [{"init_args": {"templates": "ensemble:digits"}, "backbones": ["clip", "clip_rn"]}],
    "coop": [
        {"init_args": {"n_ctx": 4}, "backbones": ["clip", "clip_rn"]},
        {"init_args": {"n_ctx": 4, "ctx_init": "a photo of a", "class_token_position": "middle"},
         "backbones": ["clip"]},
        {"init_args": {"n_ctx": 2, "class_specific": True, "class_token_position": "front"}, "backbones": ["clip"]},
    ],
    "cocoop": [{"init_args": {"meta_hidden": 8}, "backbones": ["clip", "clip_rn"]}],
}
