"""A bench row's configuration: the CLI arguments of one run, the config they resolve to, and what differs between two
resolved configs (a finished row is reused only when nothing that changes its result differs)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any


def component_config(kind: str, name: str, config_dir: Path, flag: str, examples: str) -> Path:
    """``config_dir/<name>.yaml``, or an error naming the missing folder or file and ``flag`` (before anything runs)."""
    if not config_dir.is_dir():
        raise SystemExit(f"bench: the {kind} config folder {str(config_dir)!r} does not exist (relative paths are "
                         f"from the current folder): run from the repository root or pass {flag} DIR")
    path = config_dir / f"{name}.yaml"
    if not path.is_file():
        raise SystemExit(f"bench: {kind} {name!r} has no config {path}: write one (see {examples}), "
                         f"or pass {flag} DIR")
    return path


def strategy_config(name: str, config_dir: Path) -> Path:
    return component_config("strategy", name, config_dir, "--strategy-configs", "configs/strategy/")


def run_args(configs: list[str], overrides: list[str], seed: int, workdir: Path) -> list[str]:
    """The CLI arguments of one run: the configs in order, the overrides, the seed, no logger, output in workdir."""
    args = [item for c in configs for item in ("--config", c)] + list(overrides)
    return args + [f"--seed_everything={seed}", "--trainer.logger=false", "--trainer.enable_progress_bar=false",
                   "--trainer.enable_model_summary=false", f"--trainer.default_root_dir={workdir}"]


# a bad key or value raises (ArgumentError, with jsonargparse's message) instead of printing usage and exiting, so the
# runner can say which strategy's config is wrong, and a worker can record the message in its row
PARSER_KWARGS = {"parser_mode": "omegaconf", "exit_on_error": False}


# what may differ between runs of one job without changing its result: where it writes, and the seeds (the row's file
# name holds the seed; the K-shot draw's seed is set to it)
_NOT_INPUTS = ("seed_everything", "trainer.default_root_dir", "data.init_args.seed")


def dump_config(cli: Any) -> str:
    """The CLI's resolved config as YAML, None-valued keys included."""
    with warnings.catch_warnings():  # jsonargparse >= 4.49 renamed skip_none (skip_unset); 4.32 is supported too
        warnings.filterwarnings("ignore", message=r"(?s).*skip_none")
        return cli.parser.dump(cli.config, skip_none=False, format="yaml")


def resolved_config(configs: list[str], overrides: list[str], seed: int, workdir: Path) -> str:
    """The config a run of these arguments would resolve to (as its row stores it), parsed without building anything.

    Raises ``ArgumentError`` for a key or value the CLI rejects."""
    from lightning_transfer.cli import TransferCLI

    class _ParseOnly(TransferCLI):
        def _set_seed(self) -> None:
            pass

        def instantiate_classes(self) -> None:
            pass

    return dump_config(_ParseOnly(args=run_args(configs, overrides, seed, workdir), run=False,
                                  parser_kwargs=PARSER_KWARGS))


def flat_config(text: str) -> dict[str, Any]:
    """A resolved config (YAML) as ``{"dotted.key": value}``."""
    import yaml

    def flat(value: Any, prefix: str = "") -> dict[str, Any]:
        if isinstance(value, dict) and value:
            return {k: v for key, item in value.items() for k, v in flat(item, f"{prefix}{key}.").items()}
        return {prefix[:-1]: value}

    return flat(yaml.safe_load(text))


def config_changes(stored: str, expected: str) -> list[str]:
    """``key: stored -> expected`` for every setting that differs between two resolved configs (YAML)."""
    old, new = flat_config(stored), flat_config(expected)
    return [f"{key}: {old.get(key)!r} -> {new.get(key)!r}" for key in sorted(set(old) | set(new))
            if key not in _NOT_INPUTS and old.get(key) != new.get(key)]


def input_files(config: str) -> dict[str, str]:
    """``{"dotted.key": "path (size bytes, modified ns)"}`` for every setting of a resolved config (YAML) that names an
    existing file: backbone weights, statistics, lists. Its path alone does not say which weights a row used: a file
    written again at the same path (a re-exported backbone) makes the finished rows another experiment's."""
    found = {}
    for key, value in flat_config(config).items():
        if key in _NOT_INPUTS or not isinstance(value, str) or not value or "\n" in value:
            continue
        try:
            stat = Path(value).stat()
        except (OSError, ValueError):
            continue
        if Path(value).is_file():
            found[key] = f"{value} ({stat.st_size} bytes, modified {stat.st_mtime_ns})"
    return found
