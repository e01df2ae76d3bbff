"""TransferCLI: the LightningCLI behind ``python -m lightning_transfer {fit,validate,test,predict}``.

A LightningCLI in omegaconf mode: several ``--config`` files compose, components are chosen by ``class_path`` (short
class names work: ``--model.adaptation=LoRA``), and ``data.num_classes`` / ``data.class_names`` / ``data.task`` are
linked into the model. The other subcommands (list, export, bench, merge) are dispatched by ``__main__``.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import importlib
import inspect
import json
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.callbacks.progress import ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

import lightning_transfer  # noqa: F401  (fills the registries)
from lightning_transfer.callbacks.efficiency import EfficiencyMonitor
from lightning_transfer.callbacks.predictions import PredictionWriter
from lightning_transfer.callbacks.progress import ThrottledProgressBar
from lightning_transfer.callbacks.report import FitReport
from lightning_transfer.checkpointing import PARTIAL_PREFIX, checkpoint_run_ids, read_checkpoint
from lightning_transfer.datamodules.base import TransferDataModule
from lightning_transfer.module import TransferModule
from lightning_transfer.registry import BACKBONES, DATAMODULES, HEADS, STRATEGIES, TEST_TIME, Registry

# the config keys that choose a registered component, and the registry each one draws from
_COMPONENT_KEYS: dict[str, Registry] = {
    "model.adaptation": STRATEGIES,
    "model.backbone": BACKBONES,
    "model.test_time": TEST_TIME,
    "model.head": HEADS,
    "data": DATAMODULES,
}


def _class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


# LightningCLI's own --optimizer/--lr_scheduler would replace configure_optimizers and so drop the strategy's parameter
# groups (no weight decay on norms and biases, layer decay, backbone lr scale): they mean the model's settings here
_MODEL_FLAGS = ("--optimizer", "--lr_scheduler")


def resolve_registry_names(argv: list[str]) -> list[str]:
    """Let the command line name components by registry name: ``--model.adaptation=linear_probe``; ``--optimizer``
    and ``--lr_scheduler`` set ``model.optimizer`` / ``model.lr_scheduler``, which keep the parameter groups."""
    out = [f"--model.{arg[2:]}" if arg.split("=", 1)[0].split(".", 1)[0] in _MODEL_FLAGS else arg for arg in argv]
    for i, arg in enumerate(out):
        for key, registry in _COMPONENT_KEYS.items():
            flag = f"--{key}"
            if arg.startswith(flag + "=") and registry.find(arg[len(flag) + 1:]) is not None:
                out[i] = f"{flag}={_class_path(registry.get(arg[len(flag) + 1:]))}"
            elif arg in (flag, f"{flag}.help") and i + 1 < len(out) and registry.find(out[i + 1]) is not None:
                out[i + 1] = _class_path(registry.get(out[i + 1]))  # also `--model.adaptation.help lora`
            elif arg.startswith(f"{flag}.help=") and registry.find(arg[len(flag) + 6:]) is not None:
                out[i] = f"{flag}.help={_class_path(registry.get(arg[len(flag) + 6:]))}"
    return out


class TransferArgumentParser(LightningArgumentParser):
    """Short errors: the message, the likely fix and the help command, without argparse's full usage block.

    Adds the registered choices to errors about a component that cannot be resolved, and the closest known keys to
    an unknown option (``--trainer.max_epohcs`` -> ``--trainer.max_epochs``).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if not args and "prog" not in kwargs and Path(sys.argv[0]).name == "__main__.py":
            kwargs["prog"] = "python -m lightning_transfer"  # not "__main__.py" in usage lines and tips
        super().__init__(*args, **kwargs)

    has_subcommands = False

    def add_subcommands(self, *args: Any, **kwargs: Any) -> Any:
        self.has_subcommands = True
        return super().add_subcommands(*args, **kwargs)

    def print_usage(self, file: Any = None) -> None:
        """One line: the usage block of ``fit`` (60 lines, every option) buried the error printed after it."""
        prog = self.prog.replace(" [options]", "")
        subcommand = " SUBCOMMAND" if self.has_subcommands else ""
        (file or sys.stdout).write(f"usage: {prog}{subcommand} [-c CONFIG] [--KEY=VALUE ...]\n")

    def error(self, message: str, ex: Exception | None = None):  # type: ignore[override]
        unknown_option = _unknown_option_hint(message)
        if unknown_option:  # the class is right, an option of it is not: listing the other classes would mislead
            super().error(f"{message}\n{unknown_option}", ex)
        close_keys = _close_keys_hint(message, getattr(ex, "subcommand_parser", None) or self)
        if close_keys:
            super().error(f"{message}\n{close_keys}", ex)
        for key, registry in _COMPONENT_KEYS.items():
            if f'"{key}"' in message or f"'{key}'" in message or f"key {key}:" in message:
                choices = ", ".join(f"{cls.__name__} ({name})" for name, cls in registry.items())
                message += (f"\nRegistered choices for {key} ({registry.kind}): {choices}. Choose one with "
                            f"--{key}=<ClassName> (see `python -m lightning_transfer list`).")
                break
        super().error(message, ex)


