"""Test helpers: small models, float64 copies and Keras -> numpy-reference conversion.

Model builders take ``K``, the Keras package module to build with (``keras`` for Keras 3 or
``tf_keras``; the ``K`` fixture of conftest.py gives both); the default is tf-keras.
"""
import importlib

import numpy as np
import tf_keras as keras

from lrp_grad.frontends import RawOp, activation_name, is_layer, is_model

L = keras.layers

#: The Keras packages every model-level suite runs on (module names).
PACKAGES = ("keras", "tf_keras")


def application_layers(K):
    """The layer classes ``K.applications`` defines for itself (ConvNeXt's LayerScale, ...)."""
    import types

    root = "keras.src.applications" if K.__name__ == "keras" else "tf_keras.src.applications"
    convnext = __import__(f"{root}.convnext", fromlist=["LayerScale"])
    irv2 = __import__(f"{root}.inception_resnet_v2", fromlist=["CustomScaleLayer"])
    return types.SimpleNamespace(LayerScale=convnext.LayerScale, CustomScaleLayer=irv2.CustomScaleLayer)


def package(name):
    """The Keras package module ``name`` (``'keras'`` is Keras 3)."""
    return importlib.import_module(name)


def ops_of(K):
    """Raw tensor operations of package ``K`` (``keras.ops`` for Keras 3, TensorFlow for tf-keras):
    what a user writes between layers."""
    import tensorflow as tf

    if K.__name__ == "keras":
        return K.ops
    return _TFOps(tf)


class _TFOps:
    """The tf-keras spelling of the ``keras.ops`` functions the tests use (recorded as TFOpLambda)."""

    def __init__(self, tf):
        self.tf = tf

    def add(self, a, b):
        return self.tf.math.add(a, b)

    def multiply(self, a, b):
        return self.tf.math.multiply(a, b)

    def relu(self, x):
        return self.tf.nn.relu(x)

    def matmul(self, a, b):
        return self.tf.linalg.matmul(a, b)

    def transpose(self, x, axes):
        return self.tf.transpose(x, axes)

    def softmax(self, x, axis=-1):
        return self.tf.nn.softmax(x, axis=axis)

    def sigmoid(self, x):
        return self.tf.math.sigmoid(x)

    def reshape(self, x, shape):
        return self.tf.reshape(x, shape)

    def concatenate(self, xs, axis=-1):
        return self.tf.concat(xs, axis=axis)

    def mean(self, x, axis=None, keepdims=False):
        return self.tf.reduce_mean(x, axis=axis, keepdims=keepdims)

    def sum(self, x, axis=None, keepdims=False):
        return self.tf.reduce_sum(x, axis=axis, keepdims=keepdims)

    def transpose(self, x, axes=None):
        return self.tf.transpose(x, perm=axes)

    def sin(self, x):
        return self.tf.math.sin(x)

    def cumprod(self, x, axis=-1):
        return self.tf.math.cumprod(x, axis=axis)

    def subtract(self, a, b):
        return self.tf.math.subtract(a, b)

    def divide(self, a, b):
        return self.tf.math.divide(a, b)

    def power(self, a, b):
        return self.tf.math.pow(a, b)


def rel_err(a, b):
    """Relative L2 error of ``a`` against ``b``."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def assert_close(actual, expected, rtol, what=""):
    """Relative-L2 comparison that prints the worst elements on failure."""
    err = rel_err(actual, expected)
    if not err <= rtol:
        diff = np.abs(np.asarray(actual, np.float64) - expected).ravel()
        worst = np.argsort(diff)[::-1][:5]
        rows = "\n".join(
            f"  index {np.unravel_index(i, np.shape(expected))}: got {np.ravel(actual)[i]:.10g}, "
            f"expected {np.ravel(expected)[i]:.10g}"
            for i in worst
        )
        raise AssertionError(f"{what}: relative L2 error {err:.3e} > {rtol:.1e}; worst elements:\n{rows}")


def randomize(model, seed=0, bias_scale=0.3):
    """Give every weight random values (biases of both signs), in place on a test model."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        ws = layer.get_weights()
        if is_layer(layer, "BatchNormalization"):
            gamma, beta, mean, var = (w.shape for w in ws)
            new = [rng.uniform(0.5, 1.5, gamma) * rng.choice([-1, 1], gamma), rng.normal(0, 0.3, beta),
                   rng.normal(0, 0.3, mean), rng.uniform(0.5, 2.0, var)]
            layer.set_weights([n.astype(w.dtype) for n, w in zip(new, ws)])
        elif is_model(layer):
            randomize(layer, seed + 1, bias_scale)
        elif ws:
            new = [rng.normal(0, 0.5, w.shape) if w.ndim > 1 else rng.normal(0, bias_scale, w.shape) for w in ws]
            layer.set_weights([n.astype(w.dtype) for n, w in zip(new, ws)])
    return model


