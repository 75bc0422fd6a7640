"""``lrp-grad evaluate`` (issue 22): the faithfulness table for a saved model and its images, the
same numbers as ``lrp_grad.evaluate.faithfulness_table``; labels from a file, from the .npz or the
predicted class; JSON, Markdown and plots; every bad input one message with exit status 2, checked
before TensorFlow loads where it can be (tiny models saved by both Keras packages)."""
import json
import re

import numpy as np
import pytest

import lrp_grad
from lrp_grad import cli, evaluate
from lrp_grad.app import cli_evaluate
from kit import cli_in_fresh_interpreter, package, randomize
from test_cli import SAVED, save

RULES = "epsilon_plus_flat,alphabeta:2,1,gradient_x_input,random"
LABELS = ["epsilon_plus_flat", "alphabeta:2,1", "gradient_x_input", "random"]


def run(argv, capsys):
    """``lrp-grad argv`` in-process: ``(status, stdout, stderr)``; argparse's usage errors exit 2."""
    try:
        status = cli.main([str(a) for a in argv])
    except SystemExit as e:
        status = e.code
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def write_files(root, pkg="keras", suffix=".keras"):
    """A tiny 3-class model, 2 PNG images, an .npz of 3 images with labels ``y``, one of 2 without,
    a 10x12 PNG and a labels file for the PNGs + the labelled .npz."""
    from PIL import Image

    K = package(pkg)
    model = randomize(K.Sequential([K.Input((8, 8, 3)), K.layers.Conv2D(4, 3, activation="relu"),
                                    K.layers.Flatten(), K.layers.Dense(3)]))
    save(model, root / f"m{suffix}")
    rng = np.random.default_rng(0)
    (root / "pics").mkdir()
    for name in ("b.png", "a.png"):
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(root / "pics" / name)
    (root / "pics" / "notes.txt").write_text("not an image")
    Image.fromarray(rng.integers(0, 255, (12, 10, 3), dtype=np.uint8)).save(root / "big.png")
    x = rng.uniform(0, 1, (3, 8, 8, 3)).astype("float32")
    np.savez(root / "test.npz", x=x, y=np.array([2, 0, 1]))
    np.savez(root / "plain.npz", x=x[:2])
    (root / "labels.txt").write_text("1, 0\n2 0 1\n")
    return model


@pytest.fixture(scope="module", params=list(SAVED))
def saved(request, tmp_path_factory):
    pkg, suffix = SAVED[request.param]
    root = tmp_path_factory.mktemp(request.param)
    model = write_files(root, pkg, suffix)
    return model, root / f"m{suffix}", root


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    write_files(root)
    K = package("keras")
    save(K.Sequential([K.Input((8, 8, 3)), K.layers.Conv2D(2, 1)]), root / "segmenter.keras")  # no classifier
    (root / "file.txt").write_text("x")
    (root / "empty").mkdir()
    return root


