"""lrp_grad.beam.LRPModelHandler: RunInference on Beam's DirectRunner (two worker processes) against
Explainer on the same real MNIST digits; keyed and (image, label) inputs; errors naming the element
or the argument; one load and one trace per worker; the ImportError without Apache Beam."""
import hashlib
import os
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import lrp_grad

beam = pytest.importorskip("apache_beam", reason='Apache Beam is not installed: pip install "lrp-grad[beam]"')
from apache_beam.ml.inference.base import KeyedModelHandler, PredictionResult, RunInference  # noqa: E402
from apache_beam.options.pipeline_options import PipelineOptions  # noqa: E402

from lrp_grad.beam import METRICS_NAMESPACE, LRPModelHandler  # noqa: E402

RULE = "epsilon_plus_flat"
#: The rule of the pipelines compared with Explainer on other batches. Not epsilon_plus_flat: with the
#: flat rule on the first layer the relevance of a few digits (e.g. 1 in 1000) depends on the batch it
#: is explained in, up to ~1e-3 of max |R| with plain Explainer calls too (reported; Beam's adaptive
#: batches differ from run to run), while epsilon_plus is batch-invariant to float32 rounding.
PIPELINE_RULE = "epsilon_plus"
MULTI_PROCESS = ["--direct_running_mode=multi_processing", "--direct_num_workers=2"]


@pytest.fixture(autouse=True)
def _beam_temp_files_in_tmp_path(tmp_path, monkeypatch):
    """Beam's job server makes a beam-temp* folder in the system temp dir per pipeline: keep them in
    the test's own folder (pytest removes old ones) instead of leaving one in /tmp per run."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setenv("TMPDIR", str(tmp_path))


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """A small CNN (Keras 3) trained on 4000 real MNIST digits, saved as .keras; the 1000 test digits."""
    import keras

    (x_train, y_train), (x, y) = lrp_grad.datasets.mnist_digits()
    keras.utils.set_random_seed(0)
    L = keras.layers
    model = keras.Sequential([
        keras.Input((28, 28, 1)),
        L.Conv2D(8, 3, activation="relu"), L.MaxPooling2D(2),
        L.Conv2D(16, 3, activation="relu"), L.MaxPooling2D(2),
        L.Flatten(), L.Dense(10),
    ], name="digits_cnn")
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    model.fit(x_train, y_train, epochs=2, batch_size=64, verbose=0)
    accuracy = model.evaluate(x, y, verbose=0)[1]
    assert accuracy > 0.8, f"the test CNN did not learn (accuracy {accuracy:.3f})"
    path = tmp_path_factory.mktemp("beam_model") / "digits.keras"
    model.save(path)
    return str(path), x, y


def _sha(image) -> bytes:
    return hashlib.sha1(np.ascontiguousarray(image).tobytes()).digest()


def _record_fn(with_key: bool):
    """PredictionResult -> a record of arrays (a nested function, so that Beam pickles it by value for
    the worker processes, which cannot import this test module)."""
    def to_record(result):
        import hashlib
        import os

        import numpy as np

        key, result = result if with_key else (-1, result)
        image = result.example[0] if isinstance(result.example, tuple) else result.example
        sha = np.frombuffer(hashlib.sha1(np.ascontiguousarray(image).tobytes()).digest(), np.uint8)
        meta = np.array([key, os.getpid(), result.inference["target"]], np.int64)
        return sha, meta, result.inference["logits"], result.inference["relevance"]
    return to_record


def _write_npy(folder):
    return lrp_grad.beam.WriteNpyShards(folder)


def _read_npy(folder):
    """The records written by :func:`_write_npy` into ``folder``, as dicts."""
    return [{"sha": sha.tobytes(), "key": int(meta[0]), "pid": int(meta[1]), "target": int(meta[2]),
             "logits": logits, "relevance": relevance}
            for sha, meta, logits, relevance in lrp_grad.beam.read_npy_shards(folder, 4)]


def _metrics(result):
    """``{(step, name): committed value}`` of the handler's namespace."""
    found = {}
    for kind in result.metrics().query().values():
        for m in kind:
            if m.key.metric.namespace == METRICS_NAMESPACE:
                found[(m.key.step, m.key.metric.name)] = m.committed
    return found


def _by_step(metrics, name):
    return {step: v for (step, n), v in metrics.items() if n == name}


