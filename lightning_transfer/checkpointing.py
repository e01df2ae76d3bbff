"""Everything about checkpoint files: what a fit saves, every check on reload, safe reading, atomic writes.

The format: a checkpoint holds only what is not in the pretrained weights (trainable parameters, buffers that
training changed, the test-time method's statistics), the frozen weights' identity and digest (the backbone's and
every frozen auxiliary network's), the strategy's name, and what an exact resume needs (every process's random
state and running training sums). :class:`CheckpointFormat` writes and checks it; this module is the only place that
reads a checkpoint or weights file, always with ``torch.load(weights_only=True)`` (never unpickling code).

Atomic writes:

Lightning's ``TorchCheckpointIO`` writes through an fsspec transaction, whose local temporary file lives in the
system temporary directory; when that is another filesystem than the checkpoint (a tmpfs ``/tmp``, a cluster's
scratch), the final step is a copy into ``last.ckpt``, and a kill during it leaves a truncated checkpoint.
:class:`AtomicCheckpointIO` writes a temporary file *next to* the target, syncs it and renames it over the target,
which POSIX makes atomic: a reader sees the old checkpoint or the new one, never a part.
"""

from __future__ import annotations

import hashlib
import os
import random
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch import Trainer
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from lightning_transfer import distributed

#: the key of this package's entry in a checkpoint
CHECKPOINT_KEY = "lightning_transfer"
FORMAT_VERSION = 2

