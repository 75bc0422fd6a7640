"""Self-tests of the numpy LRP reference ``npref`` (pure numpy, fast)."""
import numpy as np
import pytest

try:                    # tests/ on sys.path (pytest rootdir-less "prepend" import)
    import npref
except ImportError:     # tests/ is a package
    from tests import npref

RNG_SEED = 1234


def conv(W, b=None, strides=(1, 1), padding="valid", dilation=(1, 1), act="linear"):
    return {"type": "conv2d", "W": W, "b": b, "strides": strides,
            "padding": padding, "dilation": dilation, "act": act}


def dense(W, b=None, act="linear"):
    return {"type": "dense", "W": W, "b": b, "act": act}


def make_net(rng, bias=True, c_in=2):
    """ReLU net with same/valid conv, dilation, overlapping 'same' maxpool."""
    def bb(k):
        return rng.normal(size=k) * 0.1 if bias else None
    return [
        conv(rng.normal(size=(3, 3, c_in, 4)) * 0.5, bb(4), padding="same", act="relu"),
        # 8x8 -> 4x4 with asymmetric 'same' pad (total 1: 0 before, 1 after)
        {"type": "maxpool", "pool": (3, 3), "strides": (2, 2), "padding": "same"},
        conv(rng.normal(size=(2, 2, 4, 5)) * 0.5, bb(5), dilation=(2, 2)),   # -> 2x2x5
        {"type": "relu"},
        {"type": "flatten"},
        dense(rng.normal(size=(20, 6)) * 0.5, bb(6), act="relu"),
        dense(rng.normal(size=(6, 3)), bb(3)),
    ]


# ----------------------------------------------------------------- forward --

