"""``bench summarize``: several bench outputs (one per dataset) in one strategies x datasets table, and LaTeX tables."""

from __future__ import annotations

import csv
import json

import pytest

from lightning_transfer.bench import main
from lightning_transfer.bench.tables import aggregate, latex_escape, write_tables
from lightning_transfer.datamodules.vtab import VTAB_TASKS, vtab_means


def fake_output(folder, results, epochs=3, data="Digits"):
    """A bench --output folder: results.json and one finished row per strategy with a resolved config."""
    (folder / "rows").mkdir(parents=True)
    table = []
    for strategy, (top1, std, params) in results.items():
        seeds = 0 if top1 is None else 3 if std is not None else 1
        table.append({"strategy": strategy, "seeds": seeds, "top1_mean": top1, "top1_std": std,
                      "trainable_params": params, "error": None if top1 is not None else "RuntimeError: boom"})
        config = (f"trainer:\n  max_epochs: {epochs}\ndata:\n  class_path: {data}\nmodel:\n  init_args:\n"
                  f"    num_classes: 5\n    adaptation: {strategy}\nseed_everything: 1\n")
        (folder / "rows" / f"{strategy}_seed1.json").write_text(json.dumps(
            {"strategy": strategy, "seed": 1, "status": "ok" if top1 is not None else "error", "config": config}))
    (folder / "results.json").write_text(json.dumps(table))
    return folder


def read_csv(path):
    with open(path) as f:
        return {row["strategy"]: row for row in csv.DictReader(f)}


def test_summarize_two_datasets(tmp_path, capsys):
    a = fake_output(tmp_path / "a", {"lora": (0.8, 0.01, 1000), "linear_probe": (0.6, 0.02, 100)})
    b = fake_output(tmp_path / "b", {"lora": (0.5, 0.03, 3000), "linear_probe": (0.7, None, 300),
                                     "vqt": (0.9, 0.0, 50)}, data="Other")
    main(["summarize", f"first={a}", str(b), "--output", str(tmp_path / "sum")])
    table = read_csv(tmp_path / "sum" / "summary.csv")
    assert list(table["lora"])[:6] == ["strategy", "trainable_params_mean", "first", "first_std", "b", "b_std"]
    assert float(table["lora"]["mean"]) == pytest.approx(0.65) and float(table["lora"]["trainable_params_mean"]) == 2000
    assert float(table["linear_probe"]["mean"]) == pytest.approx(0.65)
    assert table["vqt"]["mean"] == "" and table["vqt"]["first"] == ""  # no result on 'first': no mean
    md = (tmp_path / "sum" / "summary.md").read_text()
    assert "| lora | 2,000 | **80.0** ± 1.0 | 50.0 ± 3.0 | **65.0** |" in md
    assert "| linear_probe | 200 | 60.0 ± 2.0 | 70.0 | **65.0** |" in md  # one seed: no std; a tie: both bold
    assert "vqt has no result for first" in md
    assert "data" not in md.split("notes:")[-1]  # the data differ between datasets by design: not a note
    tex = (tmp_path / "sum" / "summary.tex").read_text()
    assert r"linear\_probe & 0.000200 & 60.0{\scriptsize$\pm$2.0} & 70.0 & \textbf{65.0} \\" in tex
    assert r"\toprule" in tex and r"vqt & 0.0000500 & - & \textbf{90.0}{\scriptsize$\pm$0.0} & - \\" in tex
    assert "wrote" in capsys.readouterr().out


def test_summarize_notes_failures_and_settings_that_differ(tmp_path):
    a = fake_output(tmp_path / "a", {"lora": (0.8, 0.01, 1000)}, epochs=3)
    b = fake_output(tmp_path / "b", {"lora": (None, None, None)}, epochs=5)
    c = fake_output(tmp_path / "c", {"lora": (0.4, 0.01, 1000)}, epochs=5)
    main(["summarize", str(a), str(b), str(c), "--output", str(tmp_path / "sum")])
    summary = json.loads((tmp_path / "sum" / "summary.json").read_text())
    assert "lora failed on b: RuntimeError: boom" in summary["notes"]
    assert "lora: trainer.max_epochs differs (a=3, c=5)" in summary["notes"]  # b's failed row has no settings
    assert summary["lines"][0]["means"] == {"mean": None}


