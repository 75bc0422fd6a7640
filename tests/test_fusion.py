"""ReLU fusion: where the planner lets a linear layer apply the ReLU after it inside its LRP op,
and that the relevance is still the rule's (float64 reference, and the unfused pass).

Every model is built in both Keras packages (``K``: Keras 3 and tf-keras).
"""
import numpy as np
import pytest
from kit import assert_close, cnn, npref_explain, randomize

import lrp_grad
from lrp_grad import AlphaBeta, Composite, Epsilon, Flat, Gamma, Z, ZPlus, handlers, rewrite


def fusion(model, rule, nonneg=False):
    """``{label: fuse_relu}`` of the linear steps and the labels of ReLU steps fused away."""
    plan = rewrite.build_plan(model, rule, input_nonneg=nonneg)
    flags = {s.node.label: s.context.fuse_relu for s in plan.steps if s.handler.kind == "linear"}
    gone = [s.node.label for s in plan.steps if s.handler is handlers.FUSED_RELU]
    return flags, gone


def bn_relu_net(K, dtype="float32", seed=0):
    """Conv -> BN -> ReLU layer -> Conv -> Activation('relu') -> pool -> Dense (a ResNet-like stem)."""
    L = K.layers
    inp = K.Input((8, 8, 3), dtype=dtype)
    h = L.Conv2D(4, 3, padding="same", name="c1", dtype=dtype)(inp)
    h = L.BatchNormalization(name="bn1", dtype=dtype)(h)
    h = L.ReLU(name="r1", dtype=dtype)(h)
    h = L.Conv2D(5, 3, name="c2", dtype=dtype)(h)
    h = L.Activation("relu", name="r2", dtype=dtype)(h)
    h = L.GlobalAveragePooling2D(name="gap", dtype=dtype)(h)
    out = L.Dense(3, name="fc", dtype=dtype)(h)
    return randomize(K.Model(inp, out), seed)


def unfused(monkeypatch):
    monkeypatch.setattr(rewrite, "_fuse_relus", lambda graph, steps: tuple(steps))


def test_fused_where_the_relevance_above_scales_with_the_input(K):
    flags, gone = fusion(cnn(K=K), Epsilon())
    assert list(flags.values()) == [True, True, True, False]  # the logits layer has no ReLU
    assert gone == []


def test_relu_layers_fused_through_a_folded_batchnorm(K):
    flags, gone = fusion(bn_relu_net(K), Epsilon())
    assert flags == {"c1": True, "c2": True, "gap": False, "fc": False}
    assert gone == ["r1", "r2"]


def test_not_fused_below_a_flat_layer(K):
    """Flat hands relevance to inputs that are zero, so the ReLU below it must stay exact."""
    model = cnn(K=K)
    assert type(model.layers[4]).__name__ == "Dense" and model.layers[4].units == 6  # the hidden Dense
    flags, _ = fusion(model, Composite([("weighted", Epsilon())], overrides={model.layers[4].name: Flat()}))
    assert list(flags.values()) == [True, False, True, False]


def test_not_fused_when_the_relu_output_is_the_model_output(K):
    L = K.layers
    model = K.Sequential([K.Input((5,)), L.Dense(4, activation="relu"), L.Dense(3, activation="relu")])
    flags, _ = fusion(model, Epsilon())
    assert list(flags.values()) == [True, False]


def test_not_fused_when_the_linear_output_is_used_twice(K):
    L = K.layers
    inp = K.Input((6,))
    z = L.Dense(4, name="d1")(inp)
    a = L.ReLU(name="r")(z)
    out = L.Dense(2, name="d2")(L.Concatenate()([a, z]))
    flags, gone = fusion(K.Model(inp, out), Epsilon())
    assert flags["d1"] is False and gone == []


def test_not_fused_through_a_layer_that_may_move_zeros(K):
    """A user passthrough layer (f(0) unknown) above the ReLU blocks the fusion."""
    L = K.layers

    class Shift(K.layers.Layer):
        def call(self, x):
            return x + 1.0

    lrp_grad.register_handler(Shift, "passthrough")
    try:
        inp = K.Input((6,))
        h = L.Dense(4, activation="relu", name="d1")(inp)
        out = L.Dense(2, name="d2")(Shift()(h))
        flags, _ = fusion(K.Model(inp, out), Epsilon())
        assert flags["d1"] is False
    finally:
        lrp_grad.unregister_handler(Shift)


@pytest.mark.parametrize("rule", [Epsilon(1e-3), Z(), AlphaBeta(2, 1), AlphaBeta(1.5, 0.5, bias=False), ZPlus()],
                         ids=["epsilon", "z", "ab", "ab-nobias", "zplus"])
def test_fused_equals_reference(K, rule):
    model = bn_relu_net(K, "float64")
    x = np.random.default_rng(1).normal(size=(4, 8, 8, 3))
    target = np.array([0, 1, 2, 0])
    # The reference keeps BatchNorm as a layer: so does the explainer without canonizers, and the
    # BatchNorm (a linear layer too) then applies the ReLU.
    plan = rewrite.build_plan(model, rule, canonizers=[])
    assert [s.node.label for s in plan.steps if s.context.fuse_relu] == ["bn1", "c2"]
    got = lrp_grad.explain(model, x, target=target, rule=rule, canonizers=[])
    # Sign-split rules on signed inputs amplify rounding (the unfused pass errs as much: 2.7e-10).
    tol = 1e-8 if isinstance(rule, AlphaBeta) else 1e-10
    assert_close(got, npref_explain(model, x, target, rule), tol, f"fused {rule}")


