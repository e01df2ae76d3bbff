"""``bench summarize`` says when one strategy's columns average different numbers of seeds."""

from __future__ import annotations

import json

from lightning_transfer.bench import main
from tests.test_bench_summary import fake_output


def test_summarize_notes_columns_of_different_seed_counts(tmp_path):
    a = fake_output(tmp_path / "a", {"lora": (0.8, 0.01, 1000), "vqt": (0.7, 0.02, 50)})  # 3 seeds each
    b = fake_output(tmp_path / "b", {"lora": (0.6, None, 1000), "vqt": (0.5, 0.01, 50)})  # lora: 1 seed
    main(["summarize", str(a), str(b), "--output", str(tmp_path / "sum")])
    notes = json.loads((tmp_path / "sum" / "summary.json").read_text())["notes"]
    assert "lora: finished seeds differ (a=3, b=1)" in notes
    assert not any(n.startswith("vqt: finished seeds") for n in notes)
    assert "lora: finished seeds differ (a=3, b=1)" in (tmp_path / "sum" / "summary.md").read_text()