def test_the_table_has_every_method_and_baseline_and_equals_the_library(saved, tmp_path, capsys):
    """A folder of PNGs and an .npz, the classes of all five images from --labels: the table printed has
    every method and baseline, with the numbers of faithfulness_table on the same images."""
    model, path, root = saved
    out = tmp_path / "new" / "folder"
    status, stdout, err = run(["evaluate", "--model", path, "--images", root / "pics", root / "test.npz",
                               "--labels", root / "labels.txt", "--rules", RULES, "--baselines", "mean,blur",
                               "--json", out / "t.json", "--markdown", out / "t.md", "--plot", out / "c.png",
                               "--no-progress"], capsys)
    assert status == 0, err
    assert err == ""
    lines = stdout.splitlines()
    assert lines[0].startswith("symmetric relevance gain (area LeRF - area MoRF, logits), 5 images, 4x4 patches, "
                               "4 steps"), lines[0]
    assert re.match(r"method +SRG mean +SRG blur  s/image$", lines[1]), lines[1]
    rows = {line.split()[0]: line for line in lines[2:6]}
    assert sorted(rows) == sorted(LABELS), lines
    for line in rows.values():
        assert len(re.findall(r"-?\d+\.\d{4} ± \d+\.\d{4}", line)) == 2, line
    assert re.fullmatch(re.escape(f"explained class: the label of each image, from --labels {root / 'labels.txt'}; "
                                  "the model predicts ") + r"[0-5] of 5 of them", lines[6]), lines[6]
    files = [out / "t.json", out / "t.md", out / "c-mean.png", out / "c-blur.png"]
    assert lines[7] == "wrote " + ", ".join(map(str, files)) and len(lines) == 8, lines
    assert (out / "c-mean.png").read_bytes().startswith(b"\x89PNG") and (out / "c-blur.png").stat().st_size > 5000

    info = json.loads((out / "t.json").read_text())
    keys = [str(root / "pics" / "a.png"), str(root / "pics" / "b.png")] + [f"{root / 'test.npz'}[x, {j}]"
                                                                            for j in range(3)]
    assert info["images"] == keys  # a folder: its images sorted by name, other files left out
    assert info["explained"] == "labels" and info["targets"] == [1, 0, 2, 0, 1]
    assert info["methods"]["alphabeta:2,1"] == repr(lrp_grad.AlphaBeta(2, 1))
    assert {(r["method"], r["baseline"]) for r in info["rows"]} == {(m, b) for m in LABELS for b in ("mean", "blur")}

    from PIL import Image

    x = np.concatenate([np.stack([np.asarray(Image.open(k), np.float32) / 255 for k in keys[:2]]),
                        np.load(root / "test.npz")["x"]])
    methods = dict(zip(LABELS, ["epsilon_plus_flat", lrp_grad.AlphaBeta(2, 1), "gradient_x_input", "random"]))
    expected = evaluate.faithfulness_table(lrp_grad.load_model(path), x, [1, 0, 2, 0, 1], methods=methods,
                                           baselines=["mean", "blur"])
    for (m, b), scores in expected.scores.items():
        np.testing.assert_allclose(info["per_image_srg"][f"{m} | {b}"], scores, rtol=1e-5, atol=1e-6)
        assert f"{expected.row(m, b).srg:.4f} ± {expected.row(m, b).sem:.4f}" in rows[m]
    markdown = (out / "t.md").read_text()
    assert expected.markdown().splitlines()[1] in markdown and "| method | SRG mean | SRG blur |" in markdown
    assert "Explained class: the label of each image" in markdown


def test_npz_labels_or_the_predicted_class(files, tmp_path, capsys):
    """Without --labels: the y of a .npz, else the predicted class, and the output says which."""
    status, stdout, err = run(["evaluate", "--model", files / "m.keras", "--images", files / "test.npz", "--rules",
                               "gradient", "--baselines", "zero", "--json", tmp_path / "y.json", "--no-progress"],
                              capsys)
    assert status == 0, err
    assert f"explained class: the label of each image, from {files / 'test.npz'}['y']; the model predicts" in stdout
    info = json.loads((tmp_path / "y.json").read_text())
    assert info["targets"] == [2, 0, 1] and info["labels"] == f"{files / 'test.npz'}['y']"

    status, stdout, err = run(["evaluate", "--model", files / "m.keras", "--images", files / "plain.npz", "--rules",
                               "gradient", "--baselines", "zero", "--json", tmp_path / "p.json", "--no-progress"],
                              capsys)
    assert status == 0, err
    assert "explained class: the class the model predicts for each image (no --labels given)" in stdout
    info = json.loads((tmp_path / "p.json").read_text())
    model = lrp_grad.load_model(files / "m.keras")
    x = np.load(files / "plain.npz")["x"]
    predicted = np.asarray(model(x)).argmax(1)
    assert info["explained"] == "predicted" and info["targets"] == predicted.tolist() and info["labels"] is None
    expected = evaluate.faithfulness_table(model, x, predicted, methods=["gradient"], baselines=["zero"])
    np.testing.assert_allclose(info["per_image_srg"]["gradient | zero"], expected.scores[("gradient", "zero")],
                               rtol=1e-5, atol=1e-6)


