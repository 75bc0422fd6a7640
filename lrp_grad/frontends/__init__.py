"""The Keras front ends: the only code that imports a Keras package.

One module per package, each turning a model of its package into the neutral
:class:`~lrp_grad.frontends.graph.Graph` that the core (handlers, canonizers, the planner) reads:

- :mod:`lrp_grad.frontends.keras3` for Keras 3 (``import keras``; ``tf.keras`` since TF 2.16),
- :mod:`lrp_grad.frontends.tf_keras` for tf-keras (the Keras 2 API).

This module picks the front end of a model, walks it (:func:`walk`; nested graph models and the
layers looked into are inlined by :mod:`~lrp_grad.frontends.inline`) and loads model files with
the package that wrote them (:func:`load_model`). The package-neutral class questions the core
asks (:func:`is_layer`, :func:`layer_classes`) are answered by :mod:`~lrp_grad.frontends.classes`.
"""
from __future__ import annotations

import json
import os
import pathlib
import weakref
import zipfile

from ..errors import ModelFileError, UnsupportedModelError
from . import keras3, tf_keras
from .classes import (FRONTENDS, activation_name, is_instance, is_layer, is_layer_class, is_model, layer_classes,
                      package_of)
from .graph import RAW_KINDS, AttentionCore, Graph, Node, RawOp, class_name, layer_label
from .inline import TRAINING_NOTE, inline, shape_of

__all__ = ["FRONTENDS", "Graph", "Node", "RawOp", "AttentionCore", "RAW_KINDS", "TRAINING_NOTE", "frontend_for",
           "check_model", "walk",
           "activation_name", "class_name", "is_instance", "is_layer", "layer_classes", "is_model", "is_layer_class", "layer_label",
           "load_model", "output_names", "package_of", "source_path"]


def frontend_for(model):
    """The front end module of ``model``'s Keras package (raises for anything else)."""
    for frontend in FRONTENDS:
        if frontend.owns(model):
            if not isinstance(model, frontend.Model):
                break
            return frontend
    names = " or a ".join("keras.Model (Keras 3)" if f is keras3 else "tf_keras.Model" for f in FRONTENDS)
    raise UnsupportedModelError(
        f"model must be a {names}, Sequential or Functional; got {type(model).__name__} "
        f"({type(model).__module__}). To explain a saved model, load it first: lrp_grad.load_model(path)."
    )


def check_model(model):
    """Raise :class:`UnsupportedModelError` unless ``model`` can be walked; returns its front end."""
    frontend = frontend_for(model)
    frontend.check_model(model)
    return frontend


def output_names(model) -> list:
    """The names of the model's outputs, in order: the keys of a dict of outputs, else the output
    layers' names."""
    frontend = check_model(model)
    _, outputs = frontend.io(model)
    return _output_names(frontend, model, outputs)[0]


def _output_names(frontend, model, outputs):
    """``(names, aliases)``: the outputs' names (dict keys, else layer names) and, for a dict of
    outputs, the layer names that may name them too."""
    layer_names = list(getattr(model, "output_names", None) or [])
    if len(layer_names) != len(outputs):
        layer_names = [_tensor_name(t, f"output_{i}") for i, t in enumerate(outputs)]
    layer_names = [str(n) for n in layer_names]
    keys = frontend.output_keys(model)
    if keys is not None and len(keys) == len(outputs):
        return [str(k) for k in keys], layer_names
    return layer_names, layer_names


