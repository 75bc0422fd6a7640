"""Composites: per-layer rules as printable data; presets by function and by name.

Every test runs on a model of each Keras package (Keras 3 and tf-keras); layer-class matchers are
the classes of that package.
"""
import numpy as np
import pytest

import kit
import lrp_grad
from lrp_grad import AlphaBeta, Composite, Epsilon, Flat, Gamma, InvalidRuleError, Z, ZBox, ZPlus, presets
from lrp_grad.frontends import package_of
from kit import assert_close, mlp, npref_rule, randomize, to_npref

import npref

IDS = {"keras": "keras3", "tf_keras": "tf_keras"}


@pytest.fixture(scope="module", params=kit.PACKAGES, ids=[IDS[p] for p in kit.PACKAGES])
def K(request):
    """The Keras package (module-scoped here, unlike conftest's, so each model is built once per package)."""
    return kit.package(request.param)


@pytest.fixture(scope="module")
def model(K):
    L = K.layers
    inp = K.Input((8, 8, 1))
    h = L.Conv2D(4, 3, activation="relu", name="c1")(inp)
    h = L.Conv2D(4, 3, activation="relu", name="c2")(h)
    h = L.AveragePooling2D(2, name="pool")(h)
    h = L.Flatten(name="flat")(h)
    h = L.Dense(6, activation="relu", name="d1")(h)
    model = randomize(K.Model(inp, L.Dense(3, name="out")(h)))
    assert package_of(model) == K.__name__
    return model


def test_resolve_prints_what_will_happen(model):
    rules = presets.epsilon_plus_flat().resolve(model)
    assert dict(rules) == {"c1": Flat(), "c2": ZPlus(), "pool": Epsilon(1e-6), "d1": Epsilon(1e-6),
                           "out": Epsilon(1e-6)}
    text = str(rules)
    assert "c1 (Conv2D)" in text and "Flat()" in text and "pool (AveragePooling2D)  pool" in text
    assert "flat" not in dict(rules)  # layers without a rule are not listed