def loop_conv(x, W, b, strides, padding, dilation):
    """Direct loop convolution (cross-correlation) with TF padding."""
    n, H, Wd, _ = x.shape
    kh, kw, _, co = W.shape
    pads, outs = [], []
    for size, k, s, d in ((H, kh, strides[0], dilation[0]), (Wd, kw, strides[1], dilation[1])):
        ke = (k - 1) * d + 1
        if padding == "same":
            o = int(np.ceil(size / s))
            tot = max((o - 1) * s + ke - size, 0)
            pads.append((tot // 2, tot - tot // 2))
        else:
            o = int(np.ceil((size - ke + 1) / s))
            pads.append((0, 0))
        outs.append(o)
    xp = np.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
    out = np.zeros((n, outs[0], outs[1], co))
    for i in range(outs[0]):
        for j in range(outs[1]):
            for a in range(kh):
                for c in range(kw):
                    r, q = i * strides[0] + a * dilation[0], j * strides[1] + c * dilation[1]
                    out[:, i, j, :] += xp[:, r, q, :] @ W[a, c]
    return out + (0 if b is None else b)


@pytest.mark.parametrize("padding", ["valid", "same"])
@pytest.mark.parametrize("strides,dilation", [((1, 1), (1, 1)), ((2, 2), (1, 1)),
                                              ((2, 1), (1, 1)), ((3, 2), (1, 1)),
                                              ((1, 1), (2, 2)), ((1, 1), (1, 3))])
@pytest.mark.parametrize("hw,k", [((7, 8), (3, 3)), ((6, 5), (2, 3)), ((12, 12), (4, 4))])
def test_conv_forward_matches_loop(padding, strides, dilation, hw, k):
    if padding == "valid" and any((kk - 1) * d + 1 > sz for kk, d, sz in zip(k, dilation, hw)):
        pytest.skip("dilated kernel larger than the input")
    rng = np.random.default_rng(RNG_SEED)
    x = rng.normal(size=(2,) + hw + (3,))
    W = rng.normal(size=k + (3, 4))
    b = rng.normal(size=4)
    out = npref.forward([conv(W, b, strides, padding, dilation)], x)[-1]
    ref = loop_conv(x, W, b, strides, padding, dilation)
    assert out.shape == ref.shape
    np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-12)


def test_conv_same_padding_is_asymmetric_by_hand():
    # 4x4 input 1..16, 3x3 ones, stride 2, same: out 2x2, pad 0 before / 1 after.
    x = np.arange(1, 17, dtype=float).reshape(1, 4, 4, 1)
    out = npref.forward([conv(np.ones((3, 3, 1, 1)), strides=(2, 2), padding="same")], x)[-1]
    np.testing.assert_array_equal(out[0, :, :, 0], [[54, 45], [72, 54]])
    x = np.arange(1, 10, dtype=float).reshape(1, 3, 3, 1)
    out = npref.forward([conv(np.ones((2, 2, 1, 1)))], x)[-1]
    np.testing.assert_array_equal(out[0, :, :, 0], [[12, 16], [24, 28]])


def test_maxpool_forward_and_ties():
    x = -1.0 - np.arange(9.0).reshape(1, 3, 3, 1)        # all negative
    out = npref.forward([{"type": "maxpool", "pool": (2, 2), "strides": (2, 2),
                          "padding": "same"}], x)[-1]
    # padding never wins: bottom-right window holds only x[2,2] = -9
    np.testing.assert_array_equal(out[0, :, :, 0], [[-1, -3], [-7, -9]])
    # tie: all relevance to the first max in row-major window order
    x = np.array([[1., 5.], [5., 5.]]).reshape(1, 2, 2, 1)
    pool = {"type": "maxpool", "pool": (2, 2), "strides": (2, 2), "padding": "valid"}
    R, _ = npref.lrp([pool], x, np.array([[[[2.0]]]]), {"name": "z"})
    np.testing.assert_array_equal(R[0, :, :, 0], [[0, 2], [0, 0]])
    np.testing.assert_array_equal(npref.gradient([pool], x, np.ones((1, 1, 1, 1)))[0, :, :, 0],
                                  [[0, 1], [0, 0]])


def test_maxpool_overlapping_windows_accumulate():
    x = np.zeros((1, 3, 3, 2))
    x[0, 1, 1, :] = 1.0                                  # centre is max of all 4 windows
    pool = {"type": "maxpool", "pool": (2, 2), "strides": (1, 1), "padding": "valid"}
    R_out = np.arange(1.0, 9.0).reshape(1, 2, 2, 2)
    R, per = npref.lrp([pool], x, R_out, {"name": "z"})
    np.testing.assert_array_equal(R[0, 1, 1], [1 + 3 + 5 + 7, 2 + 4 + 6 + 8])
    assert R.sum() == R_out.sum() and len(per) == 2


# ------------------------------------------------- hand-computed dense rules --
# x = [1, 2], W = [[3], [-1]], b = 1  ->  z_ij = [3, -2], z_j = 2, R_j = 4.
E = 1e-6
HAND = [
    ({"name": "z"}, 1.0, [6.0, -4.0]),
    ({"name": "z"}, -1.0, [0.0, 0.0]),                          # z_j == 0 -> 0
    ({"name": "epsilon", "epsilon": 0.5}, 1.0, [4.8, -3.2]),      # 2 + 0.5
    ({"name": "epsilon", "epsilon": 0.5, "bias": False}, 1.0, [8.0, -16 / 3]),  # 1 + 0.5
    ({"name": "alphabeta", "alpha": 2, "beta": 1}, 1.0,
     [4 * 2 * 3 / (4 + E), -4 * -2 / (-2 - E)]),                  # zp = 3+1, zn = -2
    ({"name": "alphabeta", "alpha": 2, "beta": 1, "bias": False}, 1.0,
     [4 * 2 * 3 / (3 + E), -4 * -2 / (-2 - E)]),
    ({"name": "zplus"}, 1.0, [4 * 3 / (4 + E), 0.0]),
    ({"name": "flat"}, 1.0, [4 / (2 + E), 4 / (2 + E)]),
    ({"name": "wsquare"}, 1.0, [4 * 9 / (10 + E), 4 * 1 / (10 + E)]),
    # q = [3 - 0, -2 - 3*(-1)] = [3, 1]; denominator 3 + 1 + b = 5
    ({"name": "zbox", "low": 0.0, "high": 3.0}, 1.0, [4 * 3 / (5 + E), 4 * 1 / (5 + E)]),
    # per-input bounds: q = [3 - (-1)*3, -2 - 3*(-1)] = [6, 1]; den 8
    ({"name": "zbox", "low": np.array([-1.0, 0.0]), "high": 3.0}, 1.0,
     [4 * 6 / (8 + E), 4 * 1 / (8 + E)]),
    # z_j = 2 > 0: num = [3 + 1.5, -2], den = 2 + 0.5*(3 + 1) = 4
    ({"name": "gamma", "gamma": 0.5}, 1.0, [4 * 4.5 / (4 + E), 4 * -2 / (4 + E)]),
    # b = -4: z_j = -3 < 0: num = [3, -2 - 1], den = -3 + 0.5*(-2 - 4) = -6
    ({"name": "gamma", "gamma": 0.5}, -4.0, [4 * 3 / (-6 - E), 4 * -3 / (-6 - E)]),
    ({"name": "gamma", "gamma": 0.5}, -1.0, [0.0, 0.0]),          # z_j == 0 -> 0
]


@pytest.mark.parametrize("rule,b,expected", HAND)
def test_dense_hand_examples(rule, b, expected):
    layers = [dense(np.array([[3.0], [-1.0]]), np.array([b]))]
    R, per = npref.lrp(layers, np.array([[1.0, 2.0]]), np.array([[4.0]]), rule)
    np.testing.assert_allclose(R[0], expected, rtol=1e-12, atol=1e-15)
    assert per[0] is R and per[-1][0, 0] == 4.0


def test_alphabeta_uses_sign_of_product_not_weight():
    # x = [-1, 2], W = [3, 1]: z_ij = [-3, 2]; with alpha=1, beta=0 only input 2 counts.
    layers = [dense(np.array([[3.0], [1.0]]))]
    R, _ = npref.lrp(layers, np.array([[-1.0, 2.0]]), np.array([[1.0]]),
                     {"name": "alphabeta", "alpha": 1, "beta": 0})
    np.testing.assert_allclose(R[0], [0.0, 2 / (2 + E)], rtol=1e-12)


def test_flat_conv_counts_only_real_inputs():
    x = np.random.default_rng(0).normal(size=(1, 3, 3, 2))
    layer = conv(np.ones((3, 3, 2, 1)), padding="same")
    R_out = np.zeros((1, 3, 3, 1))
    R_out[0, 0, 0, 0] = 1.0                 # corner: 2x2 real positions * 2 channels
    R, _ = npref.lrp([layer], x, R_out, {"name": "flat"})
    expected = np.zeros((3, 3, 2))
    expected[:2, :2, :] = 1 / (8 + E)
    np.testing.assert_allclose(R[0], expected, rtol=1e-12)


# -------------------------------------- conv LRP == unrolled dense LRP --------

def unrolled(layer, in_shape):
    """Dense matrix of a bias-free conv built by probing with basis vectors."""
    D = int(np.prod(in_shape))
    lin = dict(layer, b=None, act="linear")
    basis = np.eye(D).reshape((D,) + in_shape)
    return npref.forward([lin], basis)[-1].reshape(D, -1)


@pytest.mark.parametrize("rule", [
    {"name": "z"}, {"name": "epsilon", "epsilon": 0.3},
    {"name": "epsilon", "epsilon": 0.3, "bias": False},
    {"name": "alphabeta", "alpha": 2.0, "beta": 1.0}, {"name": "zplus"},
    {"name": "alphabeta", "alpha": 1.5, "beta": 0.5, "bias": False},
    {"name": "wsquare"}, {"name": "gamma", "gamma": 0.25},
    {"name": "zbox", "low": np.array([-1.0, -0.5, 0.0]), "high": np.array([1.0, 2.0, 0.5])},
])
@pytest.mark.parametrize("strides,padding,dilation", [
    ((1, 1), "same", (1, 1)), ((2, 2), "same", (1, 1)), ((2, 1), "valid", (1, 1)),
    ((1, 1), "same", (2, 2))])
def test_conv_lrp_equals_unrolled_dense(rule, strides, padding, dilation):
    rng = np.random.default_rng(RNG_SEED)
    in_shape = (6, 5, 3)
    x = rng.normal(size=(2,) + in_shape)
    layer = conv(rng.normal(size=(3, 3, 3, 4)), rng.normal(size=4), strides, padding, dilation)
    out = npref.forward([layer], x)[-1]
    R_out = rng.normal(size=out.shape)
    R, _ = npref.lrp([layer], x, R_out, rule)
    drule = dict(rule)
    if rule["name"] == "zbox":             # per-channel bounds -> per flat input
        for k in ("low", "high"):
            drule[k] = np.broadcast_to(rule[k], in_shape).reshape(-1)
    dlayer = dense(unrolled(layer, in_shape), np.tile(layer["b"], out[0].size // 4))
    Rd, _ = npref.lrp([dlayer], x.reshape(2, -1), R_out.reshape(2, -1), drule)
    np.testing.assert_allclose(R, Rd.reshape(R.shape), rtol=1e-9, atol=1e-12)


# ---------------------------------------------------- network-level checks --

def test_gradient_matches_finite_differences():
    rng = np.random.default_rng(RNG_SEED)
    layers = make_net(rng)
    x = rng.normal(size=(1, 8, 8, 2))
    G = rng.normal(size=(1, 3))
    g = npref.gradient(layers, x, G)
    h = 1e-6
    fd = np.zeros(x.size)
    for i in range(x.size):
        e = np.zeros(x.size)
        e[i] = h
        e = e.reshape(x.shape)
        diff = npref.forward(layers, x + e)[-1] - npref.forward(layers, x - e)[-1]
        fd[i] = np.sum(G * diff) / (2 * h)
    np.testing.assert_allclose(g.reshape(-1), fd, rtol=1e-5, atol=1e-7)


def test_lrp0_equals_gradient_times_input_at_every_layer():
    rng = np.random.default_rng(RNG_SEED + 1)
    layers = make_net(rng, bias=True)
    x = rng.normal(size=(3, 8, 8, 2))
    acts = npref.forward(layers, x)
    G = rng.normal(size=acts[-1].shape)
    R, per = npref.lrp(layers, x, acts[-1] * G, {"name": "z"})
    assert len(per) == len(layers) + 1 and all(p.shape == a.shape for p, a in zip(per, acts))
    np.testing.assert_allclose(R, x * npref.gradient(layers, x, G), rtol=1e-9, atol=1e-12)
    for k in range(1, len(layers)):      # gradient of the sub-network layers[k:]
        gk = npref.gradient(layers[k:], acts[k], G)
        np.testing.assert_allclose(per[k], acts[k] * gk, rtol=1e-9, atol=1e-12)
    assert np.abs(R).sum() > 0


@pytest.mark.parametrize("rule,tol", [
    ({"name": "z"}, 1e-10), ({"name": "epsilon", "epsilon": 1e-9}, 1e-6),
    ({"name": "zplus"}, 1e-4), ({"name": "alphabeta", "alpha": 1, "beta": 0}, 1e-4),
    ({"name": "flat"}, 1e-5), ({"name": "wsquare"}, 1e-5), ({"name": "gamma", "gamma": 0.5}, 1e-4),
])
def test_conservation_without_bias(rule, tol):
    rng = np.random.default_rng(RNG_SEED + 2)
    layers = make_net(rng, bias=False)
    x = rng.random(size=(3, 8, 8, 2))                   # non-negative input
    R_out = rng.random(size=(3, 3)) + 0.1
    _, per = npref.lrp(layers, x, R_out, rule)
    total = R_out.sum(axis=1)
    for p in per:
        np.testing.assert_allclose(p.reshape(3, -1).sum(axis=1), total, rtol=tol)


def test_alphabeta_sums_to_alpha_minus_beta():
    rng = np.random.default_rng(RNG_SEED + 3)
    layers = [dense(rng.normal(size=(7, 4)), act="relu")]
    x = rng.random(size=(4, 7)) + 0.1
    R_out = rng.normal(size=(4, 4))
    R, _ = npref.lrp(layers, x, R_out, {"name": "alphabeta", "alpha": 3, "beta": 2})
    np.testing.assert_allclose(R.sum(1), R_out.sum(1), rtol=1e-4)   # stab 1e-6 * alpha


def test_zbox_conv_with_channel_bounds_conserves_and_is_nonnegative():
    rng = np.random.default_rng(RNG_SEED + 4)
    layer = conv(rng.normal(size=(3, 3, 3, 4)), strides=(2, 2), padding="same")
    x = rng.random(size=(2, 7, 7, 3)) * np.array([1.0, 2.0, 3.0])
    rule = {"name": "zbox", "low": np.zeros(3), "high": np.array([1.0, 2.0, 3.0])}
    R_out = rng.random(size=(2, 4, 4, 4))
    R, _ = npref.lrp([layer], x, R_out, rule)
    assert (R >= 0).all()
    np.testing.assert_allclose(R.sum((1, 2, 3)), R_out.sum((1, 2, 3)), rtol=1e-5)


def test_zplus_nonnegative_for_nonnegative_input():
    rng = np.random.default_rng(RNG_SEED + 5)
    layers = make_net(rng, bias=True)
    x = rng.random(size=(4, 8, 8, 2))
    _, per = npref.lrp(layers, x, rng.random(size=(4, 3)), {"name": "zplus"})
    assert all((p >= 0).all() for p in per)
    assert per[0].sum() > 0


def test_first_rule_only_applies_to_first_weighted_layer():
    rng = np.random.default_rng(RNG_SEED + 6)
    layers = [{"type": "reshape", "shape": (5,)},
              dense(rng.normal(size=(5, 4)), rng.normal(size=4), act="relu"),
              dense(rng.normal(size=(4, 2)), rng.normal(size=2))]
    x = rng.normal(size=(3, 5, 1))
    R_out = rng.normal(size=(3, 2))
    R_z, per_z = npref.lrp(layers, x, R_out, {"name": "z"})
    R_f, per_f = npref.lrp(layers, x, R_out, {"name": "z"}, first_rule={"name": "flat"})
    np.testing.assert_array_equal(per_f[2], per_z[2])        # top layer still LRP-0
    expected = per_z[2].sum(1, keepdims=True) / (5 + E)      # flat: uniform split
    np.testing.assert_allclose(R_f[:, :, 0], np.repeat(expected, 5, 1), rtol=1e-12)
    assert R_f.shape == x.shape and not np.allclose(R_f, R_z)


def test_unknown_names_raise_valueerror():
    x = np.ones((1, 2))
    with pytest.raises(ValueError, match="layer type"):
        npref.forward([{"type": "batchnorm"}], x)
    layers = [dense(np.ones((2, 1)))]
    with pytest.raises(ValueError, match="rule"):
        npref.lrp(layers, x, np.ones((1, 1)), {"name": "bogus"})
    with pytest.raises(ValueError, match="rule"):
        npref.lrp(layers, x, np.ones((1, 1)), {"name": "z"}, first_rule={"name": "nope"})
    with pytest.raises(ValueError, match="epsilon"):
        npref.lrp(layers, x, np.ones((1, 1)), {"name": "epsilon"})


# =================================================== DAG models, new layers ==

def bn(rng, C, bias=True):
    """Batch-norm dict with random statistics; ``bias=False`` makes ``c = 0``."""
    gamma, mean = rng.normal(size=C), rng.normal(size=C)
    var, eps = rng.random(C) + 0.5, 1e-3
    beta = rng.normal(size=C) if bias else mean * gamma / np.sqrt(var + eps)
    return {"type": "batchnorm", "gamma": gamma, "beta": beta, "mean": mean, "var": var,
            "eps": eps}


def fd_gradient(layers, x, G, h=1e-6):
    """Central finite differences of ``sum(G * a_L)`` w.r.t. ``x``."""
    fd = np.zeros(x.size)
    for i in range(x.size):
        e = np.zeros(x.size)
        e[i] = h
        e = e.reshape(x.shape)
        diff = npref.forward(layers, x + e)[-1] - npref.forward(layers, x - e)[-1]
        fd[i] = np.sum(G * diff) / (2 * h)
    return fd.reshape(x.shape)


def tf_pads(size, k, s, d, padding):
    """(output length, pad before, pad after) of one axis, written out independently."""
    ke = (k - 1) * d + 1
    if padding == "valid":
        return (size - ke) // s + 1, 0, 0
    if padding == "causal":
        return int(np.ceil(size / s)), ke - 1, 0
    o = int(np.ceil(size / s))
    tot = max((o - 1) * s + ke - size, 0)
    return o, tot // 2, tot - tot // 2


# ------------------------------------------------------------- new forwards --

def loop_conv1d(x, W, b, s, padding, d):
    n, L, _ = x.shape
    k, _, co = W.shape
    o, before, after = tf_pads(L, k, s, d, padding)
    xp = np.pad(x, ((0, 0), (before, after), (0, 0)))
    out = np.zeros((n, o, co))
    for i in range(o):
        for a in range(k):
            out[:, i, :] += xp[:, i * s + a * d, :] @ W[a]
    return out + (0 if b is None else b)


@pytest.mark.parametrize("padding", ["valid", "same", "causal"])
@pytest.mark.parametrize("s,d", [(1, 1), (2, 1), (1, 2), (2, 3), (3, 1)])
@pytest.mark.parametrize("L,k", [(9, 3), (10, 2)])
def test_conv1d_forward_matches_loop(padding, s, d, L, k):
    rng = np.random.default_rng(RNG_SEED)
    x = rng.normal(size=(2, L, 3))
    W, b = rng.normal(size=(k, 3, 4)), rng.normal(size=4)
    layer = {"type": "conv1d", "W": W, "b": b, "strides": s, "padding": padding,
             "dilation": d, "act": "linear"}
    out = npref.forward([layer], x)[-1]
    ref = loop_conv1d(x, W, b, s, padding, d)
    assert out.shape == ref.shape
    np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-12)
    if padding == "causal":                 # output i never reads inputs after i*s
        x2 = x.copy()
        x2[:, 2 * s] += 1.0                 # read by output 2 (last tap), not by 0, 1
        changed = np.any(npref.forward([layer], x2)[-1] != out, axis=(0, 2))
        np.testing.assert_array_equal(changed[:3], [False, False, True])


def test_conv1d_causal_by_hand():
    # out[t] = 10 x[t-1] + 1 x[t] (x[-1] is padding)
    layer = {"type": "conv1d", "W": np.array([10.0, 1.0]).reshape(2, 1, 1), "b": None,
             "padding": "causal"}
    out = npref.forward([layer], np.array([1.0, 2.0, 3.0]).reshape(1, 3, 1))[-1]
    np.testing.assert_array_equal(out[0, :, 0], [1, 12, 23])
    layer["dilation"] = 2                   # out[t] = 10 x[t-2] + x[t]
    out = npref.forward([layer], np.array([1.0, 2.0, 3.0]).reshape(1, 3, 1))[-1]
    np.testing.assert_array_equal(out[0, :, 0], [1, 2, 13])


@pytest.mark.parametrize("padding", ["valid", "same"])
@pytest.mark.parametrize("strides,dilation", [((1, 1), (1, 1)), ((2, 2), (1, 1)),
                                              ((2, 1), (1, 1)), ((1, 1), (2, 2))])
def test_depthwise_forward_matches_loop(padding, strides, dilation):
    rng = np.random.default_rng(RNG_SEED)
    x = rng.normal(size=(2, 7, 6, 3))
    W, b = rng.normal(size=(3, 2, 3, 2)), rng.normal(size=6)      # M = 2
    layer = {"type": "depthwise", "W": W, "b": b, "strides": strides, "padding": padding,
             "dilation": dilation}
    out = npref.forward([layer], x)[-1]
    ref = np.concatenate([loop_conv(x[..., c:c + 1], W[:, :, c:c + 1, m:m + 1], None,
                                    strides, padding, dilation)
                          for c in range(3) for m in range(2)], axis=-1) + b
    assert out.shape == ref.shape
    np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-12)


def tconv(W, b=None, strides=(1, 1), padding="valid", act="linear"):
    return {"type": "conv2d_transpose", "W": W, "b": b, "strides": strides,
            "padding": padding, "act": act}


@pytest.mark.parametrize("padding", ["valid", "same"])
@pytest.mark.parametrize("strides", [(1, 1), (2, 2), (2, 1), (3, 3)])
@pytest.mark.parametrize("hw,k", [((3, 4), (3, 3)), ((4, 3), (4, 4)), ((3, 3), (2, 3)),
                                  ((2, 5), (1, 2))])
def test_conv2d_transpose_is_adjoint_of_conv2d(padding, strides, hw, k):
    # <conv2d(z, W), y> == <z, conv2d_transpose(y, W)>, conv2d = the direct loop_conv
    rng = np.random.default_rng(RNG_SEED)
    W = rng.normal(size=k + (2, 3))            # (kh, kw, c_out, c_in)
    y = rng.normal(size=(2,) + hw + (3,))
    out = npref.forward([tconv(W, None, strides, padding)], y)[-1]
    keras = [n * s + (max(kk - s, 0) if padding == "valid" else 0)
             for n, kk, s in zip(hw, k, strides)]
    assert out.shape == (2, keras[0], keras[1], 2)
    z = rng.normal(size=out.shape)
    cz = loop_conv(z, W, None, strides, padding, (1, 1))
    assert cz.shape == y.shape
    np.testing.assert_allclose(np.sum(cz * y), np.sum(z * out), rtol=1e-12)
    b = rng.normal(size=2)                      # the bias is added everywhere
    np.testing.assert_allclose(npref.forward([tconv(W, b, strides, padding)], y)[-1],
                               out + b, rtol=1e-12, atol=1e-12)


def test_conv2d_transpose_by_hand():
    # 1 x 2 input [1, 2], kernel row w = [1, 10, 100], stride 2: input p adds x_p w_k at 2p + k
    W = np.array([1.0, 10.0, 100.0]).reshape(1, 3, 1, 1)
    x = np.array([1.0, 2.0]).reshape(1, 1, 2, 1)
    out = npref.forward([tconv(W, strides=(1, 2))], x)[-1]
    np.testing.assert_array_equal(out[0, 0, :, 0], [1, 10, 102, 20, 200])
    out = npref.forward([tconv(W, strides=(1, 2), padding="same")], x)[-1]   # pad 0 / 1
    np.testing.assert_array_equal(out[0, 0, :, 0], [1, 10, 102, 20])
    W = np.array([1.0, 10.0, 100.0, 1000.0]).reshape(1, 4, 1, 1)             # pad 1 / 1
    out = npref.forward([tconv(W, strides=(1, 2), padding="same")], x)[-1]
    np.testing.assert_array_equal(out[0, 0, :, 0], [10, 102, 1020, 200])


def loop_avgpool(x, pool, strides, padding):
    n, H, W, C = x.shape
    (oh, pt, _), (ow, pl, _) = [tf_pads(sz, k, s, 1, padding)
                                for sz, k, s in zip((H, W), pool, strides)]
    out = np.zeros((n, oh, ow, C))
    for i in range(oh):
        for j in range(ow):
            r0, c0 = i * strides[0] - pt, j * strides[1] - pl
            win = x[:, max(r0, 0):r0 + pool[0], max(c0, 0):c0 + pool[1], :]
            out[:, i, j, :] = win.sum((1, 2)) / (win.shape[1] * win.shape[2])
    return out


@pytest.mark.parametrize("hw,pool,strides,padding", [
    ((5, 6), (3, 3), (2, 2), "same"), ((5, 5), (2, 2), (2, 2), "same"),
    ((6, 5), (3, 2), (1, 1), "valid"), ((4, 7), (2, 2), (1, 2), "same"),
    ((6, 6), (2, 2), (2, 2), "valid")])
def test_avgpool_forward_matches_loop(hw, pool, strides, padding):
    x = np.random.default_rng(RNG_SEED).normal(size=(2,) + hw + (3,))
    layer = {"type": "avgpool", "pool": pool, "strides": strides, "padding": padding}
    out = npref.forward([layer], x)[-1]
    ref = loop_avgpool(x, pool, strides, padding)
    assert out.shape == ref.shape
    np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(npref.forward([{"type": "global_avgpool"}], x)[-1],
                               x.mean(axis=(1, 2)), rtol=1e-12)


def test_avgpool_same_divides_by_valid_count_by_hand():
    x = np.arange(1.0, 10.0).reshape(1, 3, 3, 1)
    layer = {"type": "avgpool", "pool": (2, 2), "strides": (2, 2), "padding": "same"}
    out = npref.forward([layer], x)[-1]
    np.testing.assert_array_equal(out[0, :, :, 0], [[3, 4.5], [7.5, 9]])
    assert npref.forward([{"type": "avgpool", "pool": 2}], x)[-1].shape == (1, 1, 1, 1)


@pytest.mark.parametrize("shape", [(3, 5), (2, 4, 3, 5)])
def test_batchnorm_forward(shape):
    rng = np.random.default_rng(RNG_SEED)
    layer = bn(rng, 5)
    x = rng.normal(size=shape)
    ref = (x - layer["mean"]) / np.sqrt(layer["var"] + layer["eps"]) * layer["gamma"] \
        + layer["beta"]
    np.testing.assert_allclose(npref.forward([layer], x)[-1], ref, rtol=1e-12, atol=1e-12)
    plain = {"type": "batchnorm", "mean": layer["mean"], "var": layer["var"]}   # eps 1e-3
    np.testing.assert_allclose(npref.forward([plain], x)[-1],
                               (x - layer["mean"]) / np.sqrt(layer["var"] + 1e-3), rtol=1e-12)


def test_routing_layers_forward():
    rng = np.random.default_rng(RNG_SEED)
    x = rng.normal(size=(2, 3, 4, 2))

    def run(layer, extra=()):
        layers = [{"type": "identity"}] + list(extra) + [layer]   # a_1 = x
        return npref.forward(layers, x)[-1]
    sq = {"type": "act", "fn": "linear", "inputs": [0]}
    np.testing.assert_array_equal(run({"type": "add", "inputs": [0, 1, 0]}), 3 * x)
    np.testing.assert_array_equal(run({"type": "concat", "inputs": [1, 0]}),
                                  np.concatenate([x, x], -1))
    np.testing.assert_array_equal(run({"type": "zeropad2d", "pad": ((1, 0), (2, 1))}),
                                  np.pad(x, ((0, 0), (1, 0), (2, 1), (0, 0))))
    np.testing.assert_array_equal(run({"type": "zeropad2d", "pad": 1}),
                                  np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))))
    np.testing.assert_array_equal(run({"type": "crop2d", "crop": ((1, 0), (1, 2))}),
                                  x[:, 1:, 1:2, :])
    up = run({"type": "upsample2d", "size": (2, 3)})
    assert up.shape == (2, 6, 12, 2)
    np.testing.assert_array_equal(up[:, 3, 7], x[:, 1, 2])
    np.testing.assert_array_equal(run({"type": "global_maxpool"}), x.max(axis=(1, 2)))
    # multiply: a_1 = x, a_2 = x (2nd path), gate broadcast from a global pool
    gate = [sq, {"type": "global_avgpool", "inputs": [0]}, {"type": "reshape", "shape": (1, 1, 2)}]
    np.testing.assert_allclose(run({"type": "multiply", "inputs": [1, 4]}, gate),
                               x * x.mean((1, 2), keepdims=True), rtol=1e-12)


