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

__all__ = ["PACKAGE", "keras", "owns", "check_model", "calls", "graph_model", "io", "functionalize", "is_graph_tensor",
           "serialize_activation", "load"]

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
    **dict.fromkeys(["image.resize", "compat.v1.image.resize", "compat.v1.image.resize_images",
                     "compat.v1.image.resize_bilinear", "compat.v1.image.resize_nearest_neighbor",
                     "compat.v1.image.resize_bicubic", "compat.v1.image.resize_area", "image.resize_with_pad",
                     "compat.v1.image.resize_image_with_pad"], "resize"),
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
    # elementwise functions of one signal (a phase: WaveMLP's x * cos(theta)): relevance passes through
    "math.sin": "sin", "math.cos": "cos", "math.tan": "tan", "math.sinh": "sinh", "math.cosh": "cosh",
    "math.atan": "arctan", "math.expm1": "expm1", "math.log1p": "log1p",
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
    def rebind(transform=None):
        def fn(*tensors):
            args = list(flat)
            for i, t in zip(slots, tensors):
                args[i] = t
            a, kw = tf.nest.pack_sequence_as(structure, args)
            if transform is not None:
                a, kw = transform((a, kw), tensors)
            return layer.call(*a, **kw)  # SlicingOpLambda turns its recorded slice dicts back into slices
        return fn

    kind = _KINDS.get(symbol, "activation" if symbol in _ACTIVATIONS else "other")
    outputs = tf.nest.flatten(node.outputs)
    cut = gradient_cut(symbol.rsplit(".", 1)[-1], symbol in _CASTS, outputs[0].dtype,
                       [a.dtype for i, a in enumerate(flat) if i in slots])
    if cut:
        kind = "cut"
    elif symbol.rsplit(".", 1)[-1] in SHAPE_ONLY:
        kind = "shape"
    axes, keepdims, batch_axis = None, False, 0
    if kind in ("mean", "sum") or symbol.endswith("reduce_max"):  # a max's axes: refused over the batch axis
        kwargs = dict(node.call_kwargs or {})
        rest = list(node.call_args[1:])
        axis = kwargs.get("axis", rest[0] if rest else None)
        keepdims = bool(kwargs.get("keepdims", rest[1] if len(rest) > 1 else False))
        operand = kwargs.get("input_tensor", node.call_args[0] if node.call_args else None)
        batch_axis = _stacked_batch_axis(operand)
        axes = _axes(axis, node.keras_inputs[0].shape.rank + (isinstance(operand, (list, tuple))))
    if _ACTIVATIONS.get(symbol) == "softmax":
        kwargs = dict(node.call_kwargs or {})
        rest = list(node.call_args[1:])
        axes = _axes(kwargs.get("axis", rest[0] if rest else -1), node.keras_inputs[0].shape.rank)
    return RawOp(name=layer.name, symbol=f"tf.{symbol}", kind=kind, fn=rebind(), n_tensors=len(slots),
                 activation=_ACTIVATIONS.get(symbol), axes=axes, keepdims=keepdims,
                 out_shape=tuple(outputs[0].shape), source=layer, cut=cut,
                 constants=(node.call_args, node.call_kwargs), rebind=rebind,
                 interpolation=_resize_method(symbol, node) if kind == "resize" else None, batch_axis=batch_axis)


def _stacked_batch_axis(operand) -> int:
    """Where the batch is in the tensor a reduction reads: axis 1 when it is a list of batch tensors
    (``tf.reduce_sum([a, b], axis=0)`` stacks them along a new axis 0) or ``tf.stack`` of them along
    axis 0, else axis 0."""
    if isinstance(operand, (list, tuple)):
        parts = list(operand)
    else:
        producer = getattr(getattr(operand, "_keras_history", None), "layer", None)
        if getattr(producer, "symbol", None) not in ("stack",) or not getattr(producer, "inbound_nodes", None):
            return 0
        node = producer.inbound_nodes[operand._keras_history.node_index]
        kwargs, args = dict(node.call_kwargs or {}), list(node.call_args)
        if int(kwargs.get("axis", args[1] if len(args) > 1 else 0)) != 0:
            return 0
        parts = list(kwargs.get("values", args[0] if args else ()))
    batch_first = parts and all(_is_tensor(t) and t.shape.rank and t.shape[0] is None for t in parts)
    return 1 if batch_first else 0


