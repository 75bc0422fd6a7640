"""Composites: per-layer rules as printable data; presets by function and by name."""
import numpy as np
import pytest
import tf_keras as keras

import lrp_grad
from lrp_grad import AlphaBeta, Composite, Epsilon, Flat, Gamma, InvalidRuleError, Z, ZBox, ZPlus, presets
from kit import L, assert_close, mlp, npref_rule, randomize, to_npref

import npref


@pytest.fixture(scope="module")
def model():
    inp = keras.Input((8, 8, 1))
    h = L.Conv2D(4, 3, activation="relu", name="c1")(inp)
    h = L.Conv2D(4, 3, activation="relu", name="c2")(h)
    h = L.AveragePooling2D(2, name="pool")(h)
    h = L.Flatten(name="flat")(h)
    h = L.Dense(6, activation="relu", name="d1")(h)
    return randomize(keras.Model(inp, L.Dense(3, name="out")(h)))


def test_resolve_prints_what_will_happen(model):
    rules = presets.epsilon_plus_flat().resolve(model)
    assert dict(rules) == {"c1": Flat(), "c2": ZPlus(), "pool": Epsilon(1e-6), "d1": Epsilon(1e-6),
                           "out": Epsilon(1e-6)}
    text = str(rules)
    assert "c1 (Conv2D)" in text and "Flat()" in text and "pool (AveragePooling2D)  pool" in text
    assert "flat" not in dict(rules)  # layers without a rule are not listed


def test_first_override_and_order(model):
    c = Composite([(L.Conv2D, AlphaBeta(2, 1)), ("weighted", Epsilon(0.1))], first=("dense", Z()),
                  overrides={"c2": Gamma(0.5)}, default=Epsilon(1e-3), name="mine")
    assert dict(c.resolve(model)) == {"c1": AlphaBeta(2, 1), "c2": Gamma(0.5), "pool": Epsilon(1e-3),
                                      "d1": Z(), "out": Epsilon(0.1)}
    assert "Composite 'mine'" in str(c) and "'c2' -> Gamma(gamma=0.5)  (override)" in str(c)
    predicate = Composite([(lambda layer: layer.name.startswith("d"), Z())], default=Epsilon(0.5))
    assert predicate.resolve(model)["d1"] == Z() and predicate.resolve(model)["c1"] == Epsilon(0.5)


def test_override_wins_over_first_rule(model):
    c = Composite([("linear", Epsilon(0.1))], first=Flat(), overrides={"c1": Z()})
    assert c.resolve(model)["c1"] == Z()


def test_composite_errors(model):
    with pytest.raises(InvalidRuleError, match=r"has no rule for 1 layer\(s\): 'pool' \(AveragePooling2D, family 'pool'\)"):
        Composite([("weighted", Epsilon())]).resolve(model)
    with pytest.raises(InvalidRuleError, match=r"overrides layers \['c9'\] that are not rule-taking .* \['c1', 'c2'"):
        Composite([("linear", Epsilon())], overrides={"c9": Z()}).resolve(model)
    with pytest.raises(InvalidRuleError, match="unknown layer family 'convolution'"):
        Composite([("convolution", Epsilon())])
    with pytest.raises(InvalidRuleError, match=r"rules\[0\]: 'eps' is not an lrp_grad rule"):
        Composite([("conv", "eps")])
    with pytest.raises(InvalidRuleError, match=r"rules\[0\] must be a \(matcher, rule\) pair"):
        Composite([Epsilon()])
    with pytest.raises(InvalidRuleError, match="matcher 3 must be a family name"):
        Composite([(3, Epsilon())])


def test_presets_by_name_and_function(model):
    x = np.random.default_rng(0).uniform(0, 1, (2, 8, 8, 1)).astype(np.float32)
    for name in presets.NAMES:
        assert isinstance(presets.get(name), Composite)
        np.testing.assert_allclose(lrp_grad.explain(model, x, target=0, rule=name),  # two compiled passes:
                                   lrp_grad.explain(model, x, target=0, rule=getattr(presets, name)()),  # rounding
                                   rtol=1e-5, atol=1e-8)
    assert presets.seed_ab(3, 2).resolve(model)["pool"] == AlphaBeta(3, 2)
    box = presets.epsilon_gamma_box(-1.0, 2.0).resolve(model)
    assert box["c1"] == ZBox(-1.0, 2.0) and box["c2"] == Gamma(0.25)
    assert "c1" not in presets.epsilon_gamma_box().resolve(mlp())  # no conv: no z^B layer
    with pytest.raises(InvalidRuleError, match="unknown rule or preset name 'epsilon'; valid names: epsilon_plus"):
        presets.get("epsilon")


def test_first_rule_against_reference():
    """Composite with a flat first layer equals the numpy reference with first_rule=flat."""
    model = mlp(dtype="float64")
    x = np.random.default_rng(0).normal(size=(3, 7))
    target = np.array([0, 1, 2])
    comp = Composite([("linear", Epsilon(1e-3))], first=Flat())
    layers = to_npref(model)
    logits = npref.forward(layers, x)[-1]
    r_out = np.zeros_like(logits)
    r_out[np.arange(3), target] = logits[np.arange(3), target]
    expected = npref.lrp(layers, x, r_out, npref_rule(Epsilon(1e-3)), first_rule=npref_rule(Flat()))[0]
    assert_close(lrp_grad.explain(model, x, target=target, rule=comp), expected, 1e-10, "first=Flat")


def test_explainer_exposes_rules(model):
    ex = lrp_grad.Explainer(model, rule="seed_ab")
    assert ex.rules["c1"] == AlphaBeta(2, 1)
    assert "seed_ab(2, 1)" in repr(ex)
