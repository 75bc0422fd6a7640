"""A faithfulness table: the symmetric relevance gain of several attribution methods on one model.

:func:`faithfulness_table` explains the same images with every method (LRP rules and presets, the
gradient baselines, random, LIME, or a function of your own), scores each map with
:func:`~lrp_grad.evaluate.srg` under every perturbation baseline, and returns a
:class:`FaithfulnessTable`: per method and baseline the mean SRG with its standard error, the
areas under the MoRF and LeRF curves, the mean curves, and the difference to the best method of
that baseline with the standard error of that *paired* difference (same images, so most of the
image-to-image variation cancels). ``lrp-grad evaluate`` and ``benchmarks/faithfulness.py`` print
this table.

Images are processed batch by batch (an array, or any iterable of ``x`` or ``(x, y)`` batches such
as a ``tf.data.Dataset``), so a test set never has to fit in memory as maps of every method.
"""
from __future__ import annotations

import numbers
import time
from dataclasses import dataclass, field

import numpy as np

from ..errors import InvalidInputError, InvalidRuleError
from .region import BASELINES, OUTPUTS, _check_baseline, _check_choice, _check_images, _check_target, _positive_int

__all__ = ["faithfulness_table", "FaithfulnessTable", "FaithfulnessRow", "DEFAULT_METHODS", "GRADIENT_METHODS",
           "method_names"]

#: Attribution methods computed from gradients (lrp_grad.evaluate.baselines), plus random and LIME.
GRADIENT_METHODS = ("gradient", "gradient_x_input", "integrated_gradients", "smoothgrad")
_OTHER = ("random", "lime")
#: Rules of the attention family given by name (``lrp_grad.AttnLRP()``, ``lrp_grad.CPLRP()``).
_ATTENTION = ("attnlrp", "cplrp")

#: What :func:`faithfulness_table` compares when ``methods`` is not given.
DEFAULT_METHODS = ("epsilon_plus_flat", "epsilon_gamma_box", "epsilon_plus", "epsilon_alpha2_beta1",
                   "gradient", "gradient_x_input", "integrated_gradients", "smoothgrad", "random")


def method_names() -> tuple:
    """Every method name :func:`faithfulness_table` understands."""
    from ..core.presets import NAMES

    return tuple(NAMES) + _ATTENTION + GRADIENT_METHODS + _OTHER


@dataclass
class FaithfulnessRow:
    """One method under one baseline. Areas and SRG are in the explained output's units."""

    method: str
    baseline: str
    srg: float             # mean over images of area(LeRF) - area(MoRF)
    sem: float             # standard error of that mean
    morf: float            # mean area under the MoRF curve (lower is better)
    lerf: float            # mean area under the LeRF curve (higher is better)
    n: int
    seconds_per_image: float   # attribution time (not the scoring)
    vs_best: float = 0.0       # mean paired difference to the best method of this baseline (<= 0)
    vs_best_sem: float = 0.0   # standard error of that paired difference (0 for the best itself)

    @property
    def level_with_best(self) -> bool:
        """Within two paired standard errors of the best method of its baseline."""
        return self.vs_best == 0.0 or -self.vs_best <= 2 * self.vs_best_sem