def _close_keys_hint(message: str, parser: argparse.ArgumentParser) -> str | None:
    """For an unknown key (on the command line or in a config file): the parser's keys closest to it."""
    found = re.findall(r"(?<=\s)--([\w.]+)", message.partition("unrecognized arguments:")[2])
    found += re.findall(r"Subcommand '\w+' does not accept option '([\w.]+)'", message)
    found += [f"{group}.{key}" for group, key in re.findall(r"Group '([\w.]+)' does not accept option '([\w.]+)'",
                                                            message)]
    if not found:
        return None
    keys = sorted(set(re.findall(r"--([\w]+\.[\w.]+)", parser.format_help())))
    hints = []
    for key in dict.fromkeys(found):
        close = difflib.get_close_matches(key, keys, n=3, cutoff=0.75)
        if close:
            hints.append(f"--{key}: did you mean {' or '.join('--' + c for c in close)}?")
    return "\n".join(hints) or None


def _unknown_option_hint(message: str) -> str | None:
    """For jsonargparse's "Problem with given class_path 'X' ... Option 'y' is not accepted": X's options."""
    found = re.search(r"class_path '([\w.]+)'[^\n]*\n\s*Option '(\w+)' is not accepted", message)
    if found is None:
        return None
    cls = _import_class(found.group(1))
    if not isinstance(cls, type):
        return None
    options = [name for name in inspect.signature(cls).parameters if name not in ("args", "kwargs")]
    close = difflib.get_close_matches(found.group(2), options, n=3, cutoff=0.4)
    guess = f"did you mean {' or '.join(map(repr, close))}? " if close else ""
    return f"{cls.__name__} has no option {found.group(2)!r}; {guess}{cls.__name__}'s options: {', '.join(options)}"


class LoggedConfigCallback(SaveConfigCallback):
    """Save the resolved config next to the run (never over an existing file) and log it to every logger.

    Without a logger it goes to ``default_root_dir`` as ``config.yaml``, or ``config-1.yaml``, ``config-2.yaml`` ...
    when earlier runs into that folder left theirs (checkpoints there are numbered the same way by Lightning).
    """

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        config = self.parser.dump(self.config, skip_none=False, format="yaml")
        if not trainer.loggers:
            root = Path(trainer.default_root_dir)
            root.mkdir(parents=True, exist_ok=True)
            path, number = root / "config.yaml", 0
            while path.exists():
                number += 1
                path = root / f"config-{number}.yaml"
            path.write_text(config)
            rank_zero_info(f"the resolved config is saved as {path}")
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.experiment.config.update({"config": self.parser.dump(self.config, skip_none=False,
                                                                          format="json_indented")},
                                                allow_val_change=True)
                flat = json.loads(self.parser.dump(self.config, skip_none=False, format="json"))
                logger.experiment.config.update(_flatten(flat), allow_val_change=True)
                run_dir = Path(logger.experiment.dir)
            else:
                logger.log_hyperparams({"config": config})
                # the logger's own folder, not trainer.log_dir: that is a broadcast every process must join, and this
                # runs on rank 0 only (under DDP the other processes waited at their next barrier for ever)
                run_dir = Path(getattr(logger, "log_dir", None) or logger.save_dir or trainer.default_root_dir or ".")
            path = run_dir / "config.yaml"
            if path.exists():
                raise RuntimeError(f"{path} exists already; refusing to overwrite a previous run's config")
            run_dir.mkdir(parents=True, exist_ok=True)
            path.write_text(config)


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}." if prefix or k else ""))
        return out if out or not prefix else {prefix.rstrip("."): None}
    return {prefix.rstrip("."): tree}


