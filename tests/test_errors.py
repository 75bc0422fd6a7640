"""Every bad input gets a specific exception whose message names the thing and the fix.

Each test shows the failing call and, where there is one, that the suggested fix works. Every error
path that involves a model is checked with models of both Keras packages (``K``: Keras 3 and
tf-keras), plus the Keras 3 specifics: a subclassed ``keras.Model``, an unbuilt Sequential,
``keras.ops`` operations without an LRP rule, custom Keras 3 layers.
"""
import numpy as np
import pytest
import tensorflow as tf

import kit
import lrp_grad
from lrp_grad import (InvalidInputError, InvalidRuleError, InvalidTargetError, UnsupportedLayerError,
                      UnsupportedModelError)
from kit import cnn
from lrp_grad.frontends import package_of

IDS = {"keras": "keras3", "tf_keras": "tf_keras"}


@pytest.fixture(scope="module", params=kit.PACKAGES, ids=[IDS[p] for p in kit.PACKAGES])
def model(request):
    model = cnn((8, 8, 1), "same", K=kit.package(request.param))
    assert package_of(model) == request.param
    return model


@pytest.fixture(scope="module")
def ex(model):
    return lrp_grad.Explainer(model)


def x_ok(n=2):
    return np.random.default_rng(0).uniform(0, 1, (n, 8, 8, 1)).astype(np.float32)


def raw_op_names(K, model):
    """The names Keras gave the raw operations (not layers) recorded in ``model``'s graph, in order:
    Keras 3 ``Operation`` objects, tf-keras ``TFOpLambda`` layers. (Keras numbers repeated names
    per session, so a test must not hard-code ``'sin'`` vs ``'sin_3'``.)"""
    if K.__name__ == "keras":
        return [op.name for op in model.operations if not isinstance(op, K.layers.Layer)]
    return [layer.name for layer in model.layers if type(layer).__name__ in ("TFOpLambda", "SlicingOpLambda")]


def sym(K, keras3_name, tf_name):
    """How an error message names a raw operation: ``keras.ops.<f>`` (Keras 3) or ``tf.<f>`` (tf-keras)."""
    return f"keras.ops.{keras3_name}" if K.__name__ == "keras" else f"tf.{tf_name}"


# ----------------------------------------------------------------------------- unsupported layers

def test_unsupported_layers_are_all_listed_with_the_fix(K):
    L = K.layers
    inp = K.Input((8, 8, 3))
    h = L.Conv2D(4, 3, name="conv")(inp)
    h = L.Lambda((lambda t: K.ops.cumprod(t, axis=-1)) if K.__name__ == "keras" else (lambda t: tf.math.cumprod(t, axis=-1)),
                 name="trig")(h)
    h = L.Lambda(lambda t: t * 2.0, name="lam")(h)
    h = L.RandomFlip(name="flip")(h)
    h = L.Flatten()(h)
    h = L.Dense(5, activation="softmax", name="hidden_softmax")(h)
    out = L.Dense(3, name="head")(h)
    model = K.Model(inp, out, name="zoo")
    with pytest.raises(UnsupportedLayerError) as info:
        lrp_grad.explain(model, np.zeros((1, 8, 8, 3)))
    msg = str(info.value)
    # every problem at once: layers without a handler are looked into, and what they call that has
    # no rule is named with its path; what cannot be looked into says why
    assert "cannot be explained" in msg and "at 'trig/" in msg and "cumprod" in msg, msg
    assert ("'flip' (RandomFlip): no handler for this layer class; looking inside its call failed" in msg
            or "at 'flip/" in msg or "'flip' (RandomFlip): called with training=True" in msg), msg
    assert "'lam'" not in msg  # Lambda(t * 2) is explained through its operations
    assert "'hidden_softmax' (Dense): softmax is only supported as the explained output's last operation" in msg, msg
    assert "lrp_grad.register_handler(LayerClass" in msg and "Supported layer classes: " in msg
    assert info.value.layers[-1][:2] == ("hidden_softmax", "Dense")


