"""Properties that LRP theory guarantees, checked on small models (no reference needed).

Every test runs with models of both Keras packages (``K``: Keras 3 and tf-keras).
"""
import numpy as np
import pytest
import tensorflow as tf

import kit
import lrp_grad
from lrp_grad.frontends import package_of
from kit import assert_close, cnn, mlp, randomize, to_float64


def zero_bias_cnn(K, dtype="float64"):
    return cnn((8, 8, 1), "same", bias=False, dtype=dtype, seed=3, K=K)


def input_name(model):
    """The name of the model's InputLayer (Keras 3 models have no ``input_names``)."""
    first = model.get_config()["layers"][0]
    assert first["class_name"] == "InputLayer", first
    name = first["config"]["name"]
    assert getattr(model, "input_names", [name]) == [name]  # tf-keras
    return name


def grad_x_input(model, x, target):
    x = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        logit = tf.gather(model(x), target, batch_dims=1)
    return (tape.gradient(logit, x) * x).numpy()


@pytest.mark.parametrize("rule", [lrp_grad.Z(), lrp_grad.Epsilon(1e-9)], ids=repr)
def test_conservation_layer_by_layer(K, rule):
    """Zero biases and Z (or epsilon -> 0): every layer's relevance sums to the target logit."""
    model = zero_bias_cnn(K)
    assert package_of(model) == K.__name__
    x = np.random.default_rng(1).uniform(0, 1, (4, 8, 8, 1))
    target = np.array([0, 1, 2, 3])
    R, report = lrp_grad.explain(model, x, target=target, rule=rule, return_layers=True)
    logits = model(x).numpy()[np.arange(4), target]
    assert list(report)[0] == input_name(model) and len(report) == len(model.layers) + 1
    for name, sums in report.items():
        np.testing.assert_allclose(sums, logits, rtol=1e-7, err_msg=name)
    np.testing.assert_allclose(R.reshape(4, -1).sum(1), logits, rtol=1e-7)
    assert max(report.conservation_gap().values()) < 1e-7
    assert "max rel. gap" in str(report)


def test_report_shows_bias_absorption(K):
    """With biases and z+, the report shows where relevance is lost (it must not be all equal)."""
    model = cnn((8, 8, 1), "same", dtype="float64", seed=4, K=K)
    x = np.random.default_rng(2).uniform(0, 1, (2, 8, 8, 1))
    _, report = lrp_grad.explain(model, x, rule=lrp_grad.ZPlus(), return_layers=True)
    assert max(report.conservation_gap().values()) > 1e-3


def raw_ops_net(K):
    """Dense layers joined by raw operations (``relu`` and ``+`` of two tensors) instead of layers."""
    L, ops = K.layers, kit.ops_of(K)
    inp = K.Input((6,), dtype="float64")
    h = ops.relu(L.Dense(5, dtype="float64")(inp))
    f = L.Dense(5, activation="relu", dtype="float64")(h)
    h = ops.relu(h + f)
    return randomize(K.Model(inp, L.Dense(4, dtype="float64")(h)))


@pytest.mark.parametrize("make", [lambda K: cnn((8, 8, 2), "valid", dtype="float64", K=K),
                                  lambda K: mlp(dtype="float64", K=K), raw_ops_net], ids=["cnn", "mlp", "raw_ops"])
def test_lrp0_equals_gradient_times_input(K, make):
    model = make(K)
    shape = model.input_shape[1:]
    x = np.random.default_rng(0).normal(size=(5,) + shape)
    target = np.arange(5) % 4
    R = lrp_grad.explain(model, x, target=target, rule=lrp_grad.Z())
    assert_close(R, grad_x_input(model, x, target), 1e-12, "LRP-0 vs gradient x input")


@pytest.mark.parametrize("rule", [lrp_grad.ZPlus(), lrp_grad.ZPlus(bias=False)], ids=repr)
def test_zplus_nonnegative_for_nonnegative_input(K, rule):
    model = cnn((8, 8, 3), "same", strides=2, K=K)
    x = np.random.default_rng(0).uniform(0, 1, (6, 8, 8, 3)).astype(np.float32)
    R = lrp_grad.explain(model, x, target=np.arange(6) % 5, rule=rule, initial="one")
    assert R.min() >= 0 and R.max() > 0


