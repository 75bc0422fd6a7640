"""Concept Relevance Propagation (lrp_grad.concepts) against float64 references and its identities.

- conditional heatmaps, sub-concepts and multi-layer conditions against tests/npref.py, whose
  ``masks`` multiply a layer's relevance once all of it has arrived (the definition of a condition),
  for every rule, on float64 models of both Keras packages;
- the sum identity: the conditional heatmaps of all channels of a layer add up to the ordinary
  heatmap (every rule and preset; a residual block's output);
- conservation per condition (Z, epsilon -> 0, no biases): each heatmap sums to its channel's
  relevance;
- receptive fields against a brute-force perturbation search; reference samples against sorting
  every sample's score;
- one compiled pass for any number of conditions (no retracing), XLA = eager, the same relevance
  in both packages, no mutation, and the errors, by their messages.
"""
import numpy as np
import pytest

import lrp_grad
from lrp_grad.concepts import ConceptError, receptive_field, reference_samples
from kit import assert_close, npref_explain, package, randomize

F64 = dict(dtype="float64")
TOL = 1e-9
ALL_RULES = [lrp_grad.Z(), lrp_grad.Epsilon(0.1), lrp_grad.AlphaBeta(2, 1), lrp_grad.ZPlus(), lrp_grad.Flat(),
             lrp_grad.WSquare(), lrp_grad.ZBox(-1.0, 1.0), lrp_grad.Gamma(0.25)]


def small_cnn(K, bias=True, dtype="float64", seed=0):
    L = K.layers
    inp = K.Input((9, 9, 2), dtype=dtype)
    h = L.Conv2D(4, 3, padding="same", activation="relu", name="c1", dtype=dtype, use_bias=bias)(inp)
    h = L.MaxPooling2D(2, name="pool", dtype=dtype)(h)
    h = L.Conv2D(5, 2, activation="relu", name="c2", dtype=dtype, use_bias=bias)(h)
    h = L.Flatten(name="flat", dtype=dtype)(h)
    h = L.Dense(6, activation="relu", name="d1", dtype=dtype, use_bias=bias)(h)
    out = L.Dense(3, name="logits", dtype=dtype, use_bias=bias)(h)
    return randomize(K.Model(inp, out, name="small_cnn"), seed)


def residual(K, dtype="float64"):
    L = K.layers
    inp = K.Input((8, 8, 3), dtype=dtype)
    a = L.Conv2D(4, 3, padding="same", activation="relu", name="stem", dtype=dtype)(inp)
    b = L.Conv2D(4, 3, padding="same", activation="relu", name="branch", dtype=dtype)(a)
    j = L.Add(name="join", dtype=dtype)([a, b])
    h = L.GlobalAveragePooling2D(name="gap", dtype=dtype)(j)
    out = L.Dense(3, name="logits", dtype=dtype)(h)
    return randomize(K.Model(inp, out, name="residual"), 3)


_MODELS = {}


def model_of(K, builder=small_cnn, **kw):
    key = (K.__name__, builder.__name__, tuple(sorted(kw.items())))
    if key not in _MODELS:
        _MODELS[key] = builder(K, **kw)
    return _MODELS[key]


def images(shape=(9, 9, 2), n=3, seed=1, signed=True):
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 1, (n,) + shape)
    return x if signed else np.abs(x)


def onehot(c, k):
    m = np.zeros(k)
    m[c] = 1.0
    return m


# ---------------------------------------------------------------------------------------------
# Against the float64 reference


@pytest.mark.parametrize("rule", ALL_RULES, ids=repr)
def test_conditional_matches_reference(rule):
    K = package("keras")
    model, x = model_of(K), images()
    ex = lrp_grad.Explainer(model, rule=rule)
    target = np.array([0, 2, 1])
    R = ex.conditional(x, target, layer="c2", channels=[0, 3, [1, 4]])
    assert R.shape == (3, 3) + x.shape[1:] and R.dtype == np.float64
    for j, kept in enumerate([[0], [3], [1, 4]]):
        mask = sum(onehot(c, 5) for c in kept)
        want = npref_explain(model, x, target, rule, masks={"c2": mask})
        assert_close(R[:, j], want, TOL, f"{rule!r} condition {kept}")


