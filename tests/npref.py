"""Slow, deliberately literal float64 numpy reference of LRP.

Every weighted layer (dense or conv2d) is viewed the same way: for each output
position there is a "patch" of input entries (for dense: the whole input; for
conv: the receptive field, with ``-1`` marking zero-padding positions, which are
*not* inputs).  Explicit contributions ``z_ij = x_i * w_ij`` are formed with shape
``(rows, K, J)`` and every rule is written once as "messages" from those
contributions, then scatter-added back to the input.  No clever algebra is used,
so the code can be checked line by line against the equations.

Layers are plain dicts (see the test-suite brief); all arrays are float64.
"""
import numpy as np

RULES = ("z", "epsilon", "alphabeta", "zplus", "flat", "wsquare", "zbox", "gamma")
WEIGHTED = ("dense", "conv2d")
LAYER_TYPES = WEIGHTED + ("maxpool", "flatten", "reshape", "relu")
_STAB = 1e-6        # fixed stabiliser used by every rule except epsilon
_CHUNK = 2_000_000  # max contribution entries held at once (memory bound)


def stab(v, eps):
    """Return ``v + eps * sign(v)`` with ``sign(0) := +1``."""
    return v + eps * np.where(v >= 0, 1.0, -1.0)


def _div(num, den):
    """``num / den`` with the result defined as 0 where ``den == 0``."""
    safe = np.where(den == 0, 1.0, den)
    return np.where(den == 0, 0.0, num / safe)


