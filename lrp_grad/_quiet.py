"""Import TensorFlow without its C++ start-up log (no TensorFlow import at module level)."""
from __future__ import annotations

import os
import sys

__all__ = ["quiet_tensorflow"]


def quiet_tensorflow() -> None:
    """Import TensorFlow (and initialise its devices) with its C++ start-up log silenced.

    ``TF_CPP_MIN_LOG_LEVEL`` does not cover the lines absl and the CUDA stubs print while
    TensorFlow loads ("All log messages before absl::InitializeLog() ...", "Could not find cuda
    drivers", "Unable to register cuDNN factory"), so standard error is pointed at /dev/null for
    that moment only. Call it before the first ``import keras`` / ``import tensorflow`` of a script
    or notebook; it does nothing once TensorFlow is loaded. The command line calls it too.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if "tensorflow" in sys.modules:
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no file descriptor 2 (some embedded interpreters)
        import tensorflow  # noqa: F401

        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            import tensorflow as tf

            tf.get_logger().setLevel("ERROR")
            tf.constant(0)  # device initialisation logs too
    finally:
        os.dup2(saved, 2)
        os.close(saved)
