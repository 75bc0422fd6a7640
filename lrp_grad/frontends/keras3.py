"""The Keras 3 front end (``import keras``, what ``tf.keras`` is since TensorFlow 2.16): model
checks, the graph walk, raw ``keras.ops`` operations and loading.

Keras 3 records ``x + y``, ``x * 2``, ``keras.ops.*`` and activation functions called on tensors
as ``Operation`` objects in the functional graph; :func:`raw_op` turns each into a neutral
:class:`~lrp_grad.frontends.graph.RawOp`. A Sequential model keeps its graph in ``_functional``.
"""
from __future__ import annotations

import os

from ..errors import UnsupportedModelError
from .graph import SHAPE_ONLY, RawOp, gradient_cut, snake_case

try:  # Keras 3 ships with TensorFlow >= 2.16; with another backend it still imports
    import keras

    available = keras.__version__.split(".")[0] == "3"
except Exception:  # pragma: no cover - a broken or missing Keras 3 install
    keras = None
    available = False

__all__ = ["PACKAGE", "available", "keras", "owns", "check_model", "calls", "graph_model", "io", "functionalize",
           "serialize_activation", "load"]

PACKAGE = "keras"
layers = keras.layers if available else None
Layer = keras.layers.Layer if available else None
Model = keras.Model if available else None


def _application_layers() -> dict:
    """Layer classes that ``keras.applications`` defines for itself (not in ``keras.layers``)."""
    found = {}
    if not available:
        return found
    for module, name in (("convnext", "LayerScale"), ("inception_resnet_v2", "CustomScaleLayer")):
        try:
            found[name] = getattr(__import__(f"keras.src.applications.{module}", fromlist=[name]), name)
        except (ImportError, AttributeError):  # pragma: no cover - another Keras 3 layout
            pass
    return found


#: Class name -> layer class, for the application layers the handlers know.
APPLICATION_LAYERS = _application_layers()

# Operation class name -> canonical kind
_KINDS = {
    **dict.fromkeys(["Add"], "add"),
    **dict.fromkeys(["Subtract"], "subtract"),
    **dict.fromkeys(["Multiply"], "multiply"),
    **dict.fromkeys(["Divide", "TrueDivide"], "divide"),
    **dict.fromkeys(["Negative"], "negative"),
    **dict.fromkeys(["Reshape", "GetItem", "Slice", "Concatenate", "Stack", "Transpose", "ExpandDims", "Squeeze",
                     "Identity", "Tile", "BroadcastTo", "Cast", "Take", "Max", "Amax", "Pad", "Ravel", "Flip",
                     "Roll", "Repeat", "MoveAxis", "SwapAxes", "SplitTensor", "Split", "Unstack", "ArraySplit",
                     "TakeAlongAxis", "Tril", "Triu", "ExtractPatches"], "route"),
    **dict.fromkeys(["Resize"], "resize"),
    **dict.fromkeys(["Mean"], "mean"),
    **dict.fromkeys(["Sum"], "sum"),
    **dict.fromkeys(["Matmul", "Einsum", "Tensordot", "Conv", "DepthwiseConv", "ConvTranspose"], "product"),
}
# Operation class name -> canonical activation name
_ACTIVATIONS = {
    "Relu": "relu", "Relu6": "relu6", "Sigmoid": "sigmoid", "Tanh": "tanh", "Silu": "silu", "Swish": "silu",
    "Gelu": "gelu", "Elu": "elu", "Selu": "selu", "Celu": "celu", "Softplus": "softplus", "Softsign": "softsign",
    "LeakyRelu": "leaky_relu", "HardSigmoid": "hard_sigmoid", "HardSilu": "hard_silu", "HardSwish": "hard_silu",
    "Mish": "mish", "LogSigmoid": "log_sigmoid", "HardTanh": "hard_tanh", "SparsePlus": "sparse_plus",
    "Squareplus": "squareplus", "SoftShrink": "soft_shrink", "HardShrink": "hard_shrink",
    "TanhShrink": "tanh_shrink", "Softmax": "softmax", "Exp": "exponential", "Threshold": "threshold",
    "SparseSigmoid": "sparse_sigmoid",
    # elementwise maths inside hand-written normalisations and activations: relevance passes through
    "Square": "square", "Sqrt": "sqrt", "Rsqrt": "rsqrt", "Power": "pow", "Abs": "abs", "Absolute": "abs",
    "Reciprocal": "reciprocal", "Erf": "erf", "Log": "log", "Clip": "clip",
    # a normalisation by the tensor's own norm: the scale is held constant, relevance passes
    "Normalize": "l2_normalize",
}