def _assert_matches(records, x, rows, expected_targets, ex, what):
    """Every record against Explainer on the same digit: target, logits and relevance (float32)."""
    assert sorted(rows) == list(range(len(x))), f"{what}: every digit exactly once"
    got_targets = np.array([r["target"] for r in records])
    logits = np.stack([r["logits"] for r in records])
    # The explained class is the one asked for, or the pipeline's own argmax ...
    np.testing.assert_array_equal(got_targets, logits.argmax(1) if expected_targets is None else expected_targets,
                                  err_msg=what)
    ref_logits = ex.forward(x[rows])
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-5 * np.abs(ref_logits).max(), err_msg=what)
    if expected_targets is None:  # ... which is the reference's predicted class unless two logits nearly tie
        top2 = np.sort(ref_logits, 1)[:, -2:]
        clear = top2[:, 1] - top2[:, 0] > 1e-3
        np.testing.assert_array_equal(got_targets[clear], ref_logits.argmax(1)[clear], err_msg=what)
    relevance = np.stack([r["relevance"] for r in records])
    assert relevance.shape == x[rows].shape and relevance.dtype == np.float32
    reference = ex(x[rows], target=got_targets.astype(np.int32))
    for i in range(len(rows)):  # element by element, tolerance relative to each map's max |R|
        np.testing.assert_allclose(relevance[i], reference[i], rtol=1e-5, atol=1e-6 * np.abs(reference[i]).max(),
                                   err_msg=f"{what}: digit {rows[i]}")


def test_multiprocess_pipeline_matches_explainer_on_1000_digits(digits, tmp_path):
    """Two worker processes, 1000 real digits, two RunInference steps in one pipeline: plain images
    (predicted class, Beam's adaptive batching) and keyed (image, label) pairs through Beam's
    KeyedModelHandler (target='label', batches of exactly 50); the arrays written as .npy shards by a
    Beam file sink, compared element by element with Explainer in this process."""
    path, x, y = digits
    mtime = os.stat(path).st_mtime_ns
    with open(path, "rb") as f:
        model_bytes = f.read()
    folder = {name: str(tmp_path / name) for name in ("plain", "keyed")}
    p = beam.Pipeline(options=PipelineOptions(MULTI_PROCESS))
    (p | "plain images" >> beam.Create(list(x))
       | "explain plain" >> RunInference(LRPModelHandler(path, rule=PIPELINE_RULE))
       | "plain records" >> beam.Map(_record_fn(False))
       | "write plain" >> _write_npy(folder["plain"]))
    (p | "keyed pairs" >> beam.Create([(i, (img, label)) for i, (img, label) in enumerate(zip(x, y))])
       | "explain keyed" >> RunInference(KeyedModelHandler(
           LRPModelHandler(path, rule=PIPELINE_RULE, target="label", min_batch_size=50, max_batch_size=50)))
       | "keyed records" >> beam.Map(_record_fn(True))
       | "write keyed" >> _write_npy(folder["keyed"]))
    result = p.run()
    result.wait_until_finish()

    ex = lrp_grad.Explainer(lrp_grad.load_model(path), rule=PIPELINE_RULE)
    index = {_sha(img): i for i, img in enumerate(x)}
    assert len(index) == len(x) == 1000
    records = {name: _read_npy(folder[name]) for name in folder}
    _assert_matches(records["plain"], x, [index[r["sha"]] for r in records["plain"]], None, ex, "plain")
    keyed = records["keyed"]
    assert all(index[r["sha"]] == r["key"] for r in keyed), "keys travel with their digits"
    rows = [r["key"] for r in keyed]
    _assert_matches(keyed, x, rows, y[rows], ex, "keyed (image, label)")

    # Two worker processes did the work; each loaded the model once per step and traced the pass once.
    metrics = _metrics(result)
    explainers, traces = _by_step(metrics, "lrp_explainers"), _by_step(metrics, "lrp_traces")
    loads = {s: v.count for s, v in _by_step(metrics, "load_model_latency_milli_secs").items()}
    assert sorted(_by_step(metrics, "num_inferences").values()) == [1000] * 2
    for name, recs in records.items():
        pids = {r["pid"] for r in recs}
        assert len(pids) == 2 and os.getpid() not in pids, (name, pids)
        step = next(s for s in explainers if f"explain {name}" in s)
        assert explainers[step] == len(pids), (name, explainers)  # one Explainer per worker process
        assert traces[step] == len(pids), (name, traces)  # no retrace over all batches (non-negative digits)
        assert loads[step] == len(pids), (name, loads)  # one load_model per worker process
    keyed_sizes = next(v for s, v in _by_step(metrics, "inference_request_batch_size").items() if "explain keyed" in s)
    assert keyed_sizes.min == keyed_sizes.max == 50 and keyed_sizes.count == 20, keyed_sizes
    with open(path, "rb") as f:  # the model file is only read
        assert f.read() == model_bytes and os.stat(path).st_mtime_ns == mtime


