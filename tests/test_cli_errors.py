"""Every documented error path of the command line: one message on stderr, a non-zero exit,
never a Python traceback; and a quiet start (no TensorFlow log, no TensorFlow for --help)."""
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import kit
from lrp_grad import cli


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from PIL import Image

    K = kit.package("keras")
    root = tmp_path_factory.mktemp("cli")
    model = kit.randomize(K.Sequential([K.Input((8, 8, 3)), K.layers.Conv2D(4, 3, activation="relu"),
                                        K.layers.Flatten(name="flatten"), K.layers.Dense(3)]))
    model.save(root / "m.keras")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(root / "a.png")
    (root / "not_a_model.keras").write_text("hello")
    (root / "file.txt").write_text("x")
    (root / "weights.bin").write_bytes(b"\0" * 10)
    return root


def run(argv, capsys):
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (print(e.code, file=sys.stderr) or 2)
    err = capsys.readouterr().err
    return code, err


CASES = {
    "target out of range": (["explain", "--model", "{m}", "--images", "{img}", "--out", "{tmp}/o", "--target", "7"],
                            r"--target 7 is out of range: the model has 3 classes \(0\.\.2\)"),
    "negative target": (["explain", "--model", "{m}", "--images", "{img}", "--out", "{tmp}/o", "--target", "-1"],
                        r"argument --target: -1 is not a class index"),
    "batch size 0": (["explain", "--model", "{m}", "--dataset", "{root}", "--out", "{tmp}/o", "--batch-size", "0"],
                     r"argument --batch-size: 0 is not a positive count \(an integer >= 1\)"),
    "scale nan": (["explain", "--model", "{m}", "--images", "{img}", "--out", "{tmp}/o", "--scale", "nan"],
                  r"argument --scale: 'nan' must be a finite, non-zero number"),
    "out is a file": (["explain", "--model", "{m}", "--images", "{img}", "--out", "{root}/file.txt"],
                      r"--out .*file.txt is a file; give a folder"),
    "export to a file": (["export", "{m}", "{root}/file.txt"], r"the output .*file.txt is a file; give a folder"),
    "unreadable keras file": (["explain", "--model", "{root}/not_a_model.keras", "--images", "{img}", "--out",
                               "{tmp}/o"], r"cannot load model .*not_a_model.keras.*not a Keras .keras archive"),
    "missing model": (["explain", "--model", "{root}/nope.keras", "--images", "{img}", "--out", "{tmp}/o"],
                      r"cannot load model .*nope.keras.*no such file"),
    "unknown suffix": (["export", "{root}/weights.bin", "{tmp}/sm"], r"unknown file type '.bin'"),
    "unknown rule": (["explain", "--model", "{m}", "--images", "{img}", "--out", "{tmp}/o", "--rule", "lrp"],
                     r"--rule 'lrp' is not known"),
    "missing image": (["explain", "--model", "{m}", "--images", "{root}/none.png", "--out", "{tmp}/o"],
                      r"cannot read image .*none.png"),
    "concepts: unknown layer": (["concepts", "--model", "{m}", "--image", "{img}", "--out", "{tmp}/o", "--layer",
                                 "nope"], r"has no layer 'nope'"),
    "concepts: layer without channels": (["concepts", "--model", "{m}", "--image", "{img}", "--out", "{tmp}/o",
                                          "--layer", "flatten"], r"layer 'flatten' \(Flatten\) has no channels"),
    "concepts: target out of range": (["concepts", "--model", "{m}", "--image", "{img}", "--out", "{tmp}/o",
                                       "--target", "5"], r"--target 5 is out of range: the model has 3 classes"),
    "concepts: references not a folder": (["concepts", "--model", "{m}", "--image", "{img}", "--out", "{tmp}/o",
                                           "--references", "{root}/file.txt"],
                                          r"--references .*file.txt' is not a folder of images"),
    "concepts: top 0": (["concepts", "--model", "{m}", "--image", "{img}", "--out", "{tmp}/o", "--top", "0"],
                        r"argument --top: 0 is not a positive count"),
    "concepts: out is a file": (["concepts", "--model", "{m}", "--image", "{img}", "--out", "{root}/file.txt"],
                                r"--out .*file.txt is a file; give a folder"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_cli_error_paths_print_one_message_and_no_traceback(case, files, tmp_path, capsys):
    """Every case is a bad input (an argument, a model file, an image): exit status 2, as the
    README says (1 is for failures: an unexpected error, out of memory)."""
    argv, pattern = CASES[case]
    argv = [a.format(m=files / "m.keras", img=files / "a.png", root=files, tmp=tmp_path) for a in argv]
    code, err = run(argv, capsys)
    assert code == 2, (code, err)
    assert "Traceback" not in err, err
    assert __import__("re").search(pattern, err), err


def test_unexpected_errors_are_one_line_too(monkeypatch, files, tmp_path, capsys):
    import importlib

    explain_module = importlib.import_module("lrp_grad.explainer")

    def boom(*a, **k):
        raise RuntimeError("something deep broke\nsecond line")

    monkeypatch.setattr(explain_module.Explainer, "forward", boom)
    code, err = run(["explain", "--model", files / "m.keras", "--images", files / "a.png", "--out", tmp_path / "o"],
                    capsys)
    assert code == 1 and "Traceback" not in err
    assert "unexpected error: RuntimeError: something deep broke (set LRP_GRAD_TRACEBACK=1" in err, err


def test_help_is_quick_and_imports_no_tensorflow():
    code = ("import sys; from lrp_grad import cli\n"
            "try:\n    cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('TF', 'tensorflow' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "usage: lrp-grad" in out.stdout and "TF False" in out.stdout, out.stdout + out.stderr


FAST_FAILURES = {
    "missing --out": (["explain", "--model", "{m}", "--images", "{img}"], r"required: --out"),
    "bad --rule": (["explain", "--model", "{m}", "--images", "{img}", "--out", "{tmp}/o", "--rule", "lrp"],
                   r"--rule 'lrp' is not known"),
    "missing model": (["explain", "--model", "{tmp}/nope.keras", "--images", "{img}", "--out", "{tmp}/o"],
                      r"cannot load model .*nope.keras': no such file or folder"),
    "missing image": (["concepts", "--model", "{m}", "--image", "{tmp}/none.png", "--out", "{tmp}/o"],
                      r"cannot read image .*none.png: no such file"),
    "out is a file": (["explain", "--model", "{m}", "--images", "{img}", "--out", "{img}"],
                      r"is a file; give a folder"),
    "export: missing model": (["export", "{tmp}/nope.h5", "{tmp}/sm"], r"cannot load model .*nope.h5"),
    "bench: bad option": (["bench", "--models", "nope"], r"argument --models: invalid choice: 'nope'"),
}


def test_argument_errors_and_bench_help_come_before_tensorflow_loads(files, tmp_path):
    """Issue 21: a missing --out or a bad --rule was reported only after TensorFlow had loaded
    (18-26 s), and `lrp-grad bench --help` took 21 s. Checked in a fresh interpreter: each exits
    with status 2 (0 for --help) and TensorFlow is not in sys.modules afterwards."""
    import json

    cases = {k: [a.format(m=files / "m.keras", img=files / "a.png", tmp=tmp_path) for a in argv]
             for k, (argv, _) in FAST_FAILURES.items()}
    cases["bench --help"] = ["bench", "--help"]
    proc = kit.cli_in_fresh_interpreter(cases)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["tf"] is False, "TensorFlow was imported before the arguments were checked"
    for name, (_, pattern) in FAST_FAILURES.items():
        status, err, _ = result["out"][name]
        assert status == 2 and __import__("re").search(pattern, err), (name, status, err)
        assert "Traceback" not in err
    status, _, out = result["out"]["bench --help"]
    assert status == 0 and "usage: lrp-grad bench" in out


def test_the_cli_lists_of_names_match_the_library():
    """The CLI keeps TensorFlow-free copies of the preset and benchmark model names."""
    from lrp_grad.app import bench, bench_args
    from lrp_grad.core import presets

    assert cli.PRESET_NAMES == presets.NAMES
    assert bench_args.MODEL_NAMES == tuple(bench.MODELS)


def test_cli_start_is_quiet(files, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    out = subprocess.run([sys.executable, "-m", "lrp_grad", "explain", "--model", str(files / "m.keras"),
                          "--images", str(files / "a.png"), "--out", str(tmp_path / "o"), "--no-progress"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stderr.strip() == "", f"the CLI printed to stderr:\n{out.stderr}"


def test_export_prints_the_rule_and_dataset_summaries_store_classes_as_ints(files, tmp_path, capsys):
    import json

    code = cli.main(["export", str(files / "m.keras"), str(tmp_path / "sm"), "--rule", "alphabeta:2,1"])
    out = capsys.readouterr().out
    assert code == 0 and "rule baked in: AlphaBeta(alpha=2.0, beta=1.0, bias=True)" in out, out
    code = cli.main(["explain", "--model", str(files / "m.keras"), "--dataset", str(files), "--out",
                     str(tmp_path / "d"), "--no-progress"])
    assert code == 0
    summary = json.loads((tmp_path / "d" / "summaries.json").read_text())["a.png"]
    assert isinstance(summary["predicted"], int) and isinstance(summary["target"], int)
    assert isinstance(summary["target_logit"], float)


def test_an_image_too_large_to_read_safely_is_named_with_its_size(files, tmp_path, capsys, monkeypatch):
    """Issue 21: a huge PNG gave 'unexpected error: DecompressionBombError'. (Pillow's limit is
    lowered for the test instead of writing a gigapixel file.)"""
    from PIL import Image

    Image.new("RGB", (40, 30)).save(tmp_path / "huge.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # 1200 pixels > 2 x 500: refused by Pillow
    code, err = run(["explain", "--model", files / "m.keras", "--images", tmp_path / "huge.png", "--out",
                     tmp_path / "o"], capsys)
    assert code == 2 and "Traceback" not in err and "unexpected" not in err, err
    assert re.search(r"image .*huge\.png is 40x30 = 1,200 pixels, more than Pillow reads safely \(500 pixels: a file "
                     r"this large can be a decompression bomb\); it is not read\. Shrink it", err), err
    assert Image.MAX_IMAGE_PIXELS == 500  # the limit is restored after reading the size
