"""Canonizers preserve the forward pass ("same logits") and never touch the user's model.

Every model is built in both Keras packages (``K``: Keras 3 and tf-keras).
"""
import numpy as np
import pytest

import lrp_grad
from lrp_grad import handlers
from lrp_grad.canonizers import FoldBatchNorm
from kit import assert_close, randomize


def with_bn(K, kind, act_before_bn=False, dtype="float32"):
    """``first`` (of ``kind``) -> BatchNorm ``bn`` -> ... -> ``next`` (the next weighted layer) -> Dense.

    The BatchNorm folds backward into ``first`` (conv-bn) or, after a ReLU, forward into ``next``.
    """
    L = K.layers
    kw = dict(dtype=dtype)
    act = "relu" if act_before_bn else None
    shape = (10,) if kind == "dense" else ((12, 3) if kind == "conv1d" else (8, 8, 3))
    inp = K.Input(shape, **kw)
    make = {
        "dense": lambda: L.Dense(6, activation=act, name="first", **kw),
        "conv2d": lambda: L.Conv2D(5, 3, padding="same", activation=act, name="first", **kw),
        "conv1d": lambda: L.Conv1D(5, 3, padding="causal", activation=act, name="first", **kw),
        "depthwise": lambda: L.DepthwiseConv2D(3, depth_multiplier=2, activation=act, name="first", **kw),
        "separable": lambda: L.SeparableConv2D(5, 3, activation=act, name="first", **kw),
        "transpose": lambda: L.Conv2DTranspose(4, 3, strides=2, activation=act, name="first", **kw),
    }[kind]
    h = L.BatchNormalization(name="bn", **kw)(make()(inp))
    if not act_before_bn:
        h = L.ReLU(**kw)(h)
    if kind == "dense":
        out = L.Dense(3, name="next", **kw)(h)
    else:
        h = L.Conv2D(4, 2, name="next", **kw)(h) if kind != "conv1d" else L.Conv1D(4, 2, name="next", **kw)(h)
        h = L.MaxPooling2D(2, **kw)(h) if kind != "conv1d" else h
        out = L.Dense(3, **kw)(L.Flatten(**kw)(h))
    model = randomize(K.Model(inp, out))
    if act_before_bn:  # forward folding through max pooling needs positive BatchNorm scales
        bn = model.get_layer("bn")
        assert type(bn).__name__ == "BatchNormalization"
        gamma, beta, mean, var = bn.get_weights()
        bn.set_weights([np.abs(gamma), beta, mean, var])
    return model


KINDS = ["dense", "conv2d", "conv1d", "depthwise", "separable", "transpose"]


def folded_steps(ex):
    return [s.node.label for s in ex.passes.plan(False).steps if s.node.params is not None]


def bn_step(ex, label="bn"):
    (step,) = [s for s in ex.passes.plan(False).steps if s.node.label == label]
    return step


