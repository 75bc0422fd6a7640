"""Command-line smoke tests on tiny models saved by either Keras package (Keras 3 and tf-keras),
the model loader and its errors, and the quick demo (what CI can afford)."""
import argparse
import json
import pathlib
import re
import sys
import warnings
import zipfile

import numpy as np
import pytest

import lrp_grad
from lrp_grad import cli
from lrp_grad.frontends import package_of
from kit import cnn, package, randomize

#: Saved tiny models: id -> (package module name, file suffix).
SAVED = {"keras3.keras": ("keras", ".keras"), "tf_keras.keras": ("tf_keras", ".keras"),
         "tf_keras.h5": ("tf_keras", ".h5")}


def save(model, path):
    """``model.save(path)``, without tf-keras's notice that .h5 is a legacy format."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*HDF5 file.*legacy", category=UserWarning)
        model.save(path)
    return path


def run_cli(argv, capsys):
    """Run ``lrp-grad argv`` in-process and end it as the interpreter ends the real command: a
    SystemExit message is written to stderr with exit status 1 (any other exception propagates, as
    the Traceback the command would print). Returns ``(status, stdout, stderr)``."""
    try:
        status = cli.main(argv)
    except SystemExit as e:
        status = e.code
        if isinstance(status, str):
            print(status, file=sys.stderr)
            status = 1
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_parse_rule():
    assert cli.parse_rule("zplus") == lrp_grad.ZPlus()
    assert cli.parse_rule("epsilon:0.01") == lrp_grad.Epsilon(0.01)
    assert cli.parse_rule("alphabeta:3,2") == lrp_grad.AlphaBeta(3, 2)
    assert cli.parse_rule("epsilon_plus_flat") == "epsilon_plus_flat"
    with pytest.raises(argparse.ArgumentTypeError, match="--rule 'alphabeta:3,1': AlphaBeta: alpha - beta must equal 1"):
        cli.parse_rule("alphabeta:3,1")
    with pytest.raises(argparse.ArgumentTypeError, match="--rule 'lrp' is not known; use a preset"):
        cli.parse_rule("lrp")


@pytest.fixture(params=list(SAVED))
def tiny(request, tmp_path):
    """A tiny model saved by each package (Keras 3 .keras, tf-keras .keras and .h5), and 3 images."""
    from PIL import Image

    pkg, suffix = SAVED[request.param]
    keras = package(pkg)
    L = keras.layers
    model = randomize(keras.Sequential([keras.Input((8, 8, 3)), L.Conv2D(4, 3, activation="relu"),
                                        L.Flatten(), L.Dense(3)]))
    assert package_of(model) == pkg
    path = save(model, tmp_path / f"tiny{suffix}")
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
    loaded = lrp_grad.load_model(path)  # what the command explained: the file, read by the package that wrote it
    assert package_of(loaded) == package_of(model)
    np.testing.assert_allclose(R, lrp_grad.explain(loaded, x, target=list(targets.values()), rule=lrp_grad.AlphaBeta(2, 1)),
                               rtol=1e-5, atol=1e-7)


def test_concepts_writes_an_atlas_and_the_ranked_channels(tiny, tmp_path):
    model, path, images = tiny
    out = tmp_path / "atlas"
    refs = tmp_path / "refs"
    refs.mkdir()
    for p in images[:2]:
        (refs / pathlib.Path(p).name).write_bytes(pathlib.Path(p).read_bytes())
    assert cli.main(["concepts", "--model", str(path), "--image", images[0], "--references", str(refs),
                     "--top", "2", "--top-refs", "2", "--out", str(out)]) == 0
    assert (out / "atlas.png").read_bytes().startswith(b"\x89PNG")
    info = json.loads((out / "concepts.json").read_text())
    x = np.asarray(__import__("PIL.Image").Image.open(images[0]).convert("RGB"), np.float32)[None] / 255
    ex = lrp_grad.Explainer(lrp_grad.load_model(path), rule="epsilon_plus_flat")
    C = ex.concept_relevance(x, info["target"], layer=info["layer"])[0]
    assert info["layer"] == [layer.name for layer in model.layers if "conv" in layer.name][-1]  # the last conv
    assert [r["channel"] for r in info["channels"]] == list(np.argsort(-C))
    np.testing.assert_allclose([r["relevance"] for r in info["channels"]], C[np.argsort(-C)], rtol=1e-5, atol=1e-7)


def test_explain_size_mismatch_needs_resize(tiny, tmp_path, capsys):
    _, path, images = tiny
    status, _, err = run_cli(["explain", "--model", str(path), "--images", images[2], "--out", str(tmp_path / "o"),
                              "--no-progress"], capsys)
    assert status == 2 and "img2.png is 10x12 but the model takes 8x8; pass --resize" in err, err
    assert cli.main(["explain", "--model", str(path), "--images", images[2], "--resize", "--out", str(tmp_path / "o"),
                     "--no-progress", "--target", "1"]) == 0
    status, _, err = run_cli(["explain", "--model", str(tmp_path / "missing.keras"), "--images", images[0], "--out",
                              "o"], capsys)
    assert status == 2 and "cannot load model" in err, err


def test_quick_demo(tmp_path):
    pytest.importorskip("mlxtend")
    pytest.importorskip("matplotlib")
    out = tmp_path / "demo"
    assert cli.main(["demo", "--quick", "--out", str(out), "--no-progress", "--no-lime"]) == 0
    results = json.loads((out / "results.json").read_text())
    for name in ["fig05_input", "fig06_ab21_target3", "fig07_ab21_target9", "fig08_ab32_target3", "fig09_ab32_target9",
                 "fig10_ab32_all_targets", "fig11_2epochs_vs_more_target9", "fig12_flipped", "aopc_comparison",
                 "fig16_atlas_digit3_target3", "fig16_atlas_digit3_target9", "faithfulness_mean", "faithfulness_blur"]:
        assert (out / f"{name}.png").stat().st_size > 1000, name
    atlas = results["concept_atlas"]
    if "cifar10" in results:  # cifar-10-model and foolbox installed
        assert (out / "fig17_atlas_cifar_automobile.png").stat().st_size > 1000
        assert len(atlas["cifar10"]["channels"]) == 4
    assert [len(atlas["mnist"][f"target{t}"]["channels"]) for t in (3, 9)] == [4, 4]
    report = (out / "report.md").read_text()
    assert "## Concept atlases" in report and "![](fig16_atlas_digit3_target9.png)" in report
    assert "sum to the ordinary heatmap" in report and "speaks against the target" in report
    assert "| mean change |" in report and "+0.016" in report and "-0.138" in report  # seed numbers beside ours
    _check_faithfulness(results, report)
    flip = results["pixel_flipping"]
    assert flip["highest"]["worse"] >= 0.9 and flip["lowest"]["improved"] > 0.5
    aopc = results["aopc"]
    assert max(aopc["LRP a/b (2,1)"]["aopc"], aopc["LRP epsilon_plus_flat"]["aopc"]) > aopc["random"]["aopc"] + 0.3


def _check_faithfulness(results, report):
    """Issue 22: the SRG step's results entry (rows, no per-image arrays) and its report section."""
    faith = results["faithfulness"]
    assert (faith["n"], faith["patch"], faith["output"], faith["baselines"]) == (20, 7, "logit", ["mean", "blur"])
    assert "curves" not in faith and "scores" not in faith
    methods = ["LRP a/b (2,1)", "LRP epsilon_plus_flat", "LRP epsilon_gamma_box", "gradient", "gradient x input",
               "integrated gradients", "SmoothGrad", "random"]
    rows = {(r["method"], r["baseline"]): r for r in faith["rows"]}
    assert sorted(rows) == sorted((m, b) for m in methods for b in ("mean", "blur"))
    for b in ("mean", "blur"):
        best = rows[(faith["best"][b], b)]
        assert best["srg"] == max(r["srg"] for (_, bl), r in rows.items() if bl == b) and best["level_with_best"]
        assert best["srg"] > rows[("random", b)]["srg"] + 2  # the trained CNN's maps beat a random order
        assert f"Under the {b} baseline {faith['best'][b]} has the highest SRG" in report
    assert "## Faithfulness: region perturbation in both orders (SRG)" in report
    assert "| method | SRG mean | SRG blur | s / image |" in report
    assert "![](faithfulness_mean.png)" in report and "![](faithfulness_blur.png)" in report
    assert report.index("## Faithfulness") < report.index("### The seed's metric, kept for comparison: AOPC")
    assert "zero baseline rewards a property of the data" in report