class TransferCLI(LightningCLI):
    """LightningCLI for :class:`TransferModule` and any :class:`TransferDataModule`."""

    def __init__(self, args: list[str] | None = None, run: bool = True, **kwargs: Any) -> None:
        kwargs.setdefault("save_config_callback", LoggedConfigCallback)
        kwargs.setdefault("save_config_kwargs", {"save_to_log_dir": False})
        kwargs.setdefault("parser_kwargs", {"parser_mode": "omegaconf"})
        kwargs.setdefault("parser_class", TransferArgumentParser)
        kwargs.setdefault("auto_configure_optimizers", False)  # model.optimizer keeps the parameter groups
        if args is None:  # the real command line: rewrite it in place (passing it as args too makes Lightning warn)
            sys.argv[1:] = resolve_registry_names(sys.argv[1:])
        else:
            args = resolve_registry_names(list(args))
        # the model settings given as flags: with --ckpt_path, the checkpoint's own settings replace the model config,
        # so a flag that asks for something else must be refused rather than ignored
        self._model_flags = _model_flags(sys.argv[1:] if args is None else args)
        super().__init__(TransferModule, TransferDataModule, subclass_mode_data=True, args=args, run=run, **kwargs)

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.class_names", "model.class_names", apply_on="instantiate")
        parser.link_arguments("data.task", "model.task", apply_on="instantiate")
        parser.add_lightning_class_args(EfficiencyMonitor, "efficiency")

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        super().parse_arguments(parser, args)
        with _setup_phase():
            self._load_ckpt_settings(parser)

    def _load_ckpt_settings(self, parser: LightningArgumentParser) -> None:
        # LightningCLI then replaces the model config with the checkpoint's hyperparameters. Here, first: a missing
        # or unreadable file and 'last' get resolved or refused with a message, and flags the checkpoint's settings
        # would silently override are refused. The test-time method is chosen when testing (`test
        # --model.test_time=CAFA --ckpt_path run.ckpt`): it is not among the recorded hyperparameters.
        sub = self.config.get("subcommand")
        ckpt_path = self.config[sub].get("ckpt_path") if sub else None
        if not ckpt_path:
            return
        if ckpt_path not in _NAMED_CHECKPOINTS and not str(ckpt_path).startswith("registry:") \
                and not Path(ckpt_path).is_file():
            raise FileNotFoundError(f"--ckpt_path {ckpt_path!r} does not exist: pass a .ckpt written by fit (e.g. "
                                    "<run folder>/checkpoints/last.ckpt), or 'last' to resume the newest run")
        if sub != "fit" and ckpt_path in ("last", "best"):
            self.config[sub].ckpt_path = _evaluated_checkpoint(sub, ckpt_path, self.config[sub].trainer)
        if sub == "fit":
            continue_run(self.config[sub])
        path = self.config[sub].get("ckpt_path")
        if not path or not Path(path).is_file():
            return
        checkpoint = read_checkpoint(path)
        hparams = dict(checkpoint.get("hyper_parameters") or {}) if isinstance(checkpoint, dict) else {}
        hparams.pop("_instantiator", None)  # written by older versions of this package, through LightningCLI
        if not hparams:
            return
        before = self.config[sub].model.clone()
        after = parser.parse_object({sub: {"model": hparams}}, self.config.clone())[sub].model
        _check_flags_kept(self._model_flags, before, after, path)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        # The CLI's progress bar (see ThrottledProgressBar) joins the trainer here rather than the config, so the saved
        # config.yaml stays as written: rerun with `--trainer.enable_progress_bar=false` or another bar, it still works.
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        trainer = config.get("trainer") or {}

        def setting(key: str) -> Any:
            return kwargs[key] if key in kwargs else trainer.get(key)

        listed = _as_list(setting("callbacks")) + _as_list(self.trainer_defaults.get("callbacks"))
        wanted = setting("enable_progress_bar") is not False and not setting("barebones")
        if wanted and not any(isinstance(cb, ProgressBar) for cb in listed):
            kwargs["callbacks"] = [*_as_list(setting("callbacks")), ThrottledProgressBar()]
        if self.subcommand == "fit" and not any(isinstance(cb, FitReport) for cb in listed):
            # a line per epoch and a summary at the end: a fit from the command line shows how it went
            kwargs["callbacks"] = [*_as_list(kwargs.get("callbacks", setting("callbacks"))), FitReport()]
        if self.subcommand == "predict" and not any(isinstance(cb, BasePredictionWriter) for cb in listed):
            # predict's outputs go to files in the run folder (Lightning would only return them to the caller)
            kwargs["callbacks"] = [*_as_list(kwargs.get("callbacks", setting("callbacks"))), PredictionWriter()]
        return super().instantiate_trainer(**kwargs)

    def instantiate_classes(self) -> None:
        with _setup_phase():
            super().instantiate_classes()  # loggers write their run folders later, when the run starts
            _check_runnable(self.subcommand, self.model, self.datamodule)
        if self.subcommand in ("validate", "test", "predict") and isinstance(self.model, TransferModule) \
                and not self.config[self.subcommand].get("ckpt_path") and not self.model.adaptation.trains_nothing:
            rank_zero_warn(f"{self.subcommand} without --ckpt_path evaluates the model as the config builds it: "
                           f"backbone {self.model.backbone.identity()} with an untrained "
                           f"{type(self.model.adaptation).__name__} head; pass --ckpt_path <run>/checkpoints/last.ckpt "
                           "(or last) to evaluate a trained model")

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        with _setup_phase():
            _refuse_reused_csv_version(config.trainer.get("logger"))
        if config.model.get("test_time") is not None and config.trainer.get("inference_mode", True):
            # test-time methods take gradient steps inside trainer.test
            config.trainer.inference_mode = False
        adaptation = _import_class(_config_value(config.model, "adaptation.class_path"))
        if config.trainer.get("strategy") == "ddp" and getattr(adaptation, "may_have_unused_parameters", False):
            # a step may leave some of its trainable parameters without a gradient: DDP must look for them
            config.trainer.strategy = "ddp_find_unused_parameters_true"


