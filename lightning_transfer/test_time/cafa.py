"""CAFA: class-aware feature alignment by Mahalanobis distance to source class statistics."""

from __future__ import annotations

import os
from itertools import islice
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

from lightning_transfer import distributed
from lightning_transfer.registry import register_test_time
from lightning_transfer.test_time._norm import FeatureCapture, NormAffineAdaptation, NormKind
from lightning_transfer.test_time.base import AdaptableModel

_STATS = ("class_means", "class_covariances", "class_counts")


def class_moments(features: Tensor, labels: Tensor, num_classes: int, tied: bool = False
                  ) -> tuple[Tensor, Tensor, Tensor]:
    """Additive per-class sums, the pieces of the class statistics that batches and processes add up.

    features (N, D), labels (N,) -> counts (C,), sums (C, D), second moments sum f f^T: (C, D, D), or (1, D, D)
    over all samples when ``tied``; all float64. Never materialises (N, D, D).
    """
    f = features.double()
    counts = torch.bincount(labels, minlength=num_classes).double()  # (C,)
    sums = torch.zeros(num_classes, f.shape[1], dtype=torch.float64, device=f.device).index_add_(0, labels, f)
    if tied:
        return counts, sums, (f.T @ f)[None]
    second = torch.zeros(num_classes, f.shape[1], f.shape[1], dtype=torch.float64, device=f.device)
    for c in labels.unique().tolist():
        fc = f[labels == c]  # (N_c, D)
        second[c] = fc.T @ fc
    return counts, sums, second


def statistics_from_moments(counts: Tensor, sums: Tensor, second: Tensor, tied: bool = False
                            ) -> tuple[Tensor, Tensor, Tensor]:
    """counts (C,), sums (C, D), second moments (C or 1, D, D) -> means (C, D), biased covariances, counts."""
    means = sums / counts.clamp_min(1)[:, None]  # (C, D)
    if tied:  # one covariance pooled over classes: sum_c sum_i (f - mu_c)(f - mu_c)^T / N
        scatter = second[0] - torch.einsum("c,cd,ce->de", counts, means, means)
        covs = (scatter / counts.sum())[None]
    else:
        covs = second / counts.clamp_min(1)[:, None, None] - means[:, :, None] * means[:, None, :]
    return means, (covs + covs.transpose(-1, -2)) / 2, counts  # exactly symmetric for the Cholesky