def test_demo_report_reads_the_faithfulness_table():
    """The report's reading of the SRG table comes from the numbers: a table where the gradient leads
    under blur, ties with another method under mean, and random is off 0 says exactly that."""
    from lrp_grad.app import demo_report

    def row(method, baseline, srg, vs_best=0.0, vs_best_sem=0.0):
        return {"method": method, "baseline": baseline, "srg": srg, "sem": 0.1, "morf": 1.0, "lerf": 1.0 + srg,
                "n": 50, "seconds_per_image": 0.001, "vs_best": vs_best, "vs_best_sem": vs_best_sem}

    faith = {"n": 50, "patch": 4, "output": "logit", "steps": 49, "baselines": ["mean", "blur"], "seconds": 1.0,
             "rows": [row("gradient", "mean", 5.0, -0.1, 0.1), row("LRP a/b (2,1)", "mean", 5.1),
                      row("random", "mean", 1.0, -4.1, 0.2), row("gradient", "blur", 4.0),
                      row("LRP a/b (2,1)", "blur", 3.0, -1.0, 0.1), row("random", "blur", 0.1, -3.9, 0.2)]}
    res = {"faithfulness": faith, "mnist": {"epochs": 8},
           "aopc": {"gradient": {"aopc": 0.8}, "LRP a/b (2,1)": {"aopc": 0.7}}}
    text = "\n".join(demo_report._faithfulness_lines(res))
    assert "| method | SRG mean | SRG blur | s / image |" in text
    assert "| LRP a/b (2,1) | **5.100 ± 0.100** | 3.000 ± 0.100 |" in text
    assert ("Under the mean baseline LRP a/b (2,1) has the highest SRG (5.10 ± 0.10); level with it (within two "
            "paired standard errors): gradient; the closest of the rest, random, is 4.10 lower") in text
    assert "Under the blur baseline gradient has the highest SRG (4.00 ± 0.10), and no other method" in text
    assert "The leader changes with the baseline; bold under every baseline: gradient." in text
    assert "ranks 1 of 3 under mean and 2 of 3 under blur" in text
    assert "Random relevance scores 1.00 ± 0.10 (mean) and 0.10 ± 0.10 (blur): not within two" in text
    assert "AOPC (below) ranks gradient first; by SRG it ranks 2 of 3 under mean and 1 of 3 under blur" in text


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
    assert cli.main(["explain", "--model", str(path), "--dataset", str(tmp_path / "ds"), "--out",
                     str(tmp_path / "x")]) == 2  # "no image files"
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
    # TensorFlow's start-up lines (absl, CUDA stubs) are not shown, even with TF_CPP_MIN_LOG_LEVEL set
    for noise in ("absl::InitializeLog", "cuda", "cuDNN", "oneDNN"):
        assert noise not in proc.stderr, proc.stderr[-3000:]
    assert "flip the 10 highest relevance pixels" in proc.stdout
    assert (tmp_path / "quickstart_heatmaps.png").stat().st_size > 1000