def test_summarize_vtab_group_means_in_task_order(tmp_path):
    scores = {task: 0.3 + 0.03 * i for i, task in enumerate(VTAB_TASKS)}
    args = []
    for task in reversed(VTAB_TASKS):  # given out of order, and one task by an alias
        label = "cifar100" if task == "cifar" else task
        args.append(f"{label}={fake_output(tmp_path / task, {'lora': (scores[task], 0.01, 10)})}")
    main(["summarize", *args, "--output", str(tmp_path / "sum")])
    row = read_csv(tmp_path / "sum" / "summary.csv")["lora"]
    header = list(row)
    assert header[2] == "cifar100" and header[-5:] == ["natural", "specialized", "structured", "group_mean",
                                                        "task_mean"]
    assert [h for h in header[2:-5] if not h.endswith("_std")][1:] == list(VTAB_TASKS)[1:]
    expected = vtab_means(scores)
    for key, value in expected.items():
        assert float(row[key]) == pytest.approx(value)

    some = args[:3]  # three tasks: a plain mean, not VTAB's
    main(["summarize", *some, "--output", str(tmp_path / "some")])
    assert list(read_csv(tmp_path / "some" / "summary.csv")["lora"])[-1] == "mean"


def test_summarize_rejects_bad_folders(tmp_path):
    a = fake_output(tmp_path / "a", {"lora": (0.8, 0.01, 1000)})
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="'x' given twice; name the columns apart"):
        main(["summarize", f"x={a}", f"x={a}", "--output", str(tmp_path / "s")])
    with pytest.raises(SystemExit, match=r"empty.* has no results.json: it is not a bench output folder"):
        main(["summarize", str(a), str(tmp_path / "empty"), "--output", str(tmp_path / "s")])
    with pytest.raises(SystemExit, match="is not a folder"):
        main(["summarize", str(tmp_path / "missing"), "--output", str(tmp_path / "s")])
    with pytest.raises(SystemExit, match="task\\(s\\) cifar given twice"):
        main(["summarize", f"cifar={a}", f"cifar100={a}", "--output", str(tmp_path / "s")])
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "results.json").write_text(json.dumps([{"strategy": "lora", "trainable_params": 5}]))
    with pytest.raises(SystemExit, match="--omit-accuracy"):
        main(["summarize", str(tmp_path / "b"), "--output", str(tmp_path / "s")])
    (tmp_path / "b" / "results.json").write_text("[{")
    with pytest.raises(SystemExit, match="could not be read"):
        main(["summarize", str(tmp_path / "b"), "--output", str(tmp_path / "s")])
    assert not (tmp_path / "s").exists()  # nothing written on an error


def test_results_tex_escapes_names_and_bolds_the_best(tmp_path):
    rows = [{"strategy": "a_b", "status": "ok", "top1": 0.5, "trainable_params": 2_000_000},
            {"strategy": "c", "status": "ok", "top1": 0.75, "trainable_params": 10},
            {"strategy": "c", "status": "ok", "top1": 0.65, "trainable_params": 10}]
    write_tables(aggregate(rows, ["a_b", "c"]), tmp_path)
    tex = (tmp_path / "results.tex").read_text()
    assert r"a\_b & 50.0 & 2.00 \\" in tex and r"c & \textbf{70.0}{\scriptsize$\pm$7.1} & 0.0000100 \\" in tex
    assert "std over 1/2 seeds" in tex
    assert "CUDA" not in tex  # no row has a CUDA peak: no column for it
    write_tables(aggregate(rows, ["a_b", "c"]), tmp_path, omit_accuracy=True)
    assert "top-1" not in (tmp_path / "results.tex").read_text()


def test_test_time_tex_bolds_the_lowest_error(tmp_path):
    from lightning_transfer.bench.test_time import write_tta_tables

    table = [{"method": "source", "seeds": 1, "gauss-5": 0.6, "mean_error": 0.6, "mean_error_std": None,
              "error": None},
             {"method": "tent", "seeds": 1, "gauss-5": 0.4, "mean_error": 0.4, "mean_error_std": None, "error": None}]
    write_tta_tables(table, ["gauss-5"], tmp_path)
    tex = (tmp_path / "results_tta.tex").read_text()
    assert r"source & 60.0 & 60.0 \\" in tex and r"tent & \textbf{40.0} & \textbf{40.0} \\" in tex


def test_millions_is_positional_with_three_significant_digits():
    from lightning_transfer.bench.tables import millions

    assert [millions(n) for n in (85_802_501, 298_757, 3_846, 325, 0)] == ["85.80", "0.299", "0.00385", "0.000325",
                                                                         "0"]


def test_latex_escape_specials():
    assert latex_escape(r"50% a_b {x} \ ~") == r"50\% a\_b \{x\} \textbackslash{} \textasciitilde{}"
