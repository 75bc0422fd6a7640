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


def test_float64_resizes_compile_under_xla(K):
    """A float64 model's bilinear resizes explain under jit_compile too (XLA refused the float32
    resize gradient of a float64 image with a raw error); the result is the eager one to float32
    precision, the resize's own."""
    x = np.random.default_rng(4).uniform(0, 1, (2, 4, 4, 2))
    for model in _resize_models(K):
        model = kit.randomize(model, seed=5)
        eager = lrp_grad.Explainer(model, rule=lrp_grad.Epsilon(1e-6))(x, target=1)
        xla = lrp_grad.Explainer(model, rule=lrp_grad.Epsilon(1e-6), jit_compile=True)(x, target=1)
        kit.assert_close(xla, eager, 1e-5, model.name)


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
    explained as a Dropout. A subclass that overrides ``call`` is explained through what its call
    does: a weight-standardised Conv2D is a convolution with a computed (constant) kernel, the
    same relevance as a Conv2D holding that kernel."""
    L = K.layers

    class FixedDropout(L.Dropout):
        def _get_noise_shape(self, inputs):
            return None

    class Doubling(L.Dropout):
        def call(self, inputs, training=None):
            return 2.0 * inputs

    class StandardizedConv(L.Conv2D):
        def convolution_op(self, inputs, kernel):
            return super().convolution_op(inputs, kernel - tf.reduce_mean(kernel))

    def build(layer):
        inp = K.Input((4, 4, 2))
        h = layer(L.Conv2D(3, 3, activation="relu", name="c")(inp))
        return K.Model(inp, L.Dense(2, name="d")(L.Flatten()(h)))

    fixed, plain = build(FixedDropout(0.2, name="drop")), build(L.Dropout(0.2, name="drop"))
    plain.set_weights(fixed.get_weights())
    x = np.random.default_rng(11).uniform(0, 1, (2, 4, 4, 2)).astype("float32")
    np.testing.assert_array_equal(lrp_grad.explain(fixed, x), lrp_grad.explain(plain, x))
    doubling, rescaled = build(Doubling(0.1, name="doubling")), build(L.Rescaling(2.0, name="doubling"))
    rescaled.set_weights(doubling.get_weights())
    kit.assert_close(lrp_grad.explain(doubling, x), lrp_grad.explain(rescaled, x), 1e-6, "2 x looked into")
    inp = K.Input((4, 4, 2))
    conv = K.Model(inp, L.Dense(2, name="d")(L.Flatten()(StandardizedConv(3, 3, name="ws")(inp))))
    twin = K.Model(inp, L.Dense(2, name="d")(L.Flatten()(L.Conv2D(3, 3, name="ws")(inp))))
    kernel, bias = conv.get_layer("ws").get_weights()
    twin.get_layer("ws").set_weights([kernel - kernel.mean(), bias])
    twin.get_layer("d").set_weights(conv.get_layer("d").get_weights())
    np.testing.assert_allclose(conv(x).numpy(), twin(x).numpy(), rtol=1e-5, atol=1e-6)
    # looked into: a convolution with a computed (constant) kernel, then a shift by the bias
    eps = lrp_grad.Composite([("linear", lrp_grad.Epsilon(1e-9, bias=False))])
    kit.assert_close(lrp_grad.Explainer(conv, rule=eps)(x), lrp_grad.Explainer(twin, rule=eps)(x), 1e-5,
                     "weight-standardised conv looked into")


def test_user_function_named_like_a_builtin_is_not_the_builtin(K):
    """``def relu(t): return leaky_relu(t)`` as an activation is the user's function: traced into its
    operations (the explained forward is the model's, not ReLU's), and refused by its name and
    module when it cannot be traced (TensorFlow called on a Keras 3 symbolic tensor)."""
    L = K.layers
    keras3 = K.__name__ == "keras"

    def relu(t):
        return K.ops.leaky_relu(t, 0.3) if keras3 else tf.nn.leaky_relu(t, 0.3)

    inp = K.Input((6,))
    model = kit.randomize(K.Model(inp, L.Dense(2)(L.Dense(4, activation=relu, name="mine")(inp))), seed=5)
    x = np.random.default_rng(6).normal(size=(8, 6)).astype("float32")
    np.testing.assert_allclose(lrp_grad.Explainer(model).forward(x), model(x).numpy(), rtol=1e-6, atol=1e-6)
    if keras3:
        def tf_relu(t):
            return tf.nn.leaky_relu(t, 0.3)

        refused = K.Model(inp, L.Dense(2)(L.Dense(4, activation=tf_relu, name="mine2")(inp)))
        with pytest.raises(lrp_grad.UnsupportedLayerError,
                           match=r"'mine2' \(Dense\): activation \"function '.*tf_relu' \(from module "
                                 r"'test_zoo_operations'\)\" is not a known elementwise activation"):
            lrp_grad.Explainer(refused)
    ok = K.Model(inp, L.Dense(2)(L.Dense(4, activation=tf.nn.relu)(inp)))  # TensorFlow's own: the built-in
    lrp_grad.Explainer(ok)


# ------------------------------------------------------------------- looking inside user layers --

def _user_layers(K):
    """A user's own subclassed layers: a position embedding and a class token (weights used directly
    in ``call``: constants added to the signal) and a transformer block made of stock layers and
    operations."""
    L = K.layers
    keras3 = K.__name__ == "keras"

    class PositionEmbedding(L.Layer):
        def build(self, shape):
            self.pos = self.add_weight(shape=tuple(shape[1:]), initializer="random_normal", name="pos")

        def call(self, x):
            return x + self.pos

    class ClassToken(L.Layer):
        def build(self, shape):
            self.cls = self.add_weight(shape=(1, 1, shape[-1]), initializer="random_normal", name="cls")

        def call(self, x):
            if keras3:  # Keras 3 traces with an unknown batch size: the token is built from x's shape
                return K.ops.concatenate([K.ops.zeros_like(x[:, :1]) + self.cls, x], axis=1)
            return tf.concat([tf.repeat(self.cls, tf.shape(x)[0], axis=0), x], axis=1)  # tf.shape: no relevance

    class Block(L.Layer):
        def __init__(self, dim, heads, **kw):
            super().__init__(**kw)
            self.ln1, self.ln2 = L.LayerNormalization(), L.LayerNormalization()
            self.attn = L.MultiHeadAttention(heads, dim // heads)
            self.fc1, self.fc2 = L.Dense(2 * dim, activation="gelu"), L.Dense(dim)

        def call(self, x):
            h = self.ln1(x)
            x = x + self.attn(h, h)
            return x + self.fc2(self.fc1(self.ln2(x)))

    return PositionEmbedding, ClassToken, Block


def _user_vit(K):
    L = K.layers
    PositionEmbedding, ClassToken, Block = _user_layers(K)
    inp = K.Input((8, 8, 1))
    x = L.Reshape((4, 16))(L.Conv2D(16, 4, strides=4)(inp))
    x = ClassToken(name="cls")(PositionEmbedding(name="pos")(x))
    x = Block(16, 2, name="block1")(Block(16, 2, name="block0")(x))
    x = L.Lambda(lambda t: t[:, 0], name="take_cls")(L.LayerNormalization()(x))
    return K.Model(inp, L.Dense(3)(x))


def test_a_user_block_is_explained_through_what_it_calls(K):
    """A subclassed block without a handler is run on symbolic inputs and explained through its
    sublayers and operations: the same relevance, bit for bit, as the same layer objects wired as a
    functional sub-model."""
    L = K.layers
    _, _, Block = _user_layers(K)
    block = Block(8, 2, name="block")
    inp = K.Input((4, 8))
    subclassed = K.Model(inp, L.Dense(3, name="head")(L.Flatten()(block(inp))))
    h = K.Input((4, 8))
    a = block.ln1(h)
    x = L.Add()([h, block.attn(a, a)])
    wired = K.Model(h, L.Add()([x, block.fc2(block.fc1(block.ln2(x)))]), name="wired")
    inp2 = K.Input((4, 8))
    functional = K.Model(inp2, subclassed.get_layer("head")(L.Flatten()(wired(inp2))))
    x = np.random.default_rng(12).normal(size=(2, 4, 8)).astype("float32")
    np.testing.assert_allclose(subclassed(x).numpy(), functional(x).numpy(), rtol=1e-6, atol=1e-6)
    for rule in (lrp_grad.AttnLRP(), lrp_grad.CPLRP(), lrp_grad.AlphaBeta(2, 1)):
        kit.assert_close(lrp_grad.Explainer(subclassed, rule=rule)(x), lrp_grad.Explainer(functional, rule=rule)(x),
                         1e-6, f"block looked into vs wired ({rule!r})")
    labels = list(lrp_grad.Explainer(subclassed).rules)
    assert {"block/ln1", "block/fc1", "block/fc2"} <= {label.rsplit("#", 1)[0] for label in labels} or \
        sum(label.startswith("block/") for label in labels) >= 6, labels  # the block's parts, by path


def test_a_vit_of_user_layers_with_class_token_and_position_embedding(K):
    model = kit.randomize(_user_vit(K), seed=13)
    x = np.random.default_rng(14).normal(size=(2, 8, 8, 1)).astype("float32")
    before = [w.copy() for w in model.get_weights()]
    ex = lrp_grad.Explainer(model, rule=lrp_grad.AttnLRP())
    np.testing.assert_allclose(ex.forward(x), model(x).numpy(), rtol=1e-5, atol=1e-5)
    R, report = ex(x, return_layers=True)
    assert np.all(np.isfinite(R)) and np.abs(R).sum() > 0
    kit.assert_close(lrp_grad.Explainer(model, rule=lrp_grad.AttnLRP(), jit_compile=True)(x), R, 1e-5, "XLA")
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))


def test_a_vit_of_user_layers_keras3_equals_tf_keras():
    k3, k2 = kit.package("keras"), kit.package("tf_keras")
    m3 = kit.randomize(_user_vit(k3), seed=15)
    m2 = _user_vit(k2)
    m2.set_weights(m3.get_weights())
    x = np.random.default_rng(16).normal(size=(2, 8, 8, 1)).astype("float32")
    np.testing.assert_allclose(m2(x).numpy(), m3(x).numpy(), rtol=1e-5, atol=1e-5)
    for rule in (lrp_grad.AttnLRP(), lrp_grad.CPLRP()):
        kit.assert_close(lrp_grad.explain(m2, x, rule=rule), lrp_grad.explain(m3, x, rule=rule), 1e-4, repr(rule))


def test_lambda_and_activation_of_a_python_function_are_traced(K):
    """``Lambda(fn)`` and ``Activation(fn)`` are explained through the operations ``fn`` applies;
    the same relevance as the twin written with those operations."""
    L = K.layers

    def double_relu(t):
        return K.ops.relu(t) * 2.0 if K.__name__ == "keras" else tf.nn.relu(t) * 2.0

    def build(twin):
        inp = K.Input((6,), **F64)
        h = L.Dense(4, name="d1", **F64)(inp)
        h = (double_relu(h) if twin else L.Activation(double_relu, name="act", **F64)(h))
        h = L.Dense(4, name="d2", **F64)(h)
        h = (h * 3.0 - 1.0) if twin else L.Lambda(lambda t: t * 3.0 - 1.0, name="lam", **F64)(h)
        return K.Model(inp, L.Dense(2, name="head", **F64)(h))

    model, twin = kit.randomize(build(False), seed=17), build(True)
    for name in ("d1", "d2", "head"):
        twin.get_layer(name).set_weights(model.get_layer(name).get_weights())
    x = np.random.default_rng(18).normal(size=(3, 6))
    for rule in (lrp_grad.Epsilon(), lrp_grad.AlphaBeta(2, 1)):
        kit.assert_close(lrp_grad.Explainer(model, rule=rule)(x), lrp_grad.Explainer(twin, rule=rule)(x), 1e-10,
                         repr(rule))


def _batch_reading_layers(K):
    """Layers whose call reads the batch size, the way zoo layers do: a class token tiled per image
    (the size taken from ``shape(x)[0]``), a window partition into ``2 * B`` windows and back with a
    layer inside that reads the number of images from the windows (Swin's window attention), a
    reshape to heads by ``(B, -1, 2, 2)``, and a layer whose output is computed from its weights
    alone (a rotary table)."""
    L = K.layers
    keras3 = K.__name__ == "keras"
    def shape_of(t):
        return K.ops.shape(t) if keras3 else tf.shape(t)

    def tile(t, reps):
        return K.ops.tile(t, reps) if keras3 else tf.tile(t, reps)

    def concat(ts):
        return K.ops.concatenate(ts, axis=1) if keras3 else tf.concat(ts, axis=1)

    def reshape(t, s):
        return K.ops.reshape(t, s) if keras3 else tf.reshape(t, s)

    class TiledToken(L.Layer):
        def build(self, shape):
            self.token = self.add_weight(shape=(1, 1, shape[-1]), initializer="random_normal", name="token")

        def call(self, x):
            return concat([tile(self.token, (shape_of(x)[0], 1, 1)), x])

    class SwapWindows(L.Layer):  # called on windows: reads the number of images as B * 2 // 2
        def call(self, w):
            images, n, dim = shape_of(w)[0] // 2, w.shape[1], w.shape[2]
            v = reshape(w, (images, 2, n, dim))[:, ::-1]
            return reshape(v, (images * 2, n, dim))

    class Windows(L.Layer):
        def __init__(self, **kw):
            super().__init__(**kw)
            self.inner = L.Dense(4, activation="relu")
            self.swap = SwapWindows()

        def call(self, x):
            batch, length, dim = shape_of(x)[0], x.shape[1], x.shape[2]
            w = reshape(x, (batch * 2, length // 2, dim))  # two windows per image
            return reshape(self.swap(self.inner(w)), (batch, length, 4))

    class Heads(L.Layer):  # Keras 3 records reshape(x, (None, -1, 2, 2)) on an unknown batch size
        def call(self, x):
            batch = shape_of(x)[0]
            return reshape(reshape(x, (batch, -1, 2, 2))[:, :, ::-1], (batch, x.shape[1], x.shape[2]))

    class Table(L.Layer):
        def build(self, shape):
            self.table = self.add_weight(shape=(1,) + tuple(shape[1:]), initializer="random_normal", name="table")

        def call(self, x):
            return self.table * 2.0  # does not read x

    return TiledToken, Windows, Table, Heads


def _batch_reading_model(K):
    L = K.layers
    TiledToken, Windows, Table, Heads = _batch_reading_layers(K)
    inp = K.Input((7, 3))
    h = L.Dense(4, activation="relu")(inp)
    h = Heads(name="heads")(Windows(name="windows")(TiledToken(name="token")(h)))
    h = L.Add()([h, Table(name="table")(h)])
    return K.Model(inp, L.Dense(3)(L.Flatten()(L.ReLU()(h))), name="batch_reading")


def test_a_layer_that_reads_the_batch_size_is_traced_at_two_sizes(K):
    """A call that needs the batch size as a number (which symbolic tracing leaves unknown) is traced
    at two batch sizes and replays with the run's: LRP-0 is gradient x input on this ReLU network,
    at batch sizes other than the traced ones, image by image as in a batch, and the output that
    does not depend on the input is a constant (relevance absorbed like a bias)."""
    model = kit.randomize(_batch_reading_model(K), seed=21)
    x = np.random.default_rng(22).normal(size=(7, 7, 3)).astype("float32")
    for n in (1, 2, 7):
        _lrp0_is_gradient_x_input(model, x[:n], tol=2e-5)
    explainer = lrp_grad.Explainer(model, rule=lrp_grad.Epsilon())
    kit.assert_close(explainer(x[:1]), explainer(x)[:1], 1e-5, "one image vs in a batch")
    labels = [s.node.label for s in explainer._passes.plan.steps] if hasattr(explainer, "_passes") else []
    assert not labels or any(label.startswith("windows/") for label in labels), labels


def test_a_block_returning_its_input_or_one_tensor_twice(K):
    """A looked-into layer may return its input as it is (a DropPath at inference) or one tensor in
    two places (an encoder's output and its list of hidden states): the same relevance as the
    functional twin with the same weights."""
    L = K.layers

    class DropPath(L.Layer):
        def call(self, x, training=None):
            return x

    class Encoder(L.Layer):
        def __init__(self, **kw):
            super().__init__(**kw)
            self.dense = L.Dense(4, name="inner")

        def call(self, x):
            h = self.dense(x)
            return h, [x, h]

    inp = K.Input((5,), **F64)
    h = L.Dense(4, activation="relu", name="first", **F64)(inp)
    out, (a, b) = Encoder(name="encoder", **F64)(DropPath(name="drop", **F64)(h))
    model = kit.randomize(K.Model(inp, L.Dense(2, name="head", **F64)(L.Concatenate()([out, a, b]))), seed=23)
    inp2 = K.Input((5,), **F64)
    h2 = model.get_layer("first")(inp2)
    inner = model.get_layer("encoder").dense(h2)
    twin = K.Model(inp2, model.get_layer("head")(L.Concatenate()([inner, h2, inner])))
    x = np.random.default_rng(24).normal(size=(3, 5))
    kit.assert_close(twin(x).numpy(), model(x).numpy(), 1e-12, "forward")
    for rule in (lrp_grad.Epsilon(), lrp_grad.AlphaBeta(2, 1)):
        kit.assert_close(lrp_grad.Explainer(model, rule=rule)(x), lrp_grad.Explainer(twin, rule=rule)(x), 1e-10,
                         repr(rule))


def test_a_sublayer_returning_none_among_its_outputs(K):
    """keras-hub's encoder blocks return ``(x, None)`` when no attention scores are asked for, and
    the encoder an empty constant for its hidden states: looked into, the ``None`` is no output and
    the constant is a constant; the same relevance as the functional twin."""
    L = K.layers
    keras3 = K.__name__ == "keras"

    class ScoredBlock(L.Layer):
        def __init__(self, **kw):
            super().__init__(**kw)
            self.dense = L.Dense(4, activation="relu", name=f"{self.name}_inner")

        def call(self, x, return_scores=False):
            return self.dense(x), None

    class Encoder(L.Layer):
        def __init__(self, **kw):
            super().__init__(**kw)
            self.blocks = [ScoredBlock(name=f"b{i}") for i in range(2)]

        def call(self, x):
            for block in self.blocks:
                x, _ = block(x)
            empty = K.ops.zeros((0, 4)) if keras3 else tf.zeros((0, 4))
            return x, empty

    inp = K.Input((4,), **F64)
    out, _ = Encoder(name="encoder", **F64)(inp)
    model = kit.randomize(K.Model(inp, L.Dense(2, name="head", **F64)(out)), seed=25)
    inp2 = K.Input((4,), **F64)
    h = inp2
    for block in model.get_layer("encoder").blocks:
        h = block.dense(h)
    twin = K.Model(inp2, model.get_layer("head")(h))
    x = np.random.default_rng(26).normal(size=(3, 4))
    kit.assert_close(lrp_grad.Explainer(model)(x), lrp_grad.Explainer(twin)(x), 1e-10, "None among outputs")


def test_attention_pooling_from_a_learned_probe(K):
    """SigLIP-style attention pooling: a learned probe, tiled per image, attends to the tokens. The
    probe is a constant of the graph (its share of relevance absorbed like a bias's): the tokens get
    the same relevance as in the twin that is given the tiled probe as a second input."""
    L = K.layers
    keras3 = K.__name__ == "keras"

    class Pooling(L.Layer):
        def __init__(self, **kw):
            super().__init__(**kw)
            self.attention = L.MultiHeadAttention(2, 3, name="mha", **F64)

        def build(self, shape):
            self.probe = self.add_weight(shape=(1, 1, shape[-1]), initializer="random_normal", name="probe")
            if keras3:
                self.attention.build((None, 1, shape[-1]), tuple(shape))

        def call(self, x):
            batch = K.ops.shape(x)[0] if keras3 else tf.shape(x)[0]
            probes = K.ops.repeat(self.probe, batch, axis=0) if keras3 else tf.repeat(self.probe, batch, axis=0)
            return self.attention(probes, x, x)[:, 0]

    inp = K.Input((5, 4), **F64)
    tokens = L.Dense(4, name="tokens", **F64)(inp)
    pooling = Pooling(name="pool", **F64)
    model = kit.randomize(K.Model(inp, L.Dense(2, name="head", **F64)(pooling(tokens))), seed=27)
    inp2, probe = K.Input((5, 4), **F64), K.Input((1, 4), **F64)
    t2 = model.get_layer("tokens")(inp2)
    twin = K.Model([inp2, probe], model.get_layer("head")(L.Reshape((4,), **F64)(pooling.attention(probe, t2, t2))))
    x = np.random.default_rng(28).normal(size=(3, 5, 4))
    probes = np.repeat(pooling.probe.numpy()[None, 0], 3, axis=0)
    kit.assert_close(model(x).numpy(), twin([x, probes]).numpy(), 1e-12, "forward")
    for rule in (lrp_grad.AttnLRP(), lrp_grad.CPLRP()):
        R = lrp_grad.Explainer(model, rule=rule)(x, target=1)
        R_twin = lrp_grad.Explainer(twin, rule=rule)([x, probes], target=1)[0]
        kit.assert_close(R, R_twin, 1e-9, repr(rule))


def test_a_layer_whose_activation_is_a_python_function(K):
    """``Dense(activation=my_gelu)`` (keras-hub's ``gelu_approximate``): the layer's linear part takes
    its rule and the function is traced into its operations after it, exactly as ``Dense`` followed
    by a ``Lambda`` of the same function."""
    L = K.layers
    keras3 = K.__name__ == "keras"

    def my_swish(t):
        return t * (K.ops.sigmoid(t) if keras3 else tf.math.sigmoid(t))

    inp = K.Input((6,), **F64)
    h = L.Dense(5, activation=my_swish, name="d1", **F64)(inp)
    model = kit.randomize(K.Model(inp, L.Dense(2, name="head", **F64)(h)), seed=29)
    inp2 = K.Input((6,), **F64)
    d1 = L.Dense(5, name="d1", **F64)
    h2 = L.Lambda(my_swish, name="act", **F64)(d1(inp2))
    twin = K.Model(inp2, L.Dense(2, name="head", **F64)(h2))
    for name in ("d1", "head"):
        twin.get_layer(name).set_weights(model.get_layer(name).get_weights())
    x = np.random.default_rng(30).normal(size=(3, 6))
    kit.assert_close(model(x).numpy(), twin(x).numpy(), 1e-12, "forward")
    for rule in (lrp_grad.Epsilon(), lrp_grad.AlphaBeta(2, 1), lrp_grad.AttnLRP()):
        explainer = lrp_grad.Explainer(model, rule=rule)
        kit.assert_close(explainer(x, target=1), lrp_grad.Explainer(twin, rule=rule)(x, target=1), 1e-10, repr(rule))
    assert "d1" in explainer.rules, explainer.rules  # the linear part keeps its rule


def test_a_sublayer_called_with_training_it_does_not_take(K):
    """A block passing ``training=`` to a sublayer whose call does not take it (Keras drops it; so
    does the look-inside): explained like the functional twin."""
    L = K.layers

    class MLP(L.Layer):
        def __init__(self, **kw):
            super().__init__(**kw)
            self.fc = L.Dense(4, activation="relu", name="fc", **F64)

        def call(self, x):
            return self.fc(x)

    class Block(L.Layer):
        def __init__(self, **kw):
            super().__init__(**kw)
            self.mlp = MLP(name="mlp", **F64)

        def call(self, x, training=None):
            return x + self.mlp(x, training=training)

    inp = K.Input((4,), **F64)
    block = Block(name="block", **F64)
    model = kit.randomize(K.Model(inp, L.Dense(2, name="head", **F64)(block(inp))), seed=31)
    inp2 = K.Input((4,), **F64)
    twin = K.Model(inp2, model.get_layer("head")(L.Add()([inp2, block.mlp.fc(inp2)])))
    x = np.random.default_rng(32).normal(size=(3, 4))
    kit.assert_close(lrp_grad.Explainer(model)(x), lrp_grad.Explainer(twin)(x), 1e-10, "training= dropped")


def test_a_layer_using_the_batch_size_otherwise_is_refused_by_operation():
    """A size that is not a whole multiple of the batch size (here ``B // 2`` rows) cannot be replayed at
    another batch size: refused naming the operation, the layer around it and why."""
    K = kit.package("keras")

    class Halves(K.layers.Layer):
        def call(self, x):
            batch = K.ops.shape(x)[0]
            return K.ops.reshape(K.ops.reshape(x, (batch // 2, -1)), (batch, x.shape[-1]))

    inp = K.Input((4,))
    model = K.Model(inp, K.layers.Dense(2)(Halves(name="halves")(inp)))
    with pytest.raises(lrp_grad.UnsupportedLayerError,
                       match=r"\(operation keras.ops.reshape\) at 'halves/[a-z_0-9]+': its call uses the batch size in a "
                             r"way lrp_grad cannot follow \(only sizes that are whole multiples of the batch size.*\): "
                             r"output 0 of 'halves/[a-z_0-9]+' has shape \(1, 12\) at batch size 3 and \(2, 10\) at "
                             r"batch size 5"):
        lrp_grad.Explainer(model)


def test_a_layer_whose_call_fails_is_refused_with_the_reason():
    """A call that fails on symbolic tensors for another reason (a Keras 3 layer calling TensorFlow
    directly) is refused naming the layer and the error it raised."""
    K = kit.package("keras")

    class NeedsNumbers(K.layers.Layer):
        def call(self, x):
            return x * tf.math.reduce_max(x)

    inp = K.Input((4,))
    model = K.Model(inp, K.layers.Dense(2)(NeedsNumbers(name="numbers")(inp)))
    with pytest.raises(lrp_grad.UnsupportedLayerError, match=r"'numbers' \(NeedsNumbers\): no handler for this layer "
                                                             r"class; looking inside its call failed at \w+Error"):
        lrp_grad.Explainer(model)


def test_division_by_a_norm_holds_the_divisor_constant(K):
    """``h / sqrt(sum(h^2))`` (a hand-written normalisation, GRN-style): the divisor is a scale held
    constant, so all relevance reaches the numerator and the statistics branch (square, sum, sqrt:
    elementwise maths and a reduction) gets none; the same relevance as the twin that divides by
    the same numbers given as a second input."""
    L, ops = K.layers, kit.ops_of(K)
    keras3 = K.__name__ == "keras"
    square = (lambda t: K.ops.square(t)) if keras3 else (lambda t: tf.math.square(t))
    sqrt = (lambda t: K.ops.sqrt(t)) if keras3 else (lambda t: tf.math.sqrt(t))
    total = (lambda t: K.ops.sum(t, axis=-1, keepdims=True)) if keras3 else (
        lambda t: tf.math.reduce_sum(t, axis=-1, keepdims=True))
    inp = K.Input((6,), **F64)
    h = L.Dense(4, name="h", **F64)(inp)
    y = ops.divide(h, sqrt(total(square(h))) + 1.0)
    model = kit.randomize(K.Model(inp, L.Dense(2, name="head", **F64)(y)), seed=19)
    scale = K.Input((1,), **F64)
    twin = K.Model([inp, scale], L.Dense(2, name="head2", **F64)(ops.divide(model.get_layer("h")(inp), scale)))
    twin.get_layer("head2").set_weights(model.get_layer("head").get_weights())
    x = np.random.default_rng(20).normal(size=(3, 6))
    hx = model.get_layer("h")(x).numpy()
    norm = np.sqrt((hx ** 2).sum(-1, keepdims=True)) + 1.0
    np.testing.assert_allclose(model(x).numpy(), twin([x, norm]).numpy(), rtol=1e-12)
    R = lrp_grad.Explainer(model, rule=lrp_grad.Epsilon())(x, target=1)
    R_twin, _ = lrp_grad.Explainer(twin, rule=lrp_grad.Epsilon())([x, norm], target=1)
    kit.assert_close(R, R_twin, 1e-10, "x / norm(x) vs x / given scale")


def test_a_broadcasting_sum_is_an_add_of_the_copies(K):
    """``h + b`` where ``b`` broadcasts (a relative position bias, a per-token offset): relevance as
    for the twin that broadcasts ``b`` explicitly first (the copies' relevance summed back);
    LRP-0 = gradient x input on the bias-free ReLU network."""
    L, ops = K.layers, kit.ops_of(K)
    inp = K.Input((4, 6), **F64)
    h = L.Dense(6, activation="relu", name="h", **F64)(inp)
    g = L.Dense(6, name="g", **F64)(L.GlobalAveragePooling1D(keepdims=True, **F64)(inp))  # (None, 1, 6)
    model = _bias_free(kit.randomize(K.Model(inp, L.Dense(2, name="head", **F64)(L.Flatten(**F64)(h + g))), seed=21))
    x = np.random.default_rng(22).normal(size=(3, 4, 6))
    _lrp0_is_gradient_x_input(model, x)
    R, report = lrp_grad.Explainer(model, rule=lrp_grad.Epsilon(1e-12))(x, target=1, return_layers=True)
    np.testing.assert_allclose(R.reshape(3, -1).sum(1), report.output, rtol=1e-6)


def test_kecam_style_custom_layers_are_explained(K):
    """What the kecam zoo writes inside its layers: a patch embedding convolving with its own
    kernel (``tf.nn.convolution(x, self.kernel)`` + ``bias_add``), a hard sigmoid by
    ``clip_by_value`` gating a squeeze-and-excitation product, and an l2 normalisation (its scale
    held constant): explained, the forward equal to the model's."""
    L = K.layers
    keras3 = K.__name__ == "keras"

    class PatchConv(L.Layer):
        def build(self, shape):
            self.kernel = self.add_weight(shape=(2, 2, shape[-1], 4), name="kernel")
            self.bias = self.add_weight(shape=(4,), initializer="random_normal", name="bias")

        def call(self, x):
            if keras3:
                return K.ops.conv(x, self.kernel, strides=2) + self.bias
            return tf.nn.bias_add(tf.nn.convolution(x, self.kernel, strides=2), self.bias)

    def hard_sigmoid_torch(t):
        return K.ops.clip(t / 6 + 0.5, 0.0, 1.0) if keras3 else tf.clip_by_value(t / 6 + 0.5, 0.0, 1.0)

    def l2n(t):
        return K.ops.normalize(t, axis=-1) if keras3 else tf.math.l2_normalize(t, axis=-1)

    inp = K.Input((8, 8, 3))
    h = PatchConv(name="patch")(inp)
    g = L.Activation(hard_sigmoid_torch, name="gate")(L.Dense(4)(L.GlobalAveragePooling2D(keepdims=True)(h)))
    h = L.Lambda(l2n, name="l2n")(L.Multiply()([h, g]))
    model = K.Model(inp, L.Dense(3)(L.Flatten()(h)))
    x = np.random.default_rng(23).uniform(0, 1, (2, 8, 8, 3)).astype("float32")
    ex = lrp_grad.Explainer(model, rule=lrp_grad.Epsilon())
    np.testing.assert_allclose(ex.forward(x), model(x).numpy(), rtol=1e-5, atol=1e-6)
    R, report = ex(x, return_layers=True)
    assert np.all(np.isfinite(R)) and np.abs(R).sum() > 0
    assert all(np.all(v == 0) for k, v in report.items() if k.startswith("gate")), "the gate branch gets none"


def test_a_broadcasting_difference_is_a_signed_sum_of_the_copies(K):
    """``h - mean(h)`` over positions (MogaNet's feature decomposition): LRP-0 = gradient x input."""
    L, ops = K.layers, kit.ops_of(K)
    inp = K.Input((4, 4, 3), **F64)
    h = L.Conv2D(4, 3, padding="same", activation="relu", **F64)(inp)
    m = L.GlobalAveragePooling2D(keepdims=True, **F64)(h)
    model = _bias_free(kit.randomize(K.Model(inp, L.Dense(2, **F64)(L.Flatten(**F64)(ops.subtract(h, m)))), seed=24))
    x = np.random.default_rng(25).uniform(0, 1, (2, 4, 4, 3))
    _lrp0_is_gradient_x_input(model, x)


def _difference_spellings(K):
    """Every way a model writes a sum or difference of two tensors, by name."""
    L = K.layers
    spells = {"a - b": lambda a, b: a - b, "a + b": lambda a, b: a + b,
              "Subtract": lambda a, b: L.Subtract(**F64)([a, b]), "Add": lambda a, b: L.Add(**F64)([a, b])}
    if K.__name__ == "keras":
        spells.update({"keras.ops.subtract": K.ops.subtract, "keras.ops.add": K.ops.add})
    else:
        spells.update({"tf.math.subtract": tf.math.subtract, "tf.subtract": tf.subtract,
                       "tf.math.add": tf.math.add, "tf.add": tf.add})
    return spells


def test_every_spelling_of_a_broadcasting_sum_or_difference_is_a_signed_sum(K):
    """``x - m`` and ``x + m`` with ``m`` broadcast over positions (MogaNet's ``tf.math.subtract`` of
    (None, 16, 16, 32) and (None, 1, 1, 32)), in every spelling, either operand first: the signed
    sum of the copies, so LRP-0 = gradient x input on the bias-free ReLU network, and the same
    relevance as the twin that broadcasts ``m`` explicitly first under alpha-beta."""
    L = K.layers
    x = np.random.default_rng(26).uniform(0, 1, (2, 4, 4, 3))
    for name, f in _difference_spellings(K).items():
        for small_first in (False, True):
            def build(twin):
                inp = K.Input((4, 4, 3), **F64)
                h = L.Conv2D(4, 3, padding="same", activation="relu", name="c", **F64)(inp)
                m = L.GlobalAveragePooling2D(keepdims=True, **F64)(h)
                if twin:  # the copies made explicit: a same-shape sum or difference
                    m = L.UpSampling2D(4, **F64)(m)
                d = f(m, h) if small_first else f(h, m)
                return K.Model(inp, L.Dense(2, name="head", **F64)(L.Flatten(**F64)(d)))

            model, twin = _bias_free(kit.randomize(build(False), seed=27)), build(True)
            twin.set_weights(model.get_weights())
            what = f"{name} ({'small' if small_first else 'large'} operand first)"
            _lrp0_is_gradient_x_input(model, x)
            rule = lrp_grad.Composite([("linear", lrp_grad.AlphaBeta(2, 1))])
            kit.assert_close(lrp_grad.Explainer(model, rule=rule)(x, target=1),
                             lrp_grad.Explainer(twin, rule=rule)(x, target=1), 1e-10, what)


def test_a_difference_of_tensors_of_different_ranks_is_refused_by_name():
    K = kit.package("tf_keras")
    inp = K.Input((4, 3))
    h = K.layers.Dense(3, name="h")(inp)
    v = K.layers.Dense(3, name="v")(K.layers.Flatten()(inp))
    model = K.Model(inp, K.layers.Dense(2)(K.layers.Flatten()(tf.math.subtract(h, v))))
    with pytest.raises(lrp_grad.UnsupportedLayerError,
                       match=r"\(operation tf.math.subtract\): subtracts tensors of different shapes "
                             r"\[\(None, 4, 3\), \(None, 3\)\] \(broadcasting\); only tensors of the same rank"):
        lrp_grad.Explainer(model)


def test_elementwise_functions_of_a_phase_pass_relevance(K):
    """WaveMLP's phase-aware token mixing ``h * cos(theta)``, ``h * sin(theta)`` (theta a function of
    the signal): sin and cos are elementwise functions of one signal (relevance passes through, as
    for the other elementwise maths), and each product of two independent signals takes the uniform
    rule (half to each factor); against the float64 equations under the epsilon rule."""
    L = K.layers
    keras3 = K.__name__ == "keras"
    cos = K.ops.cos if keras3 else tf.math.cos
    sin = K.ops.sin if keras3 else tf.math.sin
    inp = K.Input((5,), **F64)
    h = L.Dense(4, name="h", **F64)(inp)
    theta = L.Dense(4, activation="relu", name="theta", **F64)(inp)
    mixed = L.Concatenate(**F64)([L.Multiply(**F64)([h, cos(theta)]), L.Multiply(**F64)([h, sin(theta)])])
    model = kit.randomize(K.Model(inp, L.Dense(3, name="head", **F64)(mixed)), seed=28)
    x = np.random.default_rng(29).normal(size=(3, 5))
    R = lrp_grad.Explainer(model, rule=lrp_grad.Epsilon(nra.EPS))(x, target=1)
    w = {n: model.get_layer(n).get_weights() for n in ("h", "theta", "head")}
    for n in range(len(x)):
        zh, zt = x[n] @ w["h"][0] + w["h"][1], x[n] @ w["theta"][0] + w["theta"][1]
        t = np.maximum(zt, 0)
        m = np.concatenate([zh * np.cos(t), zh * np.sin(t)])
        R_out = np.zeros(3)
        R_out[1] = (m @ w["head"][0] + w["head"][1])[1]
        _, R_m = nra.linear(m, *w["head"], R_out)
        R_h = 0.5 * (R_m[:4] + R_m[4:])  # half of each product to h ...
        R_t = 0.5 * (R_m[:4] + R_m[4:])  # ... half through cos / sin (and the ReLU) to theta
        _, R_xh = nra.linear(x[n], *w["h"], R_h)
        _, R_xt = nra.linear(x[n], *w["theta"], R_t)
        kit.assert_close(R[n], R_xh + R_xt, 1e-9, f"sample {n}")


def _resize_spellings(K):
    """Resizes ``(t, size)`` to a size read from another tensor's shape (GhostNetV2's
    ``tf.image.resize(g, tf.shape(x)[1:-1])``: in tf-keras the size is a tensor of the graph)."""
    if K.__name__ == "keras":
        return {m: (lambda t, size, m=m: K.ops.image.resize(t, size, interpolation=m))
                for m in ("bilinear", "nearest", "bicubic")}
    spells = {m: (lambda t, size, m=m: tf.image.resize(t, size, method=m, antialias=False))
              for m in ("bilinear", "nearest", "bicubic")}
    spells["compat.v1.resize_bilinear"] = tf.compat.v1.image.resize_bilinear
    spells["compat.v1.resize_nearest_neighbor"] = tf.compat.v1.image.resize_nearest_neighbor
    spells["resize_with_pad"] = lambda t, size: tf.image.resize_with_pad(t, 6, 8)
    spells["resize_with_pad nearest"] = lambda t, size: tf.image.resize_with_pad(t, 6, 8, method="nearest")
    return spells


def test_a_resize_to_a_size_read_from_a_shape_is_a_fixed_linear_map(K):
    """An image resize whose size is computed from another tensor's shape is linear in the image
    (the size carries no relevance): LRP-0 = gradient x input on the bias-free ReLU network, and
    epsilon conserves; the same relevance as the twin resizing to the constant size."""
    L = K.layers
    x = np.random.default_rng(30).uniform(0, 1, (2, 6, 6, 2))
    for name, resize in _resize_spellings(K).items():
        def build(constant):
            inp = K.Input((6, 6, 2), **F64)
            h = L.Conv2D(3, 3, padding="same", activation="relu", name="c", **F64)(inp)
            g = L.AveragePooling2D(2, **F64)(h)
            shape = K.ops.shape if K.__name__ == "keras" else tf.shape
            up = resize(g, (6, 6) if constant else shape(h)[1:3])
            return K.Model(inp, L.Dense(2, name="head", **F64)(L.Flatten(**F64)(up)), name=name)

        model = _bias_free(kit.randomize(build(False), seed=31))
        np.testing.assert_allclose(lrp_grad.Explainer(model).forward(x), model(x).numpy(), rtol=1e-9, atol=1e-12)
        _lrp0_is_gradient_x_input(model, x)
        R, report = lrp_grad.Explainer(model, rule=lrp_grad.Epsilon(1e-12))(x, target=0, return_layers=True)
        np.testing.assert_allclose(R.reshape(2, -1).sum(1), report.output, rtol=1e-6, err_msg=name)
        if "nearest" in name:  # copies by a gather: XLA has no ResizeNearestNeighborGrad
            kit.assert_close(lrp_grad.Explainer(model, jit_compile=True)(x), lrp_grad.Explainer(model)(x), 1e-9,
                             f"{name}: XLA = eager")
        if K.__name__ != "keras":  # the twin with a constant size (Keras 3's size is static already)
            twin = build(True)
            twin.set_weights(model.get_weights())
            kit.assert_close(lrp_grad.Explainer(model)(x), lrp_grad.Explainer(twin)(x), 1e-10, name)


def test_a_resize_without_a_gradient_is_refused_by_name(K):
    """Area interpolation has no gradient in TensorFlow: refused naming the operation and the fix,
    not a raw LookupError from the backward pass."""
    L = K.layers
    inp = K.Input((4, 4, 2))
    h = L.Conv2D(2, 3, padding="same")(inp)
    if K.__name__ == "keras":
        up, symbol = K.ops.image.resize(h, (6, 6), interpolation="area"), "keras.ops.resize"
    else:
        up, symbol = tf.image.resize(h, tf.shape(h)[1:3] + 2, method="area"), "tf.image.resize"
    model = K.Model(inp, L.Dense(2)(L.Flatten()(up)))
    with pytest.raises(lrp_grad.UnsupportedLayerError,
                       match=rf"\(operation {symbol}\): {symbol} with area interpolation has no gradient in "
                             r"TensorFlow, so relevance cannot flow back through it; resize with 'bilinear'"):
        lrp_grad.Explainer(model)
    if K.__name__ != "keras":
        v1 = K.Model(inp, L.Dense(2)(L.Flatten()(tf.compat.v1.image.resize_area(h, (6, 6)))))
        with pytest.raises(lrp_grad.UnsupportedLayerError, match="resize_area with area interpolation"):
            lrp_grad.Explainer(v1)


def _stacked_reductions(K):
    """Reductions over a list of tensors or their stack along axis 0 (ResNeSt's split attention:
    ``tf.reduce_sum(tf.split(x, 2, -1), axis=0)``): axis 0 is the list, the batch is axis 1."""
    if K.__name__ == "keras":
        stack, total, mean = K.ops.stack, K.ops.sum, K.ops.mean
        return {"sum(stack, 0)": lambda p: total(stack(p), axis=0),
                "mean(stack, 0)": lambda p: mean(stack(p, axis=0), axis=0),
                "sum(stack, (0, 2))": lambda p: total(stack(p), axis=(0, 2))}
    return {"reduce_sum(list, 0)": lambda p: tf.reduce_sum(p, axis=0),
            "reduce_mean(list, 0)": lambda p: tf.math.reduce_mean(p, axis=0),
            "reduce_sum(list, (0, 2))": lambda p: tf.reduce_sum(p, axis=[0, 2]),
            "reduce_sum(stack, 0)": lambda p: tf.reduce_sum(tf.stack(p), axis=0),
            "reduce_mean(stack, -5)": lambda p: tf.reduce_mean(tf.stack(p, axis=0), axis=-5)}


def test_a_reduction_over_a_list_of_tensors_is_a_sum_of_tensors(K):
    """The reduced axis 0 of a list (or stack) of batch tensors is not the batch axis: a sum over it
    is a sum of the tensors (an Add: the same relevance as the twin written with Add, under
    alpha-beta), and any such reduction is a fixed linear map: LRP-0 = gradient x input."""
    L = K.layers
    x = np.random.default_rng(32).uniform(0, 1, (2, 4, 4, 3))
    split = (lambda t: K.ops.split(t, 2, axis=-1)) if K.__name__ == "keras" else (lambda t: tf.split(t, 2, axis=-1))
    for name, reduce in _stacked_reductions(K).items():
        def build(twin):
            inp = K.Input((4, 4, 3), **F64)
            h = L.Conv2D(4, 3, padding="same", activation="relu", name="c", **F64)(inp)
            parts = split(h)
            r = L.Add(**F64)(parts) if twin else reduce(parts)
            return K.Model(inp, L.Dense(2, name="head", **F64)(L.Flatten(**F64)(r)), name="m")

        model = _bias_free(kit.randomize(build(False), seed=33))
        np.testing.assert_allclose(lrp_grad.Explainer(model).forward(x), model(x).numpy(), rtol=1e-9, atol=1e-12)
        _lrp0_is_gradient_x_input(model, x)
        if name.startswith(("sum(", "reduce_sum")) and name.endswith(", 0)"):
            twin = build(True)
            twin.set_weights(model.get_weights())
            rule = lrp_grad.Composite([("linear", lrp_grad.AlphaBeta(2, 1))])
            kit.assert_close(lrp_grad.Explainer(model, rule=rule)(x, target=1),
                             lrp_grad.Explainer(twin, rule=rule)(x, target=1), 1e-10, name)


def test_a_reduction_over_the_batch_of_stacked_tensors_is_refused(K):
    L = K.layers
    inp = K.Input((4, 3))
    h = L.Dense(3)(inp)
    if K.__name__ == "keras":
        r, symbol = K.ops.sum(K.ops.stack([h, h * 2.0]), axis=1), "keras.ops.sum"
    else:
        r, symbol = tf.reduce_sum(tf.stack([h, h * 2.0]), axis=1), "tf.math.reduce_sum"
    model = K.Model(inp, L.Dense(2)(L.Flatten()(r)))
    with pytest.raises(lrp_grad.UnsupportedLayerError,
                       match=rf"\(operation {symbol}\): {symbol} over axis=\(1,\) reduces the batch axis \(axis 1 "
                             r"of the stacked tensors\); only reductions over the non-batch axes"):
        lrp_grad.Explainer(model)


def test_a_softmax_of_rank_six_is_explained(K):
    """HaloNet's and VOLO's attention scores are rank 6 (batch, blocks, blocks, heads, queries, keys);
    TensorFlow's CPU softmax kernel refuses ranks above 5 in float32 (a raw AbortedError from the
    model's own call on this machine). The softmax rule's forward runs on a rank-2 view: explained,
    against the float64 equations (softmax rule of Achtibat et al. 2024, epsilon elsewhere), for a
    Softmax layer over one or two axes and the softmax operation."""
    L = K.layers
    softmax_op = K.ops.softmax if K.__name__ == "keras" else tf.nn.softmax
    x = np.random.default_rng(34).normal(size=(2, 2, 2, 3)).astype("float32")
    for name, axes, act in (("layer", (-1,), lambda t: L.Softmax(name="sm")(t)),
                            ("layer over two axes", (-2, -1), lambda t: L.Softmax(axis=(-2, -1), name="sm")(t)),
                            ("operation", (-1,), lambda t: softmax_op(t, axis=-1))):
        inp = K.Input((2, 2, 3))
        a = L.Reshape((2, 2, 3, 2, 2))(L.Dense(12, name="d1")(inp))
        model = kit.randomize(K.Model(inp, L.Dense(2, name="head")(L.Flatten()(act(a)))), seed=35)
        R = lrp_grad.Explainer(model, rule=lrp_grad.Epsilon(nra.EPS))(x, target=1)
        (W1, b1), (W2, b2) = model.get_layer("d1").get_weights(), model.get_layer("head").get_weights()
        x64 = x.astype(np.float64)
        z = (x64 @ W1 + b1).reshape(2, 2, 2, 3, 2, 2)
        e = np.exp(z - z.max(axis=axes, keepdims=True))
        s = e / e.sum(axis=axes, keepdims=True)
        R_out = np.zeros((2, 2))
        logits = s.reshape(2, -1) @ W2 + b2
        R_out[:, 1] = logits[:, 1]
        _, R_s = nra.linear(s.reshape(2, -1), W2, b2, R_out)
        R_s = R_s.reshape(s.shape)
        R_z = z * (R_s - s * R_s.sum(axis=axes, keepdims=True))
        _, R_x = nra.linear(x64, W1, b1, R_z.reshape(2, 2, 2, 12))
        kit.assert_close(R, R_x, 1e-4, name)


def _standardized_conv_class(K):
    """NFNet's ``ScaledStandardizedConv2D`` pattern: a Conv2D subclass whose ``build`` adds a gain and
    wraps the convolution so that it convolves with ``(W - mean) * gain / sqrt(N var)`` (tf-keras:
    an instance attribute set in ``build``, as kecam does; Keras 3: the documented override of
    ``convolution_op``)."""
    base = K.layers.Conv2D

    def standardized(layer, kernel):
        mean, var = tf.nn.moments(kernel, axes=[0, 1, 2], keepdims=True)
        fan_in = float(np.prod(kernel.shape[:-1]))
        return (kernel - mean) * tf.math.rsqrt(tf.maximum(var * fan_in, 1e-5)) * (layer.gain * 1.7)

    if K.__name__ == "keras":
        class ScaledStandardizedConv2D(base):
            def build(self, input_shape):
                super().build(input_shape)
                self.gain = self.add_weight(name="gain", shape=(self.filters,), initializer="random_uniform")

            def convolution_op(self, inputs, kernel):
                return super().convolution_op(inputs, standardized(self, kernel))
    else:
        class ScaledStandardizedConv2D(base):
            def build(self, input_shape):
                super().build(input_shape)
                default_op = self.convolution_op
                self.gain = self.add_weight(name="gain", shape=(self.filters,), initializer="random_uniform")
                self.convolution_op = lambda inputs, kernel: default_op(inputs, standardized(self, kernel))
                self.built = True
    return ScaledStandardizedConv2D, standardized


@pytest.mark.parametrize("groups", [1, 2])
def test_a_convolution_that_computes_its_kernel_is_that_convolution(K, groups):
    """A Conv2D subclass that overrides ``build`` (or ``convolution_op``) to convolve with a kernel
    computed from its own weights (NFNet's weight standardisation) is explained as a Conv2D holding
    that kernel, under the conv family's rule and with its bias as a Conv2D's: the same relevance,
    under every rule and the default composite, as the twin Conv2D given the computed kernel."""
    L = K.layers
    Standardized, standardized = _standardized_conv_class(K)

    def build(conv):
        inp = K.Input((6, 6, 4))
        h = L.Conv2D(4, 3, padding="same", activation="relu", name="stem")(inp)
        h = conv(4, 3, padding="same", groups=groups, activation="relu", name="ws")(h)
        return K.Model(inp, L.Dense(3, name="head")(L.Flatten()(h)))

    model, twin = kit.randomize(build(Standardized), seed=36), build(L.Conv2D)
    ws = model.get_layer("ws")
    twin.get_layer("ws").set_weights([standardized(ws, ws.kernel).numpy(), ws.bias.numpy()])
    for name in ("stem", "head"):
        twin.get_layer(name).set_weights(model.get_layer(name).get_weights())
    x = np.random.default_rng(37).uniform(0, 1, (2, 6, 6, 4)).astype("float32")
    np.testing.assert_allclose(model(x).numpy(), twin(x).numpy(), rtol=1e-5, atol=1e-5)
    assert lrp_grad.Explainer(model, rule=lrp_grad.AlphaBeta(2, 1)).rules["ws"] == lrp_grad.AlphaBeta(2, 1)
    for rule in (None, lrp_grad.Epsilon(), lrp_grad.AlphaBeta(2, 1), lrp_grad.Gamma(0.25), lrp_grad.ZPlus(),
                 lrp_grad.AttnLRP()):
        kw = {} if rule is None else {"rule": rule}
        kit.assert_close(lrp_grad.Explainer(model, **kw)(x), lrp_grad.Explainer(twin, **kw)(x), 1e-5, repr(rule))
    # the kernel is read from the live weights: retrained, the explanation follows
    ws.gain.assign(ws.gain * 2.0)
    twin.get_layer("ws").set_weights([standardized(ws, ws.kernel).numpy(), ws.bias.numpy()])
    kit.assert_close(lrp_grad.explain(model, x), lrp_grad.explain(twin, x), 1e-5, "after the gain changed")


def test_a_convolution_subclass_that_is_not_a_convolution_is_looked_into(K):
    """A Conv2D subclass whose convolution is not linear in its input (here it squares the input
    first) does not pass as a convolution with a computed kernel: it is looked into instead, and
    refused naming the operation lrp_grad has no rule for when there is one."""
    L = K.layers
    keras3 = K.__name__ == "keras"
    cumprod = (lambda t: K.ops.cumprod(t, axis=-1)) if keras3 else (lambda t: tf.math.cumprod(t, axis=-1))

    class Odd(L.Conv2D):
        def convolution_op(self, inputs, kernel):
            return super().convolution_op(cumprod(inputs), kernel)

    inp = K.Input((5, 5, 2))
    model = K.Model(inp, L.Dense(2)(L.Flatten()(Odd(3, 3, name="odd")(inp))))
    with pytest.raises(lrp_grad.UnsupportedLayerError, match=r"at 'odd/[^']*cumprod[^']*'|'odd' \(Odd\): a subclass "
                                                             r"of Conv2D that overrides convolution_op"):
        lrp_grad.Explainer(model)