def to_float64(model):
    """A float64 copy of a Sequential/Functional model with the same weights."""
    config = model.get_config()
    for layer in config["layers"]:
        if "dtype" in layer["config"] or layer["class_name"] == "InputLayer":  # not on raw operations
            layer["config"]["dtype"] = "float64"
    clone = model.__class__.from_config(config)
    clone.set_weights([w.astype(np.float64) for w in model.get_weights()])
    return clone


def to_npref(model):
    """Describe a Sequential model as the layer dicts of tests/npref.py (float64 weights)."""
    out = []
    for layer in model.layers:
        name = type(layer).__name__
        if name == "Dense":
            out.append({"type": "dense", "W": layer.kernel.numpy().astype(np.float64),
                        "b": layer.bias.numpy().astype(np.float64) if layer.use_bias else None,
                        "act": activation_name(layer.activation)})
        elif name == "Conv2D":
            out.append({"type": "conv2d", "W": layer.kernel.numpy().astype(np.float64),
                        "b": layer.bias.numpy().astype(np.float64) if layer.use_bias else None,
                        "strides": tuple(layer.strides), "padding": layer.padding,
                        "dilation": tuple(layer.dilation_rate),
                        "act": activation_name(layer.activation)})
        elif name == "MaxPooling2D":
            out.append({"type": "maxpool", "pool": tuple(layer.pool_size), "strides": tuple(layer.strides),
                        "padding": layer.padding})
        elif name == "Flatten":
            out.append({"type": "flatten"})
        elif name == "Reshape":
            out.append({"type": "reshape", "shape": tuple(layer.target_shape)})
        elif name in ("ReLU",) or (name == "Activation" and activation_name(layer.activation) == "relu"):
            out.append({"type": "relu"})
        elif name == "Dropout":
            continue
        else:
            raise ValueError(f"kit.to_npref: no reference for layer class {name}")
    return out


def npref_rule(rule):
    """The tests/npref.py rule dict of an lrp_grad rule."""
    import lrp_grad as lg

    if isinstance(rule, lg.Z):
        return {"name": "z"}
    if isinstance(rule, lg.Epsilon):
        return {"name": "epsilon", "epsilon": rule.epsilon, "bias": rule.bias}
    if isinstance(rule, lg.AlphaBeta):  # ZPlus included
        return {"name": "alphabeta", "alpha": rule.alpha, "beta": rule.beta, "bias": rule.bias}
    if isinstance(rule, lg.Flat):
        return {"name": "flat"}
    if isinstance(rule, lg.WSquare):
        return {"name": "wsquare"}
    if isinstance(rule, lg.ZBox):
        return {"name": "zbox", "low": rule.low, "high": rule.high, "bias": rule.bias}
    if isinstance(rule, lg.Gamma):
        return {"name": "gamma", "gamma": rule.gamma}
    raise ValueError(f"kit.npref_rule: unknown rule {rule!r}")


def cnn(input_shape=(10, 10, 3), padding="same", strides=1, dilation=1, bias=True, act="relu",
        dtype="float32", classes=5, seed=0, K=keras):
    """Conv - MaxPool - Conv - Flatten - Dense - Dense, for the reference grid."""
    kw = dict(dtype=dtype, use_bias=bias)
    L = K.layers
    model = K.Sequential([
        K.Input(input_shape, dtype=dtype),
        L.Conv2D(4, 3, strides=strides, padding=padding, dilation_rate=dilation, activation=act, **kw),
        L.MaxPooling2D(2, padding="same", dtype=dtype),
        L.Conv2D(5, 2, padding="valid", activation=act, **kw),
        L.Flatten(dtype=dtype),
        L.Dense(6, activation=act, **kw),
        L.Dense(classes, **kw),
    ])
    return randomize(model, seed)


