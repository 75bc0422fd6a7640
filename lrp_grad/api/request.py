"""Checks one explanation request (inputs, targets, masks, initial relevance) against the model's signature."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from ..errors import InvalidInputError, UnsupportedModelError
from .targets import INITIAL_MODES, TargetChecks

__all__ = ["Signature", "INITIAL_MODES", "check_batch_size", "explained_dtype"]


def check_batch_size(batch_size):
    """Refuse a ``batch_size`` that is not a positive int (Python or numpy) or ``None``; return it
    as a Python int (or ``None``)."""
    if batch_size is None:
        return None
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise InvalidInputError(f"batch_size must be a positive int or None, got {batch_size!r}.")
    return int(batch_size)


def explained_dtype(name: str) -> np.dtype:
    """float32/float64 inputs keep their dtype; integer and half-precision inputs are explained in float32."""
    dtype = np.dtype(name) if name != "bfloat16" else None
    return dtype if dtype in (np.dtype(np.float32), np.dtype(np.float64)) else np.dtype(np.float32)


@dataclass(frozen=True)
class Signature(TargetChecks):
    """What the explained model takes and gives, and the checks of a request against it (the
    target checks come from :class:`~lrp_grad.api.targets.TargetChecks`).

    Every check raises an :class:`~lrp_grad.LRPError` naming the offending argument and the fix;
    what passes comes back as numpy arrays of the explained dtype.

    Attributes
    ----------
    model_name : str
        The model's name, for messages.
    input_names, input_shapes, dtypes : tuple
        Per model input: its name, its shape without the batch axis, the dtype it is explained in.
    output_name : str
        The explained output (an output layer's or a hidden layer's name).
    output_shape : tuple
        Its shape without the batch axis.
    n_classes : int or None
        Size of its last axis, or ``None`` for one number per sample.
    model_output : bool
        Whether it is one of the model's outputs (not a hidden layer).
    """

    model_name: str
    input_names: tuple
    input_shapes: tuple
    dtypes: tuple
    output_name: str
    output_shape: tuple
    n_classes: int | None
    model_output: bool

    @classmethod
    def of(cls, model_name: str, graph) -> "Signature":
        """The signature of a planned graph (:class:`~lrp_grad.frontends.Graph`)."""
        return cls(model_name=model_name, input_names=tuple(graph.input_names),
                   input_shapes=tuple(tuple(s) for s in graph.input_shapes),
                   dtypes=tuple(explained_dtype(d) for d in graph.dtypes), output_name=graph.output_name,
                   output_shape=tuple(graph.output_shape), n_classes=graph.n_outputs,
                   model_output=graph.output_name in graph.output_names)

    @property
    def n_inputs(self) -> int:
        return len(self.input_names)

    @property
    def input_shape(self) -> tuple:
        return self.input_shapes[0]

    @property
    def dtype(self) -> np.dtype:
        return self.dtypes[0]

    @property
    def is_classifier(self) -> bool:
        """Whether the explained output is ``(batch, classes)`` (class targets, a predicted class)."""
        return len(self.output_shape) == 1 and self.n_classes is not None

    def out_shown(self) -> str:
        return str((None,) + self.output_shape)

    def require_classifier(self, what: str):
        """Refuse single-input classifier features for other models, naming what is not supported."""
        if self.n_inputs != 1:
            raise UnsupportedModelError(
                f"{what} explains single-input models; model {self.model_name!r} has {self.n_inputs} inputs "
                f"({', '.join(map(repr, self.input_names))}). Call the Explainer on lists of batches instead.")
        if not self.is_classifier:
            raise UnsupportedModelError(
                f"{what} explains classifiers with output (batch, classes); the output {self.output_name!r} "
                f"has shape {(None,) + self.output_shape}. Call the Explainer with target= a mask instead.")

    # -----------------------------------------------------------------------------------------
    # Inputs

    def inputs(self, x):
        """``(list of arrays, structure)``: one checked array per model input; ``structure`` says
        how to return the relevance (``None``: a single array, ``'list'``, or the dict's keys)."""
        if self.n_inputs == 1:
            if isinstance(x, Mapping):
                if set(x) != {self.input_names[0]}:
                    raise InvalidInputError(
                        f"x is a dict with keys {sorted(map(str, x))}; model {self.model_name!r} has one input, "
                        f"{self.input_names[0]!r}.")
                return [self.array(x[self.input_names[0]])], list(x)
            if (isinstance(x, (list, tuple)) and len(x) == 1 and not np.isscalar(x[0])
                    and np.ndim(x[0]) == len(self.input_shape) + 1):
                return [self.array(x[0])], "list"
            return [self.array(x)], None
        names = ", ".join(map(repr, self.input_names))
        if isinstance(x, Mapping):
            missing = [k for k in self.input_names if k not in x]
            extra = [k for k in x if k not in self.input_names]
            if missing or extra:
                raise InvalidInputError(
                    f"x is a dict with keys {sorted(map(str, x))}; model {self.model_name!r} has inputs {names}"
                    + (f" (missing {missing})" if missing else "") + (f" (unknown {extra})" if extra else "") + ".")
            xs, structure = [x[k] for k in self.input_names], list(self.input_names)
        elif isinstance(x, (list, tuple)):
            if len(x) != self.n_inputs:
                raise InvalidInputError(
                    f"x is a list of {len(x)} arrays; model {self.model_name!r} has {self.n_inputs} inputs ({names}): "
                    "pass one batch per input, in that order, or a dict by input name.")
            xs, structure = list(x), "list"
        else:
            raise InvalidInputError(
                f"model {self.model_name!r} has {self.n_inputs} inputs ({names}); pass x as a list of one batch "
                "per input, in that order, or a dict by input name.")
        checked = [self.array(v, i) for i, v in enumerate(xs)]
        sizes = {len(v) for v in checked}
        if len(sizes) != 1:
            shown = ", ".join(f"{n!r}: {len(v)}" for n, v in zip(self.input_names, checked))
            raise InvalidInputError(f"the inputs' batches differ in length ({shown}); every input needs one row "
                                    "per sample.")
        return checked, structure

    def pack(self, parts, structure):
        """The relevance in the structure ``x`` was given in."""
        if structure is None:
            return parts[0]
        if structure == "list":
            return list(parts)
        return {k: parts[self.input_names.index(k)] for k in structure}

    def unpack(self, R, structure) -> list:
        """The inverse of :meth:`pack`: one array per model input."""
        if structure is None:
            return [R]
        if structure == "list":
            return list(R)
        return [R[k] for k in self.input_names]

    def array(self, x, index: int = 0) -> np.ndarray:
        """One input batch as a finite array of the explained dtype, shaped like the model input."""
        shape_of_input = self.input_shapes[index]
        dtype = self.dtypes[index]
        what = "x" if self.n_inputs == 1 else f"input {self.input_names[index]!r}"
        if isinstance(x, tf.Tensor):
            x = x.numpy()
        try:
            x = np.asarray(x)
        except (ValueError, TypeError) as e:
            raise InvalidInputError(f"{what} could not be converted to an array: {e}") from None
        if x.dtype == bool or not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
            raise InvalidInputError(
                f"{what} has dtype {x.dtype}; it must hold real numbers (float or integer images), "
                f"it is cast to the model's {dtype}."
            )
        want = (None,) + tuple(shape_of_input)
        shown = "(batch, " + ", ".join("any" if d is None else str(d) for d in shape_of_input) + ")"
        if x.ndim == len(want) - 1 and all(d is None or d == s for d, s in zip(shape_of_input, x.shape)):
            raise InvalidInputError(
                f"{what} has shape {x.shape} but model {self.model_name!r} expects a batch {shown}; "
                f"for a single sample pass {'x' if self.n_inputs == 1 else 'it'}[None]."
            )
        if x.ndim != len(want):
            hint = _channels_first_hint((1,) + x.shape, shape_of_input, what) if x.ndim == len(want) - 1 else ""
            if hint:  # one channels-first sample
                order = (*range(1, x.ndim), 0)
                hint = (" It looks like one channels-first sample (channels, ...); the model takes a channels-last "
                        f"batch: pass np.transpose(x, {order})[None].")
            raise InvalidInputError(
                f"{what} has shape {x.shape} (rank {x.ndim}) but model {self.model_name!r} expects rank "
                f"{len(want)}: {shown}.{hint}"
            )
        for axis, (d, s) in enumerate(zip(want, x.shape)):
            if d is not None and d != s:
                raise InvalidInputError(
                    f"{what} has shape {x.shape} but model {self.model_name!r} expects {shown}: "
                    f"axis {axis} is {s}, expected {d}.{_channels_first_hint(x.shape, shape_of_input, what)}"
                )
        if x.shape[0] == 0:
            raise InvalidInputError(f"{what} is an empty batch (shape[0] == 0); pass at least one sample.")
        wide = x
        with np.errstate(over="ignore"):  # an overflow is reported below, by index
            x = x.astype(dtype, copy=False)
        if not np.all(np.isfinite(x)):
            _check_overflow(wide, x, dtype, what)
            bad = np.argwhere(~np.isfinite(x))[0]
            raise InvalidInputError(
                f"{what} contains NaN or Inf (first at index {tuple(int(i) for i in bad)}, value "
                f"{x[tuple(bad)]}); relevance of non-finite inputs is undefined. Clean the data first."
            )
        return x


def _channels_first_hint(got, expected, what) -> str:
    """The fix for a channels-first batch ``(n, C, *spatial)`` given to a channels-last model
    ``(*spatial, C)`` (PyTorch's layout), or ``''``."""
    got, expected = tuple(got), tuple(expected)
    if len(got) != len(expected) + 1 or len(expected) < 2:
        return ""
    spatial, channels = expected[:-1], expected[-1]
    if got[1] == channels and all(d is None or d == s for d, s in zip(spatial, got[2:])):
        order = (0,) + tuple(range(2, len(got))) + (1,)
        return (f" It looks channels-first (batch, channels, ...); the model takes channels last: pass "
                f"np.transpose(x, {order}).")
    return ""


def _check_overflow(wide, x, dtype, what) -> None:
    """A finite value that became Inf when cast to the model's dtype: say it overflows (not NaN/Inf)."""
    if not np.issubdtype(wide.dtype, np.floating) and not np.issubdtype(wide.dtype, np.integer):
        return
    over = np.isfinite(wide) & ~np.isfinite(x)
    if np.any(over):
        at = tuple(int(i) for i in np.argwhere(over)[0])
        raise InvalidInputError(
            f"{what} has a value that overflows the model's {np.dtype(dtype).name} (first at index {at}, value "
            f"{wide[at]:.4g}; the largest {np.dtype(dtype).name} is {np.finfo(dtype).max:.4g}); rescale the data "
            "(e.g. divide by its maximum) before explaining it."
        )
