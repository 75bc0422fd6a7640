"""Regression tests for what a newcomer and a reliability probe found (silently wrong results,
easy-path surprises), each in both Keras packages where a model is involved."""
import re

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
    ok = fn(images=x, target=tf.constant([0, 3], tf.int32))
    assert ok["relevance"].shape == (2, 7)
    # -1 is refused as by the Python API (issue 21: the export read it as "predicted")
    with pytest.raises(InvalidTargetError, match=r"target\[0\] = -1 is out of range"):
        lrp_grad.Explainer(model)(x.numpy(), target=np.array([-1, 3]))
    for bad in ([0, 4], [-1, 3], [-2, 0], [7, 1]):
        with pytest.raises(tf.errors.InvalidArgumentError,
                           match=r"target must be a class index in 0\.\.3 \(the model has 4 classes\), as for the "
                                 r"Python API; negative values are refused: for the predicted class call the "
                                 r"serving_default signature"):
            fn(images=x, target=tf.constant(bad, tf.int32))
    with pytest.raises(tf.errors.InvalidArgumentError, match="one class per image"):
        fn(images=x, target=tf.constant([0], tf.int32))


def test_repeated_explain_calls_reuse_one_compiled_pass_and_free_the_model(K):
    import gc
    import importlib
    import weakref

    explain_module = importlib.import_module("lrp_grad.api.cache")
    model = kit.cnn(K=K)
    x = np.random.default_rng(3).uniform(0, 1, (2, 10, 10, 3)).astype("float32")
    R1 = lrp_grad.explain(model, x, rule="epsilon_plus")
    (ex,) = explain_module._CACHE[model].values()
    traces = ex.trace_count
    R2 = lrp_grad.explain(model, x[:1], rule="epsilon_plus")
    assert ex.trace_count == traces and list(explain_module._CACHE[model].values()) == [ex]
    np.testing.assert_array_equal(R2, R1[:1])
    np.testing.assert_array_equal(R1, lrp_grad.Explainer(model, rule="epsilon_plus")(x))
    # live weights: a change after the first call is seen by the next one
    model.layers[-1].set_weights([w * 2 for w in model.layers[-1].get_weights()])
    np.testing.assert_allclose(lrp_grad.explain(model, x, rule="epsilon_plus"),
                               lrp_grad.Explainer(model, rule="epsilon_plus")(x), rtol=1e-6)
    lrp_grad.explain(model, x, rule=lrp_grad.Epsilon(0.5))  # another option set: another entry
    assert len(explain_module._CACHE[model]) == 2
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None, "explain()'s cache kept the model alive"


def _bn_through_max_pool(K):
    """Conv-ReLU-BN-MaxPool-Dense with positive BN scales (folded forward through the max pool),
    and ``flip()`` that makes them negative, as training might."""
    L = K.layers
    model = K.Sequential([K.Input((6, 6, 1)), L.Conv2D(3, 3, activation="relu", name="c"),
                          L.BatchNormalization(name="bn"), L.MaxPooling2D(2, name="mp"),
                          L.Flatten(name="f"), L.Dense(2, name="d")])
    bn = model.get_layer("bn")
    gamma, beta, mean, var = bn.get_weights()
    bn.set_weights([np.abs(gamma) + 0.5, beta, mean, var])
    return model, lambda: bn.set_weights([-(np.abs(gamma) + 0.5), beta, mean, var])


def test_cached_explain_replans_when_a_folded_batchnorm_changes_sign():
    """BatchNorm folded through a max pooling needs positive scales at plan time; explain() after
    training flipped one re-plans instead of failing (an Explainer asks to be rebuilt)."""
    model, flip = _bn_through_max_pool(kit.package("keras"))
    x = np.random.default_rng(4).uniform(0, 1, (2, 6, 6, 1)).astype("float32")
    lrp_grad.explain(model, x, rule=lrp_grad.Epsilon(1e-6))
    flip()
    R = lrp_grad.explain(model, x, rule=lrp_grad.Epsilon(1e-6))
    np.testing.assert_allclose(R, lrp_grad.Explainer(model, rule=lrp_grad.Epsilon(1e-6))(x), rtol=1e-5, atol=1e-7)


def test_explainer_whose_folded_batchnorm_changed_sign_says_rebuild():
    model, flip = _bn_through_max_pool(kit.package("tf_keras"))
    ex = lrp_grad.Explainer(model)
    x = np.random.default_rng(5).uniform(0, 1, (2, 6, 6, 1)).astype("float32")
    ex(x)
    flip()
    with pytest.raises(lrp_grad.StaleExplainerError, match=r"^BatchNormalization 'bn' was folded .*Build a new Explainer\.$"):
        ex(x)


