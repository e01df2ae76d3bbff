"""Shared machinery of the normalisation-based test-time methods (BN-adapt, Tent, CAFA).

Which layers are adapted, how they are switched to test-batch statistics, how the model is run so that its
features and logits come out of one forward pass, and the online/episodic state (parameters + optimizer) that
:meth:`reset` restores.
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar, Literal

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from lightning_transfer import distributed
from lightning_transfer.test_time.base import AdaptableModel, TestTimeAdaptation

NormKind = Literal["auto", "batch", "layer", "group"]
_KINDS: dict[str, tuple[type[nn.Module], ...]] = {
    "batch": distributed.BATCH_NORM_TYPES,
    "layer": (nn.LayerNorm,),
    "group": (nn.GroupNorm,),
}


def model_modules(module: AdaptableModel) -> dict[str, nn.Module]:
    """The parts of the model a test-time method may touch (never the test-time method itself)."""
    parts = {"backbone": module.backbone, "adaptation": module.adaptation, "head": module.head}
    return {k: v for k, v in parts.items() if v is not None}


def find_norm_layers(module: AdaptableModel, norm: NormKind) -> tuple[str, list[nn.Module]]:
    """(resolved kind, layers): ``auto`` picks BatchNorm when the model has any (CNNs), else LayerNorm (ViTs)."""
    found: dict[str, list[nn.Module]] = {kind: [] for kind in _KINDS}
    for part in model_modules(module).values():
        for m in part.modules():
            for kind, types in _KINDS.items():
                if isinstance(m, types):
                    found[kind].append(m)
    if norm == "auto":
        norm = next((k for k in ("batch", "layer", "group") if found[k]), "batch")
    if norm not in _KINDS:
        raise ValueError(f"norm must be 'auto', 'batch', 'layer' or 'group', got {norm!r}")
    return norm, found[norm]


def tracking_state(layers: list[nn.Module]) -> list[tuple[nn.Module, bool]]:
    """Each BatchNorm layer's ``track_running_stats``, which :func:`use_batch_statistics` turns off."""
    return [(m, bool(m.track_running_stats)) for m in layers if isinstance(m, distributed.BATCH_NORM_TYPES)]


def restore_tracking(saved: list[tuple[nn.Module, bool]]) -> None:
    for m, tracking in saved:
        setattr(m, "track_running_stats", tracking)  # noqa: B010 (nn.Module's __setattr__ typing rejects a bool)


def use_batch_statistics(layers: list[nn.Module]) -> None:
    """BatchNorm normalises with the test batch's statistics and leaves its running buffers untouched.

    Train mode makes BN use batch statistics; ``track_running_stats=False`` stops it updating (and so changing)
    the source running statistics, which stay in the state dict; in eval mode they are used again as before.
    """
    for m in layers:
        if isinstance(m, distributed.BATCH_NORM_TYPES):
            m.track_running_stats = False  # type: ignore[assignment]
            m.train()


def check_test_batch_size(method: TestTimeAdaptation, kind: str, datamodule: Any) -> None:
    """BatchNorm on test-batch statistics needs several images a batch: one image is an error, few a warning."""
    if kind != "batch":  # LayerNorm and GroupNorm normalise each sample on its own
        return
    size = getattr(datamodule, "batch_size", None)
    if not isinstance(size, int):
        return
    name = type(method).__name__
    if size < 2:
        raise ValueError(f"{name} normalises BatchNorm with test-batch statistics, which one image per batch "
                         f"(data.init_args.batch_size={size}) cannot give: set batch_size to 64 or more, as the "
                         "published results use")
    if size < 16:
        rank_zero_warn(f"{name} with test batches of {size} images: BatchNorm statistics of so few images are noisy "
                       "and accuracy drops (the published results use 64-200); compare methods at one batch size")


def affine_parameters(layers: list[nn.Module]) -> list[nn.Parameter]:
    params = []
    for m in layers:
        for p in (getattr(m, "weight", None), getattr(m, "bias", None)):
            if isinstance(p, nn.Parameter):
                params.append(p)
    return params


