"""Explanations at scale and in other systems: datasets streamed to disk with safe resume,
SavedModel export, Apache Beam, and the Keras training callback."""
