"""Named composites from the LRP literature, as functions and by name.

Layers without weights that still take a rule (average pooling, Add, an unfolded BatchNorm) get
``Epsilon(epsilon)`` in every preset (Zennit does the same with its ``Norm`` rule for pooling and
sums), and so they do when a single rule other than Z/Epsilon is given
(:func:`lrp_grad.composites.single_rule`).

>>> lrp_grad.explain(model, x, rule="epsilon_plus_flat")                        # doctest: +SKIP
>>> lrp_grad.explain(model, x, rule=lrp_grad.presets.epsilon_gamma_box(-1, 1))  # doctest: +SKIP
"""
from __future__ import annotations

from .composites import Composite, Rule, single_rule
from ..errors import InvalidRuleError
from .rules import AlphaBeta, Epsilon, Flat, Gamma, ZBox, ZPlus

__all__ = ["epsilon_plus", "epsilon_plus_flat", "epsilon_alpha2_beta1", "epsilon_gamma_box", "seed_ab", "get", "NAMES", "as_composite"]


def epsilon_plus(epsilon: float = 1e-6) -> Composite:
    """Conv layers z+, dense layers epsilon (Kohlbrenner et al. 2020, "Towards best practice in
    explaining neural network decisions with LRP")."""
    eps = Epsilon(epsilon)
    return Composite([("conv", ZPlus()), ("dense", eps), ("linear", eps)], name="epsilon_plus")


def epsilon_plus_flat(epsilon: float = 1e-6) -> Composite:
    """:func:`epsilon_plus` with the flat rule on the first weighted layer (Kohlbrenner et al. 2020)."""
    eps = Epsilon(epsilon)
    return Composite([("conv", ZPlus()), ("dense", eps), ("linear", eps)], first=("weighted", Flat()),
                     name="epsilon_plus_flat")


def epsilon_alpha2_beta1(epsilon: float = 1e-6) -> Composite:
    """Conv layers alpha-beta (2, 1), dense layers epsilon (Kohlbrenner et al. 2020)."""
    eps = Epsilon(epsilon)
    return Composite([("conv", AlphaBeta(2, 1)), ("dense", eps), ("linear", eps)], name="epsilon_alpha2_beta1")


def epsilon_gamma_box(low=0.0, high=1.0, gamma: float = 0.25, epsilon: float = 1e-6) -> Composite:
    """First conv z^B with input bounds ``[low, high]``, other convs gamma, dense epsilon
    (Montavon et al. 2019, "Layer-wise relevance propagation: an overview").

    ``low``/``high`` are the lowest and highest possible input values (scalars or per-channel
    arrays). A model without a conv layer gets no z^B layer.
    """
    eps = Epsilon(epsilon)
    return Composite([("conv", Gamma(gamma)), ("dense", eps), ("linear", eps)], first=("conv", ZBox(low, high)),
                     name="epsilon_gamma_box")


def seed_ab(alpha: float = 2.0, beta: float = 1.0) -> Composite:
    """The student report's setting: the a/b rule on every Dense and Conv layer (Bach et al. 2015;
    the seed used a=2, b=1 and a=3, b=2); weight-free linear layers (pooling, Add, unfolded
    BatchNorm), which the seed's models did not have, get ``Epsilon(1e-6)`` as in the other
    presets (a/b there multiplies the relevance by ``alpha``)."""
    return Composite([("weighted", AlphaBeta(alpha, beta)), ("linear", Epsilon(1e-6))],
                     name=f"seed_ab({alpha:g}, {beta:g})")


_BY_NAME = {
    "epsilon_plus": epsilon_plus,
    "epsilon_plus_flat": epsilon_plus_flat,
    "epsilon_alpha2_beta1": epsilon_alpha2_beta1,
    "epsilon_gamma_box": epsilon_gamma_box,
    "seed_ab": seed_ab,
}
NAMES = tuple(_BY_NAME)


def get(name: str) -> Composite:
    """The preset ``name`` with its default parameters."""
    if name not in _BY_NAME:
        raise InvalidRuleError(f"unknown rule or preset name {name!r}; valid names: {', '.join(NAMES)}.")
    return _BY_NAME[name]()


def as_composite(rule) -> Composite:
    """A composite from what ``explain(rule=...)`` accepts: a Rule, a Composite or a preset name."""
    if isinstance(rule, Composite):
        return rule
    if isinstance(rule, Rule):
        return single_rule(rule)
    if isinstance(rule, str):
        return get(rule)
    raise InvalidRuleError(
        f"rule must be an lrp_grad rule (e.g. lrp_grad.Epsilon(1e-6)), a lrp_grad.Composite or a "
        f"preset name ({', '.join(NAMES)}), got {rule!r} ({type(rule).__name__})."
    )