@pytest.mark.parametrize("rule", [lrp_grad.Epsilon(0.01), lrp_grad.AlphaBeta(2, 1), lrp_grad.Gamma(0.3),
                                  lrp_grad.ZBox(-1, 1), lrp_grad.Flat()], ids=repr)
def test_linear_in_initial_relevance(K, rule):
    model = cnn((8, 8, 2), "same", dtype="float64", K=K)
    x = np.random.default_rng(0).uniform(-1, 1, (3, 8, 8, 2))
    rng = np.random.default_rng(1)
    r1, r2 = rng.normal(size=(3, 5)), rng.normal(size=(3, 5))
    ex = lrp_grad.Explainer(model, rule=rule)
    combined = ex(x, initial=2.0 * r1 - 3.0 * r2)
    assert_close(combined, 2.0 * ex(x, initial=r1) - 3.0 * ex(x, initial=r2), 1e-12, "linearity")


def test_initial_modes(K):
    model = mlp(dtype="float64", K=K)
    x = np.random.default_rng(0).normal(size=(4, 7))
    logits = model(x).numpy()
    ex = lrp_grad.Explainer(model, rule=lrp_grad.Z())
    target = np.array([3, 2, 1, 0])
    onehot = np.eye(4)[target]
    by_logit = ex(x, target=target)
    assert_close(by_logit, ex(x, initial=onehot * logits), 1e-14, "'logit' == explicit array")
    assert_close(ex(x, target=target, initial="one"), ex(x, initial=onehot), 1e-14, "'one'")
    doubled = ex(x, target=target, initial=lambda out, t: 2.0 * tf.one_hot(t, 4, dtype=out.dtype) * out)
    assert_close(doubled, 2.0 * by_logit, 1e-14, "callable initial")
    # Default target: the predicted class.
    assert_close(ex(x), ex(x, target=logits.argmax(1)), 0.0, "predicted class")


def test_softmax_output_is_explained_on_logits(K):
    base = mlp(dtype="float64", K=K)
    with_softmax = K.Sequential([K.Input((7,), dtype="float64")] + base.layers + [K.layers.Softmax(dtype="float64")])
    fused = mlp(dtype="float64", K=K)
    fused.layers[-1].activation = K.activations.softmax
    x = np.random.default_rng(0).normal(size=(3, 7))
    expected = lrp_grad.explain(base, x, target=1, rule=lrp_grad.Epsilon(1e-3))
    for model in (with_softmax, fused):
        np.testing.assert_allclose(model(x).numpy().sum(1), 1.0, rtol=1e-12)  # the model does end in softmax
        np.testing.assert_allclose(lrp_grad.Explainer(model).forward(x), base(x).numpy(), rtol=1e-12)
        assert_close(lrp_grad.explain(model, x, target=1, rule=lrp_grad.Epsilon(1e-3)), expected, 1e-12, "softmax")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_rewritten_forward_equals_model(K, dtype):
    model = cnn((9, 9, 3), "same", strides=2, dtype=dtype, K=K)
    x = np.random.default_rng(0).normal(size=(4, 9, 9, 3)).astype(dtype)
    np.testing.assert_array_equal(lrp_grad.Explainer(model).forward(x), model(x).numpy())


@pytest.mark.parametrize("rule", [lrp_grad.Epsilon(1e-4), lrp_grad.AlphaBeta(2, 1), lrp_grad.Flat()], ids=repr)
def test_jit_equals_non_jit(K, rule):
    model = cnn((8, 8, 2), "same", dilation=2, K=K)
    x = np.random.default_rng(0).uniform(-1, 1, (3, 8, 8, 2)).astype(np.float32)
    plain = lrp_grad.explain(model, x, rule=rule, jit_compile=False)
    assert_close(lrp_grad.explain(model, x, rule=rule, jit_compile=True), plain, 1e-5, "jit")


def _bn_residual(K):
    """Conv - BatchNorm - ReLU - [conv, joined with ``+``] - GAP - Dense: BatchNorm folding (a
    canonizer) and a raw operation are the rewrites most tempted to touch the user's layers."""
    L = K.layers
    inp = K.Input((8, 8, 1))
    h = L.ReLU()(L.BatchNormalization()(L.Conv2D(4, 3, padding="same")(inp)))
    f = L.Conv2D(4, 3, padding="same", activation="relu")(h)
    h = L.GlobalAveragePooling2D()(h + f)
    return randomize(K.Model(inp, L.Dense(5)(h)))


