"""The applications around the library: the ``lrp-grad`` command line, the demo on bundled real
data, the speed benchmark and the bundled datasets and trained models."""
