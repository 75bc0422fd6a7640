"""``lrp-grad evaluate``: the faithfulness table of :func:`lrp_grad.evaluate.faithfulness_table` (the
symmetric relevance gain of several attribution methods, with standard errors) for a saved model and
its images.

:func:`check` reads and checks the arguments before TensorFlow loads (methods, baselines, the labels
file, the image paths, the output files), so a mistake is reported at once; :func:`run` loads the
model and the images, computes the table, prints it and writes the files asked for.
"""
from __future__ import annotations

import json
import pathlib

from .cli_inputs import ARRAY_SUFFIXES, IMAGE_SUFFIXES, load_array_file, load_images

__all__ = ["add_parser", "check", "run", "method_names", "parse_methods", "read_labels", "LABEL_KEYS"]

PREFIX = "lrp-grad evaluate"
#: Arrays of an ``--images`` .npz that hold the classes of its images rather than images.
LABEL_KEYS = ("y", "labels")
#: Picture types ``--plot`` writes (matplotlib reads the type from the file name).
PLOT_SUFFIXES = (".png", ".pdf", ".svg", ".jpg", ".jpeg")
#: The rule forms of ``--rules`` besides the method names (what :func:`~lrp_grad.app.cli.parse_rule` reads).
RULE_FORMS = "z, zplus, flat, wsquare, epsilon[:EPS], alphabeta:A,B, gamma[:G], zbox:LOW,HIGH"
_RULE_NAMES = ("z", "zplus", "flat", "wsquare", "epsilon", "alphabeta", "gamma", "zbox")


def method_names() -> tuple:
    """:func:`lrp_grad.evaluate.method_names` without importing TensorFlow (a test keeps them equal)."""
    from ..evaluate.compare import _ATTENTION, _OTHER, GRADIENT_METHODS
    from .cli_common import PRESET_NAMES

    return tuple(PRESET_NAMES) + _ATTENTION + GRADIENT_METHODS + _OTHER


def _fail(message: str):
    raise SystemExit(f"{PREFIX}: {message}")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _items(values, option: str, numbers_continue: bool) -> list:
    """The comma-separated items of one or more arguments. With ``numbers_continue`` a number after
    a comma belongs to the rule before it: ``epsilon_plus,alphabeta:2,1,gradient`` is three items."""
    items = []
    for value in values:
        start = len(items)
        for token in value.split(","):
            token = token.strip()
            if numbers_continue and len(items) > start and ":" in items[-1] and _is_number(token):
                items[-1] += "," + token
            elif not token:
                _fail(f"{option} {value!r} has an empty item; separate the names by single commas "
                      "(e.g. mean,blur).")
            else:
                items.append(token)
    return items


def parse_methods(values) -> dict:
    """``{label: method}`` from ``--rules``: method names are passed on as names (the library builds
    them), rule specs as the rules :func:`~lrp_grad.app.cli.parse_rule` makes; the label is the text given."""
    import argparse

    from .cli_common import parse_rule

    known = method_names()
    methods = {}
    for item in _items(values, "--rules", numbers_continue=True):
        if item in methods:
            _fail(f"--rules names {item!r} twice; give each method once.")
        if item in known:
            methods[item] = item
            continue
        try:
            methods[item] = parse_rule(item)
        except argparse.ArgumentTypeError as e:
            if item.partition(":")[0] in _RULE_NAMES and str(e).startswith(f"--rule {item!r}:"):
                _fail(f"--rules {str(e)[len('--rule '):]}")  # a known rule with bad parameters
            _fail(f"--rules {item!r} is not known; use a method ({', '.join(known)}) or a rule ({RULE_FORMS}), "
                  "comma-separated.")
    if "lime" in methods:
        import importlib.util

        if importlib.util.find_spec("lime") is None:
            _fail("--rules lime needs the package 'lime' (pip install lime); install it or leave lime out.")
    return methods


def parse_baselines(values) -> list:
    from ..evaluate.region import BASELINES

    baselines = _items(values, "--baselines", numbers_continue=False)
    for b in baselines:
        if b not in BASELINES:
            _fail(f"--baselines {b!r} is not known; use {', '.join(BASELINES)} (comma-separated, e.g. mean,blur).")
        if baselines.count(b) > 1:
            _fail(f"--baselines names {b!r} twice; give each baseline once.")
    return baselines


# ---------------------------------------------------------------------------------------------
# Labels