def _run_in_memory(elements, handler):
    """Run a small pipeline on the in-process DirectRunner (it fails with the first bad batch)."""
    with beam.Pipeline() as p:
        _ = p | beam.Create(elements) | RunInference(handler)


def test_bad_element_fails_the_pipeline_naming_it(digits):
    path, x, _ = digits
    good = [x[0], x[1], x[2][..., 0], x[3]]  # one digit without its channel axis
    with pytest.raises(lrp_grad.InvalidInputError) as info:  # re-raised by the in-process runner
        _run_in_memory(good, LRPModelHandler(path, rule=PIPELINE_RULE, min_batch_size=4, max_batch_size=4))
    message = str(info.value)
    assert "element 2 of a batch of 4" in message and "has shape (28, 28)" in message, message
    assert "takes images of shape (28, 28, 1)" in message and "image[..., None]" in message, message

    keyed = [("digit-0", x[0]), ("digit-1", x[1][None]), ("digit-2", x[2])]  # a batch axis too many
    with pytest.raises(lrp_grad.InvalidInputError) as info:  # re-raised by the in-process runner
        _run_in_memory(keyed, KeyedModelHandler(LRPModelHandler(path, rule=PIPELINE_RULE, min_batch_size=3)))
    message = str(info.value)
    assert "element with key 'digit-1' has shape (1, 28, 28, 1)" in message, message
    assert "drop it, image[0]" in message, message


def test_element_errors_name_the_element_and_the_fix(digits):
    path, x, y = digits
    plain, labelled = LRPModelHandler(path), LRPModelHandler(path, target="label")
    ex = plain.load_model()
    nan = x[1].copy()
    nan[3, 4, 0] = np.nan
    cases = [
        (plain, [x[0], nan], "element 1 of a batch of 2 (wrap the handler in KeyedModelHandler to have errors name "
                             "your keys) contains NaN or Inf (first at (3, 4, 0)"),
        (plain, [x[0], (x[1], 3)], "element 1 of a batch of 2 (wrap the handler in KeyedModelHandler to have errors "
                                   "name your keys) is a tuple of 2 items, but with target=None every element must "
                                   "be one image. For (image, label) pairs pass target='label'"),
        (plain, [x[0].astype(str)], "has dtype <U"),
        (plain, [{"image": x[0]}], "is a dict with keys ['image']"),
        (labelled, [(x[0], 3), x[1]], "element 1 of a batch of 2"),
        (labelled, [(x[0], 12)], "has label 12, out of range for model 'digits_cnn' with 10 classes (valid: 0..9)"),
        (labelled, [(x[0], 2.5)], "has label 2.5"),
        (labelled, [(x[0], float("inf"))], "has label inf"),
        (labelled, [(x[0], np.array([0, 1, 1, 0, 0, 0, 0, 0, 0, 0]))], "must be a one-hot row (exactly one 1)"),
        (plain, [np.zeros((28, 28, 1)), np.zeros((28, 28, 3))], "has shape (28, 28, 3)"),
    ]
    for handler, batch, expected in cases:
        with pytest.raises(lrp_grad.InvalidInputError) as info:
            handler.run_inference(batch, ex)
        assert expected in str(info.value), (expected, str(info.value))
    # Labels as numpy ints, integral floats and one-hot rows; keys named through KeyedModelHandler.
    onehot = np.eye(10, dtype=np.float32)[int(y[2])]
    out = labelled.run_inference([(x[0], np.int64(y[0])), (x[1], float(y[1])), (x[2], onehot)], ex)
    assert [r.inference["target"] for r in out] == [int(v) for v in y[:3]]
    keyed = KeyedModelHandler(plain)
    with pytest.raises(lrp_grad.InvalidInputError, match=r"element with key \('img', 7\) contains NaN"):
        list(keyed.run_inference([(("img", 6), x[0]), (("img", 7), nan)], ex))
    with pytest.raises(ValueError, match="takes no inference_args"):
        plain.run_inference([x[0]], ex, {"target": 3})