def _select_output(model, output, outputs, names, nodes, aliases=(), input_names=()):
    """``(tensor id, output name, shape)`` of the output to explain (see :func:`walk`)."""
    shown = ", ".join(repr(n) for n in names)
    if output is None:
        if len(outputs) != 1:
            raise UnsupportedModelError(
                f"model {model.name!r} has {len(outputs)} outputs ({shown}); say which one to explain: "
                f"Explainer(model, output={names[0]!r}) or output=0 (an index).")
        return str(id(outputs[0])), names[0], shape_of(outputs[0])
    if isinstance(output, bool) or not isinstance(output, (int, str)):
        raise UnsupportedModelError(
            f"output={output!r} must be an output name ({shown}), an output index (0..{len(outputs) - 1}) or the "
            "name of a layer whose output to explain.")
    if isinstance(output, int):
        if not -len(outputs) <= output < len(outputs):
            raise UnsupportedModelError(
                f"output={output} is out of range: model {model.name!r} has {len(outputs)} output(s) ({shown}).")
        return str(id(outputs[output])), names[output], shape_of(outputs[output])
    for known in (names, aliases):
        if output in known:
            i = list(known).index(output)
            return str(id(outputs[i])), names[i], shape_of(outputs[i])
    if output in input_names:
        raise UnsupportedModelError(
            f"output={output!r} is an input of model {model.name!r}; there is nothing to explain. Name an output "
            f"({shown}) or a layer.")
    by_label = [n for n in nodes if n.label == output]
    by_name = by_label or [n for n in nodes if getattr(n.layer, "name", None) == output]
    if len(by_name) > 1:
        labels = ", ".join(repr(n.label) for n in by_name)
        raise UnsupportedModelError(
            f"output={output!r}: layer {output!r} is called {len(by_name)} times in model {model.name!r}; name one "
            f"call: {labels}.")
    if not by_name:
        layers = [n.label for n in nodes]
        hint = ", ".join(repr(x) for x in layers[:12]) + (", ..." if len(layers) > 12 else "")
        raise UnsupportedModelError(
            f"output={output!r} is neither an output of model {model.name!r} ({shown}) nor one of its layers "
            f"({hint}).")
    node = by_name[0]
    if len(node.outputs) != 1:
        raise UnsupportedModelError(
            f"output={output!r}: layer {layer_label(node.layer)} has {len(node.outputs)} outputs; only layers with "
            "one output can be explained.")
    return node.outputs[0], output, node.output_shapes[0]


def _prune(nodes, output_id):
    """The nodes the output depends on, in execution order."""
    needed, kept = {output_id}, []
    for node in reversed(nodes):
        if any(t in needed for t in node.outputs):
            kept.append(node)
            needed.update(node.inputs)
    return tuple(reversed(kept))


def _dtype_name(t) -> str:
    return t.dtype.name if hasattr(t.dtype, "name") else str(t.dtype)


def walk(model, output=None, look_inside=None) -> Graph:
    """Return the model's layer calls in execution order.

    The model must have passed :func:`check_model` (the Explainer checks it once; the walk only
    picks the front end). ``output`` selects what is explained: ``None`` (the only output), an output name or index,
    or the name (or ``'name#k'`` call label) of any layer, whose output is then explained. Only
    the calls that output depends on are kept.
    """
    frontend = frontend_for(model)
    inputs, outputs = frontend.io(model)
    input_ids = [str(id(t)) for t in inputs]
    nodes = []
    inline(frontend, model, input_ids, [str(id(t)) for t in outputs], "", "", nodes, {}, look_inside)
    names, aliases = _output_names(frontend, model, outputs)
    keys = frontend.input_keys(model)  # a model called on a dict of inputs is fed by its keys
    input_names = (tuple(str(k) for k in keys) if keys is not None and len(keys) == len(inputs) else
                   tuple(_tensor_name(t, f"input_{i}") for i, t in enumerate(inputs)))
    output_id, output_name, out_shape = _select_output(model, output, outputs, names, nodes, aliases, input_names)
    if output_id in input_ids:
        raise UnsupportedModelError(f"output={output!r} is a model input; there is nothing to explain.")
    last = out_shape[-1] if out_shape.rank else None
    return Graph(
        model=model,
        nodes=_prune(nodes, output_id),
        input_ids=tuple(input_ids),
        output_id=output_id,
        input_shapes=tuple(tuple(shape_of(t)[1:]) for t in inputs),
        dtypes=tuple(_dtype_name(t) for t in inputs),
        n_outputs=int(last) if last is not None and out_shape.rank >= 2 else None,
        output_shape=tuple(out_shape[1:]),
        input_names=input_names,
        package=frontend.PACKAGE,
        output_name=output_name,
        output_names=tuple(names),
    )


def _tensor_name(t, default) -> str:
    """The name of the layer that made a symbolic tensor (an InputLayer for inputs)."""
    history = getattr(t, "_keras_history", None)
    layer = getattr(history, "layer", None) or getattr(history, "operation", None)
    return getattr(layer, "name", None) or getattr(t, "name", None) or default