def _class_indices(a, where: str):
    """``a`` as int64 class indices ``(n,)``: integers, whole floats or one-hot rows."""
    import numpy as np

    a = np.asarray(a)
    if a.dtype == bool or not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
        _fail(f"{where} has dtype {a.dtype}; it must hold class indices (integers), one per image.")
    if a.ndim == 2 and a.shape[1] > 1 and np.all((a == 0) | (a == 1)) and np.all(a.sum(1) == 1):
        a = a.argmax(1)  # one-hot rows
    if a.ndim != 1:
        _fail(f"{where} has shape {a.shape}; give one class index per image, shape (n,), or one-hot rows (n, classes).")
    if len(a) == 0:
        _fail(f"{where} holds no labels.")
    if not np.all(np.isfinite(a)) or not np.all(a == np.round(a)):
        bad = int(np.argmax(~np.isfinite(a) | (a != np.round(a))))
        _fail(f"{where}: label {a[bad].item()!r} (position {bad}) is not a class index (an integer >= 0).")
    if a.min() < 0:
        bad = int(np.argmin(a))
        _fail(f"{where}: label {int(a[bad])} (position {bad}) is not a class index (an integer >= 0).")
    return a.astype(np.int64)


def read_labels(path):
    """The classes of ``--labels``: a .npy array, a .npz (its array ``y`` or ``labels``, or its only
    array), or a text file of integers separated by white space or commas. One-hot rows are accepted."""
    import numpy as np

    p = pathlib.Path(path)
    what = "one class index per image: a .npy, .npz or .txt file"
    if p.is_dir():
        _fail(f"--labels {path} is a folder; give a file ({what}).")
    if not p.is_file():
        _fail(f"--labels {path}: no such file ({what}).")
    if p.suffix.lower() in ARRAY_SUFFIXES:
        try:
            loaded = np.load(p, allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:
            _fail(f"cannot read --labels {path}: {e}")
        if isinstance(loaded, np.ndarray):
            return _class_indices(loaded, f"--labels {path}")
        with loaded:
            keys = list(loaded.files)
            key = next((k for k in LABEL_KEYS if k in keys), keys[0] if len(keys) == 1 else None)
            if key is None:
                _fail(f"--labels {path} holds the arrays {keys}; name the array of classes 'y' or 'labels'.")
            return _class_indices(loaded[key], f"--labels {path}[{key!r}]")
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as e:
        _fail(f"cannot read --labels {path} as text ({type(e).__name__}); give {what}.")
    values = []
    for line_no, line in enumerate(text.splitlines(), 1):
        for token in line.replace(",", " ").split():
            try:
                values.append(int(token))
            except ValueError:
                _fail(f"--labels {path}, line {line_no}: {token!r} is not a class index (an integer >= 0); the file "
                      "holds class indices separated by spaces, commas or new lines.")
    return _class_indices(np.array(values, dtype=np.int64), f"--labels {path}")


def _npz_labels(path):
    """``(where, labels)`` of an ``--images`` .npz that holds an array named ``y`` or ``labels``, else None."""
    import numpy as np

    if pathlib.Path(path).suffix.lower() != ".npz":
        return None
    try:
        with np.load(path, allow_pickle=False) as loaded:
            key = next((k for k in LABEL_KEYS if k in loaded.files), None)
            if key is None:
                return None
            where = f"{path}[{key!r}]"
            return where, _class_indices(loaded[key], where)
    except (OSError, ValueError, EOFError) as e:
        _fail(f"cannot read array file {path}: {e}")


# ---------------------------------------------------------------------------------------------
# Paths


def expand_images(paths) -> list:
    """``--images`` as a list of files: a folder stands for its image and array files, sorted by
    name (not its subfolders). The same file named twice is refused: it would count twice."""
    files, seen = [], {}
    for path in paths:
        p = pathlib.Path(path)
        if p.is_dir():
            readable = IMAGE_SUFFIXES | ARRAY_SUFFIXES
            inside = sorted((q for q in p.iterdir() if q.is_file() and q.suffix.lower() in readable),
                            key=lambda q: q.name)
            if not inside:
                _fail(f"--images {path} is a folder without images ({', '.join(sorted(IMAGE_SUFFIXES))}) or arrays "
                      "(.npy, .npz).")
            found = [str(q) for q in inside]
        elif p.is_file():
            found = [str(path)]
        else:
            _fail(f"cannot read image {path}: no such file or folder.")
        for f in found:
            real = pathlib.Path(f).resolve()
            if real in seen:
                _fail(f"--images gives the file {f} twice (from {seen[real]!r} and {str(path)!r}); give each image "
                      "once (it would count twice in the means).")
            seen[real] = str(path)
        files += found
    return files


def _plot_paths(path, baselines) -> list:
    """``[(baseline, file)]``: ``--plot FILE`` for one baseline, ``FILE_STEM-BASELINE.SUFFIX`` for each of several."""
    p = pathlib.Path(path)
    if len(baselines) == 1:
        return [(baselines[0], p)]
    return [(b, p.with_name(f"{p.stem}-{b}{p.suffix}")) for b in baselines]


def _output_files(args) -> list:
    """``[(option, path)]`` of every file the command writes, checked: no folder, no input, each once."""
    outputs = [(o, pathlib.Path(getattr(args, o[2:]))) for o in ("--json", "--markdown") if getattr(args, o[2:])]
    if args.plot:
        if pathlib.Path(args.plot).suffix.lower() not in PLOT_SUFFIXES:
            _fail(f"--plot {args.plot}: give a picture file name ending in {', '.join(PLOT_SUFFIXES)} (matplotlib "
                  "writes the type the name ends in).")
        outputs += [("--plot", p) for _, p in _plot_paths(args.plot, args.baseline_list)]
    given = [args.model, *args.image_files] + ([args.labels] if args.labels else [])
    inputs = {pathlib.Path(f).resolve() for f in given}
    taken = {}
    for option, p in outputs:
        if p.is_dir():
            example = {"--json": "table.json", "--markdown": "table.md"}.get(option, "curves.png")
            _fail(f"{option} {p} is a folder; give a file name (e.g. {p / example}).")
        for parent in p.parents:
            if parent.exists() and not parent.is_dir():
                _fail(f"{option} {p}: {parent} is a file, not a folder; give a path in a folder (it is created if "
                      "missing).")
        real = p.resolve()
        if real in inputs:
            _fail(f"{option} {p} would overwrite an input file (the model, an image or the labels); give another name.")
        if real in taken:
            _fail(f"{option} {p} is also the file of {taken[real]}; give each output its own name.")
        taken[real] = option
    return outputs


def check(args) -> None:
    """Everything that can be checked before TensorFlow loads; the parsed values are kept on ``args``."""
    args.method_map = parse_methods(args.rules) if args.rules else None
    args.baseline_list = parse_baselines(args.baselines)
    args.image_files = expand_images(args.images)
    args.label_values = read_labels(args.labels) if args.labels else None
    _output_files(args)


# ---------------------------------------------------------------------------------------------
# Running


def _read_images(args, shape):
    """``(x, keys, total, parts)``: the first ``--limit`` images of ``--images`` (image files scaled by
    ``--scale``, default 1/255; arrays as they are unless ``--scale`` is given), the name of each row,
    the number of images given and per input file ``(file, images, (where, labels) or None)``."""
    import numpy as np

    need = args.limit
    scale_images = 1 / 255 if args.scale is None else args.scale
    rows, keys, parts = [], [], []
    for f in args.image_files:
        if pathlib.Path(f).suffix.lower() in ARRAY_SUFFIXES:
            batches = load_array_file(f, shape, "evaluate", skip=LABEL_KEYS)
            count = sum(len(b) for _, b in batches)
            labels = _npz_labels(f) if args.label_values is None else None  # --labels wins
            if labels is not None and len(labels[1]) != count:
                _fail(f"{labels[0]} has {_count(len(labels[1]), 'label')} but {f} holds {_count(count, 'image')}; "
                      "give one class index per image.")
            for name, batch in batches:
                take = batch if need is None else batch[:max(0, need - len(keys))]
                if len(take):
                    rows.append(take if args.scale is None else take * args.scale)
                    keys += [f"{f}[{name + ', ' if name else ''}{j}]" for j in range(len(take))]
        else:
            count, labels = 1, None
            if need is None or len(keys) < need:
                rows.append(load_images([f], shape, args.resize, "evaluate") * scale_images)
                keys.append(f)
        parts.append((f, count, labels))
    return np.concatenate(rows).astype(np.float32), keys, sum(p[1] for p in parts), parts


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'s' * (n != 1)}"


