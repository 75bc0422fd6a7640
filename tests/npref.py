"""Slow, deliberately literal float64 numpy reference of LRP.

Every weighted (linear) layer is viewed the same way: for each output position
there is a "patch" of input entries (for dense: the whole input; for conv: the
receptive field, with ``-1`` marking zero-padding positions, which are *not*
inputs), a weight matrix from patch entries to the ``J`` outputs of the position
(the same for every position, or one per position for average pooling), a
connectivity mask (which patch entry feeds which output: depthwise, pooling and
batch-norm layers are per channel, grouped convolutions per channel group; a
grouped kernel is written out as the full one, zero across groups) and a bias.  Explicit contributions
``z_ij = x_i * w_ij`` are formed with shape ``(rows, K, J)`` and every rule is
written once as "messages" from those contributions, then scatter-added back to
the input(s).  No clever algebra is used, so the code can be checked line by line
against the equations.

Models are lists of layer dicts (all arrays float64, channels last).  Layer
``m`` (0-based) reads the activations listed in ``layer["inputs"]`` (default
``[m]``: the previous one; ``a_0 = x``) and produces ``a_{m+1}``; the model
output is ``a_L``.  LRP and gradients run backwards and *sum* what an activation
receives from all the layers that read it.

Weighted layers (every rule applies; optional fused ``"act"``, default linear):
  dense            W (K, J), b
  conv2d           W (kh, kw, C/groups, J), b, strides, padding valid|same, dilation,
                   groups (default 1): output channel j reads the input channels
                   of group j // (J/groups), C/groups of them
  depthwise        W (kh, kw, C, M), b (C*M,); output channel c*M + m reads channel c
  conv1d           W (k, C/groups, J), b, strides s, padding valid|same|causal, dilation d,
                   groups (as conv2d)
  conv2d_transpose W (kh, kw, J, C), b, strides, padding valid|same (Keras sizes)
  avgpool          pool, strides (default pool), padding; mean over real inputs only
  global_avgpool   (n, ..., C) -> (n, C)
  batchnorm        gamma, beta, mean, var, eps (default 1e-3): y = a*x + c per channel
  add              two or more inputs of equal shape, no bias; ``"weights"``: one
                   number per input (default all 1), z = sum_k w_k x_k, contributions
                   z_k = w_k x_k (InceptionResNetV2's CustomScaleLayer: [1, scale])
Activations (relevance passes unchanged, gradient is the derivative): the fused
``"act"`` of a weighted layer, ``{"type": "relu"}`` and ``{"type": "act", "fn": f}``
with f in ``ACTIVATIONS`` (``"alpha"``: leaky_relu slope, default 0.3; elu and celu
alpha, default 1; hard_sigmoid/hard_silu slope, default 1/6 (Keras 3), tf-keras'
hard_sigmoid 0.2; soft/hard_shrink threshold, default 0.5), and
``{"type": "layerscale", "gamma": (C,)}``: ConvNeXt's LayerScale ``y = x * gamma``
per channel (relevance passes unchanged; gradient ``gamma``).
Routing layers (relevance follows the plain gradient): maxpool, global_maxpool,
flatten, reshape, identity, concat (last axis), zeropad2d pad ((t,b),(l,r)),
crop2d crop ((t,b),(l,r)), upsample2d size (sh, sw) (nearest).
``multiply`` (two inputs, ``"signal"``: 0 or 1 = position in ``inputs``, default 0):
``y = signal * gate`` (the gate may broadcast); LRP gives all relevance to the
signal and none to the gate; the gradient is the true one for both.
Several model inputs: pass ``x`` as a list or tuple of numpy arrays ``[x_0, x_1, ...]``;
``a_0 = x_0`` and ``{"type": "input", "index": k}`` (reads no activation) outputs ``x_k``.
``lrp`` and ``gradient`` then return one array per model input: what ``a_0`` and the input
layers of that index receive, summed.
"""
import math

import numpy as np

RULES = ("z", "epsilon", "alphabeta", "zplus", "flat", "wsquare", "zbox", "gamma")
WEIGHTED = ("dense", "conv2d", "depthwise", "conv1d", "conv2d_transpose",
            "avgpool", "global_avgpool", "batchnorm", "add")
ACT_LAYERS = ("relu", "act", "layerscale")
ROUTING = ("maxpool", "global_maxpool", "flatten", "reshape", "identity", "concat",
           "zeropad2d", "crop2d", "upsample2d", "multiply")
SOURCES = ("input",)   # model inputs beyond a_0 (see the module docstring)
LAYER_TYPES = WEIGHTED + ACT_LAYERS + ROUTING + SOURCES
ACTIVATIONS = ("linear", "relu", "relu6", "tanh", "sigmoid", "swish", "silu",
               "leaky_relu", "elu", "softplus",
               "gelu", "gelu_tanh", "selu", "celu", "softsign", "exponential", "mish",
               "hard_sigmoid", "hard_silu", "hard_swish", "hard_tanh", "log_sigmoid",
               "squareplus", "sparse_plus", "sparse_sigmoid", "soft_shrink", "hard_shrink",
               "tanh_shrink")
