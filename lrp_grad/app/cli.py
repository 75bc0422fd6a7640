"""The ``lrp-grad`` command line: ``demo``, ``explain``, ``concepts``, ``evaluate`` (in
:mod:`~lrp_grad.app.cli_evaluate`), ``export`` and ``bench``."""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

from . import cli_evaluate
from .cli_common import (PRESET_NAMES, _class_index, _image_model, _load_model, _positive_int,  # noqa: F401
                         _scale, parse_rule)
from .cli_inputs import IMAGE_SUFFIXES, explain_inputs, load_images

__all__ = ["main", "parse_rule"]

#: Set to 1 to see the Python traceback of an unexpected error (the CLI shows one line otherwise).
TRACEBACK_ENV = "LRP_GRAD_TRACEBACK"


def _quiet_tensorflow():
    """Import TensorFlow with its C++ start-up log silenced (see :func:`lrp_grad.quiet_tensorflow`)."""
    from .._quiet import quiet_tensorflow

    quiet_tensorflow()


def _output_folder(path, command, option):
    """``path`` as a folder to write into: refuse an existing file with a message."""
    out = pathlib.Path(path)
    if out.exists() and not out.is_dir():
        raise SystemExit(f"lrp-grad {command}: {option} {out} is a file; give a folder (it is created if missing).")
    return out


#: The preset names (``lrp_grad.core.presets.NAMES``, which imports the Keras front ends); kept
#: here so that a bad ``--rule`` is refused before TensorFlow loads (a test keeps the two equal).
def _progress(iterable, total, enabled, desc):
    if enabled:
        try:
            from tqdm import tqdm

            return tqdm(iterable, total=total, desc=desc)
        except ImportError:
            pass
    return iterable


def _explain_dataset(args, model, shape) -> int:
    """``--dataset DIR``: stream every image of a folder, constant memory, resumable."""
    from ..api.explainer import Explainer

    folder = pathlib.Path(args.dataset)
    if not folder.is_dir():
        raise SystemExit(f"lrp-grad explain: --dataset {folder} is not a folder.")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise SystemExit(f"lrp-grad explain: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in {folder}.")
    out = _output_folder(args.out, "explain", "--out")
    out.mkdir(parents=True, exist_ok=True)

    def images():
        for f in files:  # read lazily: memory stays flat however large the folder
            yield load_images([str(f)], shape, args.resize)[0] * (1 / 255 if args.scale is None else args.scale)

    ex = Explainer(model, rule=args.rule)
    target = "predicted" if args.target is None else args.target
    res = ex.explain_dataset(images(), target=target, batch_size=args.batch_size, out=out / "relevance.npy",
                             resume=args.resume, progress=not args.no_progress, length=len(files))
    def value(key, v):  # classes are ints in the JSON, the rest floats
        return int(v) if key in ("predicted", "target") else float(v)

    summary = {f.name: {k: value(k, v[i]) for k, v in res.summaries.items()} for i, f in enumerate(files)}
    (out / "summaries.json").write_text(json.dumps(summary, indent=1))
    print(f"wrote relevance.npy {tuple(res.relevance.shape)} (with its manifest relevance.npy.json) and "
          f"summaries.json (per file name) for {len(files)} images to {out}")
    return 0


