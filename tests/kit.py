"""Test helpers: small models, float64 copies and Keras -> numpy-reference conversion."""
import numpy as np
import tf_keras as keras

L = keras.layers


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
        if ws:
            new = [rng.normal(0, 0.5, w.shape) if w.ndim > 1 else rng.normal(0, bias_scale, w.shape) for w in ws]
            layer.set_weights([n.astype(w.dtype) for n, w in zip(new, ws)])
    return model


def to_float64(model):
    """A float64 copy of a Sequential/Functional model with the same weights."""
    config = model.get_config()
    for layer in config["layers"]:
        layer["config"]["dtype"] = "float64"
        if layer["class_name"] == "InputLayer":
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
                        "act": keras.activations.serialize(layer.activation)})
        elif name == "Conv2D":
            out.append({"type": "conv2d", "W": layer.kernel.numpy().astype(np.float64),
                        "b": layer.bias.numpy().astype(np.float64) if layer.use_bias else None,
                        "strides": tuple(layer.strides), "padding": layer.padding,
                        "dilation": tuple(layer.dilation_rate),
                        "act": keras.activations.serialize(layer.activation)})
        elif name == "MaxPooling2D":
            out.append({"type": "maxpool", "pool": tuple(layer.pool_size), "strides": tuple(layer.strides),
                        "padding": layer.padding})
        elif name == "Flatten":
            out.append({"type": "flatten"})
        elif name == "Reshape":
            out.append({"type": "reshape", "shape": tuple(layer.target_shape)})
        elif name in ("ReLU",) or (name == "Activation" and keras.activations.serialize(layer.activation) == "relu"):
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
        dtype="float32", classes=5, seed=0):
    """Conv - MaxPool - Conv - Flatten - Dense - Dense, for the reference grid."""
    kw = dict(dtype=dtype, use_bias=bias)
    model = keras.Sequential([
        keras.Input(input_shape, dtype=dtype),
        L.Conv2D(4, 3, strides=strides, padding=padding, dilation_rate=dilation, activation=act, **kw),
        L.MaxPooling2D(2, padding="same", dtype=dtype),
        L.Conv2D(5, 2, padding="valid", activation=act, **kw),
        L.Flatten(dtype=dtype),
        L.Dense(6, activation=act, **kw),
        L.Dense(classes, **kw),
    ])
    return randomize(model, seed)


def mlp(d_in=7, bias=True, act="relu", dtype="float32", classes=4, seed=0):
    """Dense - Dense - ReLU layer - Dense."""
    kw = dict(dtype=dtype, use_bias=bias)
    model = keras.Sequential([
        keras.Input((d_in,), dtype=dtype),
        L.Dense(6, activation=act, **kw),
        L.Dense(5, **kw),
        L.ReLU(dtype=dtype),
        L.Dense(classes, **kw),
    ])
    return randomize(model, seed)