def test_limit_default_methods_and_the_progress_bar(files, tmp_path, capsys):
    """--limit takes the first images (the labels still count all of them); the default methods are
    the library's; without --no-progress a bar on stderr, nothing else there."""
    status, stdout, err = run(["evaluate", "--model", files / "m.keras", "--images", files / "pics", files / "test.npz",
                               "--labels", files / "labels.txt", "--limit", "2", "--baselines", "uniform",
                               "--steps", "2", "--output", "probability"], capsys)
    assert status == 0, err
    assert "(area LeRF - area MoRF, probabilities), 2 images, 4x4 patches, 2 steps" in stdout, stdout
    methods = [line.split()[0] for line in stdout.splitlines()[2:2 + len(evaluate.DEFAULT_METHODS)]]
    assert sorted(methods) == sorted(evaluate.DEFAULT_METHODS), stdout
    assert "evaluated the first 2 of the 5 images (--limit 2)" in stdout
    assert "evaluating" in err and "100%" in err and "random on images 0..1" in err, err
    assert "Traceback" not in err and "Warning" not in err, err


def test_method_names_and_baselines_match_the_library():
    from lrp_grad.evaluate.region import BASELINES

    assert cli_evaluate.method_names() == evaluate.method_names()
    assert set(cli_evaluate.parse_baselines(["zero,mean", "blur,uniform"])) == set(BASELINES)
    methods = cli_evaluate.parse_methods(["epsilon_plus,alphabeta:2,1,zbox:-1,1", "gamma:0.25,epsilon"])
    assert methods == {"epsilon_plus": "epsilon_plus", "alphabeta:2,1": lrp_grad.AlphaBeta(2, 1),
                       "zbox:-1,1": lrp_grad.ZBox(-1, 1), "gamma:0.25": lrp_grad.Gamma(0.25),
                       "epsilon": lrp_grad.Epsilon()}


#: Bad inputs found before TensorFlow loads: id -> (arguments after the model, message pattern).
EARLY = {
    "unknown method": (["--rules", "epsilon_plus_flat,lrp"],
                       r"--rules 'lrp' is not known; use a method \(epsilon_plus, .*, smoothgrad, random, lime\) or "
                       r"a rule \(z, zplus, .*zbox:LOW,HIGH\), comma-separated\."),
    "rule with bad parameters": (["--rules", "alphabeta:3,1"],
                                 r"--rules 'alphabeta:3,1': AlphaBeta: alpha - beta must equal 1"),
    "method twice": (["--methods", "gradient", "random,gradient"], r"--rules names 'gradient' twice"),
    "unknown baseline": (["--baselines", "mean,grey"],
                         r"--baselines 'grey' is not known; use zero, mean, blur, uniform \(comma-separated"),
    "empty item": (["--baselines", "mean,,blur"], r"--baselines 'mean,,blur' has an empty item"),
    "patch 0": (["--patch", "0"], r"argument --patch: 0 is not a positive count"),
    "output": (["--output", "prob"], r"argument --output: invalid choice: 'prob'"),
    "labels missing": (["--labels", "{root}/nope.npy"], r"--labels .*nope.npy: no such file \(one class index per "
                                                       r"image: a .npy, .npz or .txt file\)"),
    "labels folder": (["--labels", "{root}/empty"], r"--labels .*empty is a folder; give a file"),
    "labels text": (["--labels", "{tmp}/l.txt"], r"--labels .*l.txt, line 2: 'cat' is not a class index"),
    "labels negative": (["--labels", "{tmp}/neg.npy"], r"--labels .*neg.npy: label -1 \(position 1\) is not a class "
                                                       r"index \(an integer >= 0\)"),
    "labels fractional": (["--labels", "{tmp}/frac.npy"], r"label 0.5 \(position 0\) is not a class index"),
    "labels 2-D": (["--labels", "{tmp}/two.npy"], r"has shape \(2, 2\); give one class index per image"),
    "labels npz without y": (["--labels", "{tmp}/ab.npz"], r"holds the arrays \['a', 'b'\]; name the array of "
                                                           r"classes 'y' or 'labels'"),
    "json folder": (["--json", "{root}/empty"], r"--json .*empty is a folder; give a file name \(e.g. .*table.json\)"),
    "json below a file": (["--json", "{root}/file.txt/t.json"], r"--json .*t.json: .*file.txt is a file, not a folder"),
    "plot type": (["--plot", "{tmp}/c.txt"], r"--plot .*c.txt: give a picture file name ending in .png, .pdf"),
    "plot folder": (["--plot", "{root}/empty", "--baselines", "zero"], r"--plot .*empty: give a picture file name"),
    "output onto the model": (["--markdown", "{model}"], r"--markdown .*m.keras would overwrite an input file"),
    "two outputs one file": (["--json", "{tmp}/t.out", "--markdown", "{tmp}/t.out"],
                             r"--markdown .*t.out is also the file of --json"),
    "missing image": (["--images", "{root}/none.png"], r"cannot read image .*none.png: no such file or folder"),
    "empty folder": (["--images", "{root}/empty"], r"--images .*empty is a folder without images \(.bmp, .*\) or "
                                                   r"arrays \(.npy, .npz\)"),
    "same file twice": (["--images", "{root}/pics", "{root}/pics/a.png"],
                        r"--images gives the file .*a.png twice \(from '.*pics' and '.*pics/a.png'\); give "
                        r"each image once \(it would count twice in the means\)\.$"),
    "missing model": (["--model", "{root}/nope.keras"], r"cannot load model .*nope.keras': no such file or folder"),
}
if __import__("importlib").util.find_spec("lime") is None:
    EARLY["lime not installed"] = (["--rules", "gradient,lime"], r"--rules lime needs the package 'lime' \(pip "
                                                                 r"install lime\)")


