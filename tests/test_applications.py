"""Every constructor of ``keras.applications`` (Keras 3) and ``tf_keras.applications``, explained.

The constructors are discovered at import time (every public callable of the ``applications``
module whose name starts with an uppercase letter), so a constructor added by a Keras release is
swept without editing this file. Each is built once per package with ``weights=None`` (random
initialisation: no download), ``classes=10``, ``classifier_activation=None`` (taken by every
constructor of both packages; tf-keras' ResNet50/101/152 take it through ``**kwargs``) at the
smallest input size it accepts (:data:`MIN_SIZE`), and explained on 2 images of uniform random
pixels in 0..255 (fixed seed) with each of :data:`RULES`. Per rule:

1. the relevance has the input's shape, is finite and is not all zero for any sample (see
   :func:`_check_relevance` for the one documented exception: logits below the rules'
   stabiliser, where float32 relevance underflows by absorption and ``Z()`` stands in);
2. the canonized (rewritten) forward pass ``ex.forward(x)`` equals ``model(x, training=False)``
   (to the model's own float32 reproducibility where that is worse: see the check)
   (float32: ``rtol=1e-4`` and ``atol=1e-4 * max|logit|``; BatchNorm folding re-associates the
   products, measured worst error ~1e-6 of max|logit| over the sweep);
3. the per-layer report is a Mapping with one entry per layer call of the canonized graph plus
   the input, all entries finite, its last entry the explained (predicted) logit;
4. the user's model is not mutated (same variables, same values, same layers).

The full sweep, every constructor of both packages with every rule (111 models, 333 tests), is
marked ``slow``. The default run explains a lean subset, :data:`LEAN`: one model and one rule
per family with its own structural problem (:data:`LEAN_FAMILIES`: ConvNeXt, RegNetX/Y,
MobileNetV3, EfficientNet, ResNetRS, InceptionResNetV2), spread over both packages. The cost is
the first call of each explainer, which traces and optimises the whole rewritten graph (10-30 s
per model and rule here; building a model is 2-10 s).

Commands and times measured on the project's 2-core CPU machine (shared with other jobs)::

    python -m pytest tests/test_applications.py                    # lean default: ~2.5 min (measured 2:26 wall, 141 s CPU)
    python -m pytest tests/test_applications.py -m slow -q -p no:cacheprovider --durations=15
                                                                   # every constructor: ~1 min per constructor, ~2 h for all 111

The junit properties of each model test (``--junitxml=FILE``) hold the relevance sum over the explained
logit per sample, max |logit| and the forward error, for tables such as the README's.
"""
from __future__ import annotations

import gc
import inspect
import re
import types
from collections.abc import Mapping

import numpy as np
import pytest

import kit
import lrp_grad
from lrp_grad.rules import STABILIZER

IDS = {"keras": "keras3", "tf_keras": "tf_keras"}

#: Smallest input side each constructor accepts with ``weights=None`` and ``include_top=True``:
#: the ``min_size`` it passes to ``imagenet_utils.obtain_input_shape`` (MobileNetV3 checks
#: ``rows < 32`` itself). 75 for the Inceptions (their stem of stride-2 'valid' convolutions and
#: poolings needs 75 pixels to leave a map for the last reduction blocks), 71 for Xception (its
#: 'valid' stem convolutions); 32 for every other constructor. Verified cheaply (the check comes
#: before any layer is built) by test_min_size_table_is_the_minimum.
MIN_SIZE = {"InceptionV3": 75, "InceptionResNetV2": 75, "Xception": 71}
DEFAULT_MIN_SIZE = 32

#: The rules every model is explained with (test id -> rule): a preset by name, two single rules.
RULES = {
    "epsilon_plus_flat": "epsilon_plus_flat",
    "alpha2beta1": lrp_grad.AlphaBeta(2, 1),
    "epsilon1e-6": lrp_grad.Epsilon(1e-6),
}

