"""The only module that knows Keras: model checks and the walk over a model's layer graph.

Everything Keras-version specific (tf-keras internals such as ``_nodes_by_depth``) stays here,
so that a Keras 3 walker can be added later without touching rules or handlers.
"""
from __future__ import annotations

from dataclasses import dataclass

import tf_keras as keras

from .errors import UnsupportedModelError

__all__ = ["keras", "Node", "Graph", "walk", "activation_name", "layer_label"]


@dataclass(frozen=True)
class Node:
    """One call of a layer in the model graph: which tensors it reads and writes (by id).

    ``handler`` and ``params`` are empty after the walk; canonizers set them to replace the
    layer's handler or its weights without touching the layer.
    """

    layer: object
    inputs: tuple
    outputs: tuple
    label: str  # 'outer/inner' path of the layer name, with '#k' for the k-th call of a shared layer
    input_shapes: tuple = ()
    handler: object = None
    params: object = None


@dataclass(frozen=True)
class Graph:
    """A single-input, single-output model as a list of nodes in execution order."""

    model: object
    nodes: tuple
    input_id: str
    output_id: str
    input_shape: tuple  # without the batch axis; entries may be None
    dtype: str
    n_outputs: int | None  # size of the last axis of the output (classes), if known


def layer_label(layer) -> str:
    """``'name' (ClassName)``, the way every error message names a layer."""
    return f"'{layer.name}' ({type(layer).__name__})"


def activation_name(fn) -> str:
    """Canonical name of a Keras activation function (``'relu'``, ``'linear'``, ...)."""
    if fn is None:
        return "linear"
    try:
        name = keras.activations.serialize(fn)
    except (ValueError, TypeError):
        name = getattr(fn, "__name__", repr(fn))
    if isinstance(name, dict):  # serialised objects (e.g. a layer used as activation)
        name = name.get("class_name", repr(fn))
    return str(name)


def _is_keras3(model) -> bool:
    for cls in type(model).__mro__:
        module = cls.__module__ or ""
        if module == "keras" or module.startswith("keras.") or module.startswith("keras_core"):
            return True
    return False


def check_model(model) -> None:
    """Raise :class:`UnsupportedModelError` unless ``model`` is a supported tf-keras model."""
    if _is_keras3(model):
        raise UnsupportedModelError(
            f"model {getattr(model, 'name', '?')!r} ({type(model).__module__}.{type(model).__name__}) "
            "is a Keras 3 model; lrp_grad supports tf-keras (Keras 2) models for now. "
            "Install tf-keras and build or load the model with `import tf_keras as keras` "
            "(or set TF_USE_LEGACY_KERAS=1 before importing TensorFlow so that tf.keras is tf-keras)."
        )
    if not isinstance(model, keras.Model):
        raise UnsupportedModelError(
            f"model must be a tf_keras.Model (Sequential or Functional), got {type(model).__name__}. "
            "Load it with tf_keras.models.load_model(path, compile=False)."
        )
    if not getattr(model, "_is_graph_network", False):
        if isinstance(model, keras.Sequential):
            raise UnsupportedModelError(
                f"Sequential model {model.name!r} has no known input shape yet. Give its first "
                "layer an input_shape (or start it with tf_keras.Input(shape)) or call "
                "model.build((None, ...)) before explaining it."
            )
        raise UnsupportedModelError(
            f"model {model.name!r} ({type(model).__name__}) is a subclassed tf_keras.Model; "
            "lrp_grad needs the layer graph, which only Sequential and Functional models expose. "
            "Rebuild it with the Functional API (inputs = tf_keras.Input(...); outputs = ...; "
            "tf_keras.Model(inputs, outputs))."
        )
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise UnsupportedModelError(
            f"model {model.name!r} has {len(model.inputs)} input(s) and {len(model.outputs)} "
            "output(s); lrp_grad explains models with exactly one input and one output. "
            "Wrap the part to explain in a single-input, single-output tf_keras.Model."
        )


def _is_graph_model(layer) -> bool:
    return isinstance(layer, keras.Model) and getattr(layer, "_is_graph_network", False)


def _inline(model, input_ids, output_ids, prefix, label_prefix, nodes, calls):
    """Append ``model``'s layer calls to ``nodes``, nested graph models inlined recursively.

    Tensor ids get the call path as prefix so that a model used twice stays distinct; the inner
    model's inputs and outputs are renamed to the outer tensors they stand for.
    """
    rename = {str(id(t)): outer for t, outer in zip(model.inputs, input_ids)}
    rename.update({str(id(t)): outer for t, outer in zip(model.outputs, output_ids)})

    def tensor(t_id):
        return rename.get(t_id, prefix + t_id)

    for depth in sorted(model._nodes_by_depth, reverse=True):
        for node in model._nodes_by_depth[depth]:
            if node.is_input:
                continue
            layer = node.layer
            key = label_prefix + layer.name
            calls[key] = calls.get(key, 0) + 1
            label = key if calls[key] == 1 else f"{key}#{calls[key]}"
            ins = tuple(tensor(t) for t in node.flat_input_ids)
            outs = tuple(tensor(t) for t in node.flat_output_ids)
            if _is_graph_model(layer):
                _inline(layer, ins, outs, f"{prefix}{label}/", f"{label}/", nodes, calls)
                continue
            shapes = tuple(t.shape for t in node.keras_inputs)
            nodes.append(Node(layer, ins, outs, label, shapes))


def walk(model) -> Graph:
    """Return the model's layer calls in execution order (after :func:`check_model`)."""
    check_model(model)
    inp, out = model.inputs[0], model.outputs[0]
    input_id, output_id = str(id(inp)), str(id(out))
    nodes = []
    _inline(model, [input_id], [output_id], "", "", nodes, {})
    last = out.shape[-1] if out.shape.rank else None
    return Graph(
        model=model,
        nodes=tuple(nodes),
        input_id=input_id,
        output_id=output_id,
        input_shape=tuple(inp.shape[1:]),
        dtype=inp.dtype.name if hasattr(inp.dtype, "name") else str(inp.dtype),
        n_outputs=int(last) if last is not None else None,
    )
