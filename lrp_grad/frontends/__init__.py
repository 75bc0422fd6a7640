"""The Keras front ends: the only code that imports a Keras package.

One module per package, each turning a model of its package into the neutral
:class:`~lrp_grad.frontends.graph.Graph` that the core (handlers, canonizers, the planner) reads:

- :mod:`lrp_grad.frontends.keras3` for Keras 3 (``import keras``; ``tf.keras`` since TF 2.16),
- :mod:`lrp_grad.frontends.tf_keras` for tf-keras (the Keras 2 API).

This module picks the front end of a model, walks it (nested graph models inlined), answers the
package-neutral class questions the core asks (:func:`is_layer`, :func:`layer_classes`) and loads
model files with the package that wrote them (:func:`load_model`).
"""
from __future__ import annotations

import json
import os
import pathlib
import weakref
import zipfile

from ..errors import ModelFileError, UnsupportedModelError
from . import blocks, keras3, tf_keras
from .graph import RAW_KINDS, AttentionCore, Graph, Node, RawOp, class_name, layer_label

__all__ = ["FRONTENDS", "Graph", "Node", "RawOp", "AttentionCore", "RAW_KINDS", "TRAINING_NOTE", "frontend_for",
           "check_model", "walk",
           "activation_name", "class_name", "is_instance", "is_layer", "layer_classes", "is_model", "is_layer_class", "layer_label",
           "load_model", "output_names", "package_of", "source_path"]

#: The available front ends, Keras 3 first.
FRONTENDS = tuple(f for f in (keras3, tf_keras) if getattr(f, "available", True))


def package_of(obj) -> str | None:
    """``'keras'`` (Keras 3), ``'tf_keras'`` or ``None`` for a model, layer or class."""
    for frontend in FRONTENDS:
        if frontend.owns(obj):
            return frontend.PACKAGE
    return None


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


def _shape(t):
    import tensorflow as tf

    return tf.TensorShape(t.shape)


#: The note of a layer called with ``training=True`` in the model's graph (it computes its training
#: behaviour, e.g. a Dropout that drops, at every call): refused by the survey.
TRAINING_NOTE = ("called with training=True in the model (passed, or recorded from the layer's own default), so it "
                 "computes its training behaviour (random dropping or augmentation, batch statistics) at every "
                 "call; lrp_grad explains inference. Rebuild the model calling this layer with training=False "
                 "(or without it, for layers that default to inference)")

#: Layer classes whose training behaviour differs from inference (``Random*`` augmentation layers too).
_TRAINING_DEPENDENT = ("Dropout", "SpatialDropout1D", "SpatialDropout2D", "SpatialDropout3D", "GaussianDropout",
                       "GaussianNoise", "AlphaDropout", "BatchNormalization")


def _trains_differently(layer) -> bool:
    """Whether ``training=True`` changes what ``layer`` computes (deterministic layers such as
    Keras 3's ``Resizing`` record ``training=True`` as their default and are not refused)."""
    return (any(isinstance(layer, cls) for cls in layer_classes(*_TRAINING_DEPENDENT))
            or type(layer).__name__.startswith("Random"))


#: How deep layers are looked into (a layer whose call is made of layers whose calls are ...).
_MAX_DEPTH = 12


def _call_structure(inputs, arg_names, kwargs):
    """``(args, kwargs)`` of a call from its tensors, the argument names they were passed as and its
    other (non-tensor) keyword arguments."""
    constants = {k: v for k, v in (kwargs or {}).items() if not hasattr(v, "shape") and k != "mask"}
    if not arg_names or any("/" in n for n in arg_names):
        if len(inputs) == 1:
            return [inputs[0]], constants
        raise ValueError("its tensors were passed inside nested structures")
    positional = sorted((int(n), t) for n, t in zip(arg_names, inputs) if n.isdigit())
    if [i for i, _ in positional] != list(range(len(positional))):
        raise ValueError("its positional tensors are not the first arguments")
    named = {n: t for n, t in zip(arg_names, inputs) if not n.isdigit()}
    return [t for _, t in positional], {**constants, **named}