def class_statistics(features: Tensor, labels: Tensor, num_classes: int, tied: bool = False
                     ) -> tuple[Tensor, Tensor, Tensor]:
    """Per-class means and (biased, 1/N_c) covariances, or one covariance pooled over classes (``tied``).

    features (N, D), labels (N,) -> means (C, D), covariances (C or 1, D, D), counts (C,); all float64.
    """
    return statistics_from_moments(*class_moments(features, labels, num_classes, tied), tied=tied)


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

    requires: ClassVar[frozenset[str]] = frozenset({"norm_layers", "linear_head", "source_data"})

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

    def check(self, module: AdaptableModel) -> None:
        super().check(module)
        if module.head is None:
            raise ValueError(
                f"CAFA aligns the features a linear head reads, and {type(module.adaptation).__name__} has no such "
                "head (its classifier is built from class names): use Tent or BNAdapt with it"
            )

    @property
    def has_statistics(self) -> bool:
        return self.class_means.numel() > 0

    def prepare(self, module: AdaptableModel, datamodule: Any) -> None:
        if not self.has_statistics and self.statistics_path and Path(self.statistics_path).is_file():
            self._load_statistics(self.statistics_path)
        if not self.has_statistics:
            self.set_statistics(*self.source_statistics(module, datamodule))
            if self.statistics_path:
                self._save_statistics(self.statistics_path)
        self._check_statistics(module)
        super().prepare(module, datamodule)

    def _check_statistics(self, module: AdaptableModel) -> None:
        """The statistics must be of this model's classes and head features (a statistics file of another model
        would fail mid-test, or align features to the wrong classes)."""
        classes, dim = self.class_means.shape
        expected_dim = getattr(module.head, "in_features", dim)
        expected_classes = module.num_classes or classes
        covs = tuple(self.class_covariances.shape)
        want_covs = (1 if self.covariance == "tied" else expected_classes, expected_dim, expected_dim)
        if (classes, dim) != (expected_classes, expected_dim) or covs != want_covs:
            where = f"statistics_path {self.statistics_path!r}" if self.statistics_path else "the loaded statistics"
            raise ValueError(
                f"CAFA: {where} hold{'s' if self.statistics_path else ''} means of {classes} classes x {dim} features "
                f"and covariances {covs}, but this model has {expected_classes} classes, {expected_dim} head features "
                f"and covariance={self.covariance!r} (covariances {want_covs}): they were computed for another model; "
                "delete the file (it is recomputed from the source data) or point statistics_path to this model's"
            )

    def set_statistics(self, means: Tensor, covariances: Tensor, counts: Tensor) -> None:
        """Install source statistics: means (C, D), covariances (C or 1, D, D), counts (C,)."""
        if covariances.shape[0] not in (1, means.shape[0]) or covariances.shape[1:] != (means.shape[1],) * 2:
            raise ValueError(f"covariances {tuple(covariances.shape)} do not match means {tuple(means.shape)}")
        self.class_means = means.float()
        self.class_covariances = covariances.float()
        self.class_counts = counts.float()
        self.precisions = torch.empty(0, device=means.device)  # recomputed (with the ridge) on first use

    @torch.no_grad()
    def source_statistics(self, module: AdaptableModel, datamodule: Any) -> tuple[Tensor, Tensor, Tensor]:
        """Features of the source (training) split with the unadapted model -> class statistics.

        The source batches follow one fixed shuffled order (so ``max_source_batches`` draws the same subset every
        run); with several processes each takes every N-th of them and the class sums are added across processes,
        so every process ends with the statistics one process computes from all the batches.
        """
        batches = self._source_batches(self._source_loader(datamodule))
        module.eval()  # the source model: running BatchNorm statistics
        capture = FeatureCapture(module)
        moments: list[Tensor] | None = None
        tied = self.covariance == "tied"
        num_classes = module.num_classes
        for batch in batches:
            f, logits = capture(batch[0].to(module.device))  # (B, D), (B, C)
            num_classes = num_classes or logits.shape[1]
            new = class_moments(f.float(), batch[1].to(module.device).long(), num_classes, tied)
            moments = list(new) if moments is None else [m + n for m, n in zip(moments, new)]
        total_counts, sums, second = self._sum_across_processes(moments, module, tied)
        means, covs, counts = statistics_from_moments(total_counts, sums, second, tied=tied)
        empty = [c for c in range(len(counts)) if counts[c] == 0]
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
        try:
            return datamodule.train_dataloader()
        except RuntimeError as err:  # this datamodule has no training split (e.g. corruption sets without one)
            raise ValueError(
                f"CAFA needs source class statistics, but {type(datamodule).__name__} has no training split ({err}): "
                "test with a datamodule that has one, pass statistics_path= of a saved statistics file, or load a "
                "checkpoint saved after a CAFA test"
            ) from None

    def _source_batches(self, loader: Any) -> Any:
        """This process's share of a fixed shuffled order of the source batches (all of them in one process)."""
        rank, world = distributed.rank_and_world()
        dataset = getattr(loader, "dataset", None)
        if dataset is None or isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__"):
            return (b for i, b in enumerate(islice(loader, self.max_source_batches)) if i % world == rank)
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))
        batches = order.split(loader.batch_size or 1)[:self.max_source_batches]
        return DataLoader(dataset, batch_sampler=[b.tolist() for b in batches[rank::world]],
                          num_workers=loader.num_workers, collate_fn=loader.collate_fn)

    @staticmethod
    def _sum_across_processes(moments: list[Tensor] | None, module: AdaptableModel, tied: bool) -> list[Tensor]:
        # a process without a batch (fewer batches than processes) contributes zeros of the common shapes
        shapes = distributed.gather_objects(None if moments is None else tuple(moments[1].shape))
        shape = next((s for s in shapes if s is not None), None)
        if shape is None:
            raise ValueError("CAFA source statistics: the training split gave no batches")
        if moments is None:
            classes, dim = shape
            sizes = [(classes,), (classes, dim), (1 if tied else classes, dim, dim)]
            moments = [torch.zeros(size, dtype=torch.float64, device=module.device) for size in sizes]
        return [distributed.sum_across_ranks_(m) for m in moments]

    def _save_statistics(self, path: str) -> None:
        from safetensors.torch import save_file

        if not distributed.is_rank_zero():  # every process holds the same statistics; one writes them
            return
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        partial = f"{path}.partial-{os.getpid()}"
        save_file({n: getattr(self, n).detach().cpu().contiguous() for n in _STATS}, partial)
        os.replace(partial, path)  # atomic: a concurrent reader never sees half a file

    def _load_statistics(self, path: str) -> None:
        from safetensors.torch import load_file

        try:
            state = load_file(path)
        except Exception as err:  # safetensors raises its own error type for a truncated or foreign file
            raise ValueError(f"statistics_path {path!r} cannot be read ({type(err).__name__}: {err}): it is not a "
                             "safetensors file of CAFA statistics; delete it to recompute from the source data"
                             ) from None
        missing = [n for n in _STATS if n not in state]
        if missing:
            raise ValueError(f"statistics_path {path!r} lacks {missing}: delete it to recompute from the source data")
        self.set_statistics(*(state[n].to(self.class_means.device) for n in _STATS))

    def loss(self, features: Tensor, logits: Tensor) -> Tensor:
        if self.precisions.numel() == 0 or self.precisions.device != features.device:
            self.precisions = precision_matrices(self.class_covariances.to(features.device), self.ridge)
        means = self.class_means.to(features.device)
        return cafa_loss(features, logits, means, self.precisions)
