"""Nothing silently wrong, round 3: dataset labels out of range or malformed, resumes after an
option that changes the numbers, integer one-hot targets, and relevance absorbed by the
stabiliser; each in both Keras packages."""
import json
import warnings

import numpy as np
import pytest
import tensorflow as tf

import kit
import lrp_grad
from lrp_grad.canonizers import Canonizer
from lrp_grad.errors import InvalidInputError, InvalidTargetError, RelevanceAbsorbedWarning

CLASSES = 4


def _small(K):
    """A conv - BatchNorm - Dense(hidden) - Dense(head) classifier of ``CLASSES`` classes, and 20 images with labels."""
    L = K.layers
    inp = K.Input((6, 6, 1))
    h = L.Conv2D(3, 3, name="conv")(inp)
    h = L.BatchNormalization(name="bn")(h)
    h = L.ReLU(name="relu")(L.Flatten(name="flat")(h))
    h = L.Dense(5, activation="relu", name="hidden")(h)
    model = kit.randomize(K.Model(inp, L.Dense(CLASSES, name="head")(h)))
    rng = np.random.default_rng(0)
    return model, rng.uniform(0, 1, (20, 6, 6, 1)).astype("float32"), rng.integers(0, CLASSES, 20)


# ---------------------------------------------------------------------------------------------
# 1. Dataset labels: out of range (e.g. -1 as "no label"), malformed one-hot rows, floats


def test_negative_or_out_of_range_labels_name_the_element_and_the_range(K):
    """A label of -1 used to make the whole batch explained for predicted classes (and recorded
    as such); now every way of giving labels names the element and the valid range."""
    model, x, y = _small(K)
    ex = lrp_grad.Explainer(model, rule=lrp_grad.Epsilon(1e-6))
    name = model.name
    for bad_value in (-1, CLASSES):
        bad = y.copy()
        bad[7] = bad_value
        message = (rf"dataset element 7: label {bad_value} is out of range for model '{name}' with {CLASSES} classes "
                   rf"\(valid: 0\.\.{CLASSES - 1}\)\. Fix or drop such elements .*target='predicted'")
        forms = {"pair of arrays": lambda: (x, bad), "zip": lambda: zip(x, bad),
                 "tf.data": lambda: tf.data.Dataset.from_tensor_slices((x, bad)),
                 "tf.data batched": lambda: tf.data.Dataset.from_tensor_slices((x, bad)).batch(3),
                 "dicts": lambda: [{"image": a, "label": b} for a, b in zip(x, bad)],
                 "whole floats": lambda: (x, bad.astype("float32"))}
        for what, data in forms.items():
            for target in ("auto", "label"):
                with pytest.raises(InvalidInputError, match=message):
                    ex.explain_dataset(data(), target=target, batch_size=8, progress=False)
                    pytest.fail(f"{what}, target={target!r}: accepted")
    # Labels that are not used are not read: -1 markers are fine with target='predicted' or a class.
    bad = y.copy()
    bad[7] = -1
    res = ex.explain_dataset((x, bad), target="predicted", batch_size=8, progress=False)
    np.testing.assert_array_equal(res.summaries["target"], res.summaries["predicted"])
    assert np.all(ex.explain_dataset((x, bad), target=2, batch_size=8, progress=False).summaries["target"] == 2)


