"""Transformers: AttnLRP and CP-LRP on MultiHeadAttention, hand-written attention (matrix products and
a softmax of raw operations), LayerNormalization with its scale held constant, and EinsumDense,
against the float64 equations of ``npref_attention``; the papers' properties (CP-LRP conserves on a
bias-free transformer; the uniform rule is half of gradient x input on a degree-2 network); XLA =
eager; Keras 3 = tf-keras; every refusal's message."""
from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

import kit
import lrp_grad
import npref_attention as nra

F64 = dict(dtype="float64")
T, D, HEADS, KEY = 4, 8, 2, 3


def block(K, name="block", bias=True):
    """A pre-norm transformer block on (T, D) tokens: x + MHA(LN(x)), then + MLP(LN(.))."""
    L = K.layers
    inp = K.Input((T, D), **F64)
    h = L.LayerNormalization(epsilon=1e-3, center=bias, name="ln1", **F64)(inp)
    a = L.MultiHeadAttention(HEADS, KEY, use_bias=bias, name="mha", **F64)(h, h)
    x = L.Add(name="res1", **F64)([inp, a])
    m = L.LayerNormalization(epsilon=1e-3, center=bias, name="ln2", **F64)(x)
    m = L.Dense(2 * D, activation="relu", use_bias=bias, name="fc1", **F64)(m)
    m = L.Dense(D, use_bias=bias, name="fc2", **F64)(m)
    return K.Model(inp, L.Add(name="res2", **F64)([x, m]), name=name)


def _params(model):
    mha = model.get_layer("mha")
    dense = {p: getattr(mha, f"_{p}_dense") for p in ("query", "key", "value", "output")}
    w = {}
    for short, part in (("q", "query"), ("k", "key"), ("v", "value"), ("o", "output")):
        weights = dense[part].get_weights()
        w[f"W{short}"] = weights[0]
        w[f"b{short}"] = weights[1] if len(weights) > 1 else np.zeros(weights[0].shape[1:] if short != "o"
                                                                        else weights[0].shape[-1:])
    ln = {k: model.get_layer(k) for k in ("ln1", "ln2")}
    lnp = {k: (v.gamma.numpy(), v.beta.numpy() if v.beta is not None else np.zeros(D), v.epsilon)
           for k, v in ln.items()}
    fc1, fc2 = (model.get_layer(k).get_weights() for k in ("fc1", "fc2"))
    bias = lambda ws, n: ws[1] if len(ws) > 1 else np.zeros(n)  # noqa: E731
    return {"ln1": lnp["ln1"], "ln2": lnp["ln2"], "mha": w, "W1": fc1[0], "b1": bias(fc1, 2 * D),
            "W2": fc2[0], "b2": bias(fc2, D)}


RULES = {"attnlrp": lrp_grad.AttnLRP(), "cplrp": lrp_grad.CPLRP()}


@pytest.mark.parametrize("rule", sorted(RULES))
def test_block_matches_the_float64_equations(K, rule):
    """The whole block: MHA split into its EinsumDense projections (epsilon) and attention core
    (the attention rule), LayerNorm with its scale held constant, the residual sums under epsilon."""
    model = kit.randomize(block(K), seed=1)
    x = np.random.default_rng(2).normal(size=(2, T, D))
    R0 = np.random.default_rng(3).normal(size=(2, T, D))
    R = lrp_grad.Explainer(model, rule=RULES[rule])(x, initial=R0)
    p = _params(model)
    for n in range(2):
        out, ref = nra.block_forward_lrp(x[n], p, R0[n], rule)
        np.testing.assert_allclose(model(x[n:n + 1]).numpy()[0], out, rtol=1e-9, atol=1e-9)
        kit.assert_close(R[n], ref, 1e-8, f"{rule} block, sample {n}")


def test_the_rules_map_names_every_part(K):
    ex = lrp_grad.Explainer(block(K), rule=lrp_grad.AttnLRP())
    rules = dict(ex.rules)
    assert rules["mha/attention"] == lrp_grad.AttnLRP()
    assert all(rules[f"mha/{p}"] == lrp_grad.Epsilon(1e-6) for p in ("query", "key", "value", "output"))
    assert rules["ln1"] == lrp_grad.Epsilon(1e-6)
    assert "MultiHeadAttention" in lrp_grad.supported_layers() and "EinsumDense" in lrp_grad.supported_layers()
    # other rules: the attention core keeps AttnLRP, the projections take the user's rule
    rules = dict(lrp_grad.Explainer(block(K), rule=lrp_grad.AlphaBeta(2, 1)).rules)
    assert rules["mha/attention"] == lrp_grad.AttnLRP() and rules["mha/query"] == lrp_grad.AlphaBeta(2, 1)
    cp = lrp_grad.Composite([("attention", lrp_grad.CPLRP()), ("linear", lrp_grad.Z())])
    assert dict(lrp_grad.Explainer(block(K), rule=cp).rules)["mha/attention"] == lrp_grad.CPLRP()


