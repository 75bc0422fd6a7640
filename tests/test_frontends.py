"""The two Keras front ends: raw operations, the same numbers in both packages, model checks.

- Raw operations (``x + y``, ``x * 2``, ``keras.ops.mean``, ``tf.reshape``, ...) get the rule of
  the layer they stand for: a model written with them gives the relevance of the same model
  written with layers, and matches the float64 reference.
- The same architecture with the same weights gives the same relevance in Keras 3 and tf-keras,
  for every rule and preset, with the default canonizers.
- Keras 3 models that cannot be explained are refused with the fix (backend, quantized layers).
- No class check in the core is keyed on one package's classes.
"""
import pathlib
import re

import numpy as np
import pytest
import tensorflow as tf

import kit
import lrp_grad
from lrp_grad import handlers
from lrp_grad.errors import UnsupportedLayerError, UnsupportedModelError
from lrp_grad.frontends import keras3, layer_classes, package_of

RULES = [lrp_grad.Z(), lrp_grad.Epsilon(0.1), lrp_grad.AlphaBeta(2, 1), lrp_grad.ZPlus(), lrp_grad.Flat(),
         lrp_grad.WSquare(), lrp_grad.Gamma(0.25)]
PRESETS = list(lrp_grad.presets.NAMES)


def _residual(K, raw: bool, seed=0):
    """Conv - BN - ReLU - [conv + skip] - ReLU - GAP - Dense, the join and pooling written as raw
    operations (``raw``) or as layers. Same layer names either way so weights transfer."""
    L, ops = K.layers, kit.ops_of(K)
    inp = K.Input((8, 8, 3))
    h = L.Conv2D(4, 3, padding="same", name="c1")(inp)
    h = L.BatchNormalization(name="bn1")(h)
    h = ops.relu(h) if raw else L.ReLU(name="r1")(h)
    f = L.Conv2D(4, 3, padding="same", activation="relu", name="c2")(h)
    f = L.Conv2D(4, 1, name="c3")(f)
    s = h + f if raw else L.Add(name="join")([h, f])
    s = ops.relu(s) if raw else L.ReLU(name="r2")(s)
    p = ops.mean(s, axis=(1, 2)) if raw else L.GlobalAveragePooling2D(name="gap")(s)
    out = L.Dense(3, name="head")(p)
    return kit.randomize(K.Model(inp, out), seed)


def _routing(K, raw: bool, seed=0):
    """Reshape / concatenate / scaling by a constant, as raw operations or as layers."""
    L, ops = K.layers, kit.ops_of(K)
    inp = K.Input((6, 6, 2))
    h = L.Conv2D(3, 3, activation="relu", name="c1")(inp)  # (4, 4, 3)
    a = ops.reshape(h, (-1, 48)) if raw else L.Reshape((48,), name="flat")(h)
    b = L.Dense(5, activation="relu", name="d1")(a)
    b = b * 2.0 if raw else L.Rescaling(2.0, name="twice")(b)
    c = ops.concatenate([a, b], axis=-1) if raw else L.Concatenate(name="cat")([a, b])
    out = L.Dense(4, name="head")(c)
    return kit.randomize(K.Model(inp, out), seed)


def _copy_weights(src, dst):
    for layer in src.layers:
        if layer.get_weights():
            dst.get_layer(layer.name).set_weights(layer.get_weights())
    return dst


@pytest.mark.parametrize("build", [_residual, _routing], ids=["residual", "routing"])
@pytest.mark.parametrize("rule", RULES + PRESETS, ids=str)
def test_raw_operations_get_the_rules_of_the_layers_they_stand_for(K, build, rule):
    layers = build(K, raw=False)
    raw = _copy_weights(layers, build(K, raw=True))
    x = np.random.default_rng(1).normal(size=(3,) + tuple(layers.input_shape[1:])).astype("float32")
    np.testing.assert_allclose(raw(x).numpy(), layers(x).numpy(), rtol=1e-5, atol=1e-6)
    R_layers = lrp_grad.explain(layers, x, target=[0, 1, 2], rule=rule)
    R_raw = lrp_grad.explain(raw, x, target=[0, 1, 2], rule=rule)
    kit.assert_close(R_raw, R_layers, 1e-5, f"{K.__name__} {build.__name__} {rule}")