def test_malformed_labels_name_the_element_and_what_a_label_must_be(K):
    model, x, y = _small(K)
    ex = lrp_grad.Explainer(model, rule=lrp_grad.Epsilon(1e-6))
    soft = np.eye(CLASSES, dtype="float32")[y]
    soft[5] = [0.1, 0.9, 0, 0]
    with pytest.raises(InvalidInputError, match=r"dataset element 5: label of shape \(20, 4\) is neither class indices "
                                                r"nor one-hot rows \(row \[0\.1 0\.9 0\.  0\. \] is not exactly one 1 .*"
                                                r"labels\.argmax\(-1\)"):
        ex.explain_dataset((x, soft), progress=False)
    with pytest.raises(InvalidInputError, match=r"dataset element 13: label of shape \(4,\) is neither class indices"):
        ex.explain_dataset([(a, b) for a, b in zip(x, soft[[0] * 13 + [5] * 7])], progress=False)
    with pytest.raises(InvalidInputError, match=rf"dataset element 0: one-hot labels of length 10, but model "
                                                rf"'{model.name}' has 4 classes; pass one-hot rows of length 4"):
        ex.explain_dataset((x, np.eye(10)[y]), progress=False)
    fractional = y.astype("float64")
    fractional[3] = 2.5
    with pytest.raises(InvalidInputError, match=r"dataset element 3: labels must be integer class indices in 0\.\.3, "
                                                r"got 2\.5 \(dtype float64\); float labels are read only when they are "
                                                r"whole numbers"):
        ex.explain_dataset(zip(x, fractional), progress=False)
    fractional[3] = np.nan
    with pytest.raises(InvalidInputError, match=r"dataset element 3: labels must be integer class indices"):
        ex.explain_dataset((x, fractional), progress=False)
    with pytest.raises(InvalidInputError, match=r"dataset element 0: labels must be integer class indices in 0\.\.3 "
                                                r"\(or one-hot rows\), got \[False"):
        ex.explain_dataset((x, y > 1), progress=False)
    # The forms that are labels still are: integers of any dtype, whole floats, one-hot rows.
    ref = ex(x, target=y)
    for labels in (y.astype("uint8"), y.astype("float32"), np.eye(CLASSES, dtype="int64")[y], np.eye(CLASSES)[y]):
        got = ex.explain_dataset((x, labels), batch_size=8, progress=False)
        np.testing.assert_allclose(got.relevance, ref, rtol=1e-5, atol=1e-7)
        np.testing.assert_array_equal(got.summaries["target"], y)


