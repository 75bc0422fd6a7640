"""Gradient baselines (gradient, x input, integrated gradients, SmoothGrad) and insertion curves (issue 22)."""
import numpy as np
import pytest

import lrp_grad
from lrp_grad import evaluate
from lrp_grad.errors import InvalidTargetError

H, W, C, N, CLASSES = 4, 5, 2, 5, 3


def linear_model(K, softmax=False):
    """logits = flatten(x) @ Wt + b, float64."""
    inp = K.Input((H, W, C), dtype="float64")
    flat = K.layers.Flatten(dtype="float64")(inp)
    out = K.layers.Dense(CLASSES, dtype="float64", activation="softmax" if softmax else None)(flat)
    model = K.Model(inp, out)
    rng = np.random.default_rng(0)
    weights, bias = rng.normal(size=(H * W * C, CLASSES)), rng.normal(size=CLASSES)
    model.layers[-1].set_weights([weights, bias])
    return model, weights, bias


def smooth_model(K, softmax=False):
    """A small tanh network in float64: smooth, so integration errors shrink like 1/steps**2."""
    inp = K.Input((H, W, C), dtype="float64")
    h = K.layers.Conv2D(4, 3, padding="same", activation="tanh", dtype="float64")(inp)
    h = K.layers.Flatten(dtype="float64")(h)
    h = K.layers.Dense(8, activation="tanh", dtype="float64")(h)
    out = K.layers.Dense(CLASSES, dtype="float64", activation="softmax" if softmax else None)(h)
    model = K.Model(inp, out)
    rng = np.random.default_rng(2)
    model.set_weights([rng.normal(size=w.shape) for w in model.get_weights()])
    return model


def images(n=N, seed=1):
    return np.random.default_rng(seed).uniform(-1, 1, (n, H, W, C))


def logits_of(model, x):
    return np.asarray(evaluate.logit_function(model)(x), np.float64)


def test_gradient_and_gradient_x_input_of_a_linear_model(K):
    model, weights, _ = linear_model(K)
    x = images()
    target = np.array([0, 1, 2, 1, 0])
    grad = evaluate.gradient(model, x, target)
    assert grad.shape == x.shape and grad.dtype == np.float64
    np.testing.assert_allclose(grad, weights[:, target].T.reshape(x.shape), rtol=1e-12)
    np.testing.assert_allclose(evaluate.gradient_x_input(model, x, target), grad * x, rtol=1e-12)
    # target=None explains the predicted class; an int explains that class for every image.
    predicted = logits_of(model, x).argmax(1)
    np.testing.assert_allclose(evaluate.gradient(model, x), evaluate.gradient(model, x, predicted))
    np.testing.assert_allclose(evaluate.gradient(model, x, 2), np.broadcast_to(weights[:, 2].reshape(H, W, C), x.shape))


def test_softmax_model_explains_the_logits(K):
    """A softmax-ended model gives the gradient of the logit (the pre-softmax output), not of p."""
    model, weights, _ = linear_model(K, softmax=True)
    x = images()
    np.testing.assert_allclose(evaluate.gradient(model, x, 1), np.broadcast_to(weights[:, 1].reshape(H, W, C), x.shape),
                               rtol=1e-12)
    smooth = smooth_model(K, softmax=True)
    ig = evaluate.integrated_gradients(smooth, x, 0, steps=128)
    z = logits_of(smooth, x)
    z0 = logits_of(smooth, np.zeros_like(x))
    np.testing.assert_allclose(ig.sum((1, 2, 3)), z[:, 0] - z0[:, 0], atol=2e-3)


def test_gradient_pass_is_traced_once_per_model_and_reads_the_current_weights(K):
    """The compiled gradient is cached per model (batches of a stream do not trace again), the
    linear copy of a softmax layer follows the layer's weights, and the model is held weakly."""
    import gc
    import weakref

    from lrp_grad.evaluate import forward

    model, weights, _ = linear_model(K, softmax=True)
    x = images()
    evaluate.gradient(model, x, 1, batch_size=2)  # batches 2, 2, 1
    evaluate.smoothgrad(model, x[:3], 0, samples=3, batch_size=4)
    evaluate.integrated_gradients(model, x, 2, steps=3)
    assert forward._CACHE[model][("gradient", "float64")].traces == 1
    new = np.random.default_rng(7).normal(size=weights.shape)
    model.layers[-1].set_weights([new, np.zeros(CLASSES)])  # as training would
    np.testing.assert_allclose(evaluate.gradient(model, x, 1), np.broadcast_to(new[:, 1].reshape(H, W, C), x.shape),
                               rtol=1e-12)
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None


