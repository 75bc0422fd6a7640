"""Models that are not single-input classifiers, against float64 references from the LRP equations.

- several inputs (a list or a dict by input name; the relevance of each input, conservation over
  all inputs together),
- outputs of any shape (a segmentation map explained through a region mask: the initial relevance
  is ``output * mask``), a ``(n, 1)`` regression without a target,
- a hidden layer's output (``Explainer(model, output='layer')``: the model truncated there),
- several outputs (``output=`` by name or index),
- the errors of those calls, no mutation of the model, XLA against eager.

Every model is float64 and built in both Keras packages (``K``). The references are tests/npref.py
(several inputs through its ``input`` layers) on the layer dicts of ``kit.to_npref_graph``.
"""
import numpy as np
import pytest
import tensorflow as tf

import lrp_grad
import npref
from kit import WEIGHT_FREE, assert_close, npref_rule, randomize, to_npref_graph

F64 = dict(dtype="float64")
RULES = [lrp_grad.Z(), lrp_grad.Epsilon(1e-6), lrp_grad.AlphaBeta(2, 1)]
CONSERVING = [lrp_grad.Z(), lrp_grad.Epsilon(1e-9, bias=False)]
HEADS = ("softmax", "sigmoid")
TOL = 1e-10

# Models are built once per package and builder arguments (building and randomising dominates
# the small ones). Each model's weights and predictions on a probe batch are recorded when it is
# built: test_models_are_never_mutated (last in this file) compares every model built so far with
# its record, so it checks all the calls of the tests that ran before it.
_BUILT = {}


def _build(K, builder, **kw):
    key = (K.__name__, builder.__name__, tuple(sorted(kw.items())))
    if key not in _BUILT:
        built = builder(K, **kw)
        model = built[0] if isinstance(built, tuple) else built
        probe = inputs_for(model, n=2, seed=99)
        _BUILT[key] = (built, _state(model, probe if len(probe) > 1 else probe[0]))
    return _BUILT[key][0]


# ------------------------------------------------------------------------------------------------
# Models


def two_input(K, merge="concat", bias=True, dtype="float64"):
    """An image branch (Conv2D -> GlobalAveragePooling2D) and a metadata branch (Dense), joined by
    Concatenate (inputs [image, meta]) or by Add (inputs in the other order, [meta, image])."""
    L = K.layers
    dt = dict(dtype=dtype)
    kw = dict(use_bias=bias, **dt)
    image = K.Input((6, 6, 2), name="image", **dt)
    meta = K.Input((3,), name="meta", **dt)
    h = L.Conv2D(4, 3, activation="relu", name="img_conv", **kw)(image)
    h = L.GlobalAveragePooling2D(name="img_pool", **dt)(h)
    m = L.Dense(4, activation="relu", name="meta_dense", **kw)(meta)
    if merge == "concat":
        j = L.Concatenate(name="join", **dt)([h, m])
        j = L.Dense(5, activation="relu", name="joint", **kw)(j)
        inputs = [image, meta]
    else:
        j = L.ReLU(name="join_relu", **dt)(L.Add(name="join", **dt)([h, m]))
        inputs = [meta, image]
    out = L.Dense(3, name="head", **kw)(j)
    return randomize(K.Model(inputs, out, name=f"two_input_{merge}"), seed=11 if merge == "concat" else 12)


def segmenter(K, up="transpose", head=None, bias=True):
    """Encoder-decoder: Conv2D, MaxPooling2D, Conv2D, Conv2DTranspose(strides=2) or UpSampling2D,
    a Concatenate skip, a 1x1 Conv2D head with 3 classes; ``head``: None, a softmax layer
    (``'layer'``) or a softmax fused into the head (``'fused'``)."""
    L = K.layers
    kw = dict(use_bias=bias, **F64)
    inp = K.Input((8, 8, 2), name="image", **F64)
    e1 = L.Conv2D(4, 3, padding="same", activation="relu", name="enc1", **kw)(inp)
    p = L.MaxPooling2D(2, name="pool", **F64)(e1)
    e2 = L.Conv2D(6, 3, padding="same", activation="relu", name="enc2", **kw)(p)
    if up == "transpose":
        u = L.Conv2DTranspose(4, 3, strides=2, padding="same", activation="relu", name="up", **kw)(e2)
    else:
        u = L.UpSampling2D(2, name="up", **F64)(e2)
    c = L.Concatenate(name="skip", **F64)([e1, u])
    out = L.Conv2D(3, 1, activation="softmax" if head == "fused" else None, name="seg", **kw)(c)
    if head == "layer":
        out = L.Activation("softmax", name="probs", **F64)(out)
    return randomize(K.Model(inp, out, name=f"seg_{up}_{head}"), seed=21)


SEGMENTERS = {"transpose": dict(up="transpose"), "upsample_softmax": dict(up="upsample", head="layer"),
              "transpose_fused_softmax": dict(up="transpose", head="fused")}


def regressor(K, bias=True, head=None):
    """Conv2D -> Flatten -> Dense -> Dense(1): one number per sample (``head='sigmoid'``: a binary
    classifier's probability)."""
    L = K.layers
    kw = dict(use_bias=bias, **F64)
    inp = K.Input((5, 5, 2), name="x", **F64)
    h = L.Conv2D(3, 3, activation="relu", name="conv", **kw)(inp)
    h = L.Dense(4, activation="relu", name="hidden", **kw)(L.Flatten(**F64)(h))
    out = L.Dense(1, activation=head, name="value", **kw)(h)
    return randomize(K.Model(inp, out, name="regressor"), seed=31)