def test_global_maxpool_ties_go_to_first_maximum():
    x = np.array([[1.0, 5.0], [5.0, 2.0], [5.0, 0.0]]).reshape(1, 3, 2, 1)
    x = np.concatenate([x, -x], axis=-1)                  # channel 1: tie of -0 / 0
    R, _ = npref.lrp([{"type": "global_maxpool"}], x, np.array([[2.0, 3.0]]), {"name": "z"})
    np.testing.assert_array_equal(R[0, :, :, 0], [[0, 2], [0, 0], [0, 0]])
    np.testing.assert_array_equal(R[0, :, :, 1], [[0, 0], [0, 0], [0, 3]])
    g = npref.gradient([{"type": "global_maxpool"}], x, np.ones((1, 2)))
    np.testing.assert_array_equal(g, R / np.array([2.0, 3.0]))


def test_activation_values():
    z = np.array([[-2.0, -1.0, 0.0, 1.0, 7.0]])
    s = 1 / (1 + np.exp(-z))
    expect = {"relu": np.maximum(z, 0), "linear": z, "relu6": np.clip(z, 0, 6),
              "tanh": np.tanh(z), "sigmoid": s, "swish": z * s, "silu": z * s,
              "leaky_relu": np.where(z > 0, z, 0.3 * z), "softplus": np.log1p(np.exp(z)),
              "elu": np.where(z > 0, z, np.exp(z) - 1)}
    for fn, ref in expect.items():
        out = npref.forward([{"type": "act", "fn": fn}], z)[-1]
        np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-15, err_msg=fn)
        fused = npref.forward([dense(np.eye(5), act=fn)], z)[-1]
        np.testing.assert_allclose(fused, ref, rtol=1e-12, atol=1e-15, err_msg=fn)
    for fn, alpha, ref in (("leaky_relu", 0.1, np.where(z > 0, z, 0.1 * z)),
                           ("elu", 2.0, np.where(z > 0, z, 2 * (np.exp(z) - 1)))):
        out = npref.forward([{"type": "act", "fn": fn, "alpha": alpha}], z)[-1]
        np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-15)
    np.testing.assert_array_equal(npref.forward([{"type": "relu"}], z)[-1], np.maximum(z, 0))


