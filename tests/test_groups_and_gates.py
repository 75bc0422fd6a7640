"""Grouped convolutions, LayerScale / CustomScaleLayer, gates read from the graph, Keras 3 activations.

Everything against the float64 numpy reference (tests/npref.py) where it has the layers, in both
Keras packages (``K``), float64 models:

* grouped ``Conv2D`` / ``Conv1D`` (``groups=2``, ``3`` and one input channel per group with a
  depth multiplier; strides, 'same' / 'valid' / 'causal', dilation; fused ReLU) for every rule of
  the library, on signed and non-negative inputs; BatchNorm folded into a grouped conv (and not
  folded forward into one);
* ConvNeXt's LayerScale and InceptionResNetV2's CustomScaleLayer;
* products: squeeze-and-excitation gates (also at a 1x1 feature map, where gate and signal have
  the same shape), as a Multiply layer and as a raw ``*``; hand-written hard-swish / swish
  (relevance passes to ``x`` as through the activation); the refusals, by their message;
* the Keras 3 activations (and tf-keras' own) as Activation layers and fused ``activation=``;
  the per-layer report of an Activation('linear') that reads a shared tensor.

The grouped-conv grid runs a diagonal by default (every rule and every configuration once per
package); ``-m slow`` runs all of it.
"""
import re

import numpy as np
import pytest
import tensorflow as tf

import lrp_grad
import npref
from lrp_grad import handlers, rewrite
from lrp_grad.frontends import walk
from kit import (PACKAGES, WEIGHT_FREE, application_layers, assert_close, npref_explain, npref_rule, ops_of,
                 package, randomize, to_npref_graph)

F64 = dict(dtype="float64")
RULES = [lrp_grad.Z(), lrp_grad.Epsilon(1e-3), lrp_grad.AlphaBeta(2, 1), lrp_grad.ZPlus(), lrp_grad.Flat(),
         lrp_grad.WSquare(), lrp_grad.ZBox(-1.0, 1.0, bias=True), lrp_grad.Gamma(0.25)]
TOL = 1e-10
#: For networks with GELU: TensorFlow's float64 Gelu kernel is off the exact ``z * Phi(z)`` by up to
#: 5e-9 absolute (measured over [-6, 6]; every other activation agrees to ~1e-15), which the
#: epsilon/z ratios of small logits amplify to ~1e-6 relative in the relevance (measured). With
#: TensorFlow's GELU values in the reference the relevance agrees to :data:`TOL`.
GELU_TOL = 1e-5
IDS = {"keras": "keras3", "tf_keras": "tf_keras"}


def _model(K, inp, out, seed=0):
    return randomize(K.Model(inp, out), seed)


def check_against_npref(model, rule, seed=0, signs=(True, False), n=3, tol=TOL, what=""):
    """The library's relevance equals npref's, for signed and non-negative inputs; returns the
    per-layer report of the last call."""
    rng = np.random.default_rng(seed)
    ex = lrp_grad.Explainer(model, rule=rule)
    for signed in signs:
        x = rng.uniform(-1 if signed else 0, 1, (n,) + tuple(model.input_shape[1:]))
        target = rng.integers(0, model.output_shape[-1], n)
        R, report = ex(x, target=target, return_layers=True)
        assert_close(R, npref_explain(model, x, target, rule), tol, f"{what} {rule!r} signed={signed}")
    return report


# ---------------------------------------------------------------------------------- groups --

#: name -> (rank, input shape, Conv kwargs). ``bias`` alternates so that the relevance of both is
#: checked for every kind of grouping.
GROUPED = {
    "2d_g2_same_relu": (2, (6, 6, 4), dict(filters=6, kernel_size=3, padding="same", groups=2,
                                           activation="relu")),
    "2d_g3_valid_s2_nobias": (2, (7, 7, 6), dict(filters=9, kernel_size=(3, 2), strides=2, groups=3,
                                                 use_bias=False)),
    "2d_gC_mult2_same_dil2": (2, (6, 6, 4), dict(filters=8, kernel_size=2, padding="same", dilation_rate=2,
                                                 groups=4)),
    "2d_gC_mult2_valid_s2_relu_nobias": (2, (7, 7, 4), dict(filters=8, kernel_size=3, strides=2, groups=4,
                                                            activation="relu", use_bias=False)),
    "1d_g2_causal_dil2_relu": (1, (10, 4), dict(filters=6, kernel_size=3, padding="causal", dilation_rate=2,
                                                groups=2, activation="relu")),
    "1d_g3_same_s2_nobias": (1, (9, 6), dict(filters=3, kernel_size=2, padding="same", strides=2, groups=3,
                                             use_bias=False)),
    "1d_gC_mult2_valid": (1, (8, 4), dict(filters=8, kernel_size=3, groups=4)),
}


