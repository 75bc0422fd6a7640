"""The operations and layer kinds the public model zoos use beyond plain CNNs: splits, unstacks,
repeats, gathers and permutes (routing), differences of two tensors (a signed sum), interpolating
resizes (fixed linear maps), GroupNormalization (scale held constant), Conv2DTranspose with
output_padding, subclasses of supported layers that keep their computation, and user functions
that share a built-in's name. Each against an exact property (LRP-0 = gradient x input on a
bias-free ReLU network), a twin written with supported layers, or the float64 equations."""
from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

import kit
import lrp_grad
import npref_attention as nra

F64 = dict(dtype="float64")


def _grad_x_input(model, x, target):
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        out = model(xt)[:, target]
    return (xt * tape.gradient(out, xt)).numpy()


def _lrp0_is_gradient_x_input(model, x, target=1, tol=1e-9):
    """LRP-0 on a network that is piecewise linear and bias-free equals gradient x input exactly."""
    R = lrp_grad.Explainer(model, rule=lrp_grad.Z())(x, target=target)
    kit.assert_close(R, _grad_x_input(model, x, target), tol, model.name)
    return R


def _bias_free(model):
    for layer in model.layers:
        for w in layer.weights:
            if "bias" in w.name or w.name.endswith("beta"):
                w.assign(np.zeros(w.shape))
    return model


def _routing_models(K):
    L, ops = K.layers, kit.ops_of(K)
    tfops = K.__name__ != "keras"
    split = (lambda t: tf.split(t, 2, axis=-1)) if tfops else (lambda t: ops.split(t, 2, axis=-1))
    unstack = (lambda t: tf.unstack(t, axis=1)) if tfops else (lambda t: ops.unstack(t, axis=1))
    repeat = (lambda t: tf.repeat(t, 2, axis=1)) if tfops else (lambda t: ops.repeat(t, 2, axis=1))
    take = (lambda t: tf.gather(t, [0, 2, 2], axis=1)) if tfops else (lambda t: ops.take(t, [0, 2, 2], axis=1))

    def wrap(name, body):
        inp = K.Input((4, 6), **F64)
        h = L.Dense(6, activation="relu", **F64)(inp)
        return K.Model(inp, L.Dense(3, **F64)(L.Flatten(**F64)(body(h))), name=name)

    yield wrap("split", lambda h: L.Add(**F64)(split(h)))
    yield wrap("unstack", lambda h: L.Concatenate(**F64)(unstack(h)))
    yield wrap("repeat", repeat)
    yield wrap("gather", take)
    yield wrap("permute", lambda h: L.Permute((2, 1), **F64)(h))
    yield wrap("repeat_vector", lambda h: L.RepeatVector(2, **F64)(L.Flatten(**F64)(h)))


def test_routing_operations_follow_the_gradient(K):
    """split / unstack / repeat / gather (take) / Permute / RepeatVector route relevance by the
    plain gradient: LRP-0 = gradient x input on a bias-free ReLU network."""
    x = np.random.default_rng(0).normal(size=(3, 4, 6))
    for model in _routing_models(K):
        R = _lrp0_is_gradient_x_input(_bias_free(kit.randomize(model, seed=1)), x)
        assert np.abs(R).sum() > 0, model.name