def test_unknown_activation_and_channels_first(K):
    L = K.layers
    inp = K.Input((3, 8, 8))
    h = L.Conv2D(2, 3, data_format="channels_first", name="cf")(inp)
    h = L.Flatten()(h)
    out = L.Dense(2, activation=lambda t: tf.math.cumprod(t, axis=-1), name="square")(h)
    with pytest.raises(UnsupportedLayerError) as info:
        lrp_grad.Explainer(K.Model(inp, out))
    msg = str(info.value)
    assert "'cf' (Conv2D): data_format='channels_first'; only 'channels_last' is supported" in msg, msg
    if K.__name__ == "keras":  # TensorFlow on a Keras 3 symbolic tensor: the function cannot be traced
        assert "'square' (Dense): activation" in msg and "not a known elementwise activation" in msg, msg
    else:  # traced into its operations: the one without a rule is named, inside the layer's activation
        assert "(operation tf.math.cumprod) at 'square/activation/" in msg and "has no LRP handler" in msg, msg


def test_unsupported_raw_operation_is_named_by_its_operation(K):
    """``keras.ops.cumprod`` (Keras 3) / ``tf.math.cumprod`` (tf-keras) between layers has no LRP rule: the
    error names the operation as Keras recorded it and the function the user called."""
    L, ops = K.layers, kit.ops_of(K)
    inp = K.Input((4,))
    h = L.Dense(3, name="d1")(inp)
    model = K.Model(inp, L.Dense(2, name="d2")(ops.cumprod(h, axis=-1)))
    (name,) = raw_op_names(K, model)
    op = sym(K, "cumprod", "math.cumprod")
    with pytest.raises(UnsupportedLayerError) as info:
        lrp_grad.Explainer(model)
    msg = str(info.value)
    assert f"1 layer(s) of model {model.name!r} cannot be explained" in msg, msg
    assert f"  - '{name}' (operation {op}): operation {op} has no LRP handler; " in msg, msg
    assert "Wrap it in a layer and register a handler (lrp_grad.register_handler)" in msg, msg
    ((got_name, got_class, why),) = info.value.layers
    assert (got_name, got_class) == (name, op)
    assert why.startswith(f"operation {op} has no LRP handler; supported operations: ")
    # The named fix works: the same function in a registered layer.
    Sin = type("Sin", (L.Layer,), {"call": lambda self, t: ops.cumprod(t, axis=-1)})
    wrapped = K.Model(inp, model.get_layer("d2")(Sin(name="sin_layer")(h)))
    lrp_grad.register_handler(Sin, "passthrough")
    try:
        R = lrp_grad.explain(wrapped, np.ones((2, 4), np.float32), target=0)
        assert R.shape == (2, 4) and np.all(np.isfinite(R))
    finally:
        lrp_grad.unregister_handler(Sin)


def test_subtracting_two_tensors_is_a_signed_sum(K):
    """``x - y`` of two tensors (``keras.ops.subtract`` or the ``-`` operator) is a sum with weights
    (1, -1) under the merge family's rule (tests/test_zoo_operations.py checks its numbers); a
    constant shift (``x - 1``) passes relevance through."""
    L, ops = K.layers, kit.ops_of(K)
    inp = K.Input((4,))
    h = L.Dense(3, name="d1")(inp)
    g = L.Dense(3, name="d2")(inp)
    d = ops.subtract(h, g)
    e = d - h  # the operator records the same function
    model = K.Model(inp, L.Dense(2, name="head")(e))
    names = raw_op_names(K, model)
    assert len(names) == 2, names
    rules = lrp_grad.Explainer(model, rule=lrp_grad.AlphaBeta(2, 1)).rules
    assert all(rules[n] == lrp_grad.Epsilon(1e-6) for n in names), str(rules)  # merge: epsilon, as Add
    shifted = K.Model(inp, L.Dense(2, name="head2")(h - 1.0))
    assert lrp_grad.explain(shifted, np.ones((2, 4), np.float32)).shape == (2, 4)