@pytest.mark.parametrize("act_before_bn", [False, True], ids=["conv-bn", "conv-relu-bn"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype,tol", [("float32", 1e-5), ("float64", 1e-10)])
def test_fold_batchnorm_keeps_the_logits(K, kind, act_before_bn, dtype, tol):
    model = with_bn(K, kind, act_before_bn, dtype)
    x = np.random.default_rng(0).normal(size=(4,) + model.input_shape[1:]).astype(dtype)
    ex = lrp_grad.Explainer(model)
    assert folded_steps(ex), "the BatchNorm was not folded"
    # Folded into the layer before it, or (after a ReLU) into the next weighted layer; the
    # BatchNorm itself became the identity and takes no rule.
    assert folded_steps(ex) == ["next" if act_before_bn else "first"]
    assert bn_step(ex).handler is handlers.IDENTITY
    assert "bn" not in ex.rules and "BatchNormalization" not in str(ex.rules)
    assert_close(ex.forward(x), np.asarray(model(x)), tol, f"{kind} folded logits")


def test_folded_relevance_equals_a_manually_folded_model(K):
    L = K.layers
    model = with_bn(K, "conv2d", dtype="float64")
    conv, bn = model.get_layer("first"), model.get_layer("bn")
    gamma, beta, mean, var = bn.get_weights()
    scale = gamma / np.sqrt(var + bn.epsilon)
    inp = K.Input((8, 8, 3), dtype="float64")
    h = L.Conv2D(5, 3, padding="same", dtype="float64")(inp)
    h = L.ReLU(dtype="float64")(h)
    h = L.Conv2D(4, 2, dtype="float64")(h)
    h = L.MaxPooling2D(2, dtype="float64")(h)
    manual = K.Model(inp, L.Dense(3, dtype="float64")(L.Flatten(dtype="float64")(h)))
    w, b = conv.get_weights()
    manual.layers[1].set_weights([w * scale, (b - mean) * scale + beta])
    assert [type(a).__name__ for a in manual.layers[3:]] == [type(c).__name__ for c in model.layers[4:]]
    for a, c in zip(manual.layers[3:], model.layers[4:]):
        a.set_weights(c.get_weights())
    x = np.random.default_rng(1).normal(size=(3, 8, 8, 3))
    for rule in (lrp_grad.AlphaBeta(2, 1), lrp_grad.Epsilon(1e-4), "epsilon_plus_flat"):
        assert_close(lrp_grad.explain(model, x, target=1, rule=rule), lrp_grad.explain(manual, x, target=1, rule=rule),
                     1e-10, f"{rule}")


def test_unfoldable_batchnorm_stays_a_norm_layer(K):
    L = K.layers
    inp = K.Input((6, 6, 2))
    h = L.Concatenate()([inp, L.Conv2D(2, 3, padding="same")(inp)])
    h = L.BatchNormalization(name="bn")(h)
    h = L.Conv2D(3, 3, padding="same", activation="relu")(L.ReLU()(h))
    model = randomize(K.Model(inp, L.Dense(2)(L.Flatten()(h))))
    ex = lrp_grad.Explainer(model, rule="epsilon_plus")
    assert ex.rules["bn"] == lrp_grad.Epsilon(1e-6)
    assert bn_step(ex).handler is not handlers.IDENTITY
    x = np.random.default_rng(0).normal(size=(2, 6, 6, 2)).astype(np.float32)
    assert_close(ex.forward(x), np.asarray(model(x)), 1e-5, "unfolded")


def test_canonizers_can_be_switched_off_and_validated(K):
    model = with_bn(K, "conv2d")
    unfolded = lrp_grad.Explainer(model, canonizers=[])
    assert not folded_steps(unfolded)
    assert "bn" in unfolded.rules and bn_step(unfolded).handler is not handlers.IDENTITY
    folded = lrp_grad.Explainer(model, canonizers=[FoldBatchNorm()])
    assert folded_steps(folded)
    assert "bn" not in folded.rules and bn_step(folded).handler is handlers.IDENTITY
    with pytest.raises(TypeError, match="canonizers must be lrp_grad.canonizers.Canonizer objects, got 'fold'"):
        lrp_grad.Explainer(model, canonizers=["fold"])


def test_canonized_model_is_not_modified(K):
    model = with_bn(K, "separable", act_before_bn=True)
    x = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype(np.float32)
    weights, before = [w.copy() for w in model.get_weights()], np.asarray(model(x))
    lrp_grad.explain(model, x, rule="epsilon_gamma_box")
    for old, new in zip(weights, model.get_weights()):
        np.testing.assert_array_equal(old, new)
    np.testing.assert_array_equal(np.asarray(model(x)), before)


def test_changed_batchnorm_sign_after_building_is_caught(K):
    L = K.layers
    inp = K.Input((8, 8, 3))
    h = L.BatchNormalization(name="bn")(L.Conv2D(4, 3, activation="relu")(inp))
    h = L.Conv2D(3, 2)(L.MaxPooling2D(2)(h))
    model = randomize(K.Model(inp, L.Dense(2)(L.Flatten()(h))))
    bn = model.get_layer("bn")
    gamma, beta, mean, var = bn.get_weights()
    bn.set_weights([np.abs(gamma), beta, mean, var])
    ex = lrp_grad.Explainer(model, rule=lrp_grad.Epsilon())
    assert len(folded_steps(ex)) == 1
    assert bn_step(ex).handler is handlers.IDENTITY
    ex(np.ones((1, 8, 8, 3), np.float32))  # compiles the pass with the folded BatchNorm
    bn.set_weights([-np.abs(gamma), beta, mean, var])
    with pytest.raises(Exception, match="was folded through a max pooling.*Build a new Explainer"):
        ex(np.ones((1, 8, 8, 3), np.float32))