def test_some_elements_without_a_label_are_refused_not_explained_for_their_prediction(K):
    """With target='auto', a label missing on some elements used to switch whole batches to the
    predicted class; now the mix is an error naming both elements (target='label': the first
    element without one)."""
    model, x, y = _small(K)
    ex = lrp_grad.Explainer(model, rule=lrp_grad.Epsilon(1e-6))
    mixed = [(x[i], y[i]) if i != 6 else x[i] for i in range(20)]
    with pytest.raises(InvalidInputError, match=r"dataset element 6 has no label but element 0 has one: with "
                                                r"target='auto' either every element has a label .*target='predicted'"):
        ex.explain_dataset(mixed, batch_size=4, progress=False)
    with pytest.raises(InvalidInputError, match=r"target='label' needs \(image, label\) elements; dataset element 6 "
                                                r"has no label"):
        ex.explain_dataset(mixed, target="label", batch_size=4, progress=False)
    late = [x[i] if i < 10 else (x[i], y[i]) for i in range(20)]
    with pytest.raises(InvalidInputError, match=r"dataset element 0 has no label but element 10 has one"):
        ex.explain_dataset(late, batch_size=4, progress=False)
    np.testing.assert_allclose(ex.explain_dataset(mixed, target="predicted", batch_size=4, progress=False).relevance,
                               ex(x), rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# 2. A resume after changing an option that changes the numbers


class _Identity(Canonizer):
    """A canonizer without a repr of its own (``object``'s would hold a memory address)."""

    def __init__(self, tag="a"):
        self.tag = tag

    def apply(self, graph):
        return graph


def test_resume_refuses_other_canonizers_output_or_compute_dtype_and_names_the_change(K, tmp_path):
    model, x, y = _small(K)
    base = lrp_grad.Explainer(model)
    out = tmp_path / "r.npy"

    def resume(ex):
        return ex.explain_dataset(zip(x, y), batch_size=4, out=out, length=20, resume=True, progress=False)

    base.explain_dataset(zip(x[:8], y[:8]), batch_size=4, out=out, length=20, progress=False)  # killed after 8
    changes = {
        "canonizers": (dict(canonizers=[]), r"canonizers was \['FoldBatchNorm\(\)'\], now \[\]"),
        "output": (dict(output="hidden"), r"output was 'head', now 'hidden'"),
        "compute_dtype": (dict(compute_dtype="bfloat16"), r"compute_dtype was None, now 'bfloat16'"),
        "rule": (dict(rule="epsilon_plus"), r"rule was Composite 'AlphaBeta\(alpha=2\.0, beta=1\.0, bias=True\)', "
                                            r"now Composite 'epsilon_plus'"),
    }
    for key, (options, said) in changes.items():
        with pytest.raises(InvalidInputError, match=rf"cannot resume .*r\.npy: it was written with other settings "
                                                    rf"\(differs in \['{key}'\]: {said}\), and resuming would mix two "
                                                    r"kinds of relevance in one output"):
            resume(lrp_grad.Explainer(model, **options))
    # The default canonizers given explicitly, the output by its name and XLA change nothing that matters.
    same = lrp_grad.Explainer(model, canonizers=[lrp_grad.canonizers.FoldBatchNorm()], output="head",
                              jit_compile=True)
    done = resume(same)
    np.testing.assert_allclose(done.relevance, base(x, target=y), rtol=1e-4, atol=1e-6)
    # A canonizer without a repr of its own is recorded by class and attributes, the same in every process.
    recorded = lrp_grad.stream.fingerprint(lrp_grad.Explainer(model, canonizers=[_Identity("b")]))["canonizers"]
    assert recorded == [f"{__name__}._Identity(tag='b')"]


def test_resume_of_an_output_without_the_newer_fingerprint_keys_is_refused(K, tmp_path):
    """An output of an earlier version recorded neither canonizers, output nor compute_dtype: what
    it was written with is unknown, so it is not resumed."""
    model, x, y = _small(K)
    ex = lrp_grad.Explainer(model)
    folder = tmp_path / "shards"
    ex.explain_dataset(zip(x[:8], y[:8]), batch_size=4, out=folder, progress=False)
    manifest = json.loads((folder / "manifest.json").read_text())
    for key in ("canonizers", "output", "compute_dtype"):
        del manifest["fingerprint"][key]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(InvalidInputError, match=r"differs in \['canonizers', 'output', 'compute_dtype'\]: canonizers "
                                                r"was not recorded \(an output of an earlier lrp_grad\)"):
        ex.explain_dataset(zip(x, y), batch_size=4, out=folder, resume=True, progress=False)


# ---------------------------------------------------------------------------------------------
# 3. An integer one-hot target


def test_integer_one_hot_target_is_refused_with_the_three_readings(K):
    """``np.eye(classes, dtype=int)[y]`` used to be read as `classes` class indices per image (only
    classes 0 and 1) and returned (n, classes, ...) silently."""
    model, x, y = _small(K)
    ex = lrp_grad.Explainer(model, rule=lrp_grad.Epsilon(1e-6))
    x, y = x[:6], y[:6]
    for onehot in (np.eye(CLASSES, dtype=int)[y], np.eye(CLASSES, dtype="uint8")[y], tf.constant(np.eye(CLASSES)[y],
                                                                                                   tf.int32)):
        with pytest.raises(InvalidTargetError, match=r"target is an integer array of shape \(6, 4\) of one-hot rows, "
                                                     r"one column per class \(4 classes\): it is ambiguous.*"
                                                     r"target\.argmax\(1\) \(shape \(6,\)\); for a mask over the "
                                                     r"classes pass target\.astype\(float\); for every class pass "
                                                     r"target='all'"):
            ex(x, target=onehot)
    with pytest.raises(InvalidTargetError, match=r"of rows of 0s and 1s, one column per class"):
        lrp_grad.explain(model, x, target=np.tile([0, 1, 1, 0], (6, 1)), rule=lrp_grad.Epsilon(1e-6))
    # The fixes it names, and the class lists that are not one-hot, work.
    np.testing.assert_allclose(ex(x, target=np.eye(CLASSES)[y]), ex(x, target=y), rtol=1e-5, atol=1e-7)
    every = ex(x, target="all")
    np.testing.assert_allclose(ex(x, target=np.tile([3, 1, 0, 2], (6, 1))), every[:, [3, 1, 0, 2]], rtol=1e-5,
                               atol=1e-7)
    np.testing.assert_allclose(ex(x, target=np.tile([0, 1], (6, 1))), every[:, :2], rtol=1e-5, atol=1e-7)
    assert ex(x, target=np.eye(3, dtype=int)[y % 3]).shape == (6, 3, 6, 6, 1)  # k != classes: class lists


# ---------------------------------------------------------------------------------------------
# 4. Relevance absorbed by the stabiliser


def _tiny_logits(K):
    """A CNN whose logits are ~1e-9..1e-8: the last Dense kernel scaled by 1e-9, no bias."""
    model = kit.cnn(classes=5, K=K)
    w, b = model.layers[-1].get_weights()
    model.layers[-1].set_weights([w * 1e-9, b * 0])
    return model


def test_tiny_explained_output_warns_that_the_stabiliser_absorbed_the_relevance(K):
    model = _tiny_logits(K)
    x = np.random.default_rng(0).normal(size=(6, 10, 10, 3)).astype("float32")
    assert np.abs(lrp_grad.Explainer(model).forward(x)).max() < 1e-7
    said = (r"relevance at the input sums to \d+\.\d% of the explained logit \(6 of 6 samples; explained output values "
            r"of magnitude up to .*e-0[89]\): the explained output is below the rules' stabiliser \(epsilon 1e-06\).*"
            r"Use rule=lrp_grad\.Z\(\) \(no stabiliser\) or a smaller epsilon, e\.g\. rule=lrp_grad\.Epsilon\(1e-12\)")
    for rule in (None, lrp_grad.Epsilon(1e-6), "epsilon_plus_flat"):
        with pytest.warns(RelevanceAbsorbedWarning, match=said) as caught:
            R = lrp_grad.Explainer(model, rule=rule)(x)
        assert issubclass(caught[0].category, UserWarning)
        assert np.all(np.abs(R.reshape(6, -1).sum(1)) < 0.1 * np.abs(lrp_grad.Explainer(model).forward(x)).max(1))
    with pytest.warns(RelevanceAbsorbedWarning, match=r"of the initial relevance \(6 of 6 samples"):
        lrp_grad.Explainer(model)(x, initial="one")
    with pytest.warns(RelevanceAbsorbedWarning, match=r"of the explained output"):
        lrp_grad.Explainer(model)(x, target=np.eye(5)[[1] * 6])  # a mask
    with warnings.catch_warnings():  # what the warning says to do: no stabiliser, or a smaller one
        warnings.simplefilter("error", RelevanceAbsorbedWarning)
        for rule in (lrp_grad.Z(), lrp_grad.Epsilon(1e-12)):
            R = lrp_grad.Explainer(model, rule=rule)(x)
            ratio = R.reshape(6, -1).sum(1) / lrp_grad.Explainer(model).forward(x).max(1)
            assert np.all(ratio > 0.5), ratio
    with pytest.warns(RelevanceAbsorbedWarning) as caught:  # a dataset: once per run, naming the images
        lrp_grad.Explainer(model).explain_dataset(np.concatenate([x] * 3), batch_size=4, progress=False)
    assert len([w for w in caught if w.category is RelevanceAbsorbedWarning]) == 1
    assert "First seen in images 0..3; warned once per run." in str(caught[0].message)


def test_a_normal_model_does_not_warn(K):
    model = kit.cnn(classes=5, K=K)
    x = np.random.default_rng(0).normal(size=(6, 10, 10, 3)).astype("float32")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RelevanceAbsorbedWarning)
        for rule in (None, lrp_grad.Epsilon(1e-6), lrp_grad.Z(), "epsilon_plus_flat", lrp_grad.ZPlus()):
            ex = lrp_grad.Explainer(model, rule=rule)
            ex(x)
            ex(x, target="all")
            ex(x, initial="one")
        lrp_grad.Explainer(model).explain_dataset(x, batch_size=4, progress=False)


