"""The faithfulness table: SRG of several methods with standard errors, batched and streamed (issue 22)."""
import numpy as np
import pytest

from lrp_grad import evaluate
from lrp_grad.errors import InvalidInputError, InvalidRuleError

from test_region_perturbation import CLASSES, C, H, N, W, linear_model


@pytest.fixture
def linear(K):
    model, weights = linear_model(K)
    x = np.random.default_rng(1).uniform(-1, 1, (N, H, W, C))
    return model, weights, x


def exact(weights, x, t):
    """The exact contributions w_t * x of a bias-free linear model: the best possible zero-baseline map."""
    return x * weights[:, t].T.reshape(len(x), H, W, C)


def test_rows_equal_srg_of_each_method_with_paired_standard_errors(linear):
    model, weights, x = linear
    t = np.arange(N) % CLASSES
    worst = lambda xb, tb: -exact(weights, xb, tb)  # noqa: E731 - the reversed ranking
    table = evaluate.faithfulness_table(model, x, t, methods={"exact": lambda xb, tb: exact(weights, xb, tb),
                                                              "reversed": worst, "gxi": "gradient_x_input"},
                                        baselines=["zero", "mean"], patch=2, batch_size=2)
    assert table.n == N and table.steps == 9 and table.patch == 2 and table.output == "logit"
    for label, rel in (("exact", exact(weights, x, t)), ("reversed", -exact(weights, x, t))):
        for b in ("zero", "mean"):
            per_image = evaluate.srg(model, x, rel, t, patch=2, baseline=b)
            np.testing.assert_allclose(table.scores[(label, b)], per_image, rtol=1e-12, atol=1e-12)
            row = table.row(label, b)
            assert row.srg == pytest.approx(per_image.mean())
            assert row.sem == pytest.approx(per_image.std(ddof=1) / np.sqrt(N))
            morf, lerf = table.curves[(label, b)]
            assert lerf.shape == (10,) and morf[0] == pytest.approx(lerf[0])
    # On a linear model gradient x input is the exact map: identical scores.
    np.testing.assert_allclose(table.scores[("gxi", "zero")], table.scores[("exact", "zero")], atol=1e-9)
    assert table.best("zero") in ("exact", "gxi")
    r = table.row("reversed", "zero")
    d = table.scores[("reversed", "zero")] - table.scores[(table.best("zero"), "zero")]
    assert r.vs_best == pytest.approx(d.mean()) and r.vs_best_sem == pytest.approx(d.std(ddof=1) / np.sqrt(N))
    assert r.srg < 0 < table.row("exact", "zero").srg and not r.level_with_best


def test_dataset_batches_give_the_same_table_as_the_array(linear):
    model, weights, x = linear
    t = np.arange(N) % CLASSES
    methods = {"exact": lambda xb, tb: exact(weights, xb, tb), "random": "random"}
    whole = evaluate.faithfulness_table(model, x, t, methods=methods, baselines="blur", patch=3)
    stream = evaluate.faithfulness_table(model, ((x[i:i + 2], t[i:i + 2]) for i in range(0, N, 2)),
                                         methods=methods, baselines="blur", patch=3)
    np.testing.assert_allclose(stream.scores[("exact", "blur")], whole.scores[("exact", "blur")], rtol=1e-12)
    assert stream.n == N


def test_predicted_class_is_the_default_target(linear):
    model, weights, x = linear
    predicted = np.asarray(model(x)).argmax(1)
    f = lambda xb, tb: exact(weights, xb, tb)  # noqa: E731
    a = evaluate.faithfulness_table(model, x, methods={"exact": f}, baselines="mean")
    b = evaluate.faithfulness_table(model, x, predicted, methods={"exact": f}, baselines="mean")
    np.testing.assert_array_equal(a.scores[("exact", "mean")], b.scores[("exact", "mean")])


def test_lrp_presets_and_printing(K):
    """LRP methods by name on a small ReLU CNN: epsilon_gamma_box gets the data range as its box, and
    the text and Markdown tables name every method and baseline."""
    L = K.layers
    model = K.Sequential([K.Input((8, 8, 1)), L.Conv2D(4, 3, activation="relu"), L.Flatten(), L.Dense(3)])
    x = np.random.default_rng(0).uniform(0, 2, (6, 8, 8, 1)).astype(np.float32)
    table = evaluate.faithfulness_table(model, x, methods=["epsilon_plus_flat", "epsilon_gamma_box", "gradient"],
                                        baselines=["mean", "blur"], patch=2)
    text, md = str(table), table.markdown()
    for word in ("epsilon_plus_flat", "epsilon_gamma_box", "gradient", "SRG mean", "SRG blur", "6 images"):
        assert word in text
    assert md.startswith("| method | SRG mean | SRG blur | s / image |") and md.count("\n") == 4
    assert table.notes == [f"epsilon_gamma_box used the input range [{x.min():.4g}, {x.max():.4g}] of the images as "
                           "its z^B box."]
    d = table.to_dict()
    assert set(d) >= {"rows", "curves", "patch", "output"}
    assert [r["level_with_best"] for r in d["rows"]] == [r.level_with_best for r in table.rows]
    ex = evaluate.faithfulness_table(model, x, methods={"box": "epsilon_gamma_box"}, baselines="mean", patch=2,
                                     bounds=(0.0, 2.0))
    assert not ex.notes
    assert "(area LeRF - area MoRF, logits)" in text
    probability = evaluate.faithfulness_table(model, x[:2], methods=["random"], baselines="zero", output="probability")
    assert str(probability).startswith("symmetric relevance gain (area LeRF - area MoRF, probabilities), 2 images")


