"""``lrp-grad explain --images`` never overwrites one image's outputs with another's: images that
share a file name (in other folders, or with another extension) get their own heatmaps, and
targets.json keys every image unambiguously; the same file twice, or an output onto an input, is
refused (models saved by either Keras package)."""
import json
import pathlib

import numpy as np
import pytest

import lrp_grad
from lrp_grad import cli
from lrp_grad.visual.figures import save_png
from kit import randomize


@pytest.fixture
def setup(K, tmp_path):
    from PIL import Image

    model = randomize(K.Sequential([K.Input((8, 8, 3)), K.layers.Conv2D(4, 3, activation="relu"),
                                    K.layers.Flatten(), K.layers.Dense(3)]))
    path = tmp_path / "m.keras"
    model.save(path)
    rng = np.random.default_rng(1)
    images = []
    for rel in ("a/digit.png", "b/digit.png", "a/digit.jpg", "a/Digit.bmp"):
        p = tmp_path / "img" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(p)
        images.append(p)
    return path, images


def _run(argv, capsys):
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_images_with_the_same_name_get_their_own_outputs(setup, tmp_path, capsys):
    from PIL import Image

    path, images = setup
    out = tmp_path / "out"
    code, stdout, err = _run(["explain", "--model", path, "--images", *images, "--out", out, "--no-progress"], capsys)
    assert code == 0, err
    assert "wrote 4 heatmaps and overlays" in stdout, stdout
    targets = json.loads((out / "targets.json").read_text())
    assert list(targets) == ["a/digit.png", "b/digit.png", "a/digit.jpg", "a/Digit.bmp"]  # the order of the rows
    stems = ["a/digit_png", "b/digit", "a/digit_jpg", "a/Digit_bmp"]  # extensions kept where names collide
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert written == sorted(f"{s}_{k}.png" for s in stems for k in ("heatmap", "overlay")), written

    R = np.load(out / "relevance.npy")
    ex = lrp_grad.Explainer(lrp_grad.load_model(path), rule="epsilon_plus_flat")
    for i, (image, stem) in enumerate(zip(images, stems)):
        x = np.asarray(Image.open(image).convert("RGB"), np.float32)[None] / 255
        np.testing.assert_allclose(R[i], ex(x, target=list(targets.values())[i])[0], rtol=1e-5, atol=1e-7)
        save_png(R[i], tmp_path / "expected.png", scheme="lrp", colorbar=True)  # its own image's heatmap
        assert (out / f"{stem}_heatmap.png").read_bytes() == (tmp_path / "expected.png").read_bytes(), stem


def test_the_same_image_twice_and_outputs_onto_inputs_are_refused(setup, tmp_path, capsys):
    path, images = setup
    again = images[0].parent / ".." / "a" / images[0].name
    code, _, err = _run(["explain", "--model", path, "--images", images[0], again, "--out", tmp_path / "o",
                         "--no-progress"], capsys)
    assert code == 2 and "Traceback" not in err, err
    assert f"--images names the same file twice ({images[0]} and {again}); give each image once" in err, err
    assert not (tmp_path / "o").exists()

    folder = images[0].parent
    clash = folder / "digit_heatmap.png"  # what explaining digit.png into its own folder would write
    clash.write_bytes(images[1].read_bytes())
    before = clash.read_bytes()
    code, _, err = _run(["explain", "--model", path, "--images", images[0], clash, "--out", folder,
                         "--no-progress"], capsys)
    assert code == 2 and "Traceback" not in err, err
    assert f"--out {folder} would overwrite the input image {clash} with an output of the same name; give " \
           "another --out folder." in err, err
    assert clash.read_bytes() == before and not (folder / "relevance.npy").exists()


def test_npy_and_npz_batches_are_explained_row_by_row(setup, tmp_path, capsys):
    """Issue 21: `explain --images x.npy` said 'cannot identify image file'. A .npy batch
    (N, H, W, C) or one image (H, W, C), and the arrays of a .npz, are explained as they are
    (no 1/255 unless --scale is given); outputs are x_0000_heatmap.png, ..., keyed x.npy[0]."""
    path, images = setup
    rng = np.random.default_rng(2)
    batch = rng.uniform(0, 1, (3, 8, 8, 3)).astype("float32")
    np.save(tmp_path / "x.npy", batch)
    np.save(tmp_path / "one.npy", batch[0].astype("float64"))
    np.savez(tmp_path / "pair.npz", a=batch[:2], b=batch[2])
    out = tmp_path / "out"
    code, stdout, err = _run(["explain", "--model", path, "--images", tmp_path / "x.npy", tmp_path / "one.npy",
                              tmp_path / "pair.npz", images[0], "--out", out, "--no-progress", "--target", "1"],
                             capsys)
    assert code == 0, err
    assert "wrote 8 heatmaps and overlays" in stdout, stdout
    targets = json.loads((out / "targets.json").read_text())
    assert list(targets) == ["x.npy[0]", "x.npy[1]", "x.npy[2]", "one.npy[0]", "pair.npz[a, 0]", "pair.npz[a, 1]",
                             "pair.npz[b, 0]", "img/a/digit.png"], list(targets)
    for stem in ("x_0000", "x_0001", "x_0002", "one_0000", "pair_a_0000", "pair_a_0001", "pair_b_0000"):
        assert (out / f"{stem}_heatmap.png").read_bytes().startswith(b"\x89PNG"), stem
        assert (out / f"{stem}_overlay.png").exists(), stem
    R = np.load(out / "relevance.npy")
    ex = lrp_grad.Explainer(lrp_grad.load_model(path), rule="epsilon_plus_flat")
    rows = np.concatenate([batch, batch[:1], batch[:2], batch[2:]])
    np.testing.assert_allclose(R[:7], ex(rows, target=1), rtol=1e-5, atol=1e-7)  # taken as they are


@pytest.mark.parametrize("array, pattern", [
    (np.zeros((2, 3, 8, 8)), r"x.npy has shape \(2, 3, 8, 8\) but the model takes images \(8, 8, 3\).*It looks "
                             r"channels-first .*np\.transpose\(x, \(0, 2, 3, 1\)\)"),
    (np.zeros((2, 9, 9, 3)), r"x.npy has shape \(2, 9, 9, 3\) but the model takes images \(8, 8, 3\): give a batch "
                             r"\(N, 8, 8, 3\) or one image \(8, 8, 3\) \(arrays are not resized\)\.$"),
    (np.array(["a", "b"]), r"x.npy has dtype <U1; it must hold numbers"),
])
def test_a_bad_array_file_is_named_with_what_the_model_takes(setup, tmp_path, capsys, array, pattern):
    import re

    path, _ = setup
    np.save(tmp_path / "x.npy", array)
    code, _, err = _run(["explain", "--model", path, "--images", tmp_path / "x.npy", "--out", tmp_path / "o"], capsys)
    assert code == 2 and "Traceback" not in err
    assert re.search(pattern, err.strip()), err