@pytest.mark.parametrize("rule", [lrp_grad.Epsilon(1e-3), lrp_grad.AlphaBeta(2, 1), lrp_grad.ZPlus()], ids=str)
def test_residual_join_written_with_plus_matches_float64_reference(K, rule):
    model = kit.to_float64(_residual(K, raw=True))
    x = np.random.default_rng(2).uniform(-1, 1, (2, 8, 8, 3))
    t = np.array([0, 2])
    R = lrp_grad.explain(model, x, target=t, rule=rule, canonizers=[])
    kit.assert_close(R, kit.npref_explain(model, x, t, rule), 1e-9, f"{K.__name__} {rule}")


def test_raw_operations_are_named_in_the_rule_map(K):
    ex = lrp_grad.Explainer(_residual(K, raw=True), rule="epsilon_plus")
    text = str(ex.rules)
    add, mean = (("keras.ops.add", "keras.ops.mean") if K.__name__ == "keras"
                 else ("tf.__operators__.add", "tf.math.reduce_mean"))
    assert re.search(rf"\({re.escape(add)}\)\s+merge\s+Epsilon", text), text
    assert re.search(rf"\({re.escape(mean)}\)\s+pool\s+Epsilon", text), text


def test_gating_product_and_constant_arithmetic(K):
    """A product of a feature map and a broadcast gate (squeeze-and-excitation written with ``*``)
    gives all relevance to the signal, as the Multiply layer; ``x - 1`` and ``x / 2`` pass it."""
    L, ops = K.layers, kit.ops_of(K)

    def build(raw):
        inp = K.Input((5, 5, 3))
        h = L.Conv2D(4, 3, padding="same", activation="relu", name="c1")(inp)
        g = L.GlobalAveragePooling2D(keepdims=True, name="gap")(h)
        g = L.Conv2D(4, 1, activation="sigmoid", name="gate")(g)
        m = h * g if raw else L.Multiply(name="mul")([h, g])
        m = (m - 1.0) / 2.0 if raw else L.Rescaling(0.5, -0.5, name="shift")(m)
        out = L.Dense(2, name="head")(L.Flatten(name="flat")(m))
        return kit.randomize(K.Model(inp, out))

    layers = build(False)
    raw = _copy_weights(layers, build(True))
    x = np.random.default_rng(3).uniform(0, 1, (2, 5, 5, 3)).astype("float32")
    for rule in (lrp_grad.Epsilon(1e-6), lrp_grad.AlphaBeta(2, 1)):
        kit.assert_close(lrp_grad.explain(raw, x, rule=rule), lrp_grad.explain(layers, x, rule=rule), 1e-5,
                         str(rule))


def test_branches_that_only_feed_gates_need_no_handler(K):
    """An attention softmax and an operation without an LRP rule (``x - y`` of two tensors) on a
    branch that only feeds gates get no relevance, so they are computed by their own forward and
    not refused; the relevance equals the twin written with supported operations (``x + (-1) y``),
    and the gate branch's layers get exactly zero."""
    L, ops = K.layers, kit.ops_of(K)

    def build(odd):
        inp = K.Input((6, 4))
        h = L.Dense(4, name="feat")(inp)
        a = L.Softmax(axis=1, name="attn")(L.Dense(4, name="score")(inp))
        b = L.Dense(4, name="other")(inp)
        g = L.Activation("sigmoid", name="squash")(ops.subtract(a, b) if odd else L.Add()([a, b * -1.0]))
        m = L.Add(name="join")([L.Multiply(name="gated")([h, g]), L.Multiply(name="attended")([a, h])])
        return kit.randomize(K.Model(inp, L.Dense(3, name="head")(L.Flatten(name="flat")(m))), seed=4)

    odd, plain = build(True), build(False)
    plain.set_weights(odd.get_weights())
    x = np.random.default_rng(4).normal(size=(2, 6, 4)).astype("float32")
    before = [w.copy() for w in odd.get_weights()]
    for rule in (lrp_grad.Z(), lrp_grad.AlphaBeta(2, 1)):
        R, report = lrp_grad.explain(odd, x, rule=rule, return_layers=True)
        kit.assert_close(R, lrp_grad.explain(plain, x, rule=rule), 1e-6, str(rule))
        assert np.all(report["attn"] == 0) and np.all(report["score"] == 0), dict(report)
        np.testing.assert_allclose(report["feat"], report["join"], rtol=1e-5)  # all of it reaches the signal
    np.testing.assert_allclose(lrp_grad.Explainer(odd).forward(x), odd(x).numpy(), rtol=1e-5, atol=1e-6)
    assert all(np.array_equal(a, b) for a, b in zip(before, odd.get_weights()))