def hidden_cnn(K):
    """A classifier whose ReLU-activated Conv2D 'c2' (3 x 3 x 5) is explained as a hidden output."""
    L = K.layers
    inp = K.Input((8, 8, 2), name="x", **F64)
    h = L.Conv2D(4, 3, activation="relu", name="c1", **F64)(inp)
    h = L.MaxPooling2D(2, name="pool", **F64)(h)
    h = L.Conv2D(5, 3, padding="same", activation="relu", name="c2", **F64)(h)
    h = L.GlobalAveragePooling2D(name="gap", **F64)(h)
    return randomize(K.Model(inp, L.Dense(3, name="head", **F64)(h), name="hidden_cnn"), seed=41)


def multi_output(K):
    """A shared trunk with a softmax classifier head 'cls' and a regression head 'reg', and the
    single-output twins of each head (the same layer objects)."""
    L = K.layers
    inp = K.Input((6, 6, 2), name="x", **F64)
    h = L.Conv2D(4, 3, activation="relu", name="trunk", **F64)(inp)
    h = L.Flatten(name="flat", **F64)(h)
    cls = L.Dense(3, activation="softmax", name="cls", **F64)(h)
    reg = L.Dense(1, name="reg", **F64)(h)
    model = randomize(K.Model(inp, [cls, reg], name="two_heads"), seed=51)
    return model, K.Model(inp, cls, name="cls_twin"), K.Model(inp, reg, name="reg_twin")


def inputs_for(model, n=3, seed=0, nonneg_images=False):
    """One random batch per model input (in the model's order); images in [0, 1] if asked."""
    rng = np.random.default_rng(seed)
    return [rng.uniform(0.0 if nonneg_images and len(t.shape) == 4 else -1.0, 1.0, (n,) + tuple(t.shape[1:]))
            for t in model.inputs]


# ------------------------------------------------------------------------------------------------
# The float64 reference


def reference_graph(model, output=None):
    """npref layer dicts of what is explained: the model (or its part up to ``output``) with a
    final softmax/sigmoid removed, as lrp_grad explains the logits."""
    layers = to_npref_graph(model, output)
    last = layers[-1]
    if last["type"] == "act" and last["fn"] in HEADS:
        assert last["inputs"] == [len(layers) - 1], "the head reads the layer before it"
        layers = layers[:-1]
    elif last.get("act") in HEADS:
        layers[-1] = dict(last, act="linear")
    return layers


def reference(model, x, initial, rule, output=None):
    """``(relevance, explained output)`` of the float64 reference: LRP of ``rule`` from the initial
    relevance ``initial(output)``; ``x`` a list for several inputs (relevance one array each)."""
    layers = reference_graph(model, output)
    x = [np.asarray(v, np.float64) for v in x] if isinstance(x, list) else np.asarray(x, np.float64)
    out = npref.forward(layers, x)[-1]
    per_layer = {}
    if not isinstance(rule, (lrp_grad.Z, lrp_grad.Epsilon)):
        # lrp_grad's single-rule policy (composites.single_rule): weight-free linear layers
        # (pooling, merging) take Epsilon(1e-6)
        per_layer = {i: npref_rule(lrp_grad.Epsilon(1e-6)) for i, l in enumerate(layers) if l["type"] in WEIGHT_FREE}
    R = npref.lrp(layers, x, initial(out), npref_rule(rule), layer_rules=per_layer)[0]
    return R, out


def onehot(target, k):
    return np.eye(k)[np.asarray(target)]


def per_sample(a):
    return np.asarray(a).reshape(len(a), -1).sum(1)


def region_mask(H=8, W=8, C=3, cls=1, rows=(2, 6), cols=(1, 5)):
    m = np.zeros((H, W, C))
    m[rows[0]:rows[1], cols[0]:cols[1], cls] = 1.0
    return m


def _check_nonzero(expected, what):
    """A reference that is zero everywhere would make a comparison vacuous."""
    for e in (expected if isinstance(expected, list) else [expected]):
        assert np.abs(e).max() > 1e-3, f"{what}: the reference relevance is (almost) zero"


# ------------------------------------------------------------------------------------------------
# The reference itself: npref's several inputs