def grouped_model(K, name):
    rank, shape, kw = GROUPED[name]
    L = K.layers
    inp = K.Input(shape, **F64)
    conv = (L.Conv2D if rank == 2 else L.Conv1D)(name="grouped", **kw, **F64)
    h = L.Flatten(**F64)(conv(inp))
    return _model(K, inp, L.Dense(4, **F64)(h), seed=len(name))


def grouped_grid():
    """(pkg, config, rule, signed input): in the default run rule k with config ``(k + p) % n`` of
    package p, signed for even ``k + p`` and non-negative for odd (so each package runs every rule
    and every config, and each rule sees both signs over the two packages); the rest is slow."""
    params, names = [], list(GROUPED)
    for p, pkg in enumerate(PACKAGES):
        for k, rule in enumerate(RULES):
            for j, name in enumerate(names):
                for signed in (True, False):
                    default = j == (k + p) % len(names) and signed == ((k + p) % 2 == 0)
                    params.append(pytest.param(pkg, name, rule, signed, marks=() if default else (pytest.mark.slow,),
                                               id=f"{IDS[pkg]}-{name}-{rule!r}-{'signed' if signed else 'nonneg'}"))
    return params


@pytest.mark.parametrize("pkg, name, rule, signed", grouped_grid())
def test_grouped_conv_matches_float64_reference(pkg, name, rule, signed):
    model = grouped_model(package(pkg), name)
    layers = to_npref_graph(model)
    assert layers[0]["groups"] == GROUPED[name][2]["groups"]
    x = np.random.default_rng(1).uniform(-1, 1, (2,) + model.input_shape[1:])
    np.testing.assert_allclose(npref.forward(layers, x)[-1], np.asarray(model(x)), rtol=1e-10, atol=1e-12)
    check_against_npref(model, rule, signs=(signed,), what=name)


@pytest.mark.slow
def test_grouped_conv_in_a_deeper_network(K):
    """Grouped convs on hidden (signed and ReLU) inputs, several kinds in a row (the default run
    has each kind alone, on signed and non-negative inputs)."""
    L = K.layers
    inp = K.Input((8, 8, 4), **F64)
    h = L.Conv2D(6, 3, padding="same", groups=2, activation="relu", **F64)(inp)
    h = L.Conv2D(12, 3, strides=2, groups=3, **F64)(h)                            # signed
    h = L.Conv2D(24, 2, padding="same", dilation_rate=2, groups=12, activation="relu", **F64)(h)
    h = L.Flatten(**F64)(L.Conv2D(8, 2, strides=2, padding="same", groups=4, **F64)(h))
    model = _model(K, inp, L.Dense(4, **F64)(h))
    check_against_npref(model, lrp_grad.AlphaBeta(2, 1), signs=(True,), what="deep grouped")


def _folded(ex):
    return [s.node.label for s in ex.passes.plan(False).steps if s.node.params is not None]


def _step(ex, label):
    (step,) = [s for s in ex.passes.plan(False).steps if s.node.label == label]
    return step


def _bn_affine(bn):
    gamma, beta, mean, var = (np.asarray(w, np.float64) for w in bn.get_weights())
    scale = gamma / np.sqrt(var + bn.epsilon)
    return scale, beta - mean * scale


def reference(layers, x, target, rule):
    """npref relevance of hand-made layer dicts, under lrp_grad's single-rule policy (weight-free
    linear layers get Epsilon(1e-6) unless the rule is Z or Epsilon)."""
    logits = npref.forward(layers, x)[-1]
    r_out = np.zeros_like(logits)
    r_out[np.arange(len(x)), target] = logits[np.arange(len(x)), target]
    per = {}
    if not isinstance(rule, (lrp_grad.Z, lrp_grad.Epsilon)):
        per = {i: npref_rule(lrp_grad.Epsilon(1e-6)) for i, l in enumerate(layers) if l["type"] in WEIGHT_FREE}
    return npref.lrp(layers, x, r_out, npref_rule(rule), layer_rules=per)[0]