def test_integrated_gradients_is_exact_on_a_linear_model(K):
    model, weights, bias = linear_model(K)
    x = images()
    baseline = np.random.default_rng(3).uniform(-1, 1, (H, W, C))
    target = np.array([2, 0, 1, 1, 2])
    for steps in (1, 5):
        ig = evaluate.integrated_gradients(model, x, target, steps=steps, baseline=baseline, batch_size=4)
        np.testing.assert_allclose(ig, (x - baseline) * weights[:, target].T.reshape(x.shape), rtol=1e-10, atol=1e-12)
        z, zb = logits_of(model, x), logits_of(model, np.broadcast_to(baseline, x.shape))
        np.testing.assert_allclose(ig.sum((1, 2, 3)), z[np.arange(N), target] - zb[np.arange(N), target], rtol=1e-10)


def test_integrated_gradients_completeness_error_shrinks_with_steps(K):
    model = smooth_model(K)
    x = images() * 1.5
    z, z0 = logits_of(model, x), logits_of(model, np.zeros_like(x))
    target = z.argmax(1)
    errors = []
    for steps in (4, 16, 64):
        ig = evaluate.integrated_gradients(model, x, steps=steps)
        errors.append(np.abs(ig.sum((1, 2, 3)) - (z - z0)[np.arange(N), target]).max())
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 1e-2 and errors[2] < errors[1] / 8  # trapezoid: ~1/16 per 4x steps on a smooth path
    # Batched = per-image, and the batch size (rows per pass) does not change anything.
    whole = evaluate.integrated_gradients(model, x, steps=8, batch_size=7)
    single = np.concatenate([evaluate.integrated_gradients(model, x[i:i + 1], steps=8) for i in range(N)])
    np.testing.assert_allclose(whole, single, rtol=1e-12, atol=1e-14)