def owns(obj) -> bool:
    """Whether ``obj`` (a model, layer or operation, or such a class) belongs to Keras 3."""
    if not available:
        return False
    cls = obj if isinstance(obj, type) else type(obj)
    return issubclass(cls, keras.Operation)


def _backend_problem():
    backend = keras.backend.backend()
    if backend == "tensorflow":
        return None
    return (f"Keras 3 is running on the {backend!r} backend; lrp_grad builds TensorFlow custom gradients "
            "and needs the TensorFlow backend. Set the environment variable KERAS_BACKEND=tensorflow "
            "before Python imports keras (or \"backend\": \"tensorflow\" in ~/.keras/keras.json).")


def _functional(model):
    """The functional graph of a graph model: itself, or a built Sequential's ``_functional``."""
    if isinstance(model, keras.Sequential):
        return getattr(model, "_functional", None)
    if hasattr(model, "_nodes_by_depth") and getattr(model, "_run_through_graph", None) is not None:
        return model
    return None


def check_model(model) -> None:
    """Raise :class:`UnsupportedModelError` unless ``model`` is a Keras 3 graph model on the
    TensorFlow backend without quantized layers."""
    problem = _backend_problem()
    if problem:
        raise UnsupportedModelError(f"model {model.name!r}: {problem}")
    if _functional(model) is None:
        if isinstance(model, keras.Sequential):
            raise UnsupportedModelError(
                f"Sequential model {model.name!r} has no known input shape yet. Start it with "
                "keras.Input(shape) or call model.build((None, ...)) before explaining it."
            )
        raise UnsupportedModelError(
            f"model {model.name!r} ({type(model).__name__}) is a subclassed keras.Model; lrp_grad needs "
            "the layer graph, which only Sequential and Functional models expose. Rebuild it with the "
            "Functional API (inputs = keras.Input(...); outputs = ...; keras.Model(inputs, outputs))."
        )
    for layer in _all_layers(model):
        mode = getattr(layer, "quantization_mode", None)
        if mode is not None:
            raise UnsupportedModelError(
                f"layer '{layer.name}' ({type(layer).__name__}) of model {model.name!r} is quantized "
                f"(quantization_mode={mode!r}); LRP needs the float weights. Explain the model before "
                "model.quantize(...), or rebuild it without quantization."
            )


def _all_layers(model):
    for layer in model.layers:
        yield layer
        inner = graph_model(layer)
        if inner is not None:
            yield from _all_layers(inner)


def io(model):
    """``(inputs, outputs)``: the model's symbolic input and output tensors."""
    fn = _functional(model)
    return list(_flat(fn.inputs)), list(_flat(fn.outputs))


def output_keys(model):
    """The keys of a model whose outputs are a dict (in the order of :func:`io`), else None."""
    struct = getattr(_functional(model), "_outputs_struct", None)
    return sorted(struct) if isinstance(struct, dict) else None  # keras.tree.flatten sorts dict keys


def input_keys(model):
    """The keys of a model whose inputs are a dict (in the order of :func:`io`), else None."""
    struct = getattr(_functional(model), "_inputs_struct", None)
    return sorted(struct) if isinstance(struct, dict) else None


def _flat(x):
    return keras.tree.flatten(x)


def graph_model(layer):
    """The functional graph of a nested Sequential/Functional model (to be inlined), else None."""
    if available and isinstance(layer, keras.Model):
        return _functional(layer)
    return None