# ---------------------------------------------------------------------------------------------
# The loader: the package that wrote a file reads it; bad files give one ModelFileError


@pytest.mark.parametrize("pkg, name", [("keras", "m.keras"), ("tf_keras", "m.keras"), ("tf_keras", "m.h5"),
                                       ("keras", "m.h5"), ("tf_keras", "saved_model")],
                         ids=["keras3.keras", "tf_keras.keras", "tf_keras.h5", "keras3.h5", "tf_keras-SavedModel"])
def test_load_model_reads_a_file_with_the_package_that_wrote_it(tmp_path, pkg, name):
    model = cnn((8, 8, 3), K=package(pkg))
    assert package_of(model) == pkg
    path = save(model, tmp_path / name)
    loaded = lrp_grad.load_model(path)
    assert package_of(loaded) == pkg, type(loaded)
    assert loaded is not model and loaded.name == model.name
    x = np.random.default_rng(0).uniform(-1, 1, (3, 8, 8, 3)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(loaded(x)), np.asarray(model(x)))
    np.testing.assert_array_equal(lrp_grad.Explainer(lrp_grad.load_model(str(path)))(x, target=1),  # str paths too
                                  lrp_grad.Explainer(model)(x, target=1))


def _zip(path, members):
    with zipfile.ZipFile(path, "w") as z:
        for member, text in members.items():
            z.writestr(member, text)


