"""explain() against the float64 numpy reference (tests/npref.py) over a grid of layers and rules.

float64 models must agree to 1e-10 relative L2, float32 models to 1e-5. Inputs are signed and
non-negative (the latter takes the faster non-negative path of the sign-split rules).

Both Keras packages: tf-keras runs the full grid; Keras 3 runs a diagonal of it by default (every
rule and every configuration at least once, see :func:`grid`) and the rest with ``-m slow``.
"""
import itertools

import numpy as np
import pytest

import lrp_grad
from kit import PACKAGES, assert_close, cnn, mlp, npref_rule, package, to_npref

import npref

RULES = [
    lrp_grad.Z(),
    lrp_grad.Epsilon(1e-6),
    lrp_grad.Epsilon(0.1, bias=False),
    lrp_grad.AlphaBeta(2, 1),
    lrp_grad.AlphaBeta(3, 2, bias=False),
    lrp_grad.ZPlus(),
    lrp_grad.Flat(),
    lrp_grad.WSquare(),
    lrp_grad.ZBox(-1.0, 1.0),
    lrp_grad.ZBox(-1.0, 1.0, bias=True),
    lrp_grad.Gamma(0.25),
]

# (padding, strides, dilation, bias); Keras forbids strides > 1 together with dilation > 1.
CONV_CONFIGS = [
    ("valid", 1, 1, True), ("same", 1, 1, True), ("valid", 2, 1, True), ("same", 2, 1, True),
    ("valid", 1, 2, True), ("same", 1, 2, True), ("same", 2, 1, False), ("valid", 1, 2, False),
]


PKG_IDS = {"keras": "keras3", "tf_keras": "tf_keras"}


def grid(*axes, ids):
    """Parameters ``(pkg, *case)`` over the cross product of ``axes`` for both packages.

    tf-keras gets every case. Keras 3 gets a diagonal in the default run: rule k with the
    combination ``k % len(heads)`` of the other axes (and, were there more combinations than
    rules, combination j with rule ``j % len(rules)``), so that every rule and every combination
    of the other axes runs at least once; the other Keras 3 cases are marked slow
    (``pytest -m slow`` runs the full Keras 3 sweep).
    """
    heads, rules = list(itertools.product(*axes[:-1])), axes[-1]
    params = []
    for pkg in PACKAGES:
        for k, rule in enumerate(rules):
            for j, head in enumerate(heads):
                case = (*head, rule)
                diagonal = j == k % len(heads) or k == j % len(rules)
                marks = () if pkg == "tf_keras" or diagonal else (pytest.mark.slow,)
                params.append(pytest.param(pkg, *case, marks=marks, id="-".join([PKG_IDS[pkg], *ids(*case)])))
    return params


def reference(model, x, target, rule):
    layers = to_npref(model)
    logits = npref.forward(layers, x.astype(np.float64))[-1]
    r_out = np.zeros_like(logits)
    r_out[np.arange(len(x)), target] = logits[np.arange(len(x)), target]
    return npref.lrp(layers, x.astype(np.float64), r_out, npref_rule(rule))[0]


def float32_tol(rule):
    """1e-5, except where the rule's denominator can cancel to a few float32 ulps without a bias
    to keep it away from zero: sign-split rules without bias (a dead-ish unit's z+ or z-) and z^B
    applied to every layer (hidden inputs lie outside its box, so its terms take both signs).
    The ratio z_ij / z_j then amplifies rounding (seen up to 5e-3 relative L2 on random nets);
    these rules are held to 1e-10 in the float64 tests."""
    if isinstance(rule, (lrp_grad.AlphaBeta, lrp_grad.ZBox)) and not rule.bias:
        return 1e-2
    return 1e-5


def check(model, rule, dtype, shape, tol, seed=0):
    rng = np.random.default_rng(seed)
    ex = lrp_grad.Explainer(model, rule=rule)
    for signed in (True, False):
        x = rng.uniform(-1 if signed else 0, 1, (3,) + shape).astype(dtype)
        target = rng.integers(0, 4, 3)
        R = ex(x, target=target)
        assert R.dtype == np.dtype(dtype)
        assert_close(R, reference(model, x, target, rule), tol, f"{rule!r} signed={signed}")


def config_id(config):
    return "{}-s{}-d{}-bias{}".format(*config)


@pytest.mark.parametrize("pkg, config, rule", grid(CONV_CONFIGS, RULES, ids=lambda c, r: [config_id(c), repr(r)]))
def test_cnn_float64(pkg, config, rule):
    padding, strides, dilation, bias = config
    model = cnn((9, 10, 2), padding, strides, dilation, bias, dtype="float64", K=package(pkg))
    check(model, rule, "float64", (9, 10, 2), 1e-10)


@pytest.mark.parametrize("pkg, dtype, bias, rule", grid(["float64", "float32"], [True, False], RULES,
                                                        ids=lambda d, b, r: [d, str(b), repr(r)]))
def test_mlp(pkg, bias, dtype, rule):
    tol = 1e-10 if dtype == "float64" else float32_tol(rule)
    check(mlp(bias=bias, dtype=dtype, K=package(pkg)), rule, dtype, (7,), tol)


@pytest.mark.parametrize("pkg, config, rule", grid(CONV_CONFIGS[1:6:2], RULES,
                                                   ids=lambda c, r: ["{}-s{}-d{}".format(*c), repr(r)]))
def test_cnn_float32(pkg, config, rule):
    padding, strides, dilation, bias = config
    model = cnn((9, 10, 2), padding, strides, dilation, bias, dtype="float32", K=package(pkg))
    check(model, rule, "float32", (9, 10, 2), float32_tol(rule))


def test_linear_activations_take_the_signed_path(K):
    """Without ReLUs every hidden input is signed: the x- half of the split rules matters."""
    model = cnn((8, 8, 1), "same", act="linear", dtype="float64", K=K)
    for rule in (lrp_grad.AlphaBeta(2, 1), lrp_grad.Gamma(0.5), lrp_grad.ZPlus()):
        check(model, rule, "float64", (8, 8, 1), 1e-10)