@pytest.mark.parametrize("pkg", ["keras", "tf_keras"])
@pytest.mark.parametrize("rule", [lrp_grad.Epsilon(1e-6), lrp_grad.AlphaBeta(2, 1)], ids=repr)
def test_two_layer_conditions_and_subconcepts_match_reference(pkg, rule):
    K = package(pkg)
    model, x = model_of(K), images(seed=2)
    ex = lrp_grad.Explainer(model, rule=rule)
    conds = [{"c2": 1, "c1": 2}, {"c2": [0, 1], "c1": 3}]
    R = ex.conditional(x, conditions=conds)
    S = ex.subconcepts(x, layer="c2", channels=[1, 4], lower="c1")
    target = np.argmax(model.predict(x, verbose=0), -1)
    for j, cond in enumerate(conds):
        masks = {"c2": sum(onehot(c, 5) for c in np.atleast_1d(cond["c2"])), "c1": onehot(cond["c1"], 4)}
        assert_close(R[:, j], npref_explain(model, x, target, rule, masks=masks), TOL, f"{cond}")
    for j, c in enumerate([1, 4]):
        _, per = npref_explain(model, x, target, rule, masks={"c2": onehot(c, 5)}, per_layer=True)
        assert_close(S[:, j], per["c1"].sum(axis=(1, 2)), TOL, f"subconcepts of c2:{c}")
        assert_close(ex.concept_relevance(x, layer="c1", condition={"c2": c}), per["c1"].sum(axis=(1, 2)), TOL)


def test_concept_relevance_matches_reference_layers():
    K = package("keras")
    model, x = model_of(K), images(seed=3)
    rule = lrp_grad.AlphaBeta(1, 0)
    ex = lrp_grad.Explainer(model, rule=rule)
    C = ex.concept_relevance(x, 1, layer=["c1", "c2", "d1"])
    _, per = npref_explain(model, x, np.ones(3, int), rule, per_layer=True)
    for name in ("c1", "c2"):
        assert_close(C[name], per[name].sum(axis=(1, 2)), TOL, name)
    assert_close(C["d1"], per["d1"], TOL, "d1")
    assert_close(ex.concept_relevance(x, 1, layer="c2"), C["c2"], TOL)
    assert_close(ex.concept_relevance(x, 1, layer=model.get_layer("c2")), C["c2"], TOL)  # a layer object


# ---------------------------------------------------------------------------------------------
# Identities


@pytest.mark.parametrize("rule", ALL_RULES + list(lrp_grad.presets.NAMES), ids=repr)
def test_conditional_heatmaps_of_all_channels_sum_to_the_heatmap(rule):
    model = model_of(package("keras"))
    x = images(seed=4)
    ex = lrp_grad.Explainer(model, rule=rule)
    R = ex(x)
    for layer, channels in (("c1", 4), ("c2", 5), ("d1", 6)):
        Rc = ex.conditional(x, layer=layer, channels=list(range(channels)))
        assert_close(Rc.sum(axis=1), R, 1e-9, f"{rule} {layer}")


def test_sum_identity_at_a_residual_join_and_through_a_branch():
    model = model_of(package("tf_keras"), residual)
    x = images((8, 8, 3), seed=5)
    rule = lrp_grad.Epsilon(0.01)
    ex = lrp_grad.Explainer(model, rule=rule)
    R = ex(x)
    assert_close(ex.conditional(x, layer="join", channels=list(range(4))).sum(1), R, 1e-9, "join")
    assert_close(ex.conditional(x, layer="stem", channels=list(range(4))).sum(1), R, 1e-9, "stem")
    # "branch" is not on every path (the skip bypasses it): its heatmaps sum to the relevance that
    # flows through it: the heatmap minus what arrives when the branch's relevance is zeroed.
    through = ex.conditional(x, layer="branch", channels=list(range(4))).sum(1)
    target = np.argmax(model.predict(x, verbose=0), -1)
    full = npref_explain(model, x, target, rule)
    skip = npref_explain(model, x, target, rule, masks={"branch": np.zeros(4)})
    assert_close(full, R, 1e-9, "reference heatmap")
    assert np.abs(through - R).max() > 1e-3 * np.abs(R).max()
    assert_close(through, full - skip, 1e-9, "through the branch")


