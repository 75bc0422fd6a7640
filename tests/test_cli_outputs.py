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
        save_png(R[i], tmp_path / "expected.png", scheme="lrp")  # each file holds its own image's heatmap
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
