"""Every bad input gets a specific exception whose message names the thing and the fix.

Each test shows the failing call and, where there is one, that the suggested fix works.
"""
import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

import lrp_grad
from lrp_grad import (InvalidInputError, InvalidRuleError, InvalidTargetError, UnsupportedLayerError,
                      UnsupportedModelError)
from kit import L, cnn, mlp


@pytest.fixture(scope="module")
def model():
    return cnn((8, 8, 1), "same")


@pytest.fixture(scope="module")
def ex(model):
    return lrp_grad.Explainer(model)


def x_ok(n=2):
    return np.random.default_rng(0).uniform(0, 1, (n, 8, 8, 1)).astype(np.float32)


# ----------------------------------------------------------------------------- unsupported layers

def test_unsupported_layers_are_all_listed_with_the_fix():
    inp = keras.Input((8, 8, 3))
    h = L.Conv2D(4, 3, name="conv")(inp)
    h = L.Permute((2, 1, 3), name="perm")(h)
    h = L.Lambda(lambda t: t * 2.0, name="lam")(h)
    h = L.UpSampling2D(interpolation="bilinear", name="up")(h)
    h = L.Flatten()(h)
    h = L.Dense(5, activation="softmax", name="hidden_softmax")(h)
    out = L.Dense(3, name="head")(h)
    model = keras.Model(inp, out)
    with pytest.raises(UnsupportedLayerError) as info:
        lrp_grad.explain(model, np.zeros((1, 8, 8, 3)))
    msg = str(info.value)
    assert "4 layer(s)" in msg
    assert "'perm' (Permute): no handler for this layer class" in msg
    assert "'lam' (Lambda): no handler" in msg
    assert "'up' (UpSampling2D): interpolation='bilinear'; only 'nearest' is supported" in msg
    assert "'hidden_softmax' (Dense): softmax is only supported as the model's last operation" in msg
    assert "lrp_grad.register_handler(LayerClass" in msg and "Supported layer classes: " in msg
    assert [name for name, _, _ in info.value.layers] == ["perm", "lam", "up", "hidden_softmax"]


def test_unknown_activation_and_channels_first():
    inp = keras.Input((3, 8, 8))
    h = L.Conv2D(2, 3, data_format="channels_first", name="cf")(inp)
    h = L.Flatten()(h)
    out = L.Dense(2, activation=lambda t: t * t, name="square")(h)
    with pytest.raises(UnsupportedLayerError) as info:
        lrp_grad.Explainer(keras.Model(inp, out))
    msg = str(info.value)
    assert "'cf' (Conv2D): data_format='channels_first'; only 'channels_last' is supported" in msg
    assert "'square' (Dense): activation" in msg and "not a known elementwise activation" in msg


class Doubler(keras.layers.Layer):
    def call(self, x):
        return 2.0 * x


def test_register_handler_before_and_after():
    inp = keras.Input((5,))
    out = L.Dense(3)(Doubler(name="doubler")(inp))
    model = keras.Model(inp, out)
    x = np.random.default_rng(0).normal(size=(2, 5)).astype(np.float32)
    with pytest.raises(UnsupportedLayerError, match=r"'doubler' \(Doubler\): no handler"):
        lrp_grad.explain(model, x)
    lrp_grad.register_handler(Doubler, "passthrough")
    try:
        assert "Doubler" in lrp_grad.supported_layers()
        R = lrp_grad.explain(model, x, target=0, rule=lrp_grad.Epsilon(1e-9), initial="one")
        # Relevance passes through the doubler: the input relevance is the dense layer's on 2x.
        kernel = model.layers[-1].kernel.numpy()[:, 0]
        z = (2 * x) @ kernel
        bias = model.layers[-1].bias.numpy()[0]
        np.testing.assert_allclose(R, 2 * x * kernel / (z + bias)[:, None], rtol=1e-4)
    finally:
        lrp_grad.unregister_handler(Doubler)