#: Family of a constructor name: the first pattern that matches (``re.fullmatch``).
FAMILIES = [
    ("ConvNeXt", r"ConvNeXt\w+"),
    ("DenseNet", r"DenseNet\d+"),
    ("EfficientNetV2", r"EfficientNetV2\w+"),
    ("EfficientNet", r"EfficientNetB\d"),
    ("InceptionResNetV2", r"InceptionResNetV2"),
    ("InceptionV3", r"InceptionV3"),
    ("MobileNetV3", r"MobileNetV3\w+"),
    ("MobileNetV2", r"MobileNetV2"),
    ("MobileNet", r"MobileNet"),
    ("NASNet", r"NASNet\w+"),
    ("RegNetX", r"RegNetX\d+"),
    ("RegNetY", r"RegNetY\d+"),
    ("ResNetRS", r"ResNetRS\d+"),
    ("ResNetV2", r"ResNet\d+V2"),
    ("ResNet", r"ResNet\d+"),
    ("VGG", r"VGG\d+"),
    ("Xception", r"Xception"),
]

#: The default (not slow) subset, package -> {constructor: rule id}: the smallest constructor of
#: each family with its own structural problem, spread over both packages, each with ONE rule
#: (all three rules appear). The first call of an explainer traces and optimises the whole
#: rewritten graph: measured 8-30 s per (model, rule) for these (RegNet's grouped convolutions are
#: split per group, InceptionResNetV2 has ~800 layer calls), so three rules on every family would
#: not fit the default run. ``-m slow`` runs every rule on every constructor, these included.
#: RegNetY002 stands for RegNetX/Y (RegNetX plus SE); VGG, ResNet, MobileNetV2, DenseNet and
#: EfficientNetB0 also run at larger sizes in test_real_models.py.
LEAN = {
    "keras": {"ConvNeXtTiny": "epsilon1e-6", "EfficientNetB0": "epsilon_plus_flat", "InceptionResNetV2": "epsilon1e-6"},
    "tf_keras": {"RegNetY002": "epsilon1e-6", "ResNetRS50": "alpha2beta1", "MobileNetV3Small": "alpha2beta1"},
}
#: Families the lean subset must cover, with what makes each one hard (test_lean_subset_covers_the_families).
LEAN_FAMILIES = {
    "ConvNeXt": "grouped Conv2D (groups = channels), LayerScale, GELU, LayerNormalization, nested Sequential",
    "RegNetY": "grouped Conv2D, residuals written as `x + y`, SE written as `tf.math.multiply`",
    "MobileNetV3": "tf-keras writes hard-swish by hand (x * relu6(x + 3) * 1/6), SE gates at 1x1 maps",
    "EfficientNet": "SE gates at 1x1 maps at 32x32 (gate and signal of the same shape)",
    "ResNetRS": "SE (GAP, Reshape, Multiply), average-pool shortcuts; alpha-beta on Add/GAP once gave NaN here",
    "InceptionResNetV2": "CustomScaleLayer (x + scale * r) after concatenations",
}


def constructors(pkg: str) -> list[str]:
    """Public callables of ``pkg.applications`` whose name starts with an uppercase letter."""
    apps = kit.package(pkg).applications
    return sorted(n for n in dir(apps) if n[:1].isupper() and callable(getattr(apps, n)))


def family(name: str) -> str | None:
    return next((fam for fam, pattern in FAMILIES if re.fullmatch(pattern, name)), None)


def min_size(name: str) -> int:
    return MIN_SIZE.get(name, DEFAULT_MIN_SIZE)


def _takes(ctor, argument: str) -> bool:
    """Whether ``ctor`` accepts ``argument`` (by name or through ``**kwargs``)."""
    params = inspect.signature(ctor).parameters.values()
    return any(p.name == argument or p.kind is p.VAR_KEYWORD for p in params)


def _build(pkg: str, name: str, size: int):
    ctor = getattr(kit.package(pkg).applications, name)
    kwargs = dict(weights=None, classes=10, input_shape=(size, size, 3))
    if _takes(ctor, "classifier_activation"):
        kwargs["classifier_activation"] = None  # logits out: the forward check compares logits
    return ctor(**kwargs)


#: Every (package, constructor) x every rule, and the lean default subset of those. ``app`` is
#: module-scoped, so pytest builds each model once, runs its rules one after the other, frees it.
SWEEP = [pytest.param((pkg, name), rule_id, id=f"{IDS[pkg]}-{name}-{rule_id}")
         for pkg in kit.PACKAGES for name in constructors(pkg) for rule_id in RULES]