def _vit(K, bias=True, classes=3):
    """A small ViT from stock layers: conv patch embedding, one block, LN, mean over tokens, head."""
    L = K.layers
    inp = K.Input((8, 8, 2), **F64)
    h = L.Conv2D(D, 4, strides=4, use_bias=bias, name="patch", **F64)(inp)
    x = L.Reshape((T, D), **F64)(h)
    x = block(K, bias=bias)(x)
    x = L.LayerNormalization(epsilon=1e-3, center=bias, name="ln_f", **F64)(x)
    x = L.GlobalAveragePooling1D(**F64)(x)
    return K.Model(inp, L.Dense(classes, use_bias=bias, name="head", **F64)(x))


def test_cplrp_conserves_on_a_bias_free_vit(K):
    """Ali et al. 2022: with the attention weights constant and no biases, relevance is conserved."""
    model = kit.randomize(_vit(K, bias=False), seed=4)
    x = np.random.default_rng(5).normal(size=(3, 8, 8, 2))
    R, report = lrp_grad.Explainer(model, rule=lrp_grad.CPLRP(1e-12))(x, return_layers=True)
    np.testing.assert_allclose(R.reshape(3, -1).sum(1), report.output, rtol=1e-8)


@pytest.mark.parametrize("rule", sorted(RULES))
def test_vit_xla_equals_eager_and_the_model_is_untouched(K, rule):
    model = kit.randomize(_vit(K), seed=6)
    x = np.random.default_rng(7).normal(size=(3, 8, 8, 2))
    before, out = [w.copy() for w in model.get_weights()], model(x).numpy()
    eager = lrp_grad.Explainer(model, rule=RULES[rule], jit_compile=False)(x)
    xla = lrp_grad.Explainer(model, rule=RULES[rule], jit_compile=True)(x)
    kit.assert_close(xla, eager, 1e-9, f"{rule} XLA vs eager")
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))
    np.testing.assert_array_equal(model(x).numpy(), out)
    np.testing.assert_allclose(lrp_grad.Explainer(model).forward(x), out, rtol=1e-7, atol=1e-9)  # Keras 3 fuses attention


@pytest.mark.parametrize("rule", sorted(RULES))
def test_vit_keras3_equals_tf_keras(rule):
    k3, k2 = kit.package("keras"), kit.package("tf_keras")
    m3 = kit.randomize(_vit(k3), seed=8)
    m2 = _vit(k2)
    m2.set_weights(m3.get_weights())
    x = np.random.default_rng(9).normal(size=(2, 8, 8, 2))
    np.testing.assert_allclose(m2(x).numpy(), m3(x).numpy(), rtol=1e-7, atol=1e-9)  # Keras 3 fuses attention
    kit.assert_close(lrp_grad.explain(m2, x, rule=RULES[rule]), lrp_grad.explain(m3, x, rule=RULES[rule]), 1e-9,
                     f"{rule}: tf-keras vs Keras 3")


def _hand_written_attention(K, softmax=True):
    """Single-head attention of raw operations: Dense projections, q * scale, q k^T, softmax, A v."""
    L, ops = K.layers, kit.ops_of(K)
    inp = K.Input((T, D), **F64)
    q = L.Dense(KEY, name="q", **F64)(inp) * (1.0 / np.sqrt(KEY))
    k = L.Dense(KEY, name="k", **F64)(inp)
    v = L.Dense(KEY, name="v", **F64)(inp)
    scores = ops.matmul(q, ops.transpose(k, (0, 2, 1)))
    weights = ops.softmax(scores, axis=-1) if softmax else scores
    out = L.Dense(D, name="o", **F64)(ops.matmul(weights, v))
    return K.Model(inp, out)


@pytest.mark.parametrize("rule", sorted(RULES))
def test_hand_written_attention_of_raw_operations(K, rule):
    """``matmul``/``transpose``/``softmax`` as raw operations: the same relevance as the equations
    of one head; CP-LRP holds the softmax's factor of ``A v`` constant (read from the graph)."""
    model = kit.randomize(_hand_written_attention(K), seed=10)
    x = np.random.default_rng(11).normal(size=(2, T, D))
    R0 = np.random.default_rng(12).normal(size=(2, T, D))
    R = lrp_grad.Explainer(model, rule=RULES[rule])(x, initial=R0)
    get = lambda n: model.get_layer(n).get_weights()  # noqa: E731
    w = {"Wq": get("q")[0][:, None], "bq": get("q")[1][None], "Wk": get("k")[0][:, None], "bk": get("k")[1][None],
         "Wv": get("v")[0][:, None], "bv": get("v")[1][None], "Wo": get("o")[0][None], "bo": get("o")[1]}
    for n in range(2):
        out, R_q, R_kv = nra.attention(x[n], x[n], w, R0[n], rule)
        np.testing.assert_allclose(model(x[n:n + 1]).numpy()[0], out, rtol=1e-9, atol=1e-9)
        kit.assert_close(R[n], R_q + R_kv, 1e-8, f"{rule} hand-written attention, sample {n}")


