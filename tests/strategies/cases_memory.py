"""Contract cases of the memory-efficient strategies (VQT, SHERL); both need a token backbone (tiny ViT)."""

CASES = {
    "vqt": [
        {"init_args": {}},
        {"init_args": {"num_queries": 3, "pooling": "mean", "query_dropout": 0.0, "group_lasso": 1e-3}},
    ],
    "sherl": [
        {"init_args": {}},
        {"init_args": {"late_blocks": 2, "projection": "linear_norm", "shallow_layers": [0, 2, 3]}},
    ],
}