@pytest.mark.parametrize("rank", [2, 1])
def test_batchnorm_folds_into_a_grouped_conv(K, rank):
    L = K.layers
    inp = K.Input((6, 6, 4) if rank == 2 else (9, 6), **F64)
    conv = (L.Conv2D(6, 3, padding="same", groups=2, name="gconv", **F64) if rank == 2 else
            L.Conv1D(6, 2, padding="causal", groups=3, name="gconv", **F64))
    h = L.ReLU(**F64)(L.BatchNormalization(name="bn", **F64)(conv(inp)))
    model = _model(K, inp, L.Dense(3, **F64)(L.Flatten(**F64)(h)))
    x = np.random.default_rng(2).uniform(-1, 1, (3,) + model.input_shape[1:])
    target = np.array([0, 1, 2])
    # the unfolded model, its BatchNorm folded by hand into the grouped kernel (per output channel)
    layers = to_npref_graph(model)
    assert [l["type"] for l in layers] == ["conv2d" if rank == 2 else "conv1d", "batchnorm", "relu", "flatten",
                                           "dense"]
    scale, shift = _bn_affine(model.get_layer("bn"))
    layers[0] = dict(layers[0], W=layers[0]["W"] * scale, b=layers[0]["b"] * scale + shift)
    layers[1] = {"type": "identity"}
    np.testing.assert_allclose(npref.forward(layers, x)[-1], np.asarray(model(x)), rtol=1e-10, atol=1e-12)
    rule = lrp_grad.AlphaBeta(2, 1)
    ex = lrp_grad.Explainer(model, rule=rule)
    assert _folded(ex) == ["gconv"], "the BatchNorm was not folded into the grouped conv"
    assert _step(ex, "bn").handler is handlers.IDENTITY and "bn" not in ex.rules
    assert_close(ex(x, target=target), reference(layers, x, target, rule), TOL, f"folded {rule!r}")


def test_batchnorm_is_not_folded_forward_into_a_grouped_conv(K):
    """Conv -> ReLU -> BN -> grouped Conv: forward folding (into the input channels) is skipped for
    groups != 1; the BatchNorm stays a norm layer under its own rule."""
    L = K.layers
    inp = K.Input((6, 6, 3), **F64)
    h = L.Conv2D(4, 3, activation="relu", name="first", **F64)(inp)
    h = L.BatchNormalization(name="bn", **F64)(h)
    h = L.Conv2D(6, 2, groups=2, use_bias=False, name="gconv", **F64)(h)
    model = _model(K, inp, L.Dense(3, **F64)(L.Flatten(**F64)(h)))
    rule = lrp_grad.AlphaBeta(2, 1)
    ex = lrp_grad.Explainer(model, rule=rule)
    assert _folded(ex) == [] and _step(ex, "bn").handler is not handlers.IDENTITY
    assert ex.rules["bn"] == lrp_grad.Epsilon(1e-6) and ex.rules["gconv"] == rule
    check_against_npref(model, rule, signs=(True,), what="bn before grouped conv")


# --------------------------------------------------------- LayerScale, CustomScaleLayer --

def layer_scale_model(K):
    """A ConvNeXt-like block: conv, pointwise MLP, LayerScale, residual add (GELU: see
    :func:`test_gelu_passes_relevance`)."""
    L, A = K.layers, application_layers(K)
    inp = K.Input((5, 5, 3), **F64)
    s = L.Conv2D(4, 3, padding="same", **F64)(inp)
    b = L.Conv2D(8, 1, activation="swish", **F64)(s)
    b = A.LayerScale(0.1, 4, name="layer_scale", **F64)(L.Conv2D(4, 1, **F64)(b))
    h = L.GlobalAveragePooling2D(**F64)(L.Add(**F64)([s, b]))
    return _model(K, inp, L.Dense(3, **F64)(h), seed=3)


def custom_scale_model(K, scale):
    """An InceptionResNetV2-like join: ``x + scale * branch(x)``, then ReLU."""
    L, A = K.layers, application_layers(K)
    inp = K.Input((5, 5, 3), **F64)
    x = L.Conv2D(4, 3, padding="same", activation="relu", **F64)(inp)
    r = L.Conv2D(4, 3, padding="same", **F64)(L.Conv2D(3, 1, activation="relu", **F64)(x))
    h = L.Activation("relu", **F64)(A.CustomScaleLayer(scale, name="scaled_join", **F64)([x, r]))
    return _model(K, inp, L.Dense(3, **F64)(L.Flatten(**F64)(h)), seed=4)