_NAMED_CHECKPOINTS = ("last", "best", "hpc")
TRACEBACK_ENV = "LIGHTNING_TRANSFER_TRACEBACK"


@contextlib.contextmanager
def _setup_phase() -> Iterator[None]:
    """Mark an error raised while the run is being built (bad config, missing file, unreadable checkpoint): nothing
    has trained yet, so :func:`main` shows its message, which names the value and the fix, without the traceback."""
    try:
        yield
    except Exception as err:
        err.lightning_transfer_before_training = True  # type: ignore[attr-defined]
        raise


def _check_runnable(subcommand: str | None, model: Any, datamodule: Any) -> None:
    """Refuse a run that would fail only once it started (after its run folder and config were written)."""
    if not isinstance(model, TransferModule):
        return
    adaptation = model.adaptation
    if subcommand == "fit" and adaptation.trains_nothing:
        raise ValueError(f"{type(adaptation).__name__} trains nothing, so there is nothing to fit: run validate or "
                         "test with it, or choose a strategy that trains")
    two_stream = bool(getattr(datamodule, "two_stream", False))
    if subcommand == "fit" and adaptation.needs_target_data != two_stream:
        name, data = type(adaptation).__name__, type(datamodule).__name__
        raise ValueError(
            f"{name} trains on a labelled source batch and an unlabelled target batch, but {data} yields one stream: "
            "pair a source and a target datamodule with data=PairedDomains (data.init_args.source / .target)"
            if adaptation.needs_target_data else
            f"{data} yields two streams (labelled source, unlabelled target), but {name} trains on one: choose a "
            "domain-adaptation strategy (DANN, CDAN, MCC, DAN), or train on the source datamodule alone")
    if adaptation.needs_text_tower and getattr(datamodule, "class_names_generated", False):
        names = datamodule.class_names
        raise ValueError(
            f"{type(adaptation).__name__} builds its classifier from class names, but {type(datamodule).__name__} "
            f"has only placeholders ({', '.join(map(repr, names[:3]))}{', ...' if len(names) > 3 else ''}), from "
            "which no prompt means anything: "
            + getattr(datamodule, "class_names_fix", TransferDataModule.class_names_fix)
        )
    # a datamodule says what it yields (TransferDataModule.modality); one of the user's own that does not subclass
    # it is not checked
    reads = model.backbone.data_config().get("modality", "image")
    yields = getattr(datamodule, "modality", None)
    if yields is not None and yields != reads:
        fix = ("choose a text datamodule (text_csv: a CSV of text,label rows) or an image backbone" if reads == "text"
               else "choose a text backbone (HFTextBackbone) or an image datamodule")
        what = {"text": "token ids", "image": "images"}
        raise ValueError(
            f"{type(model.backbone).__name__} ({model.backbone.identity()}) reads {what.get(reads, reads)} "
            f"(data_config modality {reads!r}), but {type(datamodule).__name__} yields {what.get(yields, yields)}: "
            f"{fix}")


