"""explain_dataset: streaming, order, summaries, on-disk output, resume after a kill, bad elements."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

import lrp_grad
from lrp_grad.stream import load, load_shards
from lrp_grad.frontends import package_of
from kit import PACKAGES, cnn, package


@pytest.fixture(scope="module", params=PACKAGES, ids={"keras": "keras3", "tf_keras": "tf_keras"}.get)
def setup(request):
    """An Explainer of a small CNN of each Keras package (Keras 3 and tf-keras) and 23 labelled images."""
    model = cnn((8, 8, 1), "same", K=package(request.param))
    assert package_of(model) == request.param
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (23, 8, 8, 1)).astype(np.float32)
    y = rng.integers(0, 5, 23)
    return lrp_grad.Explainer(model, rule=lrp_grad.AlphaBeta(2, 1)), x, y


def test_matches_per_batch_explain_for_every_input_kind(setup):
    ex, x, y = setup
    expected = ex(x, target=y, batch_size=5)  # the same batches: bit-identical (float32 kernels vary with batch size)
    sources = {
        "array+labels": tf.data.Dataset.from_tensor_slices((x, y)),
        "batched dataset": tf.data.Dataset.from_tensor_slices((x, y)).batch(4),
        "iterator": iter(list(zip(x, y))),
    }
    for name, data in sources.items():
        res = ex.explain_dataset(data, batch_size=5, progress=False)
        np.testing.assert_array_equal(res.relevance, expected, err_msg=name)
        np.testing.assert_array_equal(res.summaries["target"], y)
    plain = ex.explain_dataset(x, target="predicted", batch_size=8, progress=False)
    np.testing.assert_array_equal(plain.relevance, ex(x, batch_size=8))
    logits = ex.forward(x)
    np.testing.assert_array_equal(plain.summaries["predicted"], logits.argmax(1))
    np.testing.assert_allclose(plain.summaries["target_logit"], logits.max(1), rtol=1e-6)
    np.testing.assert_allclose(plain.summaries["relevance_sum"], ex(x).reshape(23, -1).sum(1), rtol=1e-4)
    assert len(plain) == 23 and ex.trace_count <= 2  # signed/non-negative plans at most; no retrace per batch


def test_npy_and_shard_output(setup, tmp_path):
    ex, x, y = setup
    expected = ex(x, target=y, batch_size=6)
    res = ex.explain_dataset(tf.data.Dataset.from_tensor_slices((x, y)), batch_size=6, out=tmp_path / "r.npy",
                             progress=False)
    np.testing.assert_array_equal(np.load(tmp_path / "r.npy"), expected)
    np.testing.assert_array_equal(res.relevance, expected)
    res = ex.explain_dataset(zip(x, y), batch_size=6, out=tmp_path / "shards", progress=False)
    assert res.relevance is None and len(res) == 23
    np.testing.assert_array_equal(load_shards(tmp_path / "shards"), expected)
    assert sorted(p.name for p in (tmp_path / "shards").glob("shard_*.npy"))[0] == "shard_000000000.npy"


def test_resume_after_kill(setup, tmp_path):
    """A run killed mid-way (os._exit after 2 batches) resumes and ends identical to one run.

    The model is saved and reloaded in the killed process (lrp_grad.load_model), so the resume also
    checks that a reloaded model of either package matches the manifest. The single-.npy output is
    package-neutral and costs a second process: tf-keras only."""
    ex, x, y = setup
    outs = ("out", "out.npy") if package_of(ex.model) == "tf_keras" else ("out",)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    ex.model.save(tmp_path / "m.keras")
    script = textwrap.dedent(f"""
        import os, sys, numpy as np, lrp_grad
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        x, y = np.load({str(tmp_path / 'x.npy')!r}), np.load({str(tmp_path / 'y.npy')!r})
        model = lrp_grad.load_model({str(tmp_path / 'm.keras')!r})
        assert lrp_grad.frontends.package_of(model) == {package_of(ex.model)!r}, model
        ex = lrp_grad.Explainer(model, rule=lrp_grad.AlphaBeta(2, 1))
        def dying():
            for i, item in enumerate(zip(x, y)):
                if i == 12:
                    os._exit(3)  # killed: no cleanup, no final manifest
                yield item
        ex.explain_dataset(dying(), batch_size=5, out={str(tmp_path / 'out')!r}, progress=False, length=23)
    """)
    for out in outs:
        code = script.replace(str(tmp_path / "out") + "'", str(tmp_path / out) + "'")
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 3, proc.stderr[-2000:]
        # batches are written in a background thread: the kill may catch the second one unwritten
        # (then it is not in the manifest and is explained again), never half-recorded
        if out == "out":
            assert json.loads((tmp_path / out / "manifest.json").read_text())["done"] in (5, 10)
        else:  # an interrupted .npy run keeps its working folder: append-only manifest, header + one line a batch
            lines = (tmp_path / "out.npy.parts" / "manifest.jsonl").read_text().splitlines()
            assert sum(json.loads(line)[1] for line in lines[1:]) in (5, 10)
            assert not (tmp_path / "out.npy.json").exists()
        res = ex.explain_dataset(zip(x, y), batch_size=5, out=tmp_path / out, resume=True, progress=False, length=23)
        relevance = load_shards(tmp_path / out) if out == "out" else np.load(tmp_path / out)
        if out != "out":  # finished: the .npy and its sidecar, no working folder
            assert sorted(p.name for p in tmp_path.glob("out.npy*")) == ["out.npy", "out.npy.json"]
        np.testing.assert_array_equal(relevance, ex(x, target=y, batch_size=5))
        np.testing.assert_array_equal(res.summaries["target"], y)


def test_resume_refuses_another_model_or_rule(setup, tmp_path):
    ex, x, y = setup
    ex.explain_dataset(zip(x, y), batch_size=5, out=tmp_path / "o", progress=False)
    other = lrp_grad.Explainer(ex.model, rule=lrp_grad.Epsilon())
    with pytest.raises(lrp_grad.InvalidInputError, match=r"cannot resume .*written with other settings \(differs in \['rule'\]: rule was "
                       r"Composite 'AlphaBeta\(alpha=2.0, beta=1.0, bias=True\)', now Composite 'Epsilon"):
        other.explain_dataset(zip(x, y), batch_size=5, out=tmp_path / "o", resume=True, progress=False)
    with pytest.raises(lrp_grad.InvalidInputError, match=r"differs in \['batch_size'\]: batch_size was 5, now 6"):
        ex.explain_dataset(zip(x, y), batch_size=6, out=tmp_path / "o", resume=True, progress=False)


def test_bad_elements_name_their_index(setup):
    ex, x, y = setup
    bad = list(x[:5]) + [np.zeros((8, 9, 1), np.float32)]
    with pytest.raises(lrp_grad.InvalidInputError, match=r"dataset element 5 has shape \(8, 9, 1\); the model takes \(8, 8, 1\)"):
        ex.explain_dataset(bad, target="predicted", progress=False)
    with pytest.raises(lrp_grad.InvalidInputError, match="dataset element 0 has dtype bool"):
        ex.explain_dataset([np.zeros((8, 8, 1), bool)], target="predicted", progress=False)
    with pytest.raises(lrp_grad.InvalidInputError, match="target='label' needs \\(image, label\\) elements"):
        ex.explain_dataset(x, target="label", progress=False)
    with pytest.raises(lrp_grad.InvalidInputError, match="needs the dataset length"):
        ex.explain_dataset(iter(x), target=1, out="r.npy", progress=False)


def test_two_workers_share_the_work(setup, tmp_path):
    ex, x, y = setup
    for index in (1, 0):
        part = ex.explain_dataset(zip(x, y), batch_size=4, out=tmp_path / "w", worker=(index, 2), progress=False)
        assert len(part) == (11 if index else 12)  # batches 1, 3, 5 (4+4+3 images) and 0, 2, 4
        if index == 1:
            with pytest.raises(lrp_grad.InvalidInputError, match=r"images 0..3 are missing \(a worker has not finished"):
                load(tmp_path / "w")
    merged = load(tmp_path / "w")
    np.testing.assert_array_equal(merged.relevance, ex(x, target=y, batch_size=4))
    np.testing.assert_array_equal(merged.summaries["target"], y)
    with pytest.raises(lrp_grad.InvalidInputError, match="with several workers, out= must be a folder"):
        ex.explain_dataset(zip(x, y), worker=(0, 2), progress=False)
    with pytest.raises(lrp_grad.InvalidInputError, match=r"worker must be 'auto', None or \(index, count\)"):
        ex.explain_dataset(zip(x, y), worker=(2, 2), out=tmp_path / "z", progress=False)


def test_a_pair_of_arrays_is_images_and_labels(tmp_path):
    """explain_dataset((x, y)) streams x with y as the labels (not two elements), with its length
    known for a .npy output; the same in reference_samples."""
    from lrp_grad.bench import mnist_cnn
    from lrp_grad.datasets import mnist_digits

    (x, y), _ = mnist_digits(n_train=40)
    x, y = x[:40], y[:40]
    ex = lrp_grad.Explainer(mnist_cnn(), rule=lrp_grad.Epsilon(1e-6))
    res = ex.explain_dataset((x, y), batch_size=16, out=tmp_path / "r.npy", progress=False)
    R = ex(x, target=y.astype(int), batch_size=16)  # the same batches (max-pooling near-ties, README)
    np.testing.assert_allclose(res.relevance, R, rtol=0, atol=1e-6 * np.abs(R).max())
    assert list(res.summaries["target"]) == list(y.astype(int))
    refs = lrp_grad.concepts.reference_samples(ex, (x, y), ex.model.layers[0].name, channels=[0], top=3)
    assert refs.indices.shape == (1, 3) and refs.indices.max() < 40