def _doubler_class(K):
    # 2 x written with an operation lrp_grad has no rule for (0 cumprod x): looking inside the layer's
    # call finds it and refuses it; a registered handler explains the layer as a whole.
    cumprod = (lambda x: K.ops.cumprod(x, axis=-1)) if K.__name__ == "keras" else (lambda x: tf.math.cumprod(x, axis=-1))

    class Doubler(K.layers.Layer):
        def call(self, x):
            return 2.0 * x + 0.0 * cumprod(x)

    return Doubler


#: A custom layer of each package, both named ``Doubler``.
DOUBLERS = {name: _doubler_class(kit.package(name)) for name in kit.PACKAGES}


def _doubler_model(K):
    inp = K.Input((5,))
    return K.Model(inp, K.layers.Dense(3, name="dense")(DOUBLERS[K.__name__](name="doubler")(inp)))


def test_register_handler_before_and_after(K):
    Doubler = DOUBLERS[K.__name__]
    model = kit.randomize(_doubler_model(K))
    other = next(p for p in kit.PACKAGES if p != K.__name__)
    other_model = _doubler_model(kit.package(other))
    x = np.random.default_rng(0).normal(size=(2, 5)).astype(np.float32)
    with pytest.raises(UnsupportedLayerError, match=r"at 'doubler/[^']*cumprod[^']*': operation \S*cumprod\S* has no LRP handler"):
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
        # Classes are matched exactly: the other package's Doubler is still unknown.
        with pytest.raises(UnsupportedLayerError, match=r"at 'doubler/"):
            lrp_grad.explain(other_model, x)
    finally:
        lrp_grad.unregister_handler(Doubler)
    assert "Doubler" not in lrp_grad.supported_layers()
    with pytest.raises(UnsupportedLayerError, match=r"at 'doubler/"):
        lrp_grad.explain(model, x)
    # Also with the options of the call that worked (explain() caches its compiled pass per model
    # and options; unregistering the handler must not leave it usable there).
    with pytest.raises(UnsupportedLayerError, match=r"at 'doubler/"):
        lrp_grad.explain(model, x, target=0, rule=lrp_grad.Epsilon(1e-9), initial="one")


def test_register_handler_rejects_bad_arguments(K):
    Doubler = DOUBLERS[K.__name__]
    start = r"register_handler: layer_class must be a keras.layers.Layer \(Keras 3\) or tf_keras.layers.Layer subclass, got "
    with pytest.raises(TypeError, match=start + "'Dense'"):
        lrp_grad.register_handler("Dense", "passthrough")
    with pytest.raises(TypeError, match=start + "<"):  # an instance, not the class
        lrp_grad.register_handler(Doubler(name="d"), "passthrough")
    with pytest.raises(ValueError, match=r"unknown handler shortcut 'pass'; use one of \['gradient', 'identity', 'passthrough'\]"):
        lrp_grad.register_handler(Doubler, "pass")
    with pytest.raises(TypeError, match="handler must be a lrp_grad.handlers.Handler or one of .* got 3"):
        lrp_grad.register_handler(Doubler, 3)
    assert "Doubler" not in lrp_grad.supported_layers()  # nothing was registered by the failed calls


# ----------------------------------------------------------------------------- unsupported models