def _concepts(args) -> int:
    import numpy as np

    from .. import concepts
    from ..concepts.atlas import concept_atlas
    from ..api.explainer import Explainer

    model, shape = _image_model(args.model, "concepts")
    x = load_images([args.image], shape, args.resize, "concepts") * args.scale
    ex = Explainer(model, rule=args.rule)
    if args.target is not None and args.target >= ex.n_classes:
        raise SystemExit(f"lrp-grad concepts: --target {args.target} is out of range: the model has {ex.n_classes} "
                         f"classes (0..{ex.n_classes - 1}).")
    layer = args.layer or _last_conv_label(ex)
    target = int(ex.forward(x).argmax(1)[0]) if args.target is None else args.target
    refs = None
    if args.references:
        files = sorted(p for p in pathlib.Path(args.references).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) \
            if pathlib.Path(args.references).is_dir() else []
        if not files:
            raise SystemExit(f"lrp-grad concepts: --references {args.references!r} is not a folder of images "
                             f"({', '.join(sorted(IMAGE_SUFFIXES))}).")
        data = (load_images([str(f)], shape, args.resize, "concepts")[0] * args.scale for f in files)
        refs = concepts.reference_samples(ex, data, layer, top=args.top_refs, target="predicted")
    out = _output_folder(args.out, "concepts", "--out")
    out.mkdir(parents=True, exist_ok=True)
    fig = concept_atlas(ex, x[0], target, layer, top=args.top, references=refs, n_refs=args.top_refs,
                        scheme=args.scheme, path=out / "atlas.png", rank=args.rank)
    C = ex.concept_relevance(x, target, layer=layer)[0]
    order = np.argsort(-np.abs(C) if args.rank == "magnitude" else -C)
    total = float(C.sum())
    rows = [{"channel": int(c), "relevance": float(C[c]), "share": float(C[c] / abs(total)) if total else 0.0}
            for c in order]
    (out / "concepts.json").write_text(json.dumps({"image": args.image, "layer": fig.atlas["layer"], "target": target,
                                                   "layer_total": total, "channels": rows}, indent=1))
    print(f"wrote atlas.png and concepts.json (the {len(rows)} channels of {fig.atlas['layer']!r} ranked for class "
          f"{target}) to {out}")
    return 0


def _last_conv_label(ex) -> str:
    from ..concepts import ConceptError, layer_channels

    for step in reversed(_plan_steps(ex)):
        if "Conv" in type(step.node.layer).__name__:
            try:
                layer_channels(ex, step.node.label)
            except ConceptError:
                continue
            return step.node.label
    raise SystemExit("lrp-grad concepts: the model has no convolution; name the layer with --layer.")


def _plan_steps(ex):
    return ex.passes.signed_plan.steps


def _explain(args) -> int:
    import numpy as np

    from ..visual.figures import save_png
    from ..api.explainer import Explainer

    model, shape = _image_model(args.model, "explain")
    if args.dataset is not None:
        return _explain_dataset(args, model, shape)
    out = _output_folder(args.out, "explain", "--out")
    x, keys, stems = explain_inputs(args.images, shape, args, out)
    ex = Explainer(model, rule=args.rule)
    if args.target is not None and args.target >= ex.n_classes:
        raise SystemExit(f"lrp-grad explain: --target {args.target} is out of range: the model has {ex.n_classes} "
                         f"classes (0..{ex.n_classes - 1}).")
    out.mkdir(parents=True, exist_ok=True)
    logits = ex.forward(x)
    targets = logits.argmax(1) if args.target is None else np.full(len(x), args.target)
    relevance = np.zeros_like(x)
    for i in _progress(range(len(x)), len(x), not args.no_progress, "explaining"):
        relevance[i] = ex(x[i:i + 1], target=targets[i:i + 1])[0]
        (out / stems[i]).parent.mkdir(parents=True, exist_ok=True)  # images of several folders: kept apart
        save_png(relevance[i], out / f"{stems[i]}_heatmap.png", scheme=args.scheme, colorbar=True)
        save_png(relevance[i], out / f"{stems[i]}_overlay.png", scheme=args.scheme, image=x[i])
    np.save(out / "relevance.npy", relevance)
    (out / "targets.json").write_text(json.dumps({k: int(t) for k, t in zip(keys, targets)}, indent=2))
    print(f"wrote {len(x)} heatmaps and overlays, relevance.npy {relevance.shape} and targets.json (one entry per "
          f"image, in the order of the rows) to {out}")
    return 0


def _demo(args) -> int:
    import tensorflow as tf

    from . import demo

    tf.get_logger().setLevel("ERROR")  # one Explainer per figure: TF's generic retracing notice is noise here
    res = demo.run(args.out, quick=args.quick, progress=not args.no_progress, lime=not args.no_lime,
                   train_cifar=args.train_cifar)
    flip = res["pixel_flipping"]
    print(f"wrote the study to {args.out}/report.md: MNIST test accuracy {res['mnist']['test_accuracy']:.3f}; "
          f"flipping the 10 most relevant pixels lowered p(true) in {flip['highest']['worse']:.0%} of the digits, "
          f"the 10 least relevant raised it in {flip['lowest']['improved']:.0%}")
    return 0