SCALE_RULES = [lrp_grad.Z(), lrp_grad.Epsilon(1e-3), lrp_grad.AlphaBeta(2, 1)]


@pytest.mark.parametrize("rule", SCALE_RULES, ids=repr)
def test_layer_scale_matches_float64_reference(K, rule):
    model = layer_scale_model(K)
    assert any(l["type"] == "layerscale" for l in to_npref_graph(model))
    report = check_against_npref(model, rule, signs=(True,), what="LayerScale")
    names = list(report)  # relevance passes: LayerScale's output holds what its input conv's does
    before = names[names.index("layer_scale") - 1]
    np.testing.assert_allclose(report["layer_scale"], report[before], rtol=1e-12)
    assert np.abs(report["layer_scale"]).min() > 0


@pytest.mark.parametrize("rule, scale", [(lrp_grad.Z(), 0.17), (lrp_grad.Epsilon(1e-3), -0.6),
                                         (lrp_grad.AlphaBeta(2, 1), 0.17), (lrp_grad.AlphaBeta(2, 1), -0.6)],
                         ids=lambda v: repr(v) if not isinstance(v, float) else str(v))
def test_custom_scale_layer_matches_float64_reference(K, rule, scale):
    model = custom_scale_model(K, scale)
    (join,) = [l for l in to_npref_graph(model) if l["type"] == "add"]
    assert join["weights"] == [1.0, scale]
    check_against_npref(model, rule, signs=(True,), what=f"CustomScaleLayer({scale})")


@pytest.mark.parametrize("rule", [lrp_grad.AlphaBeta(2, 1), lrp_grad.WSquare(), lrp_grad.Gamma(0.25)], ids=repr)
def test_custom_scale_layer_takes_the_rule_it_is_given(K, rule):
    """With a composite giving the join (family 'merge') another rule too, not Epsilon; rules that
    read the weights (w^2) see the join's weights (1, scale)."""
    model = custom_scale_model(K, -0.6)
    ex = lrp_grad.Explainer(model, rule=lrp_grad.Composite([("linear", rule)]))
    assert ex.rules["scaled_join"] == rule
    rng = np.random.default_rng(7)
    x = rng.uniform(-1, 1, (3, 5, 5, 3))
    target = np.array([2, 0, 1])
    layers = to_npref_graph(model)
    expected = npref.lrp(layers, x, _logit_relevance(layers, x, target), npref_rule(rule))[0]
    assert_close(ex(x, target=target), expected, TOL, f"CustomScaleLayer under {rule!r}")


def _logit_relevance(layers, x, target):
    logits = npref.forward(layers, x)[-1]
    r = np.zeros_like(logits)
    r[np.arange(len(x)), target] = logits[np.arange(len(x)), target]
    return r


# ---------------------------------------------------------------------------- gates --

def _se_tail(K, h, g, form, order):
    """``h * g`` as a Multiply layer or a raw product, in either order."""
    a, b = (h, g) if order == "hg" else (g, h)
    return K.layers.Multiply(name="gated", **F64)([a, b]) if form == "layer" else a * b


def se_model_1x1(K, form, order):
    """Squeeze-and-excitation at a 1x1 feature map: gate and signal both have shape (1, 1, 5)."""
    L = K.layers
    inp = K.Input((4, 4, 3), **F64)
    h = L.Conv2D(4, 3, strides=2, padding="same", activation="relu", **F64)(inp)       # 2x2
    h = L.Conv2D(5, 2, strides=2, padding="same", activation="relu", **F64)(h)         # 1x1
    s = L.GlobalAveragePooling2D(keepdims=True, **F64)(h)
    g = L.Conv2D(5, 1, activation="sigmoid", name="excite", **F64)(L.Conv2D(2, 1, activation="relu", **F64)(s))
    y = _se_tail(K, h, g, form, order)
    return _model(K, inp, L.Dense(3, **F64)(L.Flatten(**F64)(y)), seed=5)


@pytest.mark.parametrize("order", ["hg", "gh"])
@pytest.mark.parametrize("form", ["layer", "raw"])
def test_se_gate_at_a_1x1_feature_map(K, form, order):
    model = se_model_1x1(K, form, order)
    (mult,) = [l for l in to_npref_graph(model) if l["type"] == "multiply"]
    assert mult["signal"] == (0 if order == "hg" else 1)      # the library's reading of the graph
    rule = lrp_grad.Z() if order == "hg" else lrp_grad.AlphaBeta(2, 1)
    report = check_against_npref(model, rule, signs=(True,), what=f"SE 1x1 {form} {order}")
    np.testing.assert_array_equal(report["excite"], 0.0)     # no relevance through the gate