def _snapshot(model):
    """Everything of a model that explaining it must leave alone (compared with ==)."""
    return {
        "config": model.get_config(),
        "layers": [(id(layer), layer.name, type(layer), layer.trainable, layer.built, str(layer.dtype),
                    str(layer.compute_dtype), getattr(layer, "activation", None)) for layer in model.layers],
        "variables": [(id(v), v.name, tuple(v.shape), str(v.dtype), v.trainable) for v in model.weights],
        "trainable": model.trainable,
        "operations": [id(op) for op in getattr(model, "operations", ())],  # Keras 3: the recorded graph
    }


@pytest.mark.parametrize("build, rules", [
    (lambda K: cnn((8, 8, 1), "same", K=K),
     (lrp_grad.AlphaBeta(2, 1), lrp_grad.ZBox(0, 1), lrp_grad.Flat(), lrp_grad.Gamma(0.25))),
    (_bn_residual, (lrp_grad.AlphaBeta(2, 1), lrp_grad.ZBox(0, 1))),
], ids=["cnn", "bn_residual"])
def test_user_model_is_not_modified(K, build, rules):
    model = build(K)
    assert package_of(model) == K.__name__
    x = np.random.default_rng(0).uniform(0, 1, (3, 8, 8, 1)).astype(np.float32)
    weights = [w.copy() for w in model.get_weights()]
    before = model(x).numpy()
    snapshot = _snapshot(model)
    for rule in rules:
        lrp_grad.explain(model, x, rule=rule, return_layers=True)
    lrp_grad.explain(model, x, rule="epsilon_plus_flat", compute_dtype="bfloat16")  # casts weights for the pass
    for old, new in zip(weights, model.get_weights()):
        np.testing.assert_array_equal(old, new)
    assert len(model.get_weights()) == len(weights)
    np.testing.assert_array_equal(before, model(x).numpy())
    after = _snapshot(model)
    for key in snapshot:
        assert after[key] == snapshot[key], key


def test_no_retracing_for_new_batch_sizes(K):
    ex = lrp_grad.Explainer(cnn((8, 8, 1), "same", K=K))
    rng = np.random.default_rng(0)
    for n in (1, 5, 2, 7, 5, 1):
        R = ex(rng.uniform(0, 1, (n, 8, 8, 1)), target=0)
        assert R.shape == (n, 8, 8, 1)
    assert ex.trace_count == 1


def test_batch_size_splits_without_changing_results(K):
    ex = lrp_grad.Explainer(cnn((8, 8, 1), "same", dtype="float64", K=K))
    x = np.random.default_rng(0).uniform(0, 1, (7, 8, 8, 1))
    whole, report = ex(x, return_layers=True)
    split, report_split = ex(x, batch_size=3, return_layers=True)
    np.testing.assert_allclose(split, whole, rtol=1e-12)
    for k in report:
        np.testing.assert_allclose(report_split[k], report[k], rtol=1e-12)


@pytest.mark.parametrize("rule", [lrp_grad.Z(), lrp_grad.Epsilon(), lrp_grad.AlphaBeta(2, 1), lrp_grad.ZPlus(),
                                  lrp_grad.Flat(), lrp_grad.WSquare(), lrp_grad.ZBox(0, 1), lrp_grad.Gamma()],
                         ids=repr)
def test_all_zero_input_gives_finite_relevance(K, rule):
    model = cnn((8, 8, 1), "same", bias=False, K=K)
    R = lrp_grad.explain(model, np.zeros((2, 8, 8, 1), np.float32), target=0, rule=rule)
    assert np.all(np.isfinite(R))
    if not rule.input_independent and not isinstance(rule, lrp_grad.ZBox):
        np.testing.assert_array_equal(R, 0.0)


def test_integer_images_are_cast(K):
    model = cnn((8, 8, 1), "same", K=K)
    x = np.random.default_rng(0).integers(0, 255, (2, 8, 8, 1), dtype=np.uint8)
    np.testing.assert_allclose(lrp_grad.explain(model, x, target=1),
                               lrp_grad.explain(model, x.astype(np.float32), target=1), rtol=1e-6)


