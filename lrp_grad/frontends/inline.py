"""The model walk's inlining: nested graph models, and layers looked into.

A layer without a handler (a subclassed block, a ``Lambda``, an ``Activation`` of a user
function) is run on symbolic inputs and its calls are inlined in its place, recursively
(:func:`inline`); a call that reads the batch size is traced at two batch sizes
(:mod:`lrp_grad.frontends.tracing`). ``MultiHeadAttention`` is split into its parts
(:mod:`lrp_grad.frontends.blocks`).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import tensorflow as tf

from . import blocks, tracing
from .classes import is_layer, layer_classes
from .graph import Node, RawOp, class_name, layer_label

__all__ = ["TRAINING_NOTE", "BATCH_NOTE", "inline", "shape_of"]


def shape_of(t):
    """The static shape of a symbolic tensor, as a ``tf.TensorShape``."""
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


#: The refusal of a call inside a layer traced at two batch sizes whose settings change with the
#: batch size in a way :mod:`~lrp_grad.frontends.tracing` cannot follow (``B + 1``, ``B // 2``).
BATCH_NOTE = ("its call uses the batch size in a way lrp_grad cannot follow (only sizes that are whole multiples "
              "of the batch size, such as a class token tiled per image or windows per image, are supported)")

#: How deep layers are looked into (a layer whose call is made of layers whose calls are ...).
_MAX_DEPTH = 12


def _why(e) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


@dataclass(frozen=True)
class _Inside:
    """What looking inside a layer's call found: ``model`` (the calls on the outputs that depend on
    the inputs, or ``None``), ``constants`` (output position -> a value computed without the
    inputs) and, for a layer traced at two batch sizes, ``twin`` (the second trace's model);
    ``recorded``: the model's calls (``frontend.calls(model)``), read once."""

    model: object
    constants: dict
    twin: object = None
    recorded: tuple = ()


def _look_inside(frontend, layer, in_shapes, rebuild, dtypes, traced_shapes=None):
    """``(_Inside, None)`` of the layer's ``call`` run on symbolic inputs (its sublayers and
    operations become the graph's calls; its own weights are constants there), or ``(None, why)``.

    A call that fails on an unknown batch size (it reads the size: a class token tiled per image, a
    window partition) is traced at two batch sizes instead (:mod:`lrp_grad.frontends.tracing`); a
    layer called inside such a trace is traced at the shapes it had there (``traced_shapes``, per
    trace: windows per image times the traced batch size).
    """
    rebuild = _accepted(layer, rebuild)
    try:
        model, constants = frontend.functionalize(layer, in_shapes, rebuild, dtypes)
        recorded = tuple(frontend.calls(model)) if model is not None else ()
        unknown = _unknown_size(frontend, recorded)
        if not unknown:
            return _Inside(model, constants, recorded=recorded), None
        first = f"{unknown} has a size recorded as unknown (None)"
    except Exception as e:  # noqa: BLE001 - any failure of the user's call is reported, not raised
        first = _why(e)
    if traced_shapes is None and not any(s.rank and s[0] is None for s in in_shapes):
        return None, first
    sizes = traced_shapes or [tracing.batch_sizes(in_shapes, n) for n in tracing.SIZES]
    try:
        traces = [frontend.functionalize(layer, shapes, rebuild, dtypes) for shapes in sizes]
    except Exception:  # noqa: BLE001 - the batch size was not what it stumbled on
        return None, first
    (model, constants), (twin, constants2) = traces
    if set(constants) != set(constants2) or (model is None) != (twin is None):
        return None, f"{first} (and its outputs differ between batch sizes)"
    return _Inside(model, constants, twin, tuple(frontend.calls(model)) if model is not None else ()), None


def _accepted(layer, rebuild):
    """``rebuild`` without the keyword arguments ``layer.call`` does not take: Keras passes
    ``training`` and ``mask`` to a call only when its signature names them."""
    try:
        params = inspect.signature(layer.call).parameters.values()
    except (TypeError, ValueError):
        return rebuild
    if any(p.kind == p.VAR_KEYWORD for p in params):
        return rebuild
    names = {p.name for p in params}

    def filtered(values):
        args, kwargs = rebuild(values)
        return args, {k: v for k, v in kwargs.items() if k in names}
    return filtered


def _unknown_size(frontend, recorded) -> str:
    """The first of these calls whose operation's settings hold an unknown size, or ``""``."""
    for obj, *_ in recorded:
        if isinstance(obj, RawOp) and tracing.unknown_size(obj.constants, frontend.is_graph_tensor):
            return f"operation {obj.symbol}"
    return ""


def _twin_calls(frontend, inside):
    """The second trace's calls, one per call of the first, checked to be the same calls."""
    calls, twins = inside.recorded, frontend.calls(inside.twin)
    if len(calls) != len(twins):
        raise tracing.BatchLinkError(f"its call makes {len(calls)} calls at batch size {tracing.SIZES[0]} and "
                                     f"{len(twins)} at batch size {tracing.SIZES[1]}")
    for a, b in zip(calls, twins):
        if class_name(a[0]) != class_name(b[0]) or len(a[1]) != len(b[1]) or len(a[2]) != len(b[2]):
            raise tracing.BatchLinkError(f"it calls {class_name(a[0])} at batch size {tracing.SIZES[0]} where it "
                                         f"calls {class_name(b[0])} at batch size {tracing.SIZES[1]}")
    return twins


def _constant_op(layer, value, index):
    """A node's operation that yields one output of ``layer`` computed without its inputs (a weight
    returned as it is is read when the pass runs, so it follows the layer's current weights)."""
    const = value if isinstance(value, tf.Variable) or hasattr(value, "assign") else tf.convert_to_tensor(value)
    return RawOp(name=f"{layer.name}/output_{index}", symbol=f"{type(layer).__name__} (an output computed from "
                 "its weights or shapes alone)", kind="shape", fn=lambda *_: tf.convert_to_tensor(const), n_tensors=0,
                 out_shape=tuple(const.shape))


def inline(frontend, model, input_ids, output_ids, prefix, label_prefix, nodes, calls, look_inside=None, depth=0,
            twin_calls=None, recorded=None):
    """Append ``model``'s calls to ``nodes``, nested graph models inlined recursively.

    Tensor ids get the call path as prefix so that a model used twice stays distinct; the inner
    model's inputs and outputs are renamed to the outer tensors they stand for. A layer for which
    ``look_inside(layer)`` is true (no handler: a subclassed block, a ``Lambda``) is run on symbolic
    inputs and inlined the same way, its calls labelled ``'layer/...'``. ``twin_calls``: the calls
    of the same model traced at another batch size (see :func:`_look_inside`): shapes that scale
    with the batch become unknown again, and operations replay with the run's batch size.
    ``recorded``: ``frontend.calls(model)`` when the caller already read them.
    """
    inputs, outputs = frontend.io(model)
    rename = {str(id(t)): outer for t, outer in zip(inputs, input_ids)}
    passed = []  # (tensor id, outer id, tensor): an output that is an input, or an output given twice
    for t, outer in zip(outputs, output_ids):
        if str(id(t)) not in rename:
            rename[str(id(t))] = outer
        elif rename[str(id(t))] != outer:
            passed.append((rename[str(id(t))], outer, t))

    def tensor(t):
        t_id = str(id(t))
        return rename.get(t_id, prefix + t_id)

    for i, (obj, ins, outs, arg_names, kwargs, rebuild) in enumerate(frontend.calls(model) if recorded is None else recorded):
        key = label_prefix + obj.name
        calls[key] = calls.get(key, 0) + 1
        label = key if calls[key] == 1 else f"{key}#{calls[key]}"
        in_ids = tuple(tensor(t) for t in ins)
        out_ids = tuple(tensor(t) for t in outs)
        in_shapes = tuple(shape_of(t) for t in ins)
        out_shapes = tuple(shape_of(t) for t in outs)
        note, traced_shapes = "", None
        if twin_calls is not None:
            traced_shapes = (in_shapes, tuple(shape_of(t) for t in twin_calls[i][1]))
            obj, in_shapes, out_shapes, note = _untwin(frontend, obj, ins, outs, kwargs, twin_calls[i], label)
        inner = None if isinstance(obj, RawOp) else frontend.graph_model(obj)
        if inner is not None and not note:
            inline(frontend, inner, in_ids, out_ids, f"{prefix}{label}/", f"{label}/", nodes, calls, look_inside,
                    depth)
            continue
        if is_layer(obj, "MultiHeadAttention") and not note:  # its projections and attention core, each with its rule
            probe = _constant_query(frontend, ins, in_ids, arg_names, in_shapes, rebuild, twin_calls and twin_calls[i],
                                    label)
            if probe is not None:  # a learned query (attention pooling): a constant of the graph
                nodes.append(probe)
                in_ids, arg_names, in_shapes = (in_ids + probe.outputs, arg_names + ("query",),
                                                in_shapes + probe.output_shapes)
            nodes.extend(blocks.split_attention(obj, in_ids, out_ids, arg_names, kwargs, label, in_shapes))
            continue
        if not isinstance(obj, RawOp) and (kwargs or {}).get("training") is True and _trains_differently(obj):
            nodes.append(Node(obj, in_ids, out_ids, label, in_shapes, out_shapes, arg_names=arg_names,
                              note=TRAINING_NOTE))
            continue
        decision = (look_inside(obj) if not note and look_inside is not None and not isinstance(obj, RawOp)
                    and depth < _MAX_DEPTH else False)
        if decision == "activation" and len(outs) == 1:  # Dense(activation=my_gelu): the layer, then the function
            if _split_activation(frontend, obj, ins, in_ids, outs, out_ids, in_shapes, out_shapes, arg_names, prefix,
                                 label, nodes, calls, look_inside, depth):
                continue
            decision = False
        if decision:
            inside, note = _look_inside(frontend, obj, in_shapes, rebuild, [t.dtype for t in ins], traced_shapes)
            if inside is not None:
                note = _inline_inside(frontend, obj, inside, in_ids, out_ids, out_shapes, prefix, label, nodes, calls,
                                      look_inside, depth)
                if not note:
                    continue
            note = f"looking inside its call failed at {note}"
        nodes.append(Node(obj, in_ids, out_ids, label, in_shapes, out_shapes, arg_names=arg_names,
                          note="" if note.startswith(BATCH_NOTE) else note,
                          refusal=note if note.startswith(BATCH_NOTE) else ""))
    for k, (inner_id, outer_id, t) in enumerate(passed):  # (an input returned as it is: a DropPath at inference)
        op = RawOp(name=f"{label_prefix}identity_{k}", symbol="identity (a tensor returned as it is)", kind="route",
                   fn=tf.identity, n_tensors=1, out_shape=tuple(shape_of(t).as_list() if shape_of(t).rank else ()))
        nodes.append(Node(op, (inner_id,), (outer_id,), f"{label_prefix}identity_{k}", (shape_of(t),), (shape_of(t),)))


@dataclass(frozen=True)
class _ActivationCall:
    """A layer's own activation function, as something :func:`_look_inside` can trace."""

    layer: object

    @property
    def name(self):
        return f"{self.layer.name}_activation"

    def call(self, x):
        return self.layer.activation(x)


def _split_activation(frontend, layer, ins, in_ids, outs, out_ids, in_shapes, out_shapes, arg_names, prefix, label,
                      nodes, calls, look_inside, depth) -> bool:
    """Append a layer whose activation is a user's function as its linear part followed by the
    function's operations (traced like an ``Activation`` of it); ``False`` when the function cannot
    be traced (the layer is then refused naming its activation)."""
    act = _ActivationCall(layer)
    inside, _ = _look_inside(frontend, act, out_shapes, lambda values: ([values[0]], {}), [outs[0].dtype])
    if inside is None:
        return False
    linear_id = f"{out_ids[0]}:linear"
    added = [Node(layer, in_ids, (linear_id,), label, in_shapes, out_shapes, arg_names=arg_names, linear_only=True)]
    if _inline_inside(frontend, act, inside, (linear_id,), out_ids, out_shapes, prefix, f"{label}/activation", added,
                      calls, look_inside, depth):
        return False
    nodes.extend(added)
    return True


def _constant_query(frontend, ins, in_ids, arg_names, in_shapes, rebuild, twin, label):
    """The node of a ``MultiHeadAttention``'s query when it is a constant, not a tensor of the graph
    (SigLIP's attention pooling attends from a learned probe tiled per image), else ``None``."""
    if not arg_names or {"0", "query"} & set(arg_names) or not ({"1", "value"} & set(arg_names)):
        return None
    args, kwargs = rebuild([None] * len(ins))
    query = kwargs.get("query", args[0] if args else None)
    if query is None or not hasattr(query, "shape"):
        return None
    ref = arg_names.index("1" if "1" in arg_names else "value")
    query2, ref2 = None, in_shapes[ref]
    if twin:
        args2, kwargs2 = twin[5]([None] * len(twin[1]))
        query2, ref2 = kwargs2.get("query", args2[0] if args2 else None), shape_of(twin[1][ref])
    try:
        make = tracing.linked_constant(query, query2, shape_of(ins[ref]), ref2, frontend.is_graph_tensor)
        shape = tracing.unlink_shape(tf.TensorShape(query.shape), tf.TensorShape(query2.shape), "the query") \
            if query2 is not None else tf.TensorShape(query.shape)
    except tracing.BatchLinkError:
        return None
    op = RawOp(name=f"{label}/query", symbol="MultiHeadAttention query (a constant: a learned probe)", kind="shape",
               fn=make, n_tensors=1, out_shape=tuple(shape.as_list()))
    return Node(op, (in_ids[ref],), (f"{in_ids[ref]}:{label}/query",), f"{label}/query_constant", (in_shapes[ref],),
                (shape,))


def _untwin(frontend, obj, ins, outs, kwargs, twin, label):
    """``(obj, in_shapes, out_shapes, note)`` of a call of a layer's first trace, given the same call
    in its second trace: shapes that scale with the batch unknown, an operation's batch-size
    settings replaced by the run's (``note`` says why not, when they cannot be)."""
    obj2, ins2, outs2, _, kwargs2, _ = twin
    try:
        in_shapes = tuple(tracing.unlink_shape(shape_of(a), shape_of(b), f"input {k} of {label!r}")
                          for k, (a, b) in enumerate(zip(ins, ins2)))
        out_shapes = tuple(tracing.unlink_shape(shape_of(a), shape_of(b), f"output {k} of {label!r}")
                           for k, (a, b) in enumerate(zip(outs, outs2)))
        if isinstance(obj, RawOp):
            obj = tracing.linked_op(obj, obj2, [shape_of(t) for t in ins], [shape_of(t) for t in ins2],
                                    frontend.is_graph_tensor)
        else:
            tracing.compare_kwargs(kwargs, kwargs2, frontend.is_graph_tensor, f"layer {layer_label(obj)}")
    except tracing.BatchLinkError as e:
        shapes = tuple(shape_of(t) for t in ins), tuple(shape_of(t) for t in outs)
        return obj, shapes[0], shapes[1], f"{BATCH_NOTE}: {e}"
    return obj, in_shapes, out_shapes, ""


def _inline_inside(frontend, layer, inside, in_ids, out_ids, out_shapes, prefix, label, nodes, calls, look_inside,
                   depth) -> str:
    """Inline what :func:`_look_inside` found for ``layer``; returns why not ("" when done)."""
    n_out = len(out_ids)
    n_model = len(frontend.io(inside.model)[1]) if inside.model is not None else 0
    if n_model + len(inside.constants) != n_out or any(not 0 <= k < n_out for k in inside.constants):
        return f"its call returns {n_model + len(inside.constants)} values where the model records {n_out} outputs"
    added = []
    twin_calls = None
    if inside.twin is not None:
        try:
            twin_calls = _twin_calls(frontend, inside)
        except tracing.BatchLinkError as e:
            return f"{BATCH_NOTE}: {e}"
    if inside.model is not None:
        symbolic_ids = tuple(out_ids[k] for k in range(n_out) if k not in inside.constants)
        inline(frontend, inside.model, in_ids, symbolic_ids, f"{prefix}{label}/", f"{label}/", added, calls,
                look_inside, depth + 1, twin_calls, inside.recorded)
    for k, value in sorted(inside.constants.items()):
        op = _constant_op(layer, value, k)
        added.append(Node(op, (), (out_ids[k],), f"{label}/output_{k}", (), (out_shapes[k],)))
    nodes.extend(added)
    return ""
