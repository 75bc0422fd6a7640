"""Heatmap rendering: normalisation, colour conventions, overlays and the files it writes.

Tiny hand-made maps with known answers; figures use the non-interactive Agg backend.
"""
import pathlib
import subprocess
import sys

import matplotlib
import matplotlib.image
import numpy as np
import pytest

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from PIL import Image  # noqa: E402

from lrp_grad import heatmap  # noqa: E402
from lrp_grad.visual import colors, figures  # noqa: E402

# The colour code, loadable on its own by file path (heatmap itself is the public namespace over it).
COLORS_FILE = pathlib.Path(colors.__file__)


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def digit(size=8):
    """A small bright vertical stroke on black (a '1'), values 0..255 like raw MNIST."""
    img = np.zeros((size, size))
    img[1:-1, size // 2 - 1:size // 2 + 1] = 255.0
    return img


def relevance_of(img):
    """Positive relevance on the stroke, one strongly negative pixel in the background."""
    rel = img / 255.0 * 0.3
    rel[0, 0] = -0.6
    return rel


def png_size(path):
    with Image.open(path) as im:
        return im.size  # (width, height)


# ----------------------------------------------------------------------------- normalize / to_2d

def test_normalize_is_symmetric_and_divides_by_max_abs():
    rel = np.array([[2.0, -4.0], [0.0, 1.0]])
    out = heatmap.normalize(rel)
    np.testing.assert_array_equal(out, [[0.5, -1.0], [0.0, 0.25]])
    np.testing.assert_array_equal(heatmap.normalize(-rel), -out)
    assert np.abs(out).max() == 1.0
    assert out[1, 0] == 0.0


def test_normalize_positive_only_map_keeps_zero_at_zero():
    # A min-max normalisation would send the smallest value (0) to -1; symmetric must not.
    out = heatmap.normalize(np.array([0.0, 1.0, 3.0]))
    np.testing.assert_array_equal(out, [0.0, 1 / 3, 1.0])


def test_normalize_all_zero_stays_zero_without_nan():
    out = heatmap.normalize(np.zeros((3, 3)))
    assert np.all(out == 0.0) and not np.isnan(out).any()
    assert np.all(heatmap.colorize(np.zeros((3, 3))) == 1.0)  # all white


def test_normalize_percentile_clips_outliers():
    rel = np.concatenate([np.arange(-49.0, 50.0) / 49.0, [100.0]])
    out = heatmap.normalize(rel, percentile=95)
    scale = np.percentile(np.abs(rel), 95)
    assert out.max() == 1.0 and out.min() >= -1.0
    np.testing.assert_allclose(out[:99], np.clip(rel[:99] / scale, -1, 1))
    assert out[-1] == 1.0  # the outlier is clipped, not allowed to dominate
    assert out[49] == 0.0  # the zero in the middle stays zero


def test_normalize_percentile_of_sparse_map_falls_back_to_max():
    rel = np.zeros(100)
    rel[0], rel[1] = 2.0, -1.0
    np.testing.assert_array_equal(heatmap.normalize(rel, percentile=50)[:3], [1.0, -0.5, 0.0])


@pytest.mark.parametrize("bad", [0, -5, 101, "high", True])
def test_normalize_rejects_bad_percentile(bad):
    with pytest.raises(ValueError, match=r"percentile must be a number in \(0, 100\], got"):
        heatmap.normalize(np.ones((2, 2)), percentile=bad)


def test_normalize_rejects_non_finite():
    with pytest.raises(ValueError, match=r"relevance has 2 non-finite value\(s\)"):
        heatmap.normalize(np.array([1.0, np.nan, np.inf]))


def test_to_2d_sums_rgb_channels():
    rel = np.arange(2 * 3 * 3, dtype=float).reshape(2, 3, 3)
    out = heatmap.to_2d(rel)
    assert out.shape == (2, 3)
    np.testing.assert_array_equal(out, rel[..., 0] + rel[..., 1] + rel[..., 2])
    np.testing.assert_array_equal(heatmap.to_2d(rel[..., 0]), rel[..., 0])
    assert heatmap.to_2d(rel).sum() == rel.sum()


@pytest.mark.parametrize("shape, hint", [((5,), ""), ((2, 4, 4, 3), "relevance[0]"), ((1, 1, 2, 2, 2), "")])
def test_to_2d_rejects_other_shapes_naming_them(shape, hint):
    with pytest.raises(ValueError, match=r"shape \(H, W\) or \(H, W, C\)") as info:
        heatmap.to_2d(np.ones(shape))
    assert f"got shape {shape}" in str(info.value)
    assert hint in str(info.value)


def test_non_numeric_and_empty_inputs_are_named():
    with pytest.raises(ValueError, match="relevance must be a numeric array, got str"):
        heatmap.to_2d("abc")
    with pytest.raises(ValueError, match=r"relevance is empty \(shape \(0, 3\)\)"):
        heatmap.to_2d(np.ones((0, 3)))


# ----------------------------------------------------------------------------- colours

RED, BLUE, WHITE = (1.0, 0.0, 0.0), (0.0, 0.0, 1.0), (1.0, 1.0, 1.0)


def three_pixels():
    """A positive, a zero, a negative and a weak positive pixel."""
    return np.array([[1.0, 0.0, -1.0, 0.25]])


def test_lrp_scheme_positive_is_red_negative_is_blue():
    rgb = heatmap.colorize(three_pixels(), scheme="lrp")
    assert rgb.shape == (1, 4, 3)
    np.testing.assert_array_equal(rgb[0, 0], RED)    # saturated end colours
    np.testing.assert_array_equal(rgb[0, 1], WHITE)
    np.testing.assert_array_equal(rgb[0, 2], BLUE)
    weak = rgb[0, 3]
    assert weak[0] > weak[2] and weak.min() > 0.5     # pale red


def test_seed_scheme_positive_is_blue_negative_is_red():
    rgb = heatmap.colorize(three_pixels(), scheme="seed")
    np.testing.assert_array_equal(rgb[0, 0], BLUE)
    np.testing.assert_array_equal(rgb[0, 1], WHITE)
    np.testing.assert_array_equal(rgb[0, 2], RED)
    assert rgb[0, 3, 2] > rgb[0, 3, 0]


def test_default_scheme_is_lrp_and_matches_matplotlib_bwr():
    values = np.linspace(-1.0, 1.0, 41)[None, :]
    ours = heatmap.colorize(values)
    bwr = matplotlib.colormaps["bwr"]((values + 1.0) / 2.0)[..., :3]
    np.testing.assert_allclose(ours, bwr, atol=1 / 127)


def test_colorize_sums_channels_and_stays_in_range():
    rel = np.random.default_rng(0).normal(size=(5, 6, 3))
    rgb = heatmap.colorize(rel, percentile=80)
    assert rgb.shape == (5, 6, 3) and rgb.min() >= 0.0 and rgb.max() <= 1.0
    np.testing.assert_array_equal(rgb, heatmap.colorize(rel.sum(-1), percentile=80))


@pytest.mark.parametrize("bad", ["bwr", "LRP", None])
def test_unknown_scheme_lists_valid_ones(bad):
    with pytest.raises(ValueError, match=rf"scheme must be one of 'lrp', 'seed', got {bad!r}"):
        heatmap.colorize(np.ones((2, 2)), scheme=bad)


# ----------------------------------------------------------------------------- overlay

@pytest.mark.parametrize("shape", [(8, 8), (8, 8, 1), (8, 8, 3), (8, 8, 4)])
def test_overlay_shape_and_range_for_gray_and_rgb(shape):
    img = np.broadcast_to(digit().reshape(8, 8, *([1] * (len(shape) - 2))), shape)
    out = heatmap.overlay(img, relevance_of(digit()))
    assert out.shape == (8, 8, 3)
    assert out.min() >= 0.0 and out.max() <= 1.0


def test_overlay_shows_rescaled_gray_image_where_relevance_is_zero():
    img = digit() - 1000.0  # any value range
    rel = relevance_of(digit())
    out = heatmap.overlay(img, rel, alpha=0.6)
    # Zero relevance: the plain image, rescaled to [0, 1] and gray.
    np.testing.assert_allclose(out[0, 1], (0.0, 0.0, 0.0))
    # The strongest pixel is negative: 40% black background + 60% blue in the lrp scheme.
    np.testing.assert_allclose(out[0, 0], (0.0, 0.0, 0.6))
    # A stroke pixel at half the peak: gray 1, opacity 0.3 of the half-saturated red (1, .5, .5).
    np.testing.assert_allclose(out[1, 3], (1.0, 0.85, 0.85))
    plain_gray = np.repeat((digit() / 255.0)[..., None], 3, axis=-1)
    np.testing.assert_allclose(heatmap.overlay(img, rel, alpha=0.0), plain_gray)


def test_overlay_of_rgb_image_is_gray():
    img = np.zeros((2, 2, 3))
    img[0, 0] = (255, 0, 0)
    img[1, 1] = (255, 255, 255)
    out = heatmap.overlay(img, np.zeros((2, 2)))
    assert np.allclose(out[..., 0], out[..., 1]) and np.allclose(out[..., 1], out[..., 2])
    np.testing.assert_allclose(out[0, 0], [0.299] * 3)


def test_overlay_size_mismatch_names_both_shapes():
    with pytest.raises(ValueError) as info:
        heatmap.overlay(np.zeros((8, 8, 3)), np.zeros((6, 8, 3)))
    msg = str(info.value)
    assert "same height and width" in msg
    assert "image shape (8, 8, 3)" in msg and "relevance shape (6, 8, 3)" in msg


def test_overlay_rejects_bad_alpha_and_image_shape():
    with pytest.raises(ValueError, match=r"alpha must be a number in \[0, 1\], got 1.5"):
        heatmap.overlay(np.zeros((2, 2)), np.zeros((2, 2)), alpha=1.5)
    with pytest.raises(ValueError, match=r"image must have shape .* got shape \(2, 2, 2\)"):
        heatmap.overlay(np.zeros((2, 2, 2)), np.zeros((2, 2)))


# ----------------------------------------------------------------------------- plot

def test_plot_colour_bar_is_centred_at_zero(tmp_path):
    rel = relevance_of(digit())
    ax = heatmap.plot(rel, title="one")
    image = ax.images[0]
    assert image.norm.vmin == -image.norm.vmax == -0.6
    bar = image.colorbar
    assert bar is not None
    np.testing.assert_allclose(bar.get_ticks(), [-0.6, 0.0, 0.6])
    assert [t.get_text() for t in bar.ax.get_yticklabels()] == ["-0.6", "0", "+0.6"]
    # The colour at 0 is white and the positive end red: the bar agrees with colorize.
    np.testing.assert_array_equal(image.cmap(image.norm(0.0))[:3], WHITE)
    np.testing.assert_array_equal(image.cmap(image.norm(0.6))[:3], RED)
    assert ax.get_title() == "one"
    path = tmp_path / "plot.png"
    ax.figure.savefig(path, dpi=100)
    width, height = ax.figure.get_size_inches() * 100
    assert png_size(path) == (round(width), round(height))


def test_plot_seed_scheme_and_overlay_colour_bar(tmp_path):
    img, rel = digit(), relevance_of(digit())
    fig, ax = plt.subplots()
    assert heatmap.plot(rel, image=img, ax=ax, scheme="seed") is ax
    np.testing.assert_allclose(ax.images[0].get_array(), heatmap.overlay(img, rel, scheme="seed"))
    (cax,) = ax.child_axes
    low, high = cax.get_ylim()
    assert low == -high == -0.6


def test_plot_all_zero_map_and_no_colorbar():
    ax = heatmap.plot(np.zeros((3, 3)), colorbar=False)
    assert ax.images[0].norm.vmin == -1.0 and ax.images[0].norm.vmax == 1.0
    assert ax.images[0].colorbar is None and not ax.child_axes


def test_plot_without_matplotlib_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(ImportError, match="pip install matplotlib"):
        heatmap.plot(np.ones((2, 2)))
    with pytest.raises(ImportError, match="pip install matplotlib"):
        heatmap.grid(None, np.ones((1, 2, 2)))


# ----------------------------------------------------------------------------- grid

def batch(n=3, size=8):
    images = np.stack([np.roll(digit(size), i, axis=1) for i in range(n)])[..., None]
    relevances = np.stack([relevance_of(im[..., 0]) * (i + 1) for i, im in enumerate(images)])[..., None]
    return images, relevances


def test_grid_png_has_one_column_per_sample_and_own_colour_bars(tmp_path):
    images, rels = batch(3)
    path = tmp_path / "grid.png"
    fig = heatmap.grid(images, rels, titles=["a", "b", "c"], path=path, suptitle="three")
    width, height = fig.get_size_inches() * 100
    assert png_size(path) == (round(width), round(height))
    shown = [ax for ax in fig.axes if ax.get_visible() and ax.images]
    assert len(shown) == 6  # 3 inputs + 3 heatmaps
    heat = [ax.images[0] for ax in shown if ax.images[0].colorbar is not None]
    assert [im.norm.vmax for im in heat] == pytest.approx([0.6, 1.2, 1.8])  # one scale per sample
    assert all(im.norm.vmin == -im.norm.vmax for im in heat)
    assert [ax.get_title() for ax in shown if ax.get_title()] == ["a", "b", "c"]
    assert fig._suptitle.get_text() == "three"


def test_grid_wraps_columns_and_accepts_heatmaps_only(tmp_path):
    images, rels = batch(3)
    fig = heatmap.grid(list(images), list(rels), ncols=2, path=tmp_path / "wrap.png")
    assert fig.axes[0].get_gridspec().get_geometry() == (4, 2)
    fig = heatmap.grid(None, rels[..., 0], path=tmp_path / "only.png")
    assert fig.axes[0].get_gridspec().get_geometry() == (1, 3)
    assert png_size(tmp_path / "only.png") == tuple(round(v) for v in fig.get_size_inches() * 100)


def test_grid_robust_scale_faint_maps_and_no_empty_band(tmp_path):
    """Issue 21 (demo figures 6-9, 15): one hot pixel set the scale (a percentile scale, stated in
    the title), a faint map looked like a dead one on a shared scale (said in its title), and a
    single sample left a tall empty band between its image and its heatmap."""
    rng = np.random.default_rng(0)
    image, rel = rng.uniform(0, 1, (28, 28)), rng.normal(0, 1, (28, 28))
    rel[5, 5] = 60.0
    fig = heatmap.grid([image], [rel], titles=["true 3, target 3\na=2 b=1"], percentile=99.5)
    limit = float(np.percentile(np.abs(rel), 99.5))
    assert fig.axes[1].images[0].norm.vmax == pytest.approx(limit) and limit < 10
    assert "99.5th percentile of |R|" in fig._suptitle.get_text().replace("\n", " ")
    top, bottom = fig.axes[0].get_position(), fig.axes[1].get_position()
    gap_inches = (top.y0 - bottom.y1) * fig.get_size_inches()[1]
    assert 0 < gap_inches < 0.2, gap_inches  # rows as tall as the maps: no empty band
    faint = [rng.normal(0, 1, (8, 8)), rng.normal(0, 1e-3, (8, 8)), np.zeros((8, 8))]
    fig = heatmap.grid(None, faint, titles=["a", "b", "c"], shared_scale=True, suptitle="s")
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles[0] == "a" and titles[1].startswith("b\n(max |R| 0.00") and "faint, not zero" in titles[1]
    assert titles[2] == "c\n(all zero)"
    with pytest.raises(ValueError, match=r"percentile must be a number in \(0, 100\]"):
        heatmap.grid(None, faint, percentile=0)


@pytest.mark.parametrize("call, message", [
    (lambda im, r: heatmap.grid(im[:2], r), "got 2 images but 3 relevance maps"),
    (lambda im, r: heatmap.grid(im, r, titles=["x"]), "got 1 titles for 3 samples"),
    (lambda im, r: heatmap.grid(im, r[0]), r"relevances has shape \(8, 8, 1\), which reads as one"),
    (lambda im, r: heatmap.grid(im, r[:0]), "relevances is empty"),
    (lambda im, r: heatmap.grid(im, r, ncols=0), "ncols must be a positive integer, got 0"),
    (lambda im, r: heatmap.grid(im, [r[0], r[1], r[2, :4]]),
     r"sample 2: image and relevance .* relevance shape \(4, 8, 1\)"),
    (lambda im, r: heatmap.grid(None, [r[0], np.ones(3)]),
     r"relevances\[1\]: relevance must have shape .* got shape \(3,\)"),
])
def test_grid_errors_name_the_problem(call, message):
    images, rels = batch(3)
    with pytest.raises(ValueError, match=message):
        call(images, rels)
    assert not plt.get_fignums()  # validation happens before any figure is made


# ----------------------------------------------------------------------------- save_png

def test_save_png_upscales_small_maps_with_exact_colours(tmp_path):
    rel = relevance_of(digit(28))
    path = heatmap.save_png(rel, tmp_path / "map.png")
    assert path == tmp_path / "map.png"
    with Image.open(path) as im:
        assert im.size == (224, 224) and im.mode == "RGB"
        pixels = np.asarray(im)
    assert tuple(pixels[0, 0]) == (0, 0, 255)          # the negative peak, 8x8 block of blue
    assert tuple(pixels[7, 7]) == (0, 0, 255) and tuple(pixels[8, 8]) == (255, 255, 255)
    assert pixels[8 * 5, 8 * 14, 0] == 255 and pixels[8 * 5, 8 * 14, 2] < 255  # stroke is red


def test_save_png_sizes_and_overlay(tmp_path):
    assert png_size(heatmap.save_png(np.ones((10, 50)), tmp_path / "a.png")) == (250, 50)
    assert png_size(heatmap.save_png(np.ones((4, 300)), tmp_path / "b.png")) == (300, 4)
    assert png_size(heatmap.save_png(np.ones((4, 4)), tmp_path / "c.png", min_width=10)) == (12, 12)
    img = digit(28)
    path = heatmap.save_png(relevance_of(img), tmp_path / "o.png", scheme="seed", image=img)
    with Image.open(path) as im:
        expected = np.round(heatmap.overlay(img, relevance_of(img), scheme="seed") * 255)
        np.testing.assert_array_equal(np.asarray(im)[::8, ::8], expected)
    with pytest.raises(ValueError, match="min_width must be a positive integer, got 0"):
        heatmap.save_png(np.ones((2, 2)), tmp_path / "d.png", min_width=0)


def test_save_png_colour_bar_keeps_the_map_and_labels_its_range(tmp_path):
    """Issue 21: the command line's heatmaps had no colour bar. With colorbar=True the map's
    pixels are unchanged and a labelled bar (+max|R| top, white 0 middle, -max|R| bottom) follows."""
    rel = relevance_of(digit(28))
    plain = np.asarray(Image.open(heatmap.save_png(rel, tmp_path / "plain.png")))
    with Image.open(heatmap.save_png(rel, tmp_path / "bar.png", colorbar=True)) as im:
        barred = np.asarray(im)
    assert barred.shape[0] == plain.shape[0] and barred.shape[1] > plain.shape[1] + 20
    np.testing.assert_array_equal(barred[:, :plain.shape[1]], plain)
    bar = barred[:, plain.shape[1] + 6 + 2]  # a column inside the bar, past the gap and the frame
    assert tuple(bar[2]) == (255, 2, 2) or bar[2, 0] == 255 and bar[2, 2] < 30  # red top (lrp: + is red)
    assert bar[-3, 2] == 255 and bar[-3, 0] < 30  # blue bottom
    assert tuple(bar[len(bar) // 2]) >= (240, 240, 240)  # white middle
    label_area = barred[:, -40:]
    assert (label_area < 128).any(), "no label text drawn"
    with pytest.raises(ValueError, match="colorbar must be True or False"):
        heatmap.save_png(rel, tmp_path / "x.png", colorbar="yes")


def test_save_png_falls_back_to_matplotlib_without_pillow(tmp_path, monkeypatch):
    # matplotlib itself saves through Pillow, so only lrp_grad's own lookup of Pillow is removed.
    monkeypatch.setattr(figures, "_pillow_image", lambda: None)
    calls = []
    real_imsave = matplotlib.image.imsave

    def recording_imsave(*args, **kwargs):
        calls.append(args)
        return real_imsave(*args, **kwargs)

    monkeypatch.setattr(matplotlib.image, "imsave", recording_imsave)
    path = heatmap.save_png(np.array([[1.0, -1.0]]), tmp_path / "mpl.png")
    assert len(calls) == 1
    with Image.open(path) as im:
        assert im.size == (224, 112)
        assert tuple(np.asarray(im.convert("RGB"))[0, 0]) == (255, 0, 0)


# ----------------------------------------------------------------------------- independence

def test_module_imports_neither_tensorflow_nor_matplotlib():
    # The colour code loaded by file path in a fresh interpreter, so the package __init__ is skipped.
    code = (
        "import importlib.util, sys, numpy as np\n"
        f"spec = importlib.util.spec_from_file_location('colors', {str(COLORS_FILE)!r})\n"
        "mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)\n"
        "mod.overlay(np.ones((3, 3)), mod.colorize(np.eye(3)).sum(-1))\n"
        "print(sorted(m for m in ('tensorflow', 'tf_keras', 'matplotlib') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    # The public namespace lrp_grad.heatmap, imported as users do, loads neither either (its
    # concept_atlas brings in TensorFlow only when first asked for).
    code = (
        "import sys, numpy as np\n"
        "from lrp_grad import heatmap\n"
        "heatmap.overlay(np.ones((3, 3)), heatmap.colorize(np.eye(3)).sum(-1))\n"
        "print(sorted(m for m in ('tensorflow', 'tf_keras', 'matplotlib') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_grid_shared_scale_and_all_zero_notes():
    """One colour range for every map with shared_scale (the colour bars agree), and an all-zero
    map says so in its title, with or without it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    maps = np.zeros((3, 5, 5, 1))
    maps[0, 0, 0] = 2.0
    maps[1, 1, 1] = -0.5
    fig = heatmap.grid(None, maps, titles=["a", "b", "c"], shared_scale=True, suptitle="S")
    def bar_ticks(fig):  # the colour bars are inset axes with y ticks (-limit, 0, +limit)
        return {tuple(float(t) for t in cax.get_yticks()) for ax in fig.axes for cax in ax.child_axes}

    ticks = bar_ticks(fig)
    assert ticks == {(-2.0, 0.0, 2.0)}, ticks
    titles = [ax.get_title() for ax in fig.axes if ax.get_visible() and ax.get_title()]
    assert "c\n(all zero)" in titles and "a" in titles
    assert "one colour scale" in fig._suptitle.get_text()
    plt.close(fig)
    fig = heatmap.grid(None, maps, titles=["a", "b", "c"])
    ticks = bar_ticks(fig)
    assert (-0.5, 0.0, 0.5) in ticks and (-2.0, 0.0, 2.0) in ticks
    plt.close(fig)
    with pytest.raises(ValueError, match="shared_scale must be True or False"):
        heatmap.grid(None, maps, shared_scale="yes")
