"""Composites: which rule each layer of a model gets, as printable data.

A :class:`Composite` is an ordered list of ``(matcher, rule)`` entries (the first match wins), an
optional special rule for the first weighted layer, and overrides by layer name that take
precedence over both. A matcher is a layer family (``'dense'``, ``'conv'``, ``'pool'``, ``'norm'``,
``'merge'``, ``'attention'``; ``'weighted'`` = dense or conv; ``'linear'`` = every family but
attention), a
Keras layer class or tuple of classes (a built-in class of either package matches its namesake in
the other: ``keras.layers.Conv2D`` also matches a tf-keras Conv2D), or a predicate ``layer -> bool``.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import InvalidRuleError
from ..frontends import check_model, class_name, is_instance
from .handlers import FAMILIES
from .rules import AttnLRP, Epsilon, Rule, Z
from .survey import survey

__all__ = ["Composite", "RuleMap", "single_rule"]

LINEAR_FAMILIES = tuple(f for f in FAMILIES if f != "attention")
GROUPS = {"weighted": ("dense", "conv"), "linear": LINEAR_FAMILIES}
#: The rule of the ``'attention'`` family when a composite does not name it.
DEFAULT_ATTENTION_RULE = AttnLRP()


def _check_matcher(matcher, where):
    if isinstance(matcher, str):
        if matcher not in FAMILIES and matcher not in GROUPS:
            raise InvalidRuleError(
                f"Composite {where}: unknown layer family {matcher!r}; use one of "
                f"{list(FAMILIES) + list(GROUPS)}, a Keras layer class or a predicate."
            )
        return
    if isinstance(matcher, type) or (isinstance(matcher, tuple) and all(isinstance(m, type) for m in matcher)):
        return
    if callable(matcher):
        return
    raise InvalidRuleError(
        f"Composite {where}: matcher {matcher!r} must be a family name, a layer class (or tuple of "
        "classes) or a predicate layer -> bool."
    )


def _check_rule(rule, where):
    if not isinstance(rule, Rule):
        raise InvalidRuleError(f"Composite {where}: {rule!r} is not an lrp_grad rule (e.g. lrp_grad.Epsilon(1e-6)).")


def _matches(matcher, layer, family) -> bool:
    if isinstance(matcher, str):
        return family in GROUPS.get(matcher, (matcher,))
    if isinstance(matcher, (type, tuple)):
        return is_instance(layer, matcher)
    return bool(matcher(layer))


def _describe(matcher) -> str:
    if isinstance(matcher, str):
        return repr(matcher)
    if isinstance(matcher, type):
        return matcher.__name__
    if isinstance(matcher, tuple):
        return "(" + ", ".join(m.__name__ for m in matcher) + ")"
    return getattr(matcher, "__name__", repr(matcher))


@dataclass(frozen=True)
class Composite:
    """Rules per layer.

    Parameters
    ----------
    rules : sequence of (matcher, Rule)
        Ordered entries; a layer gets the rule of the first entry whose matcher matches it.
    first : Rule or (matcher, Rule), optional
        Rule for the first layer (in forward order) matching ``matcher`` (default
        ``'weighted'``: the first Dense or Conv layer).
    overrides : mapping of str to Rule, optional
        Layer name (or nested path ``'block/conv'``) -> rule; takes precedence over everything.
    default : Rule, optional
        Rule for layers no entry matches; without it such layers are an error.
    name : str
        Shown when printing.

    Examples
    --------
    >>> c = Composite([("conv", ZPlus()), ("dense", Epsilon(1e-6))], first=Flat(),
    ...               overrides={"predictions": Epsilon(0.25)})          # doctest: +SKIP
    >>> print(c.resolve(model))                                          # doctest: +SKIP
    """

    rules: tuple = ()
    first: Any = None
    overrides: Any = field(default_factory=dict)
    default: Rule | None = None
    name: str = "composite"

    def __post_init__(self):
        entries = []
        for k, entry in enumerate(self.rules):
            if not (isinstance(entry, (tuple, list)) and len(entry) == 2):
                raise InvalidRuleError(f"Composite rules[{k}] must be a (matcher, rule) pair, got {entry!r}.")
            _check_matcher(entry[0], f"rules[{k}]")
            _check_rule(entry[1], f"rules[{k}]")
            entries.append((entry[0], entry[1]))
        object.__setattr__(self, "rules", tuple(entries))
        first = self.first
        if first is not None:
            if isinstance(first, Rule):
                first = ("weighted", first)
            if not (isinstance(first, (tuple, list)) and len(first) == 2):
                raise InvalidRuleError(f"Composite first must be a rule or a (matcher, rule) pair, got {first!r}.")
            _check_matcher(first[0], "first")
            _check_rule(first[1], "first")
            first = (first[0], first[1])
        object.__setattr__(self, "first", first)
        if not isinstance(self.overrides, Mapping):
            raise InvalidRuleError(f"Composite overrides must map layer names to rules, got {self.overrides!r}.")
        for key, rule in self.overrides.items():
            _check_rule(rule, f"overrides[{key!r}]")
        object.__setattr__(self, "overrides", dict(self.overrides))
        if self.default is not None:
            _check_rule(self.default, "default")

    def __hash__(self):
        return hash((self.name, self.rules, self.first, tuple(self.overrides.items()), self.default))

    def __str__(self):
        lines = [f"Composite {self.name!r}:"]
        lines += [f"  {name!r} -> {rule!r}  (override)" for name, rule in self.overrides.items()]
        if self.first:
            lines.append(f"  first {_describe(self.first[0])} layer -> {self.first[1]!r}")
        lines += [f"  {_describe(m)} -> {rule!r}" for m, rule in self.rules]
        if self.default is not None:
            lines.append(f"  anything else -> {self.default!r}")
        return "\n".join(lines)

    def assign(self, layers) -> list:
        """Rules for ``layers``, a list of ``(label, layer, family)`` of every rule-taking layer.

        Raises :class:`InvalidRuleError` for layers no entry matches (when there is no default)
        and for override names that are not in the model.
        """
        names = {label for label, _, _ in layers} | {layer.name for _, layer, _ in layers}
        unknown = [k for k in self.overrides if k not in names]
        if unknown:
            raise InvalidRuleError(
                f"Composite {self.name!r} overrides layers {unknown} that are not rule-taking layers of "
                f"this model; its rule-taking layers are: {[label for label, _, _ in layers]}."
            )
        first_done = self.first is None
        out, missing, wrong = [], [], []
        for label, layer, family in layers:
            rule = None
            if not first_done and _matches(self.first[0], layer, family):
                rule, first_done = self.first[1], True
            if rule is None:
                fallback = DEFAULT_ATTENTION_RULE if family == "attention" else self.default
                rule = next((r for m, r in self.rules if _matches(m, layer, family)), fallback)
            rule = self.overrides.get(label, self.overrides.get(layer.name, rule))
            if rule is None:
                missing.append(f"'{label}' ({class_name(layer)}, family {family!r})")
            elif bool(rule.attention) != (family == "attention"):
                wrong.append(f"'{label}' ({class_name(layer)}, family {family!r}) got {rule!r}")
            out.append(rule)
        if missing:
            raise InvalidRuleError(
                f"Composite {self.name!r} has no rule for {len(missing)} layer(s): {', '.join(missing)}. "
                "Add an entry such as ('pool', lrp_grad.Epsilon(1e-6)), or a default=."
            )
        if wrong:
            raise InvalidRuleError(
                f"Composite {self.name!r} gives {len(wrong)} layer(s) a rule of the wrong kind: {'; '.join(wrong)}. "
                "The 'attention' family (attention cores, products of two tensors) takes lrp_grad.AttnLRP() or "
                "lrp_grad.CPLRP(); every other family takes a linear rule (Epsilon, Z, AlphaBeta, ...). Match "
                "the attention rule with ('attention', rule) only."
            )
        return out

    def resolve(self, model, canonizers=None) -> "RuleMap":
        """The layer -> rule map this composite gives ``model`` (after canonization)."""
        check_model(model)
        layers = survey(model, canonizers).rule_taking
        return RuleMap((label, class_name(layer), family, rule)
                       for (label, layer, family), rule in zip(layers, self.assign(layers)))


class RuleMap(Mapping):
    """Read-only ``layer label -> rule`` map, printable as a table (what will happen, per layer)."""

    def __init__(self, rows):
        self._rows = list(rows)  # (label, class name, family, rule)
        self._rules = {label: rule for label, _, _, rule in self._rows}

    def __getitem__(self, key):
        return self._rules[key]

    def __iter__(self):
        return iter(self._rules)

    def __len__(self):
        return len(self._rules)

    def __str__(self):
        if not self._rows:
            return "(no rule-taking layers)"
        w = max(len(f"{label} ({cls})") for label, cls, _, _ in self._rows)
        return "\n".join(f"{f'{label} ({cls})'.ljust(w)}  {family:6s}  {rule!r}" for label, cls, family, rule in self._rows)

    def __repr__(self):
        return f"RuleMap(\n{self}\n)"


def single_rule(rule: Rule) -> Composite:
    """The composite of ``explain(rule=R)`` for one rule ``R``.

    ``Z`` and ``Epsilon`` apply to every rule-taking layer. Any other rule (alpha-beta, z+, gamma,
    flat, w^2, z^B) applies to the weighted layers (Dense, Conv) only, as in the seed report and
    the presets: the weight-free linear layers (families ``pool``, ``merge``, ``norm``) get
    ``Epsilon(1e-6)``. There every contribution ``x_i`` has the sign of its input alone, so for
    non-negative inputs alpha-beta's ``z-`` is empty, its beta half vanishes and the layer returns
    ``alpha R`` instead of ``R``: on a ResNet the relevance grew by 2x per block (up to 1e25x the
    logit, and NaN in float32, on ResNetRS). :meth:`Composite.resolve` shows the map.

    The ``'attention'`` family gets :class:`~lrp_grad.core.rules.AttnLRP` unless ``rule`` is an
    attention rule itself (``AttnLRP``, ``CPLRP``); then the linear layers get ``Epsilon`` with its
    epsilon, as in both papers.
    """
    if rule.attention:  # the papers' setting: the attention rule, epsilon on every linear layer
        return Composite([("attention", rule), ("linear", Epsilon(rule.epsilon))], name=repr(rule))
    if isinstance(rule, (Z, Epsilon)):
        return Composite([("linear", rule)], name=repr(rule))
    return Composite([("weighted", rule), ("linear", Epsilon(1e-6))], name=repr(rule))