def test_first_override_and_order(K, model):
    c = Composite([(K.layers.Conv2D, AlphaBeta(2, 1)), ("weighted", Epsilon(0.1))], first=("dense", Z()),
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


def test_presets_by_name_and_function(K, model):
    x = np.random.default_rng(0).uniform(0, 1, (2, 8, 8, 1)).astype(np.float32)
    for name in presets.NAMES:
        assert isinstance(presets.get(name), Composite)
        np.testing.assert_allclose(lrp_grad.explain(model, x, target=0, rule=name),  # two compiled passes:
                                   lrp_grad.explain(model, x, target=0, rule=getattr(presets, name)()),  # rounding
                                   rtol=1e-5, atol=1e-8)
    seed = presets.seed_ab(3, 2).resolve(model)  # a/b on Dense/Conv, epsilon on weight-free layers
    assert seed["c1"] == AlphaBeta(3, 2) and seed["pool"] == lrp_grad.Epsilon(1e-6)
    box = presets.epsilon_gamma_box(-1.0, 2.0).resolve(model)
    assert box["c1"] == ZBox(-1.0, 2.0) and box["c2"] == Gamma(0.25)
    assert "c1" not in presets.epsilon_gamma_box().resolve(mlp(K=K))  # no conv: no z^B layer
    with pytest.raises(InvalidRuleError, match="unknown rule or preset name 'epsilon'; valid names: epsilon_plus"):
        presets.get("epsilon")


def test_first_rule_against_reference(K):
    """Composite with a flat first layer equals the numpy reference with first_rule=flat."""
    model = mlp(dtype="float64", K=K)
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


def test_layer_class_matchers_of_the_models_package(K, model):
    """Layer classes as matchers, written with the model's package's classes (Keras 3:
    ``keras.layers.*``); a built-in class of the other package matches its namesake, a user's own
    subclass only its own instances."""
    L = K.layers
    other = kit.package(next(p for p in kit.PACKAGES if p != K.__name__))
    c = Composite([(L.Dense, Z()), ((L.Conv2D, L.AveragePooling2D), AlphaBeta(2, 1))], first=(L.Conv2D, Flat()),
                  default=Epsilon(0.5), name="classes")
    ab = AlphaBeta(2, 1)
    assert dict(c.resolve(model)) == {"c1": Flat(), "c2": ab, "pool": ab, "d1": Z(), "out": Z()}
    text = str(c)
    assert "first Conv2D layer -> Flat()" in text and "  Dense -> Z()" in text, text
    assert "  (Conv2D, AveragePooling2D) -> AlphaBeta(alpha=2.0, beta=1.0, bias=True)" in text, text
    foreign = Composite([(other.layers.Dense, Z()), (other.layers.Conv2D, Flat())], default=Epsilon(0.5))
    assert dict(foreign.resolve(model)) == {"c1": Flat(), "c2": Flat(), "pool": Epsilon(0.5), "d1": Z(), "out": Z()}

    class MyConv(L.Conv2D):
        pass

    own = Composite([(MyConv, Z()), ((MyConv, L.Dense), Flat())], default=Epsilon(0.5))
    assert dict(own.resolve(model)) == {"c1": Epsilon(0.5), "c2": Epsilon(0.5), "pool": Epsilon(0.5), "d1": Flat(),
                                        "out": Flat()}
    both = Composite([((other.layers.Dense, L.Dense), Z())], default=Epsilon(0.5))
    assert both.resolve(model)["d1"] == Z() and both.resolve(model)["c1"] == Epsilon(0.5)
    predicate = Composite([(lambda layer: isinstance(layer, L.Conv2D), ZPlus())], default=Epsilon(0.5))
    assert predicate.resolve(model)["c2"] == ZPlus() and predicate.resolve(model)["d1"] == Epsilon(0.5)
    with pytest.raises(InvalidRuleError, match=r"has no rule for 1 layer\(s\): 'pool' \(AveragePooling2D, family 'pool'\)"):
        Composite([(L.Dense, Z()), (L.Conv2D, ZPlus())]).resolve(model)
    # The same rules by class or by family give the same relevance.
    x = np.random.default_rng(1).uniform(0, 1, (2, 8, 8, 1)).astype(np.float32)
    by_class = Composite([(L.Conv2D, ZPlus()), (L.Dense, Epsilon(0.1)), (L.AveragePooling2D, Epsilon(1e-6))])
    by_family = Composite([("conv", ZPlus()), ("dense", Epsilon(0.1)), ("pool", Epsilon(1e-6))])
    np.testing.assert_allclose(lrp_grad.explain(model, x, target=1, rule=by_class),
                               lrp_grad.explain(model, x, target=1, rule=by_family), rtol=1e-5, atol=1e-8)


def test_overrides_by_nested_path(K):
    """A nested model is inlined: its layers are ``'block/<name>'`` (Keras 3 layer names cannot
    contain '/', so the path is unambiguous) and overrides take either that path or the name."""
    L = K.layers
    bi = K.Input((6,))
    block = K.Model(bi, L.Dense(5, activation="relu", name="c2")(L.Dense(5, name="c1")(bi)), name="block")
    inp = K.Input((6,))
    model = randomize(K.Model(inp, L.Dense(3, name="out")(block(inp))))
    c = Composite([("linear", Epsilon(0.1))], first=Flat(), overrides={"block/c2": Z(), "out": Gamma(0.5)})
    rules = c.resolve(model)
    assert dict(rules) == {"block/c1": Flat(), "block/c2": Z(), "out": Gamma(0.5)}
    assert "block/c2 (Dense)" in str(rules), str(rules)
    assert Composite([("linear", Epsilon(0.1))], overrides={"c1": Z()}).resolve(model)["block/c1"] == Z()
    with pytest.raises(InvalidRuleError, match=r"overrides layers \['block/c9'\] .* \['block/c1', 'block/c2', 'out'\]"):
        Composite([("linear", Epsilon())], overrides={"block/c9": Z()}).resolve(model)