def _model_flags(argv: list[str]) -> list[str]:
    """The ``model.*`` keys set on the command line (``--model.adaptation=LoRA``, ``--model.backbone.init_args.x 1``),
    except the test-time method, which is chosen when testing rather than by the run that saved a checkpoint."""
    keys = [arg[2:].split("=", 1)[0] for arg in argv if arg.startswith("--model.")]
    return [k[len("model."):] for k in keys if k != "model.test_time" and not k.startswith("model.test_time.")]


def _check_flags_kept(flags: list[str], before: Any, after: Any, ckpt_path: str) -> None:
    """Refuse a ``--model.*`` flag whose value the checkpoint's settings replaced: a run that silently used another
    strategy or backbone than the one asked for would report that one's numbers under this one's name."""
    conflicts = []
    for key in flags:
        old, new = _config_value(before, key), _config_value(after, key)
        if hasattr(old, "get") and hasattr(new, "get") and "class_path" in old:  # --model.adaptation=LoRA: the class
            old, new = _import_class(old.get("class_path")), _import_class(new.get("class_path"))
        if old != new:
            conflicts.append(f"--model.{key}={_short(old)} (the checkpoint has {_short(new)})")
    replaced = []
    for key in ("adaptation", "backbone"):
        configured = _import_class(_config_value(before, f"{key}.class_path"))
        used = _import_class(_config_value(after, f"{key}.class_path"))
        if key not in flags and configured != used:
            replaced.append(f"model.{key}={_short(used)} (the config has {_short(configured)})")
    if replaced:  # from a config file, as `test --config X.yaml --ckpt_path run.ckpt` is meant to: said, not silent
        rank_zero_info(f"--ckpt_path {ckpt_path}: the model is rebuilt with the checkpoint's settings: "
                       + "; ".join(replaced))
    if conflicts:
        raise ValueError(
            f"{'; '.join(conflicts)}: with --ckpt_path, the model is rebuilt with the settings of the run that saved "
            f"{ckpt_path!r}, so these flags would be ignored. Drop them to use the checkpoint as trained, or pass a "
            "checkpoint trained with these settings.")


def plain_message(err: Exception) -> str:
    """The error's own message: for a component built through an optional (Union) config key, jsonargparse wraps it
    with the subtypes it tried and the whole given config; the one error that is not "Expected a NoneType" is ours."""
    text = str(err)
    if text.startswith("Does not validate against any of the Union subtypes") and "\nErrors:\n" in text:
        errors = [line.strip()[2:] for line in text.split("\nErrors:\n", 1)[1].splitlines()
                  if line.strip().startswith("- ") and "Expected a <class 'NoneType'>" not in line]
        if len(errors) == 1:
            return errors[0]
    return f"{type(err).__name__}: {text}"


def _refuse_reused_csv_version(logger: Any) -> None:
    """A CSVLogger given a ``version`` whose folder holds files deletes that run's metrics.csv when it starts (Lightning
    warns, then deletes): refuse before it is built, so nothing an earlier run wrote is lost."""
    for item in _as_list(logger):
        if isinstance(item, bool) or not hasattr(item, "get") or not str(item.get("class_path")).endswith("CSVLogger"):
            continue
        args = item.get("init_args") or {}
        version = args.get("version")
        if version is None:  # the next free version: a new folder
            continue
        name = args.get("name", "lightning_logs")
        folder = Path(args.get("save_dir") or ".") / (name or "") / (version if isinstance(version, str)
                                                                      else f"version_{version}")
        if folder.is_dir() and any(folder.iterdir()):
            raise FileExistsError(
                f"the CSV logger's version {version!r} folder {str(folder)!r} holds an earlier run's logs, which this "
                "run would delete: choose another --trainer.logger.init_args.version (or leave it unset for the next "
                "free one), or move that folder away")


def _import_class(path: Any) -> Any:
    """The class a class_path names (one class can be named through several modules), else the path as it is."""
    module, _, name = str(path).rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return path


def _config_value(config: Any, key: str) -> Any:
    for part in key.split("."):
        if not hasattr(config, "get"):
            return None
        value = config.get(part)
        if value is None and hasattr(config.get("init_args"), "get"):  # --model.adaptation.r=8 means init_args.r
            value = config.init_args.get(part)
        config = value
    return config


def _short(value: Any) -> str:
    if isinstance(value, type):
        return value.__name__
    text = str(value.as_dict() if hasattr(value, "as_dict") else value)
    return text.rsplit(".", 1)[-1] if text.startswith("lightning_transfer.") else text


def _as_list(value: Any) -> list:
    return [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]