def _early_argv(case, files, tmp_path):
    extra, _ = EARLY[case]
    argv = ["evaluate", "--model", "{model}", "--images", "{root}/test.npz", "--no-progress"]
    for option in ("--model", "--images"):
        if option in extra:  # the case replaces the default
            i = argv.index(option)
            argv = argv[:i] + argv[i + 2:]
    return [a.format(root=files, tmp=tmp_path, model=files / "m.keras") for a in argv + extra]


def _bad_label_files(tmp_path):
    (tmp_path / "l.txt").write_text("0 1\ncat\n")
    np.save(tmp_path / "neg.npy", np.array([0, -1]))
    np.save(tmp_path / "frac.npy", np.array([0.5, 1]))
    np.save(tmp_path / "two.npy", np.array([[1, 2], [0, 3]]))
    np.savez(tmp_path / "ab.npz", a=np.zeros(2), b=np.ones(2))


def test_bad_arguments_are_refused_before_tensorflow_loads(files, tmp_path):
    """Every case in a fresh interpreter: exit status 2, one message naming the argument and the fix,
    no traceback, nothing written, and TensorFlow never imported."""
    _bad_label_files(tmp_path)
    cases = {case: _early_argv(case, files, tmp_path) for case in EARLY}
    proc = cli_in_fresh_interpreter(cases)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["tf"] is False, "TensorFlow was imported before the arguments were checked"
    for case, (_, pattern) in EARLY.items():
        status, err, out = result["out"][case]
        assert status == 2 and out == "", (case, status, out, err)
        assert "Traceback" not in err, (case, err)
        message = err.strip().splitlines()[-1]  # argparse puts its usage line before its message
        assert re.search(pattern, message), (case, pattern, message)
        if not message.startswith("lrp-grad evaluate: error: argument"):
            assert message.startswith("lrp-grad evaluate: ") and len(err.strip().splitlines()) == 1, (case, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ab.npz", "frac.npy", "l.txt", "neg.npy", "two.npy"]


#: Bad inputs found once the model and the images are read: id -> (arguments, message pattern).
LATE = {
    "labels count": (["--images", "{root}/pics", "--labels", "{root}/labels.txt"],
                     r"--labels .*labels.txt has 5 labels but --images holds 2 images; give one class index per "
                     r"image, in the order of --images"),
    "label not a class": (["--images", "{tmp}/five.npy", "--labels", "{tmp}/five_labels.txt"],
                          r"--labels .*five_labels.txt: label 5 of image .*five.npy\[1\] is not a class of the "
                          r"model, which has 3 outputs \(classes 0..2\)\.$"),
    "npz labels count": (["--images", "{tmp}/short.npz"], r"short.npz\['y'\] has 1 label but .*short.npz holds 3 "
                                                          r"images"),
    "npz labels beside unlabelled images": (["--images", "{root}/test.npz", "{root}/pics"],
                                            r"test.npz\['y'\] holds the classes of its images but .*a.png has none; "
                                            r"give --labels FILE with the classes of all 5 images"),
    "not a classifier": (["--model", "{root}/segmenter.keras"],
                         r"lrp-grad evaluate: faithfulness_table needs a classifier with output shape \(n, classes\); "
                         r"this model returns shape \(3, 8, 8, 2\)\.$"),
    "steps": (["--steps", "9"], r"--steps 9 but 8x8 images have only 4 regions of 4x4; give --steps 4 or less"),
    "patch covers the image": (["--patch", "8"], r"--patch 8 makes each 8x8 image a single region: .* every method "
                                                 r"scores 0; give --patch below 8"),
    "image size": (["--images", "{root}/big.png"], r"lrp-grad evaluate: image .*big.png is 10x12 but the model takes "
                                                   r"8x8; pass --resize"),
    "array shape": (["--images", "{tmp}/wrong.npy"], r"lrp-grad evaluate: .*wrong.npy has shape \(2, 9, 9, 3\) but "
                                                     r"the model takes images \(8, 8, 3\)"),
    "only labels in the npz": (["--images", "{tmp}/onlyy.npz"], r"onlyy.npz holds no arrays of images, only 'y'\."),
}


@pytest.mark.parametrize("case", list(LATE))
def test_bad_inputs_found_after_loading_are_one_line(case, files, tmp_path, capsys):
    np.save(tmp_path / "five.npy", np.zeros((2, 8, 8, 3), "float32"))
    (tmp_path / "five_labels.txt").write_text("0 5")
    np.savez(tmp_path / "short.npz", x=np.zeros((3, 8, 8, 3), "float32"), y=[1])
    np.save(tmp_path / "wrong.npy", np.zeros((2, 9, 9, 3)))
    np.savez(tmp_path / "onlyy.npz", y=[1])
    extra, pattern = LATE[case]
    argv = ["evaluate", "--model", "{root}/m.keras", "--images", "{root}/test.npz", "--rules", "gradient",
            "--baselines", "mean", "--no-progress"]
    for option in ("--model", "--images"):
        if option in extra:
            i = argv.index(option)
            argv = argv[:i] + argv[i + 2:]
    argv = [a.format(root=files, tmp=tmp_path) for a in argv + extra]
    status, out, err = run(argv, capsys)
    assert status == 2, (status, out, err)
    assert out == "" and "Traceback" not in err, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lrp-grad evaluate: "), err
    assert re.search(pattern, lines[0]), (pattern, lines[0])


def test_an_unexpected_error_is_one_line_with_status_1(files, monkeypatch, capsys):
    def boom(*a, **k):
        raise RuntimeError("the table broke\nsecond line")

    monkeypatch.setattr(evaluate, "faithfulness_table", boom)
    argv = ["evaluate", "--model", files / "m.keras", "--images", files / "test.npz", "--no-progress"]
    status, out, err = run(argv, capsys)
    assert status == 1 and out == "" and "Traceback" not in err, (status, err)
    assert err == ("lrp-grad evaluate: unexpected error: RuntimeError: the table broke (set LRP_GRAD_TRACEBACK=1 to "
                   "see the traceback)\n"), err
    monkeypatch.setenv("LRP_GRAD_TRACEBACK", "1")
    with pytest.raises(RuntimeError, match="the table broke"):
        cli.main([str(a) for a in argv])
