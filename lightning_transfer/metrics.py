"""Metrics by task: what a datamodule's ``task`` is measured with, and which metric picks the best checkpoint.

- ``classification``: loss, top-1 (and top-5 from 5 classes), expected calibration error; monitor ``acc``.
- ``anomaly_detection``: AUROC, AUPR (average precision), FPR at 95% TPR of a per-image anomaly score (higher
  means more anomalous; label 1 = anomalous); monitor ``auroc``.
- ``retrieval``: recall@1/@5 and mAP of query embeddings against a gallery (cosine similarity; a batch is
  ``(inputs, labels, is_query)``); monitor ``map``.

The maths are pure functions; the classes are thin torchmetrics wrappers, summed or gathered across processes by
torchmetrics under DDP. :class:`TrainingSums` keeps the training epoch's loss and accuracy.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import (
    BinaryAUROC,
    BinaryAveragePrecision,
    MulticlassAccuracy,
    MulticlassCalibrationError,
)
from torchmetrics.functional.classification import binary_roc

from lightning_transfer.outputs import StepLoss


# ---- the maths -----------------------------------------------------------------------------------------------
def fpr_at_tpr(scores: Tensor, labels: Tensor, tpr: float = 0.95) -> Tensor:
    """False-positive rate at the first threshold whose true-positive rate reaches ``tpr`` (label 1 positive)."""
    fpr, tprs, _ = binary_roc(scores.float(), labels.long())
    return fpr[torch.nonzero(tprs >= tpr)[0, 0]]


def retrieval_scores(query: Tensor, query_labels: Tensor, gallery: Tensor, gallery_labels: Tensor,
                     ks: tuple[int, ...] = (1, 5)) -> dict[str, Tensor]:
    """Recall@k (a relevant gallery item among the k most similar) and mAP, by cosine similarity.

    query (Q, D), gallery (G, D); an item is relevant when its label equals the query's. A query with no relevant
    gallery item counts as a miss for recall and 0 for AP (as in the compatibility literature's protocol).
    """
    sims = F.normalize(query.float(), dim=-1) @ F.normalize(gallery.float(), dim=-1).T  # (Q, G)
    order = sims.argsort(dim=1, descending=True)  # (Q, G)
    relevant = (gallery_labels[order] == query_labels[:, None]).float()  # (Q, G), ranked
    out = {f"recall@{k}": (relevant[:, :k].sum(1) > 0).float().mean() for k in ks}
    hits = relevant.cumsum(1)  # relevant items up to each rank
    ranks = torch.arange(1, relevant.shape[1] + 1, device=relevant.device)
    precision_at_hits = (hits / ranks) * relevant  # (Q, G)
    ap = precision_at_hits.sum(1) / relevant.sum(1).clamp_min(1)
    out["map"] = ap.mean()
    return out


# ---- metric classes ------------------------------------------------------------------------------------------
class MeanCrossEntropy(Metric):
    """Mean cross-entropy over every sample seen, with the ``update(preds, target)`` of the accuracy metrics, so the
    loss sits in their MetricCollection (cloned per test dataloader with them). Summed across processes under DDP.

    The sum is kept in micro-units as an int64: a precision plugin that casts the module (bf16-true, 16-true:
    ``module.to(dtype)``) casts floating metric states too, and a bf16 sum stops growing (at 256 its spacing is 2);
    integer states are never cast. Each batch's sum is rounded to 1e-6.
    """

    full_state_update = False
    total: Tensor
    count: Tensor
    _UNIT = 1e6

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("total", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        batch_sum = F.cross_entropy(preds.float(), target, reduction="sum").double()
        self.total += torch.round(batch_sum * self._UNIT).long()
        self.count += target.shape[0]

    def compute(self) -> Tensor:
        return (self.total.double() / self._UNIT / self.count).float()


class FPRAtTPR(Metric):
    """False-positive rate at 95% true-positive rate of anomaly scores (label 1 = anomalous)."""

    full_state_update = False
    scores: list[Tensor]
    labels: list[Tensor]

    def __init__(self, tpr: float = 0.95, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.tpr = tpr
        self.add_state("scores", [], dist_reduce_fx="cat")
        self.add_state("labels", [], dist_reduce_fx="cat")

    def update(self, preds: Tensor, target: Tensor) -> None:
        self.scores.append(preds.detach().float())
        self.labels.append(target.detach().long())

    def compute(self) -> Tensor:
        return fpr_at_tpr(_cat(self.scores), _cat(self.labels), self.tpr)  # type: ignore[arg-type]


class RetrievalMetric(Metric):
    """One of recall@k or mAP of query embeddings against the gallery (the rows with ``is_query`` 0).

    ``update(embeddings (B, D), target (B, 2))`` with target columns (label, is_query). Metrics of this class in one
    collection share their states (torchmetrics' compute groups), so the embeddings are kept once.
    """

    full_state_update = False
    embeddings: list[Tensor]
    targets: list[Tensor]

    def __init__(self, score: str = "map", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.score = score
        self.add_state("embeddings", [], dist_reduce_fx="cat")
        self.add_state("targets", [], dist_reduce_fx="cat")

    def update(self, preds: Tensor, target: Tensor) -> None:
        self.embeddings.append(preds.detach().float())
        self.targets.append(target.detach().long())

    def compute(self) -> Tensor:
        embeddings, targets = _cat(self.embeddings), _cat(self.targets)  # type: ignore[arg-type]
        query = targets[:, 1] == 1
        if not query.any() or query.all():
            raise ValueError("retrieval needs both query (is_query=1) and gallery (is_query=0) items in each split")
        ks = (int(self.score.split("@")[1]),) if self.score.startswith("recall@") else (1,)
        scores = retrieval_scores(embeddings[query], targets[query, 0], embeddings[~query], targets[~query, 0], ks)
        return scores[self.score]


def _cat(items: Tensor | list[Tensor]) -> Tensor:
    return torch.cat(items) if isinstance(items, list) else items


# ---- tasks ---------------------------------------------------------------------------------------------------
class Task:
    """A task's metrics and the monitored one (always maximised)."""

    name: ClassVar[str] = ""
    monitor: ClassVar[str] = ""

    def metrics(self, num_classes: int, ece_bins: int, prefix: str) -> MetricCollection:
        raise NotImplementedError

    def target(self, batch: Any) -> Tensor:
        """What the metrics compare the model's outputs with."""
        return batch[1]

    def prediction(self, outputs: Tensor) -> Tensor:
        """What ``predict`` returns for the model's outputs."""
        return outputs


class Classification(Task):
    name = "classification"
    monitor = "acc"

    def metrics(self, num_classes: int, ece_bins: int, prefix: str) -> MetricCollection:
        metrics: dict[str, Metric | MetricCollection] = {
            "loss": MeanCrossEntropy(),
            "acc": MulticlassAccuracy(num_classes, top_k=1, average="micro"),
            "ece": MulticlassCalibrationError(num_classes, n_bins=ece_bins),
        }
        if num_classes >= 5:
            metrics["acc_top5"] = MulticlassAccuracy(num_classes, top_k=5, average="micro")
        return MetricCollection(metrics, prefix=prefix)

    def prediction(self, outputs: Tensor) -> Tensor:
        return outputs.softmax(-1)  # (B, C) probabilities


class AnomalyDetection(Task):
    name = "anomaly_detection"
    monitor = "auroc"

    def metrics(self, num_classes: int, ece_bins: int, prefix: str) -> MetricCollection:
        return MetricCollection({"auroc": BinaryAUROC(), "aupr": BinaryAveragePrecision(), "fpr95": FPRAtTPR()},
                                prefix=prefix)

    def target(self, batch: Any) -> Tensor:
        return batch[1].long()

    def prediction(self, outputs: Tensor) -> Tensor:
        return _scores(outputs)


class Retrieval(Task):
    name = "retrieval"
    monitor = "map"

    def metrics(self, num_classes: int, ece_bins: int, prefix: str) -> MetricCollection:
        return MetricCollection({"recall@1": RetrievalMetric("recall@1"), "recall@5": RetrievalMetric("recall@5"),
                                 "map": RetrievalMetric("map")}, prefix=prefix, compute_groups=True)

    def target(self, batch: Any) -> Tensor:
        return torch.stack([batch[1], batch[2]], dim=1)  # (B, 2): label, is_query


def _scores(outputs: Tensor) -> Tensor:
    """(B,) anomaly scores from outputs (B,) or (B, 1)."""
    return outputs.reshape(outputs.shape[0], -1)[:, 0]


TASKS: dict[str, type[Task]] = {cls.name: cls for cls in (Classification, AnomalyDetection, Retrieval)}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}: choose one of {', '.join(TASKS)} (the datamodule declares it; the "
                         "CLI links data.task into model.task)")
    return TASKS[name]()


class AnomalyScores(nn.Module):
    """Outputs as (B,) scores: what the anomaly metrics read (a head may give (B, 1))."""

    def forward(self, outputs: Tensor) -> Tensor:
        return _scores(outputs)


# ---- the training epoch's running sums ------------------------------------------------------------------------
class TrainingSums:
    """The training epoch's loss, accuracy and named loss terms as running sums (tensors on the model's device, no
    device sync per step). Plain attributes, not buffers: a precision plugin that casts the module (bf16-true)
    cannot round them. Their state goes into checkpoints, so a fit resumed inside an epoch reports the whole epoch."""

    def __init__(self) -> None:
        self.reset(torch.device("cpu"))
        self.resumed: list[Any] | None = None

    def reset(self, device: torch.device) -> None:
        self.loss = torch.zeros((), dtype=torch.float64, device=device)
        self.correct = torch.zeros((), dtype=torch.long, device=device)
        self.count = 0  # samples (or steps, when a step reports no targets)
        self.scored = 0  # samples with hard labels and logits, the accuracy's denominator
        self.terms: dict[str, Tensor] = {}

    def update(self, step: StepLoss) -> None:
        n = len(step.targets) if step.targets is not None else 1
        self.loss += step.loss.detach().double() * n
        self.count += n
        for name, value in step.terms.items():
            total = self.terms.setdefault(name, torch.zeros((), dtype=torch.float64, device=self.loss.device))
            total += value.detach().double() * n
        if step.logits is not None and step.targets is not None and step.targets.ndim == 1:
            self.correct += (step.logits.detach().argmax(-1) == step.targets).sum()
            self.scored += n

    def running_loss(self) -> float | None:
        """Mean training loss of the epoch so far (None before its first batch). Reads the device: call it rarely."""
        return float(self.loss) / self.count if self.count else None

    def state(self) -> list[Any]:
        return [float(self.loss), int(self.correct), self.count, self.scored,
                {k: float(v) for k, v in self.terms.items()}]

    def resume(self, states: list[list[Any]] | None) -> None:
        """Keep every process's saved sums (a checkpoint's) to add on :meth:`start`, on rank 0 only."""
        self.resumed = states or None

    def start(self, device: torch.device, rank_zero: bool) -> None:
        self.reset(device)
        states, self.resumed = self.resumed, None
        if not states or not rank_zero:  # the epoch end sums over processes, whatever their count
            return
        for state in states:
            loss, correct, count = state[:3]
            self.loss += float(loss)
            self.correct += int(correct)
            self.count += int(count)
            self.scored += int(state[3]) if len(state) > 3 else int(count)  # format 1 had no separate count
            for name, value in (state[4] if len(state) > 4 else {}).items():
                total = self.terms.setdefault(name, torch.zeros((), dtype=torch.float64, device=device))
                total += float(value)

    def epoch_means(self, reduce: Any) -> dict[str, Tensor]:
        """Every process's sums, reduced (``reduce(tensor)`` sums across processes), as ``train/*`` means."""
        names = sorted(self.terms)
        local = torch.stack([self.loss, self.correct.double(), self.loss.new_tensor(float(self.count)),
                             self.loss.new_tensor(float(self.scored)), *(self.terms[n] for n in names)])
        sums = reduce(local)
        if float(sums[2]) <= 0:
            return {}
        out = {"train/loss": (sums[0] / sums[2]).float()}
        if float(sums[3]) > 0:
            out["train/acc"] = (sums[1] / sums[3]).float()
        out.update({f"train/{n}": (sums[4 + i] / sums[2]).float() for i, n in enumerate(names)})
        return out