# ------------------------------------------------------------- round 3, medium items (this session) --

def test_a_tf_data_dataset_of_dicts_is_read_by_its_keys(K):
    """A tf.data.Dataset of {'image': ..., 'label': ...} batches (documented) is read, its labels
    used as targets; its length is read from the image entry's spec."""
    import tensorflow as tf

    L = K.layers
    inp = K.Input((6, 6, 1))
    model = K.Model(inp, L.Dense(3)(L.Flatten()(L.Conv2D(2, 3, activation="relu")(inp))))
    x = np.random.default_rng(0).uniform(0, 1, (5, 6, 6, 1)).astype("float32")
    y = np.array([0, 1, 2, 0, 1])
    ex = lrp_grad.Explainer(model)
    result = ex.explain_dataset(tf.data.Dataset.from_tensor_slices({"image": x, "label": y}).batch(2), progress=False)
    np.testing.assert_array_equal(result.summaries["target"], y)
    np.testing.assert_allclose(result.relevance, ex(x, target=y), rtol=1e-5, atol=1e-7)
    unbatched = ex.explain_dataset(tf.data.Dataset.from_tensor_slices({"x": x, "y": y}), progress=False)
    np.testing.assert_allclose(unbatched.relevance, result.relevance, rtol=1e-5, atol=1e-7)


def test_a_callable_initial_of_the_wrong_shape_or_dtype_is_named(K):
    L = K.layers
    inp = K.Input((4,))
    model = K.Model(inp, L.Dense(3)(inp))
    x = np.ones((2, 4), np.float32)
    import tensorflow as tf

    with pytest.raises(lrp_grad.InvalidTargetError, match=r"initial\(logits, target\) returned shape \(None, 2\); it "
                                                          r"must be the logits' shape \(None, 3\)"):
        lrp_grad.Explainer(model)(x, initial=lambda logits, t: logits[:, :2])
    with pytest.raises(lrp_grad.InvalidTargetError, match=r"initial\(logits, target\) returned dtype int32; return "
                                                          r"floats shaped like the logits"):
        lrp_grad.Explainer(model)(x, initial=lambda logits, t: tf.cast(logits, tf.int32))


