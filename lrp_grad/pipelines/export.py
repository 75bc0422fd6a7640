"""Servable explainers: a TensorFlow SavedModel that computes relevance without lrp_grad.

The exported graph holds the rewritten forward pass and its LRP backward pass as ordinary
TensorFlow ops (the custom gradients are traced away), plus the model's variables, so
``tf.saved_model.load`` runs it in any process with TensorFlow, and TensorFlow Serving can
serve it.
"""
from __future__ import annotations

import os
import pathlib
import shutil
import uuid

import tensorflow as tf

from ..errors import OutputPathError
from ..frontends import source_path

__all__ = ["export", "check_target"]


def _free_sibling(path: pathlib.Path, suffix: str) -> pathlib.Path:
    """A path next to ``path`` that does not exist yet: ``NAME_explainer``, ``NAME_explainer_2``, ...
    (for a TF Serving version folder ``3``, the next free version)."""
    if not path.name:  # '.', '/'
        path = path.resolve()
    if path.name.isdigit():
        n = int(path.name) + 1
        while path.with_name(str(n)).exists():
            n += 1
        return path.with_name(str(n))
    base = path.with_suffix("").name + suffix
    candidate, k = path.with_name(base), 2
    while candidate.exists():
        candidate, k = path.with_name(f"{base}_{k}"), k + 1
    return candidate


def check_target(path, source=None) -> pathlib.Path:
    """``path`` as the folder an export may write, else :class:`~lrp_grad.errors.OutputPathError`.

    Refused: the model's own file or folder ``source`` or a folder inside it (the export would
    destroy what it reads), an existing file, and a folder that is not empty (export never
    overwrites). A missing folder or an empty one is fine.
    """
    path = pathlib.Path(os.fspath(path))
    if source is not None:
        src, target = pathlib.Path(os.fspath(source)).resolve(), path.resolve()
        if target == src or src in target.parents:
            where = "is the model being exported" if target == src else "is inside the model being exported"
            raise OutputPathError(
                f"the output {os.fspath(path)} {where} ({os.fspath(source)}); writing there would destroy the "
                f"model. Give a new folder outside it, e.g. {os.fspath(_free_sibling(src, '_explainer'))}.")
    if path.exists() and not path.is_dir():
        raise OutputPathError(f"the output {os.fspath(path)} is a file; give a folder for the SavedModel (a new "
                              f"one, e.g. {os.fspath(_free_sibling(path, '_explainer'))}; it is created).")
    if path.is_dir():
        entries = sorted(p.name for p in path.iterdir())
        if entries:
            shown = ", ".join(repr(e) for e in entries[:3]) + (", ..." if len(entries) > 3 else "")
            raise OutputPathError(
                f"the output folder {os.fspath(path)} is not empty ({len(entries)} "
                f"{'entry' if len(entries) == 1 else 'entries'}: {shown}); export "
                f"never overwrites. Give a new folder, e.g. {os.fspath(_free_sibling(path, '_2'))}, or remove "
                "this one first.")
    return path


def _write_atomically(path: pathlib.Path, save) -> None:
    """``save(folder)`` into a new hidden folder next to ``path``, then rename it to ``path``: a
    failed or interrupted export leaves no half-written SavedModel (and no folders it created)."""
    parent = path.absolute().parent
    created = [d for d in (parent, *parent.parents) if not d.exists()]
    parent.mkdir(parents=True, exist_ok=True)
    partial = parent / f".{path.name}.partial-{uuid.uuid4().hex[:12]}"
    partial.mkdir()
    try:
        save(partial)
        if path.is_dir():
            path.rmdir()  # empty (checked before); a folder cannot be renamed over another everywhere
        os.rename(partial, path)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        for d in created:  # deepest first
            try:
                d.rmdir()
            except OSError:
                break
        raise


def export(explainer, path) -> pathlib.Path:
    """Write ``explainer`` as a SavedModel at ``path``.

    Signatures
    ----------
    ``explain(images, target) -> {relevance, logits}``
        ``target`` is an int32 class index per image, in ``0 .. classes - 1``, as for the Python
        API (which refuses negative targets too). A target outside that range (``-1`` included),
        or a target batch of another length than the images, fails the call with an
        ``InvalidArgumentError`` naming the range; for the predicted class call
        ``serving_default``.
    ``serving_default(images) -> {relevance, logits, target}``
        The predicted class.

    The exported graph uses the signed-input form of the rules, which is exact for any input.

    ``path`` must be a new or empty folder, outside the file or folder the model was loaded from
    (:func:`check_target`; :class:`~lrp_grad.errors.OutputPathError` otherwise). The SavedModel is
    written to a hidden folder next to it and renamed into place when complete.
    """
    explainer.signature.require_classifier("export")
    path = check_target(path, source_path(explainer.model))
    fn, _ = explainer.passes.function(False, "logit", False)
    images = tf.TensorSpec((None,) + tuple(explainer.input_shape), explainer.dtype, name="images")
    targets = tf.TensorSpec((None,), tf.int32, name="target")

    module = tf.Module()
    module.model = explainer.model  # tracks the variables the graph reads

    n_classes = explainer.n_classes
    message = (f"target must be a class index in 0..{n_classes - 1} (the model has {n_classes} classes), as for "
               "the Python API; negative values are refused: for the predicted class call the serving_default "
               "signature (images only)")

    @tf.function(input_signature=[images, targets], autograph=False)
    def explain(images, target):
        # Checked in the graph, so a server answers a bad target with this message (an
        # InvalidArgumentError) instead of an all-zero map (>= classes) or a silent "predicted" (-1,
        # which the compiled pass would read as the predicted class).
        checks = [tf.debugging.assert_greater_equal(target, 0, message=message),
                  tf.debugging.assert_less(target, n_classes, message=message),
                  tf.debugging.assert_equal(tf.shape(target)[0], tf.shape(images)[0],
                                            message="target must hold one class per image")]
        with tf.control_dependencies(checks):
            target = tf.identity(target)
        (relevance,), logits, _ = fn(images, target)
        return {"relevance": relevance, "logits": logits}

    @tf.function(input_signature=[images], autograph=False)
    def serving_default(images):
        (relevance,), logits, _ = fn(images, -tf.ones(tf.shape(images)[:1], tf.int32))
        return {"relevance": relevance, "logits": logits, "target": tf.argmax(logits, -1, output_type=tf.int32)}

    module.explain = explain
    module.serving_default = serving_default
    _write_atomically(path, lambda folder: tf.saved_model.save(
        module, str(folder), signatures={"serving_default": serving_default, "explain": explain},
        options=tf.saved_model.SaveOptions(experimental_custom_gradients=False)))
    return path