def _targets(args, n, total, parts):
    """``(labels or None, where they come from)`` for the ``n`` images evaluated of the ``total`` given."""
    import numpy as np

    if args.label_values is not None:
        if len(args.label_values) != total:
            _fail(f"--labels {args.labels} has {_count(len(args.label_values), 'label')} but --images holds "
                  f"{_count(total, 'image')}; "
                  "give one class index per image, in the order of --images (folders sorted by name, arrays row "
                  "by row).")
        return args.label_values[:n], f"--labels {args.labels}"
    labelled = [p for p in parts if p[2] is not None]
    if not labelled:
        return None, None
    unlabelled = [p for p in parts if p[2] is None]
    if unlabelled:
        _fail(f"{labelled[0][2][0]} holds the classes of its images but {unlabelled[0][0]} has none; give --labels "
              f"FILE with the classes of all {total} images, in order, or evaluate the labelled arrays alone.")
    where = labelled[0][2][0] if len(labelled) == 1 else f"the arrays {'/'.join(LABEL_KEYS)} of the .npz files"
    return np.concatenate([p[2][1] for p in parts])[:n], where


def _check_sizes(args, model, shape, labels, keys, where):
    """Labels that are no class of the model, and --patch/--steps that do not fit the images."""
    out_shape = tuple(model.output_shape)
    if labels is not None and len(out_shape) == 2 and out_shape[-1]:
        classes = int(out_shape[-1])
        if labels.max() >= classes:
            bad = int(labels.argmax())
            hint = ("; a binary classifier with one output unit is explained with label 0 for both classes (its unit)"
                    if classes == 1 else "")
            _fail(f"{where}: label {int(labels[bad])} of image {keys[bad]} is not a class of the model, which has "
                  f"{classes} output{'s' * (classes != 1)} (classes 0..{classes - 1}){hint}.")
    h, w = shape[:2]
    regions = -(-h // args.patch) * -(-w // args.patch)
    if regions == 1:
        _fail(f"--patch {args.patch} makes each {h}x{w} image a single region: both orders remove the same region "
              f"and every method scores 0; give --patch below {max(h, w)} (default 4).")
    if args.steps is not None and args.steps > regions:
        _fail(f"--steps {args.steps} but {h}x{w} images have only {regions} regions of {args.patch}x{args.patch}; "
              f"give --steps {regions} or less, or leave it out for all of them.")


class _Progress:
    """A progress bar over the (method, batch) steps of :func:`faithfulness_table`, on stderr."""

    def __init__(self, total, enabled):
        self.bar, self.started = None, False
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, desc="evaluating", unit="method")
            except ImportError:
                pass

    def __call__(self, text):
        if self.bar is not None:
            if self.started:
                self.bar.update(1)
            self.started = True
            self.bar.set_postfix_str(text)

    def close(self):
        if self.bar is not None:
            if self.started:
                self.bar.update(1)
            self.bar.close()


