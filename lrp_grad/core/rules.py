"""LRP rules as small, validated, immutable values (no TensorFlow, no state).

A rule only *names* a propagation and holds its parameters; the arithmetic lives in
:mod:`lrp_grad.propagate`. Notation used in the docstrings, for one linear layer
``z_j = sum_i x_i w_ij + b_j``: contributions ``z_ij = x_i w_ij``, upper-layer relevance ``R_j``,
and ``stab(v, e) = v + e * sign(v)`` with ``sign(0) = +1``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import InvalidRuleError

__all__ = ["Rule", "Z", "Epsilon", "AlphaBeta", "ZPlus", "Flat", "WSquare", "ZBox", "Gamma", "AttnLRP", "CPLRP",
           "AttentionRule"]

#: Stabiliser added to denominators of rules whose parameters are not an epsilon.
STABILIZER = 1e-6


def _real(rule: str, name: str, value: Any) -> float:
    """Return ``value`` as a finite float or raise an InvalidRuleError naming the parameter."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise InvalidRuleError(
            f"{rule}: {name} must be a real number, got {value!r} ({type(value).__name__})."
        )
    value = float(value)
    if not math.isfinite(value):
        raise InvalidRuleError(f"{rule}: {name} must be finite, got {value!r}.")
    return value


class Rule:
    """Base class of all rules. Subclasses are frozen dataclasses."""

    #: Whether the rule's relevance only depends on the weights (not on the input values).
    input_independent = False
    #: Whether the relevance it gives an input is that input times something (so zero where the
    #: input is zero): lets the planner fuse the ReLU below such a layer.
    scales_with_input = False
    #: Whether it is a rule of the ``'attention'`` family (products of two signals, softmax)
    #: rather than of the linear layers.
    attention = False


@dataclass(frozen=True)
class Z(Rule):
    """LRP-0 (Bach et al. 2015, eq. 3): ``R_i = sum_j z_ij / z_j R_j``.

    Terms with ``z_j == 0`` contribute nothing (instead of NaN). On ReLU networks with the bias
    included in ``z`` this equals gradient x input exactly.
    """

    scales_with_input = True


@dataclass(frozen=True)
class Epsilon(Rule):
    """LRP-epsilon (Bach et al. 2015, eq. 58): ``R_i = sum_j z_ij / stab(z_j, epsilon) R_j``.

    Parameters
    ----------
    epsilon : float
        Stabiliser, strictly positive. Use :class:`Z` for LRP-0.
    bias : bool
        Whether the bias is part of the denominator ``z_j``. ``False`` leaves the bias out of the
        denominator only (the forward pass is unchanged), so that relevance is conserved exactly
        as ``epsilon -> 0``.
    """

    scales_with_input = True

    epsilon: float = 1e-6
    bias: bool = True

    def __post_init__(self):
        eps = _real("Epsilon", "epsilon", self.epsilon)
        if eps <= 0:
            raise InvalidRuleError(
                f"Epsilon: epsilon must be > 0, got {self.epsilon!r}. "
                "Use lrp_grad.Z() for the LRP-0 rule without a stabiliser."
            )
        object.__setattr__(self, "epsilon", eps)
        object.__setattr__(self, "bias", _flag("Epsilon", "bias", self.bias))