@pytest.mark.parametrize("rule", sorted(RULES))
def test_fused_dot_product_attention_is_an_attention_core(rule):
    """``keras.ops.dot_product_attention(q, k, v)`` (one fused operation on (batch, tokens, heads,
    dim), as keras-hub's DINOv3 calls it) takes the attention family's rule: the same relevance as
    the equations of one head, and as the same attention written with matmul and softmax."""
    K = kit.package("keras")
    L, ops = K.layers, K.ops
    inp = K.Input((T, D), **F64)
    q, k, v = (L.Dense(KEY, name=n, **F64)(inp) for n in ("q", "k", "v"))
    a = ops.dot_product_attention(*(ops.expand_dims(t, 2) for t in (q, k, v)))
    out = L.Dense(D, name="o", **F64)(ops.squeeze(a, 2))
    model = kit.randomize(K.Model(inp, out), seed=10)
    twin = _hand_written_attention(K)
    for name in ("q", "k", "v", "o"):
        twin.get_layer(name).set_weights(model.get_layer(name).get_weights())
    x = np.random.default_rng(11).normal(size=(2, T, D))
    R0 = np.random.default_rng(12).normal(size=(2, T, D))
    np.testing.assert_allclose(model(x).numpy(), twin(x).numpy(), rtol=1e-6, atol=1e-6)  # Keras' fused op: float32
    explainer = lrp_grad.Explainer(model, rule=RULES[rule])
    assert any("keras.ops.dot_product_attention" in line and "attention" in line.split(")", 1)[1]
               for line in str(explainer.rules).splitlines()), explainer.rules
    R = explainer(x, initial=R0)
    kit.assert_close(R, lrp_grad.Explainer(twin, rule=RULES[rule])(x, initial=R0), 1e-9, "fused vs written out")
    get = lambda n: model.get_layer(n).get_weights()  # noqa: E731
    w = {"Wq": get("q")[0][:, None], "bq": get("q")[1][None], "Wk": get("k")[0][:, None], "bk": get("k")[1][None],
         "Wv": get("v")[0][:, None], "bv": get("v")[1][None], "Wo": get("o")[0][None], "bo": get("o")[1]}
    out, R_q, R_kv = nra.attention(x[0], x[0], w, R0[0], rule)
    kit.assert_close(R[0], R_q + R_kv, 1e-8, f"{rule} fused attention vs the equations")


def test_fused_attention_with_a_mask_is_refused_by_name():
    K = kit.package("keras")
    inp = K.Input((T, D))
    mask = K.ops.ones((1, 1, T, T), dtype="bool")
    q = K.ops.expand_dims(K.layers.Dense(KEY)(inp), 2)
    out = K.layers.Dense(2)(K.layers.Flatten()(K.ops.dot_product_attention(q, q, q, mask=mask)))
    with pytest.raises(lrp_grad.UnsupportedLayerError, match=r"\(operation keras.ops.dot_product_attention\): "
                                                             r"operation keras.ops.dot_product_attention has no LRP"):
        lrp_grad.Explainer(K.Model(inp, out))


def test_bilinear_product_is_half_gradient_x_input(K):
    """One product of two signals (``q k^T``, degree 2): AttnLRP with LRP-0 elsewhere is exactly
    half of gradient x input (Euler: x . grad f = 2 f)."""
    L, ops = K.layers, kit.ops_of(K)
    inp = K.Input((T, D), **F64)
    q = L.Dense(KEY, use_bias=False, **F64)(inp)
    k = L.Dense(KEY, use_bias=False, **F64)(inp)
    scores = ops.matmul(q, ops.transpose(k, (0, 2, 1)))
    model = K.Model(inp, L.Dense(2, use_bias=False, **F64)(L.Flatten(**F64)(scores)))
    x = np.random.default_rng(15).normal(size=(3, T, D))
    comp = lrp_grad.Composite([("attention", lrp_grad.AttnLRP(1e-15)), ("linear", lrp_grad.Z())])
    R = lrp_grad.Explainer(model, rule=comp)(x, target=1)
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        out = model(xt)[:, 1]
    kit.assert_close(R, (xt * tape.gradient(out, xt)).numpy() / 2, 1e-10, "uniform rule vs gradient x input")


