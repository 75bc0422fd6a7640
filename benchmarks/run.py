"""Run the lrp_grad benchmark on this checkout: ``python benchmarks/run.py [options]`` (``--help``).

A thin wrapper around :func:`lrp_grad.bench.main` that benchmarks the ``lrp_grad`` next to this
folder (not another installed copy) and writes to ``benchmarks/results/`` unless ``--out`` is given.
"""
import os
import pathlib
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from lrp_grad import bench  # noqa: E402

if __name__ == "__main__":
    argv = sys.argv[1:]
    if not any(a == "--out" or a.startswith("--out=") for a in argv):
        argv += ["--out", str(HERE / "results")]
    sys.exit(bench.main(argv))
