"""Large Dense kernels: modified copies (W+, W-, ones, W^2) are made and used in row blocks."""
import numpy as np
import pytest
from kit import assert_close, mlp, npref_explain
from test_reference_grid import RULES

import lrp_grad
from lrp_grad import ops, propagate


@pytest.fixture
def tiny_blocks(monkeypatch):
    """Every kernel of the test MLP is 'large': blocks of one or two rows."""
    monkeypatch.setattr(propagate, "BLOCK_ELEMENTS", 8)


def test_blocks_cover_every_row(tiny_blocks):
    import tensorflow as tf

    w = tf.zeros([7, 6])
    assert ops.DENSE_OP._blocks(w) == [(a, a + 1) for a in range(7)]
    assert ops.DENSE_OP._blocks(tf.zeros([7, 3])) == [(0, 2), (2, 4), (4, 6), (6, 7)]
    assert ops.DENSE_OP._blocks(tf.zeros([2, 4])) is None  # small: whole
    assert propagate.LinearOp(ops.DENSE_OP.forward, ops.DENSE_OP.transpose)._blocks(w) is None  # not a Dense op


@pytest.mark.parametrize("rule", RULES, ids=repr)
@pytest.mark.parametrize("signed", [True, False], ids=["signed-x", "nonneg-x"])
def test_blocked_dense_equals_reference(tiny_blocks, rule, signed):
    model = mlp(dtype="float64")
    rng = np.random.default_rng(7)
    x = rng.normal(size=(4, 7)) if signed else rng.uniform(0, 1, size=(4, 7))
    target = np.array([0, 1, 2, 3])
    got = lrp_grad.explain(model, x, target=target, rule=rule)
    tol = 1e-8 if isinstance(rule, (lrp_grad.AlphaBeta, lrp_grad.Gamma, lrp_grad.ZBox)) else 1e-10
    assert_close(got, npref_explain(model, x, target, rule), tol, f"blocked {rule}")


def test_blocked_graph_slices_the_kernel(tiny_blocks):
    """The blocks really run: the z+ forward and both transposes are split into per-row matmuls."""
    model = mlp()
    fn, _ = lrp_grad.Explainer(model, rule=lrp_grad.AlphaBeta(2, 1)).passes.function(True, "logit", False)
    types = [op.type for op in fn.get_concrete_function().graph.get_operations()]
    # Kernels 7x6, 6x5, 5x4 -> blocks of 1, 1, 2 rows: 7, 6, 3 blocks. Per layer: the forward
    # (whole W), and per block one z+ matmul and two transposed ones (W+ and W-).
    assert types.count("MatMul") == 3 + 3 * (7 + 6 + 3)
