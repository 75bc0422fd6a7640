"""Slow float64 numpy reference for the transformer rules, written from the papers' equations.

One sample at a time, plain loops over heads, no TensorFlow. Notation: ``stab(v) = v + eps *
sign(v)`` with ``sign(0) = +1``.

- Linear layer ``z = x W + b`` (epsilon rule, Bach et al. 2015):
  ``R_x[i] = sum_j x[i] W[i, j] / stab(z[j]) R[j]``.
- Normalisation with its scale held constant (AttnLRP, Achtibat et al. 2024, Sec. 3.3.2; CP-LRP,
  Ali et al. 2022): ``y = (x - mean x) * g / std + beta`` is the linear map
  ``y = M x + beta`` with ``M = diag(g / std) (I - 1/N)``, under the epsilon rule.
- Product of two signals ``z[j] = sum_k a[k] b[k]`` (uniform rule, Achtibat et al. 2024, Prop. 3.3):
  each term ``a[k] b[k]`` gets ``term / stab(z[j]) R[j]``, split half to ``a[k]``, half to ``b[k]``.
  CP-LRP (Ali et al. 2022): the attention weights are constant, ``v`` gets the whole term.
- Softmax (Achtibat et al. 2024, Prop. 3.1): ``R_x[i] = x[i] (R[i] - s[i] sum_j R[j])``.
"""
from __future__ import annotations

import numpy as np

EPS = 1e-6


def stab(v, eps=EPS):
    return v + eps * np.where(v >= 0, 1.0, -1.0)


def linear(x, W, b, R, eps=EPS):
    """Epsilon rule of ``z = x @ W + b`` for ``x`` of shape ``(..., I)``: ``(z, R_x)``."""
    x = np.asarray(x, np.float64)
    z = x @ W + (0 if b is None else b)
    R_x = np.zeros_like(x)
    for idx in np.ndindex(*x.shape[:-1]):
        for i in range(x.shape[-1]):
            for j in range(W.shape[1]):
                R_x[idx + (i,)] += x[idx + (i,)] * W[i, j] / stab(z[idx + (j,)], eps) * R[idx + (j,)]
    return z, R_x


def layer_norm(x, gamma, beta, ln_eps, R, eps=EPS):
    """LayerNorm over the last axis with its scale held constant, as the explicit linear map M."""
    x = np.asarray(x, np.float64)
    N = x.shape[-1]
    y = np.zeros_like(x)
    R_x = np.zeros_like(x)
    for idx in np.ndindex(*x.shape[:-1]):
        v = x[idx]
        std = np.sqrt(v.var() + ln_eps)
        M = np.diag(gamma / std) @ (np.eye(N) - np.ones((N, N)) / N)
        y[idx] = M @ v + beta
        for i in range(N):
            R_x[idx + (i,)] = sum(M[j, i] * v[i] / stab(y[idx + (j,)], eps) * R[idx + (j,)] for j in range(N))
    return y, R_x


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def softmax_rule(x, R):
    s = softmax(x)
    return x * (R - s * R.sum(-1, keepdims=True))