@dataclass
class FaithfulnessTable:
    """The result of :func:`faithfulness_table` (see there). ``scores[(method, baseline)]`` holds the
    per-image SRG, ``curves[(method, baseline)]`` the mean ``(morf, lerf)`` curves."""

    rows: list
    patch: int
    output: str
    steps: int
    n: int
    scores: dict = field(repr=False, default_factory=dict)
    curves: dict = field(repr=False, default_factory=dict)
    notes: list = field(default_factory=list)

    @property
    def methods(self) -> list:
        return list(dict.fromkeys(r.method for r in self.rows))

    @property
    def baselines(self) -> list:
        return list(dict.fromkeys(r.baseline for r in self.rows))

    def row(self, method: str, baseline: str) -> FaithfulnessRow:
        for r in self.rows:
            if r.method == method and r.baseline == baseline:
                return r
        raise KeyError(f"no row for method {method!r} and baseline {baseline!r}; methods: {self.methods}, "
                       f"baselines: {self.baselines}.")

    def best(self, baseline: str) -> str:
        """The method with the highest mean SRG under ``baseline``."""
        rows = [r for r in self.rows if r.baseline == baseline]
        if not rows:
            raise KeyError(f"no baseline {baseline!r} in this table; it has {self.baselines}.")
        return max(rows, key=lambda r: r.srg).method

    def difference(self, a: str, b: str, baseline: str) -> tuple:
        """``(mean, standard error)`` of the paired per-image difference SRG(a) - SRG(b)."""
        d = self.scores[(a, baseline)] - self.scores[(b, baseline)]
        return float(d.mean()), _sem(d)

    def to_dict(self) -> dict:
        return {"patch": self.patch, "output": self.output, "steps": self.steps, "n": self.n, "notes": self.notes,
                "rows": [dict(r.__dict__, level_with_best=r.level_with_best) for r in self.rows],
                "curves": {f"{m} | {b}": {"morf": c[0].tolist(), "lerf": c[1].tolist()}
                           for (m, b), c in self.curves.items()}}

    def markdown(self) -> str:
        """A Markdown table: one row per method, SRG +- standard error per baseline, ranked by the
        first baseline. A bold entry is the best of its column or level with it (within two paired
        standard errors)."""
        first = self.baselines[0]
        methods = sorted(self.methods, key=lambda m: -self.row(m, first).srg)
        head = ["method"] + [f"SRG {b}" for b in self.baselines] + ["s / image"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for m in methods:
            cells = [m]
            for b in self.baselines:
                r = self.row(m, b)
                text = f"{r.srg:.3f} ± {r.sem:.3f}"
                cells.append(f"**{text}**" if r.level_with_best else text)
            cells.append(f"{self.row(m, first).seconds_per_image:.2g}")
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def __str__(self) -> str:
        first = self.baselines[0]
        methods = sorted(self.methods, key=lambda m: -self.row(m, first).srg)
        width = max(len("method"), *(len(m) for m in methods))
        head = f"{'method':<{width}}" + "".join(f"  {'SRG ' + b:>22}" for b in self.baselines) + "  s/image"
        units = {"logit": "logits", "probability": "probabilities"}.get(self.output, self.output)
        lines = [f"symmetric relevance gain (area LeRF - area MoRF, {units}), {self.n} images, "
                 f"{self.patch}x{self.patch} patches, {self.steps} steps; mean ± standard error, "
                 "* = best or within 2 paired standard errors of it", head]
        for m in methods:
            line = f"{m:<{width}}"
            for b in self.baselines:
                r = self.row(m, b)
                line += f"  {r.srg:>10.4f} ± {r.sem:<7.4f}{'*' if r.level_with_best else ' '}"
            lines.append(line + f"  {self.row(m, first).seconds_per_image:.2g}")
        return "\n".join(lines + [f"note: {n}" for n in self.notes])

    def plot(self, path=None, baseline: str | None = None):
        """The mean MoRF and LeRF curves of every method under ``baseline`` (default: the first),
        side by side; saved to ``path`` when given. Returns the matplotlib figure."""
        import matplotlib.pyplot as plt

        baseline = self.baselines[0] if baseline is None else baseline
        if baseline not in self.baselines:
            raise KeyError(f"no baseline {baseline!r} in this table; it has {self.baselines}.")
        fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
        frac = np.linspace(0, 1, self.steps + 1)
        for m in sorted(self.methods, key=lambda m: -self.row(m, baseline).srg):
            morf, lerf = self.curves[(m, baseline)]
            r = self.row(m, baseline)
            line, = axes[0].plot(frac, morf, label=f"{m} (SRG {r.srg:.3f})")
            axes[1].plot(frac, lerf, color=line.get_color())
        for ax, title in zip(axes, ("most relevant first (MoRF): lower is better",
                                    "least relevant first (LeRF): higher is better")):
            ax.set_title(title, fontsize=10)
            ax.set_xlabel(f"fraction of {self.patch}x{self.patch} regions replaced by the {baseline} baseline")
        axes[0].set_ylabel(f"mean {self.output} of the explained class")
        axes[0].legend(fontsize=7)
        fig.suptitle(f"Region perturbation on {self.n} images (SRG = area LeRF - area MoRF)", fontsize=11)
        fig.tight_layout()
        if path is not None:
            fig.savefig(path, dpi=100)
        return fig


def _sem(values) -> float:
    v = np.asarray(values, np.float64)
    return float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else 0.0


# ---------------------------------------------------------------------------------------------
# Methods


def _label(method) -> str:
    if isinstance(method, str):
        return method
    name = getattr(method, "name", None) or getattr(method, "__name__", None)
    return str(name) if name else repr(method)


def _as_methods(methods) -> dict:
    """``{label: method}`` from a list/tuple of methods or a dict of labelled ones."""
    if methods is None:
        methods = DEFAULT_METHODS
    if isinstance(methods, (str, bytes)) or not hasattr(methods, "__iter__"):
        raise ValueError(f"faithfulness_table: methods must be a list of methods or a dict {{label: method}}, "
                         f"got {methods!r}; e.g. methods=['epsilon_plus_flat', 'gradient_x_input'].")
    items = list(methods.items()) if isinstance(methods, dict) else [(_label(m), m) for m in methods]
    if not items:
        raise ValueError("faithfulness_table: methods is empty; pass at least one method, e.g. ['epsilon_plus_flat'].")
    labels = [k for k, _ in items]
    duplicated = sorted({k for k in labels if labels.count(k) > 1})
    if duplicated:
        raise ValueError(f"faithfulness_table: the method label(s) {duplicated} appear twice; pass a dict "
                         "{label: method} with distinct labels.")
    known = method_names()
    for label, m in items:
        if isinstance(m, str) and m.lower() not in known:
            raise InvalidRuleError(f"faithfulness_table: method {m!r} is not known; use a preset "
                                   f"({', '.join(known[:len(known) - len(_ATTENTION + GRADIENT_METHODS + _OTHER)])}), "
                                   f"attnlrp, cplrp, {', '.join(GRADIENT_METHODS)}, random, lime, an lrp_grad rule "
                                   "or composite, or a function f(x, target) -> relevance.")
    return dict(items)


class _Method:
    """One method, built once (an Explainer is traced once) and called per batch."""

    def __init__(self, model, method, bounds, seed):
        from ..api.explainer import Explainer
        from ..core.composites import Composite
        from ..core.rules import Rule
        from . import baselines

        self.model, self.seed, self.explainer, self.fn = model, seed, None, None
        name = method.lower() if isinstance(method, str) else None
        if name in GRADIENT_METHODS:
            fn = getattr(baselines, name)
            self.fn = (lambda x, t: fn(model, x, t, seed=seed)) if name == "smoothgrad" else (lambda x, t: fn(model, x, t))
        elif name == "random":
            self.fn = self._random
        elif name == "lime":
            from . import attribution

            self.fn = lambda x, t: attribution(model, x, t, "lime", seed=seed)[0]
        elif callable(method) and not isinstance(method, (Rule, Composite)):
            self.fn = method
        else:
            rule = method
            if name == "epsilon_gamma_box":
                from ..core.presets import epsilon_gamma_box

                rule = epsilon_gamma_box(*bounds)
            elif name in _ATTENTION:
                from ..core.rules import AttnLRP, CPLRP

                rule = AttnLRP() if name == "attnlrp" else CPLRP()
            self.explainer = Explainer(model, rule=rule)
        self.calls = 0

    def _random(self, x, t):
        rng = np.random.default_rng([self.seed, self.calls])
        return rng.normal(size=x.shape)

    def __call__(self, x, target):
        if self.explainer is not None:
            if self.calls == 0:
                self.explainer(x[:1], target=target[:1])  # trace before timing
            start = time.perf_counter()
            r = self.explainer(x, target=target)
        else:
            start = time.perf_counter()
            r = self.fn(x, target)
        self.calls += 1
        r = np.asarray(r, np.float64)
        if r.shape not in (x.shape, x.shape[:3]):
            raise InvalidInputError(f"faithfulness_table: a method returned relevance of shape {r.shape} for images "
                                    f"of shape {x.shape}; return one map per image shaped like the images.")
        return r, time.perf_counter() - start


# ---------------------------------------------------------------------------------------------
# Batches


def _batches(x, target, batch_size):
    """``(x_batch, target_batch or None)`` pairs from an array (sliced) or an iterable of batches."""
    if isinstance(x, np.ndarray) or (hasattr(x, "shape") and hasattr(x, "dtype") and not hasattr(x, "element_spec")):
        x = _check_images(x, "faithfulness_table")
        t = _check_target(target, len(x), "faithfulness_table")
        for i in range(0, len(x), batch_size):
            yield x[i:i + batch_size], None if t is None else t[i:i + batch_size]
        return
    if target is not None:
        raise ValueError("faithfulness_table: target is only for an array x; a dataset gives its targets as "
                         "(x, y) batches (or none: the predicted class).")
    for item in x:
        if isinstance(item, (tuple, list)):
            if len(item) != 2:
                raise InvalidInputError(f"faithfulness_table: a dataset batch has {len(item)} parts; yield x or "
                                        "(x, y) batches.")
            xb, yb = np.asarray(item[0]), np.asarray(item[1])
        else:
            xb, yb = np.asarray(item), None
        xb = _check_images(xb, "faithfulness_table")
        yield xb, None if yb is None else _check_target(yb, len(xb), "faithfulness_table")


def faithfulness_table(model, x, target=None, *, methods=None, baselines=("mean", "blur"), patch: int = 4,
                       steps: int | None = None, output: str = "logit", batch_size: int | None = None,
                       bounds=None, seed: int = 0, progress=None) -> FaithfulnessTable:
    """The symmetric relevance gain of every method under every baseline, with standard errors.

    Parameters
    ----------
    model : keras.Model or tf_keras.Model
        A classifier with output ``(n, classes)``.
    x : array (n, H, W, C), or an iterable of batches
        Images as the model takes them; or batches ``x`` or ``(x, y)`` (a ``tf.data.Dataset``, a
        generator), processed one at a time.
    target : None, int or array (n,)
        The explained class (only with an array ``x``); ``None``: the labels of ``(x, y)`` batches, or
        the predicted class.
    methods : list or dict
        Methods to compare (default :data:`DEFAULT_METHODS`): preset names, ``'attnlrp'``,
        ``'cplrp'``, ``'gradient'``, ``'gradient_x_input'``, ``'integrated_gradients'``,
        ``'smoothgrad'``, ``'random'``, ``'lime'`` (slow; needs the package ``lime``), lrp_grad rules or
        composites, or functions ``f(x, target) -> relevance``; a dict gives them labels.
        ``'epsilon_gamma_box'`` by name takes its z^B box from ``bounds``.
    baselines : sequence
        Perturbation baselines of :func:`~lrp_grad.evaluate.region_perturbation` (``'mean'``,
        ``'blur'``, ``'zero'``, ``'uniform'``); default mean and blur, which do not coincide with the data.
    patch, steps, output, seed
        As in :func:`~lrp_grad.evaluate.srg`.
    batch_size : int or None
        Images per batch when ``x`` is an array (default 256), and per forward pass when scoring (a
        streamed batch larger than that is scored in one pass; smaller ones score both orders in one
        pass when twice the batch fits).
    bounds : (low, high) or None
        Input range for ``'epsilon_gamma_box'``; default the minimum and maximum of ``x`` (of the
        first batch for a dataset).
    progress : callable or None
        ``progress(text)`` is called before each method of each batch.

    Returns
    -------
    FaithfulnessTable
        Print it, or read ``.rows``, ``.markdown()``, ``.plot()``, ``.best(baseline)``,
        ``.difference(a, b, baseline)``.
    """
    from .region import _curves, _forward_fn, curve_area

    where = "faithfulness_table"
    methods = _as_methods(methods)
    if isinstance(baselines, str) or not hasattr(baselines, "__iter__"):
        baselines = (baselines,)
    baselines = list(baselines)
    if not baselines:
        raise ValueError(f"{where}: baselines is empty; pass at least one of {', '.join(BASELINES)}.")
    for b in baselines:
        _check_baseline(b, where)
    labels_b = [b if isinstance(b, str) else _label(b) for b in baselines]
    output = _check_choice(output, "output", OUTPUTS, where)
    patch = _positive_int(patch, "patch", where)
    batch_size = _positive_int(batch_size, "batch_size", where, allow_none=True) or 256
    if bounds is not None and (np.ndim(bounds) == 0 or len(bounds) != 2):
        raise ValueError(f"{where}: bounds must be (low, high), got {bounds!r}.")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"{where}: seed must be an integer >= 0, got {seed!r}.")

    built, scores, sums, seconds = {}, {}, {}, {m: 0.0 for m in methods}
    n = 0
    total_steps = None
    for xb, tb in _batches(x, target, batch_size):
        if not built:
            forward = _forward_fn(model, output, where)
            box = bounds if bounds is not None else (float(xb.min()), float(xb.max()))
            built = {label: _Method(model, m, box, seed) for label, m in methods.items()}
        out = forward(xb)  # also checks, before any method runs, that the model is a classifier
        if tb is None:
            tb = out.argmax(1)  # logits and probabilities have the same argmax
        for label, method in built.items():
            if progress is not None:
                progress(f"{label} on images {n}..{n + len(xb) - 1}")
            r, sec = method(xb, tb)
            seconds[label] += sec
            for b, bl in zip(baselines, labels_b):
                curves = _curves(model, xb, r, tb, patch, b, ("morf", "lerf"), steps, max(len(xb), batch_size), output,
                                 seed, where, forward=forward)
                total_steps = curves["morf"].shape[1] - 1
                key = (label, bl)
                scores.setdefault(key, []).append(curve_area(curves["lerf"]) - curve_area(curves["morf"]))
                s = sums.setdefault(key, [0.0, 0.0, 0.0, 0.0])  # sum morf curve, lerf curve, areas
                s[0] = s[0] + curves["morf"].sum(0)
                s[1] = s[1] + curves["lerf"].sum(0)
                s[2] += curve_area(curves["morf"]).sum()
                s[3] += curve_area(curves["lerf"]).sum()
        n += len(xb)
    if n == 0:
        raise InvalidInputError(f"{where}: there are no images (x is empty).")

    table = FaithfulnessTable([], patch, output, total_steps, n)
    for (label, bl), parts in scores.items():
        per_image = np.concatenate(parts)
        table.scores[(label, bl)] = per_image
        s = sums[(label, bl)]
        table.curves[(label, bl)] = (s[0] / n, s[1] / n)
        table.rows.append(FaithfulnessRow(label, bl, float(per_image.mean()), _sem(per_image), s[2] / n, s[3] / n, n,
                                          seconds[label] / n))
    for bl in labels_b:
        best = table.best(bl)
        for r in table.rows:
            if r.baseline == bl and r.method != best:
                r.vs_best, r.vs_best_sem = table.difference(r.method, best, bl)
    if "epsilon_gamma_box" in [m for m in methods.values() if isinstance(m, str)] and bounds is None:
        table.notes.append(f"epsilon_gamma_box used the input range [{box[0]:.4g}, {box[1]:.4g}] of the "
                           f"{'images' if isinstance(x, np.ndarray) else 'first batch'} as its z^B box.")
    return table
