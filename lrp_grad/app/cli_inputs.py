"""What ``lrp-grad explain``, ``concepts`` and ``evaluate`` read: image files (Pillow) and numpy
arrays, and the names their outputs are written under. Messages name the command (``command``)."""
from __future__ import annotations

import os
import pathlib

__all__ = ["IMAGE_SUFFIXES", "ARRAY_SUFFIXES", "load_images", "load_array_file", "explain_inputs", "image_names",
           "too_large"]


def load_images(paths, shape, resize, command="explain"):
    """Read image files as a batch shaped like the model input ``shape`` (H, W, C)."""
    import numpy as np
    from PIL import Image

    height, width, channels = shape
    mode = {1: "L", 3: "RGB"}.get(channels)
    if mode is None:
        raise SystemExit(f"lrp-grad {command}: the model takes {channels} channels; only 1 (gray) or 3 (RGB) images "
                         "can be read from files.")
    batch = []
    for path in paths:
        try:
            img = Image.open(path).convert(mode)
        except Image.DecompressionBombError:
            raise SystemExit(too_large(path, command)) from None
        except (OSError, ValueError) as e:
            raise SystemExit(f"lrp-grad {command}: cannot read image {path}: {e}") from None
        if img.size != (width, height):
            if not resize:
                raise SystemExit(f"lrp-grad {command}: image {path} is {img.size[0]}x{img.size[1]} but the model takes "
                                 f"{width}x{height}; pass --resize to resize it.")
            img = img.resize((width, height), Image.BILINEAR)
        arr = np.asarray(img, dtype=np.float32)
        batch.append(arr[..., None] if channels == 1 else arr)
    return np.stack(batch)


def too_large(path, command="explain") -> str:
    """The message for an image above Pillow's decompression-bomb limit (its size read from the
    header only: nothing is decoded)."""
    from PIL import Image

    limit = Image.MAX_IMAGE_PIXELS
    try:
        Image.MAX_IMAGE_PIXELS = None  # only the header is read: opening decodes nothing
        with Image.open(path) as img:
            width, height = img.size
    except Exception:  # noqa: BLE001 - the size is a courtesy; the refusal stands without it
        width = height = None
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    size = f"{width}x{height} = {width * height:,} pixels" if width else "too large"
    return (f"lrp-grad {command}: image {path} is {size}, more than Pillow reads safely ({limit:,} pixels: "
            "a file this large can be a decompression bomb); it is not read. Shrink it to about the model's input "
            "size first (e.g. with Pillow: Image.open(path).reduce(8).save('small.png') after raising "
            "PIL.Image.MAX_IMAGE_PIXELS for a file you trust).")


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def image_names(paths, out):
    """``(keys, stems)`` for the images of ``explain --images``, unique however the files are named.

    A key is the image's path relative to the folder all images share (``img0.png`` for images
    of one folder, ``a/digit.png`` and ``b/digit.png`` otherwise): ``targets.json`` is keyed by it.
    A stem is the key without its extension, with the extension kept (``digit_png``) where two
    images differ only in it (compared case-insensitively, as some file systems do); the heatmap
    and overlay are written to ``out/STEM_heatmap.png`` and ``out/STEM_overlay.png``. The same file
    given twice, and an output that would overwrite an input image, are refused.
    """
    from ..errors import OutputPathError

    absolute = [pathlib.Path(os.path.abspath(p)) for p in paths]
    seen = {}
    for p, a in zip(paths, absolute):
        real = a.resolve()
        if real in seen:
            raise OutputPathError(f"--images names the same file twice ({seen[real]} and {p}); give each image "
                                  "once (its heatmap and targets.json entry would be written twice).")
        seen[real] = p
    try:
        root = pathlib.Path(os.path.commonpath([str(a.parent) for a in absolute]))
        keys = [a.relative_to(root).as_posix() for a in absolute]
    except ValueError:  # different drives: keep the whole path
        keys = [a.as_posix().replace(":", "") for a in absolute]
    pure = [pathlib.PurePosixPath(k) for k in keys]
    stems = [str(k.with_suffix("")) for k in pure]
    counts = {}
    for stem in stems:
        counts[stem.casefold()] = counts.get(stem.casefold(), 0) + 1
    stems = [f"{st}_{k.suffix[1:]}" if counts[st.casefold()] > 1 and k.suffix else st for st, k in zip(stems, pure)]
    taken = set()
    for i, stem in enumerate(stems):  # still equal (e.g. 'x_png.png' next to 'x.png' and 'x.jpg'): number them
        unique, n = stem, 2
        while unique.casefold() in taken:
            unique, n = f"{stem}_{n}", n + 1
        taken.add(unique.casefold())
        stems[i] = unique
    outputs = {(out / f"{st}_{kind}.png").resolve() for st in stems for kind in ("heatmap", "overlay")}
    outputs |= {(out / name).resolve() for name in ("relevance.npy", "targets.json")}
    for p in paths:
        if pathlib.Path(p).resolve() in outputs:
            raise OutputPathError(f"--out {out} would overwrite the input image {p} with an output of the same "
                                  "name; give another --out folder.")
    return keys, stems