def test_smoothgrad(K):
    model = smooth_model(K)
    x = images()
    grad = evaluate.gradient(model, x)
    np.testing.assert_allclose(evaluate.smoothgrad(model, x, noise=0.0, samples=3), grad, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(evaluate.smoothgrad(model, x, noise=0.0, samples=2, times_input=True), grad * x,
                               rtol=1e-12, atol=1e-14)
    a = evaluate.smoothgrad(model, x, samples=4, seed=3)
    np.testing.assert_array_equal(a, evaluate.smoothgrad(model, x, samples=4, seed=3))  # seeded: reproducible
    assert not np.allclose(a, evaluate.smoothgrad(model, x, samples=4, seed=4))
    assert not np.allclose(a, grad)
    # Batched = per-image: image i's noise depends on (seed, i) only, not on the batch it is in.
    batched = evaluate.smoothgrad(model, x, samples=4, seed=3, batch_size=3)
    np.testing.assert_allclose(batched, a, rtol=1e-12, atol=1e-14)
    first = evaluate.smoothgrad(model, x[:1], samples=4, seed=3)
    np.testing.assert_allclose(first, a[:1], rtol=1e-12, atol=1e-14)


def test_attribution_knows_the_new_methods(K):
    model, weights, _ = linear_model(K)
    x = images()
    y = np.array([0, 1, 2, 0, 1])
    assert {"integrated_gradients", "smoothgrad"} <= set(evaluate.METHODS)
    ig, seconds = evaluate.attribution(model, x, y, "integrated_gradients")
    np.testing.assert_allclose(ig, x * weights[:, y].T.reshape(x.shape), rtol=1e-5, atol=1e-6)
    sg, _ = evaluate.attribution(model, x, y, "smoothgrad")
    np.testing.assert_allclose(sg, weights[:, y].T.reshape(x.shape), rtol=1e-5, atol=1e-6)
    assert seconds >= 0


def test_bad_arguments_name_the_argument_value_and_fix():
    import keras

    model, _, _ = linear_model(keras)
    x = images()
    with pytest.raises(ValueError, match=r"integrated_gradients: steps must be an integer >= 1, got 0"):
        evaluate.integrated_gradients(model, x, steps=0)
    with pytest.raises(ValueError, match=r"baseline has shape \(3,\), which does not broadcast to x's shape "
                                         r"\(5, 4, 5, 2\); pass one image \(4, 5, 2\)"):
        evaluate.integrated_gradients(model, x, baseline=np.zeros(3))
    with pytest.raises(ValueError, match=r"baseline='mean' is not understood; pass a number"):
        evaluate.integrated_gradients(model, x, baseline="mean")
    with pytest.raises(ValueError, match=r"smoothgrad: noise must be a number >= 0 .*got -0.1"):
        evaluate.smoothgrad(model, x, noise=-0.1)
    with pytest.raises(ValueError, match=r"smoothgrad: samples must be an integer >= 1, got 2.5"):
        evaluate.smoothgrad(model, x, samples=2.5)
    with pytest.raises(ValueError, match=r"smoothgrad: seed must be an integer >= 0, got -1"):
        evaluate.smoothgrad(model, x, seed=-1)
    with pytest.raises(ValueError, match=r"smoothgrad: times_input must be True or False, got 1"):
        evaluate.smoothgrad(model, x, times_input=1)
    with pytest.raises(ValueError, match=r"gradient: batch_size must be an integer >= 1 or None, got 0"):
        evaluate.gradient(model, x, batch_size=0)
    with pytest.raises(InvalidTargetError, match=r"gradient_x_input: target\[0\] = 3 but the model has 3 outputs; "
                                                 r"pass class indices 0..2"):
        evaluate.gradient_x_input(model, x, 3)
    with pytest.raises(lrp_grad.errors.InvalidInputError, match=r"gradient: x must be a batch of images"):
        evaluate.gradient(model, x[0])


# ---------------------------------------------------------------------------------------------
# Insertion


def expected_insertion(x, base, w_t, bias_t, relevance, patch):
    """Numpy reference for a linear model: logit of the baseline with regions of x inserted, most
    relevant (summed over the region) first, ties by lower region index."""
    gw = -(-W // patch)
    idx = np.array([[(i // patch) * gw + j // patch for j in range(W)] for i in range(H)])
    regions = idx.max() + 1
    rows = []
    for i in range(len(x)):
        pix = relevance[i].sum(-1)
        scores = [pix[idx == p].sum() for p in range(regions)]
        ranked = sorted(range(regions), key=lambda p: (-scores[p], p))
        current = base[i].copy()
        row = [(current.ravel() * w_t[i]).sum() + bias_t[i]]
        for p in ranked:
            current[idx == p] = x[i][idx == p]
            row.append((current.ravel() * w_t[i]).sum() + bias_t[i])
        rows.append(row)
    return np.array(rows)


@pytest.mark.parametrize("baseline", ["zero", "mean", "blur"])
def test_insertion_on_a_linear_model(K, baseline):
    model, weights, bias = linear_model(K)
    x = images()
    target = np.array([0, 1, 2, 1, 0])
    w_t = weights[:, target].T
    relevance = x * w_t.reshape(x.shape)
    curve = evaluate.insertion(model, x, relevance, target, patch=2, baseline=baseline)
    base = {"zero": np.zeros_like(x), "mean": np.broadcast_to(x.mean((1, 2), keepdims=True), x.shape),
            "blur": None}[baseline]
    z = logits_of(model, x)[np.arange(N), target]
    np.testing.assert_allclose(curve[:, -1], z, rtol=1e-10)  # everything inserted: the image itself
    if base is None:  # blur: the library's own box blur, checked elsewhere; here only the end points
        from lrp_grad.evaluate.region import _box_blur

        base = _box_blur(x, 5)
    np.testing.assert_allclose(curve[:, 0], logits_of(model, base)[np.arange(N), target], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(curve, expected_insertion(x, base, w_t, bias[target], relevance, 2), rtol=1e-10,
                               atol=1e-12)
    part = evaluate.insertion(model, x, relevance, target, patch=2, baseline=baseline, steps=2, batch_size=2)
    np.testing.assert_allclose(part, curve[:, :3], rtol=1e-12, atol=1e-12)


def test_insertion_mirrors_deletion_and_checks_arguments(K):
    """Inserting with a zero baseline into a bias-free linear model: insertion(k) + deletion(k) = logit(x)."""
    model, weights, _ = linear_model(K)
    model.layers[-1].set_weights([weights, np.zeros(CLASSES)])
    x = images()
    r = np.random.default_rng(4).normal(size=x.shape)
    ins = evaluate.insertion(model, x, r, 1, patch=2, baseline="zero")
    dele = evaluate.region_perturbation(model, x, r, 1, patch=2, baseline="zero", order="morf")
    np.testing.assert_allclose(ins + dele, np.broadcast_to(dele[:, :1], dele.shape), atol=1e-12)
    np.testing.assert_allclose(ins[:, 0], 0, atol=1e-12)
    assert ins.shape == dele.shape
    with pytest.raises(ValueError, match=r"insertion: order='up' is not understood; use one of 'morf', 'lerf'"):
        evaluate.insertion(model, x, r, order="up")
    with pytest.raises(ValueError, match=r"insertion: baseline='black' is not understood"):
        evaluate.insertion(model, x, r, baseline="black")
