"""Operations that cut the gradient are refused by name and path, never explained as all zero.

LRP here rides on the gradient: an operation whose gradient is zero or undefined (a cast to an
integer or bool dtype, rounding, ``sign``, ``stop_gradient``, ``argmax`` or a comparison used as a
value) would silently give zero relevance to everything before it. Each is refused, in both Keras
packages, naming the operation and where it sits; casts between float dtypes stay supported, and a
cut on a branch that only feeds a gate is computed (it gets no relevance anyway).
"""
import re

import numpy as np
import pytest
import tensorflow as tf

import kit
import lrp_grad
from lrp_grad.errors import UnsupportedLayerError


def _cast(K, x, dtype):
    return K.ops.cast(x, dtype) if K.__name__ == "keras" else tf.cast(x, dtype)


def _symbol(K, keras3, tf_keras):
    return keras3 if K.__name__ == "keras" else tf_keras


def _model(K, middle, name="m"):
    """Dense - ReLU - ``middle(h)`` - Dense."""
    L = K.layers
    inp = K.Input((6,))
    h = L.Dense(5, activation="relu", name="d1")(inp)
    return kit.randomize(K.Model(inp, L.Dense(3, name="head")(middle(h)), name=name))


X = np.random.default_rng(0).uniform(0, 3, (4, 6)).astype(np.float32)


@pytest.mark.parametrize("dtype", ["uint8", "int32", "bool"])
def test_cast_to_an_integer_or_bool_dtype_is_refused(K, dtype):
    model = _model(K, lambda h: _cast(K, _cast(K, h, dtype), "float32"))
    with pytest.raises(UnsupportedLayerError) as info:
        lrp_grad.Explainer(model)
    msg = str(info.value)
    cast = _symbol(K, "keras.ops.cast", "tf.cast")
    assert f"(operation {cast}): {cast} cuts the gradient: it casts to {dtype}, and integer and bool values " \
           "carry no gradient. No relevance flows back through it, so the explanation would be all zero." in msg, msg
    assert "lrp_grad.register_handler(YourLayer, 'passthrough')" in msg, msg
    assert len(info.value.layers) == 1, msg  # only the cast that makes the integers, not the cast back


def test_the_cut_is_named_with_its_path_in_a_nested_model(K):
    L = K.layers
    inp = K.Input((5,))
    inner = K.Model(inp, _cast(K, _cast(K, inp, "uint8"), "float32"), name="quant")
    outer_in = K.Input((6,))
    h = L.Dense(5, activation="relu", name="d1")(outer_in)
    model = kit.randomize(K.Model(outer_in, L.Dense(3, name="head")(inner(h))))
    with pytest.raises(UnsupportedLayerError) as info:
        lrp_grad.Explainer(model)
    name = r"cast(_\d+)?" if K.__name__ == "keras" else r"tf\.cast(_\d+)?"  # auto-named, numbered
    symbol = re.escape(_symbol(K, "keras.ops.cast", "tf.cast"))
    assert re.search(rf"- '(?P<n>{name})' \(operation {symbol}\) at 'quant/(?P=n)': {symbol} cuts the gradient",
                     str(info.value)), str(info.value)


@pytest.mark.parametrize("dtype", ["float16", "float64"])
def test_casts_between_float_dtypes_stay_supported(K, dtype):
    model = _model(K, lambda h: _cast(K, _cast(K, h, dtype), "float32"))
    plain = _model(K, lambda h: h)
    plain.set_weights(model.get_weights())
    R = lrp_grad.explain(model, X, rule=lrp_grad.Epsilon(0.01))
    assert np.abs(R).sum() > 0
    kit.assert_close(R, lrp_grad.explain(plain, X, rule=lrp_grad.Epsilon(0.01)), 1e-2 if dtype == "float16" else 1e-6,
                     dtype)


ZERO_GRADIENT = {  # name -> (Keras 3, tf-keras) spelling
    "round": (lambda h: __import__("keras").ops.round(h), lambda h: tf.round(h)),
    "floor": (lambda h: __import__("keras").ops.floor(h), lambda h: tf.math.floor(h)),
    "ceil": (lambda h: __import__("keras").ops.ceil(h), lambda h: tf.math.ceil(h)),
    "sign": (lambda h: __import__("keras").ops.sign(h), lambda h: tf.math.sign(h)),
    "stop_gradient": (lambda h: __import__("keras").ops.stop_gradient(h), lambda h: tf.stop_gradient(h)),
    "floor_divide": (lambda h: h // 2.0, lambda h: h // 2.0),
}


@pytest.mark.parametrize("op", list(ZERO_GRADIENT))
def test_float_operations_with_a_zero_gradient_are_refused(K, op):
    keras3, tf_keras = ZERO_GRADIENT[op]
    model = _model(K, keras3 if K.__name__ == "keras" else tf_keras)
    with pytest.raises(UnsupportedLayerError, match=r"cuts the gradient: its gradient is zero everywhere \((it is "
                                                    r"piecewise constant|it stops the gradient by design)\)"):
        lrp_grad.Explainer(model)


def test_argmax_and_comparisons_used_as_values_are_refused(K):
    ops = K.ops if K.__name__ == "keras" else None

    def argmax(h):
        a = ops.argmax(h, axis=-1) if ops else tf.math.argmax(h, axis=-1)
        a = _cast(K, a, "float32")
        return ops.expand_dims(a, -1) * h if ops else tf.expand_dims(a, -1) * h

    def compare(h):
        return h + _cast(K, h > 1.0, "float32")

    for build, result in ((argmax, "int32" if ops else "int64"), (compare, "bool")):
        with pytest.raises(UnsupportedLayerError) as info:
            lrp_grad.Explainer(_model(K, build))
        assert f"cuts the gradient: its result is {result}, and integer and bool values carry no gradient" \
               in str(info.value), str(info.value)


def test_a_cut_on_a_branch_that_only_feeds_a_gate_is_computed(K):
    """``h * sigmoid(dense(stop_gradient(h)))``: the gate gets no relevance, so its cut is harmless."""
    L = K.layers
    stop = K.ops.stop_gradient if K.__name__ == "keras" else tf.stop_gradient
    inp = K.Input((6,))
    h = L.Dense(5, activation="relu", name="d1")(inp)
    g = L.Dense(5, activation="sigmoid", name="gate")(stop(h))
    model = kit.randomize(K.Model(inp, L.Dense(3, name="head")(L.Multiply(name="gated")([h, g]))))
    R = lrp_grad.explain(model, X, rule=lrp_grad.Epsilon(0.01))
    assert np.all(np.isfinite(R)) and np.abs(R).sum() > 0


def test_integer_model_inputs_are_still_routed(K):
    """Slicing a uint8 input keeps its dtype (it is explained in float32): not a cut."""
    L = K.layers
    inp = K.Input((6,), dtype="uint8")
    h = _cast(K, inp[:, :4], "float32")
    model = kit.randomize(K.Model(inp, L.Dense(3, name="head")(L.Dense(5, activation="relu")(h))))
    R = lrp_grad.explain(model, np.arange(12, dtype=np.uint8).reshape(2, 6), rule=lrp_grad.Epsilon(0.01))
    assert np.abs(R[:, :4]).sum() > 0 and np.all(R[:, 4:] == 0)
