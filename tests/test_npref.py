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