DEFAULT = [pytest.param((pkg, name), rule_id, id=f"{IDS[pkg]}-{name}-{rule_id}")
           for pkg in kit.PACKAGES for name, rule_id in LEAN[pkg].items()]


@pytest.fixture(scope="module")
def app(request):
    """The model of one (package, constructor), shared by its rule tests; freed afterwards."""
    pkg, name = request.param
    K = kit.package(pkg)
    size = min_size(name)
    K.utils.set_random_seed(0)  # the same weights whatever ran before (this runs before conftest's _seed)
    model = _build(pkg, name, size)
    x = np.random.default_rng(0).uniform(0, 255, (2, size, size, 3)).astype(np.float32)
    logits = model(x, training=False).numpy()
    snapshot = types.SimpleNamespace(
        variables=[id(v) for v in model.weights],
        values=[np.array(v.numpy(), copy=True) for v in model.weights],
        layers=[id(layer) for layer in model.layers],
    )
    case = types.SimpleNamespace(pkg=pkg, name=name, model=model, x=x, logits=logits, snapshot=snapshot,
                                 z_mass=None)
    del model, snapshot
    yield case
    case.model = case.snapshot = None  # pytest keeps ``case`` until after this teardown
    K.backend.clear_session()
    gc.collect()


def _assert_not_mutated(app):
    model, snap = app.model, app.snapshot
    assert [id(layer) for layer in model.layers] == snap.layers, "layers of the user's model were replaced"
    assert [id(v) for v in model.weights] == snap.variables, "variables of the user's model were replaced"
    changed = [v.name for v, old in zip(model.weights, snap.values) if not np.array_equal(v.numpy(), old)]
    assert not changed, f"the explainer changed weights of the user's model: {changed[:5]}"


def _check_relevance(app, R, rule):
    """Check 1: finite relevance, not all zero for any sample.

    The one exception, decided by the model's logits and not by its name: where max |logit| is
    below the rules' stabiliser (``lrp_grad.rules.STABILIZER`` = 1e-6, also the epsilon here),
    every layer's outputs are smaller than the stabiliser and each layer passes only ~|z| / 1e-6
    of its relevance (the documented absorption of LRP-epsilon and of the alpha-beta stabiliser).
    Over ~50 layers the float32 relevance underflows to exactly 0 (measured: Keras 3 MobileNet,
    MobileNetV2 and MobileNetV3 at random initialisation, logits 1e-20 .. 1e-11; the per-layer
    report shows the sum falling by 1e4-1e5 per layer). There, instead, the relevance must not
    exceed the logit (absorption only shrinks it), and ``Z()``, the same propagation without a
    stabiliser, must give finite relevance that is non-zero for every sample, which shows that the
    relevance reaches the input through every layer of the model.
    """
    n = len(app.x)
    assert R.shape == app.x.shape and R.dtype == np.float32, (R.shape, R.dtype)
    assert np.all(np.isfinite(R)), f"non-finite relevance for {rule!r}"
    mass = np.abs(R).reshape(n, -1).sum(1)
    target_logit = np.abs(app.logits.max(1))  # the explained logit: the predicted class's
    if np.abs(app.logits).max() >= STABILIZER:
        assert np.all(mass > 0), f"all-zero relevance for a sample with {rule!r}: sum |R| = {mass}"
        return
    assert np.all(mass <= 2 * target_logit), (mass, target_logit)
    if app.z_mass is None:  # once per model: it does not depend on the rule under test
        R0 = lrp_grad.Explainer(app.model, rule=lrp_grad.Z())(app.x)
        app.z_mass = np.where(np.isfinite(R0).reshape(n, -1).all(1), np.abs(R0).reshape(n, -1).sum(1), np.nan)
    assert np.all(app.z_mass > 0), f"Z() on a model with logits below the stabiliser: sum |R| = {app.z_mass}"


@pytest.mark.parametrize("app, rule_id", DEFAULT, indirect=["app"], scope="module")
def test_application_lean_subset(app, rule_id, request):
    _explain_and_check(app, rule_id, request.node)