def test_unknown_input_sizes_are_chunked_by_the_images_size(K, monkeypatch):
    """Input((None, None, 3)): the automatic batch size scales with the size of the images being
    explained (it was 4096 whatever their size); several targets per image honour it too."""
    import importlib

    passes = importlib.import_module("lrp_grad.api.passes")
    L = K.layers
    inp = K.Input((None, None, 3))
    model = K.Model(inp, L.Dense(3)(L.GlobalAveragePooling2D()(L.Conv2D(4, 3, activation="relu")(inp))))
    monkeypatch.setattr(passes, "free_memory_bytes", lambda: 64 << 20)
    ex = lrp_grad.Explainer(model)
    small, large = ex.passes.auto_batch_size((8, 8, 3)), ex.passes.auto_batch_size((128, 128, 3))
    assert large < small and large * 200 < small * 1.1, (small, large)
    calls = []
    run = ex.passes.run
    monkeypatch.setattr(ex.passes, "run", lambda fn, a, b: calls.append(len(a[0])) or run(fn, a, b))
    x = np.random.default_rng(1).uniform(0, 1, (3, 128, 128, 3)).astype("float32")
    ex(x, target="all")
    assert max(calls) <= max(1, ex.passes.auto_batch_size((128, 128, 3))), (calls, large)


def test_a_layer_called_with_training_true_is_refused(K):
    """Dropout (or BatchNorm) called with training=True in the graph computes its training
    behaviour at every call: refused by name instead of explained as inference."""
    L = K.layers
    inp = K.Input((6,))
    h = L.Dropout(0.5, name="drop")(L.Dense(4)(inp), training=True)
    model = K.Model(inp, L.Dense(2)(h))
    with pytest.raises(lrp_grad.UnsupportedLayerError, match=r"'drop' \(Dropout\): called with training=True in the model \(passed, or "
                                                             r"recorded from the layer's own default\), so it computes its training behaviour"):
        lrp_grad.Explainer(model)


@pytest.mark.parametrize("metadata", [b"[1, 2]", b'"3.0"', b"\xff\xfe not utf-8", b"{" + b" " * (2 << 20) + b"}"],
                         ids=["list", "string", "not-utf8", "huge"])
def test_a_keras_archive_with_bad_metadata_is_refused_by_name(tmp_path, metadata):
    """load_model reads metadata.json of a .keras archive with bounded memory and refuses anything
    but the object Keras writes, naming the file."""
    import zipfile

    path = tmp_path / "bad.keras"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("metadata.json", metadata)
    with pytest.raises(lrp_grad.ModelFileError, match=r"cannot load model '.*bad\.keras': .*not a Keras \.keras archive"):
        lrp_grad.load_model(path)


def test_a_channels_first_batch_gets_the_transpose_that_fixes_it(K):
    """A (n, C, H, W) batch or one (C, H, W) sample for a channels-last model: the message gives
    the np.transpose call that fixes it."""
    model, x, _ = _small(K)
    ex = lrp_grad.Explainer(model)
    with pytest.raises(InvalidInputError, match=r"x has shape \(2, 1, 6, 6\) but model .* expects \(batch, 6, 6, 1\): "
                                                r"axis 1 is 1, expected 6\. It looks channels-first .*: pass "
                                                r"np\.transpose\(x, \(0, 2, 3, 1\)\)\.$"):
        ex(np.transpose(x[:2], (0, 3, 1, 2)))
    with pytest.raises(InvalidInputError, match=r"x has shape \(1, 6, 6\) \(rank 3\) .* one channels-first sample .*"
                                                r"pass np\.transpose\(x, \(1, 2, 0\)\)\[None\]\.$"):
        ex(np.transpose(x[0], (2, 0, 1)))
    fixed = ex(np.transpose(np.transpose(x[:2], (0, 3, 1, 2)), (0, 2, 3, 1)))  # the fix works
    np.testing.assert_allclose(fixed, ex(x[:2]), rtol=1e-6)