def run(args) -> int:
    from .. import evaluate
    from .cli_common import _image_model

    model, shape = _image_model(args.model, "evaluate")
    x, keys, total, parts = _read_images(args, shape)
    labels, where = _targets(args, len(x), total, parts)
    _check_sizes(args, model, shape, labels, keys, where)
    methods = args.method_map or {m: m for m in evaluate.DEFAULT_METHODS}
    batch = args.batch_size or 256
    progress = _Progress(len(methods) * -(-len(x) // batch), not args.no_progress)
    try:
        table = evaluate.faithfulness_table(model, x, labels, methods=methods, baselines=args.baseline_list,
                                            patch=args.patch, steps=args.steps, output=args.output,
                                            batch_size=args.batch_size, seed=args.seed, progress=progress)
    finally:
        progress.close()
    predicted = evaluate.probabilities(model, x).argmax(1)
    if labels is None:
        explained = "the class the model predicts for each image (no --labels given)"
    else:
        explained = (f"the label of each image, from {where}; the model predicts {int((predicted == labels).sum())} of "
                     f"{len(x)} of them")
    print(table)
    print(f"explained class: {explained}")
    if len(x) < total:
        print(f"evaluated the first {len(x)} of the {total} images (--limit {args.limit})")
    written = []
    if args.json:
        info = {"model": str(args.model), "images": keys, "explained": "labels" if labels is not None else "predicted",
                "labels": where, "targets": [int(t) for t in (predicted if labels is None else labels)],
                "methods": {k: m if isinstance(m, str) else repr(m) for k, m in methods.items()},
                **table.to_dict(),
                "per_image_srg": {f"{m} | {b}": s.tolist() for (m, b), s in table.scores.items()}}
        written.append(_write(args.json, json.dumps(info, indent=1)))
    if args.markdown:
        units = {"probability": "probabilities"}.get(table.output, f"{table.output}s")
        caption = (f"Symmetric relevance gain (area LeRF - area MoRF, {units}) on {table.n} images, "
                   f"{table.patch}x{table.patch} regions, {table.steps} steps; mean ± standard error, bold: the best "
                   f"or within 2 paired standard errors of it. Explained class: {explained}.")
        notes = "".join(f"\nNote: {n}\n" for n in table.notes)
        written.append(_write(args.markdown, f"{caption}\n\n{table.markdown()}\n{notes}"))
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        for b, path in _plot_paths(args.plot, table.baselines):
            path.parent.mkdir(parents=True, exist_ok=True)
            plt.close(table.plot(path, baseline=b))
            written.append(str(path))
    if written:
        print(f"wrote {', '.join(written)}")
    return 0


def _write(path, text) -> str:
    p = pathlib.Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text, encoding="utf-8")
    return str(p)


# ---------------------------------------------------------------------------------------------
# The parser


def add_parser(sub):
    """Register ``evaluate`` on the ``lrp-grad`` subparsers ``sub``."""
    from .cli_common import _int_at_least, _positive_int, _scale

    ev = sub.add_parser("evaluate", help="the faithfulness table (symmetric relevance gain of several methods) for "
                                         "your own model and images")
    ev.add_argument("--model", required=True, help="a model file saved by Keras 3 or tf-keras (.keras or .h5): a "
                                                   "classifier with output (n, classes)")
    ev.add_argument("--images", nargs="+", required=True,
                    help="image files (PNG, JPEG, ...), folders of them (sorted by name) and/or .npy/.npz arrays of "
                         "images (N, H, W, C); an array named y or labels in a .npz holds the classes of its images")
    ev.add_argument("--labels", default=None,
                    help="the true class of every image, in order: a .npy, .npz or text file of integers (default: "
                         "the labels in the .npz files, else the predicted class is explained)")
    ev.add_argument("--rules", "--methods", dest="rules", nargs="+", default=None, metavar="METHODS",
                    help="comma-separated methods: presets (epsilon_plus_flat, ...), attnlrp, cplrp, gradient, "
                         "gradient_x_input, integrated_gradients, smoothgrad, random, lime, or rules such as "
                         "alphabeta:2,1 and epsilon:0.1 (default: the four LRP presets, the four gradient methods "
                         "and random)")
    ev.add_argument("--baselines", nargs="+", default=["mean,blur"], metavar="BASELINES",
                    help="comma-separated: what a removed region becomes: mean, blur, zero, uniform "
                         "(default mean,blur)")
    ev.add_argument("--patch", type=_positive_int, default=4, help="region size in pixels (default 4)")
    ev.add_argument("--steps", type=_positive_int, default=None,
                    help="regions removed per curve (default: all of them)")
    ev.add_argument("--output", choices=["logit", "probability"], default="logit",
                    help="the explained output the curves follow (default logit)")
    ev.add_argument("--batch-size", type=_positive_int, default=None, help="images per batch (default 256)")
    ev.add_argument("--limit", type=_positive_int, default=None, help="evaluate only the first N images")
    ev.add_argument("--seed", type=_int_at_least(0, "a seed"), default=0,
                    help="seed of random, smoothgrad and the uniform baseline (default 0)")
    ev.add_argument("--scale", type=_scale, default=None,
                    help="multiply pixel values (0-255) by this before the model (default 1/255 for image files, 1 "
                         "for .npy/.npz arrays)")
    ev.add_argument("--resize", action="store_true", help="resize images to the model input size")
    ev.add_argument("--json", default=None, help="also write the table, curves and per-image scores to this JSON file")
    ev.add_argument("--markdown", default=None, help="also write the table as Markdown to this file")
    ev.add_argument("--plot", default=None,
                    help="also draw the mean MoRF and LeRF curves to this picture (.png, .pdf, .svg); with several "
                         "baselines one file each, named FILE-BASELINE.png")
    ev.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ev