@pytest.mark.parametrize("kwargs, error, expected", [
    ({"rule": "epsilon_plus_flatt"}, lrp_grad.InvalidRuleError,
     "LRPModelHandler(rule='epsilon_plus_flatt'): unknown rule or preset name 'epsilon_plus_flatt'; valid names:"),
    ({"rule": 3}, lrp_grad.InvalidRuleError, "LRPModelHandler(rule=3): rule must be an lrp_grad rule"),
    ({"target": "labels"}, lrp_grad.InvalidTargetError,
     "LRPModelHandler(target='labels'): target must be None or 'predicted' (the predicted class), 'label'"),
    ({"target": -1}, lrp_grad.InvalidTargetError, "LRPModelHandler(target=-1): a class index must be >= 0."),
    ({"target": True}, lrp_grad.InvalidTargetError, "LRPModelHandler(target=True): target must be"),
    ({"target": 2.0}, lrp_grad.InvalidTargetError, "LRPModelHandler(target=2.0): target must be"),
    ({"min_batch_size": 0}, ValueError, "LRPModelHandler(min_batch_size=0): min_batch_size must be a positive int"),
    ({"max_batch_size": "64"}, ValueError, "LRPModelHandler(max_batch_size='64'): max_batch_size must be"),
    ({"min_batch_size": 65, "max_batch_size": 64}, ValueError,
     "LRPModelHandler(min_batch_size=65, max_batch_size=64): min_batch_size must not exceed max_batch_size."),
    ({"jit_compile": "yes"}, ValueError, "LRPModelHandler(jit_compile='yes'): jit_compile must be True, False or None."),
    ({"env_vars": {"A": 1}}, ValueError, "LRPModelHandler(env_vars={'A': 1}): env_vars must be a dict of str to str."),
])
def test_bad_arguments_are_refused_at_construction(digits, kwargs, error, expected):
    with pytest.raises(error) as info:
        LRPModelHandler(digits[0], **kwargs)
    assert expected in str(info.value), str(info.value)


def test_bad_model_uri_and_target_out_of_range(digits, tmp_path):
    with pytest.raises(lrp_grad.ModelFileError, match=r"LRPModelHandler\(model_uri='/nonexistent/m.keras'\): no such "
                                                      r"file or folder"):
        LRPModelHandler("/nonexistent/m.keras")
    (tmp_path / "m.txt").write_text("x")
    with pytest.raises(lrp_grad.ModelFileError, match=r"unknown model file type '.txt'"):
        LRPModelHandler(str(tmp_path / "m.txt"))
    with pytest.raises(lrp_grad.ModelFileError, match=r"model_uri=3\): model_uri must be the path or URI"):
        LRPModelHandler(3)
    with pytest.raises(lrp_grad.ModelFileError, match=r"a remote model must be one .keras or .h5 file"):
        LRPModelHandler("gs://bucket/saved_model")
    LRPModelHandler("gs://bucket/model.keras")  # not checked before a worker reads it
    with pytest.raises(lrp_grad.InvalidTargetError, match=r"LRPModelHandler\(target=10\): model 'digits_cnn' from "
                                                         r".* has 10 classes \(valid: 0..9\)"):
        LRPModelHandler(digits[0], target=10).load_model()


def test_one_trace_for_repeated_batch_sizes_and_no_model_change(digits):
    path, x, _ = digits
    handler = LRPModelHandler(path, rule=RULE, target=None)
    ex = handler.load_model()
    weights = [w.numpy().copy() for w in ex.model.weights]
    assert ex.trace_count == 0
    first = handler.run_inference(list(x[:7]), ex)
    assert ex.trace_count == 1
    for start in (7, 14, 21):  # the same batch size again: no retrace
        handler.run_inference(list(x[start:start + 7]), ex)
    assert ex.trace_count == 1
    handler.run_inference(list(x[:13]), ex)  # another size neither (free batch axis; CPU without XLA)
    assert ex.trace_count == 1
    assert all(np.array_equal(w.numpy(), v) for w, v in zip(ex.model.weights, weights))
    assert isinstance(first[0], PredictionResult) and first[0].model_id == path
    assert set(first[0].inference) == {"relevance", "logits", "target"}
    ref = lrp_grad.Explainer(lrp_grad.load_model(path), rule=RULE)
    R = np.stack([r.inference["relevance"] for r in first])
    np.testing.assert_allclose(R, ref(x[:7]), rtol=1e-5, atol=1e-6 * np.abs(R).max())
    assert [r.inference["target"] for r in first] == list(ref.forward(x[:7]).argmax(1))
    assert first[3].example is x[3] or np.array_equal(first[3].example, x[3])


