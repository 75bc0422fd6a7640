"""Every layer of the zoo against the float64 numpy reference, inside small DAG models.

Canonizers are switched off here so that BatchNorm is checked as the elementwise affine layer
it stays when it cannot be folded; folding is tested in test_canonizers.py.

Every model is built in both Keras packages (``K``: Keras 3 and tf-keras).
"""
import numpy as np
import pytest

import lrp_grad
from kit import assert_close, npref_explain, randomize

RULES = [lrp_grad.Z(), lrp_grad.Epsilon(1e-3), lrp_grad.AlphaBeta(2, 1), lrp_grad.ZPlus(),
         lrp_grad.Gamma(0.25), lrp_grad.Flat(), lrp_grad.WSquare(), lrp_grad.ZBox(-1.0, 1.0, bias=True)]
F64 = dict(dtype="float64")


def _finish(K, inp, out, seed=0):
    model = K.Model(inp, out)
    return randomize(model, seed)


def residual(K):
    L = K.layers
    inp = K.Input((8, 8, 3), **F64)
    h = L.ZeroPadding2D(1, **F64)(inp)
    h = L.Conv2D(4, 3, activation="relu", **F64)(h)
    branch = L.Conv2D(4, 3, padding="same", activation="relu", **F64)(h)
    branch = L.Conv2D(4, 3, padding="same", **F64)(branch)
    h = L.Add(**F64)([h, branch])
    h = L.ReLU(**F64)(h)
    h = L.AveragePooling2D(3, strides=2, padding="same", **F64)(h)
    h = L.BatchNormalization(**F64)(h)
    h = L.Activation("relu", **F64)(h)
    h = L.GlobalAveragePooling2D(**F64)(h)
    return _finish(K, inp, L.Dense(5, **F64)(h))


def mobile(K):
    L = K.layers
    inp = K.Input((9, 9, 3), **F64)
    h = L.Conv2D(6, 1, **F64)(inp)
    h = L.DepthwiseConv2D(3, strides=2, padding="same", depth_multiplier=2, **F64)(h)
    h = L.ReLU(6.0, **F64)(h)
    se = L.GlobalAveragePooling2D(**F64)(h)
    se = L.Reshape((1, 1, 12), **F64)(se)
    se = L.Conv2D(3, 1, activation="relu", **F64)(se)
    se = L.Conv2D(12, 1, activation="sigmoid", **F64)(se)
    h = L.Multiply(**F64)([h, se])
    h = L.SeparableConv2D(5, 3, activation="swish", **F64)(h)
    # A slope exact in float32: TensorFlow's LeakyRelu op takes its slope as a float32 attribute,
    # so 0.2 computes as 0.2000000030 even in float64, in both packages. tf-keras also stores
    # alpha as float32 (the reference reads the rounded value); Keras 3 keeps the Python float
    # 0.2, so the float64 reference would differ from the model by ~1.5e-9 relative.
    h = L.LeakyReLU(0.25, **F64)(h)
    h = L.GlobalMaxPooling2D(**F64)(h)
    return _finish(K, inp, L.Dense(4, **F64)(h), seed=1)


def dense_net(K):
    L = K.layers
    inp = K.Input((8, 8, 2), **F64)
    h = L.Conv2D(4, 3, padding="same", **F64)(inp)
    h = L.Concatenate(**F64)([inp, h])
    h = L.BatchNormalization(**F64)(h)
    h = L.Activation("relu", **F64)(h)
    h = L.Conv2D(3, 1, dilation_rate=1, **F64)(h)
    h = L.UpSampling2D(2, **F64)(h)
    h = L.Cropping2D(((1, 1), (2, 2)), **F64)(h)
    h = L.Conv2DTranspose(3, 3, strides=2, padding="same", activation="relu", **F64)(h)
    h = L.MaxPooling2D(2, **F64)(h)
    h = L.Flatten(**F64)(h)
    h = L.Dropout(0.3, **F64)(h)
    return _finish(K, inp, L.Dense(4, **F64)(h), seed=2)


def sequence(K):
    L = K.layers
    inp = K.Input((12, 3), **F64)
    h = L.Conv1D(4, 3, padding="causal", dilation_rate=2, activation="relu", **F64)(inp)
    h = L.Conv1D(5, 3, strides=2, activation="elu", **F64)(h)
    h = L.ELU(0.5, **F64)(h)
    h = L.GlobalAveragePooling1D(**F64)(h)
    return _finish(K, inp, L.Dense(3, **F64)(h), seed=3)


def nested(K):
    L = K.layers
    inner = K.Sequential([K.Input((6, 6, 2), **F64), L.Conv2D(3, 3, activation="relu", **F64),
                          L.MaxPooling2D(2, **F64)], name="inner")
    inp = K.Input((6, 6, 2), **F64)
    h = L.Flatten(**F64)(inner(inp))
    return _finish(K, inp, L.Dense(3, **F64)(h), seed=4)


MODELS = {"residual": residual, "mobile": mobile, "dense_net": dense_net, "sequence": sequence, "nested": nested}


def tolerance(name, rule):
    """1e-10, except Flat/WSquare on average pooling: there the pooling's 1/count weights are part
    of the op, so the 1e-6 stabiliser is added to the normalised sum instead of the raw one (a
    difference of order 1e-6 relative; both are the flat rule up to the stabiliser)."""
    if isinstance(rule, (lrp_grad.Flat, lrp_grad.WSquare)) and name in ("residual", "sequence", "mobile"):
        return 1e-4
    return 1e-10


