"""The benchmark harness runs end to end on a tiny model. No speed assertions: a benchmark is
measured and read, not asserted on."""
import json

from lrp_grad import bench

SUMMARY_KEYS = {"model", "batch_size", "method", "xla", "repeats", "warmup", "median_ms", "min_ms", "images_per_s",
                "ratio_to_gradient", "spread", "peak_mb", "first_call_s", "loadavg_1min", "times_s"}


def test_quick_run_writes_json_and_markdown(tmp_path):
    assert bench.main(["--quick", "--out", str(tmp_path)]) == 0

    data = json.loads((tmp_path / "quick.json").read_text())
    assert set(data) == {"machine", "settings", "results"}
    assert {"cpu", "logical_cores", "usable_cores", "tensorflow", "tf_keras", "lrp_grad_source"} <= set(data["machine"])
    assert data["settings"]["xla"] == "off" and data["settings"]["repeats"] == 3
    rows = data["results"]
    assert [(r["method"], r["xla"]) for r in rows] == [(m, False) for m in bench.METHOD_NAMES]
    for r in rows:
        assert set(r) == SUMMARY_KEYS, r["method"]
        assert (r["model"], r["batch_size"]) == ("mnist_cnn", 4)
        assert len(r["times_s"]) == 3 and min(r["times_s"]) > 0
        assert r["peak_mb"] is None or r["peak_mb"] >= 0
    assert next(r for r in rows if r["method"] == "gradient")["ratio_to_gradient"] == 1.0

    md = (tmp_path / "quick.md").read_text()
    assert "| model | batch | XLA | gradient ms | gradient min ms | forward | epsilon | zplus | alpha_beta | epsilon_plus_flat |" in md
    assert "| model | batch | XLA | method | ms / batch | min ms | images / s | x gradient | spread | peak MB | first call s |" in md
    for method in bench.METHOD_NAMES:
        assert f"| mnist_cnn | 4 | off | {method} |" in md


def test_targets_script_runs(tmp_path):
    """benchmarks/targets.py (one call for all classes vs one call per class) on one image."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "targets.py"
    spec = importlib.util.spec_from_file_location("bench_targets", path)
    targets = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(targets)
    assert targets.main(["--images", "1", "--repeats", "1", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "targets.json").read_text())["results"]
    assert [(r["rule"], r["images"], r["classes"]) for r in rows] == [("alpha_beta", 1, 10), ("epsilon", 1, 10)]
    assert all(r["speedup"] > 0 for r in rows)
    assert "| alpha_beta | 1 |" in (tmp_path / "targets.md").read_text()