def _look_inside(frontend, layer, in_shapes, arg_names, kwargs):
    """``(graph model, None)`` of the layer's ``call`` run on symbolic inputs (its sublayers and
    operations become the graph's calls; its own weights are constants there), or ``(None, why)``."""
    try:
        return frontend.functionalize(layer, in_shapes, lambda inputs: _call_structure(inputs, arg_names, kwargs)), None
    except Exception as e:  # noqa: BLE001 - any failure of the user's call is reported, not raised
        text = str(e).strip().splitlines()
        return None, f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def _inline(frontend, model, input_ids, output_ids, prefix, label_prefix, nodes, calls, look_inside=None, depth=0):
    """Append ``model``'s calls to ``nodes``, nested graph models inlined recursively.

    Tensor ids get the call path as prefix so that a model used twice stays distinct; the inner
    model's inputs and outputs are renamed to the outer tensors they stand for. A layer for which
    ``look_inside(layer)`` is true (no handler: a subclassed block, a ``Lambda``) is run on symbolic
    inputs and inlined the same way, its calls labelled ``'layer/...'``.
    """
    inputs, outputs = frontend.io(model)
    rename = {str(id(t)): outer for t, outer in zip(inputs, input_ids)}
    rename.update({str(id(t)): outer for t, outer in zip(outputs, output_ids)})

    def tensor(t):
        t_id = str(id(t))
        return rename.get(t_id, prefix + t_id)

    for obj, ins, outs, arg_names, kwargs in frontend.calls(model):
        key = label_prefix + obj.name
        calls[key] = calls.get(key, 0) + 1
        label = key if calls[key] == 1 else f"{key}#{calls[key]}"
        in_ids = tuple(tensor(t) for t in ins)
        out_ids = tuple(tensor(t) for t in outs)
        inner = None if isinstance(obj, RawOp) else frontend.graph_model(obj)
        if inner is not None:
            _inline(frontend, inner, in_ids, out_ids, f"{prefix}{label}/", f"{label}/", nodes, calls, look_inside,
                    depth)
            continue
        in_shapes = tuple(_shape(t) for t in ins)
        if is_layer(obj, "MultiHeadAttention"):  # its projections and attention core, each with its rule
            nodes.extend(blocks.split_attention(obj, in_ids, out_ids, arg_names, kwargs, label, in_shapes))
            continue
        if not isinstance(obj, RawOp) and (kwargs or {}).get("training") is True and _trains_differently(obj):
            nodes.append(Node(obj, in_ids, out_ids, label, in_shapes, tuple(_shape(t) for t in outs),
                              arg_names=arg_names, note=TRAINING_NOTE))
            continue
        note = ""
        if look_inside is not None and not isinstance(obj, RawOp) and depth < _MAX_DEPTH and look_inside(obj):
            inner, note = _look_inside(frontend, obj, in_shapes, arg_names, kwargs)
            if inner is not None:
                _inline(frontend, inner, in_ids, out_ids, f"{prefix}{label}/", f"{label}/", nodes, calls,
                        look_inside, depth + 1)
                continue
            note = f"looking inside its call failed at {note}"
        nodes.append(Node(obj, in_ids, out_ids, label, in_shapes, tuple(_shape(t) for t in outs), arg_names=arg_names,
                          note=note))



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
        return str(id(outputs[0])), names[0], _shape(outputs[0])
    if isinstance(output, bool) or not isinstance(output, (int, str)):
        raise UnsupportedModelError(
            f"output={output!r} must be an output name ({shown}), an output index (0..{len(outputs) - 1}) or the "
            "name of a layer whose output to explain.")
    if isinstance(output, int):
        if not -len(outputs) <= output < len(outputs):
            raise UnsupportedModelError(
                f"output={output} is out of range: model {model.name!r} has {len(outputs)} output(s) ({shown}).")
        return str(id(outputs[output])), names[output], _shape(outputs[output])
    for known in (names, aliases):
        if output in known:
            i = list(known).index(output)
            return str(id(outputs[i])), names[i], _shape(outputs[i])
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
    _inline(frontend, model, input_ids, [str(id(t)) for t in outputs], "", "", nodes, {}, look_inside)
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
        input_shapes=tuple(tuple(_shape(t)[1:]) for t in inputs),
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