# ---------------------------------------------------------------------------------------------
# Loading


#: The largest metadata.json read from a .keras archive (Keras writes a few hundred bytes).
_METADATA_LIMIT = 1 << 20


def _zip_keras_version(path: pathlib.Path) -> str:
    """The Keras version a ``.keras`` archive records, read with bounded memory."""
    where = f"cannot load model {os.fspath(path)!r}"
    try:
        with zipfile.ZipFile(path) as z:
            info = z.getinfo("metadata.json")
            if info.file_size > _METADATA_LIMIT:
                raise ModelFileError(f"{where}: its metadata.json is {info.file_size} bytes (Keras writes a few "
                                     f"hundred; at most {_METADATA_LIMIT} are read): not a Keras .keras archive.")
            with z.open(info) as f:
                raw = f.read(_METADATA_LIMIT + 1)
        meta = json.loads(raw.decode("utf-8"))
    except (zipfile.BadZipFile, KeyError, json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        raise ModelFileError(f"{where}: not a Keras .keras archive (a zip with metadata.json): "
                             f"{type(e).__name__}: {e}") from None
    if not isinstance(meta, dict):
        raise ModelFileError(f"{where}: its metadata.json holds a {type(meta).__name__}, not the object Keras writes "
                             "(with keras_version): not a Keras .keras archive.")
    return str(meta.get("keras_version", ""))


#: Model -> the resolved path it was loaded from by :func:`load_model` (weak: forgets dropped models).
_SOURCES = weakref.WeakKeyDictionary()


def source_path(model) -> pathlib.Path | None:
    """The file or folder ``model`` was loaded from by :func:`load_model` (resolved), else ``None``.
    Export refuses to write into it."""
    try:
        return _SOURCES.get(model)
    except TypeError:  # pragma: no cover
        return None


def load_model(path):
    """Load a saved Keras model with the package that wrote it, without compiling it.

    ``.keras`` archives record the Keras version that saved them (3.x: Keras 3, 2.x: tf-keras);
    ``.h5`` files are read with tf-keras (which wrote them) and else with Keras 3; a SavedModel
    folder with tf-keras.

    Raises
    ------
    ModelFileError
        The path does not exist or cannot be read as a Keras model by either package.
    """
    path = pathlib.Path(os.fspath(path))
    if not path.exists():
        raise ModelFileError(f"cannot load model {os.fspath(path)!r}: no such file or folder.")
    errors = []
    if path.is_dir():
        candidates = [tf_keras]
    elif path.suffix == ".keras":
        version = _zip_keras_version(path)
        wanted = keras3 if version.startswith("3") else tf_keras
        candidates = [f for f in (wanted,) if f in FRONTENDS]
        if not candidates:
            raise ModelFileError(f"cannot load model {os.fspath(path)!r}: it was saved by Keras {version}, "
                                 "which is not installed.")
    elif path.suffix in (".h5", ".hdf5"):
        candidates = [tf_keras] + [f for f in FRONTENDS if f is keras3]
    else:
        raise ModelFileError(
            f"cannot load model {os.fspath(path)!r}: unknown file type {path.suffix!r}; lrp_grad loads "
            "Keras files (.keras, .h5) and SavedModel folders."
        )
    for frontend in candidates:
        try:
            model = frontend.load(path)
        except UnsupportedModelError:
            raise
        except Exception as e:  # noqa: BLE001 - each package fails in its own way on foreign files
            errors.append(f"{frontend.PACKAGE}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            continue
        if not is_model(model):  # a SavedModel without Keras metadata loads as a bare TensorFlow object
            raise ModelFileError(
                f"cannot load model {os.fspath(path)!r}: it is a TensorFlow SavedModel for serving (as Keras 3 "
                f"model.export() or tf.saved_model.save write), not a Keras model; it loads as a "
                f"{type(model).__name__} without layers to explain. Explain the Keras model it was exported from "
                "(saved with model.save('model.keras')).")
        try:
            _SOURCES[model] = path.resolve()
        except TypeError:  # pragma: no cover - a model that cannot be weakly referenced
            pass
        return model
    raise ModelFileError(f"cannot load model {os.fspath(path)!r}: " + "; ".join(errors))