@pytest.mark.parametrize("rule", [lrp_grad.Z(), lrp_grad.Epsilon(1e-12)], ids=repr)
@pytest.mark.parametrize("pkg", ["keras", "tf_keras"])
def test_each_condition_conserves_its_channel_relevance(rule, pkg):
    model = model_of(package(pkg), bias=False)
    x = images(seed=6)
    ex = lrp_grad.Explainer(model, rule=rule)
    C = ex.concept_relevance(x, layer="c2")
    Rc = ex.conditional(x, layer="c2", channels=list(range(5)))
    assert_close(Rc.reshape(3, 5, -1).sum(-1), C, 1e-8, "conservation per channel")
    S = ex.subconcepts(x, layer="c2", channels=list(range(5)), lower="c1")
    assert_close(S.sum(-1), C, 1e-8, "sub-concepts conserve")


# ---------------------------------------------------------------------------------------------
# One pass, devices, packages, no mutation


def test_one_trace_for_any_number_of_conditions_and_images():
    model = model_of(package("keras"), dtype="float32")
    ex = lrp_grad.Explainer(model)
    x = images(n=4, seed=7).astype("float32")
    ex.conditional(x, layer="c2", channels=[0, 1])
    traces = ex.trace_count
    ex.conditional(x[:3], layer="c2", channels=[0, 1, 2, 3, 4])
    ex.conditional(x, layer="c2", channels=[2])
    assert ex.trace_count == traces
    # any iterable of channels; one channel alone
    assert_close(ex.conditional(x, layer="c2", channels=range(3)), ex.conditional(x, layer="c2", channels=[0, 1, 2]),
                 1e-12)
    assert_close(ex.conditional(x, layer="c2", channels=np.int64(4)), ex.conditional(x, layer="c2", channels=[4]),
                 1e-12)


def test_concept_functions_given_a_model_reuse_one_compiled_pass():
    """Issue 21: repeated concept calls with the same shapes must not trace again; a model given
    in place of an Explainer uses the explainer explain() caches for it (one trace for all calls)."""
    from lrp_grad.api.cache import _cached_explainer
    from lrp_grad.concepts import concept_relevance, conditional

    model = model_of(package("keras"), dtype="float32")
    x = images(n=2, seed=3).astype("float32")
    first = concept_relevance(model, x, layer="c2")
    ex = _cached_explainer(model, None, None, None, None)[0]
    traces = ex.trace_count
    assert traces >= 1
    for _ in range(3):
        assert_close(concept_relevance(model, x, layer="c2"), first, 1e-12)
    assert ex.trace_count == traces
    assert_close(first, lrp_grad.Explainer(model).concept_relevance(x, layer="c2"), 1e-6)
    conditional(model, x, layer="c2", channels=[0])
    traces = ex.trace_count
    conditional(model, x, layer="c2", channels=[1, 2])
    assert ex.trace_count == traces
    with pytest.raises(ConceptError, match=r"^concept_relevance\(\) takes an lrp_grad.Explainer \(or a Keras model\) "
                                           r"first, got str; pass ex = lrp_grad.Explainer\(model\)"):
        concept_relevance("model.keras", x, layer="c2")


