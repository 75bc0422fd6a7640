"""Package-neutral questions about Keras classes and functions, answered for both front ends:
which package an object belongs to, what a layer class is called in either package, and the
canonical name of an activation function."""
from __future__ import annotations

from . import keras3, tf_keras

__all__ = ["FRONTENDS", "package_of", "activation_name", "layer_classes", "is_layer", "is_instance", "is_model",
           "is_layer_class"]

#: The available front ends, Keras 3 first.
FRONTENDS = tuple(f for f in (keras3, tf_keras) if getattr(f, "available", True))


def package_of(obj) -> str | None:
    """``'keras'`` (Keras 3), ``'tf_keras'`` or ``None`` for a model, layer or class."""
    for frontend in FRONTENDS:
        if frontend.owns(obj):
            return frontend.PACKAGE
    return None


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