@pytest.mark.slow
@pytest.mark.parametrize("app, rule_id", SWEEP, indirect=["app"], scope="module")
def test_every_application(app, rule_id, request):
    _explain_and_check(app, rule_id, request.node)


def _explain_and_check(app, rule_id, item):
    """Checks 1-4 of the module docstring for one model and one rule; measurements go to the test
    item's ``user_properties`` (written by ``--junitxml``)."""
    rule = RULES[rule_id]
    ex = lrp_grad.Explainer(app.model, rule=rule)
    R, report = ex(app.x, return_layers=True)
    _check_relevance(app, R, rule)

    # 2. canonized forward pass = the model's (float32 rounding, relative to the logits' scale).
    #    The tolerance is the model's own float32 reproducibility when that is worse: a model
    #    whose logits change by more when the same image is run in a batch of one (measured:
    #    Keras 3 EfficientNetV2L at 32x32 with random weights, 55%) cannot be matched by any
    #    rewritten forward; that noise floor is measured here, not assumed by name.
    scale = np.abs(app.logits).max()
    if getattr(app, "noise", None) is None:
        alone = np.asarray(app.model(app.x[:1], training=False))
        app.noise = float(np.abs(alone - app.logits[:1]).max() / scale)
    tol = max(1e-4, 10 * app.noise)
    forward = ex.forward(app.x)
    np.testing.assert_allclose(forward, app.logits, rtol=tol, atol=tol * scale)

    # 3. one report entry per layer call of the canonized graph, plus the input; all finite
    assert isinstance(report, Mapping)
    assert len(report) == len(ex.rules_graph.nodes) + 1, (len(report), len(ex.rules_graph.nodes))
    bad = [label for label, sums in report.items() if np.shape(sums) != (len(app.x),) or not np.all(np.isfinite(sums))]
    assert not bad, f"report entries not finite (or not one per sample): {bad[:5]}"
    predicted = app.logits[np.arange(len(app.x)), app.logits.argmax(1)]
    np.testing.assert_allclose(report.output, predicted, rtol=tol, atol=tol * scale)

    # 4. the user's model is untouched
    _assert_not_mutated(app)

    ratio = R.reshape(len(app.x), -1).sum(1) / predicted
    item.user_properties += [("relevance_sum_over_logit", [float(r) for r in ratio]), ("max_logit", float(scale)),
                             ("forward_error_over_max_logit", float(np.abs(forward - app.logits).max() / scale))]


# ---------------------------------------------------------------------------------------------
# Cheap checks of the tables above (no model is built)


@pytest.mark.parametrize("pkg", kit.PACKAGES, ids=IDS.get)
def test_min_size_table_is_the_minimum(pkg):
    """One pixel below :data:`MIN_SIZE` every constructor refuses the input shape (before building
    any layer, so this is cheap); the sweep itself shows that the size is accepted."""
    for name in constructors(pkg):
        size = min_size(name) - 1
        with pytest.raises(ValueError, match=rf"Input size must be at least {size + 1}x{size + 1}"):
            _build(pkg, name, size)


@pytest.mark.parametrize("pkg", kit.PACKAGES, ids=IDS.get)
def test_every_constructor_has_a_family_and_takes_the_arguments(pkg):
    names = constructors(pkg)
    assert len(names) >= 40, names  # discovery works (Keras 3.15: 40, tf-keras 2.21: 71)
    assert [n for n in names if family(n) is None] == []
    for name in names:
        ctor = getattr(kit.package(pkg).applications, name)
        assert all(_takes(ctor, a) for a in ("weights", "classes", "input_shape", "classifier_activation")), name


def test_lean_subset_covers_the_families():
    for pkg, names in LEAN.items():
        assert set(names) <= set(constructors(pkg)), (pkg, set(names) - set(constructors(pkg)))
    covered = {family(n) for names in LEAN.values() for n in names}
    assert {rule for names in LEAN.values() for rule in names.values()} == set(RULES)
    assert set(LEAN_FAMILIES) <= covered, set(LEAN_FAMILIES) - covered
    assert {"keras", "tf_keras"} == {pkg for pkg, names in LEAN.items() if names}
