"""The tf-keras (Keras 2 API) front end: model checks, the layer-graph walk, raw ``TFOpLambda``
operations and loading.

tf-keras records a TensorFlow function called on a Keras tensor (``x + y``, ``x * 2``,
``tf.reshape``, slicing) as a ``TFOpLambda``/``SlicingOpLambda`` layer whose ``symbol`` names the
function; :func:`raw_op` turns it into a neutral :class:`~lrp_grad.frontends.graph.RawOp`.
"""
from __future__ import annotations

import tensorflow as tf
import tf_keras as keras

from ..errors import UnsupportedModelError
from .graph import SHAPE_ONLY, RawOp, gradient_cut

__all__ = ["PACKAGE", "keras", "owns", "check_model", "calls", "graph_model", "io", "functionalize", "serialize_activation",
           "load"]

PACKAGE = "tf_keras"
layers = keras.layers
Layer = keras.layers.Layer
Model = keras.Model


def _application_layers() -> dict:
    """Layer classes that ``tf_keras.applications`` defines for itself (not in ``tf_keras.layers``)."""
    found = {}
    for module, name in (("convnext", "LayerScale"), ("inception_resnet_v2", "CustomScaleLayer")):
        try:
            found[name] = getattr(__import__(f"tf_keras.src.applications.{module}", fromlist=[name]), name)
        except (ImportError, AttributeError):  # pragma: no cover - another tf-keras layout
            pass
    return found


#: Class name -> layer class, for the application layers the handlers know.
APPLICATION_LAYERS = _application_layers()

# symbol (TFOpLambda.symbol, without the 'tf.' prefix) -> canonical kind
_KINDS = {
    **dict.fromkeys(["__operators__.add", "math.add", "add", "math.add_n", "add_n", "nn.bias_add"], "add"),
    **dict.fromkeys(["math.subtract", "subtract", "__operators__.sub"], "subtract"),
    **dict.fromkeys(["math.multiply", "multiply", "__operators__.mul"], "multiply"),
    **dict.fromkeys(["math.truediv", "math.divide", "divide", "truediv", "__operators__.truediv"], "divide"),
    **dict.fromkeys(["math.negative", "negative", "__operators__.neg"], "negative"),
    **dict.fromkeys(["reshape", "compat.v1.reshape", "__operators__.getitem", "slice", "strided_slice", "concat",
                     "stack", "transpose", "compat.v1.transpose", "expand_dims", "squeeze", "compat.v1.squeeze",
                     "identity", "tile", "broadcast_to", "cast", "gather", "math.reduce_max", "reduce_max",
                     "image.resize_with_crop_or_pad", "pad", "compat.v1.pad", "split", "unstack", "repeat",
                     "compat.v1.gather", "gather_nd", "reverse", "roll", "experimental.numpy.repeat",
                     "image.extract_patches"], "route"),
    **dict.fromkeys(["image.resize", "compat.v1.image.resize"], "resize"),
    **dict.fromkeys(["math.reduce_mean", "reduce_mean"], "mean"),
    **dict.fromkeys(["math.reduce_sum", "reduce_sum"], "sum"),
    **dict.fromkeys(["linalg.matmul", "matmul", "compat.v1.matmul", "__operators__.matmul", "einsum",
                     "linalg.einsum", "tensordot", "linalg.tensordot"], "product"),
    **dict.fromkeys(["nn.convolution", "nn.conv2d", "nn.conv1d", "nn.depthwise_conv2d", "nn.conv2d_transpose",
                     "compat.v1.nn.conv2d", "compat.v1.nn.depthwise_conv2d"], "product"),
}
#: The symbols of a cast (a cast to an integer or bool dtype cuts the gradient).
_CASTS = ("cast", "dtypes.cast", "compat.v1.cast")
# symbol -> canonical activation name
_ACTIVATIONS = {
    "nn.relu": "relu", "nn.relu6": "relu6", "math.sigmoid": "sigmoid", "nn.sigmoid": "sigmoid",
    "sigmoid": "sigmoid", "math.tanh": "tanh", "nn.tanh": "tanh", "tanh": "tanh", "nn.silu": "silu",
    "nn.swish": "silu", "nn.gelu": "gelu", "nn.elu": "elu", "nn.selu": "selu", "nn.softplus": "softplus",
    "math.softplus": "softplus", "nn.softsign": "softsign", "math.softsign": "softsign",
    "nn.leaky_relu": "leaky_relu", "nn.softmax": "softmax", "math.softmax": "softmax",
    "math.exp": "exponential", "exp": "exponential",
    # elementwise maths inside hand-written normalisations and activations: relevance passes through
    "math.square": "square", "square": "square", "math.sqrt": "sqrt", "sqrt": "sqrt", "math.rsqrt": "rsqrt",
    "math.pow": "pow", "pow": "pow", "math.abs": "abs", "abs": "abs", "math.reciprocal": "reciprocal",
    "math.erf": "erf", "math.log": "log", "clip_by_value": "clip",
    # a normalisation by the tensor's own norm: the scale is held constant, relevance passes
    "math.l2_normalize": "l2_normalize", "nn.l2_normalize": "l2_normalize", "linalg.l2_normalize": "l2_normalize",
}


def owns(obj) -> bool:
    """Whether ``obj`` (a model or layer, or such a class) belongs to tf-keras."""
    cls = obj if isinstance(obj, type) else type(obj)
    return issubclass(cls, (keras.layers.Layer, keras.Model))


def check_model(model) -> None:
    """Raise :class:`UnsupportedModelError` unless ``model`` is a tf-keras graph model."""
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


