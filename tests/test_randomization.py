"""Model-parameter randomisation check (Adebayo et al. 2018; issue 22)."""
import numpy as np
import pytest

import lrp_grad
from lrp_grad import evaluate
from lrp_grad.errors import UnsupportedModelError


def small_cnn(K):
    inp = K.Input((8, 8, 1))
    h = K.layers.Conv2D(4, 3, padding="same", activation="relu")(inp)
    h = K.layers.Conv2D(4, 3, padding="same", activation="relu")(h)
    h = K.layers.Flatten()(h)
    h = K.layers.Dense(8, activation="relu")(h)
    out = K.layers.Dense(3)(h)
    model = K.Model(inp, out)
    rng = np.random.default_rng(0)
    model.set_weights([rng.normal(0, 0.5, w.shape) for w in model.get_weights()])
    return model


def explain(m, x):
    return lrp_grad.Explainer(m)(x, target=0)


@pytest.fixture
def setup(K):
    model = small_cnn(K)
    x = np.random.default_rng(1).uniform(0, 1, (4, 8, 8, 1)).astype(np.float32)
    return model, x


def test_rank_correlation():
    rng = np.random.default_rng(0)
    r = rng.normal(size=(3, 5, 4, 2))
    np.testing.assert_allclose(evaluate.rank_correlation(r, r), 1.0)
    np.testing.assert_allclose(evaluate.rank_correlation(r, -r), 1.0)  # compares |relevance|
    a = np.arange(1.0, 7.0).reshape(1, 2, 3)
    np.testing.assert_allclose(evaluate.rank_correlation(a, a[:, ::-1, ::-1]), -1.0)
    # Ties take their average rank: |[1, 2, 2, 3]| vs [1, 2, 3, 4] -> ranks [0, 1.5, 1.5, 3] vs [0, 1, 2, 3].
    tied = np.array([[[1.0, -2.0, 2.0, 3.0]]])
    ra, rb = np.array([0, 1.5, 1.5, 3]) - 1.5, np.arange(4.0) - 1.5
    expected = (ra * rb).sum() / np.sqrt((ra ** 2).sum() * (rb ** 2).sum())
    np.testing.assert_allclose(evaluate.rank_correlation(tied, np.arange(4.0).reshape(1, 1, 4)), expected)
    assert np.isnan(evaluate.rank_correlation(np.ones((1, 2, 2)), r[:1, :2, :2, 0]))[0]
    with pytest.raises(ValueError, match=r"rank_correlation: the maps have shapes \(3, 5, 4, 2\) and \(3, 5, 4\)"):
        evaluate.rank_correlation(r, r[..., 0])


def test_randomising_changes_the_maps_and_never_the_users_model(setup):
    model, x = setup
    before = [w.copy() for w in model.get_weights()]
    variables = [id(v) for v in model.weights]
    result = evaluate.randomization_check(explain, model, x, seed=0)
    # The user's model: the same variables, bit-identical values.
    assert [id(v) for v in model.weights] == variables
    for b, a in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)
    names = [layer.name for layer in evaluate.weighted_layers(model)]
    assert len(names) == 4 and result.layers == tuple(names[::-1])  # the cascade starts at the top
    assert result.similarity.shape == (5, len(x))
    np.testing.assert_allclose(result.similarity[0], 1.0, atol=1e-9)  # the clone explains like the model
    assert np.all(result.similarity[1:] < 1.0)
    assert result.mean[-1] < 0.9  # everything random: the map no longer follows the model
    # Seeded: the same cascade again gives the same numbers; top-k is the start of the full cascade.
    again = evaluate.randomization_check(explain, model, x, layers=2, seed=0)
    assert again.layers == result.layers[:2]
    np.testing.assert_allclose(again.similarity, result.similarity[:3], atol=1e-9)
    for b, a in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_bad_arguments(setup):
    model, x = setup
    with pytest.raises(TypeError, match=r"randomization_check: explain_fn must be a callable explain_fn\(model, x\)"):
        evaluate.randomization_check("lrp", model, x)
    with pytest.raises(ValueError, match=r"layers must be an integer from 1 to 4 \(the model's weighted layers: .*\) "
                                         r"or None for all of them, got 0"):
        evaluate.randomization_check(explain, model, x, layers=0)
    with pytest.raises(ValueError, match=r"layers must be an integer from 1 to 4 .*got 5"):
        evaluate.randomization_check(explain, model, x, layers=5)
    with pytest.raises(ValueError, match=r"layers must be an integer from 1 to 4 .*got 'top'"):
        evaluate.randomization_check(explain, model, x, layers="top")
    with pytest.raises(ValueError, match=r"randomization_check: seed must be an integer >= 0, got -1"):
        evaluate.randomization_check(explain, model, x, seed=-1)
    with pytest.raises(ValueError, match=r"explain_fn returned shape \(4, 64\); it must return one map per image"):
        evaluate.randomization_check(lambda m, v: np.zeros((len(v), 64)), model, x)
    calls = []

    def shrinking(m, v):
        calls.append(m)
        return np.ones((len(v), 8, 8)) if len(calls) == 1 else np.ones((len(v), 4, 4))

    with pytest.raises(ValueError, match=r"returned shape \(4, 4, 4\) for the randomised model but \(4, 8, 8\)"):
        evaluate.randomization_check(shrinking, model, x)


def test_models_without_kernels_or_that_cannot_be_cloned(K):
    inp = K.Input((4, 4, 1))
    model = K.Model(inp, K.layers.Flatten()(inp))
    with pytest.raises(UnsupportedModelError, match=r"has no layer with a kernel .* to re-initialise"):
        evaluate.randomization_check(explain, model, np.zeros((1, 4, 4, 1)))

    class Sub(K.Model):
        def __init__(self):
            super().__init__()
            self.dense = K.layers.Dense(2)
            self.flat = K.layers.Flatten()

        def call(self, v):
            return self.dense(self.flat(v))

    sub = Sub()
    sub(np.zeros((1, 4, 4, 1), np.float32))
    with pytest.raises(UnsupportedModelError, match=r"cannot be cloned with .*pass a functional or Sequential model"):
        evaluate.randomization_check(lambda m, v: np.ones((len(v), 4, 4)), sub, np.zeros((1, 4, 4, 1), np.float32))
