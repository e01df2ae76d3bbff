"""CAFA: class-aware feature alignment by Mahalanobis distance to source class statistics."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

from lightning_transfer.registry import register_test_time
from lightning_transfer.test_time._norm import FeatureCapture, NormAffineAdaptation, NormKind

if TYPE_CHECKING:
    from lightning_transfer.module import TransferModule

_STATS = ("class_means", "class_covariances", "class_counts")


def class_statistics(features: Tensor, labels: Tensor, num_classes: int, tied: bool = False
                     ) -> tuple[Tensor, Tensor, Tensor]:
    """Per-class means and (biased, 1/N_c) covariances, or one covariance pooled over classes (``tied``).

    features (N, D), labels (N,) -> means (C, D), covariances (C or 1, D, D), counts (C,); all float64.
    """
    f = features.double()
    counts = torch.bincount(labels, minlength=num_classes).double()  # (C,)
    means = torch.zeros(num_classes, f.shape[1], dtype=torch.float64, device=f.device).index_add_(0, labels, f)
    means = means / counts.clamp_min(1)[:, None]
    centred = f - means[labels]  # (N, D)
    outer = centred[:, :, None] * centred[:, None, :]  # (N, D, D)
    scatter = torch.zeros(num_classes, *outer.shape[1:], dtype=torch.float64, device=f.device)
    scatter.index_add_(0, labels, outer)  # (C, D, D)
    if tied:
        return means, (scatter.sum(0) / counts.sum())[None], counts
    return means, scatter / counts.clamp_min(1)[:, None, None], counts


def precision_matrices(covariances: Tensor, ridge: float) -> Tensor:
    """(K, D, D) covariances -> (Sigma + ridge * I)^-1 via Cholesky in float64, returned as float32.

    The ridge keeps a singular covariance (fewer source samples of a class than feature dimensions) invertible.
    """
    eye = torch.eye(covariances.shape[-1], dtype=torch.float64, device=covariances.device)
    chol = torch.linalg.cholesky(covariances.double() + ridge * eye)  # (K, D, D)
    return torch.cholesky_inverse(chol).float()


def mahalanobis_distances(features: Tensor, means: Tensor, precisions: Tensor) -> Tensor:
    """D_c(x) = (f - mu_c)^T P_c (f - mu_c): features (B, D), means (C, D), precisions (C or 1, D, D) -> (B, C)."""
    diff = features[:, None, :] - means[None]  # (B, C, D)
    if precisions.shape[0] == 1:  # tied covariance
        return torch.einsum("bcd,de,bce->bc", diff, precisions[0], diff)
    return torch.einsum("bcd,cde,bce->bc", diff, precisions, diff)


def cafa_loss(features: Tensor, logits: Tensor, means: Tensor, precisions: Tensor) -> Tensor:
    """mean_i log(D_{y_i}(x_i) / sum_c D_c(x_i)) with y_i = argmax logits_i (pseudo-label, no gradient)."""
    distances = mahalanobis_distances(features, means, precisions)  # (B, C)
    pseudo = logits.detach().argmax(dim=1)  # (B,)
    own = distances.gather(1, pseudo[:, None]).squeeze(1)  # (B,)
    # a tiny floor: a feature exactly on its class mean would give log(0)
    return torch.log(own.clamp_min(1e-12) / distances.sum(dim=1).clamp_min(1e-12)).mean()


@register_test_time("cafa")
class CAFA(NormAffineAdaptation):
    """Class-aware feature alignment for test-time adaptation (Jung et al., ICCV 2023, arXiv 2206.00205).

    ``prepare`` computes the source class means and covariances of the features the head reads, on the training
    split of the datamodule (with the source model: eval mode, running BatchNorm statistics). They are buffers of
    this module, so they are saved in the checkpoint and a later test elsewhere needs no source data; with
    ``statistics_path`` they are also read from / written to a safetensors file. At test time, each batch is
    pseudo-labelled by the model and the loss ``mean log(D_pred / sum_c D_c)`` (Mahalanobis distances ``D_c``) pulls
    features to their predicted class and away from the others, updating only the normalisation affine parameters
    with test-batch statistics, as Tent does. No public CAFA code exists; this follows the paper's equations.

    Args:
        covariance: ``class`` (one covariance per class, as in the paper) or ``tied`` (one pooled covariance:
            C times less memory, better conditioned with few source samples per class).
        ridge: added to the covariance diagonal before inversion, so a singular covariance stays invertible.
        statistics_path: optional safetensors file of the source statistics: read when it exists, written after
            computing them otherwise.
        max_source_batches: use at most this many training batches for the statistics (``None``: all).
        episodic: restore the initial state before every batch instead of adapting online (continually).
        reset_between_dataloaders: restore the initial state when the test moves to the next dataloader.
        norm: ``auto`` (BatchNorm if the model has any, else LayerNorm), ``batch``, ``layer`` or ``group``.
        optimizer: ``adam`` or ``sgd``.
        lr: learning rate.
        momentum: SGD momentum.
        betas: Adam betas.
        weight_decay: weight decay.
        steps: gradient steps per batch.
    """

    def __init__(
        self,
        covariance: Literal["class", "tied"] = "class",
        ridge: float = 1e-5,
        statistics_path: str | None = None,
        max_source_batches: int | None = None,
        episodic: bool = False,
        reset_between_dataloaders: bool = True,
        norm: NormKind = "auto",
        optimizer: Literal["adam", "sgd"] = "adam",
        lr: float = 1e-3,
        momentum: float = 0.9,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 0.0,
        steps: int = 1,
    ) -> None:
        super().__init__(episodic, reset_between_dataloaders, norm, optimizer, lr, momentum, betas, weight_decay,
                         steps)
        if covariance not in ("class", "tied"):
            raise ValueError(f"covariance must be 'class' or 'tied', got {covariance!r}")
        if ridge < 0:
            raise ValueError(f"ridge must be >= 0, got {ridge}")
        self.covariance, self.ridge = covariance, ridge
        self.statistics_path = statistics_path
        self.max_source_batches = max_source_batches
        # filled by prepare (or by loading a checkpoint / statistics_path); empty until then
        for name in _STATS:
            self.register_buffer(name, torch.empty(0))
        self.register_buffer("precisions", torch.empty(0), persistent=False)

    @property
    def has_statistics(self) -> bool:
        return self.class_means.numel() > 0

    def prepare(self, module: TransferModule, datamodule: Any) -> None:
        if not self.has_statistics and self.statistics_path and Path(self.statistics_path).is_file():
            self._load_statistics(self.statistics_path)
        if not self.has_statistics:
            self.set_statistics(*self.source_statistics(module, datamodule))
            if self.statistics_path:
                self._save_statistics(self.statistics_path)
        super().prepare(module, datamodule)

    def set_statistics(self, means: Tensor, covariances: Tensor, counts: Tensor) -> None:
        """Install source statistics: means (C, D), covariances (C or 1, D, D), counts (C,)."""
        if covariances.shape[0] not in (1, means.shape[0]) or covariances.shape[1:] != (means.shape[1],) * 2:
            raise ValueError(f"covariances {tuple(covariances.shape)} do not match means {tuple(means.shape)}")
        self.class_means = means.float()
        self.class_covariances = covariances.float()
        self.class_counts = counts.float()
        self.precisions = torch.empty(0, device=means.device)  # recomputed (with the ridge) on first use

    @torch.no_grad()
    def source_statistics(self, module: TransferModule, datamodule: Any) -> tuple[Tensor, Tensor, Tensor]:
        """Features of the source (training) split with the unadapted model -> class statistics."""
        loader = self._source_loader(datamodule)
        module.eval()  # the source model: running BatchNorm statistics
        capture = FeatureCapture(module)
        features, labels = [], []
        for i, batch in enumerate(loader):
            if self.max_source_batches is not None and i >= self.max_source_batches:
                break
            f, _ = capture(batch[0].to(module.device))
            features.append(f.float())
            labels.append(batch[1].to(module.device).long())
        feats, labs = torch.cat(features), torch.cat(labels)  # (N, D), (N,)
        num_classes = module.num_classes or int(labs.max()) + 1
        means, covs, counts = class_statistics(feats, labs, num_classes, tied=self.covariance == "tied")
        empty = [c for c in range(num_classes) if counts[c] == 0]
        if empty:
            raise ValueError(
                f"CAFA source statistics: classes {empty} have no samples in the training split; use more source "
                "data (max_source_batches=None) or covariance='tied'"
            )
        return means, covs, counts

    def _source_loader(self, datamodule: Any) -> Any:
        if datamodule is None:
            raise ValueError(
                "CAFA needs source class statistics: test with a datamodule that has a training split, pass "
                "statistics_path= of a saved statistics file, or load a checkpoint saved after a CAFA test"
            )
        try:
            return datamodule.train_dataloader()
        except RuntimeError:  # not set up for the training split yet
            datamodule.setup("fit")
            return datamodule.train_dataloader()

    def _save_statistics(self, path: str) -> None:
        from safetensors.torch import save_file

        Path(path).parent.mkdir(parents=True, exist_ok=True)
        save_file({n: getattr(self, n).detach().cpu().contiguous() for n in _STATS}, path)

    def _load_statistics(self, path: str) -> None:
        from safetensors.torch import load_file

        state = load_file(path)
        missing = [n for n in _STATS if n not in state]
        if missing:
            raise ValueError(f"statistics_path {path!r} lacks {missing}: delete it to recompute from the source data")
        self.set_statistics(*(state[n].to(self.class_means.device) for n in _STATS))

    def loss(self, features: Tensor, logits: Tensor) -> Tensor:
        if self.precisions.numel() == 0 or self.precisions.device != features.device:
            self.precisions = precision_matrices(self.class_covariances.to(features.device), self.ridge)
        means = self.class_means.to(features.device)
        return cafa_loss(features, logits, means, self.precisions)