def test_batching_namespace_num_bytes_and_pickling(digits):
    path, x, y = digits
    handler = LRPModelHandler(path, rule=lrp_grad.Epsilon(1e-6), target="label", min_batch_size=8, max_batch_size=32)
    assert handler.batch_elements_kwargs() == {"min_batch_size": 8, "max_batch_size": 32}
    assert LRPModelHandler(path).batch_elements_kwargs() == {}
    assert handler.get_metrics_namespace() == METRICS_NAMESPACE == KeyedModelHandler(handler).get_metrics_namespace()
    assert handler.get_num_bytes([(x[0], 1), (x[1], np.int64(2))]) == 2 * (x[0].nbytes + 8)
    assert not handler.share_model_across_processes()
    clone = pickle.loads(pickle.dumps(handler))  # Beam pickles the handler to the workers
    assert repr(clone) == repr(handler) and "target='label'" in repr(clone)


def test_tf_keras_h5_model_and_a_copied_uri(tmp_path, monkeypatch):
    """A tf-keras model in an .h5 file; a remote URI is copied to the worker through Beam's FileSystems
    (simulated on a local path, which FileSystems also reads)."""
    import kit

    model = kit.cnn((10, 10, 3), classes=5)
    path = str(tmp_path / "small.h5")
    model.save(path)
    x = np.random.default_rng(1).uniform(-1, 1, (6, 10, 10, 3)).astype(np.float32)  # signed inputs too
    monkeypatch.setattr(lrp_grad.beam, "_is_uri", lambda uri: True)
    handler = LRPModelHandler(path, rule=lrp_grad.ZPlus(), target=4)
    assert handler._local_model_path() != path
    ex = handler.load_model()
    out = handler.run_inference(list(x), ex)
    ref = lrp_grad.Explainer(model, rule=lrp_grad.ZPlus())(x, target=4)
    np.testing.assert_allclose(np.stack([r.inference["relevance"] for r in out]), ref, rtol=1e-5,
                               atol=1e-6 * np.abs(ref).max())
    assert [r.inference["target"] for r in out] == [4] * 6


def test_import_error_without_apache_beam(monkeypatch):
    monkeypatch.setitem(sys.modules, "apache_beam", None)  # what a missing install looks like to import
    monkeypatch.delitem(sys.modules, "lrp_grad.beam", raising=False)  # the old path is an alias of the new one
    monkeypatch.delitem(sys.modules, "lrp_grad.integrations.beam")
    with pytest.raises(ImportError, match=r'lrp_grad.beam needs Apache Beam, which is an optional dependency: '
                                          r'pip install "lrp-grad\[beam\]"'):
        import lrp_grad.beam  # noqa: F401


def test_lrp_grad_imports_without_apache_beam():
    """In a fresh interpreter where apache_beam cannot be imported: lrp_grad and its lazy modules load,
    lrp_grad.beam names the install command."""
    code = textwrap.dedent("""
        import sys
        sys.modules["apache_beam"] = None
        import lrp_grad
        import lrp_grad.stream
        assert "beam" in dir(lrp_grad)
        try:
            lrp_grad.beam
        except ImportError as e:
            print(e)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert 'pip install "lrp-grad[beam]"' in out.stdout, out.stdout


def test_npy_shards_round_trip_and_truncation(tmp_path):
    import apache_beam as beam

    records = [(np.array(i), np.full((2, 3), i, np.float32)) for i in range(7)]
    with beam.Pipeline() as p:
        _ = p | beam.Create(records) | lrp_grad.beam.WriteNpyShards(tmp_path / "out")
    back = sorted(lrp_grad.beam.read_npy_shards(tmp_path / "out", 2), key=lambda r: int(r[0]))
    assert [int(i) for i, _ in back] == list(range(7))
    assert all(np.array_equal(a, np.full((2, 3), int(i), np.float32)) for i, a in back)
    shard = sorted((tmp_path / "out").glob("relevance*.npys"))[0]
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(lrp_grad.LRPError, match=r"shard .* is damaged or truncated"):
        lrp_grad.beam.read_npy_shards(tmp_path / "out", 2)
    with pytest.raises(lrp_grad.LRPError, match=r"no relevance\*.npys shards in"):
        lrp_grad.beam.read_npy_shards(tmp_path / "empty", 2)