def attention(xq, xkv, w, R_out, rule="attnlrp", eps=EPS):
    """Self- or cross-attention of one sample, ``xq (T, D)``, ``xkv (S, D)``, with Keras'
    ``MultiHeadAttention`` weights ``w`` (``Wq (D, H, K)``, ``bq (H, K)``, ... ``Wo (H, V, D)``,
    ``bo (D,)``). Returns ``(out (T, D), R_xq, R_xkv)`` under ``rule`` ('attnlrp' or 'cplrp') for
    the attention and epsilon for the four projections."""
    T, D = xq.shape
    S = xkv.shape[0]
    H, K = w["bq"].shape
    V = w["bv"].shape[1]
    flat = lambda W: W.reshape(W.shape[0], -1)  # noqa: E731
    q, Rq_fn = _proj(xq, flat(w["Wq"]), w["bq"].ravel(), eps)
    k, Rk_fn = _proj(xkv, flat(w["Wk"]), w["bk"].ravel(), eps)
    v, Rv_fn = _proj(xkv, flat(w["Wv"]), w["bv"].ravel(), eps)
    q, k, v = q.reshape(T, H, K), k.reshape(S, H, K), v.reshape(S, H, V)
    scale = 1.0 / np.sqrt(K)
    o = np.zeros((T, H, V))
    A = np.zeros((H, T, S))
    scores = np.zeros((H, T, S))
    for h in range(H):
        scores[h] = (q[:, h] * scale) @ k[:, h].T
        A[h] = softmax(scores[h])
        o[:, h] = A[h] @ v[:, h]
    out, R_o = linear(o.reshape(T, H * V), w["Wo"].reshape(H * V, D), w["bo"], R_out, eps)
    R_o = R_o.reshape(T, H, V)
    R_q, R_k, R_v = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
    for h in range(H):
        R_A = np.zeros((T, S))
        for t in range(T):
            for c in range(V):
                den = stab(o[t, h, c], eps)
                for s in range(S):
                    term = A[h, t, s] * v[s, h, c] / den * R_o[t, h, c]
                    if rule == "cplrp":
                        R_v[s, h, c] += term
                    else:
                        R_A[t, s] += term / 2
                        R_v[s, h, c] += term / 2
        if rule == "cplrp":
            continue
        R_scores = softmax_rule(scores[h], R_A)
        for t in range(T):
            for s in range(S):
                den = stab(scores[h, t, s], eps)
                for c in range(K):
                    term = q[t, h, c] * scale * k[s, h, c] / den * R_scores[t, s]
                    R_q[t, h, c] += term / 2
                    R_k[s, h, c] += term / 2
    R_xq = Rq_fn(R_q.reshape(T, H * K))
    R_xkv = Rk_fn(R_k.reshape(S, H * K)) + Rv_fn(R_v.reshape(S, H * V))
    return out, R_xq, R_xkv


def _proj(x, W, b, eps):
    z = x @ W + b
    return z, lambda R: linear(x, W, b, R, eps)[1]


def block_forward_lrp(x, p, R_out, rule="attnlrp", eps=EPS):
    """A pre-norm transformer block ``x + MHA(LN(x))`` then ``+ MLP(LN(.))`` (ReLU MLP: its
    activation passes relevance through), one sample ``x (T, D)``; the two ``+`` under epsilon.
    Returns ``(out, R_x)``. ``p``: ``ln1 (gamma, beta, eps)``, ``mha`` (see :func:`attention`),
    ``ln2``, ``W1, b1, W2, b2``."""
    # forward
    h1, _ = layer_norm(x, *p["ln1"], np.zeros_like(x), eps)
    a, _, _ = attention(h1, h1, p["mha"], np.zeros_like(x), rule, eps)
    x2 = x + a
    h2, _ = layer_norm(x2, *p["ln2"], np.zeros_like(x), eps)
    u = np.maximum(h2 @ p["W1"] + p["b1"], 0)
    m = u @ p["W2"] + p["b2"]
    out = x2 + m
    # backward
    R_x2 = x2 / stab(out, eps) * R_out
    R_m = m / stab(out, eps) * R_out
    _, R_u = linear(u, p["W2"], p["b2"], R_m, eps)
    _, R_h2 = linear(h2, p["W1"], p["b1"], R_u, eps)  # ReLU passes relevance through
    _, R_x2_ln = layer_norm(x2, *p["ln2"], R_h2, eps)
    R_x2 = R_x2 + R_x2_ln
    R_x = x / stab(x2, eps) * R_x2
    R_a = a / stab(x2, eps) * R_x2
    _, R_h1q, R_h1kv = attention(h1, h1, p["mha"], R_a, rule, eps)
    _, R_x_ln = layer_norm(x, *p["ln1"], R_h1q + R_h1kv, eps)
    return out, R_x + R_x_ln
