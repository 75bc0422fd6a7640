"""Peak memory of an LRP pass against a plain gradient pass (TensorFlow's allocator statistics).

Not a benchmark: a regression check that the backward pass does not keep extra activation-sized
tensors alive (e.g. a denominator computed early, during the forward pass, and held until the
backward pass reaches its layer). See benchmarks/README.md for measured peaks on VGG16.
"""
import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras
from kit import L, randomize

import lrp_grad
from lrp_grad import AlphaBeta, Epsilon, ZPlus


def _peak(fn):
    fn()  # trace and warm up
    try:
        tf.config.experimental.reset_memory_stats("CPU:0")
        before = tf.config.experimental.get_memory_info("CPU:0")["current"]
    except (ValueError, RuntimeError):
        pytest.skip("no allocator statistics on this device")
    fn()
    return tf.config.experimental.get_memory_info("CPU:0")["peak"] - before


@pytest.fixture(scope="module")
def deep_cnn():
    """Eight 32-channel 3x3 convolutions on 64x64 (activations of 2 MB at batch 4)."""
    layers = [keras.Input((64, 64, 3))]
    for k in range(8):
        layers.append(L.Conv2D(32, 3, padding="same", activation="relu"))
    layers += [L.GlobalAveragePooling2D(), L.Dense(10)]
    return randomize(keras.Sequential(layers), seed=0, bias_scale=0.05)


@pytest.mark.parametrize("rule, limit", [(Epsilon(), 1.15), (ZPlus(), 1.3), (AlphaBeta(2, 1), 1.6)],
                         ids=["epsilon", "zplus", "alpha_beta"])
def test_peak_memory_close_to_the_gradient(deep_cnn, rule, limit):
    x = tf.constant(np.random.default_rng(0).uniform(0, 1, (4, 64, 64, 3)).astype(np.float32))
    target = tf.constant(np.zeros(4, np.int32))

    @tf.function
    def gradient(v, t):
        with tf.GradientTape() as tape:
            tape.watch(v)
            logits = deep_cnn(v, training=False)
        return tape.gradient(logits, v, output_gradients=tf.one_hot(t, 10))

    base = _peak(lambda: gradient(x, target).numpy())
    ex = lrp_grad.Explainer(deep_cnn, rule=rule)
    used = _peak(lambda: ex(x, target=target))
    assert used <= limit * base, f"{rule}: peak {used / 2**20:.1f} MB vs gradient {base / 2**20:.1f} MB"


def _live_lrp_graphs():
    import gc

    for _ in range(3):  # traced graphs hold cycles through TensorFlow objects: a few passes free them
        gc.collect()
    return sum(1 for o in gc.get_objects() if type(o).__name__ == "FuncGraph" and o.name == "lrp_pass")


def test_new_explainers_do_not_leak_traces(K):
    """Issue 21: every tf.custom_gradient traced in a tf.function registers a gradient function in
    TensorFlow's global registry that holds the traced graph; 200 Explainers on one model kept
    +119 MB. A dead Explainer's (and a dead model's) traces must be released."""
    from tensorflow.python.framework import ops as tf_ops

    registry = tf_ops._gradient_registry._registry
    model = K.Sequential([K.Input((8, 8, 3)), K.layers.Conv2D(4, 3, activation="relu"),
                          K.layers.Flatten(), K.layers.Dense(5)])
    x = np.random.default_rng(0).uniform(0, 1, (2, 8, 8, 3)).astype(np.float32)

    def one():
        ex = lrp_grad.Explainer(model)
        ex(x)
        ex.concept_relevance(x, layer=model.layers[0].name)
        return len(registry)  # while the Explainer lives

    one()
    graphs_before = _live_lrp_graphs()  # collects the first Explainer (it holds reference cycles)
    before = len(registry)
    during = one()
    assert during > before, "the test no longer exercises custom gradients: it cannot see a leak"
    for _ in range(4):
        one()
    graphs_after = _live_lrp_graphs()
    assert len(registry) == before, f"{len(registry) - before} gradient-registry entries kept by dead Explainers"
    assert graphs_after <= graphs_before

    def fresh_model():
        m = K.Sequential([K.Input((8, 8, 3)), K.layers.Conv2D(4, 3, activation="relu"),
                          K.layers.Flatten(), K.layers.Dense(5)])
        lrp_grad.explain(m, x)  # the per-model cache: released with the model

    fresh_model()
    _live_lrp_graphs()
    before = len(registry)
    for _ in range(3):
        fresh_model()
    _live_lrp_graphs()
    assert len(registry) == before, f"{len(registry) - before} gradient-registry entries kept by dead models"