def raw_op(op, node) -> RawOp:
    """The neutral description of a Keras 3 ``Operation`` that is not a layer."""
    cls = type(op).__name__
    arguments = node.arguments
    tensors = list(arguments.keras_tensors)

    def fn(*values):
        args, kwargs = arguments.fill_in({id(t): v for t, v in zip(tensors, values)})
        return op(*args, **kwargs)

    kind = _KINDS.get(cls, "activation" if cls in _ACTIVATIONS else "other")
    cut = gradient_cut(snake_case(cls), cls == "Cast", node.output_tensors[0].dtype, [t.dtype for t in tensors])
    if cut:
        kind = "cut"
    elif snake_case(cls) in SHAPE_ONLY:
        kind = "shape"
    axes, keepdims = None, False
    if kind in ("mean", "sum") or cls in ("Max", "Amax"):  # a max's axes: refused over the batch axis
        rank = len(tensors[0].shape)
        axis = getattr(op, "axis", None)
        if axis is not None:
            axis = [axis] if isinstance(axis, int) else list(axis)
            axes = tuple(sorted(int(a) % rank for a in axis))
        keepdims = bool(getattr(op, "keepdims", False))
    if cls == "Softmax":
        rank = len(tensors[0].shape)
        axis = getattr(op, "axis", -1)
        axes = tuple(sorted(int(a) % rank for a in ([axis] if isinstance(axis, int) else axis)))
    return RawOp(name=op.name, symbol=f"keras.ops.{snake_case(cls)}", kind=kind, fn=fn, n_tensors=len(tensors),
                 activation=_ACTIVATIONS.get(cls), axes=axes, keepdims=keepdims,
                 out_shape=tuple(node.output_tensors[0].shape), source=op, cut=cut)


def _arg_names(arguments) -> list:
    """Per tensor argument of a call, in the order of ``input_tensors``: ``'0'``, ``'1'`` for
    positional arguments, the keyword for keyword arguments, ``/``-joined inside structures."""
    flat = keras.tree.flatten_with_path((arguments.args, arguments.kwargs))
    return ["/".join(str(p) for p in path[1:]) for path, value in flat
            if isinstance(value, keras.KerasTensor)]


def calls(model):
    """The model's calls in execution order: ``(layer or RawOp, input tensors, output tensors,
    argument names, keyword arguments)``."""
    fn = _functional(model)
    out = []
    for depth in sorted(fn._nodes_by_depth, reverse=True):
        for node in fn._nodes_by_depth[depth]:
            if node.is_input:
                continue
            op = node.operation
            obj = op if isinstance(op, keras.layers.Layer) else raw_op(op, node)
            ins = list(node.input_tensors)
            names = _arg_names(node.arguments)
            out.append((obj, ins, list(node.output_tensors), tuple(names) if len(names) == len(ins) else (),
                        dict(node.arguments.kwargs)))
    return out


def functionalize(layer, shapes, structure):
    """A functional model of ``layer.call`` on symbolic inputs of these shapes: its sublayers and
    ``keras.ops`` become the model's calls, its own weights constant operands. ``structure(inputs)``
    gives the call's ``(args, kwargs)``. Raises whatever the call raises on symbolic tensors."""
    dtype = getattr(layer, "compute_dtype", None) or "float32"
    inputs = [keras.Input(batch_shape=tuple(s), dtype=dtype) for s in shapes]
    args, kwargs = structure(inputs)
    outputs = layer.call(*args, **kwargs)
    return keras.Model(inputs, outputs, name=f"{layer.name}_call")


def serialize_activation(fn):
    return keras.activations.serialize(fn)


def load(path):
    """Load a ``.keras`` (or ``.h5``) file with Keras 3, without compiling it."""
    problem = _backend_problem()
    if problem:
        raise UnsupportedModelError(f"cannot load {os.fspath(path)!r} with Keras 3: {problem}")
    return keras.saving.load_model(path, compile=False)