ARRAY_SUFFIXES = {".npy", ".npz"}


def load_array_file(path, shape, command="explain", skip=()):
    """The batches of a ``.npy``/``.npz`` file as ``[(name, (n, H, W, C) float32 array)]``: one
    for a ``.npy``, one per array of a ``.npz`` (named by its key; the keys in ``skip`` are left
    out). ``(H, W, C)`` is one image."""
    import numpy as np

    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise SystemExit(f"lrp-grad {command}: cannot read array file {path}: {e}") from None
    if isinstance(loaded, np.ndarray):
        arrays = [("", loaded)]
    else:
        with loaded:
            keys = loaded.files
            arrays = [(key, loaded[key]) for key in keys if key not in skip]
        if not arrays:
            only = f" of images, only {', '.join(repr(k) for k in keys)}" if keys else ""
            raise SystemExit(f"lrp-grad {command}: {path} holds no arrays{only}.")
    out = []
    for key, a in arrays:
        where = f"{path}" + (f" (array {key!r})" if key else "")
        if a.dtype == bool or not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
            raise SystemExit(f"lrp-grad {command}: {where} has dtype {a.dtype}; it must hold numbers (images).")
        batch = a[None] if a.ndim == len(shape) else a
        if batch.ndim != len(shape) + 1 or tuple(batch.shape[1:]) != tuple(shape):
            from ..api.request import _channels_first_hint

            hint = _channels_first_hint(batch.shape, shape, "x") if batch.ndim == len(shape) + 1 else ""
            raise SystemExit(f"lrp-grad {command}: {where} has shape {a.shape} but the model takes images "
                             f"{tuple(shape)}: give a batch (N, {', '.join(map(str, shape))}) or one image "
                             f"{tuple(shape)} (arrays are not resized).{hint}")
        if len(batch) == 0:
            raise SystemExit(f"lrp-grad {command}: {where} is empty (shape {a.shape}).")
        out.append((key, batch.astype(np.float32)))
    return out


def explain_inputs(paths, shape, args, out):
    """``(x, keys, stems)`` for ``explain --images``: image files (scaled by ``--scale``, default
    1/255) and ``.npy``/``.npz`` batches (taken as they are unless ``--scale`` is given), one row
    per image, in the order given. An array's rows are keyed ``x.npy[0]`` and written as
    ``x_0000_heatmap.png`` (``x_KEY_0000`` for the arrays of a ``.npz``)."""
    import numpy as np

    from ..errors import OutputPathError

    file_keys, file_stems = image_names(paths, out)  # before any work: names that collide are refused
    rows, keys, stems = [], [], []
    pictures = [i for i, p in enumerate(paths) if pathlib.Path(p).suffix.lower() not in ARRAY_SUFFIXES]
    scale_images = 1 / 255 if args.scale is None else args.scale
    loaded = dict(zip(pictures, load_images([paths[i] for i in pictures], shape, args.resize) * scale_images)) \
        if pictures else {}
    for i, p in enumerate(paths):
        if i in loaded:
            rows.append(loaded[i][None])
            keys.append(file_keys[i])
            stems.append(file_stems[i])
            continue
        for name, batch in load_array_file(p, shape):
            rows.append(batch if args.scale is None else batch * args.scale)
            label = f"{file_stems[i]}_{name}" if name else file_stems[i]
            keys += [f"{file_keys[i]}[{name + ', ' if name else ''}{j}]" for j in range(len(batch))]
            stems += [f"{label}_{j:04d}" for j in range(len(batch))]
    seen = {}
    for k, st in zip(keys, stems):
        if st.casefold() in seen:
            raise OutputPathError(f"--images: {seen[st.casefold()]} and {k} would both be written as {st}_heatmap.png; "
                                  "rename one of the files.")
        seen[st.casefold()] = k
    return np.concatenate(rows).astype(np.float32), keys, stems