def _export(args) -> int:
    from ..api.explainer import Explainer
    from ..pipelines.export import check_target

    out = check_target(args.out, source=args.model)  # before the model is loaded: fail fast
    model = _load_model(args.model, "export")
    ex = Explainer(model, rule=args.rule)
    path = ex.export(out)
    print(f"wrote a SavedModel to {path} with signatures 'explain' (images, target) and 'serving_default' (images); "
          f"rule baked in: {ex.rule.name}")
    return 0


def _bench(args, rest) -> int:
    from . import bench

    return bench.main(rest)


_RULE_HELP = ("preset or rule (default: epsilon_plus_flat, the recommended composite; note that the Python API's "
              "default is AlphaBeta(2, 1), the seed report's rule); e.g. alphabeta:2,1, epsilon:0.01, seed_ab")


def main(argv=None) -> int:
    """Run the command line; returns the exit status. Errors are one message, never a traceback."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    parser = argparse.ArgumentParser(
        prog="lrp-grad",
        description="Layer-wise Relevance Propagation for Keras 3 and tf-keras models.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="regenerate the seed study on real MNIST and CIFAR-10 data")
    demo.add_argument("--out", default="lrp_grad_demo", help="output folder (default: lrp_grad_demo)")
    demo.add_argument("--quick", action="store_true", help="small, fast run (CI)")
    demo.add_argument("--no-lime", action="store_true", help="leave LIME out of the comparison")
    demo.add_argument("--train-cifar", action="store_true",
                      help="also train the seed's architecture on the Keras CIFAR-10 data if it is cached")
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")

    exp = sub.add_parser("explain", help="heatmaps and relevance.npy for your own model and images")
    exp.add_argument("--model", required=True, help="a model file saved by Keras 3 or tf-keras (.keras or .h5)")
    source = exp.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", nargs="+",
                        help="image files (PNG, JPEG, ...) and/or .npy/.npz arrays of images (N, H, W, C) or "
                             "(H, W, C): heatmaps + relevance.npy")
    source.add_argument("--dataset", help="a folder of images, streamed in batches: relevance.npy + summaries.json")
    exp.add_argument("--batch-size", type=_positive_int, default=256,
                     help="images per batch with --dataset (default 256)")
    exp.add_argument("--resume", action="store_true", help="with --dataset: continue a run that stopped")
    exp.add_argument("--target", type=_class_index, default=None,
                     help="class to explain (default: the predicted class)")
    exp.add_argument("--rule", type=parse_rule, default="epsilon_plus_flat", help=_RULE_HELP)
    exp.add_argument("--scale", type=_scale, default=None,
                     help="multiply pixel values (0-255) by this before the model (default 1/255 for image files, 1 "
                          "for .npy/.npz arrays; use 1 for models that take raw 0-255 pixels)")
    exp.add_argument("--resize", action="store_true", help="resize images to the model input size")
    exp.add_argument("--scheme", choices=["lrp", "seed"], default="lrp",
                     help="colours: lrp = red positive (default), seed = blue positive")
    exp.add_argument("--out", required=True, help="output folder")
    exp.add_argument("--no-progress", action="store_true", help="no progress bar")

    con = sub.add_parser("concepts", help="a concept atlas (CRP) for one image: which channels carry the decision")
    con.add_argument("--model", required=True, help="a model file saved by Keras 3 or tf-keras (.keras or .h5)")
    con.add_argument("--image", required=True, help="the image file to explain")
    con.add_argument("--layer", default=None, help="the layer whose channels are the concepts (default: the last "
                                                   "convolution)")
    con.add_argument("--target", type=_class_index, default=None, help="class to explain (default: the predicted)")
    con.add_argument("--top", type=_positive_int, default=4, help="concepts shown (default 4)")
    con.add_argument("--references", default=None,
                     help="a folder of images to search for each concept's reference samples (relevance "
                          "maximisation, each image explained for its predicted class)")
    con.add_argument("--top-refs", type=_positive_int, default=4, help="reference samples per concept (default 4)")
    con.add_argument("--rank", choices=["relevance", "magnitude"], default="relevance",
                     help="order concepts by signed relevance (default) or by |relevance|")
    con.add_argument("--rule", type=parse_rule, default="epsilon_plus_flat", help=_RULE_HELP)
    con.add_argument("--scale", type=_scale, default=1 / 255, help="multiply pixel values by this (default 1/255)")
    con.add_argument("--resize", action="store_true", help="resize images to the model input size")
    con.add_argument("--scheme", choices=["lrp", "seed"], default="lrp", help="heatmap colours")
    con.add_argument("--out", required=True, help="output folder: atlas.png and concepts.json")

    cli_evaluate.add_parser(sub)

    exp_model = sub.add_parser("export", help="write a SavedModel that explains without lrp_grad (TF Serving)")
    exp_model.add_argument("model", help="a model file saved by Keras 3 or tf-keras (.keras or .h5)")
    exp_model.add_argument("out", help="output SavedModel folder")
    exp_model.add_argument("--rule", type=parse_rule, default="epsilon_plus_flat", help=_RULE_HELP)

    sub.add_parser("bench", help="throughput benchmark (see lrp-grad bench --help)", add_help=False)

    argv = list(sys.argv[1:] if argv is None else argv)
    # Arguments are parsed and checked before TensorFlow loads (it takes 10-20 s): a usage error,
    # a missing file and --help are immediate and exit 2 (0 for --help).
    if argv[:1] == ["bench"]:
        from .bench_args import check

        check(argv[1:])
        return _guarded("bench", lambda: _bench(None, argv[1:]))
    args = parser.parse_args(argv)
    try:
        _check_files(args)
    except SystemExit as e:
        return _usage_error(e)
    run = {"demo": _demo, "explain": _explain, "export": _export, "concepts": _concepts,
           "evaluate": cli_evaluate.run}[args.command]
    return _guarded(args.command, lambda: run(args))


def _usage_error(e: SystemExit) -> int:
    """A ``SystemExit`` raised with a message (the CLI's bad-input errors): printed, exit status 2."""
    if not isinstance(e.code, str):
        raise e
    print(e.code, file=sys.stderr)
    return 2


def _check_files(args) -> None:
    """The input files and output folders named on the command line, before TensorFlow loads."""
    cmd = args.command
    model = getattr(args, "model", None)
    if model is not None and not os.path.exists(model):
        raise SystemExit(f"lrp-grad {cmd}: cannot load model {model!r}: no such file or folder.")
    if cmd == "evaluate":
        return cli_evaluate.check(args)  # folders of images, labels, methods, output files
    for path in list(getattr(args, "images", None) or []) + ([args.image] if cmd == "concepts" else []):
        if not os.path.isfile(path):
            what = "is a folder, not an image file" if os.path.isdir(path) else "no such file"
            raise SystemExit(f"lrp-grad {cmd}: cannot read image {path}: {what}.")
    if getattr(args, "dataset", None) is not None and not os.path.isdir(args.dataset):
        raise SystemExit(f"lrp-grad {cmd}: --dataset {args.dataset} is not a folder.")
    if cmd in ("explain", "concepts"):
        _output_folder(args.out, cmd, "--out")


def _guarded(command, run) -> int:
    """Run a command: a bad input (lrp_grad's own errors, the CLI's messages) exits 2, a failure
    (unexpected error, out of memory, a file system error) exits 1; one message, no traceback."""
    from ..errors import LRPError

    try:
        _quiet_tensorflow()
        return run()
    except SystemExit as e:
        return _usage_error(e)
    except LRPError as e:
        print(f"lrp-grad {command}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lrp-grad {command}: interrupted", file=sys.stderr)
        return 130
    except (OSError, MemoryError) as e:
        print(f"lrp-grad {command}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - the CLI never shows a traceback unless asked to
        if os.environ.get(TRACEBACK_ENV) == "1":
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"lrp-grad {command}: unexpected error: {type(e).__name__}: {first} "
              f"(set {TRACEBACK_ENV}=1 to see the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