@pytest.mark.parametrize("call", ["concept_relevance", "conditional", "subconcepts", "reference_samples"])
def test_concept_functions_on_a_changed_model_say_rebuild(call):
    """Issue 21: a BatchNorm folded through a max pooling whose scales changed sign after the
    Explainer was built: the concept functions say StaleExplainerError like a call does (not a raw
    InvalidArgumentError)."""
    K = package("tf_keras")
    L = K.layers
    model = K.Sequential([K.Input((6, 6, 1)), L.Conv2D(3, 3, activation="relu", name="c"),
                          L.BatchNormalization(name="bn"), L.MaxPooling2D(2, name="mp"),
                          L.Conv2D(2, 1, activation="relu", name="top"), L.Flatten(name="f"), L.Dense(2, name="d")])
    bn = model.get_layer("bn")
    gamma, beta, mean, var = bn.get_weights()
    bn.set_weights([np.abs(gamma) + 0.5, beta, mean, var])
    ex = lrp_grad.Explainer(model)
    x = np.random.default_rng(5).uniform(0, 1, (2, 6, 6, 1)).astype("float32")
    run = {"concept_relevance": lambda: ex.concept_relevance(x, layer="c"),
           "conditional": lambda: ex.conditional(x, layer="c", channels=[0]),
           "subconcepts": lambda: ex.subconcepts(x, layer="top", channels=[0], lower="c"),
           "reference_samples": lambda: reference_samples(ex, x, "c", top=1)}[call]
    run()
    bn.set_weights([-(np.abs(gamma) + 0.5), beta, mean, var])
    with pytest.raises(lrp_grad.StaleExplainerError,
                       match=r"^BatchNormalization 'bn' was folded .*Build a new Explainer\.$"):
        run()


def test_chunked_conditions_equal_one_call():
    model = model_of(package("keras"))
    ex = lrp_grad.Explainer(model)
    x = images(n=5, seed=8)
    whole = ex.conditional(x, layer="c1", channels=[0, 1, 2, 3])
    chunked = ex.conditional(x, layer="c1", channels=[0, 1, 2, 3], batch_size=3)  # 3 rows: 3 images x 1 condition
    assert_close(chunked, whole, 1e-12)


def test_xla_equals_eager_and_packages_agree():
    x = images(seed=9).astype("float32")
    k3 = small_cnn(package("keras"), dtype="float32")
    tk = small_cnn(package("tf_keras"), dtype="float32")
    tk.set_weights(k3.get_weights())
    eager = lrp_grad.Explainer(k3, jit_compile=False).conditional(x, layer="c2", channels=[0, 2, 4])
    xla = lrp_grad.Explainer(k3, jit_compile=True).conditional(x, layer="c2", channels=[0, 2, 4])
    other = lrp_grad.Explainer(tk).conditional(x, layer="c2", channels=[0, 2, 4])
    assert_close(xla, eager, 1e-5, "xla")
    assert_close(other, eager, 1e-5, "tf_keras vs keras")


def test_models_are_not_mutated():
    model = small_cnn(package("keras"), dtype="float32", seed=11)
    x = images(seed=10).astype("float32")
    weights = [w.copy() for w in model.get_weights()]
    before = model.predict(x, verbose=0)
    ex = lrp_grad.Explainer(model)
    ex.conditional(x, layer="c2", channels=[0, 1])
    ex.concept_relevance(x, layer=["c1", "c2"])
    ex.subconcepts(x, layer="c2", channels=[1], lower="c1")
    reference_samples(ex, x, "c2", top=2)
    assert all(np.array_equal(a, b) for a, b in zip(weights, model.get_weights()))
    assert np.array_equal(before, model.predict(x, verbose=0))


def test_several_inputs():
    K = package("keras")
    L = K.layers
    a, b = K.Input((6, 6, 1), name="img", **F64), K.Input((4,), name="meta", **F64)
    h = L.Conv2D(3, 3, activation="relu", name="conv", **F64)(a)
    h = L.Flatten(**F64)(h)
    h = L.Concatenate(**F64)([h, L.Dense(3, activation="relu", name="m", **F64)(b)])
    model = randomize(K.Model([a, b], L.Dense(2, name="out", **F64)(h)), 12)
    xs = [images((6, 6, 1), n=2, seed=12), images((4,), n=2, seed=13)]
    ex = lrp_grad.Explainer(model, rule=lrp_grad.Epsilon(1e-9))
    Rimg, Rmeta = ex.conditional(xs, layer="conv", channels=[0, 1, 2])
    assert Rimg.shape == (2, 3, 6, 6, 1) and Rmeta.shape == (2, 3, 4)
    assert np.all(Rmeta == 0)  # the meta input does not feed the conv layer
    assert_close(Rimg.sum(1), ex(xs)[0], 1e-9, "img through conv")


