"""Small strategies, heads and datamodules (not shipped) that prove the core's contracts for the families to come:
two-stream training, trainable and frozen auxiliary networks, a strategy-owned loss, closed-form heads, and tasks
other than classification. ``tests/test_core_contracts.py`` runs each through fit, test, a strict checkpoint round
trip and 2-process DDP (``tests/helpers/contract_runs.py``)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from lightning_transfer.auxiliary import frozen_network
from lightning_transfer.backbones.base import Backbone
from lightning_transfer.datamodules.base import TransferDataModule, stratified_split
from lightning_transfer.datamodules.digits import images_to_tensor
from lightning_transfer.heads.base import Head
from lightning_transfer.outputs import StepLoss
from lightning_transfer.strategies.base import AdaptationStrategy, freeze


class TwoStreamProbe(AdaptationStrategy):
    """Cross-entropy on the source, entropy on the target, and a trainable domain discriminator (own group)."""

    needs_target_data = True

    def __init__(self, domain_weight: float = 0.1) -> None:
        super().__init__()
        self.domain_weight = domain_weight
        self.discriminator: nn.Module = nn.Identity()

    def _attach(self, backbone: Backbone, head: nn.Module | None) -> None:
        freeze(backbone)
        self.discriminator = nn.Sequential(nn.Linear(backbone.num_features, 8), nn.ReLU(), nn.Linear(8, 1))

    def trainable_auxiliaries(self) -> dict[str, nn.Module]:
        return {"discriminator": self.discriminator}

    def training_loss(self, backbone: Backbone, head: nn.Module | None, batch: Any) -> StepLoss:
        (xs, ys), xt = batch["source"], batch["target"]
        fs, ft = backbone(xs), backbone(xt)  # (B_s, D), (B_t, D)
        logits = head(fs)  # type: ignore[misc]
        probs = head(ft).softmax(-1)  # type: ignore[misc]
        entropy = -(probs * probs.clamp_min(1e-8).log()).sum(-1).mean()
        domains = torch.cat([torch.zeros(len(fs)), torch.ones(len(ft))]).to(fs)
        domain = F.binary_cross_entropy_with_logits(self.discriminator(torch.cat([fs, ft])).squeeze(-1), domains)
        loss = F.cross_entropy(logits, ys) + 0.1 * entropy + self.domain_weight * domain
        return StepLoss(loss, logits=logits, targets=ys, terms={"entropy": entropy, "domain": domain})


class TeacherHint(AdaptationStrategy):
    """The head and the backbone's last block train on cross-entropy plus a hint towards a frozen teacher's features.

    Args:
        teacher_backbone: the teacher as a backbone config.
        teacher_checkpoint: or as a fit checkpoint of this project.
        weight: weight of the feature hint.
    """

    trains_backbone = True

    def __init__(self, teacher_backbone: Backbone | None = None, teacher_checkpoint: str | None = None,
                 weight: float = 1.0) -> None:
        super().__init__()
        self.teacher = frozen_network(teacher_backbone, teacher_checkpoint)
        self.weight = weight

    def _attach(self, backbone: Backbone, head: nn.Module | None) -> None:
        freeze(backbone)
        for p in backbone.blocks[-1].parameters():
            p.requires_grad_(True)

    def training_loss(self, backbone: Backbone, head: nn.Module | None, batch: Any) -> StepLoss:
        x, y = batch[0], batch[1]
        features = backbone(x)
        logits = head(features)  # type: ignore[misc]
        hint = F.mse_loss(features, self.teacher.features(x))
        return StepLoss(F.cross_entropy(logits, y) + self.weight * hint, logits, y, {"hint": hint})


class NearestMeanHead(Head):
    """Logits = -squared distance to class means; the means are fitted in closed form, then trained further."""

    fits_in_closed_form = True

    def build(self, in_features: int, num_classes: int) -> None:
        super().build(in_features, num_classes)
        self.means = nn.Parameter(torch.zeros(num_classes, in_features))

    def fit(self, features: Tensor, targets: Tensor) -> None:
        with torch.no_grad():
            for c in range(self.num_classes):
                self.means[c] = features[targets == c].mean(0)
        super().fit(features, targets)

    def forward(self, features: Tensor) -> Tensor:
        return -torch.cdist(features, self.means.to(features)).pow(2)  # (B, C)


class DistanceToMean(Head):
    """Anomaly score = distance to the mean of the normal training features (closed form, nothing to train)."""

    fits_in_closed_form = True

    def build(self, in_features: int, num_classes: int) -> None:
        super().build(in_features, num_classes)
        self.register_buffer("mean", torch.zeros(in_features))

    def fit(self, features: Tensor, targets: Tensor) -> None:
        self.mean.copy_(features.mean(0))
        super().fit(features, targets)

    def forward(self, features: Tensor) -> Tensor:
        return (features - self.mean).norm(dim=-1)  # (B,) higher = more anomalous


class ProjectedEmbedding(AdaptationStrategy):
    """Retrieval: a trainable projection of the frozen features, trained through an auxiliary classifier; the model's
    output is the projected embedding (no head)."""

    identity_at_init = False

    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.projection: nn.Module = nn.Identity()
        self.classifier: nn.Module = nn.Identity()

    def head_in_features(self, backbone: Backbone) -> int | None:
        return None

    def _attach(self, backbone: Backbone, head: nn.Module | None) -> None:
        freeze(backbone)
        self.projection = nn.Linear(backbone.num_features, 16)
        self.classifier = nn.Linear(16, self.num_classes)

    def trainable_auxiliaries(self) -> dict[str, nn.Module]:
        return {"classifier": self.classifier}

    def forward(self, backbone: Backbone, head: nn.Module | None, inputs: Tensor) -> Tensor:
        return self.projection(backbone(inputs))  # (B, 16) embeddings

    def features(self, backbone: Backbone, inputs: Tensor) -> Tensor:
        return self.projection(backbone(inputs))

    def training_loss(self, backbone: Backbone, head: nn.Module | None, batch: Any) -> StepLoss:
        logits = self.classifier(self(backbone, head, batch[0]))
        return StepLoss(F.cross_entropy(logits, batch[1]), logits, batch[1])


def _digit_arrays(classes: list[int]) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    keep = np.isin(digits.target, classes)
    return digits.images[keep] / 16.0, digits.target[keep]


class OneClassDigits(TransferDataModule):
    """Anomaly detection on the embedded digits: one digit is normal (training has only it), the test split holds
    normal and anomalous digits with a binary label (1 = anomalous).

    Args:
        normal: the normal digit.
        **kwargs: see :class:`TransferDataModule`.
    """

    def __init__(self, normal: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.normal = normal

    @property
    def task(self) -> str:
        return "anomaly_detection"

    @property
    def class_names(self) -> list[str]:
        return [str(self.normal)]

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        images, digits = _digit_arrays(list(range(10)))
        anomalous = (digits != self.normal).astype(np.int64)
        rest, test = stratified_split(anomalous, 0.2, seed=0)
        normal_rest = [i for i in rest if not anomalous[i]]
        train, val = normal_rest[: len(normal_rest) * 3 // 4], normal_rest[len(normal_rest) * 3 // 4:]
        val = val + [i for i in rest if anomalous[i]][:len(val)]  # validation: normal and anomalous too
        x = images_to_tensor(images, self.data_config())
        y = torch.as_tensor(anomalous)
        self.splits = {"train": train, "val": sorted(val), "test": test}
        self.datasets = {split: TensorDataset(x[idx], y[idx]) for split, idx in self.splits.items()}


class RetrievalDigits(TransferDataModule):
    """Retrieval on digits 0-4: items ``(image, label, is_query)``; a third of each evaluation split are queries."""

    @property
    def task(self) -> str:
        return "retrieval"

    @property
    def class_names(self) -> list[str]:
        return [str(c) for c in range(5)]

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        images, labels = _digit_arrays(list(range(5)))
        rest, test = stratified_split(labels, 0.3, seed=0)
        train, val = stratified_split(labels[rest], 0.2, seed=0)
        train, val = [rest[i] for i in train], [rest[i] for i in val]
        x, y = images_to_tensor(images, self.data_config()), torch.as_tensor(labels)
        self.splits = {"train": train, "val": val, "test": test}
        for split, idx in self.splits.items():
            query = torch.as_tensor([int(i % 3 == 0) for i in range(len(idx))])
            self.datasets[split] = TensorDataset(x[idx], y[idx], query)
