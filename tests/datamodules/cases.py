"""What the datamodule tests know about every registered datamodule: its CLI options (as the CLI builds them)."""

from __future__ import annotations

from lightning.pytorch.cli import LightningArgumentParser


def cli_options(cls: type) -> dict[str, bool]:
    """``{option: required}`` of ``cls`` as LightningCLI lists them under ``--data.init_args.*``.

    jsonargparse follows ``**kwargs`` forwarded by ``super().__init__(**kwargs)`` into the base classes (and drops
    what the call fixes), so this is the real option list, which ``inspect.signature`` would not give.
    """
    parser = LightningArgumentParser()
    parser.add_class_arguments(cls, "data")
    return {action.dest[len("data."):]: bool(action.required) for action in parser._actions  # argparse's list
            if isinstance(action.dest, str) and action.dest.startswith("data.")}