def test_se_gate_with_a_hand_written_hard_sigmoid(K):
    """``relu6(z + 3) * (1/6)`` (MobileNetV3) is a gate: the reference is the same network with
    Keras 3's Activation('hard_sigmoid') (which is relu6(z + 3) / 6; tf-keras' is 0.2 z + 0.5)."""

    def build(P, hand):
        L = P.layers
        inp = P.Input((4, 4, 3), **F64)
        h = L.Conv2D(4, 3, padding="same", activation="relu", **F64)(inp)
        s = L.GlobalAveragePooling2D(keepdims=True, **F64)(h)
        z = L.Conv2D(4, 1, name="excite", **F64)(s)
        g = L.ReLU(6.0, **F64)(z + 3.0) * (1.0 / 6.0) if hand else L.Activation("hard_sigmoid", **F64)(z)
        return _model(P, inp, L.Dense(3, **F64)(L.Flatten(**F64)(h * g)), seed=6)

    hand, twin = build(K, True), build(package("keras"), False)
    twin.set_weights(hand.get_weights())
    x = np.random.default_rng(4).uniform(-1, 1, (3, 4, 4, 3))
    np.testing.assert_allclose(np.asarray(twin(x)), np.asarray(hand(x)), rtol=1e-12)
    (mult,) = [l for l in to_npref_graph(twin) if l["type"] == "multiply"]
    assert mult["signal"] == 0
    rule = lrp_grad.AlphaBeta(2, 1)
    R, report = lrp_grad.explain(hand, x, target=1, rule=rule, return_layers=True)
    np.testing.assert_array_equal(report["excite"], 0.0)
    assert_close(R, npref_explain(twin, x, 1, rule), TOL, f"hand-written hard sigmoid gate {rule!r}")


@pytest.mark.parametrize("form", ["Softmax", "Activation", "ops", "fused"])
def test_softmax_gate_is_read_from_the_graph(K, form):
    """An attention mask ``h * softmax(z)`` of h's own shape: the softmax input is the gate."""
    L = K.layers
    inp = K.Input((4, 4, 3), **F64)
    h = L.Conv2D(4, 3, padding="same", activation="relu", **F64)(inp)
    if form == "fused":
        g = L.Conv2D(4, 1, activation="softmax", name="att", **F64)(h)
    else:
        z = L.Conv2D(4, 1, name="att", **F64)(h)
        g = {"Softmax": lambda: L.Softmax(**F64)(z), "Activation": lambda: L.Activation("softmax", **F64)(z),
             "ops": lambda: K.ops.softmax(z) if K.__name__ == "keras" else tf.nn.softmax(z)}[form]()
    model = _model(K, inp, L.Dense(3, **F64)(L.Flatten(**F64)(g * h)), seed=17)
    (step,) = [s for s in rewrite.build_plan(model, lrp_grad.Z()).steps if s.handler.kind == "gate"]
    assert step.context.gate == 0                                   # g * h: the gate comes first
    if form != "Activation":
        return  # the relevance of a gated product: once here, and in the SE tests above
    x = np.random.default_rng(18).uniform(-1, 1, (2, 4, 4, 3))
    R, report = lrp_grad.explain(model, x, target=0, rule=lrp_grad.Z(), return_layers=True)
    np.testing.assert_array_equal(report["att"], 0.0)
    assert np.abs(R).sum() > 0


def _relu6(K, t):
    return K.ops.relu6(t) if K.__name__ == "keras" else tf.nn.relu6(t)


HARD_SWISH = {  # name -> h -> hard_swish(h) written by hand
    "layer_relu6_scale": lambda K, h: h * (K.layers.ReLU(6.0, **F64)(h + 3.0) * (1.0 / 6.0)),
    "multiply_layer": lambda K, h: K.layers.Multiply(**F64)([h, K.layers.ReLU(6.0, **F64)(h + 3.0) * (1.0 / 6.0)]),
    "gate_first": lambda K, h: (K.layers.ReLU(6.0, **F64)(h + 3.0) * (1.0 / 6.0)) * h,
    "product_then_divide": lambda K, h: h * K.layers.ReLU(6.0, **F64)(h + 3.0) / 6.0,
    "ops_relu6": lambda K, h: h * (_relu6(K, h + 3.0) / 6.0),
}
SWISH = {
    "ops_sigmoid": lambda K, h: h * ops_of(K).sigmoid(h),
    "sigmoid_first": lambda K, h: ops_of(K).sigmoid(h) * h,
    "multiply_layer": lambda K, h: K.layers.Multiply(**F64)([h, K.layers.Activation("sigmoid", **F64)(h)]),
}