def test_register_handler_rejects_bad_arguments():
    with pytest.raises(TypeError, match=r"must be a keras.layers.Layer \(Keras 3\) or tf_keras.layers.Layer subclass, got 'Dense'"):
        lrp_grad.register_handler("Dense", "passthrough")
    with pytest.raises(ValueError, match="unknown handler shortcut 'pass'"):
        lrp_grad.register_handler(Doubler, "pass")
    with pytest.raises(TypeError, match="must be a lrp_grad.handlers.Handler"):
        lrp_grad.register_handler(Doubler, 3)


# ----------------------------------------------------------------------------- unsupported models

def test_subclassed_model_is_rejected():
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = L.Dense(2)

        def call(self, x):
            return self.dense(x)

    net = Net()
    net(np.zeros((1, 3), np.float32))
    with pytest.raises(UnsupportedModelError, match="is a subclassed tf_keras.Model.*Functional API"):
        lrp_grad.Explainer(net)


def test_unbuilt_sequential_is_rejected_with_the_fix():
    model = keras.Sequential([L.Dense(2)])
    with pytest.raises(UnsupportedModelError, match="has no known input shape yet.*model.build"):
        lrp_grad.Explainer(model)
    model.build((None, 3))
    assert lrp_grad.explain(model, np.ones((1, 3))).shape == (1, 3)


def test_multi_input_and_multi_output_models_are_rejected():
    a, b = keras.Input((3,)), keras.Input((3,))
    two_in = keras.Model([a, b], L.Dense(2)(L.Concatenate()([a, b])))
    with pytest.raises(UnsupportedModelError, match=r"has 2 input\(s\) and 1 output\(s\).*exactly one input"):
        lrp_grad.Explainer(two_in)
    two_out = keras.Model(a, [L.Dense(2)(a), L.Dense(3)(a)])
    with pytest.raises(UnsupportedModelError, match=r"has 1 input\(s\) and 2 output\(s\)"):
        lrp_grad.Explainer(two_out)


def test_non_model_and_non_classifier_output():
    with pytest.raises(UnsupportedModelError, match=r"must be a keras.Model \(Keras 3\) or a tf_keras.Model.*got str.*lrp_grad.load_model\(path\)"):
        lrp_grad.Explainer("model.h5")
    inp = keras.Input((4, 4, 1))
    seg = keras.Model(inp, L.Conv2D(2, 1)(inp))
    with pytest.raises(UnsupportedModelError, match=r"output shape \(None, 4, 4, 2\).*\(batch, classes\)"):
        lrp_grad.Explainer(seg)


# ----------------------------------------------------------------------------- bad x

def test_single_image_without_batch_axis(ex):
    with pytest.raises(InvalidInputError, match=r"x has shape \(8, 8, 1\).*expects a batch \(batch, 8, 8, 1\).*x\[None\]"):
        ex(x_ok()[0])
    assert ex(x_ok()[0][None]).shape == (1, 8, 8, 1)


def test_wrong_rank_and_shape(ex):
    with pytest.raises(InvalidInputError, match=r"shape \(2, 64\) \(rank 2\).*expects rank 4: \(batch, 8, 8, 1\)"):
        ex(np.zeros((2, 64)))
    with pytest.raises(InvalidInputError, match=r"shape \(2, 8, 9, 1\).*axis 2 is 9, expected 8"):
        ex(np.zeros((2, 8, 9, 1)))
    with pytest.raises(InvalidInputError, match=r"empty batch"):
        ex(np.zeros((0, 8, 8, 1)))


@pytest.mark.parametrize("bad", [np.zeros((1, 8, 8, 1), bool), np.zeros((1, 8, 8, 1), complex),
                                 np.full((1, 8, 8, 1), "a")], ids=["bool", "complex", "str"])
def test_wrong_dtype(ex, bad):
    with pytest.raises(InvalidInputError, match=rf"x has dtype {bad.dtype}; it must hold real numbers"):
        ex(bad)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_x(ex, value):
    x = x_ok()
    x[1, 2, 3, 0] = value
    with pytest.raises(InvalidInputError, match=r"NaN or Inf \(first at index \(1, 2, 3, 0\)"):
        ex(x)


def test_tensor_input_is_accepted(ex):
    x = x_ok()
    np.testing.assert_array_equal(ex(tf.constant(x)), ex(x))


