"""Smoke run of benchmarks/faithfulness.py (issue 22): the seed CNN, 1 epoch on 500 digits, 8 images,
7x7 patches (--quick's default: 16 regions, a third of the forward passes of 4x4), logits only."""
import importlib.util
import json
import pathlib

import pytest

pytest.importorskip("mlxtend")

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "faithfulness.py"


def _script():
    spec = importlib.util.spec_from_file_location("_faithfulness_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_run_writes_a_row_for_every_method_and_baseline(tmp_path):
    bench = _script()
    out = tmp_path / "out"
    assert bench.main(["--models", "seed", "--quick", "--images", "8", "--train-images", "500",
                       "--out", str(out), "--cache", str(tmp_path / "cache")]) == 0
    results = json.loads((out / "faithfulness_quick.json").read_text())
    markdown = (out / "faithfulness_quick.md").read_text()
    assert (out / "faithfulness_quick_seed.png").exists()
    assert not any((tmp_path / "cache").glob("*.png"))
    seed = results["models"]["seed"]
    assert seed["images"] == 8 and seed["epochs"] == 1 and seed["train_images"] == 500
    assert 0 <= seed["test_accuracy"] <= 1 and seed["test_images"] == 1000
    table = seed["tables"]["logit"]
    assert list(seed["tables"]) == ["logit"] and table["n"] == 8 and table["patch"] == 7 and table["steps"] == 16
    rows = {(r["method"], r["baseline"]): r for r in table["rows"]}
    assert set(rows) == {(m, b) for m in bench.CNN_METHODS for b in ("mean", "blur", "zero")}
    for (m, b), r in rows.items():
        assert r["n"] == 8 and r["sem"] >= 0 and r["srg"] == pytest.approx(r["lerf"] - r["morf"])
        assert r["level_with_best"] is True or r["vs_best"] < 0
        assert len(table["curves"][f"{m} | {b}"]["morf"]) == 17
    # One bold entry at least per baseline (the best), every method in the Markdown table.
    assert "Seed MNIST CNN" in markdown and "output logit" in markdown and "n = 8" in markdown
    for m in bench.CNN_METHODS:
        assert f"| {m} |" in markdown