def _elementwise_product_model(K, make):
    L = K.layers
    inp = K.Input((6,), **F64)
    h = L.Dense(5, name="pre", **F64)(inp)
    return _model(K, inp, L.Dense(3, name="head", **F64)(make(K, h)), seed=8)


def _twin_reference(model, act, x, target, rule):
    """npref of Dense(act) -> Dense with the model's weights: the product is that activation."""
    pre, head = model.get_layer("pre"), model.get_layer("head")
    layers = [{"type": "dense", "W": pre.kernel.numpy(), "b": pre.bias.numpy(), "act": act},
              {"type": "dense", "W": head.kernel.numpy(), "b": head.bias.numpy()}]
    return reference(layers, x, target, rule), npref.forward(layers, x)[-1]


PRODUCTS = [(n, "hard_silu") for n in HARD_SWISH] + [(n, "swish") for n in SWISH]


@pytest.mark.parametrize("name,act", PRODUCTS, ids=[f"{a}-{n}" for n, a in PRODUCTS])
def test_hand_written_activation_products_pass_relevance(K, name, act):
    make = HARD_SWISH[name] if act == "hard_silu" else SWISH[name]
    model = _elementwise_product_model(K, make)
    x = np.random.default_rng(9).normal(size=(4, 6)) * 2
    target = np.array([0, 1, 2, 0])
    rule = [lrp_grad.Epsilon(1e-3), lrp_grad.AlphaBeta(2, 1)][PRODUCTS.index((name, act)) % 2]
    expected, logits = _twin_reference(model, act, x, target, rule)
    np.testing.assert_allclose(np.asarray(model(x)), logits, rtol=1e-12, atol=1e-12)
    R, report = lrp_grad.explain(model, x, target=target, rule=rule, return_layers=True)
    assert_close(R, expected, TOL, f"{name} {rule!r}")
    names = list(report)  # the product passes: its relevance is the pre-activation's
    np.testing.assert_allclose(report[names[names.index("head") - 1]], report["pre"], rtol=1e-12)


def test_hand_written_hard_swish_equals_the_activation():
    """Keras 3 (tf-keras has no hard_swish; both are checked against npref above): the hand-written
    form and Activation('hard_swish') give the same relevance."""
    K = package("keras")
    hand = _elementwise_product_model(K, HARD_SWISH["layer_relu6_scale"])
    twin = _elementwise_product_model(K, lambda K, h: K.layers.Activation("hard_swish", **F64)(h))
    twin.set_weights(hand.get_weights())
    x = np.random.default_rng(10).normal(size=(4, 6)) * 2
    np.testing.assert_allclose(np.asarray(twin(x)), np.asarray(hand(x)), rtol=1e-12, atol=1e-12)
    rule = lrp_grad.AlphaBeta(2, 1)
    assert_close(lrp_grad.explain(hand, x, target=2, rule=rule), lrp_grad.explain(twin, x, target=2, rule=rule),
                 1e-12, f"hard swish {rule!r}")


def _half_grad_x_input(model, x, target):
    """``x * d f_target / dx / 2``: what the uniform rule gives a product of two signals on a
    bias-free network that is linear apart from the product (homogeneous of degree 2, Euler)."""
    x = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        out = model(x)[:, target]
    return (x * tape.gradient(out, x)).numpy() / 2


Z_EVERYWHERE = lrp_grad.Composite([("linear", lrp_grad.Z())], name="Z")