def _flag(rule: str, name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise InvalidRuleError(f"{rule}: {name} must be True or False, got {value!r}.")
    return bool(value)


@dataclass(frozen=True)
class AlphaBeta(Rule):
    """LRP-alpha-beta (Bach et al. 2015, eq. 60; the seed report's a/b rule, its eq. 13).

    ``R_i = sum_j (alpha z_ij^+ / stab(z_j^+) - beta z_ij^- / stab(z_j^-)) R_j`` where the sign of
    each product ``x_i w_ij`` decides its side (so negative inputs are handled), and
    ``z_j^+ = sum_i z_ij^+ + b_j^+``, ``z_j^- = sum_i z_ij^- + b_j^-``.

    Parameters
    ----------
    alpha, beta : float
        Non-negative weights of the positive and negative parts with ``alpha - beta == 1``.
    bias : bool
        Whether the positive/negative parts of the bias enter ``z_j^+`` / ``z_j^-``.
    """

    scales_with_input = True

    alpha: float = 2.0
    beta: float = 1.0
    bias: bool = True

    def __post_init__(self):
        alpha = _real("AlphaBeta", "alpha", self.alpha)
        beta = _real("AlphaBeta", "beta", self.beta)
        if alpha < 0 or beta < 0:
            raise InvalidRuleError(
                f"AlphaBeta: alpha and beta must be >= 0, got alpha={self.alpha!r}, beta={self.beta!r}."
            )
        if not math.isclose(alpha - beta, 1.0, rel_tol=0.0, abs_tol=1e-12):
            raise InvalidRuleError(
                f"AlphaBeta: alpha - beta must equal 1 (so relevance is conserved), got "
                f"alpha={self.alpha!r}, beta={self.beta!r} (difference {alpha - beta!r}). "
                "Common choices: AlphaBeta(2, 1), AlphaBeta(1, 0)."
            )
        object.__setattr__(self, "alpha", alpha)
        object.__setattr__(self, "beta", beta)
        object.__setattr__(self, "bias", _flag("AlphaBeta", "bias", self.bias))


@dataclass(frozen=True)
class ZPlus(AlphaBeta):
    """LRP-z+ (Montavon et al. 2017, deep Taylor decomposition): :class:`AlphaBeta` with
    ``alpha=1, beta=0``. Only positive contributions (and the positive part of the bias, unless
    ``bias=False``) receive relevance.
    """

    alpha: float = field(default=1.0, init=False, repr=False)
    beta: float = field(default=0.0, init=False, repr=False)
    bias: bool = True


@dataclass(frozen=True)
class Flat(Rule):
    """Flat rule (Lapuschkin et al. 2019): relevance spread uniformly over the receptive field.

    Weights and inputs are replaced by ones and the bias is ignored, as Zennit defines it;
    padding positions are not inputs. The result does not depend on the input values.
    """

    input_independent = True


@dataclass(frozen=True)
class WSquare(Rule):
    """w^2 rule (Montavon et al. 2017): ``R_i = sum_j w_ij^2 / stab(sum_i' w_i'j^2) R_j``.

    The textbook rule: no bias, no input values (meant for the first layer of unbounded inputs).
    """

    input_independent = True


@dataclass(frozen=True)
class ZBox(Rule):
    """z^B rule (Montavon et al. 2017) for inputs bounded in ``[low, high]``.

    ``q_ij = x_i w_ij - l_i w_ij^+ - h_i w_ij^-``, ``R_i = sum_j q_ij / stab(sum_i q_ij) R_j``
    (deep Taylor decomposition's root point in the box; as Zennit 0.5 computes it). Meant for the
    first layer.

    Parameters
    ----------
    low, high : float or array_like
        Lowest and highest possible input values; scalars or arrays broadcastable to one input
        sample (for example per-channel bounds of shape ``(channels,)``). ``low < high``.
    bias : bool
        Add the bias to the denominator (newer Zennit releases do); default ``False``, the
        textbook rule.
    """

    low: Any = 0.0
    high: Any = 1.0
    bias: bool = False

    def __post_init__(self):
        low = np.asarray(self.low, dtype=np.float64)
        high = np.asarray(self.high, dtype=np.float64)
        if not (np.all(np.isfinite(low)) and np.all(np.isfinite(high))):
            raise InvalidRuleError(f"ZBox: low and high must be finite, got low={self.low!r}, high={self.high!r}.")
        try:
            below = np.all(low < high)
        except ValueError:
            raise InvalidRuleError(
                f"ZBox: low {low.shape} and high {high.shape} must have broadcastable shapes."
            ) from None
        if not below:
            raise InvalidRuleError(
                f"ZBox: low must be < high everywhere, got low={self.low!r}, high={self.high!r}."
            )
        object.__setattr__(self, "low", float(low) if low.ndim == 0 else low)
        object.__setattr__(self, "high", float(high) if high.ndim == 0 else high)
        object.__setattr__(self, "bias", _flag("ZBox", "bias", self.bias))

    def __eq__(self, other):
        return (
            type(other) is ZBox
            and np.array_equal(self.low, other.low)
            and np.array_equal(self.high, other.high)
            and self.bias == other.bias
        )

    def __hash__(self):
        return hash((ZBox, np.asarray(self.low).tobytes(), np.asarray(self.high).tobytes(), self.bias))


@dataclass(frozen=True)
class Gamma(Rule):
    """Sign-aware LRP-gamma (Montavon et al. 2019; generalised as in Zennit).

    For ``z_j > 0``: ``R_i = sum_j (z_ij + gamma z_ij^+) / stab(z_j + gamma (sum_i z_ij^+ + b_j^+)) R_j``;
    for ``z_j < 0`` the same with the negative parts; outputs with ``z_j == 0`` pass nothing.
    ``gamma = 0`` is LRP-0 (with stabiliser); large ``gamma`` approaches z+.

    Parameters
    ----------
    gamma : float
        Non-negative weight of the favoured contributions.
    """

    scales_with_input = True

    gamma: float = 0.25

    def __post_init__(self):
        gamma = _real("Gamma", "gamma", self.gamma)
        if gamma < 0:
            raise InvalidRuleError(f"Gamma: gamma must be >= 0, got {self.gamma!r}.")
        object.__setattr__(self, "gamma", gamma)


class AttentionRule(Rule):
    """Base of the rules of the ``'attention'`` family: how relevance crosses a product of two
    signals (``Q K^T``, ``A V``, a gated MLP's ``u * v``) and a softmax inside the network.

    Given alone as ``rule=``, such a rule also sets the linear layers' rule to
    ``Epsilon(epsilon)``, as both papers do.
    """

    attention = True
    scales_with_input = True

    def __post_init__(self):
        eps = _real(type(self).__name__, "epsilon", self.epsilon)
        if eps <= 0:
            raise InvalidRuleError(f"{type(self).__name__}: epsilon must be > 0, got {self.epsilon!r}.")
        object.__setattr__(self, "epsilon", eps)


@dataclass(frozen=True)
class AttnLRP(AttentionRule):
    """AttnLRP (Achtibat et al., "AttnLRP: Attention-Aware Layer-Wise Relevance Propagation for
    Transformers", ICML 2024).

    A product of two signals ``z = sum_k a_k b_k`` (a matrix product, an einsum, an elementwise
    product) gives each factor half of each term's share: ``R_a = a * dz/da^T (R / stab(z)) / 2``
    and the same for ``b`` (the uniform rule, Prop. 3.3, with epsilon over the sum). A softmax
    ``s = softmax(x)`` gives ``R_x = x * (R - s * sum(R))`` (Prop. 3.1, the bias term absorbed).
    Normalisations hold their scale constant (the layers' own handlers).

    Parameters
    ----------
    epsilon : float
        Stabiliser of the products' denominators, ``> 0``.
    """

    epsilon: float = 1e-6


@dataclass(frozen=True)
class CPLRP(AttentionRule):
    """CP-LRP (Ali et al., "XAI for Transformers: Better Explanations through Conservative
    Propagation", ICML 2022).

    The attention weights are held constant: a product whose factor comes through a softmax
    (``A V``) is linear in the other factor, which receives all of the relevance
    (``R_v = v * dz/dv^T (R / stab(z))``); the scores ``Q K^T`` and the softmax receive none.
    Products of two signals without such a factor fall back to the uniform rule of
    :class:`AttnLRP`. Normalisations hold their scale constant. On a transformer without biases
    it conserves relevance (up to epsilon).

    Parameters
    ----------
    epsilon : float
        Stabiliser of the products' denominators, ``> 0``.
    """

    epsilon: float = 1e-6