# ---------------------------------------------------------------------------------------------
# Receptive fields and reference samples


def _brute_force_box(K, layer_spec, pos, shape):
    """The bounding box of the input positions whose change changes output ``pos``: weights > 0,
    inputs > 0 and linear layers make every path active, so a large change at a position shows up."""
    L = K.layers
    inp = K.Input(shape, **F64)
    h = inp
    for kind, kw in layer_spec:
        h = getattr(L, kind)(**kw, **F64)(h)
    model = K.Model(inp, h)
    model.set_weights([np.abs(w) + 0.1 for w in model.get_weights()])
    y = np.ones((shape[0] * shape[1] + 1,) + shape)
    for k in range(shape[0] * shape[1]):  # sample k + 1: a change at one position; sample 0: none
        y[(k + 1,) + np.unravel_index(k, shape[:2])] += 1e3  # large enough to win every max pooling
    out = model(y).numpy()[(slice(None),) + pos].sum(-1)
    hit = (np.abs(out[1:] - out[0]) > 1e-9).reshape(shape[:2])
    rows, cols = np.nonzero(hit)
    return model, ((rows.min(), rows.max() + 1), (cols.min(), cols.max() + 1))


@pytest.mark.parametrize("spec", [
    [("Conv2D", dict(filters=2, kernel_size=3, padding="same", strides=2)),
     ("MaxPooling2D", dict(pool_size=2, padding="same")), ("Conv2D", dict(filters=2, kernel_size=2, dilation_rate=2))],
    [("ZeroPadding2D", dict(padding=((1, 0), (2, 1)))), ("Conv2D", dict(filters=2, kernel_size=3)),
     ("AveragePooling2D", dict(pool_size=3, strides=1)), ("UpSampling2D", dict(size=2)),
     ("Cropping2D", dict(cropping=((1, 1), (0, 2)))), ("Conv2D", dict(filters=2, kernel_size=(1, 3), padding="same"))],
], ids=["conv-stride-pool-dilation", "pad-avg-upsample-crop"])
def test_receptive_field_against_perturbation(spec):
    K = package("tf_keras")
    shape = (11, 10, 1)
    model, _ = _brute_force_box(K, spec, (0, 0), shape)  # build once for the output size
    out = model.output_shape[1:3]
    ex = lrp_grad.Explainer(model, output=model.layers[-1].name)
    for pos in [(0, 0), (out[0] - 1, out[1] - 1), (out[0] // 2, out[1] // 3)]:
        _, want = _brute_force_box(K, spec, pos, shape)
        got = receptive_field(ex, model.layers[-1].name, pos)
        assert got == tuple((int(a), int(b)) for a, b in want), (pos, got, want)


def test_receptive_field_of_a_global_layer_is_the_whole_image():
    ex = lrp_grad.Explainer(model_of(package("keras")))
    assert receptive_field(ex, "d1", ()) == ((0, 9), (0, 9))
    with pytest.raises(ConceptError, match=r"position \(4, 0\) is not a position of layer 'c2'"):
        receptive_field(ex, "c2", (4, 0))


@pytest.mark.parametrize("by", ["relevance", "activation"])
def test_reference_samples_against_brute_force(by):
    import tensorflow as tf

    model = model_of(package("keras"), dtype="float32", seed=5)
    ex = lrp_grad.Explainer(model)
    data = images(n=23, seed=14).astype("float32")
    labels = np.arange(23) % 3
    stream = tf.data.Dataset.from_tensor_slices((data, labels)).batch(4)  # regrouped into batches of 6
    refs = reference_samples(ex, stream, "c2", channels=[0, 3, 4], top=5, by=by, batch_size=6)
    if by == "relevance":
        scores = ex.concept_relevance(data, labels, layer="c2")
    else:
        import keras

        acts = keras.Model(model.input, model.get_layer("c2").output).predict(data, verbose=0)
        scores = acts.reshape(23, -1, 5).max(1)
    for row, c in enumerate([0, 3, 4]):
        order = np.lexsort((np.arange(23), -scores[:, c].astype(np.float64)))[:5]
        np.testing.assert_allclose(refs.scores[row], scores[order, c], rtol=1e-5, atol=1e-7)
        assert list(refs.indices[row]) == list(order) or np.allclose(np.sort(scores[refs.indices[row], c]),
                                                                    np.sort(scores[order, c]), rtol=1e-5)
        for j, i in enumerate(refs.indices[row]):
            (a, b), (cc, d) = refs.boxes[row, j]
            np.testing.assert_array_equal(refs.crops[row][j], data[i, a:b, cc:d])
    assert refs.indices.shape == (3, 5) and refs.positions.shape == (3, 5, 2)


def test_reference_samples_of_a_tf_dataset_with_fewer_samples_than_top():
    import tensorflow as tf

    model = model_of(package("keras"), dtype="float32", seed=5)
    ex = lrp_grad.Explainer(model)
    data = images(n=3, seed=15).astype("float32")
    refs = reference_samples(ex, tf.data.Dataset.from_tensor_slices(data).batch(2), "c1", top=4, by="activation")
    assert refs.indices.shape == (4, 4)
    assert np.all(refs.indices[:, 3] == -1) and np.all(np.isneginf(refs.scores[:, 3]))
    assert sorted(refs.indices[0, :3]) == [0, 1, 2]
    assert len(refs.crops[0]) == 3


# ---------------------------------------------------------------------------------------------
# Errors


@pytest.fixture(scope="module")
def ex32():
    return lrp_grad.Explainer(small_cnn(package("keras"), dtype="float32"))


@pytest.mark.parametrize("call, message", [
    (lambda ex, x: ex.conditional(x, layer="nope", channels=[0]), r"model 'small_cnn' has no layer 'nope'"),
    (lambda ex, x: ex.conditional(x, layer="c2", channels=[5]),
     r"channel 5 is out of range for layer 'c2' \(Conv2D\) with 5 channels \(valid: 0..4\)"),
    (lambda ex, x: ex.conditional(x, layer="c2", channels=[-1]), r"channel -1 is out of range"),
    (lambda ex, x: ex.conditional(x, layer="c2", channels=[True]), r"channel True of layer 'c2' is not an integer"),
    (lambda ex, x: ex.conditional(x, layer="flat", channels=[0]), r"layer 'flat' \(Flatten\) has no channels"),
    (lambda ex, x: ex.concept_relevance(x, layer=ex.model.layers[0].name), r"is a model input"),
    (lambda ex, x: ex.conditional(x), r"needs layer= and channels="),
    (lambda ex, x: ex.conditional(x, layer="c2", channels=[0], conditions=[{"c2": 0}]), r"not both"),
    (lambda ex, x: ex.conditional(x, conditions=[{"c2": 0}, {"c1": 0}]),
     r"conditions\[1\] names layers \['c1'\] but conditions\[0\] names \['c2'\]"),
    (lambda ex, x: ex.subconcepts(x, layer="c1", channels=[0], lower="c2"), r"layer 'c2' is not below layer 'c1'"),
    (lambda ex, x: ex.conditional(x, conditions=[{"c1": 0, "flat": 1}]), r"layer 'flat' \(Flatten\) has no channels"),
    (lambda ex, x: ex.conditional(x, target="all", layer="c2", channels=[0]), r"takes one target per sample"),
    (lambda ex, x: ex.conditional(x, target=7, layer="c2", channels=[0]), r"target\[0\] = 7 is out of range"),
    (lambda ex, x: ex.concept_relevance(x, layer=3), r"layer must be a layer name \(str\) or a layer of the model, got 3"),
    (lambda ex, x: ex.conditional(x, layer="c2", channels=[[]]), r"an empty channel list for layer 'c2'"),
    (lambda ex, x: reference_samples(ex, x, "c2", by="gradient"), r"by='gradient' is not known"),
    (lambda ex, x: reference_samples(ex, x, "c2", top=0), r"top must be a positive int, got 0"),
    (lambda ex, x: ex.conditional(x, layer="c2", channels=[0], batch_size=0), r"batch_size must be a positive int"),
], ids=["unknown", "range", "negative", "bool", "flatten", "input", "missing", "both", "mixed-sets", "not-below", "cond-flatten",
        "all-targets", "target-range", "layer-type", "empty", "by", "top", "batch-size"])
def test_errors_name_the_problem(ex32, call, message):
    x = images(n=2).astype("float32")
    with pytest.raises(lrp_grad.LRPError, match=message):
        call(ex32, x)


def test_layer_not_leading_to_the_output():
    K = package("keras")
    L = K.layers
    inp = K.Input((6, 6, 1))
    h = L.Conv2D(2, 3, name="conv")(inp)
    side = L.Conv2D(2, 1, name="side")(h)
    out = L.Dense(2, name="out")(L.Flatten()(h))
    model = K.Model(inp, [out, side])
    ex = lrp_grad.Explainer(model, output="out")
    with pytest.raises(ConceptError, match=r"layer 'side' of model .* does not lead to the explained output 'out'"):
        ex.concept_relevance(images((6, 6, 1), n=1).astype("float32"), layer="side")


def bn_plus_residual(K, dtype="float32"):
    """Conv-BN-ReLU stem (the BN folded), a residual join written with ``+``, global pooling."""
    L = K.layers
    inp = K.Input((10, 10, 3), dtype=dtype)
    a = L.ReLU(name="stem_relu")(L.BatchNormalization(name="stem_bn")(L.Conv2D(6, 3, padding="same", name="stem")(inp)))
    b = L.Conv2D(6, 3, padding="same", activation="relu", name="branch")(a)
    j = L.ReLU(name="out_relu")(a + b)
    out = L.Dense(4, name="logits")(L.GlobalAveragePooling2D()(j))
    return randomize(K.Model(inp, out, name="bn_plus"), 21)


@pytest.mark.parametrize("pkg", ["keras", "tf_keras"])
def test_sum_identity_on_a_folded_batchnorm_and_a_plus_residual(pkg):
    model = bn_plus_residual(package(pkg))
    x = images((10, 10, 3), n=2, seed=22).astype("float32")
    for rule in (None, "epsilon_plus_flat"):
        ex = lrp_grad.Explainer(model, rule=rule)
        R = ex(x)
        for layer in ("stem_bn", "stem_relu", "out_relu"):  # the BN's name stands for the folded pair
            H = ex.conditional(x, layer=layer, channels=list(range(6)))
            assert_close(H.sum(1), R, 1e-5, f"{rule} {layer}")


@pytest.mark.slow
@pytest.mark.parametrize("ctor, layer", [
    ("tf_keras.ResNet50", "conv4_block6_out"), ("tf_keras.DenseNet121", "pool3_relu"),
    ("keras.EfficientNetB0", "block6a_expand_activation"), ("tf_keras.MobileNetV2", "block_13_expand_relu"),
])
def test_sum_identity_on_applications_in_float64(ctor, layer):
    """Every channel of a layer every path passes: their conditional heatmaps sum to the heatmap
    (float64: exact up to rounding; in float32 EfficientNet's stabilised divisions amplify the
    rounding of the batched transposes to ~1e-3)."""
    pkg, name = ctor.split(".")
    K = package(pkg)
    if pkg == "keras":
        K.config.set_floatx("float64")
    else:
        K.backend.set_floatx("float64")
    try:
        model = getattr(K.applications, name)(weights=None, input_shape=(32, 32, 3), classes=10,
                                              classifier_activation=None)
    finally:
        (K.config.set_floatx if pkg == "keras" else K.backend.set_floatx)("float32")
    x = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3))
    ex = lrp_grad.Explainer(model, rule="epsilon_plus_flat")
    R = ex(x)
    H = ex.conditional(x, layer=layer, channels=list(range(lrp_grad.concepts.layer_channels(ex, layer))))
    assert_close(H.sum(1), R, 1e-9, f"{ctor} {layer}")