def _out_size(size, k, s, d, padding):
    """Return (output length, pad before) of one spatial axis, TF style."""
    ke = (k - 1) * d + 1
    if padding == "valid":
        return (size - ke) // s + 1, 0
    if padding == "same":
        out = -(-size // s)
        total = max((out - 1) * s + ke - size, 0)
        return out, total // 2          # TF puts the odd extra pad at the end
    raise ValueError(f"unknown padding {padding!r}; expected 'valid' or 'same'")


def _window_table(H, W, kh, kw, strides, dilation, padding):
    """Map (output position, kernel offset) to a flat spatial index ``r*W + c``.

    Returns ``(OH, OW)`` and an int table of shape ``(OH*OW, kh*kw)``, kernel
    offsets in row-major ``(ki, kj)`` order, ``-1`` marking padding.
    """
    OH, pt = _out_size(H, kh, strides[0], dilation[0], padding)
    OW, pl = _out_size(W, kw, strides[1], dilation[1], padding)
    if OH <= 0 or OW <= 0:
        raise ValueError("kernel larger than the (padded) input")
    rows = (np.arange(OH) * strides[0] - pt)[:, None, None, None] \
        + (np.arange(kh) * dilation[0])[None, None, :, None]
    cols = (np.arange(OW) * strides[1] - pl)[None, :, None, None] \
        + (np.arange(kw) * dilation[1])[None, None, None, :]
    ok = (rows >= 0) & (rows < H) & (cols >= 0) & (cols < W)
    table = np.where(ok, rows * W + cols, -1)
    return (OH, OW), table.reshape(OH * OW, kh * kw)


def _weighted_view(layer, in_shape):
    """Generic patch view of a dense/conv2d layer for one sample.

    Parameters
    ----------
    layer : dict
    in_shape : tuple of int
        Input shape without batch.

    Returns
    -------
    idx : ndarray of int, shape (P, K)   flat input index per patch entry, -1 = pad
    Wm : ndarray, shape (K, J)
    b : ndarray, shape (J,)              zeros when the layer has no bias
    out_shape : tuple of int             output shape without batch
    """
    W = np.asarray(layer["W"], dtype=np.float64)
    J = W.shape[-1]
    b = np.zeros(J) if layer.get("b") is None else np.asarray(layer["b"], np.float64)
    if layer["type"] == "dense":
        return np.arange(W.shape[0])[None, :], W, b, (J,)
    kh, kw, cin, _ = W.shape
    H, Wd, C = in_shape
    if C != cin:
        raise ValueError(f"conv2d expects {cin} input channels, got {C}")
    out_hw, sp = _window_table(H, Wd, kh, kw, tuple(layer.get("strides", (1, 1))),
                               tuple(layer.get("dilation", (1, 1))),
                               layer.get("padding", "valid"))
    # Expand each spatial position into its channels, (ki, kj, c) order = W's order.
    idx = np.where(sp[:, :, None] >= 0, sp[:, :, None] * C + np.arange(C), -1)
    return idx.reshape(sp.shape[0], -1), W.reshape(-1, J), b, out_hw + (J,)


def _gather(a, idx):
    """Patch values ``(n, P, K)`` of a batch; padding entries read as 0."""
    flat = a.reshape(a.shape[0], -1)
    ext = np.concatenate([flat, np.zeros((flat.shape[0], 1))], axis=1)
    return ext[:, idx]                  # index -1 hits the appended zero column


def _scatter(Rp, idx, in_shape):
    """Sum patch relevances ``(n, P, K)`` back onto the input (drop padding)."""
    n = Rp.shape[0]
    D = int(np.prod(in_shape))
    out = np.zeros((n, D + 1))          # column D collects padding messages
    tgt = np.where(idx < 0, D, idx)
    for s in range(n):
        np.add.at(out[s], tgt, Rp[s])   # add.at: entries repeat across patches
    return out[:, :D].reshape((n,) + tuple(in_shape))


def _maxpool(layer, a):
    """Max pooling forward; also return the flat spatial index of each max.

    Ties go to the first maximum in row-major window order (``argmax``), which
    matches TensorFlow's max-pool gradient; padding is ``-inf`` so never wins.
    """
    n, H, W, C = a.shape
    ph, pw = layer["pool"]
    out_hw, table = _window_table(H, W, ph, pw, tuple(layer.get("strides", (ph, pw))),
                                  (1, 1), layer.get("padding", "valid"))
    ext = np.concatenate([a.reshape(n, H * W, C), np.full((n, 1, C), -np.inf)], 1)
    win = ext[:, np.where(table < 0, H * W, table), :]      # (n, P, ph*pw, C)
    arg = np.argmax(win, axis=2)                             # (n, P, C)
    target = table[np.arange(table.shape[0])[None, :, None], arg]
    out = np.max(win, axis=2).reshape((n,) + out_hw + (C,))
    return out, target


def _maxpool_back(layer, a, R):
    """Send each window's relevance/gradient to its (first) maximum."""
    n, H, W, C = a.shape
    _, target = _maxpool(layer, a)
    Rf = R.reshape(n, -1, C)
    out = np.zeros((n, H * W, C))
    nn = np.arange(n)[:, None, None]
    cc = np.arange(C)[None, None, :]
    np.add.at(out, (nn, target, cc), Rf)    # overlapping windows accumulate
    return out.reshape(a.shape)


def forward(layers, x, return_pre=False):
    """Run the network.

    Parameters
    ----------
    layers : list of dict
    x : array_like, shape (n, ...)
    return_pre : bool
        Also return pre-activations.

    Returns
    -------
    acts : list of ndarray
        ``a_0 = x, a_1, ..., a_L`` (post-activation outputs).
    pres : list of ndarray, only if ``return_pre``
        ``pres[k]`` is layer ``k``'s output before its activation (``z`` for
        dense/conv2d, the input for a standalone relu, the output otherwise).
    """
    a = np.asarray(x, dtype=np.float64)
    acts, pres = [a], []
    for layer in layers:
        t = layer.get("type")
        if t in WEIGHTED:
            idx, Wm, b, out_shape = _weighted_view(layer, a.shape[1:])
            z = (_gather(a, idx) @ Wm + b).reshape((a.shape[0],) + out_shape)
            act = layer.get("act", "linear")
            if act not in ("relu", "linear"):
                raise ValueError(f"unknown activation {act!r}")
            pre, a = z, (np.maximum(z, 0.0) if act == "relu" else z)
        elif t == "relu":
            pre, a = a, np.maximum(a, 0.0)
        elif t == "maxpool":
            a, _ = _maxpool(layer, a)
            pre = a
        elif t == "flatten":
            a = pre = a.reshape(a.shape[0], -1)
        elif t == "reshape":
            a = pre = a.reshape((a.shape[0],) + tuple(layer["shape"]))
        else:
            raise ValueError(f"unknown layer type {t!r}; expected one of {LAYER_TYPES}")
        acts.append(a)
        pres.append(pre)
    return (acts, pres) if return_pre else acts


def _check_rule(rule):
    name = rule.get("name") if isinstance(rule, dict) else None
    if name not in RULES:
        raise ValueError(f"unknown LRP rule {name!r}; expected one of {RULES}")
    need = {"epsilon": ("epsilon",), "alphabeta": ("alpha", "beta"),
            "zbox": ("low", "high"), "gamma": ("gamma",)}.get(name, ())
    missing = [k for k in need if k not in rule]
    if missing:
        raise ValueError(f"rule {name!r} is missing parameter(s) {missing}")


def _messages(rule, X, V, Wm, b, R, L=None, Hb=None):
    """Relevance each patch entry receives, for a block of rows.

    Parameters
    ----------
    rule : dict
    X : ndarray, shape (m, K)   patch values (0 at padding)
    V : ndarray, shape (m, K)   1.0 where the entry is a real input, 0.0 at padding
    Wm : ndarray, shape (K, J)
    b : ndarray, shape (J,)
    R : ndarray, shape (m, J)   relevance of the outputs
    L, Hb : ndarray, shape (m, K), optional   zbox bounds (0 at padding)

    Returns
    -------
    ndarray, shape (m, K)
        ``sum_j c_ij * R_j`` where ``c_ij`` is the rule's share of output ``j``.
    """
    name = rule["name"]
    Z = X[:, :, None] * Wm[None]                  # z_ij, shape (m, K, J)
    Zp, Zn = np.maximum(Z, 0), np.minimum(Z, 0)
    bp, bn = np.maximum(b, 0), np.minimum(b, 0)
    if name == "z":
        C = _div(Z, (Z.sum(1) + b)[:, None, :])
    elif name == "epsilon":
        den = Z.sum(1) + (b if rule.get("bias", True) else 0.0)
        C = _div(Z, stab(den, rule["epsilon"])[:, None, :])
    elif name in ("alphabeta", "zplus"):
        a, be = (1.0, 0.0) if name == "zplus" else (rule["alpha"], rule["beta"])
        use_b = True if name == "zplus" else rule.get("bias", True)
        zp = Zp.sum(1) + (bp if use_b else 0.0)
        zn = Zn.sum(1) + (bn if use_b else 0.0)
        C = a * _div(Zp, stab(zp, _STAB)[:, None, :]) \
            - be * _div(Zn, stab(zn, _STAB)[:, None, :])
    elif name == "flat":
        ones = V[:, :, None] * np.ones_like(Wm)[None]      # padding is no input
        C = _div(ones, stab(ones.sum(1), _STAB)[:, None, :])
    elif name == "wsquare":
        W2 = V[:, :, None] * (Wm ** 2)[None]
        C = _div(W2, stab(W2.sum(1), _STAB)[:, None, :])
    elif name == "zbox":
        Q = Z - L[:, :, None] * np.maximum(Wm, 0)[None] \
            - Hb[:, :, None] * np.minimum(Wm, 0)[None]
        C = _div(Q, stab(Q.sum(1) + b, _STAB)[:, None, :])
    elif name == "gamma":
        g = rule["gamma"]
        zj = (Z.sum(1) + b)[:, None, :]
        Cp = _div(Z + g * Zp, stab(zj + g * (Zp.sum(1) + bp)[:, None, :], _STAB))
        Cn = _div(Z + g * Zn, stab(zj + g * (Zn.sum(1) + bn)[:, None, :], _STAB))
        C = np.where(zj > 0, Cp, np.where(zj < 0, Cn, 0.0))
    else:
        raise ValueError(f"unknown LRP rule {name!r}; expected one of {RULES}")
    return np.einsum("mkj,mj->mk", C, R)


def _lrp_weighted(layer, a, R, rule):
    """Relevance at a dense/conv2d input from relevance at its output."""
    in_shape = a.shape[1:]
    idx, Wm, b, _ = _weighted_view(layer, in_shape)
    n, (P, K), J = a.shape[0], idx.shape, Wm.shape[1]
    X = _gather(a, idx)
    V = (idx >= 0).astype(np.float64)
    L = Hb = None
    if rule["name"] == "zbox":      # bounds broadcast per input entry, 0 at padding
        L = _gather(np.broadcast_to(np.asarray(rule["low"], np.float64), in_shape)[None], idx)[0]
        Hb = _gather(np.broadcast_to(np.asarray(rule["high"], np.float64), in_shape)[None], idx)[0]
    Rr = R.reshape(n, P, J)
    Rp = np.zeros((n, P, K))
    step = max(1, _CHUNK // (K * J))                    # bounded memory per block
    for s in range(n):
        for p0 in range(0, P, step):
            sl = slice(p0, p0 + step)
            Rp[s, sl] = _messages(rule, X[s, sl], V[sl], Wm, b, Rr[s, sl],
                                  None if L is None else L[sl],
                                  None if Hb is None else Hb[sl])
    return _scatter(Rp, idx, in_shape)


def _route(layer, a, R):
    """Backward step shared by LRP and gradient for weight-free layers."""
    t = layer["type"]
    if t == "maxpool":
        return _maxpool_back(layer, a, R)
    if t in ("flatten", "reshape"):
        return R.reshape(a.shape)
    raise ValueError(f"unknown layer type {t!r}; expected one of {LAYER_TYPES}")


def lrp(layers, x, R_out, rule, first_rule=None):
    """Layer-wise relevance propagation from the output back to the input.

    Parameters
    ----------
    layers : list of dict
    x : array_like, shape (n, ...)
    R_out : array_like
        Relevance of the last activation ``a_L``; any shape with the same size
        as ``a_L`` (e.g. ``(n, n_out)``), reshaped to ``a_L.shape``.
    rule : dict
        Rule for every dense/conv2d layer.
    first_rule : dict, optional
        Rule for the first dense/conv2d layer in ``layers`` instead of ``rule``.

    Returns
    -------
    R_in : ndarray
        Relevance of the input, shape of ``x``.
    per_layer : list of ndarray
        Relevance of ``a_0 .. a_L``; ``per_layer[0] is R_in`` and
        ``per_layer[-1]`` is ``R_out`` (reshaped).
    """
    _check_rule(rule)
    if first_rule is not None:
        _check_rule(first_rule)
    acts = forward(layers, x)
    first = next((k for k, l in enumerate(layers) if l["type"] in WEIGHTED), None)
    R = np.asarray(R_out, dtype=np.float64).reshape(acts[-1].shape)
    per = [R]
    for k in range(len(layers) - 1, -1, -1):
        layer, a = layers[k], acts[k]
        if layer["type"] in WEIGHTED:
            r = first_rule if (k == first and first_rule is not None) else rule
            R = _lrp_weighted(layer, a, R, r)   # fused act passes R unchanged
        elif layer["type"] == "relu":
            pass                                # activations pass R unchanged
        else:
            R = _route(layer, a, R)
        per.append(R)
    per.reverse()
    return per[0], per


def gradient(layers, x, G_out):
    """Plain vector-Jacobian product ``G_out^T d a_L / d x``.

    Parameters
    ----------
    layers : list of dict
    x : array_like, shape (n, ...)
    G_out : array_like
        Cotangent of ``a_L`` (any shape with the size of ``a_L``).

    Returns
    -------
    ndarray
        Gradient with the shape of ``x``.
    """
    acts, pres = forward(layers, x, return_pre=True)
    G = np.asarray(G_out, dtype=np.float64).reshape(acts[-1].shape)
    for k in range(len(layers) - 1, -1, -1):
        layer, a = layers[k], acts[k]
        t = layer["type"]
        if t in WEIGHTED:
            if layer.get("act", "linear") == "relu":
                G = G * (pres[k] > 0)           # ReLU'(z) = 1 iff z > 0
            idx, Wm, _, _ = _weighted_view(layer, a.shape[1:])
            Gp = G.reshape(a.shape[0], idx.shape[0], -1) @ Wm.T
            G = _scatter(Gp, idx, a.shape[1:])
        elif t == "relu":
            G = G * (pres[k] > 0)
        else:
            G = _route(layer, a, G)
    return G