@pytest.mark.parametrize("form", ["layer", "raw"])
def test_difference_of_two_tensors_is_a_signed_sum(K, form):
    """``x - y`` (a Subtract layer, keras.ops.subtract / tf.math.subtract) equals its twin
    ``x + (-1) y`` written with an Add, under every rule of the merge family."""
    L, ops = K.layers, kit.ops_of(K)

    def build(twin):
        inp = K.Input((6,), **F64)
        a = L.Dense(4, activation="relu", name="a", **F64)(inp)
        b = L.Dense(4, name="b", **F64)(inp)
        if twin:
            d = L.Add(**F64)([a, b * -1.0])
        else:
            d = L.Subtract(**F64)([a, b]) if form == "layer" else (a - b if K.__name__ != "keras"
                                                                  else ops.subtract(a, b))
        return K.Model(inp, L.Dense(3, name="head", **F64)(d))

    model, twin = kit.randomize(build(False), seed=2), build(True)
    for name in ("a", "b", "head"):
        twin.get_layer(name).set_weights(model.get_layer(name).get_weights())
    x = np.random.default_rng(3).normal(size=(4, 6))
    np.testing.assert_allclose(model(x).numpy(), twin(x).numpy(), rtol=1e-12)
    for rule in (lrp_grad.Z(), lrp_grad.Epsilon(0.1), lrp_grad.AlphaBeta(2, 1), lrp_grad.Gamma(0.25),
                 lrp_grad.Flat()):
        everywhere = lrp_grad.Composite([("linear", rule)], name=repr(rule))
        kit.assert_close(lrp_grad.Explainer(model, rule=everywhere)(x, target=1),
                         lrp_grad.Explainer(twin, rule=everywhere)(x, target=1), 1e-10, f"{form} {rule!r}")


def _resize_models(K):
    L, ops = K.layers, kit.ops_of(K)
    resize = ((lambda t: tf.image.resize(t, (7, 5))) if K.__name__ != "keras"
              else (lambda t: ops.image.resize(t, (7, 5))))

    def wrap(name, body):
        inp = K.Input((4, 4, 2), **F64)
        h = L.Conv2D(3, 3, padding="same", activation="relu", **F64)(inp)
        return K.Model(inp, L.Dense(3, **F64)(L.Flatten(**F64)(body(h))), name=name)

    yield wrap("upsampling_bilinear", lambda h: L.UpSampling2D(2, interpolation="bilinear", **F64)(h))
    yield wrap("resizing", lambda h: L.Resizing(6, 5, interpolation="bilinear", **F64)(h))
    yield wrap("raw_resize", resize)


def test_interpolating_resizes_are_fixed_linear_maps(K):
    """Bilinear UpSampling2D, Resizing and image.resize: linear in their input, under the pool
    family's rule; LRP-0 = gradient x input, and epsilon conserves."""
    x = np.random.default_rng(4).uniform(0, 1, (2, 4, 4, 2))
    for model in _resize_models(K):
        model = _bias_free(kit.randomize(model, seed=5))
        _lrp0_is_gradient_x_input(model, x)
        R, report = lrp_grad.Explainer(model, rule=lrp_grad.Epsilon(1e-12))(x, target=0, return_layers=True)
        np.testing.assert_allclose(R.reshape(2, -1).sum(1), report.output, rtol=1e-5, err_msg=model.name)


def test_group_normalization_holds_its_scale(K):
    """GroupNormalization: per group of channels, the epsilon rule of the map with its standard
    deviation held constant, against the float64 equations (as LayerNorm's)."""
    L = K.layers
    inp = K.Input((3, 3, 4), **F64)
    model = kit.randomize(K.Model(inp, L.GroupNormalization(2, epsilon=1e-3, name="gn", **F64)(inp)), seed=6)
    x = np.random.default_rng(7).normal(size=(2, 3, 3, 4))
    R0 = np.random.default_rng(8).normal(size=(2, 3, 3, 4))
    R = lrp_grad.Explainer(model, rule=lrp_grad.Epsilon(1e-6))(x, initial=R0)
    gamma, beta = model.get_layer("gn").get_weights()
    np.testing.assert_allclose(lrp_grad.Explainer(model).forward(x), model(x).numpy(), rtol=1e-9, atol=1e-9)
    for n in range(2):
        for g in range(2):
            cs = slice(2 * g, 2 * g + 2)
            v, r = x[n, ..., cs].reshape(1, -1), R0[n, ..., cs].reshape(1, -1)
            _, ref = nra.layer_norm(v, np.tile(gamma[cs], 9), np.tile(beta[cs], 9), 1e-3, r)
            kit.assert_close(R[n, ..., cs].reshape(1, -1), ref, 1e-9, f"group {g} of sample {n}")


