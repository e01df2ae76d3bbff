"""The task metrics against slow references written here: retrieval recall@k and mAP, FPR at 95% TPR."""

from __future__ import annotations

import pytest
import torch

from lightning_transfer.metrics import MeanCrossEntropy, Retrieval, fpr_at_tpr, get_task, retrieval_scores


def _reference_retrieval(q, ql, g, gl, k):
    recalls, aps = [], []
    for i in range(len(q)):
        sims = [float(torch.nn.functional.cosine_similarity(q[i], g[j], dim=0)) for j in range(len(g))]
        ranked = sorted(range(len(g)), key=lambda j: -sims[j])
        relevant = [int(gl[j] == ql[i]) for j in ranked]
        recalls.append(float(any(relevant[:k])))
        hits, precisions = 0, []
        for rank, rel in enumerate(relevant, start=1):
            if rel:
                hits += 1
                precisions.append(hits / rank)
        aps.append(sum(precisions) / max(sum(relevant), 1))
    return sum(recalls) / len(recalls), sum(aps) / len(aps)


def test_retrieval_scores_equal_a_per_query_reference():
    g = torch.Generator().manual_seed(0)
    q, gal = torch.randn(7, 5, generator=g), torch.randn(20, 5, generator=g)
    ql, gl = torch.randint(0, 3, (7,), generator=g), torch.randint(0, 3, (20,), generator=g)
    scores = retrieval_scores(q, ql, gal, gl, ks=(1, 5))
    for k in (1, 5):
        recall, ap = _reference_retrieval(q, ql, gal, gl, k)
        assert float(scores[f"recall@{k}"]) == pytest.approx(recall)
        assert float(scores["map"]) == pytest.approx(ap, abs=1e-6)


def test_retrieval_metrics_in_a_collection_use_query_and_gallery_rows():
    metrics = Retrieval().metrics(3, 15, "test/")
    emb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1], [0.1, 1.0]])
    target = torch.tensor([[0, 0], [1, 0], [0, 1], [1, 1]])  # rows 0-1 gallery, 2-3 queries, each matching its class
    metrics.update(emb, target)
    out = metrics.compute()
    assert float(out["test/recall@1"]) == 1.0 and float(out["test/map"]) == 1.0


def test_fpr_at_95_tpr_is_the_false_positive_rate_where_the_positives_are_found():
    scores = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.9, 0.8, 0.35, 0.7])
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    # every positive is found at threshold 0.35, where one negative (0.4) is above it: FPR 1/4
    assert float(fpr_at_tpr(scores, labels)) == pytest.approx(0.25)


def test_the_mean_cross_entropy_is_exact_and_kept_in_an_integer_state():
    metric = MeanCrossEntropy()
    logits, labels = torch.randn(300, 4), torch.randint(0, 4, (300,))
    for chunk in range(3):
        metric.update(logits[chunk * 100:(chunk + 1) * 100], labels[chunk * 100:(chunk + 1) * 100])
    metric.to(torch.bfloat16)  # what bf16-true does to the module: an integer state is not cast
    assert metric.total.dtype == torch.long
    expected = torch.nn.functional.cross_entropy(logits, labels)
    assert float(metric.compute()) == pytest.approx(float(expected), abs=1e-6)


def test_each_task_names_its_monitor():
    assert {name: get_task(name).monitor for name in ("classification", "anomaly_detection", "retrieval")} == {
        "classification": "acc", "anomaly_detection": "auroc", "retrieval": "map"}