@pytest.mark.parametrize("pkg", ["keras", "tf_keras"])
def test_layers_of_a_nested_model(pkg):
    K = package(pkg)
    L = K.layers
    inner_in = K.Input((8, 8, 3))
    inner = K.Model(inner_in, L.MaxPooling2D(name="ipool")(L.Conv2D(4, 3, activation="relu", name="iconv")(inner_in)),
                    name="backbone")
    inp = K.Input((8, 8, 3))
    h = L.Conv2D(5, 2, activation="relu", name="head_conv")(inner(inp))
    model = randomize(K.Model(inp, L.Dense(3, name="logits")(L.Flatten()(h))), 23)
    x = images((8, 8, 3), n=2, seed=24).astype("float32")
    ex = lrp_grad.Explainer(model, rule="epsilon_plus_flat")
    R = ex(x)
    for layer in ("iconv", "backbone/iconv", "backbone", "head_conv"):
        H = ex.conditional(x, layer=layer, channels=list(range(lrp_grad.concepts.layer_channels(ex, layer))))
        assert_close(H.sum(1), R, 1e-5, layer)
    # the nested model's name stands for its output layer
    assert_close(ex.concept_relevance(x, layer="backbone"), ex.concept_relevance(x, layer="backbone/ipool"), 1e-12)
    # the explained output as the layer: its target channel carries the whole heatmap
    target = ex.forward(x).argmax(1)
    H = ex.conditional(x, layer="logits", channels=[0, 1, 2])
    for i in range(2):
        assert_close(H[i, target[i]], R[i], 1e-12)
        assert np.all(H[i, [c for c in range(3) if c != target[i]]] == 0)