def test_softmax_on_the_signal_path_takes_the_softmax_rule(K):
    """A softmax that is not the output's last operation: AttnLRP's softmax rule
    ``R_x = x (R - s sum R)`` over its axis, against the float64 equations."""
    import npref_attention as nra

    L = K.layers
    inp = K.Input((6, 4), dtype="float64")
    h = L.Softmax(axis=1, name="attn", dtype="float64")(L.Dense(4, name="score", dtype="float64")(inp))
    model = kit.randomize(K.Model(inp, L.Dense(3, name="head", dtype="float64")(L.Flatten(dtype="float64")(h))),
                          seed=5)
    x = np.random.default_rng(5).normal(size=(2, 6, 4))
    R = lrp_grad.Explainer(model, rule=lrp_grad.Epsilon(1e-6))(x, target=np.array([0, 2]))
    Ws, bs = model.get_layer("score").get_weights()
    Wh, bh = model.get_layer("head").get_weights()
    for n, t in enumerate((0, 2)):
        z = x[n] @ Ws + bs
        e = np.exp(z - z.max(0))
        s = e / e.sum(0)
        y = s.reshape(-1) @ Wh + bh
        _, R_s = nra.linear(s.reshape(-1), Wh, bh, np.eye(3)[t] * y)
        R_s = R_s.reshape(6, 4)
        R_z = z * (R_s - s * R_s.sum(0, keepdims=True))
        _, R_x = nra.linear(x[n], Ws, bs, R_z)
        kit.assert_close(R[n], R_x, 1e-9, f"softmax rule, sample {n}")


def test_unsupported_operations_are_named_by_their_operation(K):
    L, ops = K.layers, kit.ops_of(K)
    inp = K.Input((4,))
    h = L.Dense(3, name="d1")(inp)
    s = ops.cumprod(h, axis=-1)
    d = ops.power(h, s)
    model = K.Model(inp, L.Dense(2, name="d2")(d))
    with pytest.raises(UnsupportedLayerError) as info:
        lrp_grad.Explainer(model)
    msg = str(info.value)
    unknown, sub = ("keras.ops.cumprod", "keras.ops.power") if K.__name__ == "keras" else ("tf.math.cumprod", "tf.math.pow")
    assert f"(operation {unknown}): operation {unknown} has no LRP handler" in msg, msg
    assert f"(operation {sub}): {sub} of two tensors is not supported" in msg, msg
    assert len(info.value.layers) == 2 and {c for _, c, _ in info.value.layers} == {unknown, sub}


def test_mean_over_the_batch_axis_is_refused(K):
    ops = kit.ops_of(K)
    inp = K.Input((4,))
    h = K.layers.Dense(3, name="d1")(inp)
    model = K.Model(inp, K.layers.Dense(2, name="d2")(h - ops.mean(h, axis=0, keepdims=True) * 0.0 + h))
    with pytest.raises(UnsupportedLayerError, match=r"over axis=\(0,\) reduces the batch axis"):
        lrp_grad.Explainer(model)