_REQUIRED = {"dense": ("W",), "conv2d": ("W",), "depthwise": ("W",), "conv1d": ("W",),
             "conv2d_transpose": ("W",), "avgpool": ("pool",), "maxpool": ("pool",),
             "batchnorm": ("mean", "var"), "reshape": ("shape",), "act": ("fn",),
             "zeropad2d": ("pad",), "crop2d": ("crop",), "upsample2d": ("size",),
             "layerscale": ("gamma",)}
_ARITY = {"add": (2, None), "concat": (1, None), "multiply": (2, 2)}   # default (1, 1)
_REQUIRED["input"] = ("index",)
_ARITY["input"] = (0, 0)
_STAB = 1e-6        # fixed stabiliser used by every rule except epsilon
_CHUNK = 2_000_000  # max contribution entries held at once (memory bound)


def stab(v, eps):
    """Return ``v + eps * sign(v)`` with ``sign(0) := +1``."""
    return v + eps * np.where(v >= 0, 1.0, -1.0)


def _div(num, den):
    """``num / den`` with the result defined as 0 where ``den == 0``."""
    safe = np.where(den == 0, 1.0, den)
    return np.where(den == 0, 0.0, num / safe)


def _f64(v):
    return np.asarray(v, dtype=np.float64)


def _pair(v):
    """``3 -> (3, 3)``, ``(2, 1) -> (2, 1)``."""
    return (int(v), int(v)) if np.ndim(v) == 0 else tuple(int(u) for u in v)


def _int1(v):
    """Scalar of a 1-D layer parameter given as ``s`` or ``(s,)``."""
    return int(np.ravel(v)[0])


def _pads(v):
    """Keras-style 2-D padding/cropping -> ``((top, bottom), (left, right))``."""
    if np.ndim(v) == 0:
        return (int(v),) * 2, (int(v),) * 2
    h, w = v
    return tuple(_pair(h)), tuple(_pair(w))


def _act(name, z, alpha=None):
    """Elementwise activation: return ``(f(z), f'(z))`` (derivatives as in TF)."""
    if name == "linear":
        return z, np.ones_like(z)
    if name == "relu":
        return np.maximum(z, 0.0), (z > 0).astype(np.float64)
    if name == "relu6":
        return np.clip(z, 0.0, 6.0), ((z > 0) & (z < 6)).astype(np.float64)
    if name == "tanh":
        t = np.tanh(z)
        return t, 1.0 - t ** 2
    sig = 0.5 * (1.0 + np.tanh(0.5 * z))          # overflow-free logistic
    if name == "sigmoid":
        return sig, sig * (1.0 - sig)
    if name in ("swish", "silu"):
        return z * sig, sig + z * sig * (1.0 - sig)
    if name == "softplus":
        return np.logaddexp(0.0, z), sig
    if name == "leaky_relu":
        al = 0.3 if alpha is None else alpha
        return np.where(z > 0, z, al * z), np.where(z > 0, 1.0, al)
    if name == "elu":
        al = 1.0 if alpha is None else alpha
        e = np.expm1(np.minimum(z, 0.0))
        return np.where(z > 0, z, al * e), np.where(z > 0, 1.0, al * (e + 1.0))
    if name == "gelu":              # exact: z * Phi(z)
        Phi = 0.5 * (1.0 + np.vectorize(math.erf)(z / math.sqrt(2.0)))
        phi = np.exp(-0.5 * z ** 2) / math.sqrt(2.0 * math.pi)
        return z * Phi, Phi + z * phi
    if name == "gelu_tanh":         # gelu(approximate=True)
        c = math.sqrt(2.0 / math.pi)
        u = c * (z + 0.044715 * z ** 3)
        t = np.tanh(u)
        return 0.5 * z * (1.0 + t), 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t ** 2) * c * (1.0 + 3 * 0.044715 * z ** 2)
    if name == "selu":
        al, sc = 1.6732632423543772848170429916717, 1.0507009873554804934193349852946
        e = np.expm1(np.minimum(z, 0.0))
        return sc * np.where(z > 0, z, al * e), sc * np.where(z > 0, 1.0, al * (e + 1.0))
    if name == "celu":              # max(z, 0) + alpha * expm1(min(z, 0) / alpha)
        al = 1.0 if alpha is None else alpha
        e = np.expm1(np.minimum(z, 0.0) / al)
        return np.maximum(z, 0.0) + al * e, np.where(z > 0, 1.0, e + 1.0)
    if name == "softsign":
        return z / (1.0 + np.abs(z)), 1.0 / (1.0 + np.abs(z)) ** 2
    if name == "exponential":
        return np.exp(z), np.exp(z)
    if name == "mish":              # z * tanh(softplus(z))
        t = np.tanh(np.logaddexp(0.0, z))
        return z * t, t + z * (1.0 - t ** 2) * sig
    if name in ("hard_sigmoid", "hard_silu", "hard_swish"):
        # clip(slope * z + 1/2, 0, 1); slope ``alpha``: 1/6 (Keras 3, relu6(z + 3) / 6) by
        # default, 0.2 for tf-keras' hard_sigmoid
        sl = 1.0 / 6.0 if alpha is None else alpha
        u = sl * z + 0.5
        hs, dhs = np.clip(u, 0.0, 1.0), np.where((u > 0) & (u < 1), sl, 0.0)
        if name == "hard_sigmoid":
            return hs, dhs
        return z * hs, hs + z * dhs
    if name == "hard_tanh":
        return np.clip(z, -1.0, 1.0), ((z > -1) & (z < 1)).astype(np.float64)
    if name == "log_sigmoid":       # -softplus(-z)
        return -np.logaddexp(0.0, -z), 1.0 - sig
    if name == "squareplus":        # (z + sqrt(z^2 + b)) / 2, b = 4
        r = np.sqrt(z ** 2 + 4.0)
        return 0.5 * (z + r), 0.5 * (1.0 + z / r)
    if name == "sparse_plus":       # 0 | (z + 1)^2 / 4 | z  at  z <= -1 | -1 < z < 1 | z >= 1
        return (np.where(z <= -1, 0.0, np.where(z < 1, 0.25 * (z + 1) ** 2, z)),
                np.where(z <= -1, 0.0, np.where(z < 1, 0.5 * (z + 1), 1.0)))
    if name == "sparse_sigmoid":    # 0 | (z + 1) / 2 | 1
        return (np.where(z <= -1, 0.0, np.where(z >= 1, 1.0, 0.5 * (z + 1))),
                ((z > -1) & (z < 1)) * 0.5)
    if name in ("soft_shrink", "hard_shrink"):  # threshold ``alpha``, default 0.5
        th = 0.5 if alpha is None else alpha
        out = np.abs(z) > th
        if name == "hard_shrink":
            return np.where(out, z, 0.0), out.astype(np.float64)
        return np.where(z > th, z - th, np.where(z < -th, z + th, 0.0)), out.astype(np.float64)
    if name == "tanh_shrink":
        t = np.tanh(z)
        return z - t, t ** 2
    raise ValueError(f"unknown activation {name!r}; expected one of {ACTIVATIONS}")