# ---- resuming: `fit --ckpt_path last` continues the run (and the W&B run) that wrote the checkpoint -------------
def _evaluated_checkpoint(sub: str, name: str, trainer: Any) -> str:
    """``validate/test/predict --ckpt_path last``: the newest ``last.ckpt`` of an earlier run (as ``fit`` resumes it).

    Lightning would look in the new run's own, empty folder, warn and go on with the model as built from the config:
    an untrained head, reported as a result. ``best`` names the best model of a fit in this same process, which a
    new command never has."""
    if name == "best":
        raise FileNotFoundError(f"{sub} --ckpt_path best: 'best' is the best checkpoint of a fit in the same process, "
                                "which this command has not run; pass the path of the checkpoint to evaluate (e.g. "
                                "<run folder>/checkpoints/<name>.ckpt), or 'last' for the newest run's last.ckpt")
    folders = _checkpoint_folders(trainer)
    found = find_last_checkpoint(trainer)
    fallback = Path(trainer.get("default_root_dir") or ".") / "checkpoints" / "last.ckpt"
    if found is None and not folders and fallback.is_file():  # no logger: Lightning's one fixed folder
        found = fallback
    if found is None:
        raise FileNotFoundError(
            f"{sub} --ckpt_path last: no last.ckpt of an earlier run in "
            f"{', '.join(map(str, folders or [fallback.parent]))}; pass the path of the checkpoint to evaluate "
            "(without a checkpoint the model is untrained)")
    rank_zero_info(f"{sub}: --ckpt_path last is {found}, the newest last checkpoint of an earlier run")
    return str(found)


def continue_run(config: Any) -> None:
    """Resolve ``ckpt_path=last`` to a file and give the logger the run id stored in the checkpoint.

    Lightning looks for ``last`` in the checkpoint folder of the *new* run, which with a W&B, CSV or TensorBoard
    logger is named after the new run's version and so is empty: the fit would silently start again. Here ``last``
    is the newest last checkpoint of any earlier run of the same logger project (or in the configured ``dirpath``),
    and a W&B logger without an ``id`` resumes the run recorded in the checkpoint instead of starting another.
    """
    if config.ckpt_path == "last":
        found = find_last_checkpoint(config.trainer)
        if found is None:
            return  # Lightning warns that there is nothing to resume from
        config.ckpt_path = str(found)
    logger = config.trainer.get("logger")
    if not _is_wandb(logger) or logger.init_args.get("id") or logger.init_args.get("version"):
        return
    run_id = checkpoint_run_ids(config.ckpt_path).get("WandbLogger")
    if run_id:
        logger.init_args.id = run_id


def _is_wandb(logger: Any) -> bool:
    return bool(logger) and not isinstance(logger, (bool, list)) and str(logger.get("class_path", "")).endswith(
        "WandbLogger")


def _checkpoint_folders(trainer: Any) -> list[Path]:
    """Where this trainer config's ModelCheckpoint writes: its ``dirpath``, else ``<save_dir>/<project>/*/checkpoints``
    of the first logger (Lightning's default, one folder per run version); empty when Lightning finds it itself."""
    callbacks = trainer.get("callbacks") or []
    dirpaths = [cb.init_args.get("dirpath") for cb in callbacks
                if str(cb.get("class_path", "")).endswith("ModelCheckpoint") and cb.get("init_args")]
    if any(dirpaths):
        return [Path(d) for d in dirpaths if d]
    logger = trainer.get("logger")
    logger = logger[0] if isinstance(logger, list) and logger else logger
    if not logger or isinstance(logger, bool) or not logger.get("init_args"):
        return []  # no logger: one fixed folder under default_root_dir, which Lightning searches
    args = logger.init_args
    root = args.get("save_dir") or args.get("dir") or trainer.get("default_root_dir") or "."
    if _is_wandb(logger):
        name = args.get("project") or os.environ.get("WANDB_PROJECT", "lightning_logs")
    else:
        name = args.get("name") or "lightning_logs"
    return sorted((Path(root) / name).glob("*/checkpoints"))


def find_last_checkpoint(trainer: Any) -> Path | None:
    """The most recently written ``*last*.ckpt`` in the folders of :func:`_checkpoint_folders` (partial files of an
    interrupted save are never candidates)."""
    candidates = [p for folder in _checkpoint_folders(trainer) if folder.is_dir() for p in folder.iterdir()
                  if "last" in p.name and p.suffix == ".ckpt" and not p.name.startswith(PARTIAL_PREFIX)]
    return max(candidates, key=lambda p: p.stat().st_mtime_ns) if candidates else None