def test_a_shared_layer_is_named_by_its_call():
    K = package("keras")
    L = K.layers
    inp = K.Input((6, 6, 2))
    shared = L.Conv2D(2, 1, activation="relu", name="shared")
    h = shared(L.Conv2D(2, 3, padding="same", activation="relu", name="pre")(inp))
    h = shared(h)
    model = randomize(K.Model(inp, L.Dense(2, name="out")(L.Flatten()(h))), 25)
    x = images((6, 6, 2), n=1, seed=26).astype("float32")
    ex = lrp_grad.Explainer(model, rule=lrp_grad.Epsilon(1e-6))
    with pytest.raises(ConceptError, match=r"layer 'shared' is called 2 times in model .*; name one call: "
                                           r"'shared#1', 'shared#2'"):
        ex.concept_relevance(x, layer="shared")
    R = ex(x)
    first, second = (ex.concept_relevance(x, layer=f"shared#{k}") for k in (1, 2))
    assert not np.allclose(first, second)
    for label in ("shared#1", "shared#2"):  # each call is on every path: its channels hold the whole heatmap
        assert_close(ex.conditional(x, layer=label, channels=[0, 1]).sum(1), R, 1e-5, label)


def test_a_layer_that_only_feeds_a_gate_is_refused():
    K = package("keras")
    L = K.layers
    inp = K.Input((6, 6, 4))
    h = L.Conv2D(4, 3, padding="same", activation="relu", name="body")(inp)
    s = L.GlobalAveragePooling2D(keepdims=True)(h)
    s = L.Conv2D(4, 1, activation="sigmoid", name="se_expand")(L.Conv2D(2, 1, activation="relu", name="se_reduce")(s))
    h = L.Multiply(name="excite")([h, s])
    model = randomize(K.Model(inp, L.Dense(3, name="out")(L.Flatten()(h))), 27)
    x = images((6, 6, 4), n=2, seed=28).astype("float32")
    ex = lrp_grad.Explainer(model, rule="epsilon_plus_flat")
    for layer in ("se_reduce", "se_expand"):
        with pytest.raises(ConceptError, match=rf"layer '{layer}' \(Conv2D\) only feeds the gate of a product"):
            ex.conditional(x, layer=layer, channels=[0])
    R = ex(x)
    for layer in ("body", "excite"):  # on the signal path: the identity holds
        assert_close(ex.conditional(x, layer=layer, channels=list(range(4))).sum(1), R, 1e-5, layer)