def mlp(d_in=7, bias=True, act="relu", dtype="float32", classes=4, seed=0, K=keras):
    """Dense - Dense - ReLU layer - Dense."""
    kw = dict(dtype=dtype, use_bias=bias)
    L = K.layers
    model = K.Sequential([
        K.Input((d_in,), dtype=dtype),
        L.Dense(6, activation=act, **kw),
        L.Dense(5, **kw),
        L.ReLU(dtype=dtype),
        L.Dense(classes, **kw),
    ])
    return randomize(model, seed)


def _act_name(fn):
    name = activation_name(fn)
    return "swish" if name == "silu" else name


def _act_params(fn):
    """The npref ``"alpha"`` of an activation whose parameter differs from npref's default."""
    name, tf_keras_fn = activation_name(fn), (getattr(fn, "__module__", "") or "").startswith("tf_keras")
    if name == "hard_sigmoid" and tf_keras_fn:  # tf-keras: clip(0.2 x + 0.5, 0, 1)
        return {"alpha": 0.2}
    if name == "leaky_relu" and not tf_keras_fn:  # Keras 3's default slope, a float32 attribute in TF
        return {"alpha": float(np.float32(0.2))}
    return {}


def _np(v):
    return v.numpy().astype(np.float64)


def _weighted_dict(kind, layer, W, **extra):
    return {"type": kind, "W": _np(W), "b": _np(layer.bias) if layer.use_bias else None,
            "act": _act_name(layer.activation), **_act_params(layer.activation), **extra}


def _multiply_npref(node, producers):
    """The npref ``multiply`` of a product node, its signal as the library reads it from the graph
    (:func:`lrp_grad.gating.gate_index`)."""
    from lrp_grad import gating, handlers

    gate, why = gating.gate_index(node, producers, lambda n: n.handler or handlers.handler_for(n.layer))
    if gate is None:
        raise ValueError(f"kit.to_npref_graph: lrp_grad refuses the product {node.label!r}: {why}")
    return {"type": "multiply", "signal": 1 - gate}