@pytest.mark.parametrize("form", ["layer", "raw"])
@pytest.mark.parametrize("kind", ["dense", "conv"])
def test_product_of_two_independent_signals_takes_the_uniform_rule(K, kind, form):
    """AttnLRP's uniform rule: half of the relevance to each signal; with LRP-0 elsewhere on a
    bias-free network that is exactly half of gradient x input (Achtibat et al. 2024, Prop. 3.3)."""
    L = K.layers
    inp = K.Input((6,) if kind == "dense" else (4, 4, 2), **F64)
    make = (lambda: L.Dense(4, **F64)) if kind == "dense" else (lambda: L.Conv2D(3, 3, padding="same", **F64))
    a, b = make()(inp), make()(inp)
    y = L.Multiply(name="prod", **F64)([a, b]) if form == "layer" else a * b
    model = K.Model(inp, L.Dense(2, use_bias=False, **F64)(L.Flatten(**F64)(y) if kind == "conv" else y))
    x = np.random.default_rng(11).normal(size=(3,) + tuple(model.input_shape[1:]))
    R = lrp_grad.Explainer(model, rule=Z_EVERYWHERE)(x, target=1)
    assert_close(R, _half_grad_x_input(model, x, 1), 1e-10, f"uniform product ({kind}, {form})")


@pytest.mark.parametrize("activation", ["linear", "relu"])
def test_broadcast_product_without_a_sigmoid_takes_the_uniform_rule(K, activation):
    """A 1x1 factor that is no gate: the uniform rule, the broadcast factor's half summed over positions."""
    L = K.layers
    inp = K.Input((4, 4, 3), **F64)
    h = L.Conv2D(4, 3, padding="same", activation="relu", **F64)(inp)
    g = L.Reshape((1, 1, 4), **F64)(L.Dense(4, activation=activation, **F64)(L.GlobalAveragePooling2D(**F64)(h)))
    y = L.Multiply(name="prod", **F64)([h, g])
    model = K.Model(inp, L.Dense(2, use_bias=False, **F64)(L.Flatten(**F64)(y)))
    x = np.random.default_rng(12).normal(size=(2, 4, 4, 3))
    R = lrp_grad.Explainer(model, rule=Z_EVERYWHERE)(x, target=0)
    assert_close(R, _half_grad_x_input(model, x, 0), 1e-9, f"broadcast uniform product ({activation})")


@pytest.mark.parametrize("form", ["layer", "raw"])
def test_product_of_two_gates_takes_the_uniform_rule(K, form):
    """Both factors through a sigmoid: no input is the gate, so each gets half."""
    L = K.layers
    inp = K.Input((6,), **F64)
    a = L.Dense(4, activation="sigmoid", name="a", **F64)(inp)
    b = L.Activation("sigmoid", name="b", **F64)(L.Dense(4, **F64)(inp))
    y = L.Multiply(name="prod", **F64)([a, b]) if form == "layer" else a * b
    model = K.Model(inp, L.Dense(2, name="head", **F64)(y))
    x = np.random.default_rng(13).normal(size=(3, 6))
    _, report = lrp_grad.Explainer(model, rule=lrp_grad.Epsilon(1e-9))(x, target=0, return_layers=True)
    product = [k for k in report if k not in ("a", "b", "head") and "dense" not in k and k != "input_layer"
               and not k.startswith("input")][0]
    np.testing.assert_allclose(report["a"], report[product] / 2, rtol=1e-9)
    np.testing.assert_allclose(report["b"], report[product] / 2, rtol=1e-9)


# ----------------------------------------------------------------------- activations --

#: Activations by name, per package (tf-keras knows fewer). Kept out: softmax / log_softmax (only
#: as the last operation), glu and sparsemax (not elementwise), threshold (needs arguments), gelu
#: (:func:`test_gelu_passes_relevance`, at :data:`GELU_TOL`).
ACTIVATIONS = {
    "keras": ["hard_silu", "hard_swish", "mish", "celu", "log_sigmoid", "hard_tanh", "squareplus",
              "sparse_plus", "soft_shrink", "hard_shrink", "tanh_shrink", "silu", "swish", "selu", "softsign",
              "exponential", "hard_sigmoid", "sparse_sigmoid", "elu", "softplus", "tanh", "sigmoid", "relu6",
              "leaky_relu", "relu", "linear"],
    "tf_keras": ["mish", "selu", "softsign", "exponential", "hard_sigmoid", "swish", "elu", "softplus",
                 "tanh", "sigmoid", "relu", "linear"],
}