@pytest.mark.parametrize("fn", ["relu6", "tanh", "sigmoid", "swish", "leaky_relu", "elu",
                                "softplus"])
def test_activation_gradients_and_lrp_pass_through(fn):
    rng = np.random.default_rng(RNG_SEED)
    z = rng.normal(size=(2, 7)) * 3
    z[0, 0] = 6.5                                   # relu6 saturated region
    layers = [dense(rng.normal(size=(7, 7)), act="linear"), {"type": "act", "fn": fn},
              dense(rng.normal(size=(7, 3)), act=fn)]
    G = rng.normal(size=(2, 3))
    np.testing.assert_allclose(npref.gradient(layers, z, G), fd_gradient(layers, z, G),
                               rtol=1e-5, atol=1e-7)
    R = rng.normal(size=(2, 7))
    _, per = npref.lrp([{"type": "act", "fn": fn}], z, R, {"name": "z"})
    np.testing.assert_array_equal(per[0], R)


# ------------------------------------- LRP-0 == gradient x input on ReLU DAGs --

def image_dag(rng, bias=True):
    """ReLU DAG over (n, 6, 6, 2) using every new image layer type."""
    def bb(k):
        return rng.normal(size=k) * 0.1 if bias else None
    return [
        conv(rng.normal(size=(3, 3, 2, 4)) * 0.5, bb(4), padding="same", act="relu"),  # a1
        {"type": "depthwise", "W": rng.normal(size=(3, 3, 4, 2)) * 0.5, "b": bb(8),
         "padding": "same", "act": "relu"},                                            # a2 6x6x8
        {"type": "avgpool", "pool": (3, 3), "strides": (2, 2), "padding": "same"},     # a3 3x3x8
        bn(rng, 8, bias),                                                              # a4
        tconv(rng.normal(size=(3, 3, 4, 8)) * 0.3, bb(4), (2, 2), "same", act="relu"),  # a5 6x6x4
        {"type": "add", "inputs": [5, 1], "act": "relu"},                              # a6
        {"type": "zeropad2d", "pad": ((1, 0), (0, 1))},                                # a7 7x7x4
        {"type": "crop2d", "crop": ((0, 1), (1, 0))},                                  # a8 6x6x4
        {"type": "maxpool", "pool": (2, 2), "strides": (2, 2)},                        # a9 3x3x4
        {"type": "upsample2d", "size": (2, 2), "inputs": [4]},                         # a10 6x6x8
        {"type": "maxpool", "pool": (2, 2), "strides": (2, 2)},                        # a11 3x3x8
        {"type": "concat", "inputs": [9, 11]},                                         # a12 3x3x12
        {"type": "global_avgpool"},                                                    # a13 (12,)
        {"type": "global_maxpool", "inputs": [6]},                                     # a14 (4,)
        {"type": "concat", "inputs": [13, 14]},                                        # a15 (16,)
        dense(rng.normal(size=(16, 5)), bb(5), act="relu"),                            # a16
        {"type": "identity"},                                                          # a17
        dense(rng.normal(size=(5, 3)), bb(3)),                                         # a18
    ]


