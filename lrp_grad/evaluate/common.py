"""Helpers every faithfulness measure shares: class probabilities, relevance per pixel, labels."""
from __future__ import annotations

import numpy as np

__all__ = ["probabilities", "pixel_relevance"]


def _has_probability_output(model) -> bool:
    from ..frontends import activation_name, is_layer

    last = model.layers[-1]
    if is_layer(last, "Softmax"):
        return True
    return activation_name(getattr(last, "activation", None)) in ("softmax", "sigmoid")


def probabilities(model, x, batch_size: int = 256) -> np.ndarray:
    """Class probabilities: the model's output if it ends in softmax (or sigmoid: independent
    per-class probabilities), else softmax of the logits."""
    outs = [np.asarray(model(x[i:i + batch_size], training=False)) for i in range(0, len(x), batch_size)]
    out = np.concatenate(outs).astype(np.float64)
    if _has_probability_output(model):
        return out
    out = np.exp(out - out.max(1, keepdims=True))
    return out / out.sum(1, keepdims=True)


def pixel_relevance(relevance) -> np.ndarray:
    """``(n, H, W)`` relevance per pixel: summed over the channel axis of ``(n, H, W, C)`` maps."""
    r = np.asarray(relevance, dtype=np.float64)
    if r.ndim == 4:
        return r.sum(-1)
    if r.ndim == 3:
        return r
    raise ValueError(f"relevance must have shape (n, H, W) or (n, H, W, C), got {r.shape}.")


def _labels(y, n: int, where: str) -> np.ndarray:
    """``y`` as int64 class indices of shape ``(n,)``: any integer dtype (uint8 from IDX files),
    integral floats, or one-hot rows; anything else is refused with a message."""
    a = np.asarray(y)
    if a.ndim == 2 and a.shape[0] == n and a.shape[1] > 1 and np.all((a == 0) | (a == 1)) and np.all(a.sum(1) == 1):
        a = a.argmax(1)
    if a.shape != (n,):
        raise ValueError(f"{where}: y has shape {a.shape}; pass one class index per image, shape ({n},).")
    if a.dtype == bool or not (np.issubdtype(a.dtype, np.integer) or
                               (np.issubdtype(a.dtype, np.floating) and np.all(a == np.round(a)))):
        raise ValueError(f"{where}: y must hold integer class indices, got dtype {a.dtype} ({a[:4]}).")
    a = a.astype(np.int64)
    if a.size and a.min() < 0:
        raise ValueError(f"{where}: y[{int(np.argmin(a))}] = {int(a.min())} is not a class index (>= 0).")
    return a


def _broadcast_finite(b, shape, shape_error: str, nonfinite_error: str) -> np.ndarray:
    """``b`` broadcast to ``shape`` and checked for NaN/inf; ``ValueError(shape_error)`` when it does
    not broadcast, ``ValueError(nonfinite_error)`` when it is not finite (each caller words its own)."""
    try:
        b = np.broadcast_to(b, shape)
    except ValueError:
        raise ValueError(shape_error) from None
    if not np.all(np.isfinite(b)):
        raise ValueError(nonfinite_error)
    return b
