"""lrp_grad inside other systems, built on the Explainer: Apache Beam's RunInference and a Keras
training callback that writes heatmaps to TensorBoard."""