def sequence_dag(rng, bias=True):
    """ReLU DAG over (n, 10, 3): conv1d (causal, dilated, strided), batchnorm, adds."""
    def bb(k):
        return rng.normal(size=k) * 0.1 if bias else None
    return [
        {"type": "conv1d", "W": rng.normal(size=(3, 3, 4)), "b": bb(4), "padding": "causal",
         "dilation": 2, "act": "relu"},                                                # a1 10x4
        {"type": "conv1d", "W": rng.normal(size=(3, 4, 4)) * 0.5, "b": bb(4),
         "padding": "same"},                                                           # a2
        bn(rng, 4, bias),                                                              # a3
        {"type": "add", "inputs": [3, 1], "act": "relu"},                              # a4
        {"type": "conv1d", "W": rng.normal(size=(2, 4, 3)) * 0.5, "b": bb(3), "strides": 2,
         "act": "relu"},                                                               # a5 5x3
        {"type": "add", "inputs": [5, 5, 5]},                                          # a6
        {"type": "act", "fn": "relu"},                                                 # a7
        {"type": "flatten"},                                                           # a8 (15,)
        bn(rng, 15, bias),                                                             # a9
        dense(rng.normal(size=(15, 2)), bb(2)),                                        # a10
    ]


@pytest.mark.parametrize("dag,shape", [(image_dag, (3, 6, 6, 2)), (sequence_dag, (3, 10, 3))])
def test_lrp0_equals_gradient_times_input_on_dags(dag, shape):
    rng = np.random.default_rng(RNG_SEED + 7)
    layers = dag(rng, bias=True)
    x = rng.normal(size=shape)
    acts = npref.forward(layers, x)
    G = rng.normal(size=acts[-1].shape)
    R, per = npref.lrp(layers, x, acts[-1] * G, {"name": "z"})
    g, gper = npref.gradient(layers, x, G, per_layer=True)
    assert len(per) == len(gper) == len(layers) + 1
    assert all(p.shape == a.shape == q.shape for p, a, q in zip(per, acts, gper))
    np.testing.assert_allclose(R, x * g, rtol=1e-9, atol=1e-12)
    for k in range(len(acts)):
        np.testing.assert_allclose(per[k], acts[k] * gper[k], rtol=1e-9, atol=1e-12,
                                   err_msg=f"activation {k}")
        assert np.abs(per[k]).sum() > 0, k
    np.testing.assert_allclose(g[:1], fd_gradient(layers, x[:1], G[:1]), rtol=1e-5, atol=1e-7)


# --------------------------------- new linear layers == unrolled dense LRP ----

def affine_map(layers, in_shape):
    """(W, b) with ``a_L = x W + b`` of an affine network, probed with basis vectors."""
    D = int(np.prod(in_shape))
    basis = np.concatenate([np.zeros((1, D)), np.eye(D)]).reshape((D + 1,) + in_shape)
    out = npref.forward(layers, basis)[-1].reshape(D + 1, -1)
    return out[1:] - out[0], out[0]


def linear_cases(rng, bias=True):
    """(name, layers, input shape): one new linear layer (maybe behind routing crops)."""
    def bb(k):
        return rng.normal(size=k) if bias else None
    return [
        ("depthwise", [{"type": "depthwise", "W": rng.normal(size=(3, 3, 3, 2)), "b": bb(6),
                        "strides": (2, 2), "padding": "same"}], (6, 5, 3)),
        ("depthwise_dil", [{"type": "depthwise", "W": rng.normal(size=(2, 2, 3, 1)),
                            "b": bb(3), "dilation": (2, 2)}], (5, 5, 3)),
        ("conv1d_causal", [{"type": "conv1d", "W": rng.normal(size=(3, 3, 4)), "b": bb(4),
                            "padding": "causal", "dilation": 2}], (9, 3)),
        ("conv1d_same_s2", [{"type": "conv1d", "W": rng.normal(size=(4, 3, 2)), "b": bb(2),
                             "padding": "same", "strides": 2}], (9, 3)),
        ("tconv_same_s2", [tconv(rng.normal(size=(3, 3, 2, 3)), bb(2), (2, 2), "same")],
         (3, 4, 3)),
        ("tconv_valid_s2", [tconv(rng.normal(size=(3, 2, 2, 3)), bb(2), (2, 2), "valid")],
         (3, 3, 3)),
        ("tconv_valid_k<s", [tconv(rng.normal(size=(2, 2, 2, 3)), bb(2), (3, 3), "valid")],
         (2, 3, 3)),
        ("avgpool_same", [{"type": "avgpool", "pool": (3, 3), "strides": (2, 2),
                           "padding": "same"}], (5, 6, 3)),
        ("avgpool_valid", [{"type": "avgpool", "pool": (2, 2), "strides": (1, 1)}],
         (4, 4, 3)),
        ("global_avgpool", [{"type": "global_avgpool"}], (3, 4, 3)),
        ("batchnorm", [bn(rng, 3, bias)], (4, 2, 3)),
        ("add", [{"type": "crop2d", "crop": ((0, 3), (0, 0))},
                 {"type": "crop2d", "crop": ((3, 0), (0, 0)), "inputs": [0]},
                 {"type": "add", "inputs": [1, 2]}], (6, 2, 3)),
    ]


UNROLL_RULES = [
    {"name": "z"}, {"name": "epsilon", "epsilon": 0.3},
    {"name": "epsilon", "epsilon": 0.3, "bias": False},
    {"name": "alphabeta", "alpha": 2.0, "beta": 1.0}, {"name": "zplus"},
    {"name": "alphabeta", "alpha": 1.5, "beta": 0.5, "bias": False},
    {"name": "wsquare"}, {"name": "gamma", "gamma": 0.25},
    {"name": "zbox", "low": np.array([-1.0, -0.5, 0.0]), "high": np.array([1.0, 2.0, 0.5])},
    {"name": "flat"},
]
CASE_NAMES = [c[0] for c in linear_cases(np.random.default_rng(0))]


@pytest.mark.parametrize("case", CASE_NAMES)
@pytest.mark.parametrize("rule", UNROLL_RULES, ids=lambda r: r["name"])
def test_new_linear_layers_lrp_equals_unrolled_dense(case, rule):
    rng = np.random.default_rng(RNG_SEED + 8)
    _, layers, in_shape = next(c for c in linear_cases(rng) if c[0] == case)
    x = rng.normal(size=(2,) + in_shape)
    out = npref.forward(layers, x)[-1]
    R_out = rng.normal(size=out.shape)
    R, _ = npref.lrp(layers, x, R_out, rule)
    Wd, bd = affine_map(layers, in_shape)
    np.testing.assert_allclose(npref.forward(layers, x)[-1].reshape(2, -1),
                               x.reshape(2, -1) @ Wd + bd, rtol=1e-10, atol=1e-12)
    if rule["name"] == "flat":      # uniform over the *connected* real inputs only
        M = (Wd != 0).astype(float)
        Rd = R_out.reshape(2, -1) @ (M / (M.sum(0) + E)).T
    else:
        drule = dict(rule)
        if rule["name"] == "zbox":  # per-channel bounds -> per flat input
            for k in ("low", "high"):
                drule[k] = np.broadcast_to(rule[k], in_shape).reshape(-1)
        Rd, _ = npref.lrp([dense(Wd, bd)], x.reshape(2, -1), R_out.reshape(2, -1), drule)
    np.testing.assert_allclose(R, Rd.reshape(R.shape), rtol=1e-9, atol=1e-12)
    assert np.abs(R).sum() > 0


