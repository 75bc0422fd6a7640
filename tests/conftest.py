"""Shared fixtures: quiet TensorFlow, deterministic seeds, the independent reference folder."""
import os
import pathlib

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

REFERENCE = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "reference"


@pytest.fixture(autouse=True)
def _seed():
    np.random.seed(0)
    tf.random.set_seed(0)


@pytest.fixture(scope="session")
def reference():
    """The independent reference maps (skips when ../shared/reference is absent)."""
    path = REFERENCE / "reference.npz"
    if not path.exists():
        pytest.skip(f"independent reference data not found at {path} (only in the project workspace)")
    return np.load(path)


@pytest.fixture(params=["keras", "tf_keras"], ids=["keras3", "tf_keras"])
def K(request):
    """The Keras package a model-level test builds its models with: Keras 3 and tf-keras."""
    import importlib

    return importlib.import_module(request.param)