#: ``tf.compat.v1.image.ResizeMethod``'s integer values.
_V1_METHODS = {0: "bilinear", 1: "nearest", 2: "bicubic", 3: "area"}


def _resize_method(symbol, node) -> str:
    """The interpolation of an image resize, by its function name or ``method`` argument."""
    for suffix, method in (("_bilinear", "bilinear"), ("_nearest_neighbor", "nearest"), ("_bicubic", "bicubic"),
                           ("_area", "area")):
        if symbol.endswith(suffix):
            return method
    kwargs, args = dict(node.call_kwargs or {}), list(node.call_args)
    method = kwargs.get("method", args[2] if len(args) > 2 and "with_pad" not in symbol else "bilinear")
    method = _V1_METHODS.get(method, method) if isinstance(method, int) else getattr(method, "value", method)
    method = str(method).lower()
    return "nearest" if method == "nearest_neighbor" else method


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
    argument names, keyword arguments, rebuild)``; ``rebuild(values)`` is the call's ``(args, kwargs)``
    with its tensors replaced by ``values``."""
    out = []
    for depth in sorted(model._nodes_by_depth, reverse=True):
        for node in model._nodes_by_depth[depth]:
            if node.is_input:
                continue
            layer = node.layer
            obj = raw_op(layer, node) if hasattr(layer, "symbol") and hasattr(layer, "function") else layer
            ins = list(node.keras_inputs)
            names = _arg_names(node)
            outs = [t for t in tf.nest.flatten(node.outputs) if not _is_none(t)]  # a None among a layer's outputs
            out.append((obj, ins, outs, tuple(names) if len(names) == len(ins) else (),
                        dict(node.call_kwargs or {}), _rebuilder(node)))
    return out


def _is_none(t) -> bool:
    """Whether a symbolic output stands for a ``None`` a layer returned (tf-keras records it)."""
    return type(getattr(t, "type_spec", None)).__name__ == "NoneTensorSpec"


def _rebuilder(node):
    """``rebuild(values) -> (args, kwargs)``: the recorded call with its tensors replaced, in order."""
    structure = (tuple(node.call_args or ()), dict(node.call_kwargs or {}))
    flat = tf.nest.flatten(structure)
    slots = [i for i, a in enumerate(flat) if _is_tensor(a)]

    def rebuild(values):
        args = list(flat)
        for i, v in zip(slots, values):
            args[i] = v
        return tf.nest.pack_sequence_as(structure, args)
    return rebuild


def is_graph_tensor(value) -> bool:
    """Whether ``value`` is a symbolic tensor of a traced graph."""
    return _is_tensor(value)


def functionalize(layer, shapes, rebuild, dtypes=None):
    """``layer.call`` run on symbolic inputs of these shapes: ``(model, constants)``, as in
    :func:`lrp_grad.frontends.keras3.functionalize`; its sublayers become the model's calls and the
    TensorFlow operations on them ``TFOpLambda`` layers."""
    default = getattr(layer, "compute_dtype", None) or "float32"
    dtypes = dtypes or [default] * len(shapes)
    inputs = [keras.Input(batch_shape=tuple(s), dtype=d) for s, d in zip(shapes, dtypes)]
    args, kwargs = rebuild(inputs)
    outputs = [t for t in tf.nest.flatten(layer.call(*args, **kwargs)) if t is not None and not _is_none(t)]
    symbolic = [t for t in outputs if _is_tensor(t)]
    constants = {i: t for i, t in enumerate(outputs) if not _is_tensor(t)}
    model = keras.Model(inputs, symbolic, name=f"{layer.name}_call") if symbolic else None
    return model, constants


def serialize_activation(fn):
    return keras.activations.serialize(fn)


def load(path):
    """Load a model file or SavedModel folder with tf-keras, without compiling it."""
    return keras.models.load_model(path, compile=False)