def io(model):
    """``(inputs, outputs)``: the model's symbolic input and output tensors."""
    return list(model.inputs), list(model.outputs)


def output_keys(model):
    """The keys of a model whose outputs are a dict (in the order of :func:`io`), else None."""
    struct = getattr(model, "_nested_outputs", None)
    return sorted(struct) if isinstance(struct, dict) else None  # tf.nest.flatten sorts dict keys


def input_keys(model):
    """The keys of a model whose inputs are a dict (in the order of :func:`io`), else None."""
    struct = getattr(model, "_nested_inputs", None)
    return sorted(struct) if isinstance(struct, dict) else None


def graph_model(layer):
    """``layer`` itself when it is a nested Sequential/Functional model (to be inlined), else None."""
    if isinstance(layer, keras.Model) and getattr(layer, "_is_graph_network", False):
        return layer
    return None


def _is_tensor(a) -> bool:
    """Whether an operand is a symbolic tensor of the graph (not a constant)."""
    try:
        return bool(keras.backend.is_keras_tensor(a))
    except ValueError:  # not a tensor-like value at all
        return False


def raw_op(layer, node) -> RawOp:
    """The neutral description of a ``TFOpLambda``/``SlicingOpLambda`` call."""
    symbol = layer.symbol
    structure = (node.call_args, node.call_kwargs)
    flat = tf.nest.flatten(structure)
    slots = [i for i, a in enumerate(flat) if _is_tensor(a)]
    def fn(*tensors):
        args = list(flat)
        for i, t in zip(slots, tensors):
            args[i] = t
        a, kw = tf.nest.pack_sequence_as(structure, args)
        return layer.call(*a, **kw)  # SlicingOpLambda turns its recorded slice dicts back into slices

    kind = _KINDS.get(symbol, "activation" if symbol in _ACTIVATIONS else "other")
    outputs = tf.nest.flatten(node.outputs)
    cut = gradient_cut(symbol.rsplit(".", 1)[-1], symbol in _CASTS, outputs[0].dtype,
                       [a.dtype for i, a in enumerate(flat) if i in slots])
    if cut:
        kind = "cut"
    elif symbol.rsplit(".", 1)[-1] in SHAPE_ONLY:
        kind = "shape"
    axes, keepdims = None, False
    if kind in ("mean", "sum") or symbol.endswith("reduce_max"):  # a max's axes: refused over the batch axis
        kwargs = dict(node.call_kwargs or {})
        rest = list(node.call_args[1:])
        axis = kwargs.get("axis", rest[0] if rest else None)
        keepdims = bool(kwargs.get("keepdims", rest[1] if len(rest) > 1 else False))
        axes = _axes(axis, node.keras_inputs[0].shape.rank)
    if _ACTIVATIONS.get(symbol) == "softmax":
        kwargs = dict(node.call_kwargs or {})
        rest = list(node.call_args[1:])
        axes = _axes(kwargs.get("axis", rest[0] if rest else -1), node.keras_inputs[0].shape.rank)
    return RawOp(name=layer.name, symbol=f"tf.{symbol}", kind=kind, fn=fn, n_tensors=len(slots),
                 activation=_ACTIVATIONS.get(symbol), axes=axes, keepdims=keepdims,
                 out_shape=tuple(outputs[0].shape), source=layer, cut=cut)


def _axes(axis, rank):
    if axis is None:
        return None
    axis = [axis] if isinstance(axis, int) else list(axis)
    return tuple(sorted(int(a) % rank for a in axis))


def _arg_names(node) -> list:
    """Per tensor argument of a call, in the order of ``keras_inputs``: ``'0'``, ``'1'`` for
    positional arguments, the keyword for keyword arguments, ``/``-joined inside structures."""
    named = [(str(i), a) for i, a in enumerate(node.call_args or ())]
    named += [(str(k), v) for k, v in sorted((node.call_kwargs or {}).items())]  # tf.nest sorts dict keys
    out = []
    for name, value in named:
        leaves = tf.nest.flatten(value)
        for j, leaf in enumerate(leaves):
            if _is_tensor(leaf):
                out.append(name if len(leaves) == 1 else f"{name}/{j}")
    return out


def calls(model):
    """The model's layer calls in execution order: ``(layer or RawOp, input tensors, output tensors,
    argument names, keyword arguments)``."""
    out = []
    for depth in sorted(model._nodes_by_depth, reverse=True):
        for node in model._nodes_by_depth[depth]:
            if node.is_input:
                continue
            layer = node.layer
            obj = raw_op(layer, node) if hasattr(layer, "symbol") and hasattr(layer, "function") else layer
            ins = list(node.keras_inputs)
            names = _arg_names(node)
            out.append((obj, ins, tf.nest.flatten(node.outputs), tuple(names) if len(names) == len(ins) else (),
                        dict(node.call_kwargs or {})))
    return out


def functionalize(layer, shapes, structure):
    """A functional model of ``layer.call`` on symbolic inputs of these shapes: its sublayers become
    the model's calls and the TensorFlow operations on them ``TFOpLambda`` layers; its own weights
    are constant operands. ``structure(inputs)`` gives the call's ``(args, kwargs)``."""
    dtype = getattr(layer, "compute_dtype", None) or "float32"
    inputs = [keras.Input(batch_shape=tuple(s), dtype=dtype) for s in shapes]
    args, kwargs = structure(inputs)
    outputs = layer.call(*args, **kwargs)
    return keras.Model(inputs, outputs, name=f"{layer.name}_call")


def serialize_activation(fn):
    return keras.activations.serialize(fn)


def load(path):
    """Load a model file or SavedModel folder with tf-keras, without compiling it."""
    return keras.models.load_model(path, compile=False)