def test_large_batches_are_chunked_by_default(monkeypatch):
    import importlib

    explain_module = importlib.import_module("lrp_grad.api.passes")
    model = kit.cnn()
    x = np.random.default_rng(6).uniform(0, 1, (9, 10, 10, 3)).astype("float32")
    whole = lrp_grad.Explainer(model)(x, batch_size=9)
    monkeypatch.setattr(explain_module, "free_memory_bytes", lambda: 40_000)  # room for ~2 samples
    ex = lrp_grad.Explainer(model)
    assert 1 <= ex.auto_batch_size() < 9
    calls = []
    run = ex.passes.run
    monkeypatch.setattr(ex.passes, "run", lambda fn, a, b: calls.append(len(a)) or run(fn, a, b))
    kit.assert_close(ex(x), whole, 1e-5, "chunked vs one batch")  # kernels round per batch size
    assert len(calls) == -(-9 // ex.auto_batch_size()) and max(calls) == ex.auto_batch_size()


def test_out_of_memory_names_batch_size(monkeypatch):
    ex = lrp_grad.Explainer(kit.mlp())

    def oom(fn, a, b):
        raise tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor")

    monkeypatch.setattr(ex.passes, "run", oom)
    with pytest.raises(lrp_grad.LRPMemoryError, match=r"out of memory explaining a batch of 8 samples.*batch_size=2"):
        ex(np.zeros((8, 7), "float32"))


@pytest.mark.parametrize("policy", ["float16", "mixed_float16"])
def test_float16_layers_are_explained_in_float32(K, policy):
    """float16 weights (or a mixed policy) used to give a raw TF TypeError; lrp_grad computes the
    linear layers in float32 with the weights cast up, so the relevance matches a float32 model
    with the same (float16-rounded) weights; Rescaling runs in its own float16."""
    L = K.layers

    def build(p):
        return K.Sequential([K.Input((6, 6, 1)), L.Rescaling(1 / 255.0, dtype=p, name="s"),
                             L.Conv2D(2, 3, activation="relu", dtype=p, name="c"),
                             L.BatchNormalization(dtype=p, name="bn"), L.Flatten(dtype=p, name="f"),
                             L.Dense(3, dtype=p, name="d")])

    f16 = kit.randomize(build(policy))
    f32 = build("float32")
    f32.set_weights([w.astype("float32") for w in f16.get_weights()])
    x = np.random.default_rng(7).uniform(0, 255, (2, 6, 6, 1)).astype("float32")
    R16 = lrp_grad.explain(f16, x, target=1, rule=lrp_grad.Epsilon(1e-6))
    assert R16.dtype == np.float32
    # mixed_float16 agrees to 1e-6 (float32 variables); pure float16 layers to ~1e-3 (measured)
    tol = 1e-5 if policy == "mixed_float16" else 5e-3
    kit.assert_close(R16, lrp_grad.explain(f32, x, target=1, rule=lrp_grad.Epsilon(1e-6)), tol, policy)


@pytest.mark.parametrize("head", ["activation", "layer", "operation"])
def test_final_sigmoid_is_skipped_like_a_final_softmax(K, head):
    """The logit is explained: the same relevance as the model without the sigmoid (which used
    to be explained as the probability)."""
    L = K.layers
    inp = K.Input((5,))
    h = L.Dense(4, activation="relu", name="d1")(inp)
    logits = L.Dense(3, name="d2")(h)
    if head == "activation":
        out = L.Dense(3, activation="sigmoid", name="d3")(h)
        plain = K.Model(inp, L.Dense(3, name="d3")(h))
    else:
        out = L.Activation("sigmoid", name="s")(logits) if head == "layer" else kit.ops_of(K).sigmoid(logits)
        plain = K.Model(inp, logits)
    model = kit.randomize(K.Model(inp, out))
    plain.set_weights(model.get_weights())
    x = np.random.default_rng(8).normal(size=(4, 5)).astype("float32")
    ex = lrp_grad.Explainer(model, rule=lrp_grad.Epsilon(1e-6))
    np.testing.assert_allclose(ex.forward(x), plain(x).numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ex(x, target=2), lrp_grad.explain(plain, x, target=2, rule=lrp_grad.Epsilon(1e-6)),
                               rtol=1e-6, atol=1e-7)


def test_evaluate_takes_uint8_and_one_hot_labels(K):
    """IDX files give uint8 labels (a raw tf.gather error before); one-hot rows work too."""
    from lrp_grad import evaluate

    model = kit.cnn(K=K, classes=5)
    x = np.random.default_rng(9).uniform(0, 1, (6, 10, 10, 3)).astype("float32")
    y = np.array([0, 1, 2, 3, 4, 0])
    rel = lrp_grad.explain(model, x, target=y, rule=lrp_grad.Epsilon(1e-6))
    for labels in (y.astype(np.uint8), np.eye(5)[y]):
        for method in ("gradient", "gradient_x_input", lrp_grad.Epsilon(1e-6)):
            r, _ = evaluate.attribution(model, x, labels, method)
            assert r.shape == x.shape
        np.testing.assert_allclose(evaluate.perturbation_curve(model, x, labels, rel, steps=2),
                                   evaluate.perturbation_curve(model, x, y, rel, steps=2))
        assert evaluate.seed_flip(model, x, labels, rel).summary() == evaluate.seed_flip(model, x, y, rel).summary()
    with pytest.raises(ValueError, match=r"seed_flip: y must hold integer class indices, got dtype float64"):
        evaluate.seed_flip(model, x, y + 0.5, rel)
    with pytest.raises(ValueError, match=r"attribution: y has shape \(5,\); pass one class index per image, shape \(6,\)"):
        evaluate.attribution(model, x, y[:5], "gradient")


@pytest.mark.parametrize("name", ["ResNet50", pytest.param("DenseNet121", marks=pytest.mark.slow),
                                  pytest.param("EfficientNetB0", marks=pytest.mark.slow)])
def test_default_rule_stays_finite_and_near_the_logit_on_applications(name):
    """AlphaBeta(2, 1) given alone used to be applied to GAP/Add/unfolded BatchNorm too, where it
    doubles the relevance (ResNet50: sums ~3e3 x the logit; NaN on ResNetRS). Now the weight-free
    layers get epsilon: the sum stays within a small factor of the logit (measured: ResNet50 and
    DenseNet121 1.00, EfficientNetB0 0.4 with random weights)."""
    K = kit.package("keras")
    size = 32  # EfficientNet's SE gates are then 1x1 maps (read from the graph since issue 11)
    model = getattr(K.applications, name)(weights=None, input_shape=(size, size, 3), classes=10,
                                          classifier_activation=None)
    x = np.random.default_rng(10).uniform(0, 255, (2, size, size, 3)).astype("float32")
    R, report = lrp_grad.explain(model, x, return_layers=True)
    ratio = R.reshape(2, -1).sum(1) / report.output
    assert np.all(np.isfinite(R)) and np.all((ratio > 0.25) & (ratio < 4)), ratio
    rules = lrp_grad.Explainer(model).rules
    weight_free = [label for label, *_ in rules._rows if _[1] in ("pool", "merge", "norm")]
    assert weight_free and all(rules[label] == lrp_grad.Epsilon(1e-6) for label in weight_free)


def _forked_child(model, x, ex, queue):
    out = []
    for build in (lambda: lrp_grad.Explainer(model), lambda: ex(x)):
        try:
            build()
            out.append("no error")
        except Exception as e:  # noqa: BLE001 - reported to the parent
            out.append(f"{type(e).__name__}: {e}")
    queue.put(out)


@pytest.mark.skipif(not hasattr(__import__("os"), "register_at_fork"), reason="no fork on this platform")
def test_an_explainer_in_a_forked_child_fails_at_once_instead_of_hanging():
    """Issue 21: TensorFlow hangs in a child forked after it started in the parent (its runtime's
    threads do not survive a fork); building or calling an Explainer there raises with the fix."""
    import multiprocessing

    model = kit.mlp(classes=3)
    x = np.ones((2, 7), "float32")
    ex = lrp_grad.Explainer(model)
    ex(x)
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_forked_child, args=(model, x, ex, queue))
    child.start()
    try:
        out = queue.get(timeout=60)
    finally:
        child.join(10)
        if child.is_alive():
            child.kill()
    assert len(out) == 2
    for message in out:
        assert re.match(r"ForkedProcessError: this process was forked \(from process \d+\) after TensorFlow had started "
                        r"in the parent, and TensorFlow hangs in a forked child\. Start worker processes with the "
                        r"'spawn' \(or 'forkserver'\) start method", message), message