def test_reference_with_a_flat_layer_above_a_relu(K):
    """Relevance reaching ReLU outputs that are zero: the unfused path gives the reference."""
    model = cnn(dtype="float64", K=K)
    x = np.random.default_rng(2).normal(size=(3, 10, 10, 3))
    target = np.array([0, 3, 4])
    comp = Composite([("weighted", Epsilon(1e-3))], overrides={model.layers[4].name: Flat()})
    expected = npref_explain(model, x, target, Epsilon(1e-3), layer_rules={4: Flat()})
    assert_close(lrp_grad.explain(model, x, target=target, rule=comp), expected, 1e-10, "flat above relu")


def test_reference_with_a_relu_output_and_unit_initial_relevance(K):
    """A ReLU at the output with initial='one' puts relevance on a zero output."""
    L = K.layers
    model = randomize(K.Sequential([K.Input((5,), dtype="float64"),
                                    L.Dense(6, activation="relu", dtype="float64"),
                                    L.Dense(4, activation="relu", dtype="float64")]), seed=3)
    x = np.random.default_rng(3).normal(size=(8, 5))
    logits = np.asarray(model(x))
    target = np.argmin(logits, -1)  # mostly zero outputs
    assert np.any(logits[np.arange(8), target] == 0)
    expected = npref_explain(model, x, target, Epsilon(1e-3), initial="one")
    got = lrp_grad.explain(model, x, target=target, rule=Epsilon(1e-3), initial="one")
    assert_close(got, expected, 1e-10, "relu output")


@pytest.mark.parametrize("rule", [Epsilon(1e-6), Epsilon(0.1, bias=False), Z(), ZPlus(), AlphaBeta(2, 1), Gamma(0.25)],
                         ids=["eps", "eps-nobias", "z", "zplus", "ab", "gamma"])
def test_fused_equals_unfused_with_layer_sums(K, rule, monkeypatch):
    model = bn_relu_net(K)
    x = np.random.default_rng(4).uniform(0, 1, size=(5, 8, 8, 3)).astype(np.float32)
    R, report = lrp_grad.Explainer(model, rule=rule)(x, target=1, return_layers=True)
    unfused(monkeypatch)
    R0, report0 = lrp_grad.Explainer(model, rule=rule)(x, target=1, return_layers=True)
    assert fusion(model, rule)[1] == []  # the patch took effect
    assert_close(R, R0, 1e-5, f"{rule}")
    assert list(report) == list(report0)
    for k in report:
        np.testing.assert_allclose(report[k], report0[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_fused_pass_op_counts(K):
    """Fused layers divide by relu(z) + eps: only the logits layer needs the sign-dependent stabiliser."""
    model = cnn(padding="valid", K=K)
    fn, _ = lrp_grad.Explainer(model, rule=Epsilon()).passes.function(True, "logit", False)
    types = [op.type for op in fn.get_concrete_function().graph.get_operations()]
    assert types.count("GreaterEqual") == 1  # stabilize() of the logits layer
    assert types.count("RealDiv") == 4  # one division per weighted layer
    assert types.count("Relu") == 3  # inside the three fused layers, no separate passthrough


def _residual(K, dtype="float32"):
    L = K.layers
    inp = K.Input((6, 6, 2), dtype=dtype)
    h = L.Conv2D(3, 3, padding="same", activation="relu", dtype=dtype)(inp)
    branch = L.Conv2D(3, 3, padding="same", dtype=dtype)(h)
    h = L.Add(name="add", dtype=dtype)([h, branch])
    h = L.ReLU(name="after_add", dtype=dtype)(h)
    out = L.Dense(2, dtype=dtype)(L.Flatten(dtype=dtype)(h))
    return randomize(K.Model(inp, out), seed=5)


@pytest.mark.parametrize("rule, stacked", [(Epsilon(), False), (AlphaBeta(2, 1), False), (Flat(), False),
                                           (Gamma(0.25), True)], ids=["eps", "ab", "flat", "gamma"])
def test_add_runs_per_input_without_stacking(K, rule, stacked):
    """Add takes its own per-input backward (no tf.stack copy) for the rules it knows."""
    model = _residual(K)
    everywhere = Composite([("linear", rule)])  # the rule on Add too (a single rule gives it epsilon)
    flags, gone = fusion(model, everywhere)
    fused = rule.scales_with_input  # the Dense above is flat too: relevance reaches zeros
    assert flags["add"] is fused and gone == (["after_add"] if fused else [])
    fn, _ = lrp_grad.Explainer(model, rule=everywhere).passes.function(False, "logit", False)
    ops = fn.get_concrete_function().graph.get_operations()
    stacks = [op for op in ops if op.type == "Pack" and op.inputs[0].shape.rank == 4]  # not shape packs
    assert bool(stacks) == stacked


@pytest.mark.parametrize("rule", [Epsilon(1e-3), Z(), AlphaBeta(2, 1), ZPlus(), Flat()],
                         ids=["eps", "z", "ab", "zplus", "flat"])
def test_add_equals_reference(K, rule):
    model = _residual(K, "float64")
    x = np.random.default_rng(6).normal(size=(3, 6, 6, 2))
    target = np.array([0, 1, 1])
    tol = 1e-8 if isinstance(rule, AlphaBeta) else 1e-10
    assert_close(lrp_grad.explain(model, x, target=target, rule=rule), npref_explain(model, x, target, rule),
                 tol, f"add {rule}")