@pytest.mark.parametrize("axis", [0, None], ids=["axis0", "all_axes"])
def test_max_over_the_batch_axis_is_refused_and_over_features_is_not(K, axis):
    """Issue 21: h + max(h, axis=0, keepdims=True) was explained (the max is routed like a
    pooling), although batch-axis reductions are documented as refused: it mixes samples."""
    import tensorflow as tf

    def amax(t, axis, keepdims):
        return K.ops.max(t, axis=axis, keepdims=keepdims) if K.__name__ == "keras" else \
            tf.reduce_max(t, axis=axis, keepdims=keepdims)

    inp = K.Input((4,))
    h = K.layers.Dense(3, name="d1")(inp)
    model = K.Model(inp, K.layers.Dense(2, name="d2")(h + amax(h, axis, True)))
    symbol = "keras.ops.max" if K.__name__ == "keras" else "tf.math.reduce_max"
    shown = r"\(0,\)" if axis == 0 else r"None \(all\)"
    with pytest.raises(UnsupportedLayerError, match=rf"{re.escape(symbol)} over axis={shown} reduces the batch axis; "
                                                    r"only reductions over the non-batch axes"):
        lrp_grad.Explainer(model)
    fine = K.Model(inp, K.layers.Dense(2, name="d2")(h + amax(h, -1, True)))  # over the features: routed
    lrp_grad.Explainer(fine)(np.ones((2, 4), "float32"))


# ----------------------------------------------------------------------------- same numbers

def _architecture(K):
    """Conv-BN(folded)-ReLU, a residual join with ``+``, max/avg pooling, depthwise conv, dense."""
    L = K.layers
    inp = K.Input((10, 10, 3))
    h = L.Conv2D(6, 3, padding="same", name="c1")(inp)
    h = L.BatchNormalization(name="bn1")(h)
    h = L.ReLU(name="r1")(h)
    f = L.Conv2D(6, 3, padding="same", activation="relu", name="c2")(h)
    h = L.ReLU(name="r2")(h + f)
    h = L.MaxPooling2D(2, name="mp")(h)
    h = L.DepthwiseConv2D(3, padding="same", activation="relu", name="dw")(h)
    h = L.AveragePooling2D(2, name="ap")(h)
    h = L.Flatten(name="flat")(h)
    h = L.Dense(8, activation="relu", name="d1")(h)
    return K.Model(inp, L.Dense(4, name="head")(h))


@pytest.mark.parametrize("rule", RULES + PRESETS, ids=str)
def test_same_weights_give_the_same_relevance_in_both_packages(rule):
    k3, k2 = kit.package("keras"), kit.package("tf_keras")
    m2 = kit.randomize(_architecture(k2), seed=4)
    m3 = _copy_weights(m2, _architecture(k3))
    assert package_of(m3) == "keras" and package_of(m2) == "tf_keras"
    x = np.random.default_rng(5).uniform(0, 1, (3, 10, 10, 3)).astype("float32")
    np.testing.assert_allclose(m3(x).numpy(), m2(x).numpy(), rtol=1e-5, atol=1e-5)
    t = np.array([0, 1, 3])
    R3, rep3 = lrp_grad.explain(m3, x, target=t, rule=rule, return_layers=True)
    R2, rep2 = lrp_grad.explain(m2, x, target=t, rule=rule, return_layers=True)
    kit.assert_close(R3, R2, 1e-5, f"Keras 3 vs tf-keras, {rule}")
    for (k3_label, s3), (k2_label, s2) in zip(rep3.items(), rep2.items()):
        np.testing.assert_allclose(s3, s2, rtol=1e-4, atol=1e-5, err_msg=f"layer sums {k3_label} / {k2_label}")
    # the same plan: handlers, rules, ReLU fusion, BatchNorm folded in both (a fold that fires in
    # one package only changed epsilon relevance by ~0.1 in a prototype)
    ex3, ex2 = lrp_grad.Explainer(m3, rule=rule), lrp_grad.Explainer(m2, rule=rule)

    def plan(ex):
        return [(s.handler.kind, s.handler.family, s.context.rule, s.context.fuse_relu, s.context.nonneg,
                 s.node.params is not None) for s in ex.passes.plan(False).steps]

    assert plan(ex3) == plan(ex2)
    assert "bn1" not in str(ex3.rules)  # folded into c1: not a rule-taking layer any more