# ------------------------------------------------------------------------------------ refusals --

def test_masked_attention_is_refused_naming_the_layer(K):
    L = K.layers
    inp, mask = K.Input((T, D)), K.Input((T, T))
    out = L.MultiHeadAttention(2, 4, name="mha")(inp, inp, attention_mask=mask)
    with pytest.raises(lrp_grad.UnsupportedModelError,
                       match=r"layer 'mha' \(MultiHeadAttention\) is called with the tensor argument "
                             r"'attention_mask'; lrp_grad explains MultiHeadAttention called as "
                             r"mha\(query, value\[, key\]\) without masks"):
        lrp_grad.Explainer(K.Model([inp, mask], out))


def test_rules_of_the_wrong_kind_are_refused(K):
    model = block(K)
    with pytest.raises(lrp_grad.InvalidRuleError, match=r"'mha/attention' \(MultiHeadAttention attention, family "
                                                        r"'attention'\) got Epsilon.*takes lrp_grad.AttnLRP\(\) or "
                                                        r"lrp_grad.CPLRP\(\)"):
        lrp_grad.Explainer(model, rule=lrp_grad.Composite([(lambda layer: True, lrp_grad.Epsilon())]))
    with pytest.raises(lrp_grad.InvalidRuleError, match=r"'fc1' \(Dense, family 'dense'\) got AttnLRP"):
        lrp_grad.Explainer(model, rule=lrp_grad.Composite([("dense", lrp_grad.AttnLRP()),
                                                           ("linear", lrp_grad.Epsilon())]))
    with pytest.raises(lrp_grad.UnsupportedLayerError,
                       match=r"'ln1' \(LayerNormalization\): a normalisation takes Z or Epsilon.*gives it "
                             r"AlphaBeta"):
        lrp_grad.Explainer(model, rule=lrp_grad.Composite([("norm", lrp_grad.AlphaBeta(2, 1)),
                                                           ("linear", lrp_grad.Epsilon())]))
    with pytest.raises(lrp_grad.InvalidRuleError, match=r"AttnLRP: epsilon must be > 0, got 0"):
        lrp_grad.AttnLRP(0)


def test_a_product_with_a_constant_kernel_is_a_linear_map(K):
    """``x @ W`` with a constant ``W`` (a custom layer's own weight inside its call): a linear map
    under Z or Epsilon, equal to the same map held in a Dense layer; other rules are refused by name."""
    L, ops = K.layers, kit.ops_of(K)
    W = np.random.default_rng(30).normal(size=(D, D))
    inp = K.Input((T, D), **F64)
    h = L.Dense(D, name="h", **F64)(inp)
    model = K.Model(inp, L.Dense(2, name="head", **F64)(L.Flatten(**F64)(ops.matmul(h, W))))
    inp2 = K.Input((T, D), **F64)
    twin = K.Model(inp2, L.Dense(2, name="head", **F64)(L.Flatten(**F64)(
        L.Dense(D, use_bias=False, name="w", **F64)(L.Dense(D, name="h", **F64)(inp2)))))
    twin.get_layer("h").set_weights(model.get_layer("h").get_weights())
    twin.get_layer("w").set_weights([W])
    twin.get_layer("head").set_weights(model.get_layer("head").get_weights())
    x = np.random.default_rng(31).normal(size=(2, T, D))
    eps = lrp_grad.Composite([("linear", lrp_grad.Epsilon(1e-9))])
    kit.assert_close(lrp_grad.Explainer(model, rule=eps)(x, target=1), lrp_grad.Explainer(twin, rule=eps)(x, target=1),
                     1e-10, "matmul with a constant vs Dense")
    with pytest.raises(lrp_grad.UnsupportedLayerError, match=r"with a constant kernel \(inside a layer's call\) takes Z "
                                                             r"or Epsilon"):
        lrp_grad.Explainer(model, rule=lrp_grad.Composite([("linear", lrp_grad.AlphaBeta(2, 1))]))


def test_vit_example_on_real_digits(tmp_path):
    """examples/vit_digits.py: trains a small ViT on the bundled real digits (one epoch here) and
    draws both rules' heatmaps; every map is finite and carries relevance."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "examples" / "vit_digits.py"
    spec = importlib.util.spec_from_file_location("vit_digits", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    accuracy, maps = module.main(["--epochs", "1", "--out", str(tmp_path)])
    assert 0.3 < accuracy <= 1.0  # one epoch on 4000 digits: well above chance (0.1)
    assert (tmp_path / "vit_digits.png").stat().st_size > 10_000
    for name, R in maps.items():
        assert R.shape == (8, 28, 28, 1) and np.all(np.isfinite(R)) and np.abs(R).sum() > 0, name