def test_subclassed_model_is_rejected(K):
    L = K.layers

    class Net(K.Model):
        def __init__(self):
            super().__init__(name="net")
            self.dense = L.Dense(2)

        def call(self, x):
            return self.dense(x)

    net = Net()
    net(np.zeros((1, 3), np.float32))
    pkg = K.__name__
    with pytest.raises(UnsupportedModelError) as info:
        lrp_grad.Explainer(net)
    msg = str(info.value)
    assert f"model 'net' (Net) is a subclassed {pkg}.Model; lrp_grad needs the layer graph" in msg, msg
    assert f"Functional API (inputs = {pkg}.Input(...); outputs = ...; {pkg}.Model(inputs, outputs))" in msg, msg
    # Used as a layer of a Functional model, it is a layer without a handler.
    inp = K.Input((3,))
    outer = K.Model(inp, L.Dense(2, name="head")(net(inp)), name="outer")
    with pytest.raises(UnsupportedLayerError) as info:
        lrp_grad.Explainer(outer)
    assert ("1 layer(s) of model 'outer' cannot be explained:\n"
            "  - 'net' (Net): no handler for this layer class (a subclassed model used as a layer)") in str(info.value)
    assert [(n, c) for n, c, _ in info.value.layers] == [("net", "Net")]


def test_unbuilt_sequential_is_rejected_with_the_fix(K):
    L = K.layers
    model = K.Sequential([L.Dense(2)], name="unbuilt")
    with pytest.raises(UnsupportedModelError) as info:
        lrp_grad.Explainer(model)
    msg = str(info.value)
    assert "Sequential model 'unbuilt' has no known input shape yet" in msg, msg
    assert f"{K.__name__}.Input(shape)" in msg and "model.build((None, ...))" in msg, msg
    model.build((None, 3))
    assert lrp_grad.explain(model, np.ones((1, 3))).shape == (1, 3)
    called = K.Sequential([L.Dense(2)], name="called")
    called(np.ones((1, 4), np.float32))  # calling it on data builds it too
    assert lrp_grad.explain(called, np.ones((1, 4))).shape == (1, 4)


def test_multi_output_model_without_output_is_refused_with_the_names(K):
    L = K.layers
    a = K.Input((3,), name="a")
    two_out = K.Model(a, [L.Dense(2, name="cls")(a), L.Dense(3, name="box")(a)], name="two_out")
    with pytest.raises(UnsupportedModelError,
                       match=r"model 'two_out' has 2 outputs \('cls', 'box'\); say which one to explain: "
                             r"Explainer\(model, output='cls'\) or output=0"):
        lrp_grad.Explainer(two_out)
    with pytest.raises(UnsupportedModelError, match=r"output='nope' is neither an output of model 'two_out' "
                                                    r"\('cls', 'box'\) nor one of its layers \('(cls|box)', '(box|cls)'\)"):
        lrp_grad.Explainer(two_out, output="nope")
    with pytest.raises(UnsupportedModelError, match=r"output=2 is out of range: model 'two_out' has 2 output"):
        lrp_grad.Explainer(two_out, output=2)
    with pytest.raises(UnsupportedModelError, match=r"output=1.5 must be an output name"):
        lrp_grad.Explainer(two_out, output=1.5)
    assert lrp_grad.Explainer(two_out, output="box").n_classes == 3
    assert lrp_grad.Explainer(two_out, output=0).output_name == "cls"


def test_non_model_and_output_without_a_predicted_class(K):
    with pytest.raises(UnsupportedModelError, match=r"must be a keras.Model \(Keras 3\) or a tf_keras.Model.*got str.*lrp_grad.load_model\(path\)"):
        lrp_grad.Explainer("model.h5")
    # A layer of the package is not a model either; the message names its class and module.
    with pytest.raises(UnsupportedModelError) as info:
        lrp_grad.Explainer(K.layers.Dense(2))
    msg = str(info.value)
    assert msg.startswith("model must be a keras.Model (Keras 3) or a tf_keras.Model, Sequential or Functional; "
                          f"got Dense ({K.__name__}."), msg
    inp = K.Input((4, 4, 1))
    seg = K.Model(inp, K.layers.Conv2D(2, 1, name="seg")(inp))
    with pytest.raises(InvalidTargetError, match=r"output 'seg' has shape \(None, 4, 4, 2\), which has no predicted "
                                                 r"class; pass target= a channel index"):
        lrp_grad.explain(seg, np.ones((1, 4, 4, 1)))


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
        lrp_grad.Explainer(ex.model, jit_compile="yes")


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