def activation_model(K):
    """One branch per activation, fused (``act_fused_*``) and as a layer (``act_layer_*``)."""
    L = K.layers
    inp = K.Input((5,), **F64)
    branches, shared = [], L.Dense(3, **F64)(inp)
    for name in ACTIVATIONS[K.__name__]:
        branches.append(L.Dense(3, activation=name, name=f"act_fused_{name}", **F64)(inp))
        # (a linear Activation reads a tensor of its own: see test_report_of_a_linear_activation_...)
        source = L.Dense(3, **F64)(inp) if name == "linear" else shared
        branches.append(L.Activation(name, name=f"act_layer_{name}", **F64)(source))
    h = L.Concatenate(**F64)(branches)
    model = K.Model(inp, L.Dense(3, **F64)(h))
    rng = np.random.default_rng(11)
    for layer in model.layers:  # small weights: exponential stays moderate; inputs cover the kinks
        if layer.get_weights():
            layer.set_weights([rng.normal(0, 0.8, w.shape) for w in layer.get_weights()])
    return model


def test_activations_pass_relevance_like_the_reference(K):
    """The activation passes relevance whatever the rule: one rule (Z) checks them all."""
    rule = lrp_grad.Z()
    model = activation_model(K)
    layers = to_npref_graph(model)
    x = np.random.default_rng(12).normal(size=(4, 5)) * 1.5
    target = np.array([0, 1, 2, 1])
    np.testing.assert_allclose(npref.forward(layers, x)[-1], np.asarray(model(x)), rtol=1e-10, atol=1e-12)
    R, report = lrp_grad.explain(model, x, target=target, rule=rule, return_layers=True)
    logits = npref.forward(layers, x)[-1]
    r_out = np.zeros_like(logits)
    r_out[np.arange(4), target] = logits[np.arange(4), target]
    R_ref, per = npref.lrp(layers, x, r_out, npref_rule(rule))
    # per activation: the relevance sum at its output (npref layer i is graph node i here)
    labels = [n.label for n in walk(model).nodes]
    bad = [label for i, label in enumerate(labels) if label.startswith("act_")
           and not np.allclose(report[label], per[i + 1].sum(axis=1), rtol=1e-9, atol=1e-12)]
    assert not bad, f"relevance at the output of these layers differs from npref: {bad}"
    assert_close(R, R_ref, TOL, f"activations {rule!r}")


def test_gelu_passes_relevance(K, monkeypatch):
    """GELU (ConvNeXt's), fused and as a layer, at :data:`GELU_TOL`."""
    L = K.layers
    inp = K.Input((5,), **F64)
    h = L.Dense(6, activation="gelu", **F64)(inp)
    h = L.Activation("gelu", **F64)(L.Dense(4, **F64)(h))
    model = _model(K, inp, L.Dense(3, **F64)(h), seed=14)
    assert [l.get("act", l.get("fn")) for l in to_npref_graph(model)] == ["gelu", "linear", "gelu", "linear"]
    check_against_npref(model, lrp_grad.Epsilon(1e-3), signs=(True,), tol=GELU_TOL, what="GELU")
    exact = npref._act

    def tf_gelu(name, z, alpha=None):  # the reference with TensorFlow's GELU values
        f, df = exact(name, z, alpha)
        return (tf.nn.gelu(tf.constant(z), approximate=False).numpy(), df) if name == "gelu" else (f, df)

    monkeypatch.setattr(npref, "_act", tf_gelu)
    check_against_npref(model, lrp_grad.Epsilon(1e-3), signs=(True,), what="GELU (TensorFlow's values)")


def test_report_of_a_linear_activation_on_a_shared_tensor(K):
    """The report holds the relevance at each layer call's output: for Activation('linear') on a
    tensor that another layer reads too, that is its own branch's share, not the tensor's total."""
    L = K.layers
    inp = K.Input((4,), **F64)
    d = L.Dense(3, name="shared", **F64)(inp)
    a = L.Activation("linear", name="lin", **F64)(d)
    b = L.Activation("tanh", name="other", **F64)(d)
    model = _model(K, inp, L.Dense(2, name="head", **F64)(L.Concatenate(**F64)([a, b])), seed=15)
    x = np.random.default_rng(16).normal(size=(3, 4))
    _, report = lrp_grad.explain(model, x, target=0, rule=lrp_grad.Z(), return_layers=True)
    head = model.get_layer("head")
    h = np.concatenate([np.asarray(a_) for a_ in K.Model(inp, [a, b])(x)], axis=1)
    contributions = h * head.kernel.numpy()[:, 0]                  # LRP-0 at the head: z_ij / z_j * z_j
    np.testing.assert_allclose(report["lin"], contributions[:, :3].sum(1), rtol=1e-10)
    np.testing.assert_allclose(report["other"], contributions[:, 3:].sum(1), rtol=1e-10)
    np.testing.assert_allclose(report["shared"], contributions.sum(1), rtol=1e-10)
