"""The import paths of the flat 0.1 layout, each an alias of the module that now holds the code.

``lrp_grad.rules`` is ``lrp_grad.core.rules``, the same module object under two names: ``from
lrp_grad.rules import Epsilon``, ``import lrp_grad.explanation`` and ``monkeypatch.setattr(lrp_grad.stream,
...)`` keep working, and patching one name patches the other. An alias imports its module only
when it is first asked for, so ``import lrp_grad`` stays as light as it was. The table is also the
map from the old layout to the new one. (``lrp_grad.heatmap`` is no alias: it is a module of its own,
the public heatmap namespace over :mod:`lrp_grad.visual` and :mod:`lrp_grad.concepts.atlas`.)
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys

#: Old module (below ``lrp_grad``) -> the module that holds it now.
MOVED = {
    # The LRP core.
    "rules": "core.rules",
    "propagate": "core.propagate",
    "ops": "core.ops",
    "handlers": "core.handlers",
    "gating": "core.gating",
    "canonizers": "core.canonizers",
    "composites": "core.composites",
    "presets": "core.presets",
    "rewrite": "core.planner",
    # The explainer API.
    "explainer": "api.explainer",
    # Explanations as data.
    "stream": "pipelines.stream",
    "export": "pipelines.export",
    # Integrations with other systems.
    "beam": "integrations.beam",
    "callbacks": "integrations.callbacks",
    # Pictures.
    "explanation": "visual.explanation",
    # Applications.
    "cli": "app.cli",
    "demo": "app.demo",
    "bench": "app.bench",
    "datasets": "app.datasets",
}


class _AliasLoader(importlib.abc.Loader):
    """Returns the real module for an old name, leaving its own ``__spec__`` and ``__name__`` alone."""

    def __init__(self, target: str):
        self.target = target
        self._spec = None

    def create_module(self, spec):
        module = importlib.import_module(self.target)
        self._spec = module.__spec__
        return module

    def exec_module(self, module):
        # The import system set __spec__ to the alias's spec; the module keeps its own.
        module.__spec__ = self._spec


class _AliasFinder(importlib.abc.MetaPathFinder):
    """Finds ``lrp_grad.<old>`` for the names in :data:`MOVED`."""

    def __init__(self, package: str):
        self.package = package

    def find_spec(self, fullname, path=None, target=None):
        prefix = self.package + "."
        if not fullname.startswith(prefix) or fullname[len(prefix):] not in MOVED:
            return None
        real = prefix + MOVED[fullname[len(prefix):]]
        return importlib.machinery.ModuleSpec(fullname, _AliasLoader(real))


def install(package: str) -> None:
    """Put the finder of ``package``'s old paths on ``sys.meta_path`` (once)."""
    if not any(isinstance(f, _AliasFinder) and f.package == package for f in sys.meta_path):
        sys.meta_path.append(_AliasFinder(package))
