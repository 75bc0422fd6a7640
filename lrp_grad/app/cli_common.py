"""What the ``lrp-grad`` subcommands share: argument types, rule parsing and model loading.

Imports no TensorFlow at import time, so arguments are checked before it loads."""
from __future__ import annotations

import argparse

__all__ = ["parse_rule", "PRESET_NAMES"]


def _int_at_least(minimum: int, what: str, hint: str = ""):
    """An argparse type: an integer >= ``minimum``, named ``what`` in its messages."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what} (an integer >= {minimum})") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is not {what} (an integer >= {minimum}{hint})")
        return value

    return parse


_positive_int = _int_at_least(1, "a positive count")
_class_index = _int_at_least(0, "a class index", "; omit --target for the predicted class")


def _scale(text: str) -> float:
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value == 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite, non-zero number (e.g. 1/255 = 0.00392)")
    return value


PRESET_NAMES = ("epsilon_plus", "epsilon_plus_flat", "epsilon_alpha2_beta1", "epsilon_gamma_box", "seed_ab")


def parse_rule(text: str):
    """A rule or preset from the command line: a preset name (``epsilon_plus_flat``, ``seed_ab``,
    ...), ``z``, ``zplus``, ``flat``, ``wsquare``, ``epsilon[:EPS]``, ``alphabeta:A,B``,
    ``gamma[:G]`` or ``zbox:LOW,HIGH``. Imports no TensorFlow (the rules are plain values)."""
    from ..core import rules

    name, _, arg = text.partition(":")
    simple = {"z": rules.Z, "zplus": rules.ZPlus, "flat": rules.Flat, "wsquare": rules.WSquare}
    try:
        values = [float(v) for v in arg.split(",")] if arg else []
        if name in simple and not values:
            return simple[name]()
        if name == "epsilon":
            return rules.Epsilon(*values)
        if name == "alphabeta" and len(values) == 2:
            return rules.AlphaBeta(*values)
        if name == "gamma":
            return rules.Gamma(*values)
        if name == "zbox" and len(values) == 2:
            return rules.ZBox(*values)
        if name in PRESET_NAMES and not values:
            return name
    except (TypeError, ValueError) as e:
        raise argparse.ArgumentTypeError(f"--rule {text!r}: {e}") from None
    raise argparse.ArgumentTypeError(
        f"--rule {text!r} is not known; use a preset ({', '.join(PRESET_NAMES)}) or z, zplus, flat, wsquare, "
        "epsilon[:EPS], alphabeta:A,B, gamma[:G], zbox:LOW,HIGH."
    )


def _load_model(path, command):
    from ..errors import LRPError
    from ..frontends import load_model

    try:
        return load_model(path)
    except LRPError as e:
        raise SystemExit(f"lrp-grad {command}: {e}") from None


def _image_model(path, command):
    """The model file as a single-input, single-output image model and its input shape (H, W, C)."""
    model = _load_model(path, command)
    if len(model.inputs) != 1:
        names = ", ".join(repr(getattr(t, "name", "?")) for t in model.inputs)
        raise SystemExit(f"lrp-grad {command}: the model has {len(model.inputs)} inputs ({names}); the command line "
                         "explains single-input image models. Use lrp_grad.explain(model, [x1, x2, ...]) in Python.")
    if len(model.outputs) != 1:
        raise SystemExit(f"lrp-grad {command}: the model has {len(model.outputs)} outputs; the command line explains "
                         "single-output classifiers. Use lrp_grad.Explainer(model, output=...) in Python.")
    shape = tuple(model.input_shape[1:])
    if len(shape) != 3 or None in shape:
        raise SystemExit(f"lrp-grad {command}: the model input {model.input_shape} is not a fixed-size image (H, W, C).")
    return model, shape