def test_builtin_handler_table_covers_both_packages():
    """Every built-in class name has a handler for each package that defines that class."""
    k3, k2 = kit.package("keras"), kit.package("tf_keras")
    for name, handler in handlers._BY_NAME.items():
        for K in (k3, k2):
            cls = getattr(K.layers, name, None) or vars(kit.application_layers(K)).get(name)
            if cls is None:
                assert (name, K.__name__) == ("ThresholdedReLU", "keras"), f"{name} missing in {K.__name__}"
                continue
            assert handlers._BUILTIN.get(cls) is handler, f"{K.__name__}.layers.{name} has no handler"
    assert len(layer_classes("Dense")) == 2
    assert len(layer_classes("LayerScale", "CustomScaleLayer")) == 4  # the applications' own layers


def test_no_core_module_checks_one_packages_classes():
    """Only lrp_grad/frontends imports a Keras package; the rest asks it package-neutral questions
    (is_layer, layer_classes, is_model), so no class check can be keyed on one package."""
    root = pathlib.Path(lrp_grad.__file__).parent
    offenders = []
    allowed = {"demo.py", "bench.py", "datasets.py"}  # build example models via frontends.tf_keras
    for path in root.rglob("*.py"):
        if "frontends" in path.parts:
            continue
        text = path.read_text()
        for pattern in (r"^\s*import (tf_keras|keras)\b", r"^\s*from (tf_keras|keras)\b",
                        r"\btype\([^)]*\) is \w+\.layers\.", r"isinstance\([^)]*,\s*keras\.",
                        r"\bkeras\.layers\.\w+\b(?!`)"):
            for m in re.finditer(pattern, text, re.M):
                line = text[:m.start()].count("\n") + 1
                snippet = text.splitlines()[line - 1].strip()
                if path.name in allowed or snippet.startswith(("#", '"', "'", ">>>", "...")) or "``" in snippet:
                    continue
                offenders.append(f"{path.relative_to(root)}:{line}: {snippet}")
    assert not offenders, "package-specific class checks outside lrp_grad/frontends:\n" + "\n".join(offenders)


# ----------------------------------------------------------------------------- Keras 3 model checks

def test_other_keras3_backend_is_refused_with_the_fix(monkeypatch):
    k3 = kit.package("keras")
    model = k3.Sequential([k3.Input((4,)), k3.layers.Dense(2)])
    monkeypatch.setattr(keras3.keras.backend, "backend", lambda: "jax")
    with pytest.raises(UnsupportedModelError, match=r"Keras 3 is running on the 'jax' backend.*KERAS_BACKEND=tensorflow"):
        lrp_grad.Explainer(model)


def test_quantized_keras3_layer_is_refused():
    k3 = kit.package("keras")
    model = k3.Sequential([k3.Input((4,)), k3.layers.Dense(3, name="q"), k3.layers.Dense(2, name="head")])
    with pytest.warns(UserWarning):  # Keras warns that InputLayer has no quantize()
        model.quantize("int8")
    with pytest.raises(UnsupportedModelError, match=r"layer 'q' \(Dense\).*quantization_mode='int8'.*before model.quantize"):
        lrp_grad.Explainer(model)


def test_mixed_precision_keras3_model_is_explained_in_float32():
    """Layers with a mixed_float16 policy: lrp_grad computes the linear layers and Rescaling in the
    input dtype (float32) with the float32 variables, so the relevance is the float32 model's."""
    k3 = kit.package("keras")
    L = k3.layers

    def build(policy):
        return k3.Sequential([k3.Input((6, 6, 1)), L.Rescaling(1 / 255.0, dtype=policy, name="scale"),
                              L.Conv2D(2, 3, activation="relu", dtype=policy, name="c"),
                              L.Flatten(name="f"), L.Dense(3, dtype=policy, name="d")])

    f32 = kit.randomize(build("float32"))
    mixed = _copy_weights(f32, build("mixed_float16"))
    x = np.random.default_rng(6).uniform(0, 255, (2, 6, 6, 1)).astype("float32")
    R_mixed = lrp_grad.explain(mixed, x, rule=lrp_grad.Epsilon(1e-6), target=0)
    R_f32 = lrp_grad.explain(f32, x, rule=lrp_grad.Epsilon(1e-6), target=0)
    assert R_mixed.dtype == np.float32
    kit.assert_close(R_mixed, R_f32, 1e-5, "mixed_float16 policy")


