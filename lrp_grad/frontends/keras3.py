"""The Keras 3 front end (``import keras``, what ``tf.keras`` is since TensorFlow 2.16): model
checks, the graph walk, raw ``keras.ops`` operations and loading.

Keras 3 records ``x + y``, ``x * 2``, ``keras.ops.*`` and activation functions called on tensors
as ``Operation`` objects in the functional graph; :func:`raw_op` turns each into a neutral
:class:`~lrp_grad.frontends.graph.RawOp`. A Sequential model keeps its graph in ``_functional``.
"""
from __future__ import annotations

import contextlib
import copy
import os

from ..errors import UnsupportedModelError
from .graph import SHAPE_ONLY, AttentionCore, RawOp, gradient_cut, snake_case

try:  # Keras 3 ships with TensorFlow >= 2.16; with another backend it still imports
    import keras

    available = keras.__version__.split(".")[0] == "3"
except Exception:  # pragma: no cover - a broken or missing Keras 3 install
    keras = None
    available = False

__all__ = ["PACKAGE", "available", "keras", "owns", "check_model", "calls", "graph_model", "io", "functionalize", "is_graph_tensor",
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
    # keras.activations.relu (a layer's activation='relu' called inside a looked-into call), with its options
    # (max_value, negative_slope, threshold): relevance passes, but it is not taken for a plain ReLU
    "ReLU": "keras_relu",
    # elementwise maths inside hand-written normalisations and activations: relevance passes through
    "Square": "square", "Sqrt": "sqrt", "Rsqrt": "rsqrt", "Power": "pow", "Abs": "abs", "Absolute": "abs",
    "Reciprocal": "reciprocal", "Erf": "erf", "Log": "log", "Clip": "clip",
    # elementwise functions of one signal (a phase: WaveMLP's x * cos(theta)): relevance passes through
    "Sin": "sin", "Cos": "cos", "Tan": "tan", "Sinh": "sinh", "Cosh": "cosh", "Arctan": "arctan", "Expm1": "expm1",
    "Log1p": "log1p",
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

    settings = {k: v for k, v in vars(op).items() if not k.startswith("_") and k != "name"}

    def rebind(transform=None):
        def fn(*values):
            args, kwargs = arguments.fill_in({id(t): v for t, v in zip(tensors, values)})
            if transform is None:
                return op(*args, **kwargs)
            attrs, args, kwargs = transform((settings, args, kwargs), values)
            bound = copy.copy(op)
            bound.__dict__.update(attrs)  # the run's batch size in the settings (not through __setattr__)
            return bound(*args, **kwargs)
        return fn

    kind = _KINDS.get(cls, "activation" if cls in _ACTIVATIONS else "other")
    cut = gradient_cut(snake_case(cls), cls == "Cast", node.output_tensors[0].dtype, [t.dtype for t in tensors])
    if cut:
        kind = "cut"
    elif snake_case(cls) in SHAPE_ONLY:
        kind = "shape"
    axes, keepdims, batch_axis = None, False, 0
    if kind in ("mean", "sum") or cls in ("Max", "Amax"):  # a max's axes: refused over the batch axis
        rank = len(tensors[0].shape)
        axis = getattr(op, "axis", None)
        if axis is not None:
            axis = [axis] if isinstance(axis, int) else list(axis)
            axes = tuple(sorted(int(a) % rank for a in axis))
        keepdims = bool(getattr(op, "keepdims", False))
        batch_axis = _stacked_batch_axis(tensors[0])
    if cls == "Softmax":
        rank = len(tensors[0].shape)
        axis = getattr(op, "axis", -1)
        axes = tuple(sorted(int(a) % rank for a in ([axis] if isinstance(axis, int) else axis)))
    return RawOp(name=op.name, symbol=f"keras.ops.{snake_case(cls)}", kind=kind, fn=rebind(), n_tensors=len(tensors),
                 activation=_ACTIVATIONS.get(cls), axes=axes, keepdims=keepdims,
                 out_shape=tuple(node.output_tensors[0].shape), source=op, cut=cut,
                 constants=(settings, arguments.args, arguments.kwargs), rebind=rebind,
                 interpolation=str(getattr(op, "interpolation", "bilinear")).lower() if kind == "resize" else None,
                 batch_axis=batch_axis)


def _stacked_batch_axis(tensor) -> int:
    """Where the batch is in the tensor a reduction reads: axis 1 for ``keras.ops.stack`` of batch
    tensors along axis 0 (``keras.ops.sum(keras.ops.stack([a, b]), axis=0)``), else axis 0."""
    history = getattr(tensor, "_keras_history", None)
    producer = getattr(history, "operation", None)
    if type(producer).__name__ != "Stack" or int(getattr(producer, "axis", 0)) != 0:
        return 0
    args = producer._inbound_nodes[history.node_index].arguments.args
    parts = list(args[0]) if args and isinstance(args[0], (list, tuple)) else []
    batch_first = parts and all(isinstance(t, keras.KerasTensor) and len(t.shape) and t.shape[0] is None
                                for t in parts)
    return 1 if batch_first else 0


def _arg_names(arguments) -> list:
    """Per tensor argument of a call, in the order of ``input_tensors``: ``'0'``, ``'1'`` for
    positional arguments, the keyword for keyword arguments, ``/``-joined inside structures."""
    flat = keras.tree.flatten_with_path((arguments.args, arguments.kwargs))
    return ["/".join(str(p) for p in path[1:]) for path, value in flat
            if isinstance(value, keras.KerasTensor)]


def calls(model):
    """The model's calls in execution order: ``(layer or RawOp, input tensors, output tensors,
    argument names, keyword arguments, rebuild)``; ``rebuild(values)`` is the call's ``(args, kwargs)``
    with its tensors replaced by ``values``."""
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
            if type(op).__name__ == "DotProductAttention":
                obj, ins, names = _attention_core(op, node, obj, ins, names)
            out.append((obj, ins, list(node.output_tensors), tuple(names) if len(names) == len(ins) else (),
                        dict(node.arguments.kwargs), _rebuilder(node.arguments)))
    return out


#: The tensor arguments of ``keras.ops.dot_product_attention``, by position and name.
_QKV = {"0": "query", "1": "key", "2": "value", "query": "query", "key": "key", "value": "value"}


def _attention_core(op, node, raw, ins, names):
    """``keras.ops.dot_product_attention(q, k, v[, scale=])`` as an attention core (the
    ``'attention'`` family's rule): ``softmax(q k^T * scale) v`` over (batch, tokens, heads, dim)
    tensors. With a bias, a mask, a causal mask or a logit cap it stays the raw operation, which is
    refused by name."""
    roles = {_QKV.get(n): t for n, t in zip(names, ins)}
    kwargs = dict(node.arguments.kwargs)
    scale = kwargs.get("scale", node.arguments.args[5] if len(node.arguments.args) > 5 else None)
    rank = len(ins[0].shape) if ins else 0
    if (set(roles) != {"query", "key", "value"} or len(ins) != 3 or op.is_causal or op.attn_logits_soft_cap
            or rank != 4 or not (scale is None or isinstance(scale, (int, float)))
            or any(kwargs.get(k) is not None for k in ("bias", "mask"))):
        return raw, ins, names
    dim = roles["query"].shape[-1]
    scale = float(scale) if scale is not None else 1.0 / float(dim) ** 0.5
    core = AttentionCore(
        name=op.name, symbol="keras.ops.dot_product_attention", dot_equation="BSNH,BTNH->BNTS",
        combine_equation="BNTS,BSNH->BTNH", scale=scale, softmax=lambda s: keras.ops.softmax(s, axis=-1),
        softmax_axes=(3,), source=op)
    return core, [roles["query"], roles["key"], roles["value"]], ("query", "key", "value")


def _rebuilder(arguments):
    """``rebuild(values) -> (args, kwargs)``: the recorded call with its tensors replaced, in order."""
    tensors = list(arguments.keras_tensors)

    def rebuild(values):
        return arguments.fill_in({id(t): v for t, v in zip(tensors, values)})
    return rebuild


def is_graph_tensor(value) -> bool:
    """Whether ``value`` is a symbolic tensor of a traced graph."""
    return isinstance(value, keras.KerasTensor)


def functionalize(layer, shapes, rebuild, dtypes=None):
    """``layer.call`` run on symbolic inputs of these shapes: ``(model, constants)``.

    ``model`` is a functional model whose calls are the layer's sublayers and ``keras.ops`` (its own
    weights constant operands), with the outputs that depend on the inputs; ``constants`` maps the
    position of each other output (a value computed from weights or shapes alone) to that value
    (``model`` is ``None`` when no output depends on the inputs). ``rebuild(inputs)`` gives the
    call's ``(args, kwargs)``. Raises whatever the call raises on symbolic tensors.
    """
    default = getattr(layer, "compute_dtype", None) or "float32"
    dtypes = dtypes or [default] * len(shapes)
    inputs = [keras.Input(batch_shape=tuple(s), dtype=d) for s, d in zip(shapes, dtypes)]
    args, kwargs = rebuild(inputs)
    with _none_outputs_dropped():
        outputs = [t for t in keras.tree.flatten(layer.call(*args, **kwargs)) if t is not None]
    symbolic = [t for t in outputs if isinstance(t, keras.KerasTensor)]
    constants = {i: t for i, t in enumerate(outputs) if not isinstance(t, keras.KerasTensor)}
    model = keras.Model(inputs, symbolic, name=f"{layer.name}_call") if symbolic else None
    return model, constants


@contextlib.contextmanager
def _none_outputs_dropped():
    """While a layer's call is traced: a sublayer returning ``None`` in its outputs (keras-hub's
    ``(x, None)`` when no attention scores are asked for) is recorded with its other outputs; Keras
    refuses such a call on symbolic tensors, although its own forward accepts it."""
    from keras.src.layers import layer as layer_module

    base = layer_module.Node

    class Node(base):
        def __init__(self, operation, call_args=None, call_kwargs=None, outputs=None):
            if outputs is not None:
                outputs = [t for t in keras.tree.flatten(outputs) if t is not None]
            super().__init__(operation, call_args=call_args, call_kwargs=call_kwargs, outputs=outputs)

    layer_module.Node = Node
    try:
        yield
    finally:
        layer_module.Node = base


def serialize_activation(fn):
    return keras.activations.serialize(fn)


def load(path):
    """Load a ``.keras`` (or ``.h5``) file with Keras 3, without compiling it."""
    problem = _backend_problem()
    if problem:
        raise UnsupportedModelError(f"cannot load {os.fspath(path)!r} with Keras 3: {problem}")
    return keras.saving.load_model(path, compile=False)