def test_a_float64_value_beyond_float32_is_reported_as_an_overflow(K):
    """1e39 in a float64 batch is finite; it becomes Inf only when cast to the model's float32."""
    model, x, _ = _small(K)
    big = x[:2].astype("float64")
    big[1, 2, 3, 0] = 1e39
    with pytest.raises(InvalidInputError, match=r"x has a value that overflows the model's float32 \(first at index "
                                                r"\(1, 2, 3, 0\), value 1e\+39; the largest float32 is 3\.403e\+38\); "
                                                r"rescale the data"):
        lrp_grad.Explainer(model)(big)
    big[1, 2, 3, 0] = np.inf  # a real Inf is still called one
    with pytest.raises(InvalidInputError, match=r"x contains NaN or Inf \(first at index \(1, 2, 3, 0\), value inf\)"):
        lrp_grad.Explainer(model)(big)


@pytest.mark.parametrize("size", [np.int64(2), np.int32(3), np.uint8(1)], ids=["int64", "int32", "uint8"])
def test_numpy_integers_are_accepted_wherever_an_int_is(K, size):
    """batch_size=np.int64(2) was refused ("must be a positive int"): numpy integers are ints."""
    from lrp_grad.concepts import reference_samples

    model, x, y = _small(K)
    ex = lrp_grad.Explainer(model)
    x = x[:5]
    np.testing.assert_allclose(ex(x, batch_size=size), ex(x), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(ex(x, target="all", batch_size=size), ex(x, target="all"), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(lrp_grad.explain(model, x, batch_size=size), ex(x), rtol=1e-5, atol=1e-7)
    res = ex.explain_dataset((x, y[:5]), batch_size=size, length=np.int64(5), progress=False)
    np.testing.assert_allclose(np.asarray(res.relevance), ex(x, target=y[:5]), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(ex.concept_relevance(x, layer="conv", batch_size=size),
                               ex.concept_relevance(x, layer="conv"), rtol=1e-5, atol=1e-7)
    assert reference_samples(ex, x, "conv", top=np.int64(2), batch_size=size).indices.shape[1] == 2
    for bad in (np.int64(0), np.float64(2.0), True):
        with pytest.raises(InvalidInputError, match=r"batch_size must be a positive int or None, got "):
            ex(x, batch_size=bad)


def test_load_model_of_a_keras3_export_folder_says_what_it_is(tmp_path):
    """Keras 3 model.export() writes a SavedModel for serving, without Keras metadata: load_model
    returned a bare TensorFlow object that explain() then refused as 'not a model, load it first'."""
    keras = kit.package("keras")
    model = keras.Sequential([keras.Input((6, 6, 1)), keras.layers.Flatten(), keras.layers.Dense(2)])
    model.export(tmp_path / "served", verbose=False)
    with pytest.raises(lrp_grad.ModelFileError, match=r"^cannot load model '.*served': it is a TensorFlow SavedModel "
                                                      r"for serving \(as Keras 3 model\.export\(\) .*\), not a Keras "
                                                      r"model; .*Explain the Keras model it was exported from "
                                                      r"\(saved with model\.save\('model\.keras'\)\)\.$"):
        lrp_grad.load_model(tmp_path / "served")


def test_a_binary_sigmoid_model_takes_0_1_labels_in_explain_dataset(K):
    """Issue 21: a Dense(1, "sigmoid") classifier with 0/1 labels failed in explain_dataset (label
    1 'out of range'). Its one unit is the target for both labels; other labels are named."""
    L = K.layers
    model = kit.randomize(K.Sequential([K.Input((6,)), L.Dense(4, activation="relu"),
                                        L.Dense(1, activation="sigmoid")]))
    x = np.random.default_rng(3).uniform(0, 1, (5, 6)).astype("float32")
    y = np.array([0, 1, 1, 0, 1])
    ex = lrp_grad.Explainer(model)
    for target in ("auto", "label"):
        res = ex.explain_dataset((x, y), target=target, progress=False)
        np.testing.assert_allclose(np.asarray(res.relevance), ex(x, target=0), rtol=1e-5, atol=1e-7)
        assert list(res.summaries["target"]) == [0] * 5
    with pytest.raises(InvalidInputError, match=r"dataset element 2: label 2 for model .*, which has one output unit "
                                                r"\(a binary classifier\): labels must be 0 or 1"):
        ex.explain_dataset((x, np.array([0, 1, 2, 0, 1])), progress=False)
    with pytest.raises(InvalidTargetError, match=r"target\[1\] = 1 is out of range .* It has one output unit "
                                                 r"\(a binary classifier\): target 0 explains that unit"):
        ex(x, target=y)