class FeatureCapture:
    """Run the model once and keep the features its head read, so features and logits share one forward pass."""

    def __init__(self, module: AdaptableModel) -> None:
        self.module = module
        self.features: Tensor | None = None

    def __call__(self, inputs: Tensor) -> tuple[Tensor, Tensor]:
        head = self.module.head
        if head is None:
            raise ValueError(
                f"{type(self.module.adaptation).__name__} has no classification head whose input features a "
                "class-aware test-time method can align: use a strategy with a linear head, or Tent / BNAdapt"
            )
        handle = head.register_forward_pre_hook(self._keep)
        try:
            logits = self.module(inputs)  # (B, C)
        finally:
            handle.remove()
        assert self.features is not None
        features, self.features = self.features, None
        return features, logits  # (B, D), (B, C)

    def _keep(self, _: nn.Module, args: tuple[Any, ...]) -> None:
        self.features = args[0]


class NormAffineAdaptation(TestTimeAdaptation):
    """Base of the gradient methods that update normalisation affine parameters (Tent, CAFA).

    Args:
        episodic: restore the initial state before every batch instead of adapting online (continually).
        reset_between_dataloaders: restore the initial state when the test moves to the next dataloader
            (e.g. the next corruption type).
        norm: which normalisation layers to use test statistics in and update: ``auto`` (BatchNorm if the model
            has any, else LayerNorm), ``batch``, ``layer`` or ``group``.
        optimizer: ``adam`` or ``sgd`` (momentum, Nesterov), as in Tent's ``setup_optimizer``.
        lr: learning rate.
        momentum: SGD momentum.
        betas: Adam betas.
        weight_decay: weight decay.
        steps: gradient steps per batch.
    """

    requires: ClassVar[frozenset[str]] = frozenset({"norm_layers"})

    def __init__(
        self,
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
        super().__init__(episodic, reset_between_dataloaders)
        if norm not in ("auto", *_KINDS):
            raise ValueError(f"norm must be 'auto', 'batch', 'layer' or 'group', got {norm!r}")
        if optimizer not in ("adam", "sgd"):
            raise ValueError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}")
        if lr <= 0 or steps < 1:
            raise ValueError(f"lr must be > 0 and steps >= 1, got lr={lr}, steps={steps}")
        self.norm, self.optimizer_name, self.lr, self.momentum = norm, optimizer, lr, momentum
        self.betas: tuple[float, float] = (float(betas[0]), float(betas[1]))
        self.weight_decay, self.steps = weight_decay, steps
        self.optimizer: torch.optim.Optimizer | None = None
        self.layers: list[nn.Module] = []
        self.params: list[nn.Parameter] = []
        self._initial: tuple[list[Tensor], dict[str, Any]] | None = None
        self._direct = False
        self._checked = False
        self._saved: tuple[list[tuple[nn.Parameter, bool]], list[tuple[nn.Module, bool]]] | None = None

    def loss(self, features: Tensor, logits: Tensor) -> Tensor:
        """The unsupervised objective on one batch: features (B, D), logits (B, C) -> scalar."""
        raise NotImplementedError

    def check(self, module: AdaptableModel) -> None:
        self._norm_layers(module)

    def _norm_layers(self, module: AdaptableModel) -> tuple[str, list[nn.Module], list[nn.Parameter]]:
        kind, layers = find_norm_layers(module, self.norm)
        params = affine_parameters(layers)
        if not params:
            kinds: tuple[NormKind, ...] = ("batch", "layer", "group")
            others = [k for k in kinds if k != kind and affine_parameters(find_norm_layers(module, k)[1])]
            fix = (f"choose norm={others[0]!r} to match the model" if others else
                   "the model has no normalisation layers to adapt: use a test-time method that updates none")
            raise ValueError(f"{type(self).__name__} found no {kind}-norm layers with affine parameters in "
                             f"{type(module.backbone).__name__}: {fix}")
        return kind, layers, params

    def prepare(self, module: AdaptableModel, datamodule: Any) -> None:
        kind, self.layers, self.params = self._norm_layers(module)
        check_test_batch_size(self, kind, datamodule)
        self._saved = ([(p, p.requires_grad) for part in model_modules(module).values() for p in part.parameters()],
                       tracking_state(self.layers))
        for part in model_modules(module).values():  # only the affine parameters receive gradients (Tent)
            part.requires_grad_(False)
        for p in self.params:
            p.requires_grad_(True)
        use_batch_statistics(self.layers)
        self.optimizer = self._make_optimizer()
        self._initial = ([p.detach().clone() for p in self.params], copy.deepcopy(self.optimizer.state_dict()))
        self._direct = self._checked = False

    def _make_optimizer(self) -> torch.optim.Optimizer:
        if self.optimizer_name == "adam":
            return torch.optim.Adam(self.params, lr=self.lr, betas=self.betas, weight_decay=self.weight_decay)
        return torch.optim.SGD(self.params, lr=self.lr, momentum=self.momentum, nesterov=self.momentum > 0,
                               weight_decay=self.weight_decay)

    def reset(self) -> None:
        if self._initial is None or self.optimizer is None:
            return
        params, opt_state = self._initial
        with torch.no_grad():
            for p, saved in zip(self.params, params):
                p.copy_(saved)
        self.optimizer.load_state_dict(copy.deepcopy(opt_state))

    def release(self, module: AdaptableModel) -> None:
        self.reset()
        if self._saved is not None:
            flags, tracking = self._saved
            for p, flag in flags:
                p.requires_grad_(flag)
            restore_tracking(tracking)
            self._saved = None

    def features_and_logits(self, module: AdaptableModel, inputs: Tensor) -> tuple[Tensor, Tensor]:
        """One forward pass of the model as its strategy runs it, keeping the head's input features.

        Some strategies compute frozen features without autograd (LinearProbe, PartialFreeze's frozen blocks), so
        no gradient would reach their normalisation layers. On the first batch that is detected; if running
        ``head(backbone(x))`` gives the same logits, that path is used from then on, otherwise the error says so.
        """
        capture = FeatureCapture(module)
        if self._direct:
            features = module.backbone(inputs)  # (B, D)
            return features, module.head(features)  # type: ignore[misc]
        features, logits = capture(inputs)
        if self._checked:
            return features, logits
        self._checked = True
        if not self._reaches_all(logits):
            with torch.no_grad():
                direct = module.head(module.backbone(inputs))  # type: ignore[misc]
            if direct.shape != logits.shape or not torch.allclose(direct, logits, atol=1e-4, rtol=1e-4):
                raise ValueError(
                    f"{type(module.adaptation).__name__} runs part of the model without gradients and its forward "
                    f"is not head(backbone(x)), so {type(self).__name__} cannot update the normalisation layers"
                )
            self._direct = True
            return self.features_and_logits(module, inputs)
        return features, logits

    def _reaches_all(self, logits: Tensor) -> bool:
        if not logits.requires_grad:
            return False
        grads = torch.autograd.grad(logits.sum(), self.params, retain_graph=True, allow_unused=True)
        return all(g is not None for g in grads)

    def adapt(self, module: AdaptableModel, batch: Any) -> Tensor:
        if self.optimizer is None:
            raise RuntimeError(f"{type(self).__name__}.adapt called before prepare(module, datamodule)")
        if self.episodic:
            self.reset()
        use_batch_statistics(self.layers)  # Lightning may have called eval() since the last batch
        inputs = batch[0] if isinstance(batch, (list, tuple)) else batch
        first: Tensor | None = None
        # under DDP: BatchNorm statistics and gradients of the batch all processes see together, so N processes
        # with batch B adapt exactly as one process with batch N * B
        with distributed.global_batch_statistics(self.layers):
            for _ in range(self.steps):
                features, logits = self.features_and_logits(module, inputs)
                loss = self.loss(features, logits)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                distributed.average_gradients_(self.params)
                self.optimizer.step()
                if first is None:
                    first = logits.detach()  # the prediction made before this batch's update (as Tent returns)
        self.optimizer.zero_grad(set_to_none=True)
        assert first is not None
        return first