def _keras3_without_weights(path):
    """A real Keras 3 archive with its weights file left out (a truncated copy)."""
    full = save(cnn((8, 8, 3), K=package("keras")), path.with_name("full.keras"))
    with zipfile.ZipFile(full) as z:
        _zip(path, {name: z.read(name) for name in ("metadata.json", "config.json")})


#: Bad model files: id -> (file name, writer or None for a missing path, regex the message must match).
BAD = {
    "not-a-zip": ("m.keras", lambda p: p.write_text("this is not a zip"), r"not a Keras \.keras archive"),
    "random-bytes": ("r.keras", lambda p: p.write_bytes(np.random.default_rng(0).bytes(4096)),
                     r"not a Keras \.keras archive"),
    "zip-without-metadata": ("n.keras", lambda p: _zip(p, {"config.json": "{}"}),
                             r"not a Keras \.keras archive.*metadata"),
    "keras3-broken-config": ("k3.keras", lambda p: _zip(p, {"metadata.json": '{"keras_version": "3.5.0"}',
                                                            "config.json": "{not json"}), r": keras: "),
    "keras3-without-weights": ("w.keras", _keras3_without_weights, r": keras: .*weights"),
    "tf_keras-broken-config": ("k2.keras", lambda p: _zip(p, {"metadata.json": '{"keras_version": "2.16.0"}',
                                                              "config.json": "{not json"}), r": tf_keras: "),
    "corrupt-h5": ("m.h5", lambda p: p.write_bytes(b"\x89HDF garbage"), r": tf_keras: .*; keras: "),
    "unknown-suffix": ("m.onnx", lambda p: p.write_bytes(b"onnx"), r"unknown file type '\.onnx'"),
    "missing": ("missing.keras", None, r"no such file or folder"),
    "folder-not-SavedModel": ("folder", lambda p: p.mkdir(), r"tf_keras: .*SavedModel"),
}


@pytest.fixture(params=list(BAD))
def bad_file(request, tmp_path):
    name, write, pattern = BAD[request.param]
    path = tmp_path / name
    if write is not None:
        write(path)
    return path, pattern


def test_load_model_errors_name_the_path(bad_file):
    path, pattern = bad_file
    with pytest.raises(lrp_grad.ModelFileError) as info:
        lrp_grad.load_model(path)
    message = str(info.value)
    assert message.startswith(f"cannot load model {str(path)!r}: "), message
    assert len(message.splitlines()) == 1, message
    assert re.search(pattern, message), (pattern, message)
    assert isinstance(info.value, lrp_grad.LRPError)


@pytest.mark.parametrize("command", ["explain", "export"])
def test_cli_bad_model_file_is_one_line_on_stderr(bad_file, command, tmp_path, capsys):
    path, pattern = bad_file
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "img.png")  # the image exists: the model file is what fails
    argv = (["explain", "--model", str(path), "--images", str(tmp_path / "img.png"), "--out", str(tmp_path / "o")]
            if command == "explain" else ["export", str(path), str(tmp_path / "saved")])
    status, out, err = run_cli(argv, capsys)
    assert status == 2, status  # a bad model file is bad input
    assert "Traceback" not in err and out == "", (out, err)
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"lrp-grad {command}: cannot load model {str(path)!r}: "), lines[0]
    assert re.search(pattern, lines[0]), (pattern, lines[0])
    assert not (tmp_path / "o").exists() and not (tmp_path / "saved").exists()
