"""explain_dataset never mixes, loses or silently trusts output: resume checks (target, data,
files), disk space, one writer at a time, damaged manifests; and the smaller input cases."""
import errno
import json
import os
import pathlib

import numpy as np
import pytest

import kit
import lrp_grad
from lrp_grad.stream import OutputError


@pytest.fixture(scope="module")
def setup():
    K = kit.package("keras")
    model = kit.randomize(K.Sequential([K.Input((6, 6, 1)), K.layers.Conv2D(3, 3, activation="relu"),
                                        K.layers.Flatten(), K.layers.Dense(4)]))
    ex = lrp_grad.Explainer(model, rule=lrp_grad.Epsilon(1e-6))
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (20, 6, 6, 1)).astype("float32")
    y = rng.integers(0, 4, 20)
    return ex, x, y


def _partial(ex, x, y, out, stop_after=2, **kw):
    """Write the first ``stop_after`` batches of 4 (as a run that was killed)."""
    ex.explain_dataset(zip(x[:4 * stop_after], y[:4 * stop_after]), batch_size=4, out=out, length=len(x),
                       progress=False, **kw)


def test_resume_with_another_target_choice_is_refused(setup, tmp_path):
    ex, x, y = setup
    _partial(ex, x, y, tmp_path / "r.npy", target="label")
    with pytest.raises(lrp_grad.InvalidInputError, match=r"different model, rule, target choice.*\['target'\]"):
        ex.explain_dataset(zip(x, y), target="predicted", batch_size=4, out=tmp_path / "r.npy", length=20,
                           resume=True, progress=False)


@pytest.mark.parametrize("out", ["r.npy", "shards"])
def test_resume_with_other_data_or_order_is_refused(setup, tmp_path, out):
    ex, x, y = setup
    _partial(ex, x, y, tmp_path / out)
    order = np.random.default_rng(1).permutation(20)
    with pytest.raises(lrp_grad.InvalidInputError, match=r"images 0\.\.3 differ from the ones explained before"):
        ex.explain_dataset(zip(x[order], y[order]), batch_size=4, out=tmp_path / out, length=20, resume=True,
                           progress=False)
    done = ex.explain_dataset(zip(x, y), batch_size=4, out=tmp_path / out, length=20, resume=True, progress=False)
    direct = ex(x, target=y)
    if out.endswith(".npy"):
        np.testing.assert_allclose(done.relevance, direct, rtol=1e-5, atol=1e-7)
    else:
        np.testing.assert_allclose(lrp_grad.stream.load_shards(tmp_path / out), direct, rtol=1e-5, atol=1e-7)


def test_deleted_or_truncated_npy_is_detected_at_resume(setup, tmp_path):
    ex, x, y = setup
    out = tmp_path / "r.npy"
    _partial(ex, x, y, out)
    size = out.stat().st_size
    with open(out, "r+b") as f:
        f.truncate(size // 3)
    with pytest.raises(OutputError, match=r"cannot resume .*r.npy.*not trustworthy.*resume=False"):
        ex.explain_dataset(zip(x, y), batch_size=4, out=out, length=20, resume=True, progress=False)
    out.unlink()
    with pytest.raises(OutputError, match=r"r.npy is missing although the manifest records 8 images"):
        ex.explain_dataset(zip(x, y), batch_size=4, out=out, length=20, resume=True, progress=False)


def test_changed_npy_rows_are_detected(setup, tmp_path):
    ex, x, y = setup
    out = tmp_path / "r.npy"
    _partial(ex, x, y, out)
    m = np.load(out, mmap_mode="r+")
    m[5] = 0
    m.flush()
    del m
    with pytest.raises(OutputError, match=r"images 4\.\.7 .* differs from what was written"):
        ex.explain_dataset(zip(x, y), batch_size=4, out=out, length=20, resume=True, progress=False)


def test_missing_or_truncated_shard_is_detected_at_resume_and_load(setup, tmp_path):
    ex, x, y = setup
    out = tmp_path / "shards"
    _partial(ex, x, y, out)
    shard = out / "shard_000000004.npy"
    shard.write_bytes(shard.read_bytes()[:50])
    with pytest.raises(OutputError, match=r"shard_000000004.npy cannot be read|shard_000000004.npy differs"):
        ex.explain_dataset(zip(x, y), batch_size=4, out=out, length=20, resume=True, progress=False)
    with pytest.raises(OutputError, match=r"cannot load .*shard_000000004.npy"):
        lrp_grad.stream.load(out)
    shard.unlink()
    with pytest.raises(OutputError, match=r"shard_000000004.npy is missing"):
        ex.explain_dataset(zip(x, y), batch_size=4, out=out, length=20, resume=True, progress=False)


def test_damaged_manifest_gives_one_clear_error(setup, tmp_path):
    ex, x, y = setup
    out = tmp_path / "shards"
    _partial(ex, x, y, out)
    for text in ("{not json", json.dumps({"batches": [[0, 4]]}), json.dumps([1, 2])):
        (out / "manifest.json").write_text(text)
        with pytest.raises(OutputError, match=r"manifest .* is damaged .*not trustworthy. Start over with resume=False"):
            ex.explain_dataset(zip(x, y), batch_size=4, out=out, length=20, resume=True, progress=False)


def test_not_enough_disk_space_is_refused_before_writing(setup, tmp_path, monkeypatch):
    ex, x, y = setup
    import shutil

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=1000))
    with pytest.raises(OutputError, match=r"not enough disk space for .*r.npy: it needs [\d,]+ bytes, 1,000 are free"):
        ex.explain_dataset(x, out=tmp_path / "r.npy", progress=False)