def test_nested_keras3_sequential_is_inlined():
    k3 = kit.package("keras")
    L = k3.layers
    block = k3.Sequential([k3.Input((6,)), L.Dense(5, activation="relu", name="inner")], name="block")
    inp = k3.Input((4,))
    h = L.Dense(6, activation="relu", name="d0")(inp)
    model = kit.randomize(k3.Model(inp, L.Dense(2, name="head")(block(h))))
    ex = lrp_grad.Explainer(model, rule=lrp_grad.Epsilon(1e-9))
    assert "block/inner" in str(ex.rules)
    x = np.random.default_rng(7).normal(size=(3, 4)).astype("float32")
    np.testing.assert_allclose(ex.forward(x), model(x).numpy(), rtol=1e-5, atol=1e-6)
    R = ex(x, target=1)
    kit.assert_close(R, kit.npref_explain(model, x, np.ones(3, int), lrp_grad.Epsilon(1e-9)), 1e-5, "nested")


@pytest.mark.parametrize("rule", [lrp_grad.Z(), lrp_grad.AlphaBeta(2, 1)], ids=str)
def test_slicing_transpose_and_sum_route_relevance(K, rule):
    """``h[:, :4]`` keeps the relevance of the kept units (= a Dense with zero rows for the
    dropped ones), ``transpose`` moves it, ``sum`` over space is GAP with a kernel scaled by H*W."""
    L, ops = K.layers, kit.ops_of(K)
    inp = K.Input((3, 3, 2))
    h = L.Conv2D(6, 2, activation="relu", name="c1")(inp)                      # (2, 2, 6)
    t = ops.transpose(h, (0, 2, 1, 3))                                         # swap H and W
    s = ops.sum(t, axis=(1, 2))                                                # (6,)
    raw = kit.randomize(K.Model(inp, L.Dense(3, name="head")(s[:, :4])))
    inp2 = K.Input((3, 3, 2))
    h2 = L.Conv2D(6, 2, activation="relu", name="c1")(inp2)
    ref = K.Model(inp2, L.Dense(3, name="head")(L.GlobalAveragePooling2D(name="gap")(h2)))
    ref.get_layer("c1").set_weights(raw.get_layer("c1").get_weights())
    w, b = raw.get_layer("head").get_weights()
    ref.get_layer("head").set_weights([np.concatenate([w * 4.0, np.zeros((2, 3), w.dtype)]), b])
    x = np.random.default_rng(8).uniform(0, 1, (3, 3, 3, 2)).astype("float32")
    np.testing.assert_allclose(raw(x).numpy(), ref(x).numpy(), rtol=1e-5, atol=1e-5)
    kit.assert_close(lrp_grad.explain(raw, x, target=1, rule=rule), lrp_grad.explain(ref, x, target=1, rule=rule),
                     1e-5, f"{K.__name__} {rule}")


def test_composite_class_matchers_work_across_packages():
    """A composite written with one package's layer classes gives the same rules in the other."""
    k3, k2 = kit.package("keras"), kit.package("tf_keras")
    for matcher_pkg in (k3, k2):
        composite = lrp_grad.Composite([(matcher_pkg.layers.Conv2D, lrp_grad.ZPlus()),
                                        (matcher_pkg.layers.Dense, lrp_grad.Epsilon(0.5))])
        for K in (k3, k2):
            rules = lrp_grad.Explainer(kit.cnn(K=K), rule=composite).rules
            text = str(rules)
            assert text.count("ZPlus") == 2 and text.count("Epsilon(epsilon=0.5") == 2, (matcher_pkg, K, text)
    # a user's own subclass is matched only by itself (and its subclasses), as isinstance does
    class MyDense(k3.layers.Dense):
        pass

    assert not lrp_grad.frontends.is_instance(k2.layers.Dense(2), MyDense)