#: Where the activation functions lrp_grad knows by name are defined: a function from anywhere
#: else is the user's own, even if it is called ``relu``.
_LIBRARY_MODULES = ("keras", "tf_keras", "tensorflow")


def _from_library(module: str) -> bool:
    """Whether a module belongs to Keras or TensorFlow (not, e.g., ``keras_cv_attention_models``)."""
    return any(module == m or module.startswith(m + ".") for m in _LIBRARY_MODULES)


def activation_name(fn) -> str:
    """Canonical name of a Keras activation function (``'relu'``, ``'linear'``, ...), either package.

    Functions are told apart by where they are defined, not by their name: a user's own
    ``def relu(t)`` is ``"function 'relu' (from module '__main__')"``, which no handler knows."""
    if fn is None:
        return "linear"
    if isinstance(fn, str):
        return fn
    module = getattr(fn, "__module__", "") or ""
    if callable(fn) and not _from_library(module) and not isinstance(fn, type):
        return f"function {getattr(fn, '__qualname__', getattr(fn, '__name__', repr(fn)))!r} (from module {module!r})"
    order = sorted(FRONTENDS, key=lambda f: not module.startswith(f.PACKAGE + "."))
    name = None
    for frontend in order:
        try:
            name = frontend.serialize_activation(fn)
        except (ValueError, TypeError, AttributeError):
            continue
        if isinstance(name, str):
            break
    if name is None:
        name = getattr(fn, "__name__", repr(fn))
    if isinstance(name, dict):  # serialised objects (e.g. a layer used as activation)
        name = name.get("class_name", repr(fn))
    return str(name)


def layer_classes(*names: str) -> tuple:
    """Every available package's layer classes of these class names (``'Dense'`` -> both Denses),
    from ``layers`` and the few layer classes ``applications`` defines (``LayerScale``)."""
    out = []
    for frontend in FRONTENDS:
        for name in names:
            cls = getattr(frontend.layers, name, None) or frontend.APPLICATION_LAYERS.get(name)
            if isinstance(cls, type):
                out.append(cls)
    return tuple(out)


def is_layer(obj, *names: str) -> bool:
    """Whether ``obj``'s exact class is one of these Keras layer classes, in either package."""
    return type(obj) in layer_classes(*names)


def _builtin_name(cls) -> str | None:
    """The class name of a built-in Keras layer class (either package), else None."""
    module = getattr(cls, "__module__", "") or ""
    if module.startswith(("keras.src.layers", "keras.layers", "tf_keras.src.layers", "tf_keras.layers")):
        return cls.__name__
    return None


def is_instance(obj, classes) -> bool:
    """``isinstance`` that treats a built-in layer class of one Keras package as its namesake in
    the other: a composite written with ``keras.layers.Conv2D`` also matches a tf-keras Conv2D."""
    classes = classes if isinstance(classes, tuple) else (classes,)
    if isinstance(obj, classes):
        return True
    names = {n for n in (_builtin_name(c) for c in classes) if n}
    return bool(names) and any(_builtin_name(c) in names for c in type(obj).__mro__)


def is_model(obj) -> bool:
    """Whether ``obj`` is a Keras model (of either package)."""
    return any(isinstance(obj, f.Model) for f in FRONTENDS)


def is_layer_class(cls) -> bool:
    """Whether ``cls`` is a Layer subclass of either Keras package."""
    return isinstance(cls, type) and any(issubclass(cls, f.Layer) for f in FRONTENDS)


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