def test_text_names_the_output_units(linear):
    model, weights, x = linear
    f = lambda xb, tb: exact(weights, xb, tb)  # noqa: E731
    for output, units in (("logit", "logits"), ("probability", "probabilities")):
        table = evaluate.faithfulness_table(model, x, methods={"exact": f}, baselines="mean", output=output)
        assert f"area MoRF, {units})" in str(table)


def test_plot_draws_both_curves(linear, tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    model, weights, x = linear
    table = evaluate.faithfulness_table(model, x, methods=["gradient", "random"], baselines=["mean"], patch=3)
    fig = table.plot(tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 0 and len(fig.axes) == 2
    assert len(fig.axes[0].lines) == 2 and len(fig.axes[1].lines) == 2
    with pytest.raises(KeyError, match="no baseline 'blur'"):
        table.plot(baseline="blur")


@pytest.mark.parametrize("kwargs, error, match", [
    ({"methods": ["nonsense"]}, InvalidRuleError, "method 'nonsense' is not known; use a preset"),
    ({"methods": []}, ValueError, "methods is empty"),
    ({"methods": "gradient"}, ValueError, "methods must be a list of methods or a dict"),
    ({"methods": ["gradient", "gradient"]}, ValueError, r"label\(s\) \['gradient'\] appear twice"),
    ({"baselines": []}, ValueError, "baselines is empty"),
    ({"baselines": ["grey"]}, ValueError, "baseline='grey' is not understood"),
    ({"bounds": 3}, ValueError, r"bounds must be \(low, high\), got 3"),
    ({"output": "prob"}, ValueError, "output='prob' is not understood"),
    ({"patch": 0}, ValueError, "patch must be an integer >= 1"),
])
def test_bad_arguments_are_named(linear, kwargs, error, match):
    model, _, x = linear
    args = {"methods": ["gradient"], **kwargs}
    with pytest.raises(error, match=match):
        evaluate.faithfulness_table(model, x, **args)


def test_bad_method_output_and_empty_data_are_named(linear):
    model, _, x = linear
    with pytest.raises(InvalidInputError, match=r"a method returned relevance of shape \(2, 2\)"):
        evaluate.faithfulness_table(model, x, methods={"bad": lambda xb, tb: np.zeros((2, 2))})
    with pytest.raises(InvalidInputError, match="there are no images"):
        evaluate.faithfulness_table(model, iter([]), methods=["gradient"])
    with pytest.raises(ValueError, match="target is only for an array x"):
        evaluate.faithfulness_table(model, iter([x]), 0, methods=["gradient"])


def test_a_model_that_is_no_classifier_is_named_by_the_function_called(K):
    """The check of the output shape named region_perturbation whatever was called (the table,
    srg, insertion), and with targets given the table failed in its first method (e.g. 'gradient
    needs a classifier'): ``lrp-grad evaluate`` printed a function the user never called."""
    model = K.Sequential([K.Input((H, W, C)), K.layers.Conv2D(2, 1)])
    x = np.random.default_rng(3).uniform(-1, 1, (2, H, W, C)).astype("float32")
    with pytest.raises(InvalidInputError, match=r"^faithfulness_table needs a classifier with output shape "
                                                r"\(n, classes\); this model returns shape \(2, 6, 5, 2\)"):
        evaluate.faithfulness_table(model, x, methods=["random"])
    with pytest.raises(InvalidInputError, match=r"^faithfulness_table needs a classifier"):  # not 'gradient needs'
        evaluate.faithfulness_table(model, x, [0, 1], methods=["gradient"])
    with pytest.raises(InvalidInputError, match=r"^srg needs a classifier"):
        evaluate.srg(model, x, x)


def test_attribution_gradient_explains_the_logit_of_a_softmax_model(K):
    """``attribution('gradient')`` and the batched baselines agree: both differentiate the logit,
    not the probability, of a model ending in softmax."""
    model, weights = linear_model(K, softmax=True)
    x = np.random.default_rng(2).uniform(-1, 1, (3, H, W, C))
    y = np.array([0, 1, 2])
    g, _ = evaluate.attribution(model, x, y, "gradient")
    np.testing.assert_allclose(g, np.broadcast_to(weights[:, y].T.reshape(3, H, W, C), g.shape), rtol=1e-6)
    gx, _ = evaluate.attribution(model, x, y, "gradient_x_input")
    np.testing.assert_allclose(gx, exact(weights, x, y), rtol=1e-6)


def test_streamed_batches_share_one_trace_of_the_forward_pass(K):
    """Every batch of a stream (and the smaller last one) is scored by the same compiled forward pass."""
    from lrp_grad.evaluate import forward

    from test_region_perturbation import small_cnn

    model = small_cnn(K)
    x = np.random.default_rng(20).uniform(0, 1, (7, 8, 8, 2)).astype(np.float32)
    batches = ((x[i:i + 3], np.arange(i, i + len(x[i:i + 3])) % 3) for i in range(0, 7, 3))  # 3, 3, 1
    table = evaluate.faithfulness_table(model, batches, methods={"random": "random", "saliency": "gradient"},
                                        baselines=["mean", "blur"], patch=4)
    assert table.n == 7
    assert forward._CACHE[model]["call"].traces == 1
    assert forward._CACHE[model][("gradient", "float32")].traces == 1
