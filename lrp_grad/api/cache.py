"""The module-level :func:`explain`: one cached :class:`~lrp_grad.Explainer` per model and options."""
from __future__ import annotations

import threading
import weakref
from dataclasses import replace

from ..core import handlers
from ..errors import StaleExplainerError
from .explainer import Explainer

__all__ = ["explain"]

#: ``explain()``'s compiled explainers: model -> {options key: Explainer}. Held weakly by the
#: model, and the cached explainers hold the model only through a weak proxy, so a model that is
#: deleted takes its explainers with it (no leak).
_CACHE = weakref.WeakKeyDictionary()
_CACHE_LOCK = threading.Lock()


def _option_key(rule, canonizers, jit_compile, compute_dtype, output=None):
    """A hashable key of ``explain()``'s options, or ``None`` when one of them is not hashable.

    Rules and preset names hash by value; a Composite (which holds a dict) by identity, kept
    alive in the key so that its id cannot be reused while the entry exists.
    """
    def part(v):
        try:
            hash(v)
            return ("value", v)
        except TypeError:
            return ("object", id(v), v)

    key = (handlers.registry_version, part(rule), part(None if canonizers is None else tuple(canonizers)),
           jit_compile, compute_dtype, part(output))
    try:
        hash(key)
    except TypeError:
        return None
    return key


def _cached_explainer(model, rule, canonizers, jit_compile, compute_dtype, output=None):
    """The Explainer of ``explain()`` for these options, built once per model and options."""
    key = _option_key(rule, canonizers, jit_compile, compute_dtype, output)
    with _CACHE_LOCK:
        try:
            per_model = _CACHE.setdefault(model, {})
        except TypeError:  # not weak-referenceable / hashable: no cache
            per_model, key = None, None
        if key is not None and key in per_model:
            return per_model[key], True
        return _build_cached(model, rule, canonizers, jit_compile, compute_dtype, output, per_model, key)


def _build_cached(model, rule, canonizers, jit_compile, compute_dtype, output, per_model, key):
    ex = Explainer(model, rule=rule, canonizers=canonizers, jit_compile=jit_compile, compute_dtype=compute_dtype,
                   output=output)
    if key is not None:
        passes = ex.passes
        passes.plan(True)  # both plans now: later ones would need the model itself
        proxy = weakref.proxy(model)
        ex.model = passes.model = proxy
        passes.plans = {k: replace(p, graph=replace(p.graph, model=proxy)) for k, p in passes.plans.items()}
        passes.signed_only = True  # mixed input signs use the signed plan (exact for any input)
        per_model[key] = ex
    return ex, key is not None


def _evict(model, ex):
    with _CACHE_LOCK:
        per_model = _CACHE.get(model, {})
        for k, v in list(per_model.items()):
            if v is ex:
                del per_model[k]


def explain(model, x, target=None, *, rule=None, output=None, initial="logit", return_layers: bool = False,
            batch_size: int | None = None, canonizers=None, jit_compile: bool | None = None,
            compute_dtype: str | None = None):
    """Explain ``model``'s decision on the batch ``x`` with LRP in one call.

    See :class:`Explainer` for the parameters. The compiled pass is cached per model and options
    (``rule``, ``output``, ``canonizers``, ``jit_compile``, ``compute_dtype``), so repeated calls cost about
    what an :class:`Explainer` call does; the cache holds models weakly (deleting a model frees
    its explainers). It reads the model's current weights on every call, and registering or
    unregistering a handler starts new entries; a model whose layers were changed in place
    (e.g. a layer's ``activation`` reassigned) needs ``lrp_grad.Explainer`` or a new model.

    Examples
    --------
    >>> R = lrp_grad.explain(model, x)                                    # doctest: +SKIP
    >>> R = lrp_grad.explain(model, x, target=3, rule=lrp_grad.ZPlus())  # doctest: +SKIP
    """
    ex, cached = _cached_explainer(model, rule, canonizers, jit_compile, compute_dtype, output)
    try:
        return ex(x, target, initial=initial, return_layers=return_layers, batch_size=batch_size)
    except StaleExplainerError:
        # A BatchNorm folded through a max pooling needs the scales it had when the plan was
        # built; if training changed their signs since, plan again (once) instead of failing.
        if not cached:
            raise
        _evict(model, ex)
        ex = Explainer(model, rule=rule, canonizers=canonizers, jit_compile=jit_compile, compute_dtype=compute_dtype,
                       output=output)
        return ex(x, target, initial=initial, return_layers=return_layers, batch_size=batch_size)