@pytest.mark.parametrize("padding", ["valid", "same"])
def test_conv2d_transpose_with_output_padding(K, padding):
    """Keras' output size with output_padding; LRP-0 = gradient x input."""
    L = K.layers
    for output_padding, strides, kernel in ((1, 2, 3), (2, 3, 3), (1, 3, 2)):
        inp = K.Input((5, 5, 2), **F64)
        h = L.Conv2DTranspose(3, kernel, strides=strides, padding=padding, output_padding=output_padding,
                              activation="relu", **F64)(inp)
        model = _bias_free(kit.randomize(K.Model(inp, L.Dense(2, **F64)(L.Flatten(**F64)(h))), seed=9))
        x = np.random.default_rng(10).normal(size=(2, 5, 5, 2))
        np.testing.assert_allclose(lrp_grad.Explainer(model).forward(x), model(x).numpy(), rtol=1e-9, atol=1e-9)
        _lrp0_is_gradient_x_input(model, x)


def test_subclass_that_keeps_its_base_computation_is_explained(K):
    """``FixedDropout(Dropout)`` (efficientnet's) overrides only a training-time method: it is
    explained as a Dropout; a subclass that overrides ``call`` (or a method ``call`` uses) is
    refused naming the methods."""
    L = K.layers

    class FixedDropout(L.Dropout):
        def _get_noise_shape(self, inputs):
            return None

    class Doubling(L.Dropout):
        def call(self, inputs, training=None):
            return 2 * inputs

    class StandardizedConv(L.Conv2D):
        def convolution_op(self, inputs, kernel):
            return super().convolution_op(inputs, kernel - tf.reduce_mean(kernel))

    def build(layer):
        inp = K.Input((4, 4, 2))
        h = layer(L.Conv2D(3, 3, activation="relu")(inp))
        return K.Model(inp, L.Dense(2)(L.Flatten()(h)))

    fixed, plain = build(FixedDropout(0.2, name="drop")), build(L.Dropout(0.2, name="drop"))
    plain.set_weights(fixed.get_weights())
    x = np.random.default_rng(11).uniform(0, 1, (2, 4, 4, 2)).astype("float32")
    np.testing.assert_array_equal(lrp_grad.explain(fixed, x), lrp_grad.explain(plain, x))
    with pytest.raises(lrp_grad.UnsupportedLayerError,
                       match=r"'doubling' \(Doubling\): a subclass of Dropout that overrides call; lrp_grad explains "
                             r"subclasses that keep Dropout's computation"):
        lrp_grad.Explainer(build(Doubling(0.1, name="doubling")))
    inp = K.Input((4, 4, 2))
    conv = K.Model(inp, L.Dense(2)(L.Flatten()(StandardizedConv(3, 3, name="ws")(inp))))
    with pytest.raises(lrp_grad.UnsupportedLayerError, match=r"'ws' \(StandardizedConv\): a subclass of Conv2D that "
                                                             r"overrides convolution_op"):
        lrp_grad.Explainer(conv)


def test_user_function_named_like_a_builtin_is_not_the_builtin(K):
    """``def relu(t): return leaky_relu(t)`` as an activation is the user's function, refused by
    its name and module, not treated as ReLU (its forward differs)."""
    L = K.layers

    def relu(t):
        return tf.nn.leaky_relu(t, 0.3)

    inp = K.Input((6,))
    model = K.Model(inp, L.Dense(2)(L.Dense(4, activation=relu, name="mine")(inp)))
    with pytest.raises(lrp_grad.UnsupportedLayerError,
                       match=r"'mine' \(Dense\): activation \"function '.*relu' \(from module "
                             r"'test_zoo_operations'\)\" is not a known elementwise activation"):
        lrp_grad.Explainer(model)
    ok = K.Model(inp, L.Dense(2)(L.Dense(4, activation=tf.nn.relu)(inp)))  # TensorFlow's own: the built-in
    lrp_grad.Explainer(ok)