def test_float64_model_gives_float64(K):
    model = to_float64(cnn((8, 8, 1), "same", K=K))
    assert package_of(model) == K.__name__
    assert lrp_grad.explain(model, np.ones((1, 8, 8, 1), np.float32)).dtype == np.float64


def test_functional_model_with_dropout_and_reshape(K):
    L = K.layers
    inp = K.Input((6, 6, 2))
    h = L.Conv2D(3, 3, activation="relu")(inp)
    h = L.Dropout(0.5)(h)
    h = L.Reshape((4 * 4 * 3,))(h)
    h = L.Activation("relu")(h)
    out = L.Dense(3)(h)
    model = randomize(K.Model(inp, out))
    x = np.random.default_rng(0).normal(size=(2, 6, 6, 2)).astype(np.float32)
    R = lrp_grad.explain(model, x, target=[0, 2], rule=lrp_grad.Z())
    assert_close(R, grad_x_input(model, x, np.array([0, 2])), 1e-5, "functional LRP-0")


def test_several_targets_per_image_in_one_call(K):
    model = cnn((8, 8, 1), "same", dtype="float64", K=K)
    ex = lrp_grad.Explainer(model, rule=lrp_grad.AlphaBeta(2, 1))
    x = np.random.default_rng(0).uniform(0, 1, (3, 8, 8, 1))
    everything = ex(x, target="all")
    assert everything.shape == (3, 5, 8, 8, 1)
    for t in range(5):
        np.testing.assert_allclose(everything[:, t], ex(x, target=t), rtol=1e-12)
    pairs, report = ex(x, target=np.array([[0, 4], [1, 1], [3, 2]]), return_layers=True)
    np.testing.assert_allclose(pairs[2, 0], ex(x[2:3], target=3)[0], rtol=1e-12)
    assert report.output.shape == (3, 2)
    with pytest.raises(lrp_grad.InvalidTargetError, match=r"target\[.\] = 7 is out of range"):
        ex(x, target=np.array([[0, 7], [1, 1], [3, 2]]))
    with pytest.raises(lrp_grad.InvalidTargetError, match=r"must be \(n, k\) with n = 3"):
        ex(x, target=np.zeros((2, 2), int))
    with pytest.raises(lrp_grad.InvalidTargetError, match="target='every' is not known"):
        ex(x, target="every")


def test_xla_buckets_batch_sizes(K):
    ex = lrp_grad.Explainer(cnn((8, 8, 1), "same", K=K), rule=lrp_grad.Epsilon(), jit_compile=True)
    rng = np.random.default_rng(0)
    plain = lrp_grad.Explainer(ex.model, rule=lrp_grad.Epsilon(), jit_compile=False)
    for n in (3, 5, 7, 8, 2, 6):
        x = rng.uniform(0, 1, (n, 8, 8, 1)).astype(np.float32)
        assert_close(ex(x, target=1), plain(x, target=1), 1e-5, f"n={n}")
    assert ex.trace_count == 1 and ex.compiled_batch_sizes == {2, 4, 8}


@pytest.mark.parametrize("compute_dtype", ["bfloat16", "float16"])
def test_reduced_precision_stays_close_to_float32(K, compute_dtype):
    model = cnn((10, 10, 3), "same", K=K)
    x = np.random.default_rng(0).uniform(0, 255, (4, 10, 10, 3)).astype(np.float32)  # raw pixels: fp16 range matters
    for rule in (lrp_grad.Epsilon(1e-6), lrp_grad.AlphaBeta(2, 1), "epsilon_plus_flat"):
        full = lrp_grad.explain(model, x, target=1, rule=rule)
        low = lrp_grad.explain(model, x, target=1, rule=rule, compute_dtype=compute_dtype)
        assert low.dtype == np.float32 and np.all(np.isfinite(low))
        assert_close(low, full, 0.1, f"{compute_dtype} {rule}")


def test_bad_compute_dtype(K):
    with pytest.raises(ValueError, match="compute_dtype must be None, 'bfloat16' or 'float16', got 'int8'"):
        lrp_grad.Explainer(mlp(K=K), compute_dtype="int8")
