"""Regression tests for what a newcomer and a reliability probe found (silently wrong results,
easy-path surprises), each in both Keras packages where a model is involved."""
import numpy as np
import pytest
import tensorflow as tf

import kit
import lrp_grad
from lrp_grad.errors import InvalidTargetError


def test_heatmap_and_evaluate_are_reachable_after_import_lrp_grad():
    import importlib

    import lrp_grad as fresh

    importlib.reload(fresh)
    assert fresh.heatmap.__name__ == "lrp_grad.heatmap" and callable(fresh.evaluate.seed_flip)
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        fresh.nope  # noqa: B018


def test_uint8_input_model_is_explained_in_float(K):
    """An Input(dtype='uint8') then Rescaling: the relevance is float and equals that of the same
    model with a float input (casting to uint8 used to zero it)."""
    L = K.layers

    def build(dtype):
        inp = K.Input((6, 6, 1), dtype=dtype)
        h = L.Rescaling(1 / 255.0, name="scale")(inp)
        h = L.Conv2D(3, 3, activation="relu", name="c")(h)
        return K.Model(inp, L.Dense(2, name="d")(L.Flatten(name="f")(h)))

    f32 = kit.randomize(build("float32"))
    u8 = build("uint8")
    u8.set_weights(f32.get_weights())
    x = np.random.default_rng(0).integers(0, 256, (3, 6, 6, 1)).astype("uint8")
    R = lrp_grad.explain(u8, x, target=1, rule=lrp_grad.Epsilon(1e-6))
    assert R.dtype == np.float32 and np.abs(R).sum() > 0
    kit.assert_close(R, lrp_grad.explain(f32, x.astype("float32"), target=1, rule=lrp_grad.Epsilon(1e-6)), 1e-6,
                     "uint8 input")


def test_target_of_shape_n_by_1_is_refused_as_ambiguous():
    model = kit.mlp()
    x = np.random.default_rng(1).normal(size=(3, 7)).astype("float32")
    with pytest.raises(InvalidTargetError, match=r"target has shape \(3, 1\), which is ambiguous.*\(n,\) = \(3,\)"):
        lrp_grad.explain(model, x, target=np.array([[0], [1], [2]]))
    assert lrp_grad.explain(model, x, target=np.array([[0, 1], [1, 2], [2, 3]])).shape == (3, 2, 7)


def test_exported_explain_signature_validates_the_target(tmp_path):
    model = kit.mlp(classes=4)
    path = lrp_grad.Explainer(model, rule=lrp_grad.Epsilon(1e-6)).export(tmp_path / "sm")
    fn = tf.saved_model.load(str(path)).signatures["explain"]
    x = tf.constant(np.random.default_rng(2).normal(size=(2, 7)).astype("float32"))
    ok = fn(images=x, target=tf.constant([-1, 3], tf.int32))
    assert ok["relevance"].shape == (2, 7)
    for bad in ([0, 4], [-2, 0], [7, 1]):
        with pytest.raises(tf.errors.InvalidArgumentError, match=r"target must be -1 .* 0\.\.3"):
            fn(images=x, target=tf.constant(bad, tf.int32))
    with pytest.raises(tf.errors.InvalidArgumentError, match="one class per image"):
        fn(images=x, target=tf.constant([0], tf.int32))
