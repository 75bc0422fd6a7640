"""Region perturbation and the symmetric relevance gain against analytic cases (issue 22)."""
import numpy as np
import pytest

from lrp_grad import evaluate
from lrp_grad.errors import InvalidInputError, InvalidTargetError

H, W, C, N, CLASSES = 6, 5, 2, 5, 3
trapezoid = getattr(np, "trapezoid", None) or np.trapz  # numpy 2 renamed it


def linear_model(K, softmax=False):
    """logits = flatten(x) @ Wt, float64, no bias: removing a region with a zero baseline lowers
    logit c by exactly the summed w_c * x of its pixels."""
    inp = K.Input((H, W, C), dtype="float64")
    flat = K.layers.Flatten(dtype="float64")(inp)
    out = K.layers.Dense(CLASSES, use_bias=False, dtype="float64",
                         activation="softmax" if softmax else None)(flat)
    model = K.Model(inp, out)
    weights = np.random.default_rng(0).normal(size=(H * W * C, CLASSES))
    model.layers[-1].set_weights([weights])
    return model, weights


@pytest.fixture
def linear(K):
    model, weights = linear_model(K)
    x = np.random.default_rng(1).uniform(-1, 1, (N, H, W, C))
    return model, weights, x


def region_index(patch):
    """(H, W) row-major region index of every pixel, computed independently of the library."""
    gw = -(-W // patch)
    return np.array([[(i // patch) * gw + j // patch for j in range(W)] for i in range(H)])


def expected_curve(x, contrib, patch, order, steps=None):
    """Numpy reference: logit after removing (zero baseline) the regions in relevance order,
    the relevance being ``contrib`` itself (exact contributions of a bias-free linear model)."""
    idx = region_index(patch)
    regions = idx.max() + 1
    steps = regions if steps is None else steps
    curves = []
    for i in range(len(x)):
        pix = contrib[i].sum(-1)
        scores = np.array([pix[idx == p].sum() for p in range(regions)])
        ranked = sorted(range(regions), key=lambda p: (-scores[p] if order == "morf" else scores[p], p))
        logit = contrib[i].sum()
        row = [logit]
        for p in ranked[:steps]:
            logit -= scores[p]
            row.append(logit)
        curves.append(row)
    return np.array(curves)


@pytest.mark.parametrize("order", ["morf", "lerf"])
@pytest.mark.parametrize("patch", [2, 4])
def test_linear_model_curve_is_the_running_sum_of_removed_contributions(linear, order, patch):
    model, weights, x = linear
    target = np.array([0, 1, 2, 1, 0])
    contrib = x * weights[:, target].T.reshape(N, H, W, C)  # gradient x input of each image's target
    curve = evaluate.region_perturbation(model, x, contrib, target, patch=patch, baseline="zero", order=order)
    regions = (-(-H // patch)) * (-(-W // patch))  # 6x5 is not a multiple of 4: smaller last regions
    assert curve.shape == (N, regions + 1) and curve.dtype == np.float64
    np.testing.assert_allclose(curve, expected_curve(x, contrib, patch, order), rtol=1e-10, atol=1e-12)
    # MoRF falls below every LeRF step; the fully perturbed image (zeros) has logit 0 in both.
    np.testing.assert_allclose(curve[:, -1], 0, atol=1e-12)
    part = evaluate.region_perturbation(model, x, contrib, target, patch=patch, baseline="zero", order=order, steps=3)
    np.testing.assert_allclose(part, curve[:, :4], rtol=1e-12, atol=1e-12)


def test_srg_ranks_true_over_random_over_negated_attribution(linear):
    model, weights, x = linear
    target = 1
    contrib = x * weights[:, target].reshape(H, W, C)
    score = {}
    for name, r in [("true", contrib), ("random", np.random.default_rng(5).normal(size=x.shape)),
                    ("negated", -contrib)]:
        score[name] = evaluate.srg(model, x, r, target, patch=2, baseline="zero")
    assert np.all(score["true"] > score["random"]) and np.all(score["random"] > score["negated"])
    np.testing.assert_allclose(score["negated"], -score["true"], rtol=1e-10)  # no ties: orders swap exactly
    # and the documented definition: trapezoidal areas on [0, 1], LeRF minus MoRF
    s, morf, lerf = evaluate.srg(model, x, contrib, target, patch=2, baseline="zero", return_curves=True)
    xs = np.linspace(0, 1, morf.shape[1])
    np.testing.assert_allclose(s, trapezoid(lerf, xs, axis=1) - trapezoid(morf, xs, axis=1), rtol=1e-12)
    np.testing.assert_allclose(s, score["true"], rtol=1e-12)
    assert np.all(s > 0)


def test_negating_the_relevance_swaps_morf_and_lerf(linear):
    model, _, x = linear
    r = np.random.default_rng(2).normal(size=x.shape)
    for baseline in ("mean", "blur"):
        kw = dict(patch=2, baseline=baseline, target=2)
        morf = evaluate.region_perturbation(model, x, r, order="morf", **kw)
        lerf = evaluate.region_perturbation(model, x, r, order="lerf", **kw)
        np.testing.assert_allclose(evaluate.region_perturbation(model, x, -r, order="morf", **kw), lerf, rtol=1e-12)
        np.testing.assert_allclose(evaluate.region_perturbation(model, x, -r, order="lerf", **kw), morf, rtol=1e-12)
        assert not np.allclose(morf, lerf)


def test_constant_map_ties_break_by_region_index_and_score_zero(linear):
    model, weights, x = linear
    constant = np.ones(x.shape)
    ranks = evaluate.patch_ranks(constant, patch=1, order="lerf")
    np.testing.assert_array_equal(ranks[0], region_index(1))  # stable: region 0 first, in both orders
    np.testing.assert_array_equal(evaluate.patch_ranks(constant, 1, "morf"), ranks)
    s, morf, lerf = evaluate.srg(model, x, constant, 0, patch=1, return_curves=True)
    np.testing.assert_array_equal(morf, lerf)
    np.testing.assert_array_equal(s, 0.0)


def test_regions_are_scored_by_summed_relevance_so_smaller_edge_regions_score_less(linear):
    """6x5 images in 2x2 regions: the last column of regions is 2x1 and sums half as much."""
    constant = np.ones((1, H, W, C))
    morf = evaluate.patch_ranks(constant, patch=2, order="morf")[0]
    lerf = evaluate.patch_ranks(constant, patch=2, order="lerf")[0]
    idx = region_index(2)
    full, edge = [0, 1, 3, 4, 6, 7], [2, 5, 8]
    np.testing.assert_array_equal([morf[idx == p][0] for p in full + edge], range(9))  # ties: by region index
    np.testing.assert_array_equal([lerf[idx == p][0] for p in edge + full], range(9))


def test_constant_map_scores_like_random_rankings_in_expectation(linear):
    """Averaged over random rankings the SRG is 0 (MoRF and LeRF of a random map are exchangeable),
    the same as the constant map; the exact attribution is far above."""
    model, weights, x = linear
    contrib = x * weights[:, 0].reshape(H, W, C)
    rng = np.random.default_rng(7)
    random_scores = np.stack([evaluate.srg(model, x, rng.normal(size=(N, H, W)), 0, patch=2, baseline="zero")
                              for _ in range(30)])
    true = evaluate.srg(model, x, contrib, 0, patch=2, baseline="zero")
    mean, se = random_scores.mean(), random_scores.std() / np.sqrt(random_scores.size)
    assert abs(mean) < 4 * se
    assert true.mean() > mean + 10 * se


def test_batched_equals_per_image(linear):
    model, _, x = linear
    r = np.random.default_rng(3).normal(size=x.shape)
    for baseline in ("mean", "blur", "uniform", "zero"):
        kw = dict(patch=3, baseline=baseline, steps=4, output="probability")
        whole = evaluate.srg(model, x, r, return_curves=True, **kw)
        single = evaluate.srg(model, x, r, batch_size=1, return_curves=True, **kw)
        two = evaluate.srg(model, x, r, batch_size=2, return_curves=True, **kw)
        for a, b, c in zip(whole, single, two):
            np.testing.assert_allclose(b, a, rtol=1e-12, atol=1e-15)
            np.testing.assert_allclose(c, a, rtol=1e-12, atol=1e-15)


def test_target_none_is_the_predicted_class_and_probability_output(linear):
    model, weights, x = linear
    logits = x.reshape(N, -1) @ weights
    predicted = logits.argmax(1)
    r = np.random.default_rng(4).normal(size=x.shape)
    auto = evaluate.region_perturbation(model, x, r, patch=2, order="lerf")
    np.testing.assert_allclose(auto, evaluate.region_perturbation(model, x, r, predicted, patch=2, order="lerf"))
    np.testing.assert_allclose(auto[:, 0], logits.max(1), rtol=1e-12)
    prob = evaluate.region_perturbation(model, x, r, patch=2, order="lerf", output="probability")
    p0 = np.exp(logits - logits.max(1, keepdims=True))
    np.testing.assert_allclose(prob[:, 0], (p0 / p0.sum(1, keepdims=True)).max(1), rtol=1e-12)
    assert np.all((prob >= 0) & (prob <= 1))


def test_softmax_model_logit_and_probability(K):
    plain, weights = linear_model(K)
    soft, _ = linear_model(K, softmax=True)
    x = np.random.default_rng(1).uniform(-1, 1, (N, H, W, C))
    r = np.random.default_rng(4).normal(size=x.shape)
    kw = dict(patch=3, order="morf", target=1)
    np.testing.assert_allclose(evaluate.region_perturbation(soft, x, r, **kw),
                               evaluate.region_perturbation(plain, x, r, **kw), rtol=1e-9)
    np.testing.assert_allclose(evaluate.region_perturbation(soft, x, r, output="probability", **kw),
                               evaluate.region_perturbation(plain, x, r, output="probability", **kw), rtol=1e-9)


# ---------------------------------------------------------------------------------------------
# Baselines: what a replaced region becomes


class Recorder:
    """A stand-in model that records the images it is called with; output: two constant classes."""

    layers = [object()]  # not a softmax/sigmoid layer: the output is taken as logits

    def __init__(self):
        self.calls = []

    def __call__(self, x, training=False):
        self.calls.append(np.array(x))
        return np.zeros((len(x), 2))


def perturbed_after_one_step(baseline, x, relevance, patch=2, **kw):
    model = Recorder()
    evaluate.region_perturbation(model, x, relevance, 0, patch=patch, baseline=baseline, steps=1, **kw)
    assert len(model.calls) == 2  # one forward pass per step for the whole batch
    return model.calls[1]


@pytest.fixture
def images():
    x = np.random.default_rng(8).uniform(0.2, 0.9, (3, 6, 5, 3))
    relevance = np.zeros((3, 6, 5))
    relevance[:, 2:4, 2:4] = 1.0  # region 5 (rows 2-3, cols 2-3) is the most relevant
    return x, relevance


def test_mean_baseline_replaces_the_region_by_the_channel_means(images):
    x, r = images
    out = perturbed_after_one_step("mean", x, r)
    np.testing.assert_allclose(out[:, 2:4, 2:4], np.broadcast_to(x.mean((1, 2), keepdims=True), (3, 2, 2, 3)))
    mask = np.ones((6, 5), bool)
    mask[2:4, 2:4] = False
    np.testing.assert_array_equal(out[:, mask], x[:, mask])


def test_zero_baseline_and_smaller_last_regions(images):
    x, _ = images
    r = np.zeros((3, 6, 5))
    r[:, 4:, 4] = 5.0  # the 2x1 corner region (6x5 image, patch 2)
    out = perturbed_after_one_step("zero", x, r)
    np.testing.assert_array_equal(out[:, 4:, 4], 0)
    assert np.count_nonzero(out == 0) == 3 * 2 * 3


def test_blur_baseline_is_a_box_blur_of_width_2_patch_plus_1(images):
    x, r = images
    out = perturbed_after_one_step("blur", x, r, patch=1)
    # independent reference: 3x3 mean with replicated edges, pixel (2, 2) and its neighbours
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    ref = np.mean([padded[:, 2 + di:3 + di, 2 + dj:3 + dj] for di in (0, 1, 2) for dj in (0, 1, 2)], axis=0)
    np.testing.assert_allclose(out[:, 2:3, 2:3], ref, rtol=1e-12)
    # a constant image blurs to itself (edges replicated, not zero-padded)
    flat = np.full((1, 6, 5, 3), 0.7)
    np.testing.assert_allclose(perturbed_after_one_step("blur", flat, r[:1], patch=2), flat, rtol=1e-12)


def test_uniform_baseline_stays_in_each_images_range_and_follows_the_seed(images):
    x, r = images
    x = x * np.array([1.0, 10.0, 100.0])[:, None, None, None]
    out = perturbed_after_one_step("uniform", x, r)
    region = out[:, 2:4, 2:4]
    assert not np.allclose(region, x[:, 2:4, 2:4])
    for i in range(3):
        assert x[i].min() <= region[i].min() and region[i].max() <= x[i].max()
    np.testing.assert_array_equal(perturbed_after_one_step("uniform", x, r), out)
    assert not np.allclose(perturbed_after_one_step("uniform", x, r, seed=1), out)


def test_callable_baseline(images):
    x, r = images
    out = perturbed_after_one_step(lambda b: b * 0 + 42.0, x, r)
    np.testing.assert_array_equal(out[:, 2:4, 2:4], 42.0)
    out = perturbed_after_one_step(lambda b: np.float64(-1.0), x, r)  # broadcast to the batch
    np.testing.assert_array_equal(out[:, 2:4, 2:4], -1.0)


def test_integer_images_are_accepted(K):
    """uint8 images (as read from files) are perturbed in float: the mean baseline is not rounded."""
    model, weights = linear_model(K)
    x = np.random.default_rng(9).integers(0, 256, (N, H, W, C), dtype=np.uint8)
    r = np.random.default_rng(4).normal(size=x.shape)
    curve = evaluate.region_perturbation(model, x, r, 1, patch=3, baseline="mean", steps=1)
    np.testing.assert_allclose(curve, evaluate.region_perturbation(model, x.astype(np.float64), r, 1, patch=3,
                                                                   baseline="mean", steps=1), rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Errors name the argument, the value and the fix


@pytest.mark.parametrize("kwargs, error, words", [
    (dict(baseline="foo"), ValueError, ["baseline='foo'", "'zero', 'mean', 'blur', 'uniform'", "callable"]),
    (dict(order="best"), ValueError, ["order='best'", "'morf', 'lerf'"]),
    (dict(output="logits"), ValueError, ["output='logits'", "'logit', 'probability'"]),
    (dict(patch=0), ValueError, ["patch must be an integer >= 1", "0"]),
    (dict(patch=2.5), ValueError, ["patch must be an integer >= 1", "2.5"]),
    (dict(steps=-1), ValueError, ["steps must be an integer >= 0", "-1"]),
    (dict(steps=31), ValueError, ["steps=31", "only 30 patches", "steps=None"]),
    (dict(batch_size=0), ValueError, ["batch_size must be an integer >= 1 or None", "0"]),
    (dict(target=7), InvalidTargetError, ["target[0] = 7", "3 outputs", "0..2"]),
    (dict(target=-1), InvalidTargetError, ["target=-1", ">= 0"]),
    (dict(target=[0, 1]), InvalidTargetError, ["target has shape (2,)", "(5,)"]),
    (dict(baseline=lambda b: b[:, :2]), ValueError, ["callable baseline returned shape", "shaped like its argument"]),
])
def test_bad_arguments_are_refused_with_a_message(kwargs, error, words):
    import tf_keras

    kwargs = dict(kwargs)
    model, _ = linear_model(tf_keras)
    x = np.random.default_rng(1).uniform(-1, 1, (N, H, W, C))
    r = np.ones((N, H, W))
    with pytest.raises(error) as info:
        evaluate.region_perturbation(model, x, r, patch=kwargs.pop("patch", 1), **kwargs)
    for w in words:
        assert w in str(info.value), (w, str(info.value))


def test_bad_images_and_relevance_shapes():
    import tf_keras

    model, _ = linear_model(tf_keras)
    x = np.zeros((N, H, W, C))
    with pytest.raises(InvalidInputError, match=r"x must be a batch of images of shape \(n, H, W, C\), got shape "
                                                r"\(6, 5, 2\).*x\[None\]"):
        evaluate.srg(model, x[0], np.zeros((H, W, C)))
    with pytest.raises(ValueError, match=r"relevance has shape \(5, 6, 4\) but x has shape \(5, 6, 5, 2\)"):
        evaluate.srg(model, x, np.zeros((N, H, 4)))
    with pytest.raises(ValueError, match="relevance has NaN"):
        evaluate.srg(model, x, np.full((N, H, W), np.nan))
    with pytest.raises(ValueError, match="return_curves must be True or False"):
        evaluate.srg(model, x, np.zeros((N, H, W)), return_curves="yes")


# ---------------------------------------------------------------------------------------------
# The compiled forward pass: the model's own outputs, traced once per image shape, model untouched


def small_cnn(K, softmax=False):
    """A float32 conv net on 8x8x2 images with 3 classes (random weights, fixed seed)."""
    K.utils.set_random_seed(3)
    L = K.layers
    return K.Sequential([K.Input((8, 8, 2)), L.Conv2D(4, 3, activation="relu"), L.MaxPooling2D(2),
                         L.Flatten(), L.Dense(3, activation="softmax" if softmax else None)])


def eager_deletion_curve(model, x, relevance, target, patch, order):
    """Reference: zero-baseline deletion with every perturbed batch run through the eager model."""
    ranks = evaluate.patch_ranks(relevance, patch, order)[..., None]
    curve = []
    for k in range(ranks.max() + 2):
        out = np.asarray(model(np.where(ranks < k, 0, x).astype(x.dtype), training=False), np.float64)
        curve.append(out[np.arange(len(x)), target])
    return np.stack(curve, 1)


def traces(model, kind="call"):
    from lrp_grad.evaluate import forward

    return forward._CACHE[model][kind].traces


def test_compiled_forward_gives_the_eager_models_outputs_and_traces_once(K):
    model = small_cnn(K)
    weights = [w.copy() for w in model.get_weights()]
    x = np.random.default_rng(10).uniform(0, 1, (5, 8, 8, 2)).astype(np.float32)
    r = np.random.default_rng(11).normal(size=x.shape)
    t = np.array([0, 1, 2, 0, 1])
    curve = evaluate.region_perturbation(model, x, r, t, patch=3, baseline="zero", batch_size=2)  # batches 2, 2, 1
    # float32 rounding at most: the compiled graph may fuse ops that eager mode runs one by one
    np.testing.assert_allclose(curve, eager_deletion_curve(model, x, r, t, 3, "morf"), rtol=1e-5, atol=1e-6)
    assert traces(model) == 1  # the batch axis is unknown: the last, smaller batch reuses the trace
    evaluate.srg(model, x, r, t, patch=2, batch_size=3)
    evaluate.insertion(model, x[:4], r[:4], patch=4, output="probability")
    assert traces(model) == 1  # cached per model, shared by every measure, batch size and output kind
    for before, after in zip(weights, model.get_weights()):
        np.testing.assert_array_equal(after, before)


def test_compiled_forward_sees_new_weights_and_lets_the_model_go(K):
    import gc
    import weakref

    from lrp_grad.evaluate import forward

    model = small_cnn(K)
    x = np.random.default_rng(12).uniform(0, 1, (3, 8, 8, 2)).astype(np.float32)
    r = np.random.default_rng(13).normal(size=x.shape)
    evaluate.srg(model, x, r, 0, patch=4)
    model.layers[-1].set_weights([w * 2 for w in model.layers[-1].get_weights()])  # as training would
    curve = evaluate.region_perturbation(model, x, r, 0, patch=4, baseline="zero")
    np.testing.assert_allclose(curve, eager_deletion_curve(model, x, r, np.zeros(3, int), 4, "morf"),
                               rtol=1e-5, atol=1e-6)
    assert model in forward._CACHE
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None  # the cache (and its compiled functions) hold the model weakly


def test_logits_of_a_softmax_model_are_compiled_once_and_equal_the_rewritten_model(K):
    import lrp_grad

    soft, plain = small_cnn(K, softmax=True), small_cnn(K)
    plain.set_weights(soft.get_weights())
    x = np.random.default_rng(14).uniform(0, 1, (5, 8, 8, 2)).astype(np.float32)
    r = np.random.default_rng(15).normal(size=x.shape)
    t = np.array([2, 1, 0, 1, 2])
    curve = evaluate.region_perturbation(soft, x, r, t, patch=3, baseline="zero", order="lerf", batch_size=2)
    np.testing.assert_allclose(curve, eager_deletion_curve(plain, x, r, t, 3, "lerf"), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(curve[:, 0], lrp_grad.Explainer(soft).forward(x)[np.arange(5), t], rtol=1e-6)
    evaluate.srg(soft, x, r, t, patch=2, batch_size=4)
    assert traces(soft, "logits") == 1


def test_softmax_logits_replan_when_a_folded_batchnorm_changes_sign():
    """A BatchNorm folded through a max pooling needs the scale signs of plan time; after training
    flipped them the cached logits are planned again (once), as lrp_grad.explain does."""
    import keras as K

    L = K.layers
    model = K.Sequential([K.Input((6, 6, 1)), L.Conv2D(3, 3, activation="relu"), L.BatchNormalization(name="bn"),
                          L.MaxPooling2D(2), L.Flatten(), L.Dense(2, activation="softmax")])
    bn = model.get_layer("bn")
    gamma, beta, mean, var = bn.get_weights()
    bn.set_weights([np.abs(gamma) + 0.5, beta, mean, var])
    x = np.random.default_rng(16).uniform(0, 1, (2, 6, 6, 1)).astype(np.float32)
    r = np.random.default_rng(17).normal(size=x.shape)
    evaluate.region_perturbation(model, x, r, 0, patch=3, steps=1)
    bn.set_weights([-(np.abs(gamma) + 0.5), beta, mean, var])
    plain = K.Sequential([K.Input((6, 6, 1))] + model.layers[:-1] + [L.Dense(2)])
    plain.layers[-1].set_weights(model.layers[-1].get_weights())
    curve = evaluate.region_perturbation(model, x, r, 0, patch=3, baseline="zero", steps=1)
    np.testing.assert_allclose(curve, eager_deletion_curve(plain, x, r, np.zeros(2, int), 3, "morf")[:, :2],
                               rtol=1e-5, atol=1e-6)
    assert traces(model, "logits") == 2  # planned and traced again, once


def test_dead_softmax_models_release_the_gradients_their_logit_traces_registered():
    """The rewritten model's custom gradients register in TensorFlow's global gradient registry when
    traced (issue 21); a deleted model's cached logits must release them."""
    import gc

    import tf_keras
    from tensorflow.python.framework import ops as tf_ops

    registry = tf_ops._gradient_registry._registry
    x = np.random.default_rng(18).uniform(0, 1, (2, 8, 8, 2)).astype(np.float32)

    def one():
        model = small_cnn(tf_keras, softmax=True)
        evaluate.region_perturbation(model, x, x, 0, patch=4, steps=1)
        return len(registry)

    one()
    gc.collect()
    gc.collect()  # earlier tests' objects may need a second pass (finalizers freeing cycles)
    before = len(registry)
    assert one() > before, "the test no longer exercises custom gradients: it cannot see a leak"
    one()
    gc.collect()
    assert len(registry) <= before


def test_srg_runs_both_orders_in_one_pass_when_twice_the_batch_fits(K):
    """Step k of MoRF and LeRF share one forward pass of 2m images when 2m <= batch_size; the curves
    are region_perturbation's (the model's float32 rounding at most)."""
    model = Recorder()
    x = np.random.default_rng(19).uniform(0, 1, (3, 6, 5, 2))
    r = np.random.default_rng(20).normal(size=(3, 6, 5))
    evaluate.srg(model, x, r, 0, patch=2, steps=2)
    assert [len(c) for c in model.calls] == [3, 6, 6]  # unperturbed, then both orders per step
    model.calls.clear()
    evaluate.srg(model, x, r, 0, patch=2, steps=2, batch_size=5)
    assert [len(c) for c in model.calls] == [3, 3, 3, 3, 3]  # 6 > 5: one order after the other
    cnn = small_cnn(K)
    x = np.random.default_rng(21).uniform(0, 1, (5, 8, 8, 2)).astype(np.float32)
    r = np.random.default_rng(22).normal(size=x.shape)
    _, morf, lerf = evaluate.srg(cnn, x, r, patch=3, baseline="blur", return_curves=True)
    for order, curve in (("morf", morf), ("lerf", lerf)):
        alone = evaluate.region_perturbation(cnn, x, r, patch=3, baseline="blur", order=order)
        np.testing.assert_allclose(curve, alone, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(curve, eager_blur_curve(cnn, x, r, 3, order), rtol=1e-5, atol=1e-6)


def eager_blur_curve(model, x, relevance, patch, order):
    """Reference deletion curve with the blur baseline, every perturbed batch run eagerly."""
    from lrp_grad.evaluate.region import _box_blur

    ranks = evaluate.patch_ranks(relevance, patch, order)[..., None]
    base = _box_blur(x, 2 * patch + 1).astype(x.dtype)
    t = np.asarray(model(x, training=False)).argmax(1)
    rows = []
    for k in range(ranks.max() + 2):
        out = np.asarray(model(np.where(ranks < k, base, x), training=False), np.float64)
        rows.append(out[np.arange(len(x)), t])
    return np.stack(rows, 1)