def test_full_disk_while_writing_is_an_error_naming_the_path(setup, tmp_path, monkeypatch):
    ex, x, y = setup

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(OutputError, match=r"cannot write .*r.npy: OSError: .*No space left on device"):
        ex.explain_dataset(x, out=tmp_path / "r.npy", progress=False)
    monkeypatch.setattr(np, "save", full)
    with pytest.raises(OutputError, match=r"cannot write .*shard_000000000.npy: OSError"):
        ex.explain_dataset(x, out=tmp_path / "shards", progress=False)


def test_a_second_writer_is_refused_and_a_stale_lock_taken_over(setup, tmp_path):
    import socket

    ex, x, y = setup
    out = tmp_path / "shards"
    out.mkdir()
    lock = out / "lock"
    lock.write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname(), "since": "earlier"}))
    with pytest.raises(OutputError, match=rf"being written by another process \(pid {os.getppid()} on host"):
        ex.explain_dataset(x, out=out, progress=False)
    lock.write_text(json.dumps({"pid": 2 ** 22 + 12345, "host": socket.gethostname(), "since": "earlier"}))
    res = ex.explain_dataset(x, out=out, progress=False)  # its owner is gone: taken over
    assert len(res) == 20 and not lock.exists()


def test_element_problems_name_the_dataset_index_and_labels_are_normalised(setup, tmp_path):
    ex, x, y = setup
    bad = x.copy()
    bad[13, 2, 3, 0] = np.nan
    with pytest.raises(lrp_grad.InvalidInputError, match=r"dataset element 13 contains NaN or Inf \(first at \(2, 3, 0\)\)"):
        ex.explain_dataset(bad, batch_size=4, progress=False)
    ref = ex(x, target=y)
    onehot = np.eye(4, dtype="float32")[y]
    for labels in (y.astype("uint8"), onehot, y.astype("float64")):
        res = ex.explain_dataset(zip(x, labels), batch_size=4, progress=False)
        np.testing.assert_allclose(res.relevance, ref, rtol=1e-5, atol=1e-7)
        assert res.summaries["target"].dtype.kind == "i"
    dicts = [{"image": a, "label": b} for a, b in zip(x, y)]
    np.testing.assert_allclose(ex.explain_dataset(dicts, batch_size=4, progress=False).relevance, ref, rtol=1e-5,
                               atol=1e-7)
    with pytest.raises(lrp_grad.InvalidInputError, match=r"dict with keys \['img', 'lbl'\].*one of \['image'"):
        ex.explain_dataset([{"img": x[0], "lbl": 1}], progress=False)
    with pytest.raises(lrp_grad.InvalidInputError, match=r"label of shape \(4,\) is neither class indices nor one-hot"):
        ex.explain_dataset([(x[0], np.array([0.2, 0.8, 0, 0]))], progress=False)
    with pytest.raises(lrp_grad.InvalidInputError, match=r"more than length=8 images"):
        ex.explain_dataset(iter(x), target=1, batch_size=4, out=tmp_path / "r.npy", length=8, progress=False)


def test_default_target_is_the_label_if_any_else_the_prediction(setup):
    ex, x, y = setup
    np.testing.assert_allclose(ex.explain_dataset(x, progress=False).relevance, ex(x), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(ex.explain_dataset(zip(x, y), progress=False).relevance, ex(x, target=y), rtol=1e-5,
                               atol=1e-7)
    with pytest.raises(lrp_grad.InvalidInputError, match=r"target='label' needs \(image, label\) elements"):
        ex.explain_dataset(x, target="label", progress=False)