def _act_layer(layer, z):
    """``(f(z), f'(z))`` of a standalone activation layer (``relu``, ``act``, ``layerscale``)."""
    if layer["type"] == "layerscale":   # y = z * gamma per channel (last axis)
        g = _f64(layer["gamma"])
        if g.shape != (z.shape[-1],):
            raise ValueError(f"layerscale: gamma shape {g.shape}, expected ({z.shape[-1]},)")
        return z * g, np.broadcast_to(g, z.shape)
    return _act(layer.get("fn", "relu"), z, layer.get("alpha"))


# ------------------------------------------------------------ window tables --

def _out_size(size, k, s, d, padding):
    """Return (output length, pad before) of one spatial axis, TF style."""
    ke = (k - 1) * d + 1
    if padding == "valid":
        return (size - ke) // s + 1, 0
    if padding == "same":
        out = -(-size // s)
        total = max((out - 1) * s + ke - size, 0)
        return out, total // 2          # TF puts the odd extra pad at the end
    if padding == "causal":             # left pad (k-1)*d, then valid
        return -(-size // s), ke - 1
    raise ValueError(f"unknown padding {padding!r}; expected 'valid' or 'same'")


def _combine(rows, cols, W):
    """Per-axis source tables (OH, kh), (OW, kw) (-1 = none) -> flat table (OH*OW, kh*kw)."""
    r, c = rows[:, None, :, None], cols[None, :, None, :]
    ok = (r >= 0) & (c >= 0)
    table = np.where(ok, r * W + c, -1)
    return table.reshape(rows.shape[0] * cols.shape[0], rows.shape[1] * cols.shape[1])


def _window_table(H, W, kh, kw, strides, dilation, padding):
    """Map (output position, kernel offset) to a flat spatial index ``r*W + c``.

    Returns ``(OH, OW)`` and an int table of shape ``(OH*OW, kh*kw)``, kernel
    offsets in row-major ``(ki, kj)`` order, ``-1`` marking padding.
    """
    axes = []
    for size, k, s, d in ((H, kh, strides[0], dilation[0]), (W, kw, strides[1], dilation[1])):
        out, pb = _out_size(size, k, s, d, padding)
        if out <= 0:
            raise ValueError("kernel larger than the (padded) input")
        src = np.arange(out)[:, None] * s - pb + np.arange(k)[None, :] * d
        axes.append(np.where((src >= 0) & (src < size), src, -1))
    return (axes[0].shape[0], axes[1].shape[0]), _combine(axes[0], axes[1], W)


def _transpose_table(H, W, kh, kw, strides, padding):
    """Window table of conv2d_transpose (the adjoint of a conv2d).

    Output position ``o`` receives input position ``p`` through kernel offset ``k``
    when ``o = p*s + k - pad_before``, where ``pad_before`` is that of the conv2d
    mapping the output size back to the input size.  Output size as Keras:
    valid ``in*s + max(k - s, 0)``, same ``in*s``.  ``-1`` where no input does.
    """
    if padding not in ("valid", "same"):
        raise ValueError(f"unknown padding {padding!r}; expected 'valid' or 'same'")
    axes = []
    for size, k, s in ((H, kh, strides[0]), (W, kw, strides[1])):
        out = size * s + (max(k - s, 0) if padding == "valid" else 0)
        back, pb = _out_size(out, k, s, 1, padding)      # the conv2d of the adjoint
        if back != size:
            raise ValueError("conv2d_transpose: inconsistent output size")
        num = np.arange(out)[:, None] + pb - np.arange(k)[None, :]     # = p * s
        ok = (num >= 0) & (num % s == 0) & (num // s < size)
        axes.append(np.where(ok, num // s, -1))
    return (axes[0].shape[0], axes[1].shape[0]), _combine(axes[0], axes[1], W)


def _expand_channels(sp, C):
    """Spatial table (P, k) -> entry table (P, k*C) in ``(offset, channel)`` order."""
    idx = np.where(sp[:, :, None] >= 0, sp[:, :, None] * C + np.arange(C), -1)
    return idx.reshape(sp.shape[0], -1)


# ------------------------------------------------------------ weighted view --

def _bias(layer, J):
    if layer.get("b") is None:
        return np.zeros(J)
    b = _f64(layer["b"])
    if b.shape != (J,):
        raise ValueError(f"{layer['type']}: bias shape {b.shape}, expected ({J},)")
    return b


def _check_channels(t, C, cin):
    if C != cin:
        raise ValueError(f"{t} expects {cin} input channels, got {C}")


def _weighted_view(layer, in_shapes):
    """Generic patch view of a weighted layer for one sample.

    Parameters
    ----------
    layer : dict
    in_shapes : list of tuple of int
        Input shapes without batch; entries are numbered over the concatenation
        of the flattened inputs.

    Returns
    -------
    idx : ndarray of int, shape (P, K)   flat input index per patch entry, -1 = pad
    Wm : ndarray, shape (K, J) or (P, K, J) (per-position weights)
    conn : ndarray of bool, shape (K, J)  patch entry k feeds output j
    b : ndarray, shape (J,)              zeros when the layer has no bias
    out_shape : tuple of int             output shape without batch
    """
    t = layer["type"]
    shape = tuple(in_shapes[0])
    if t != "add" and len(in_shapes) != 1:
        raise ValueError(f"{t} takes one input")
    if t == "dense":
        W = _f64(layer["W"])
        if shape != (W.shape[0],):
            raise ValueError(f"dense expects input shape ({W.shape[0]},), got {shape}")
        J = W.shape[1]
        return (np.arange(W.shape[0])[None, :], W, np.ones(W.shape, bool),
                _bias(layer, J), (J,))
    if t in ("conv2d", "depthwise", "conv1d"):
        W = _f64(layer["W"])
        if t == "conv1d":
            H, (Wd, C) = 1, shape                         # a 1 x L image ...
            W = W[None]                                   # ... and a (1, k, C, J) kernel
            strides = (1, _int1(layer.get("strides", 1)))
            dilation = (1, _int1(layer.get("dilation", 1)))
        else:
            H, Wd, C = shape
            strides = _pair(layer.get("strides", (1, 1)))
            dilation = _pair(layer.get("dilation", (1, 1)))
        padding = layer.get("padding", "valid")
        if padding == "causal" and t != "conv1d":
            raise ValueError("'causal' padding only exists for conv1d")
        kh, kw, cin, M = W.shape
        G = int(layer.get("groups", 1))
        if G != 1 and t == "depthwise":
            raise ValueError("depthwise: 'groups' only exists for conv2d and conv1d")
        if G < 1 or C % G or M % G:
            raise ValueError(f"{t}: groups={G} must divide the {C} input and {M} output channels")
        _check_channels(t, C, cin * G)
        out_hw, sp = _window_table(H, Wd, kh, kw, strides, dilation, padding)
        idx = _expand_channels(sp, C)
        if G != 1:                  # output channel j reads the input channels of group j // (M/G)
            cg, jg = C // G, M // G
            Wfull = np.zeros((kh, kw, C, M))
            for j in range(M):
                g = j // jg
                Wfull[:, :, g * cg:(g + 1) * cg, j] = W[:, :, :, j]
            J, Wm = M, Wfull.reshape(-1, M)
            conn = np.tile(np.arange(C)[:, None] // cg == np.arange(M)[None, :] // jg, (kh * kw, 1))
        elif t == "depthwise":      # output channel c*M + m reads input channel c only
            J = C * M
            Wfull = np.zeros((kh, kw, C, J))
            for c in range(C):
                Wfull[:, :, c, c * M:(c + 1) * M] = W[:, :, c, :]
            Wm = Wfull.reshape(-1, J)
            conn = np.tile(np.arange(C)[:, None] == np.arange(J)[None, :] // M, (kh * kw, 1))
        else:
            J, Wm = M, W.reshape(-1, M)
            conn = np.ones(Wm.shape, bool)
        out_shape = (out_hw[1], J) if t == "conv1d" else out_hw + (J,)
        return idx, Wm, conn, _bias(layer, J), out_shape
    if t == "conv2d_transpose":
        W = _f64(layer["W"])
        kh, kw, J, cin = W.shape
        H, Wd, C = shape
        _check_channels(t, C, cin)
        if _pair(layer.get("dilation", (1, 1))) != (1, 1):
            raise ValueError("conv2d_transpose: only dilation 1 is supported")
        out_hw, sp = _transpose_table(H, Wd, kh, kw, _pair(layer.get("strides", (1, 1))),
                                      layer.get("padding", "valid"))
        Wm = W.transpose(0, 1, 3, 2).reshape(-1, J)      # rows in (ki, kj, c_in) order
        return (_expand_channels(sp, C), Wm, np.ones(Wm.shape, bool), _bias(layer, J),
                out_hw + (J,))
    if t == "avgpool":
        H, Wd, C = shape
        ph, pw = _pair(layer["pool"])
        out_hw, sp = _window_table(H, Wd, ph, pw, _pair(layer.get("strides", (ph, pw))),
                                   (1, 1), layer.get("padding", "valid"))
        V = (sp >= 0).astype(np.float64)                 # real inputs of each window
        share = V / V.sum(1, keepdims=True)              # 1 / count, 0 at padding
        eye = np.eye(C)
        Wm = (share[:, :, None, None] * eye[None, None]).reshape(sp.shape[0], -1, C)
        conn = np.tile(eye.astype(bool), (ph * pw, 1))
        return _expand_channels(sp, C), Wm, conn, np.zeros(C), out_hw + (C,)
    if t == "global_avgpool":
        C, S = shape[-1], int(np.prod(shape[:-1]))
        conn = np.tile(np.eye(C, dtype=bool), (S, 1))    # rows in (position, c) order
        return np.arange(S * C)[None, :], conn / S, conn, np.zeros(C), (C,)
    if t == "batchnorm":
        C, D = shape[-1], int(np.prod(shape))
        gamma = _f64(layer["gamma"]) if layer.get("gamma") is not None else np.ones(C)
        beta = _f64(layer["beta"]) if layer.get("beta") is not None else np.zeros(C)
        mean, var = _f64(layer["mean"]), _f64(layer["var"])
        if any(v.shape != (C,) for v in (gamma, beta, mean, var)):
            raise ValueError(f"batchnorm parameters must have shape ({C},)")
        a = gamma / np.sqrt(var + layer.get("eps", 1e-3))
        return (np.arange(D).reshape(D // C, C), np.diag(a), np.eye(C, dtype=bool),
                beta - mean * a, shape)
    if t == "add":
        if any(tuple(s) != shape for s in in_shapes):
            raise ValueError(f"add: inputs must have equal shapes, got {in_shapes}")
        D, S = int(np.prod(shape)), len(in_shapes)
        idx = np.arange(D)[:, None] + D * np.arange(S)[None, :]   # entry k = input k
        w = _f64(layer["weights"]) if layer.get("weights") is not None else np.ones(S)
        if w.shape != (S,):
            raise ValueError(f"add: 'weights' must hold one number per input ({S}), got shape {w.shape}")
        return idx, w[:, None], np.ones((S, 1), bool), np.zeros(1), shape
    raise ValueError(f"unknown layer type {t!r}; expected one of {WEIGHTED}")


def _flat(ins):
    """Concatenation of the flattened inputs, shape ``(n, sum D_k)``."""
    return np.concatenate([a.reshape(a.shape[0], -1) for a in ins], axis=1)


def _split(flat, shapes):
    """Inverse of ``_flat``."""
    out, start = [], 0
    for s in shapes:
        D = int(np.prod(s))
        out.append(flat[:, start:start + D].reshape((flat.shape[0],) + tuple(s)))
        start += D
    return out


def _gather(a, idx):
    """Patch values ``(n, P, K)`` of a batch; padding entries read as 0."""
    flat = a.reshape(a.shape[0], -1)
    ext = np.concatenate([flat, np.zeros((flat.shape[0], 1))], axis=1)
    return ext[:, idx]                  # index -1 hits the appended zero column


def _scatter(Rp, idx, D):
    """Sum patch relevances ``(n, P, K)`` back onto ``D`` flat inputs (drop padding)."""
    n = Rp.shape[0]
    out = np.zeros((n, D + 1))          # column D collects padding messages
    tgt = np.where(idx < 0, D, idx)
    for s in range(n):
        np.add.at(out[s], tgt, Rp[s])   # add.at: entries repeat across patches
    return out[:, :D]


def _patch_matmul(X, Wm):
    """``z_j = sum_k X_k w_kj`` per position: X (n, P, K) -> (n, P, J)."""
    return X @ Wm if Wm.ndim == 2 else np.einsum("npk,pkj->npj", X, Wm)


def _weighted_forward(layer, ins):
    idx, Wm, _, b, out_shape = _weighted_view(layer, [a.shape[1:] for a in ins])
    z = _patch_matmul(_gather(_flat(ins), idx), Wm) + b
    return z.reshape((ins[0].shape[0],) + out_shape)


def _weighted_back(layer, ins, G):
    """Vector-Jacobian product of the linear part (G w.r.t. z)."""
    shapes = [a.shape[1:] for a in ins]
    idx, Wm, _, _, _ = _weighted_view(layer, shapes)
    Gr = G.reshape(G.shape[0], idx.shape[0], -1)
    Gp = Gr @ Wm.T if Wm.ndim == 2 else np.einsum("npj,pkj->npk", Gr, Wm)
    return _split(_scatter(Gp, idx, sum(int(np.prod(s)) for s in shapes)), shapes)


# ------------------------------------------------------------ routing layers --

def _maxpool(layer, a):
    """Max pooling forward; also return the flat spatial index of each max.

    Ties go to the first maximum in row-major window order (``argmax``), which
    matches TensorFlow's max-pool gradient; padding is ``-inf`` so never wins.
    """
    n, H, W, C = a.shape
    ph, pw = _pair(layer["pool"])
    out_hw, table = _window_table(H, W, ph, pw, _pair(layer.get("strides", (ph, pw))),
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


def _unbroadcast(G, shape):
    """Sum ``G`` over the axes along which an array of ``shape`` was broadcast."""
    while G.ndim > len(shape):
        G = G.sum(0)
    for ax, s in enumerate(shape):
        if s == 1 and G.shape[ax] != 1:
            G = G.sum(ax, keepdims=True)
    return G


def _route_forward(layer, ins):
    t, a = layer["type"], ins[0]
    if t == "maxpool":
        return _maxpool(layer, a)[0]
    if t == "global_maxpool":
        return a.reshape(a.shape[0], -1, a.shape[-1]).max(axis=1)
    if t == "flatten":
        return a.reshape(a.shape[0], -1)
    if t == "reshape":
        return a.reshape((a.shape[0],) + tuple(layer["shape"]))
    if t == "identity":
        return a
    if t == "concat":
        return np.concatenate(ins, axis=-1)
    if t == "zeropad2d":
        (pt, pb), (pl, pr) = _pads(layer["pad"])
        return np.pad(a, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    if t == "crop2d":
        (ct, cb), (cl, cr) = _pads(layer["crop"])
        return a[:, ct:a.shape[1] - cb, cl:a.shape[2] - cr, :]
    if t == "upsample2d":
        sh, sw = _pair(layer["size"])
        return np.repeat(np.repeat(a, sh, axis=1), sw, axis=2)
    if t == "multiply":
        return ins[0] * ins[1]
    raise ValueError(f"unknown layer type {t!r}; expected one of {LAYER_TYPES}")


def _route(layer, ins, G):
    """Backward step shared by LRP and gradient for weight-free layers.

    Returns one array per input (the true vector-Jacobian product).
    """
    if layer["type"] in SOURCES:      # a model input reads no activation
        return []
    t, a = layer["type"], ins[0]
    if t == "maxpool":
        return [_maxpool_back(layer, a, G)]
    if t == "global_maxpool":       # first maximum in row-major order wins
        n, C = a.shape[0], a.shape[-1]
        arg = np.argmax(a.reshape(n, -1, C), axis=1)         # (n, C)
        out = np.zeros((n, a[0].size // C, C))
        out[np.arange(n)[:, None], arg, np.arange(C)[None, :]] = G
        return [out.reshape(a.shape)]
    if t in ("flatten", "reshape"):
        return [G.reshape(a.shape)]
    if t == "identity":
        return [G]
    if t == "concat":
        ends = np.cumsum([x.shape[-1] for x in ins])[:-1]
        return np.split(G, ends, axis=-1)
    if t == "zeropad2d":
        (pt, _), (pl, _) = _pads(layer["pad"])
        return [G[:, pt:pt + a.shape[1], pl:pl + a.shape[2], :]]
    if t == "crop2d":
        (ct, cb), (cl, cr) = _pads(layer["crop"])
        out = np.zeros(a.shape)
        out[:, ct:a.shape[1] - cb, cl:a.shape[2] - cr, :] = G
        return [out]
    if t == "upsample2d":           # each input pixel collects its sh x sw copies
        sh, sw = _pair(layer["size"])
        n, H, W, C = a.shape
        return [G.reshape(n, H, sh, W, sw, C).sum(axis=(2, 4))]
    if t == "multiply":
        return [_unbroadcast(G * ins[1], ins[0].shape), _unbroadcast(G * ins[0], ins[1].shape)]
    raise ValueError(f"unknown layer type {t!r}; expected one of {LAYER_TYPES}")


# ------------------------------------------------------------------ network --

def _is_multi(x):
    """Whether ``x`` is several model inputs (a list or tuple of numpy arrays)."""
    return isinstance(x, (list, tuple)) and len(x) > 0 and all(isinstance(v, np.ndarray) for v in x)


def _model_inputs(x):
    """The model inputs as a list of float64 arrays (one for a single input)."""
    return [_f64(v) for v in x] if _is_multi(x) else [_f64(x)]


def _source(layer, xs):
    """Output of an ``input`` layer: model input ``index``."""
    k = layer["index"]
    if not isinstance(k, (int, np.integer)) or not 0 <= k < len(xs):
        raise ValueError(f"input layer: index {k!r} is not a model input 0..{len(xs) - 1}")
    return xs[int(k)]


def _per_input(layers, per, x):
    """Relevance (or gradient) of each model input: ``a_0``'s plus its input layers'."""
    out = [per[0]] + [np.zeros(np.shape(v)) for v in x[1:]]
    for m, layer in enumerate(layers):
        if layer["type"] in SOURCES:
            out[int(layer["index"])] = out[int(layer["index"])] + per[m + 1]
    return out


def _inputs(layer, m):
    """Validate layer ``m`` and return the activation indices it reads."""
    t = layer.get("type")
    if t not in LAYER_TYPES:
        raise ValueError(f"unknown layer type {t!r}; expected one of {LAYER_TYPES}")
    missing = [k for k in _REQUIRED.get(t, ()) if k not in layer]
    if missing:
        raise ValueError(f"layer type {t!r} (layer {m}) is missing key(s) {missing}")
    ks = list(layer.get("inputs", [] if t == "input" else [m]))
    lo, hi = _ARITY.get(t, (1, 1))
    if len(ks) < lo or (hi is not None and len(ks) > hi):
        raise ValueError(f"layer {m} ({t}) got {len(ks)} inputs; expects "
                         f"{lo if lo == hi else f'at least {lo}'}")
    for k in ks:
        if not isinstance(k, (int, np.integer)) or not 0 <= k <= m:
            raise ValueError(f"layer {m} ({t}): input {k!r} is not an activation index 0..{m}")
    if t == "multiply" and layer.get("signal", 0) not in (0, 1):
        raise ValueError("multiply: 'signal' must be 0 or 1 (position in 'inputs')")
    return [int(k) for k in ks]


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
        weighted layers, the input for a standalone activation, the output
        otherwise).
    """
    xs = _model_inputs(x)
    acts, pres = [xs[0]], []
    for m, layer in enumerate(layers):
        ins = [acts[k] for k in _inputs(layer, m)]
        t = layer["type"]
        if t in SOURCES:
            pre = a = _source(layer, xs)
        elif t in WEIGHTED:
            pre = _weighted_forward(layer, ins)
            a = _act(layer.get("act", "linear"), pre, layer.get("alpha"))[0]
        elif t in ACT_LAYERS:
            pre = ins[0]
            a = _act_layer(layer, pre)[0]
        else:
            pre = a = _route_forward(layer, ins)
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


def _messages(rule, X, V, W3, conn, b, R, L=None, Hb=None):
    """Relevance each patch entry receives, for a block of rows.

    Parameters
    ----------
    rule : dict
    X : ndarray, shape (m, K)   patch values (0 at padding)
    V : ndarray, shape (m, K)   1.0 where the entry is a real input, 0.0 at padding
    W3 : ndarray, shape (m, K, J) or (1, K, J)   weights of each row
    conn : ndarray of bool, shape (1, K, J)      entry k feeds output j
    b : ndarray, shape (J,)
    R : ndarray, shape (m, J)   relevance of the outputs
    L, Hb : ndarray, shape (m, K), optional   zbox bounds (0 at padding)

    Returns
    -------
    ndarray, shape (m, K)
        ``sum_j c_ij * R_j`` where ``c_ij`` is the rule's share of output ``j``.
    """
    name = rule["name"]
    Z = X[:, :, None] * W3                        # z_ij, shape (m, K, J)
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
        ones = V[:, :, None] * conn               # real, connected inputs count 1
        C = _div(ones, stab(ones.sum(1), _STAB)[:, None, :])
    elif name == "wsquare":
        W2 = V[:, :, None] * W3 ** 2
        C = _div(W2, stab(W2.sum(1), _STAB)[:, None, :])
    elif name == "zbox":
        Q = Z - L[:, :, None] * np.maximum(W3, 0) - Hb[:, :, None] * np.minimum(W3, 0)
        zb = Q.sum(1) + (b if rule.get("bias", True) else 0.0)   # "bias": False = textbook z^B
        C = _div(Q, stab(zb, _STAB)[:, None, :])
    elif name == "gamma":
        g = rule["gamma"]
        zj = (Z.sum(1) + b)[:, None, :]
        Cp = _div(Z + g * Zp, stab(zj + g * (Zp.sum(1) + bp)[:, None, :], _STAB))
        Cn = _div(Z + g * Zn, stab(zj + g * (Zn.sum(1) + bn)[:, None, :], _STAB))
        C = np.where(zj > 0, Cp, np.where(zj < 0, Cn, 0.0))
    else:
        raise ValueError(f"unknown LRP rule {name!r}; expected one of {RULES}")
    return np.einsum("mkj,mj->mk", C, R)


def _bounds(v, shapes):
    """zbox bound broadcast to every input entry, as a flat ``(1, sum D_k)`` row."""
    return np.concatenate([np.broadcast_to(_f64(v), s).reshape(-1) for s in shapes])[None]


def _lrp_weighted(layer, ins, R, rule):
    """Relevance at each input of a weighted layer from relevance at its output."""
    shapes = [a.shape[1:] for a in ins]
    idx, Wm, conn, b, _ = _weighted_view(layer, shapes)
    n, (P, K), J = ins[0].shape[0], idx.shape, conn.shape[1]
    X = _gather(_flat(ins), idx)
    V = (idx >= 0).astype(np.float64)
    L = Hb = None
    if rule["name"] == "zbox":      # bounds broadcast per input entry, 0 at padding
        L = _gather(_bounds(rule["low"], shapes), idx)[0]
        Hb = _gather(_bounds(rule["high"], shapes), idx)[0]
    Rr = R.reshape(n, P, J)
    Rp = np.zeros((n, P, K))
    step = max(1, _CHUNK // (K * J))                    # bounded memory per block
    for s in range(n):
        for p0 in range(0, P, step):
            sl = slice(p0, p0 + step)
            W3 = Wm[sl] if Wm.ndim == 3 else Wm[None]
            Rp[s, sl] = _messages(rule, X[s, sl], V[sl], W3, conn[None], b, Rr[s, sl],
                                  None if L is None else L[sl],
                                  None if Hb is None else Hb[sl])
    return _split(_scatter(Rp, idx, sum(int(np.prod(s)) for s in shapes)), shapes)


def _accumulate(store, k, v):
    store[k] = v if store[k] is None else store[k] + v


def lrp(layers, x, R_out, rule, first_rule=None, layer_rules=None, masks=None):
    """Layer-wise relevance propagation from the output back to the input.

    Parameters
    ----------
    layers : list of dict
    x : array_like, shape (n, ...)
    R_out : array_like
        Relevance of the last activation ``a_L``; any shape with the same size
        as ``a_L`` (e.g. ``(n, n_out)``), reshaped to ``a_L.shape``.
    rule : dict
        Rule for every weighted layer.
    first_rule : dict, optional
        Rule for the first weighted layer in ``layers`` (list order) instead of ``rule``.
    layer_rules : dict, optional
        ``{index in layers: rule}`` for single layers (wins over ``first_rule`` and ``rule``).
    masks : dict, optional
        ``{k: mask}``: once all of ``a_k``'s relevance has arrived, multiply it by ``mask``
        (broadcast to ``a_k``) before it is propagated further (Concept Relevance Propagation's
        conditions: ``mask`` is 1 on the kept channels).

    Returns
    -------
    R_in : ndarray
        Relevance of the input, shape of ``x``.
    per_layer : list of ndarray
        Relevance of ``a_0 .. a_L`` (summed over all layers reading it; zeros for
        an activation nothing reads); ``per_layer[0] is R_in`` and
        ``per_layer[-1]`` is ``R_out`` (reshaped).
    """
    _check_rule(rule)
    if first_rule is not None:
        _check_rule(first_rule)
    layer_rules = dict(layer_rules or {})
    for r in layer_rules.values():
        _check_rule(r)
    acts = forward(layers, x)
    first = next((k for k, l in enumerate(layers) if l["type"] in WEIGHTED), None)
    per = [None] * len(acts)
    per[-1] = np.asarray(R_out, dtype=np.float64).reshape(acts[-1].shape)
    for m in range(len(layers) - 1, -1, -1):
        layer, ks = layers[m], _inputs(layers[m], m)
        ins = [acts[k] for k in ks]
        if per[m + 1] is None:
            per[m + 1] = np.zeros(acts[m + 1].shape)
        if masks and (m + 1) in masks:  # every reader of a_{m+1} comes later: its relevance is complete
            per[m + 1] = per[m + 1] * np.asarray(masks[m + 1], np.float64)
        R, t = per[m + 1], layer["type"]
        if t in WEIGHTED:
            r = first_rule if (m == first and first_rule is not None) else rule
            r = layer_rules.get(m, r)
            back = _lrp_weighted(layer, ins, R, r)   # fused act passes R unchanged
        elif t in ACT_LAYERS:
            back = [R]                              # activations pass R unchanged
        elif t == "multiply":                       # all to the signal, none to the gate
            s = layer.get("signal", 0)
            back = [None, None]
            back[s] = _unbroadcast(R, ins[s].shape)
            back[1 - s] = np.zeros(ins[1 - s].shape)
        else:
            back = _route(layer, ins, R)
        for k, r_k in zip(ks, back):
            _accumulate(per, k, r_k)
    if per[0] is None:
        per[0] = np.zeros(acts[0].shape)
    return (_per_input(layers, per, x) if _is_multi(x) else per[0]), per


def gradient(layers, x, G_out, per_layer=False):
    """Plain vector-Jacobian product ``G_out^T d a_L / d x``.

    Parameters
    ----------
    layers : list of dict
    x : array_like, shape (n, ...)
    G_out : array_like
        Cotangent of ``a_L`` (any shape with the size of ``a_L``).
    per_layer : bool
        Also return the cotangent of every activation ``a_0 .. a_L``.

    Returns
    -------
    ndarray
        Gradient with the shape of ``x``.
    list of ndarray, only if ``per_layer``
    """
    acts, pres = forward(layers, x, return_pre=True)
    per = [None] * len(acts)
    per[-1] = np.asarray(G_out, dtype=np.float64).reshape(acts[-1].shape)
    for m in range(len(layers) - 1, -1, -1):
        layer, ks = layers[m], _inputs(layers[m], m)
        ins = [acts[k] for k in ks]
        if per[m + 1] is None:
            per[m + 1] = np.zeros(acts[m + 1].shape)
        G, t = per[m + 1], layer["type"]
        if t in WEIGHTED:
            G = G * _act(layer.get("act", "linear"), pres[m], layer.get("alpha"))[1]
            back = _weighted_back(layer, ins, G)
        elif t in ACT_LAYERS:
            back = [G * _act_layer(layer, pres[m])[1]]
        else:
            back = _route(layer, ins, G)
        for k, g_k in zip(ks, back):
            _accumulate(per, k, g_k)
    if per[0] is None:
        per[0] = np.zeros(acts[0].shape)
    g = _per_input(layers, per, x) if _is_multi(x) else per[0]
    return (g, per) if per_layer else g
