"""Servable explainers: a TensorFlow SavedModel that computes relevance without lrp_grad.

The exported graph holds the rewritten forward pass and its LRP backward pass as ordinary
TensorFlow ops (the custom gradients are traced away), plus the model's variables, so
``tf.saved_model.load`` runs it in any process with TensorFlow, and TensorFlow Serving can
serve it.
"""
from __future__ import annotations

import pathlib

import tensorflow as tf

__all__ = ["export"]


def export(explainer, path) -> pathlib.Path:
    """Write ``explainer`` as a SavedModel at ``path``.

    Signatures
    ----------
    ``explain(images, target) -> {relevance, logits}``
        ``target`` is an int32 class per image; ``-1`` (the only negative value allowed) explains
        the predicted class. A target outside ``-1 .. classes - 1``, or a target batch of another
        length than the images, fails the call with an ``InvalidArgumentError`` naming the range.
    ``serving_default(images) -> {relevance, logits, target}``
        The predicted class.

    The exported graph uses the signed-input form of the rules, which is exact for any input.
    """
    explainer.signature.require_classifier("export")
    path = pathlib.Path(path)
    fn, _ = explainer.passes.function(False, "logit", False)
    images = tf.TensorSpec((None,) + tuple(explainer.input_shape), explainer.dtype, name="images")
    targets = tf.TensorSpec((None,), tf.int32, name="target")

    module = tf.Module()
    module.model = explainer.model  # tracks the variables the graph reads

    n_classes = explainer.n_classes
    message = (f"target must be -1 (explain the predicted class) or a class index in 0..{n_classes - 1} "
               f"(the model has {n_classes} classes); other values are refused")

    @tf.function(input_signature=[images, targets], autograph=False)
    def explain(images, target):
        # Checked in the graph, so a server answers a bad target with this message (an
        # InvalidArgumentError) instead of an all-zero map (>= classes) or a silent "predicted".
        checks = [tf.debugging.assert_greater_equal(target, -1, message=message),
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
    tf.saved_model.save(module, str(path), signatures={"serving_default": serving_default, "explain": explain},
                        options=tf.saved_model.SaveOptions(experimental_custom_gradients=False))
    return path