# ----------------------------------------------------------------------------- bad target / initial

def test_target_out_of_range(ex):
    with pytest.raises(InvalidTargetError, match=r"target\[0\] = 5 is out of range .* 5 classes \(valid: 0..4\)"):
        ex(x_ok(), target=5)
    with pytest.raises(InvalidTargetError, match=r"target\[1\] = -1 is out of range"):
        ex(x_ok(), target=[0, -1])
    assert ex(x_ok(), target=4).shape == (2, 8, 8, 1)


def test_target_wrong_shape_or_type(ex):
    with pytest.raises(InvalidTargetError, match=r"target has shape \(3,\) but must be an int or have shape \(n,\) = \(2,\)"):
        ex(x_ok(), target=[0, 1, 2])
    with pytest.raises(InvalidTargetError, match=r"target must be an int or an integer array .* dtype float64"):
        ex(x_ok(), target=1.0)
    with pytest.raises(InvalidTargetError, match="dtype bool"):
        ex(x_ok(), target=True)


def test_bad_initial(ex):
    with pytest.raises(InvalidTargetError, match=r"initial='logits' is not known; use 'logit'"):
        ex(x_ok(), initial="logits")
    with pytest.raises(InvalidTargetError, match=r"shape \(2, 3\); it must be \(n, classes\) = \(2, 5\)"):
        ex(x_ok(), initial=np.ones((2, 3)))
    with pytest.raises(InvalidTargetError, match="either target= or an initial relevance array, not both"):
        ex(x_ok(), target=1, initial=np.ones((2, 5)))
    with pytest.raises(InvalidTargetError, match="contains NaN or Inf"):
        ex(x_ok(), initial=np.full((2, 5), np.nan))


def test_bad_batch_size_and_jit(ex):
    with pytest.raises(InvalidInputError, match="batch_size must be a positive int or None, got 0"):
        ex(x_ok(), batch_size=0)
    with pytest.raises(ValueError, match="jit_compile must be True, False or None, got 'yes'"):
        lrp_grad.Explainer(mlp(), jit_compile="yes")


# ----------------------------------------------------------------------------- bad rules

def test_rule_validation_messages():
    with pytest.raises(InvalidRuleError, match=r"alpha - beta must equal 1 .* alpha=2, beta=2"):
        lrp_grad.AlphaBeta(2, 2)
    with pytest.raises(InvalidRuleError, match=r"alpha and beta must be >= 0, got alpha=0, beta=-1"):
        lrp_grad.AlphaBeta(0, -1)
    with pytest.raises(InvalidRuleError, match=r"epsilon must be > 0, got 0.*lrp_grad.Z\(\)"):
        lrp_grad.Epsilon(0)
    with pytest.raises(InvalidRuleError, match=r"epsilon must be > 0, got -0.1"):
        lrp_grad.Epsilon(-0.1)
    with pytest.raises(InvalidRuleError, match="epsilon must be finite, got nan"):
        lrp_grad.Epsilon(float("nan"))
    with pytest.raises(InvalidRuleError, match=r"gamma must be >= 0, got -0.5"):
        lrp_grad.Gamma(-0.5)
    with pytest.raises(InvalidRuleError, match=r"low must be < high everywhere"):
        lrp_grad.ZBox(1.0, 0.0)
    with pytest.raises(InvalidRuleError, match=r"bias must be True or False, got 'yes'"):
        lrp_grad.AlphaBeta(2, 1, bias="yes")
    assert lrp_grad.AlphaBeta(2, 1) == lrp_grad.AlphaBeta(alpha=2.0, beta=1.0)


def test_rule_argument_must_be_a_rule(model):
    with pytest.raises(InvalidRuleError, match=r"unknown rule or preset name 'eps'; valid names: epsilon_plus, "):
        lrp_grad.explain(model, x_ok(), rule="eps")
    with pytest.raises(InvalidRuleError, match=r"rule must be an lrp_grad rule .* got 3 \(int\)"):
        lrp_grad.explain(model, x_ok(), rule=3)
