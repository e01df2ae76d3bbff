"""``python -m lightning_transfer SUBCOMMAND``: the subcommand dispatch.

fit, validate, test and predict go to :class:`~lightning_transfer.cli.TransferCLI` (a LightningCLI); list, export
and bench are this package's own commands. Each is imported only when chosen.
"""

from __future__ import annotations

import argparse
import os
import sys

USAGE = """python -m lightning_transfer {fit,validate,test,predict,list,export,bench} ...
  list: the registered backbones, strategies, test-time methods, heads and datamodules
  export: a checkpoint's backbone with the adaptation merged in, or as a peft adapter
  bench: several strategies (or test-time methods) on one config, one table; bench summarize
each takes --help. The Lightning subcommands:
"""


def list_components() -> str:
    """The registries as a table: name, class, the first line of its docstring."""
    from lightning_transfer.registry import BACKBONES, DATAMODULES, HEADS, STRATEGIES, TEST_TIME, first_doc_line

    lines = []
    for title, registry in (("backbones", BACKBONES), ("adaptation strategies (model.adaptation)", STRATEGIES),
                            ("test-time methods (model.test_time)", TEST_TIME), ("heads (model.head)", HEADS),
                            ("datamodules (data)", DATAMODULES)):
        lines.append(f"{title}:")
        width = max((len(n) for n in registry.names()), default=0)
        for name, cls in registry.items():
            lines.append(f"  {name:<{width}}  {cls.__name__:<18} {first_doc_line(cls)}")
        lines.append("")
    return "\n".join(lines)


def export(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m lightning_transfer export",
                                     description="Export a trained checkpoint for inference or reuse.")
    parser.add_argument("--ckpt_path", required=True, help="checkpoint written by fit")
    parser.add_argument("--format", default="merged", choices=["merged", "peft"],
                        help="merged: the backbone's weights with the adaptation folded in (+ head); "
                             "peft: peft's adapter files for the wrapped model (LoRA, PeftMethod) (+ head)")
    parser.add_argument("--output", required=True, help="output directory (must not exist or be empty)")
    args = parser.parse_args(argv)
    from lightning_transfer.export import export_checkpoint

    try:
        written = export_checkpoint(args.ckpt_path, args.format, args.output)
    except (FileNotFoundError, FileExistsError, ValueError) as err:  # each names the bad value and the fix
        raise SystemExit(f"export: {err}") from None
    for path in written:
        print(path)


def main(argv: list[str] | None = None) -> None:
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "list":
        import lightning_transfer  # noqa: F401  (fills the registries)

        print(list_components())
        return
    if argv and argv[0] == "export":
        export(argv[1:])
        return
    if argv and argv[0] == "bench":
        from lightning_transfer.bench import main as bench_main

        bench_main(argv[1:])
        return
    if not argv or argv[0] in ("-h", "--help"):  # LightningCLI's help names only its own four subcommands
        print(USAGE)
    from lightning_transfer.checkpointing import CheckpointMismatch
    from lightning_transfer.cli import TRACEBACK_ENV, TransferCLI, plain_message
    from lightning_transfer.loggers import default_wandb_mode

    default_wandb_mode()
    try:
        TransferCLI(args=None if from_command_line else argv)
    except Exception as err:
        before_training = getattr(err, "lightning_transfer_before_training", False) or isinstance(
            err, CheckpointMismatch)
        if from_command_line and before_training and not os.environ.get(TRACEBACK_ENV):
            raise SystemExit(f"error: {plain_message(err)}\n(before anything ran; set {TRACEBACK_ENV}=1 to see the "
                             "traceback)") from None
        raise


if __name__ == "__main__":
    main()