# the temporary name never contains "last": Lightning's `ckpt_path="last"` picks any file in the checkpoint folder
# whose name does, so a partial file left by a kill must not look like one
PARTIAL_PREFIX = ".partial-"


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` to a temporary file in the checkpoint's folder, ``fsync``, then rename over the target.

    Remote paths (``s3://``, ...) go to Lightning's own writer: an object store upload already appears whole or not
    at all. A :class:`~lightning_transfer.module.TransferModule` installs this in place of Lightning's default
    ``TorchCheckpointIO`` when the trainer starts (:class:`~lightning_transfer.callbacks.AtomicCheckpoints`); a
    checkpoint IO plugin you pass yourself is kept.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or not isinstance(get_filesystem(path), LocalFileSystem):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.parent / f"{PARTIAL_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
        try:
            with open(partial, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(partial, target)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        _fsync_dir(target.parent)  # make the rename itself durable


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not every platform opens directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def use_atomic_checkpoint_io(trainer: Trainer) -> None:
    """Replace the strategy's default ``TorchCheckpointIO`` by :class:`AtomicCheckpointIO` (others are kept)."""
    strategy = trainer.strategy
    if type(strategy.checkpoint_io) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()


# ---- random state ----------------------------------------------------------------------------------------------
def capture_rng_states() -> dict[str, Any]:
    """This process's torch (CPU and CUDA), numpy and Python random states, as plain tensors, lists and ints.

    Plain types keep the checkpoint loadable with ``torch.load(weights_only=True)``.
    """
    kind, keys, pos, has_gauss, cached = np.random.get_state()  # type: ignore[misc]
    version, internal, gauss = random.getstate()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [str(kind), torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss),
                  float(cached)],
        "python": [int(version), list(internal), gauss],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in states and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])


def unreadable_checkpoint(path: Any, err: BaseException, what: str = "checkpoint") -> ValueError:
    """The error for a file ``torch.load(weights_only=True)`` cannot read, naming it (as ``what``) and the fix."""
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return ValueError(f"cannot read {what} {str(path)!r} ({type(err).__name__}: {first}): it is truncated or not a "
                      "checkpoint written by fit, or it holds objects other than tensors, which are never unpickled "
                      "here (weights_only=True). Pass a complete checkpoint written by fit.")


def read_checkpoint(path: Any, what: str = "checkpoint") -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU, memory-mapped where the file allows it (cheap for a large
    file); a file that cannot be read raises :func:`unreadable_checkpoint`'s ValueError."""
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # mmap takes only torch's zip format
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001  truncated zip, not a torch file, or objects other than tensors
        raise unreadable_checkpoint(path, err, what) from err


def read_weights(path: Path) -> Any:
    """A weights file (not necessarily written by fit) as ``torch.load(weights_only=True)`` reads it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001  pickled code, a truncated file, not a torch file at all
        raise ValueError(
            f"cannot read {str(path)!r} as weights with torch.load(weights_only=True): {err}. Only tensors are "
            "loaded (never pickled code); convert the file to safetensors or a plain state dict"
        ) from err


def checkpoint_run_ids(path: str | Path) -> dict[str, str]:
    """Logger class name -> run id/version recorded in a checkpoint written by fit ({} for other files)."""
    if not Path(path).is_file():
        return {}
    checkpoint = read_checkpoint(path)
    return dict(checkpoint.get(CHECKPOINT_KEY, {}).get("loggers", {})) if isinstance(checkpoint, dict) else {}


def tensors_digest(tensors: Mapping[str, Tensor]) -> str:
    """sha256 over names, shapes, dtypes and bytes of ``tensors`` (sorted by name)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# ---- the format ------------------------------------------------------------------------------------------------
class CheckpointMismatch(ValueError):
    """A checkpoint that does not fit the model it is loaded into (another strategy, backbone or class count). It is
    raised before any step runs and names the difference and the fix, so the command line shows only the message."""


class _Model(Protocol):
    """What :class:`CheckpointFormat` reads of a model (TransferModule has it)."""

    backbone: Any
    adaptation: Any
    head: Any  # nn.Module | None
    test_time: Any
    num_classes: int

    def state_dict(self) -> dict[str, Any]: ...
    def named_parameters(self) -> Any: ...


def pretrained_parts(model: _Model) -> dict[str, Any]:
    """The frozen pretrained networks whose weights checkpoints leave out, by state-dict prefix: the backbone and
    every frozen auxiliary network of the strategy (a teacher, an old model)."""
    parts: dict[str, Any] = {"backbone": model.backbone}
    parts.update({f"adaptation.{name}": net for name, net in model.adaptation.frozen_networks().items()})
    return parts


def _part_of(key: str, prefixes: list[str]) -> str | None:
    return next((p for p in prefixes if key.startswith(f"{p}.")), None)


class CheckpointFormat:
    """What a fit's checkpoint holds and how it is checked on reload, for one model.

    Built when the model is: it remembers the pretrained parts' buffers as loaded, to tell which ones training
    changed (BatchNorm statistics, kept) from those it did not (left out with the frozen weights).
    """

    def __init__(self, model: _Model) -> None:
        self.initial_buffers = {f"{prefix}.{k}": v.detach().clone()
                                for prefix, part in pretrained_parts(model).items() for k, v in part.named_buffers()}
        self._digests: dict[tuple[Any, ...], str] = {}

    # ---- saving -----------------------------------------------------------------------------------------------
    def split(self, model: _Model, state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, dict]]:
        """(kept, omitted per pretrained part): frozen, unchanged pretrained tensors are left out."""
        # FSDP and activation checkpointing wrap submodules in place and insert their wrapper into parameter names;
        # state dict keys are the clean names
        trainable = {_unwrapped_name(n) for n, p in model.named_parameters() if p.requires_grad}
        prefixes = list(pretrained_parts(model))
        kept: dict[str, Tensor] = {}
        omitted: dict[str, dict[str, Tensor]] = {p: {} for p in prefixes}
        for key, value in state.items():
            part = _part_of(key, prefixes)
            initial = self.initial_buffers.get(key)
            unchanged_buffer = initial is not None and initial.shape == value.shape and torch.equal(
                initial, value.detach().to(initial.device))
            frozen_param = part is not None and key not in trainable and initial is None
            if part is not None and (frozen_param or unchanged_buffer):
                omitted[part][key] = value
            else:
                kept[key] = value
        return kept, omitted

    def digest(self, omitted: Mapping[str, Tensor], dtype: str | None = None) -> str:
        """The fingerprint of left-out tensors; with ``dtype`` (the floating type they were saved in, e.g.
        ``torch.bfloat16`` under ``precision: bf16-true``), of these tensors cast to it first: Lightning loads a
        checkpoint into the model before casting it, and the cast rounds the same way both times."""
        if dtype is not None:
            target = getattr(torch, dtype.removeprefix("torch."), None)
            if not isinstance(target, torch.dtype):
                raise CheckpointMismatch(f"checkpoint names {dtype!r} as its frozen tensors' dtype, which is not a "
                                         "torch dtype: it was not written by this package; pass one written by fit")
            omitted = {k: v.to(target) if v.is_floating_point() else v for k, v in omitted.items()}
        key = (tuple(sorted(omitted)), dtype)
        if key not in self._digests:
            self._digests = {key: tensors_digest(omitted)}  # one entry: the model's layout rarely changes
        return self._digests[key]

    def save(self, model: _Model, checkpoint: dict[str, Any], extra: dict[str, Any]) -> None:
        """Replace ``checkpoint["state_dict"]`` by what must be kept and add this package's entry (with ``extra``:
        the resume state)."""
        kept, omitted = self.split(model, checkpoint["state_dict"])
        checkpoint["state_dict"] = kept
        backbone = omitted.pop("backbone")
        checkpoint[CHECKPOINT_KEY] = {
            "format_version": FORMAT_VERSION,
            "backbone": model.backbone.identity(),
            "backbone_class": type(model.backbone).__name__,
            "backbone_random_init": bool(model.backbone.random_init),
            "adaptation": type(model.adaptation).__name__,
            "omitted_keys": len(backbone),
            "omitted_digest": self.digest(backbone),
            "omitted_dtype": _floating_dtype(backbone),
            "frozen_networks": {
                prefix: {"identity": net.identity(), "keys": len(omitted[prefix]),
                         "digest": tensors_digest(omitted[prefix]), "dtype": _floating_dtype(omitted[prefix])}
                for prefix, net in pretrained_parts(model).items() if prefix != "backbone"},
            "num_classes": model.num_classes,
            "test_time": type(model.test_time).__name__ if model.test_time is not None else None,
            **extra,
        }

    # ---- loading ----------------------------------------------------------------------------------------------
    def load(self, model: _Model, checkpoint: dict[str, Any]) -> dict[str, Any] | None:
        """Check ``checkpoint`` against ``model`` (raising :class:`CheckpointMismatch` with the difference and the
        fix) and complete its state dict with the frozen pretrained tensors it left out. Returns this package's
        entry (None for a full checkpoint written elsewhere, which strict loading checks)."""
        state = self._with_test_time_state(model, checkpoint["state_dict"])
        checkpoint["state_dict"] = state
        own = model.state_dict()
        meta = checkpoint.get(CHECKPOINT_KEY)
        self._check_kind(model, meta)
        own_state = {k[len("adaptation."):]: v for k, v in state.items() if k.startswith("adaptation.")}
        try:  # a reason the strategy knows (a class-specific CoOp context on another class count) before the list
            model.adaptation.check_checkpoint_state(own_state)
        except ValueError as err:
            raise CheckpointMismatch(str(err)) from err
        _check_classes(model, meta)
        _check_keys(state, own)
        if meta is None:
            return None
        self._check_complete(model, state, own)
        omitted = {k: v for k, v in own.items() if k not in state}
        self._check_frozen(model, meta, omitted)
        checkpoint["state_dict"] = {**omitted, **state}
        return meta

    def _check_kind(self, model: _Model, meta: dict[str, Any] | None) -> None:
        if meta is None:
            return
        # the strategy first: another strategy's keys and shapes differ too, but that list would not say why
        strategy = type(model.adaptation).__name__
        if meta.get("adaptation", strategy) != strategy:
            raise CheckpointMismatch(
                f"checkpoint was trained with model.adaptation={meta['adaptation']} but this model uses {strategy}: "
                "build the model with the same backbone and model.adaptation as the run that saved it (the CLI does "
                "this from the checkpoint's hyperparameters)")
        # then the kind of backbone (timm, hf_clip, ...): its keys differ too, but that list would not say why
        own_kind: str | None = type(model.backbone).__name__
        saved_kind: str | None = meta.get("backbone_class")
        if saved_kind is None:  # format 1: the kind is the identity's prefix (``timm:...``)
            saved_kind, own_kind = _identity_kind(meta["backbone"]), _identity_kind(model.backbone.identity())
        if saved_kind != own_kind:
            raise CheckpointMismatch(
                f"checkpoint was trained on backbone {meta['backbone']} but this model's backbone is "
                f"{model.backbone.identity()}, another kind: build the model with model.backbone as the run that "
                "saved it (the CLI does this from the checkpoint's hyperparameters)")

    def _check_complete(self, model: _Model, state: Mapping[str, Tensor], own: dict[str, Tensor]) -> None:
        # what this model trains (parameters, the head, the strategy's tensors) must all be in the checkpoint: else
        # the count of frozen tensors would be off by them, and its message would blame the backbone
        trained, _ = self.split(model, own)
        lacking = [k for k in trained if k not in state and k not in self.initial_buffers]
        if lacking:
            raise CheckpointMismatch(
                f"checkpoint lacks {len(lacking)} tensors this model trains ({', '.join(lacking[:4])}"
                f"{', ...' if len(lacking) > 4 else ''}): it is incomplete (edited, or not the file fit wrote), or "
                "the model is built with other settings than the run that saved it (model.adaptation's init_args, "
                "e.g. LoRA's target_modules): pass the checkpoint as fit wrote it, with the run's settings")

    def _check_frozen(self, model: _Model, meta: dict[str, Any], omitted: dict[str, Tensor]) -> None:
        prefixes = list(pretrained_parts(model))
        by_part: dict[str, dict[str, Tensor]] = {p: {} for p in prefixes}
        for key, value in omitted.items():
            by_part[_part_of(key, prefixes) or "backbone"][key] = value
        backbone = by_part.pop("backbone")
        if len(backbone) != meta["omitted_keys"]:
            raise CheckpointMismatch(
                f"checkpoint was saved from a model whose frozen backbone had {meta['omitted_keys']} tensors, but this "
                f"model has {len(backbone)} tensors the checkpoint does not hold: build it with the same backbone and "
                f"model.adaptation as the run that saved it (checkpoint backbone: {meta['backbone']})")
        if self.digest(backbone, meta.get("omitted_dtype")) != meta["omitted_digest"]:
            if meta.get("backbone_random_init", False):
                raise CheckpointMismatch(
                    f"checkpoint was trained on a randomly initialised frozen backbone ({meta['backbone']}), whose "
                    "weights a checkpoint cannot rebuild: train on pretrained weights or a checkpoint_path, or with a "
                    "strategy that trains the whole backbone")
            raise CheckpointMismatch(
                f"checkpoint was trained on top of backbone {meta['backbone']}, but this model's frozen backbone "
                f"weights ({model.backbone.identity()}) differ from those: load the same pretrained weights "
                "(model.backbone pretrained/checkpoint_path) the run used")
        saved = meta.get("frozen_networks", {})
        for prefix, tensors in by_part.items():
            info = saved.get(prefix)
            current = pretrained_parts(model)[prefix].identity()  # type: ignore[operator]
            if info is None or info["keys"] != len(tensors) or \
                    self.digest(tensors, info.get("dtype")) != info["digest"]:
                was = f"{info['identity']}" if info else "none"
                raise CheckpointMismatch(
                    f"the frozen network {prefix} ({current}) is not the one the run that saved this checkpoint used "
                    f"(that run's: {was}): its weights differ. Build it from the same weights (the teacher's or old "
                    "model's backbone config or fit checkpoint) as that run")

    @staticmethod
    def _with_test_time_state(model: _Model, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """A test-time method's saved state (CAFA statistics) loads only into a model that has one; a model with a
        test-time method loads checkpoints without that state (trained before it was chosen) as they are."""
        prefix = "test_time."
        if model.test_time is None:
            if any(k.startswith(prefix) for k in state):
                rank_zero_info("the checkpoint holds a test-time method's state (statistics), which this model, "
                               "built without a test-time method, leaves unused: pass model.test_time to use it")
            return {k: v for k, v in state.items() if not k.startswith(prefix)}
        model.test_time.fit_state_shapes({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
        own = {f"{prefix}{k}": v for k, v in model.test_time.state_dict().items()}
        return {**own, **state}


def _check_classes(model: _Model, meta: dict[str, Any] | None) -> None:
    saved = (meta or {}).get("num_classes")
    if model.head is not None and saved and model.num_classes and saved != model.num_classes:
        raise CheckpointMismatch(
            f"checkpoint head has {saved} classes but this model has num_classes={model.num_classes} (from the "
            "data): test on data with the classes the model was trained on, or train a new head")


def _check_keys(state: Mapping[str, Tensor], own: Mapping[str, Tensor]) -> None:
    unexpected = [k for k in state if k not in own]
    bad = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
           for k in state if k in own and state[k].shape != own[k].shape]
    if unexpected or bad:
        raise CheckpointMismatch(
            "checkpoint does not match this model: "
            + (f"unexpected keys {unexpected[:6]}; " if unexpected else "")
            + (f"shape mismatches {bad[:6]}; " if bad else "")
            + "build the model with the same backbone and model.adaptation as the run that saved it")


def resume_states(meta: dict[str, Any] | None) -> tuple[list[Any] | None, list[Any] | None]:
    """(every process's random states, every process's training sums) of a checkpoint's entry."""
    meta = meta or {}
    return meta.get("rng_states"), meta.get("train_sums")


def restore_process_rng(states: list[dict[str, Any]] | None) -> None:
    """This process's random state from a checkpoint's list of every process's (another process count: kept)."""
    rank, world = distributed.rank_and_world()
    if states and len(states) == world:  # with another process count the shards differ anyway
        restore_rng_states(states[rank])


def _floating_dtype(tensors: Mapping[str, Tensor]) -> str | None:
    """The dtype of the floating tensors (one, as a precision plugin casts them all), e.g. ``torch.float32``."""
    return next((str(t.dtype) for t in tensors.values() if t.is_floating_point()), None)


def _identity_kind(identity: str) -> str | None:
    """``timm`` of ``timm:vit_base_patch16_224 (pretrained)``; None for identities without a kind prefix."""
    kind, colon, _ = identity.partition(":")
    return kind if colon and " " not in kind else None


def _unwrapped_name(name: str) -> str:
    """A parameter name without the wrapper modules FSDP and activation checkpointing insert."""
    for wrapper in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module."):
        name = name.replace(wrapper, "")
    return name


def load_fit_checkpoint(path: str | Path, module_class: Any, **overrides: Any) -> Any:
    """A model rebuilt from a fit checkpoint: its recorded hyperparameters (``overrides`` win), the pretrained weights
    its configuration names, and the checkpoint's tensors, with every check of :meth:`CheckpointFormat.load`."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist: pass a .ckpt written by fit")
    checkpoint = read_checkpoint(file)
    if not isinstance(checkpoint, dict) or "hyper_parameters" not in checkpoint or "state_dict" not in checkpoint:
        raise ValueError(f"{str(path)!r} is not a checkpoint written by fit (no hyperparameters and state dict)")
    model = module_class(**{**checkpoint["hyper_parameters"], **overrides})
    model.on_load_checkpoint(checkpoint)
    model.load_state_dict(checkpoint["state_dict"], strict=True)
    return model
