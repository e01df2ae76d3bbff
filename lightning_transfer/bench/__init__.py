"""``python -m lightning_transfer bench``: several strategies, same backbone, data, budget and seeds, one table.

Each (strategy, seed) runs in its own subprocess (so peak RSS and CUDA peaks are per run, and one crash cannot take
the others down), writes one JSON row under ``OUTPUT/rows/``, and is skipped when rerun with the same ``--output``.
The rows are then aggregated into ``results.csv``, ``results.md``, ``results.json``, ``results.tex`` (LaTeX) and
``pareto.png``. ``bench summarize`` (:mod:`lightning_transfer.bench.summary`) puts several outputs, one per dataset,
in one strategies x datasets table.

The modules, each importing only those listed after it (and :mod:`lightning_transfer.cli`, which imports none):

- :mod:`~lightning_transfer.bench.command`: the command line, :func:`main`.
- :mod:`~lightning_transfer.bench.runner`: the jobs in subprocesses, the output's lock, reuse of finished rows.
- :mod:`~lightning_transfer.bench.test_time`: test-time rows (a source model, then each method on it) and tables.
- :mod:`~lightning_transfer.bench.row`: one strategy row, fitted and tested in the worker process.
- :mod:`~lightning_transfer.bench.summary`: ``bench summarize``, several outputs in one table.
- :mod:`~lightning_transfer.bench.plot`: ``pareto.png``.
- :mod:`~lightning_transfer.bench.tables`: ``results.{csv,md,json,tex}``, the LaTeX helpers, the W&B table.
- :mod:`~lightning_transfer.bench.config`: a row's configs: the CLI arguments, the resolved config, what changed.
"""

from lightning_transfer.bench.command import main

__all__ = ["main"]