def to_npref_graph(model, output=None, labels=False):
    """Describe a Functional/Sequential model (nested models inlined) as npref DAG layer dicts.

    Uses the raw layer graph (no canonizers), so BatchNorm stays a layer of its own. ``output``
    selects what is explained, as ``Explainer(output=...)`` (the layers it needs are kept; the
    last dict is the explained layer). Model inputs after the first become npref ``input``
    layers (pass ``x`` as a list of arrays to npref then). With ``labels``, also returns
    ``{layer call label: npref activation index}`` (activation ``a_k`` is that layer's output).
    """
    from lrp_grad.frontends import walk

    graph = walk(model, output)
    index = {graph.input_id: 0}
    out = []
    for k, t in enumerate(graph.input_ids[1:], start=1):  # further model inputs
        out.append({"type": "input", "index": k})
        index[t] = len(out)

    producers = {t: n for n in graph.nodes for t in n.outputs}

    def add(entry, inputs, output_id):
        entry["inputs"] = [index[t] for t in inputs] if isinstance(inputs[0], str) else inputs
        out.append(entry)
        index[output_id] = len(out)

    for node in graph.nodes:
        layer, name = node.layer, type(node.layer).__name__
        ins, (oid,) = node.inputs, node.outputs
        if isinstance(layer, RawOp) and layer.kind == "multiply" and layer.n_tensors == 2:
            add(_multiply_npref(node, producers), ins, oid)
        elif isinstance(layer, RawOp):
            add(_raw_npref(layer, node), ins, oid)
        elif name == "Dense":
            add(_weighted_dict("dense", layer, layer.kernel), ins, oid)
        elif name == "Conv2D":
            add(_weighted_dict("conv2d", layer, layer.kernel, strides=tuple(layer.strides), padding=layer.padding,
                               dilation=tuple(layer.dilation_rate), groups=int(layer.groups)), ins, oid)
        elif name == "Conv1D":
            add(_weighted_dict("conv1d", layer, layer.kernel, strides=layer.strides[0], padding=layer.padding,
                               dilation=layer.dilation_rate[0], groups=int(layer.groups)), ins, oid)
        elif name == "DepthwiseConv2D":
            add(_weighted_dict("depthwise", layer, layer.depthwise_kernel if hasattr(layer, "depthwise_kernel") else layer.kernel, strides=tuple(layer.strides),
                               padding=layer.padding, dilation=tuple(layer.dilation_rate)), ins, oid)
        elif name == "SeparableConv2D":
            out.append({"type": "depthwise", "W": _np(layer.depthwise_kernel), "b": None, "act": "linear",
                        "strides": tuple(layer.strides), "padding": layer.padding,
                        "dilation": tuple(layer.dilation_rate), "inputs": [index[ins[0]]]})
            add(_weighted_dict("conv2d", layer, layer.pointwise_kernel), [len(out)], oid)
        elif name == "Conv2DTranspose":
            add(_weighted_dict("conv2d_transpose", layer, layer.kernel, strides=tuple(layer.strides),
                               padding=layer.padding), ins, oid)
        elif name == "AveragePooling2D":
            add({"type": "avgpool", "pool": tuple(layer.pool_size), "strides": tuple(layer.strides),
                 "padding": layer.padding}, ins, oid)
        elif name in ("GlobalAveragePooling2D", "GlobalAveragePooling1D") and getattr(layer, "keepdims", False):
            out.append({"type": "global_avgpool", "inputs": [index[ins[0]]]})
            add({"type": "reshape", "shape": tuple(node.output_shapes[0])[1:]}, [len(out)], oid)
        elif name in ("GlobalAveragePooling2D", "GlobalAveragePooling1D"):
            add({"type": "global_avgpool"}, ins, oid)
        elif name == "BatchNormalization":
            add({"type": "batchnorm", "gamma": _np(layer.gamma), "beta": _np(layer.beta),
                 "mean": _np(layer.moving_mean), "var": _np(layer.moving_variance), "eps": layer.epsilon}, ins, oid)
        elif name == "Add":
            add({"type": "add"}, ins, oid)
        elif name == "Concatenate":
            add({"type": "concat"}, ins, oid)
        elif name == "Multiply":
            add(_multiply_npref(node, producers), ins, oid)
        elif name == "LayerScale":
            add({"type": "layerscale", "gamma": _np(layer.gamma)}, ins, oid)
        elif name == "CustomScaleLayer":  # x + scale * r: an add with weights 1 and scale
            add({"type": "add", "weights": [1.0, float(layer.scale)]}, ins, oid)
        elif name == "MaxPooling2D":
            add({"type": "maxpool", "pool": tuple(layer.pool_size), "strides": tuple(layer.strides),
                 "padding": layer.padding}, ins, oid)
        elif name == "GlobalMaxPooling2D":
            add({"type": "global_maxpool"}, ins, oid)
        elif name == "ZeroPadding2D":
            add({"type": "zeropad2d", "pad": tuple(tuple(p) for p in layer.padding)}, ins, oid)
        elif name == "Cropping2D":
            add({"type": "crop2d", "crop": tuple(tuple(c) for c in layer.cropping)}, ins, oid)
        elif name == "UpSampling2D":
            add({"type": "upsample2d", "size": tuple(layer.size)}, ins, oid)
        elif name == "Flatten":
            add({"type": "flatten"}, ins, oid)
        elif name == "Reshape":
            add({"type": "reshape", "shape": tuple(layer.target_shape)}, ins, oid)
        elif name in ("Dropout", "SpatialDropout2D"):
            add({"type": "identity"}, ins, oid)
        elif name == "Activation":
            add({"type": "act", "fn": _act_name(layer.activation), **_act_params(layer.activation)}, ins, oid)
        elif name == "ReLU" and layer.max_value is None and float(layer.negative_slope) == 0:
            add({"type": "relu"}, ins, oid)
        elif name == "ReLU" and float(layer.max_value) == 6.0:
            add({"type": "act", "fn": "relu6"}, ins, oid)
        elif name == "LeakyReLU":
            slope = layer.negative_slope if hasattr(layer, "negative_slope") else layer.alpha
            # TensorFlow's LeakyRelu op holds its slope in float32, even for float64 tensors
            add({"type": "act", "fn": "leaky_relu", "alpha": float(np.float32(slope))}, ins, oid)
        elif name == "ELU":
            add({"type": "act", "fn": "elu", "alpha": float(layer.alpha)}, ins, oid)
        else:
            raise ValueError(f"kit.to_npref_graph: no reference for layer class {name}")
    if labels:
        return out, {node.label: index[node.outputs[0]] for node in graph.nodes}
    return out