def test_npref_several_inputs_zrule_is_gradient_times_input():
    """npref with ``input`` layers: for a bias-free ReLU network the z-rule equals gradient x
    input for each input (both computed by npref), the gradient matches finite differences, and
    the relevance of all inputs together sums to the output's."""
    rng = np.random.default_rng(0)
    layers = [{"type": "input", "index": 1},                                        # a_1 = x_1
              {"type": "dense", "W": rng.normal(size=(4, 3)), "act": "relu", "inputs": [0]},
              {"type": "dense", "W": rng.normal(size=(2, 3)), "act": "relu", "inputs": [1]},
              {"type": "concat", "inputs": [2, 3]},
              {"type": "dense", "W": rng.normal(size=(6, 2))}]
    xs = [rng.normal(size=(3, 4)), rng.normal(size=(3, 2))]
    out = npref.forward(layers, xs)[-1]
    G = rng.normal(size=out.shape)
    grads = npref.gradient(layers, xs, G)
    R = npref.lrp(layers, xs, out * G, {"name": "z"})[0]
    assert isinstance(R, list) and [r.shape for r in R] == [x.shape for x in xs]
    for k in range(2):
        np.testing.assert_allclose(R[k], xs[k] * grads[k], rtol=1e-10, atol=1e-13)
        assert np.abs(R[k]).max() > 1e-3
        for i in np.ndindex(xs[k].shape[1:]):
            step = [np.zeros_like(x) for x in xs]
            step[k][(slice(None),) + i] = 1e-6
            plus = npref.forward(layers, [x + s for x, s in zip(xs, step)])[-1]
            minus = npref.forward(layers, [x - s for x, s in zip(xs, step)])[-1]
            np.testing.assert_allclose(((plus - minus) / 2e-6 * G).sum(1), grads[k][(slice(None),) + i],
                                       rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(per_sample(R[0]) + per_sample(R[1]), per_sample(out * G), rtol=1e-10)


def test_npref_input_layer_is_checked():
    with pytest.raises(ValueError, match="is not a model input 0..1"):
        npref.forward([{"type": "input", "index": 2}], [np.ones((1, 2)), np.ones((1, 2))])
    with pytest.raises(ValueError, match=r"missing key\(s\) \['index'\]"):
        npref.forward([{"type": "input"}], [np.ones((1, 2)), np.ones((1, 2))])


# ------------------------------------------------------------------------------------------------
# 1. Several inputs


@pytest.mark.parametrize("rule", RULES, ids=repr)
@pytest.mark.parametrize("merge", ["concat", "add"])
def test_two_inputs_match_float64_reference(K, merge, rule):
    model = _build(K, two_input, merge=merge)
    xs = inputs_for(model, nonneg_images=True)  # per-input sign patterns: image >= 0, meta signed
    target = np.array([0, 2, 1])
    names = ("image", "meta") if merge == "concat" else ("meta", "image")
    assert lrp_grad.Explainer(model, rule=rule).input_names == names
    R = lrp_grad.explain(model, xs, target=target, rule=rule)
    assert isinstance(R, list) and len(R) == 2
    expected, _ = reference(model, xs, lambda out: onehot(target, 3) * out, rule)
    _check_nonzero(expected, f"{merge} {rule!r}")
    for name, r, e, x in zip(names, R, expected, xs):
        assert r.shape == x.shape and r.dtype == np.float64
        assert_close(r, e, TOL, f"{merge} {rule!r} input {name!r}")
    # a dict (in any key order) gives the same, as a dict with the same keys
    Rd = lrp_grad.explain(model, {k: v for k, v in reversed(list(zip(names, xs)))}, target=target, rule=rule)
    assert isinstance(Rd, dict) and set(Rd) == set(names)
    for name, r in zip(names, R):
        np.testing.assert_array_equal(Rd[name], r, err_msg=name)


@pytest.mark.parametrize("rule", [lrp_grad.Epsilon(1e-6), lrp_grad.AlphaBeta(2, 1)], ids=repr)
def test_two_inputs_float32_match_float64_reference(K, rule):
    """The same model in float32 (signed metadata: a Dense on 3 inputs, where some units get only
    positive contributions, z- = 0) against the float64 reference of its float32 weights and
    inputs: float32 rounding allows ~1e-7 relative, 1e-5 is asked."""
    model = _build(K, two_input, merge="concat", dtype="float32")
    xs = [x.astype(np.float32) for x in inputs_for(model, n=8, seed=17, nonneg_images=True)]
    target = np.arange(8) % 3
    R = lrp_grad.explain(model, xs, target=target, rule=rule)
    expected, _ = reference(model, [x.astype(np.float64) for x in xs], lambda out: onehot(target, 3) * out, rule)
    for name, r, e in zip(("image", "meta"), R, expected):
        assert r.dtype == np.float32
        assert_close(r, e, 1e-5, f"float32 {rule!r} input {name!r}")


@pytest.mark.parametrize("rule", CONSERVING, ids=repr)
@pytest.mark.parametrize("merge", ["concat", "add"])
def test_two_inputs_conserve_over_all_inputs(K, merge, rule):
    """Zero biases: the relevance of all inputs together is the explained logit (the predicted
    class, no target given); the report's first entry is that total, then one per input."""
    model = _build(K, two_input, merge=merge, bias=False)
    xs = inputs_for(model, n=4, seed=1)
    R, report = lrp_grad.explain(model, xs, rule=rule, return_layers=True)
    logits = np.asarray(model(xs))
    explained = logits[np.arange(4), logits.argmax(1)]
    names = lrp_grad.Explainer(model).input_names
    total = per_sample(R[0]) + per_sample(R[1])
    rtol = 1e-10 if isinstance(rule, lrp_grad.Z) else 1e-6
    np.testing.assert_allclose(total, explained, rtol=rtol)
    keys = list(report)
    assert keys[:3] == ["inputs (total)", *names], keys
    assert "head" in keys[3:] and "inputs (total)" not in keys[3:]
    np.testing.assert_allclose(report["inputs (total)"], explained, rtol=rtol)
    np.testing.assert_allclose(report.output, explained, rtol=1e-12)
    for name, r in zip(names, R):
        np.testing.assert_allclose(report[name], per_sample(r), rtol=1e-12, err_msg=name)
        assert np.abs(per_sample(r)).max() > 1e-3, f"input {name!r} got no relevance"


def test_two_inputs_several_targets_per_sample(K):
    """``target=(n, k)`` on several inputs: each input's relevance gets the (n, k, ...) layout,
    row j of sample i equal to explaining class target[i, j] alone."""
    model = _build(K, two_input, merge="concat")
    xs = inputs_for(model, n=2, seed=2)
    ex = lrp_grad.Explainer(model, rule=lrp_grad.Epsilon(1e-6))
    targets = np.array([[0, 2], [1, 0]])
    R = ex(xs, target=targets)
    assert [r.shape for r in R] == [(2, 2) + x.shape[1:] for x in xs]
    for j in range(2):
        single = ex(xs, target=targets[:, j])
        for r, s in zip(R, single):
            np.testing.assert_allclose(r[:, j], s, rtol=1e-12, atol=1e-15)


# ------------------------------------------------------------------------------------------------
# 2. Segmentation: a region mask


# every rule on one variant, alpha-beta on the others
SEG_CASES = [("transpose", r) for r in RULES] + [(v, lrp_grad.AlphaBeta(2, 1)) for v in SEGMENTERS if v != "transpose"]


@pytest.mark.parametrize("variant, rule", SEG_CASES, ids=lambda v: v if isinstance(v, str) else repr(v))
def test_segmentation_region_mask_matches_reference(K, variant, rule):
    model = _build(K, segmenter, **SEGMENTERS[variant])
    x = inputs_for(model, n=2, seed=3)[0]
    mask = region_mask()
    ex = lrp_grad.Explainer(model, rule=rule)
    assert ex.output_shape == (8, 8, 3)
    R = ex(x, target=mask)
    expected, _ = reference(model, x, lambda out: out * mask, rule)
    _check_nonzero(expected, f"{variant} {rule!r}")
    assert R.shape == x.shape
    assert_close(R, expected, TOL, f"{variant} {rule!r}")


def test_segmentation_mask_forms(K):
    """Shared (H, W, C), per-sample (n, H, W, C), bool, broadcasting (1, 1, C) and (H, W, 1)
    masks, each against the reference with initial relevance output * mask; an integer target
    is the class summed over all positions, i.e. the (1, 1, C) one-hot mask."""
    model = _build(K, segmenter, **SEGMENTERS["upsample_softmax"])
    rule = lrp_grad.AlphaBeta(2, 1)
    x = inputs_for(model, n=2, seed=4)[0]
    ex = lrp_grad.Explainer(model, rule=rule)
    shared = region_mask()
    each = np.stack([region_mask(rows=(0, 3), cols=(2, 8)), region_mask(cls=2, rows=(4, 8), cols=(0, 4))])
    forms = {
        "shared": (shared, shared),
        "per-sample": (each, each),
        "bool shared": (shared.astype(bool), shared),
        "bool per-sample": (each.astype(bool), each),
        "class weights (1, 1, C)": (np.array([[[0.0, 1.0, -0.5]]]), np.array([[[0.0, 1.0, -0.5]]])),
        "region over classes (H, W, 1)": (shared[..., 1:2], shared[..., 1:2]),
        "one row for all (1, H, W, C)": (shared[None], shared[None]),
    }
    got, references = {}, {}
    for name, (target, as_float) in forms.items():
        got[name] = ex(x, target=target)
        key = (as_float.shape, as_float.tobytes())  # one reference per distinct float mask
        if key not in references:
            references[key] = reference(model, x, lambda out: out * as_float, rule)[0]
        expected = references[key]
        _check_nonzero(expected, name)
        assert_close(got[name], expected, TOL, name)
    np.testing.assert_array_equal(got["bool shared"], got["shared"])
    np.testing.assert_array_equal(got["bool per-sample"], got["per-sample"])
    by_index = ex(x, target=1)
    expected, _ = reference(model, x, lambda out: out * onehot(1, 3), rule)
    assert_close(by_index, expected, TOL, "target=1")
    np.testing.assert_allclose(ex(x, target=np.array([1, 1])), by_index, rtol=1e-12, atol=1e-15)


def test_masks_do_not_retrace_per_batch_size(K):
    """Like class targets (tests/test_properties.py), a mask target compiles the pass once per
    mask shape per sample, not once per batch size: the signature's batch axis is None."""
    model = _build(K, segmenter, **SEGMENTERS["transpose"])
    ex = lrp_grad.Explainer(model, rule=lrp_grad.Z())
    x2, x3 = inputs_for(model, n=2, seed=18)[0], inputs_for(model, n=3, seed=19)[0]
    shared = region_mask()
    ex(x2, target=shared)
    ex(x3, target=shared)
    assert ex.trace_count == 1
    ex(x2, target=np.stack([shared] * 2))
    ex(x3, target=np.stack([shared] * 3))
    assert ex.trace_count <= 2, f"{ex.trace_count} traces for per-sample masks of 2 batch sizes"


@pytest.mark.parametrize("variant", ["transpose", "upsample_softmax"])
def test_segmentation_conserves_with_zero_biases(K, variant):
    """Z, zero biases: sum R == sum(logits * mask) per sample (logits: before any softmax), for a
    shared and a per-sample mask; the explainer's forward is those logits."""
    model = _build(K, segmenter, bias=False, **SEGMENTERS[variant])
    x = inputs_for(model, n=2, seed=5)[0]
    ex = lrp_grad.Explainer(model, rule=lrp_grad.Z())
    logits = npref.forward(reference_graph(model), x)[-1]
    np.testing.assert_allclose(ex.forward(x), logits, rtol=1e-12, atol=1e-14)
    if variant == "upsample_softmax":  # the model's own output is the softmax of those logits
        e = np.exp(logits - logits.max(-1, keepdims=True))
        np.testing.assert_allclose(np.asarray(model(x)), e / e.sum(-1, keepdims=True), rtol=1e-10)
    for mask in (region_mask(), np.stack([region_mask(cls=0), region_mask(cls=2, rows=(0, 8), cols=(5, 8))])):
        R, report = ex(x, target=mask, return_layers=True)
        explained = per_sample(logits * mask)
        assert np.abs(explained).min() > 1e-3
        np.testing.assert_allclose(per_sample(R), explained, rtol=1e-10)
        np.testing.assert_allclose(report.output, explained, rtol=1e-12)
        np.testing.assert_allclose(report["image"], explained, rtol=1e-10)


# ------------------------------------------------------------------------------------------------
# 3. Regression: (n, 1) without a target


@pytest.mark.parametrize("rule", [lrp_grad.Z(), lrp_grad.AlphaBeta(2, 1)], ids=repr)
def test_regression_without_target_matches_reference(K, rule):
    model = _build(K, regressor)
    x = inputs_for(model, n=3, seed=6)[0]
    R = lrp_grad.explain(model, x, rule=rule)
    expected, _ = reference(model, x, lambda out: out, rule)
    _check_nonzero(expected, repr(rule))
    assert_close(R, expected, TOL, repr(rule))
    # LRP is linear in the initial relevance: a per-sample weight mask (n, 1) scales each row
    w = np.array([[2.0], [-1.0], [0.5]])
    np.testing.assert_allclose(lrp_grad.explain(model, x, target=w, rule=rule), R * w[:, :, None, None],
                               rtol=1e-12, atol=1e-15)


def test_sigmoid_head_of_one_output_is_skipped(K):
    """A (n, 1) sigmoid output is explained without a target through its logit."""
    model = _build(K, regressor, head="sigmoid")
    x = inputs_for(model, n=3, seed=6)[0]
    rule = lrp_grad.Epsilon(1e-6)
    R, report = lrp_grad.explain(model, x, rule=rule, return_layers=True)
    expected, logit = reference(model, x, lambda out: out, rule)
    _check_nonzero(expected, "sigmoid head")
    assert_close(R, expected, TOL, "sigmoid head")
    np.testing.assert_allclose(report.output, logit[:, 0], rtol=1e-12)
    np.testing.assert_allclose(np.asarray(model(x))[:, 0], 1 / (1 + np.exp(-logit[:, 0])), rtol=1e-12)


def test_regression_conserves_with_zero_biases(K):
    model = _build(K, regressor, bias=False)
    x = inputs_for(model, n=3, seed=7)[0]
    R, report = lrp_grad.explain(model, x, rule=lrp_grad.Z(), return_layers=True)
    value = np.asarray(model(x))[:, 0]
    assert np.abs(value).min() > 1e-3
    np.testing.assert_allclose(per_sample(R), value, rtol=1e-10)
    np.testing.assert_allclose(report.output, value, rtol=1e-12)


# ------------------------------------------------------------------------------------------------
# 4. A hidden layer's output


@pytest.mark.parametrize("rule", RULES, ids=repr)
def test_hidden_layer_channel_target_matches_truncated_reference(K, rule):
    """``output='c2'`` with target=k: the truncated model (input .. c2) from R0 = a * onehot_k,
    ``a`` c2's (ReLU-activated) output; per-sample channels too."""
    model = _build(K, hidden_cnn)
    x = inputs_for(model, n=3, seed=8)[0]
    ex = lrp_grad.Explainer(model, rule=rule, output="c2")
    assert ex.output_name == "c2" and ex.output_shape == (3, 3, 5) and ex.n_classes == 5
    graph = reference_graph(model, output="c2")
    assert [l["type"] for l in graph] == ["conv2d", "maxpool", "conv2d"] and graph[-1]["act"] == "relu"
    for target in (3, np.array([0, 4, 2])):
        R, report = ex(x, target=target, return_layers=True)
        expected, a = reference(model, x, lambda out: out * onehot(target, 5).reshape(-1, 1, 1, 5), rule,
                                output="c2")
        _check_nonzero(expected, f"{rule!r} target={target}")
        assert_close(R, expected, TOL, f"{rule!r} target={target}")
        assert "head" not in report and "gap" not in report and "c2" in report
        np.testing.assert_allclose(report.output, (a * onehot(target, 5).reshape(-1, 1, 1, 5)).reshape(3, -1).sum(1),
                                   rtol=1e-12)


def test_hidden_layer_mask_matches_truncated_reference(K):
    model = _build(K, hidden_cnn)
    x = inputs_for(model, n=2, seed=9)[0]
    rule = lrp_grad.Epsilon(1e-6)
    mask = np.zeros((3, 3, 5))
    mask[:2, 1:, [1, 3]] = 1.0
    mask[2, 0, 0] = -2.0
    R = lrp_grad.explain(model, x, target=mask, rule=rule, output="c2")
    expected, _ = reference(model, x, lambda out: out * mask, rule, output="c2")
    _check_nonzero(expected, "mask")
    assert_close(R, expected, TOL, "mask on c2")


def test_hidden_layer_of_one_branch_of_two_inputs(K):
    """A layer of the image branch: the metadata input gets exactly zero relevance and the
    image's is the reference of the image branch alone; the other branch likewise."""
    model = _build(K, two_input, merge="concat")
    xs = inputs_for(model, n=2, seed=10)
    rule = lrp_grad.Epsilon(1e-6)
    R = lrp_grad.explain(model, xs, target=1, rule=rule, output="img_conv")
    (e_img, e_meta), _ = reference(model, xs, lambda out: out * onehot(1, 4), rule, output="img_conv")
    _check_nonzero(e_img, "img_conv")
    assert_close(R[0], e_img, TOL, "img_conv: image")
    np.testing.assert_array_equal(R[1], np.zeros_like(xs[1]))
    np.testing.assert_array_equal(e_meta, np.zeros_like(xs[1]))
    R = lrp_grad.explain(model, xs, target=2, rule=rule, output="meta_dense")
    (e_img, e_meta), _ = reference(model, xs, lambda out: out * onehot(2, 4), rule, output="meta_dense")
    _check_nonzero(e_meta, "meta_dense")
    assert_close(R[1], e_meta, TOL, "meta_dense: meta")
    np.testing.assert_array_equal(R[0], np.zeros_like(xs[0]))


# ------------------------------------------------------------------------------------------------
# 5. Several outputs


def test_multi_output_by_name_and_index_equals_single_output_twin(K):
    model, cls_twin, reg_twin = _build(K, multi_output)
    x = inputs_for(model, n=3, seed=11)[0]
    rule = lrp_grad.AlphaBeta(2, 1)
    target = np.array([2, 0, 1])
    cls = lrp_grad.Explainer(cls_twin, rule=rule)(x, target=target)
    reg = lrp_grad.Explainer(reg_twin, rule=rule)(x)
    expected, _ = reference(cls_twin, x, lambda out: out * onehot(target, 3), rule)  # softmax skipped
    assert_close(cls, expected, TOL, "cls twin")
    for output in ("cls", 0):
        ex = lrp_grad.Explainer(model, rule=rule, output=output)
        assert ex.output_name == "cls" and ex.is_classifier
        np.testing.assert_allclose(ex(x, target=target), cls, rtol=1e-12, atol=1e-15, err_msg=repr(output))
    # no target: the predicted class, from the logits (a softmax does not change the argmax)
    predicted = np.asarray(cls_twin(x)).argmax(1)
    np.testing.assert_allclose(ex(x), lrp_grad.Explainer(cls_twin, rule=rule)(x, target=predicted),
                               rtol=1e-12, atol=1e-15)
    for output in ("reg", -1):
        ex = lrp_grad.Explainer(model, rule=rule, output=output)
        assert ex.output_name == "reg" and ex.output_shape == (1,)
        np.testing.assert_allclose(ex(x), reg, rtol=1e-12, atol=1e-15, err_msg=repr(output))


def test_dict_inputs_and_outputs_are_named_by_their_keys(K):
    """A model built on dicts (``Model({"meta": a, "pixels": b}, {"score": ..., "size": ...})``)
    is fed and explained by those keys; output layers' names still select outputs."""
    import warnings

    L = K.layers
    a = K.Input((3,), name="meta", dtype="float64")
    b = K.Input((4,), name="pixels", dtype="float64")
    h = L.Concatenate(dtype="float64")([L.Dense(3, activation="relu", name="enc", dtype="float64")(b), a])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Keras 3 warns unless input keys equal the tensor names
        model = randomize(K.Model({"pixels": b, "meta": a},
                                  {"score": L.Dense(2, name="score_layer", dtype="float64")(h),
                                   "size": L.Dense(1, name="size_layer", dtype="float64")(h)}), seed=3)
    rng = np.random.default_rng(3)
    x = {"pixels": rng.normal(size=(2, 4)), "meta": rng.normal(size=(2, 3))}
    with pytest.raises(lrp_grad.UnsupportedModelError, match=r"has 2 outputs \('score', 'size'\)"):
        lrp_grad.Explainer(model)
    ex = lrp_grad.Explainer(model, rule=lrp_grad.Z(), output="score")
    assert ex.input_names == ("meta", "pixels") and ex.output_name == "score"
    R = ex(x, target=1)
    assert sorted(R) == ["meta", "pixels"] and R["meta"].shape == (2, 3) and R["pixels"].shape == (2, 4)
    np.testing.assert_array_equal(lrp_grad.Explainer(model, rule=lrp_grad.Z(), output="score_layer")(x, target=1)["meta"],
                                  R["meta"])
    listed = ex([x["meta"], x["pixels"]], target=1)  # a list follows the model's input order
    np.testing.assert_array_equal(listed[0], R["meta"])
    # LRP-0 on a ReLU net is gradient x input, per input
    xt = {k: tf.constant(v) for k, v in x.items()}
    with tf.GradientTape() as tape:
        tape.watch(list(xt.values()))
        y = model(xt)["score"][:, 1]
    grads = tape.gradient(y, xt)
    for k in x:
        np.testing.assert_allclose(R[k], grads[k].numpy() * x[k], rtol=1e-10, atol=1e-12, err_msg=k)
    size = lrp_grad.Explainer(model, rule=lrp_grad.Z(), output="size")(x)
    assert sorted(size) == ["meta", "pixels"]


def test_multi_output_without_output_is_refused_with_the_names(K):
    model, _, _ = _build(K, multi_output)
    x = inputs_for(model, n=1)[0]
    for call in (lambda: lrp_grad.Explainer(model), lambda: lrp_grad.explain(model, x)):
        with pytest.raises(lrp_grad.UnsupportedModelError, match=r"has 2 outputs \('cls', 'reg'\).*output="):
            call()


# ------------------------------------------------------------------------------------------------
# 6. Errors, each naming what is wrong


def _error_cases(K):
    two = _build(K, two_input, merge="concat")
    xi, xm = inputs_for(two, n=2)
    ex2 = lrp_grad.Explainer(two)
    seg = _build(K, segmenter, **SEGMENTERS["transpose"])
    xs = inputs_for(seg, n=2)[0]
    exs = lrp_grad.Explainer(seg)
    hid = _build(K, hidden_cnn)
    xh = inputs_for(hid, n=2)[0]
    multi, _, _ = _build(K, multi_output)
    E_IN, E_T, E_M = lrp_grad.InvalidInputError, lrp_grad.InvalidTargetError, lrp_grad.UnsupportedModelError
    return {
        "list of 1 for 2 inputs": (lambda: ex2([xi]), E_IN,
                                   r"x is a list of 1 arrays; model .* has 2 inputs \('image', 'meta'\)"),
        "list of 3 for 2 inputs": (lambda: ex2([xi, xm, xm]), E_IN, r"list of 3 arrays.*2 inputs"),
        "one array for 2 inputs": (lambda: ex2(xi), E_IN, r"has 2 inputs \('image', 'meta'\); pass x as a list"),
        "dict missing a key": (lambda: ex2({"image": xi}), E_IN, r"keys \['image'\].*\(missing \['meta'\]\)"),
        "dict with an unknown key": (lambda: ex2({"image": xi, "meta": xm, "metadata": xm}), E_IN,
                                     r"\(unknown \['metadata'\]\)"),
        "wrong shape of one input": (lambda: ex2([xi, xm[:, :2]]), E_IN,
                                     r"input 'meta' has shape \(2, 2\) .*expects \(batch, 3\): axis 1 is 2"),
        "wrong rank of one input": (lambda: ex2({"image": xi[0], "meta": xm}), E_IN,
                                    r"input 'image' has shape \(6, 6, 2\) .*expects a batch"),
        "batch lengths differ": (lambda: ex2([xi, xm[:1]]), E_IN,
                                 r"batches differ in length \('image': 2, 'meta': 1\)"),
        "mask of wrong channels": (lambda: exs(xs, target=np.ones((8, 8, 2))), E_T,
                                   r"mask of shape \(8, 8, 2\) .*does not broadcast .*'seg'.*axis 3 is 2"),
        "mask of wrong rank": (lambda: exs(xs, target=np.ones((8, 3))), E_T,
                               r"mask has shape \(8, 3\) \(rank 2\) but output 'seg' is \(None, 8, 8, 3\)"),
        "mask of wrong batch": (lambda: exs(xs, target=np.ones((3, 8, 8, 3))), E_T,
                                r"per-sample mask needs n = 2 rows \(axis 0 is 3\)"),
        "mask with NaN": (lambda: exs(xs, target=np.full((8, 8, 3), np.nan)), E_T, r"mask contains NaN"),
        "segmentation without target": (lambda: exs(xs), E_T,
                                        r"output 'seg' has shape \(None, 8, 8, 3\), which has no predicted class"),
        "unknown output name": (lambda: lrp_grad.Explainer(multi, output="score"), E_M,
                                r"output='score' is neither an output of model .* \('cls', 'reg'\)"),
        "output index out of range": (lambda: lrp_grad.Explainer(multi, output=2), E_M,
                                      r"output=2 is out of range: .* 2 output\(s\) \('cls', 'reg'\)"),
        "unknown layer name": (lambda: lrp_grad.Explainer(hid, output="c3"), E_M,
                               r"output='c3' is neither an output .* nor one of its layers \('c1', 'pool', 'c2'"),
        "output is an input": (lambda: lrp_grad.Explainer(two, output="meta"), E_M, r"output='meta' is an input of model 'two_input_concat'; there is nothing to explain"),
        "channel out of range for a hidden layer": (
            lambda: lrp_grad.Explainer(hid, output="c2")(xh, target=5), E_T,
            r"target\[0\] = 5 is out of range .* 5 channels on the last axis of output 'c2' \(valid: 0..4\)"),
        "per-sample channel out of range": (
            lambda: lrp_grad.Explainer(hid, output="c2")(xh, target=np.array([0, -1])), E_T,
            r"target\[1\] = -1 is out of range"),
        "float (n,) target for a classifier": (
            lambda: ex2([xi, xm], target=np.array([0.0, 2.0])), E_T,
            r"float array of shape \(2,\), which is ambiguous for a classifier"),
        "integer target for a regression": (
            lambda: lrp_grad.Explainer(multi, output="reg")(inputs_for(multi, n=2)[0], target=1), E_T,
            r"target\[0\] = 1 is out of range"),
    }


ERROR_CASES = (
    "list of 1 for 2 inputs", "list of 3 for 2 inputs", "one array for 2 inputs", "dict missing a key",
    "dict with an unknown key", "wrong shape of one input", "wrong rank of one input", "batch lengths differ",
    "mask of wrong channels", "mask of wrong rank", "mask of wrong batch", "mask with NaN",
    "segmentation without target", "unknown output name", "output index out of range", "unknown layer name",
    "output is an input", "channel out of range for a hidden layer", "per-sample channel out of range",
    "float (n,) target for a classifier", "integer target for a regression",
)


@pytest.mark.parametrize("case", ERROR_CASES)
def test_errors_name_what_is_wrong(K, case):
    cases = _error_cases(K)
    assert tuple(cases) == ERROR_CASES
    call, error, match = cases[case]
    with pytest.raises(error, match=match):
        call()


# ------------------------------------------------------------------------------------------------
# 7. XLA equals eager; no mutation


def test_jit_compile_equals_eager_two_inputs(K):
    """Mixed input signs (two plans' worth of input handling in one pass). Epsilon: alpha-beta's
    rounding noise on signed inputs (see test_two_inputs_float32_match_float64_reference) would
    make XLA's different operation order differ by ~1e-11 in float64."""
    model = _build(K, two_input, merge="concat")
    xs = inputs_for(model, n=3, seed=15, nonneg_images=True)
    rule = lrp_grad.Epsilon(1e-6)
    eager = lrp_grad.Explainer(model, rule=rule, jit_compile=False)(xs, target=np.array([0, 1, 2]))
    jit = lrp_grad.Explainer(model, rule=rule, jit_compile=True)(xs, target=np.array([0, 1, 2]))
    for name, a, b in zip(("image", "meta"), jit, eager):
        assert_close(a, b, 1e-12, f"jit vs eager, input {name!r}")


@pytest.mark.parametrize("variant", ["upsample_softmax",
                                     pytest.param("transpose_fused_softmax", marks=pytest.mark.slow)])
def test_jit_compile_equals_eager_segmentation(K, variant):
    model = _build(K, segmenter, **SEGMENTERS[variant])
    x = inputs_for(model, n=3, seed=16)[0]
    rule = lrp_grad.Epsilon(1e-6)
    each = np.stack([region_mask(), region_mask(cls=0), region_mask(cls=2, rows=(0, 8), cols=(0, 3))])
    eager = lrp_grad.Explainer(model, rule=rule, jit_compile=False)(x, target=each)
    jit = lrp_grad.Explainer(model, rule=rule, jit_compile=True)(x, target=each)
    assert_close(jit, eager, 1e-12, "jit vs eager")


def _state(model, x):
    """Weights (copies), predictions on ``x`` and the layer objects of a model."""
    import tensorflow as tf

    preds = [np.asarray(p) for p in tf.nest.flatten(model(x))]
    return [w.copy() for w in model.get_weights()], preds, list(model.layers)


def _assert_same_state(before, after, what):
    (w0, p0, l0), (w1, p1, l1) = before, after
    assert len(l0) == len(l1) and all(a is b for a, b in zip(l0, l1)), f"{what}: the layers changed"
    assert len(w0) == len(w1), f"{what}: the number of weights changed"
    for a, b in zip(w0, w1):
        assert a.dtype == b.dtype and np.array_equal(a, b), f"{what}: a weight changed"
    for a, b in zip(p0, p1):
        assert a.dtype == b.dtype and np.array_equal(a, b), f"{what}: the predictions changed"


def test_models_are_never_mutated(K):
    """Weights and predictions bit-identical to the record made when each model was built: after
    this test's own calls, and after every test of this file that ran before it."""
    two = _build(K, two_input, merge="add")
    xs = inputs_for(two, n=2, seed=12)
    ex = lrp_grad.Explainer(two, rule=lrp_grad.AlphaBeta(2, 1))
    ex(dict(zip(ex.input_names, xs)), target=np.array([[0, 2], [1, 0]]), return_layers=True)
    lrp_grad.explain(two, xs, output="img_conv", target=np.ones((4, 4, 4)))
    seg = _build(K, segmenter, **SEGMENTERS["transpose_fused_softmax"])
    activation = seg.get_layer("seg").activation
    lrp_grad.explain(seg, inputs_for(seg, n=2, seed=13)[0], target=region_mask().astype(bool), rule=lrp_grad.Z())
    assert seg.get_layer("seg").activation is activation
    checked = 0
    for (package, builder, kw), (built, state) in _BUILT.items():
        if package != K.__name__:
            continue
        model = built[0] if isinstance(built, tuple) else built
        probe = inputs_for(model, n=2, seed=99)
        _assert_same_state(state, _state(model, probe if len(probe) > 1 else probe[0]), f"{builder}{kw}")
        checked += 1
    assert checked >= 2