@pytest.mark.parametrize("case", CASE_NAMES)
@pytest.mark.parametrize("rule,tol", [({"name": "z"}, 1e-10),
                                      ({"name": "epsilon", "epsilon": 1e-9}, 1e-6)])
def test_new_linear_layers_conserve_without_bias(case, rule, tol):
    rng = np.random.default_rng(RNG_SEED + 9)
    _, layers, in_shape = next(c for c in linear_cases(rng, bias=False) if c[0] == case)
    x = rng.random(size=(3,) + in_shape) + 0.1
    out = npref.forward(layers, x)[-1]
    R_out = rng.random(size=out.shape) + 0.1
    if case == "tconv_valid_k<s":       # outputs no input reaches (= 0) keep no relevance
        R_out = R_out * (out != 0)
    _, per = npref.lrp(layers, x, R_out, rule)
    np.testing.assert_allclose(per[0].reshape(3, -1).sum(1), R_out.reshape(3, -1).sum(1),
                               rtol=tol)


def test_residual_dag_conserves_at_every_cut():
    rng = np.random.default_rng(RNG_SEED + 10)
    layers = [
        conv(rng.normal(size=(3, 3, 2, 3)), padding="same", act="relu"),     # a1
        conv(rng.normal(size=(3, 3, 3, 3)), padding="same", act="relu"),     # a2
        conv(rng.normal(size=(3, 3, 3, 3)), padding="same"),                 # a3
        {"type": "identity", "inputs": [1]},                                 # a4 = skip
        {"type": "add", "inputs": [3, 4]},                                   # a5
        {"type": "flatten"},                                                 # a6
        dense(rng.normal(size=(75, 3))),                                     # a7
    ]
    x = rng.random(size=(3, 5, 5, 2))
    R_out = rng.random(size=(3, 3)) + 0.1
    _, per = npref.lrp(layers, x, R_out, {"name": "z"})
    total = R_out.sum(1)
    for cut in ([7], [6], [5], [3, 4], [2, 4], [1], [0]):
        s = sum(per[k].reshape(3, -1).sum(1) for k in cut)
        np.testing.assert_allclose(s, total, rtol=1e-10, err_msg=str(cut))
    assert not np.allclose(per[4].reshape(3, -1).sum(1), total)     # both paths matter
    # the same net with the skip read directly by the add
    direct = layers[:3] + [{"type": "add", "inputs": [3, 1]}] + layers[5:]
    R2, per2 = npref.lrp(direct, x, R_out, {"name": "z"})
    np.testing.assert_allclose(R2, per[0], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(per2[1], per[1], rtol=1e-12, atol=1e-14)


# ---------------------------------------------------- gradients of the DAGs --

def test_gradient_matches_finite_differences_gated_dag():
    """add + concat + multiply (sigmoid gate, broadcast) + batchnorm + depthwise."""
    rng = np.random.default_rng(RNG_SEED + 11)
    layers = [
        {"type": "depthwise", "W": rng.normal(size=(3, 3, 2, 2)), "b": rng.normal(size=4),
         "padding": "same", "act": "swish"},                                   # a1 5x5x4
        bn(rng, 4),                                                            # a2
        {"type": "global_avgpool", "inputs": [2]},                             # a3 (4,)
        {"type": "reshape", "shape": (1, 1, 4)},                               # a4
        {"type": "act", "fn": "sigmoid"},                                      # a5 gate
        {"type": "multiply", "inputs": [5, 2], "signal": 1},                   # a6 5x5x4
        conv(rng.normal(size=(1, 1, 2, 4)), rng.normal(size=4), act="tanh") | {"inputs": [0]},
        {"type": "add", "inputs": [6, 7]},                                     # a8
        {"type": "concat", "inputs": [8, 1]},                                  # a9 5x5x8
        {"type": "act", "fn": "elu"},                                          # a10
        {"type": "flatten"},
        dense(rng.normal(size=(200, 3)) * 0.2, rng.normal(size=3)),
    ]
    x = rng.normal(size=(1, 5, 5, 2))
    G = rng.normal(size=(1, 3))
    np.testing.assert_allclose(npref.gradient(layers, x, G), fd_gradient(layers, x, G),
                               rtol=1e-5, atol=1e-7)


def test_gradient_matches_finite_differences_other_layers():
    """conv2d_transpose, avgpool, pad/crop/upsample, maxpools, conv1d, other activations."""
    rng = np.random.default_rng(RNG_SEED + 12)
    layers = [
        tconv(rng.normal(size=(3, 3, 3, 2)), rng.normal(size=3), (2, 2), "same",
              act="softplus"),                                                 # a1 8x6x3
        {"type": "avgpool", "pool": (3, 3), "strides": (2, 2), "padding": "same"},  # a2 4x3x3
        {"type": "zeropad2d", "pad": ((1, 1), (0, 1))},                        # a3 6x4x3
        {"type": "crop2d", "crop": ((0, 2), (1, 0))},                          # a4 4x3x3
        {"type": "upsample2d", "size": (1, 2)},                                # a5 4x6x3
        {"type": "maxpool", "pool": (2, 2), "strides": (2, 2), "padding": "same"},  # a6 2x3x3
        {"type": "act", "fn": "leaky_relu", "alpha": 0.2},                     # a7
        {"type": "reshape", "shape": (6, 3)},                                  # a8
        {"type": "conv1d", "W": rng.normal(size=(3, 3, 4)), "b": rng.normal(size=4),
         "padding": "causal", "dilation": 2, "act": "elu"},                    # a9 6x4
        {"type": "conv1d", "W": rng.normal(size=(2, 4, 2)) * 3, "strides": 2,
         "padding": "same", "act": "relu6"},                                   # a10 3x2
        {"type": "identity"},                                                  # a11
        {"type": "global_maxpool"},                                            # a12 (2,)
        tconv(rng.normal(size=(2, 2, 2, 3)), None, (3, 3), "valid", act="tanh")
        | {"inputs": [7]},                                                     # a13 6x9x2
        {"type": "global_avgpool"},                                            # a14 (2,)
        {"type": "global_avgpool", "inputs": [9]},                             # a15 (4,)
        {"type": "concat", "inputs": [12, 14, 15]},                            # a16 (8,)
        dense(rng.normal(size=(8, 2)), act="leaky_relu"),
    ]
    x = rng.normal(size=(1, 4, 3, 2))
    G = rng.normal(size=(1, 2))
    acts = npref.forward(layers, x)
    assert ((acts[10] > 0) & (acts[10] < 6)).any() and (acts[10] == 6).any()
    np.testing.assert_allclose(npref.gradient(layers, x, G), fd_gradient(layers, x, G),
                               rtol=1e-5, atol=1e-7)


# -------------------------------------------------- DAG relevance plumbing ----

@pytest.mark.parametrize("signal", [0, 1])
def test_multiply_gives_all_relevance_to_signal(signal):
    rng = np.random.default_rng(RNG_SEED + 13)
    gate_chain = [{"type": "global_avgpool", "inputs": [1]},                   # a2
                  {"type": "reshape", "shape": (1, 1, 3)},                     # a3
                  {"type": "act", "fn": "sigmoid"}]                            # a4
    ins = [1, 4] if signal == 0 else [4, 1]
    layers = [conv(rng.normal(size=(2, 2, 2, 3)), padding="same")] + gate_chain + [
        {"type": "multiply", "inputs": ins, "signal": signal}]                 # a5
    x = rng.normal(size=(2, 4, 4, 2))
    acts = npref.forward(layers, x)
    np.testing.assert_allclose(acts[5], acts[1] * acts[4], rtol=1e-12)
    R_out = rng.normal(size=acts[5].shape)
    R, per = npref.lrp(layers, x, R_out, {"name": "z"})
    np.testing.assert_array_equal(per[1], R_out)            # R_signal = R, gate gets 0
    for k in (2, 3, 4):
        np.testing.assert_array_equal(per[k], 0.0)
    np.testing.assert_allclose(R.sum((1, 2, 3)), R_out.sum((1, 2, 3)), rtol=1e-9)
    # the gradient still flows through the gate
    G = rng.normal(size=acts[5].shape)
    np.testing.assert_allclose(npref.gradient(layers, x, G), fd_gradient(layers, x, G),
                               rtol=1e-5, atol=1e-7)


def test_shared_activation_accumulates():
    x = np.array([[1.0, -2.0, 3.0]])
    R_out = np.array([[4.0, 5.0, 6.0]])
    twice = [{"type": "add", "inputs": [0, 0]}]
    R, _ = npref.lrp(twice, x, R_out, {"name": "z"})      # x / 2x * R, received twice
    np.testing.assert_allclose(R, R_out, rtol=1e-15)
    np.testing.assert_array_equal(npref.gradient(twice, x, R_out), 2 * R_out)
    # a dead branch (a_1, read by nobody) gets zero relevance / gradient
    layers = [dense(np.ones((3, 2))), {"type": "concat", "inputs": [0, 0]}]
    R, per = npref.lrp(layers, x, np.arange(6.0)[None], {"name": "z"})
    np.testing.assert_array_equal(per[1], 0.0)
    np.testing.assert_array_equal(R, [[0 + 3, 1 + 4, 2 + 5]])
    g, gper = npref.gradient(layers, x, np.ones((1, 6)), per_layer=True)
    np.testing.assert_array_equal(gper[1], 0.0)
    np.testing.assert_array_equal(g, [[2, 2, 2]])


def test_first_rule_applies_to_first_new_linear_layer():
    rng = np.random.default_rng(RNG_SEED + 14)
    layers = [{"type": "global_avgpool"}, dense(rng.normal(size=(3, 2)), rng.normal(size=2))]
    x = rng.normal(size=(2, 3, 4, 3))
    R_out = rng.normal(size=(2, 2))
    _, per_z = npref.lrp(layers, x, R_out, {"name": "z"})
    R_f, per_f = npref.lrp(layers, x, R_out, {"name": "z"}, first_rule={"name": "flat"})
    np.testing.assert_array_equal(per_f[1], per_z[1])
    expected = np.broadcast_to(per_z[1][:, None, None, :] / (12 + E), x.shape)
    np.testing.assert_allclose(R_f, expected, rtol=1e-12)


def test_dag_validation_errors():
    x = np.ones((1, 4, 4, 2))
    bad = [
        ([{"type": "identity", "inputs": [1]}], "activation index"),          # future
        ([{"type": "add"}], "inputs"),                                         # one input
        ([{"type": "multiply", "inputs": [0, 0], "signal": 2}], "signal"),
        ([{"type": "act", "fn": "gelu_nope"}], "activation"),
        ([{"type": "act"}], "missing"),
        ([conv(np.ones((2, 2, 2, 1)), padding="causal")], "causal"),
        ([{"type": "batchnorm", "gamma": np.ones(2)}], "layer type"),
        ([{"type": "bogus"}], "layer type"),
        ([{"type": "flatten"}, dense(np.ones((32, 1)), act="softmax2")], "activation"),
        ([{"type": "add", "inputs": [0, 1]}, ], "activation index"),
        ([{"type": "identity"}, {"type": "flatten"}, {"type": "add", "inputs": [0, 2]}],
         "equal shapes"),
    ]
    for layers, msg in bad:
        with pytest.raises(ValueError, match=msg):
            npref.forward(layers, x)


# ============================ grouped convolution, LayerScale, weighted add ==

GROUP_CASES = [  # (name, kind, in_shape, kernel (spatial), groups, out channels, options)
    ("g2_same", "conv2d", (5, 6, 4), (3, 3), 2, 6, dict(padding="same")),
    ("g3_valid_s2", "conv2d", (7, 6, 6), (3, 2), 3, 3, dict(strides=(2, 2))),
    ("g4_dw_mult2_dil2", "conv2d", (6, 6, 4), (2, 2), 4, 8, dict(padding="same", dilation=(2, 2))),
    ("g2_1d_causal", "conv1d", (9, 4), (3,), 2, 4, dict(padding="causal", dilation=2)),
    ("g3_1d_same_s2", "conv1d", (9, 6), (2,), 3, 6, dict(padding="same", strides=2)),
]
GROUP_NAMES = [c[0] for c in GROUP_CASES]


def grouped_case(name, rng, bias=True):
    """(grouped layer dict, the equal dense (groups=1) layer dict with a block-diagonal kernel, shape)."""
    _, kind, in_shape, k, G, J, opts = next(c for c in GROUP_CASES if c[0] == name)
    C = in_shape[-1]
    W = rng.normal(size=k + (C // G, J))
    b = rng.normal(size=J) if bias else None
    full = np.zeros(k + (C, J))               # written out: output j reads the inputs of its group
    for j in range(J):
        g = j // (J // G)
        full[..., g * (C // G):(g + 1) * (C // G), j] = W[..., j]
    layer = {"type": kind, "W": W, "b": b, "groups": G, **opts}
    return layer, dict(layer, W=full, groups=1), in_shape


def grouped_loop(layer, x):
    """Grouped convolution as separate convolutions of the channel groups, concatenated."""
    G, W, b = layer["groups"], layer["W"], layer["b"]
    cg, jg = x.shape[-1] // G, W.shape[-1] // G
    parts = []
    for g in range(G):
        xs, Ws = x[..., g * cg:(g + 1) * cg], W[..., g * jg:(g + 1) * jg]
        if layer["type"] == "conv1d":
            parts.append(loop_conv1d(xs, Ws, None, layer.get("strides", 1), layer.get("padding", "valid"),
                                     layer.get("dilation", 1)))
        else:
            parts.append(loop_conv(xs, Ws, None, layer.get("strides", (1, 1)), layer.get("padding", "valid"),
                                   layer.get("dilation", (1, 1))))
    return np.concatenate(parts, axis=-1) + (0 if b is None else b)


@pytest.mark.parametrize("case", GROUP_NAMES)
def test_grouped_conv_forward_is_per_group_convolutions(case):
    rng = np.random.default_rng(RNG_SEED + 20)
    layer, full, in_shape = grouped_case(case, rng)
    x = rng.normal(size=(2,) + in_shape)
    out = npref.forward([layer], x)[-1]
    np.testing.assert_allclose(out, grouped_loop(layer, x), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(out, npref.forward([full], x)[-1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", GROUP_NAMES)
@pytest.mark.parametrize("rule", UNROLL_RULES, ids=lambda r: r["name"])
def test_grouped_conv_lrp_equals_block_diagonal_conv(case, rule):
    """Every rule but flat only sees the weights, zero across groups: the grouped conv is the dense
    conv with the block-diagonal kernel. Flat counts the *connected* inputs: those of the group
    (the dense conv would count every input channel), checked against the unrolled dense layer."""
    rng = np.random.default_rng(RNG_SEED + 21)
    layer, full, in_shape = grouped_case(case, rng)
    x = rng.normal(size=(2,) + in_shape)
    R_out = rng.normal(size=npref.forward([layer], x)[-1].shape)
    drule = dict(rule)
    if rule["name"] == "zbox":      # per-channel bounds for this input's channels
        C = in_shape[-1]
        drule["low"], drule["high"] = -np.linspace(0.5, 1.0, C), np.linspace(0.2, 2.0, C)
    R, _ = npref.lrp([layer], x, R_out, drule)
    if rule["name"] == "flat":
        Wd, _ = affine_map([dict(layer, b=None)], in_shape)
        Mk = (Wd != 0).astype(float)
        Rd = R_out.reshape(2, -1) @ (Mk / (Mk.sum(0) + E)).T
        np.testing.assert_allclose(R, Rd.reshape(R.shape), rtol=1e-9, atol=1e-12)
        R_full, _ = npref.lrp([full], x, R_out, drule)
        assert not np.allclose(R, R_full)         # the dense conv would spread over all channels
    else:
        R_full, _ = npref.lrp([full], x, R_out, drule)
        np.testing.assert_allclose(R, R_full, rtol=1e-10, atol=1e-13)
    assert np.abs(R).sum() > 0


@pytest.mark.parametrize("case", GROUP_NAMES)
def test_grouped_conv_gradient_matches_finite_differences(case):
    rng = np.random.default_rng(RNG_SEED + 22)
    layer, _, in_shape = grouped_case(case, rng)
    layers = [dict(layer, act="tanh"), {"type": "flatten"}]
    x = rng.normal(size=(1,) + in_shape)
    G = rng.normal(size=npref.forward(layers, x)[-1].shape)
    np.testing.assert_allclose(npref.gradient(layers, x, G), fd_gradient(layers, x, G), rtol=1e-5, atol=1e-7)


def test_grouped_conv_validation():
    x = np.ones((1, 4, 4, 4))
    for layer, msg in [
        ({"type": "conv2d", "W": np.ones((2, 2, 2, 3)), "groups": 2}, "groups=2 must divide"),
        ({"type": "conv2d", "W": np.ones((2, 2, 3, 3)), "groups": 3}, "groups=3 must divide"),
        ({"type": "conv2d", "W": np.ones((2, 2, 4, 4)), "groups": 2}, "expects 8 input channels"),
        ({"type": "depthwise", "W": np.ones((2, 2, 4, 1)), "groups": 2}, "only exists for conv2d"),
    ]:
        with pytest.raises(ValueError, match=msg):
            npref.forward([layer], x)


def test_layerscale_forward_gradient_and_relevance_pass_through():
    rng = np.random.default_rng(RNG_SEED + 23)
    gamma = rng.normal(size=3)
    x = rng.normal(size=(2, 4, 5, 3))
    ls = {"type": "layerscale", "gamma": gamma}
    np.testing.assert_allclose(npref.forward([ls], x)[-1], x * gamma.reshape(1, 1, 1, 3), rtol=1e-15)
    layers = [conv(rng.normal(size=(2, 2, 3, 3)), rng.normal(size=3), padding="same"), ls,
              {"type": "act", "fn": "tanh"}, {"type": "flatten"}]
    G = rng.normal(size=(2, 60))
    np.testing.assert_allclose(npref.gradient(layers, x, G), fd_gradient(layers, x, G), rtol=1e-5, atol=1e-7)
    R = rng.normal(size=x.shape)
    for rule in UNROLL_RULES:
        _, per = npref.lrp([ls], x, R, rule)
        np.testing.assert_array_equal(per[0], R)
    with pytest.raises(ValueError, match="gamma shape"):
        npref.forward([{"type": "layerscale", "gamma": np.ones(2)}], x)
    with pytest.raises(ValueError, match="missing"):
        npref.forward([{"type": "layerscale"}], x)


def weighted_add_net(s):
    """a1 = crop top, a2 = crop bottom of x; a3 = a1 + s * a2."""
    return [{"type": "crop2d", "crop": ((0, 3), (0, 0))},
            {"type": "crop2d", "crop": ((3, 0), (0, 0)), "inputs": [0]},
            {"type": "add", "inputs": [1, 2], "weights": [1.0, s]}]


@pytest.mark.parametrize("s", [0.17, -0.6])
@pytest.mark.parametrize("rule", UNROLL_RULES, ids=lambda r: r["name"])
def test_weighted_add_lrp_equals_unrolled_dense(rule, s):
    rng = np.random.default_rng(RNG_SEED + 24)
    layers, in_shape = weighted_add_net(s), (6, 2, 3)
    x = rng.normal(size=(2,) + in_shape)
    acts = npref.forward(layers, x)
    np.testing.assert_allclose(acts[3], acts[1] + s * acts[2], rtol=1e-15)
    R_out = rng.normal(size=acts[3].shape)
    R, _ = npref.lrp(layers, x, R_out, rule)
    Wd, bd = affine_map(layers, in_shape)
    np.testing.assert_allclose(bd, 0.0, atol=1e-15)
    if rule["name"] == "flat":
        Mk = (Wd != 0).astype(float)
        Rd = R_out.reshape(2, -1) @ (Mk / (Mk.sum(0) + E)).T
    else:
        drule = dict(rule)
        if rule["name"] == "zbox":
            for k in ("low", "high"):
                drule[k] = np.broadcast_to(rule[k], in_shape).reshape(-1)
        Rd, _ = npref.lrp([dense(Wd)], x.reshape(2, -1), R_out.reshape(2, -1), drule)
    np.testing.assert_allclose(R, Rd.reshape(R.shape), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("rule", [{"name": "z"}, {"name": "epsilon", "epsilon": 0.3},
                                  {"name": "alphabeta", "alpha": 2.0, "beta": 1.0}, {"name": "zplus"},
                                  {"name": "gamma", "gamma": 0.25}], ids=lambda r: r["name"])
def test_weighted_add_is_an_add_of_the_scaled_branch(rule):
    """Rules that see only the contributions: x0 + s*x1 is an add of x0 and the branch s*x1, whose
    relevance goes unchanged to x1 (CustomScaleLayer as lrp_grad handles it)."""
    rng = np.random.default_rng(RNG_SEED + 25)
    s = -0.4
    x = rng.normal(size=(3, 6, 2, 3))
    layers = weighted_add_net(s)
    scaled = layers[:2] + [{"type": "layerscale", "gamma": np.full(3, s)},
                           {"type": "add", "inputs": [1, 3]}]
    R_out = rng.normal(size=(3, 3, 2, 3))
    _, per = npref.lrp(layers, x, R_out, rule)
    _, per2 = npref.lrp(scaled, x, R_out, rule)
    np.testing.assert_allclose(per[1], per2[1], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(per[2], per2[2], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(per2[3], per2[2], rtol=0, atol=0)   # the scale passes relevance


def test_weighted_add_gradient_and_validation():
    rng = np.random.default_rng(RNG_SEED + 26)
    layers = weighted_add_net(0.3) + [{"type": "act", "fn": "elu"}, {"type": "flatten"}]
    x = rng.normal(size=(1, 6, 2, 3))
    G = rng.normal(size=(1, 18))
    np.testing.assert_allclose(npref.gradient(layers, x, G), fd_gradient(layers, x, G), rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="one number per input"):
        npref.forward([{"type": "add", "inputs": [0, 0], "weights": [1.0, 2.0, 3.0]}], x)


NEW_ACTIVATIONS = {  # name (alpha) -> f, written out from the definitions
    "gelu": lambda z: z * 0.5 * (1 + np.vectorize(__import__("math").erf)(z / np.sqrt(2))),
    "gelu_tanh": lambda z: 0.5 * z * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z ** 3))),
    "selu": lambda z: 1.0507009873554805 * np.where(z > 0, z, 1.6732632423543772 * (np.exp(z) - 1)),
    "celu": lambda z: np.where(z > 0, z, np.exp(z) - 1),
    "softsign": lambda z: z / (1 + np.abs(z)),
    "exponential": np.exp,
    "mish": lambda z: z * np.tanh(np.log1p(np.exp(z))),
    "hard_sigmoid": lambda z: np.clip(z + 3, 0, 6) / 6,
    "hard_silu": lambda z: z * np.clip(z + 3, 0, 6) / 6,
    "hard_swish": lambda z: z * np.clip(z + 3, 0, 6) / 6,
    "hard_tanh": lambda z: np.clip(z, -1, 1),
    "log_sigmoid": lambda z: np.log(1 / (1 + np.exp(-z))),
    "squareplus": lambda z: (z + np.sqrt(z * z + 4)) / 2,
    "sparse_plus": lambda z: np.where(z <= -1, 0, np.where(z >= 1, z, (z + 1) ** 2 / 4)),
    "sparse_sigmoid": lambda z: np.clip((z + 1) / 2, 0, 1),
    "soft_shrink": lambda z: np.sign(z) * np.maximum(np.abs(z) - 0.5, 0),
    "hard_shrink": lambda z: np.where(np.abs(z) > 0.5, z, 0),
    "tanh_shrink": lambda z: z - np.tanh(z),
}
ALPHA_ACTIVATIONS = [("celu", 2.0, lambda z: np.where(z > 0, z, 2 * (np.exp(z / 2) - 1))),
                     ("hard_sigmoid", 0.2, lambda z: np.clip(0.2 * z + 0.5, 0, 1)),
                     ("soft_shrink", 1.0, lambda z: np.sign(z) * np.maximum(np.abs(z) - 1, 0))]


@pytest.mark.parametrize("fn", list(NEW_ACTIVATIONS))
def test_more_activations_values_gradients_and_lrp_pass_through(fn):
    z = np.array([[-4.0, -2.5, -1.0, -0.7, -0.2, 0.0, 0.3, 0.6, 1.0, 2.0, 3.5, 5.0]])
    out = npref.forward([{"type": "act", "fn": fn}], z)[-1]
    np.testing.assert_allclose(out, NEW_ACTIVATIONS[fn](z), rtol=1e-12, atol=1e-15)
    fused = npref.forward([dense(np.eye(12), act=fn)], z)[-1]
    np.testing.assert_allclose(fused, out, rtol=1e-12, atol=1e-15)
    rng = np.random.default_rng(RNG_SEED + 27)
    x = rng.normal(size=(2, 7)) * 2
    layers = [dense(rng.normal(size=(7, 7)) * 0.5), {"type": "act", "fn": fn},
              dense(rng.normal(size=(7, 3)) * 0.5, act=fn)]
    G = rng.normal(size=(2, 3))
    np.testing.assert_allclose(npref.gradient(layers, x, G), fd_gradient(layers, x, G), rtol=1e-5, atol=1e-7)
    R = rng.normal(size=(2, 7))
    _, per = npref.lrp([{"type": "act", "fn": fn}], x, R, {"name": "z"})
    np.testing.assert_array_equal(per[0], R)


@pytest.mark.parametrize("fn,alpha,ref", ALPHA_ACTIVATIONS, ids=[a[0] for a in ALPHA_ACTIVATIONS])
def test_more_activations_parameters(fn, alpha, ref):
    z = np.linspace(-4, 4, 17)[None]
    out = npref.forward([{"type": "act", "fn": fn, "alpha": alpha}], z)[-1]
    np.testing.assert_allclose(out, ref(z), rtol=1e-12, atol=1e-15)