def _raw_npref(op, node):
    """The npref layer dict of a raw operation (the ones the tests build)."""
    if op.kind == "add" and op.n_tensors == 2:
        return {"type": "add"}
    if op.kind == "activation" and op.activation == "relu":
        return {"type": "relu"}
    if op.kind == "mean" and op.axes == tuple(range(1, node.input_shapes[0].rank - 1)) and not op.keepdims:
        return {"type": "global_avgpool"}
    if op.kind == "route" and op.symbol in ("keras.ops.concatenate", "tf.concat"):
        return {"type": "concat"}
    if op.kind == "route" and op.symbol in ("keras.ops.reshape", "tf.reshape"):
        return {"type": "reshape", "shape": tuple(op.out_shape[1:])}
    raise ValueError(f"kit.to_npref_graph: no reference for raw operation {op!r}")


def npref_explain(model, x, target, rule, layer_rules=None, initial="logit", masks=None, per_layer=False):
    """float64 reference relevance of ``model`` on ``x`` for ``target`` (initial = target logit,
    or 1 with ``initial='one'``); ``layer_rules`` maps npref layer indices to lrp_grad rules;
    ``masks`` maps layer labels to channel masks (CRP conditions, see ``npref.lrp``). With
    ``per_layer``, returns ``(R_in, {label: relevance at the layer's output})``."""
    import npref

    layers, label_index = to_npref_graph(model, labels=True)
    x = np.asarray(x, np.float64)
    logits = npref.forward(layers, x)[-1]
    r_out = np.zeros_like(logits)
    rows = np.arange(len(x))
    r_out[rows, target] = logits[rows, target] if initial == "logit" else 1.0
    rules_at = {k: npref_rule(r) for k, r in (layer_rules or {}).items()}
    if not isinstance(rule, (lg_rules().Z, lg_rules().Epsilon)):
        # lrp_grad's single-rule policy (composites.single_rule): weight-free linear layers get
        # Epsilon(1e-6) unless the test says otherwise
        for i, layer in enumerate(layers):
            if layer["type"] in WEIGHT_FREE and i not in rules_at:
                rules_at[i] = npref_rule(lg_rules().Epsilon(1e-6))
    masks = {label_index[k]: v for k, v in (masks or {}).items()}
    R, acts = npref.lrp(layers, x, r_out, npref_rule(rule), layer_rules=rules_at, masks=masks)
    if per_layer:
        return R, {k: acts[i] for k, i in label_index.items()}
    return R


#: npref layer types that are weight-free linear layers in lrp_grad (families pool, merge, norm).
WEIGHT_FREE = ("avgpool", "global_avgpool", "add", "batchnorm")


def lg_rules():
    import lrp_grad.rules

    return lrp_grad.rules


#: Runs ``lrp_grad.app.cli.main`` on each named argv in one fresh interpreter and prints, as the last
#: line, JSON ``{"tf": TensorFlow imported?, "out": {name: [status, stderr, stdout]}}``.
_CLI_CASES = ("import json, sys, contextlib, io\nfrom lrp_grad.app import cli\nout = {}\n"
              "for name, argv in json.loads(sys.argv[1]).items():\n"
              "    err = io.StringIO()\n"
              "    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()) as o:\n"
              "        try:\n            status = cli.main(argv)\n"
              "        except SystemExit as e:\n            status = e.code\n"
              "    out[name] = [status, err.getvalue(), o.getvalue()]\n"
              "print(json.dumps({'tf': 'tensorflow' in sys.modules, 'out': out}))\n")


def cli_in_fresh_interpreter(cases: dict, timeout: int = 120):
    """The finished process of :data:`_CLI_CASES` run on ``cases`` ({name: argv})."""
    import json
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-c", _CLI_CASES, json.dumps(cases)], capture_output=True, text=True,
                          timeout=timeout)