@pytest.mark.parametrize("rule", RULES, ids=repr)
@pytest.mark.parametrize("name", list(MODELS))
def test_zoo_matches_float64_reference(K, name, rule):
    model = MODELS[name](K)
    rng = np.random.default_rng(5)
    x = rng.uniform(-1, 1, (3,) + model.input_shape[1:])
    target = rng.integers(0, model.output_shape[-1], 3)
    R = lrp_grad.explain(model, x, target=target, rule=rule, canonizers=[])
    assert_close(R, npref_explain(model, x, target, rule), tolerance(name, rule), f"{name} {rule!r}")


@pytest.mark.parametrize("name", list(MODELS))
def test_zoo_forward_equals_model(K, name):
    model = MODELS[name](K)
    x = np.random.default_rng(0).uniform(-1, 1, (2,) + model.input_shape[1:])
    expected = np.asarray(model(x))
    for canonizers in ([], None):
        np.testing.assert_allclose(lrp_grad.Explainer(model, canonizers=canonizers).forward(x), expected,
                                   rtol=1e-10, atol=1e-12)


def test_multiply_gives_no_relevance_to_the_gate(K):
    L = K.layers
    inp = K.Input((4, 4, 2), name="x", **F64)
    gate = L.GlobalAveragePooling2D(**F64)(inp)
    gate = L.Dense(2, activation="sigmoid", **F64)(gate)
    gate = L.Reshape((1, 1, 2), **F64)(gate)
    h = L.Multiply(name="gated", **F64)([inp, gate])
    model = _finish(K, inp, L.Dense(3, **F64)(L.Flatten(**F64)(h)))
    x = np.random.default_rng(0).uniform(0, 1, (2, 4, 4, 2))
    # Relevance reaching the input only through the signal path: equal to the relevance of the
    # product at the multiply (Z rule on the last Dense: x * w / z * R) — the gate path adds none.
    R, report = lrp_grad.explain(model, x, target=0, rule=lrp_grad.Z(), return_layers=True)
    assert list(report)[0] == "x"  # the input's entry
    np.testing.assert_allclose(report["x"], report["gated"], rtol=1e-12)


def test_relevance_passes_through_preprocessing_and_layernorm_holds_its_scale(K):
    """Rescaling passes relevance to the raw pixels; LayerNormalization (over one axis and over two,
    with random gamma and beta) is the epsilon rule of its map with the standard deviation held
    constant (AttnLRP and CP-LRP), against the float64 equations; without beta it conserves."""
    import npref_attention as nra

    L = K.layers
    for axis, shape in ((-1, (6,)), ([1, 2], (3, 4))):
        inp = K.Input(shape, **F64)
        h = L.Rescaling(1 / 255.0, offset=-0.5, **F64)(inp)
        model = _finish(K, inp, L.LayerNormalization(axis=axis, epsilon=1e-3, name="ln", **F64)(h))
        x = np.random.default_rng(0).uniform(0, 255, (2,) + shape)
        R0 = np.random.default_rng(1).normal(size=(2,) + shape)
        R = lrp_grad.Explainer(model, rule=lrp_grad.Epsilon(1e-6))(x, initial=R0)
        gamma, beta = model.get_layer("ln").get_weights()
        flat = lambda v: v.reshape(2, -1)  # noqa: E731 - the normalised axes as one
        _, ref = nra.layer_norm(flat(x / 255.0 - 0.5), gamma.reshape(-1), beta.reshape(-1), 1e-3, flat(R0))
        assert_close(R, ref.reshape(R.shape), 1e-9, f"LayerNorm axis={axis}")
        model.get_layer("ln").set_weights([gamma, np.zeros_like(beta)])
        R = lrp_grad.Explainer(model, rule=lrp_grad.Epsilon(1e-12))(x, initial=R0)
        np.testing.assert_allclose(flat(R).sum(1), flat(R0).sum(1), rtol=1e-7)


def test_residual_network_conserves_exactly_through_add(K):
    """Z rule, zero biases: every layer's relevance sums to the target logit, Add layers included."""
    L = K.layers
    inp = K.Input((8, 8, 2), **F64)
    h = L.Conv2D(4, 3, padding="same", activation="relu", use_bias=False, **F64)(inp)
    for k in range(2):  # the branch tensors are not cuts of the graph; every other tensor is
        branch = L.Conv2D(4, 3, padding="same", activation="relu", use_bias=False, name=f"branch{k}a", **F64)(h)
        branch = L.Conv2D(4, 3, padding="same", use_bias=False, name=f"branch{k}b", **F64)(branch)
        h = L.ReLU(**F64)(L.Add(name=f"add{k}", **F64)([h, branch]))
    h = L.GlobalAveragePooling2D(**F64)(h)
    model = _finish(K, inp, L.Dense(3, use_bias=False, **F64)(h))
    x = np.random.default_rng(0).uniform(0, 1, (4, 8, 8, 2))
    target = np.array([0, 1, 2, 0])
    R, report = lrp_grad.explain(model, x, target=target, rule=lrp_grad.Z(), return_layers=True)
    logits = np.asarray(model(x))[np.arange(4), target]
    assert sum("add" in k for k in report) == 2
    for name, sums in report.items():
        if not name.startswith("branch"):
            np.testing.assert_allclose(sums, logits, rtol=1e-10, err_msg=name)
