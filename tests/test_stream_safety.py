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
    with pytest.raises(lrp_grad.InvalidInputError, match=r"other settings \(differs in \['target'\]: target was 'label', "
                                                      r"now 'predicted'\)"):
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


def _overwrite_row(path, row, value):
    """Change one row of a written .npy behind lrp_grad's back."""
    m = np.load(path, mmap_mode="r+")
    m[row] = value
    m.flush()
    del m


def test_changed_npy_rows_are_detected(setup, tmp_path):
    ex, x, y = setup
    out = tmp_path / "r.npy"
    _partial(ex, x, y, out)
    _overwrite_row(out, 5, 0)
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


def test_finished_npy_leaves_the_file_and_one_sidecar(setup, tmp_path):
    """No ``.parts`` folder after success: ``r.npy`` and ``r.npy.json`` (manifest + summaries), which
    ``stream.load`` reads back, checked against the file."""
    ex, x, y = setup
    out = tmp_path / "r.npy"
    res = ex.explain_dataset(zip(x, y), batch_size=6, out=out, length=20, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.npy", "r.npy.json"]
    side = json.loads((tmp_path / "r.npy.json").read_text())
    assert side["done"] == 20 and side["length"] == 20 and side["batch_size"] == 6 and side["relevance"] == "r.npy"
    assert [b[:2] for b in side["batches"]] == [[0, 6], [6, 6], [12, 6], [18, 2]]
    assert side["fingerprint"] == {**lrp_grad.stream.fingerprint(ex), "target": "'auto'"}
    for k, v in res.summaries.items():
        np.testing.assert_array_equal(side["summaries"][k], v)  # exact: JSON floats round-trip
    np.testing.assert_array_equal(side["summaries"]["target"], y)
    for path in (out, tmp_path / "r.npy.json"):
        loaded = lrp_grad.stream.load(path)
        np.testing.assert_array_equal(loaded.relevance, res.relevance)
        for k in res.summaries:
            np.testing.assert_array_equal(loaded.summaries[k], res.summaries[k])


def test_resume_of_a_finished_run_explains_nothing_and_checks_the_file(setup, tmp_path, monkeypatch):
    ex, x, y = setup
    out = tmp_path / "r.npy"
    first = ex.explain_dataset(zip(x, y), batch_size=4, out=out, length=20, progress=False)
    expected = np.array(first.relevance)
    with monkeypatch.context() as m:
        m.setattr(type(ex), "_explain_with_logits", lambda *a: pytest.fail("a finished batch was explained again"))
        again = ex.explain_dataset(zip(x, y), batch_size=4, out=out, length=20, resume=True, progress=False)
    np.testing.assert_array_equal(again.relevance, expected)
    np.testing.assert_array_equal(again.summaries["relevance_sum"], first.summaries["relevance_sum"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.npy", "r.npy.json"]
    _overwrite_row(out, 9, 1)
    with pytest.raises(OutputError, match=r"cannot resume .*images 8\.\.11 .* differs from what was written"):
        ex.explain_dataset(zip(x, y), batch_size=4, out=out, length=20, resume=True, progress=False)
    with pytest.raises(OutputError, match=r"cannot load .*images 8\.\.11 .* differs from what was written"):
        lrp_grad.stream.load(out)
    with open(out, "r+b") as f:
        f.truncate(out.stat().st_size // 2)
    with pytest.raises(OutputError, match=r"cannot load .*r.npy.*not trustworthy"):
        lrp_grad.stream.load(out)
    side = tmp_path / "r.npy.json"
    side.write_text(side.read_text()[:100])
    with pytest.raises(OutputError, match=r"manifest .*r.npy.json is damaged .*not trustworthy"):
        ex.explain_dataset(zip(x, y), batch_size=4, out=out, length=20, resume=True, progress=False)
    done = ex.explain_dataset(zip(x, y), batch_size=4, out=out, length=20, progress=False)  # resume=False: over
    np.testing.assert_array_equal(done.relevance, expected)


def test_interrupted_npy_keeps_its_working_folder_and_a_torn_manifest_line_is_not_trusted(setup, tmp_path):
    ex, x, y = setup
    out = tmp_path / "r.npy"

    def dying():
        for i, item in enumerate(zip(x, y)):
            if i == 10:
                raise KeyboardInterrupt
            yield item

    with pytest.raises(KeyboardInterrupt):
        ex.explain_dataset(dying(), batch_size=4, out=out, length=20, progress=False)
    parts = tmp_path / "r.npy.parts"
    assert sorted(p.name for p in parts.iterdir()) == ["manifest.jsonl", "summaries.bin"]  # lock released
    assert not (tmp_path / "r.npy.json").exists()
    with pytest.raises(lrp_grad.InvalidInputError, match=r"not finished .*resume the run with resume=True"):
        lrp_grad.stream.load(out)
    journal = parts / "manifest.jsonl"
    journal.write_text(journal.read_text()[:-7])  # the last record cut mid-write by a kill: not recorded
    done = ex.explain_dataset(zip(x, y), batch_size=4, out=out, length=20, resume=True, progress=False)
    np.testing.assert_allclose(done.relevance, ex(x, target=y), rtol=1e-5, atol=1e-7)
    assert not parts.exists()
    _partial(ex, x, y, out)
    with pytest.raises(KeyboardInterrupt):
        ex.explain_dataset(dying(), batch_size=4, out=out, length=20, progress=False)
    journal.write_text(journal.read_text().replace("]\n", "\n", 1 + journal.read_text().count("]\n") // 2))
    with pytest.raises(OutputError, match=r"manifest .*manifest.jsonl is damaged"):
        ex.explain_dataset(zip(x, y), batch_size=4, out=out, length=20, resume=True, progress=False)


def test_outputs_of_earlier_versions_are_still_read(setup, tmp_path):
    """An earlier version's ``.npy.parts`` folder (manifest.json, SHA-256 digests, summary_*.npz) resumes; shard folders
    with .npz summaries load."""
    import hashlib

    ex, x, y = setup
    sha = lambda a: hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()[:32]  # noqa: E731
    direct = ex(x, target=y)
    for kind in ("npy", "shards"):
        out = tmp_path / ("r.npy" if kind == "npy" else "shards")
        ex.explain_dataset(zip(x[:8], y[:8]), batch_size=4, out=out, length=20, progress=False)
        folder = tmp_path / "r.npy.parts" if kind == "npy" else out
        folder.mkdir(exist_ok=True)
        if kind == "npy":
            summaries = json.loads((tmp_path / "r.npy.json").read_text())["summaries"]
            (tmp_path / "r.npy.json").unlink()
            relevance = np.load(out)
        else:
            loaded = lrp_grad.stream.load(out)
            summaries, relevance = loaded.summaries, loaded.relevance
            for f in folder.glob("summary_*.npy"):
                f.unlink()
        batches = []
        for s in (0, 4):
            np.savez(folder / f"summary_{s:09d}.npz", **{k: np.asarray(v)[s:s + 4] for k, v in summaries.items()})
            batches.append([s, 4, sha(x[s:s + 4]), sha(relevance[s:s + 4])])
        (folder / "manifest.json").write_text(json.dumps({"fingerprint": {**lrp_grad.stream.fingerprint(ex),
                                                                          "target": "'auto'"},
                                                         "batch_size": 4, "worker": None, "done": 8,
                                                         "batches": batches}))
        if kind == "shards":
            old = lrp_grad.stream.load(out)
            np.testing.assert_allclose(old.relevance, direct[:8], rtol=1e-5, atol=1e-7)
            np.testing.assert_array_equal(old.summaries["target"], y[:8])
        done = ex.explain_dataset(zip(x, y), batch_size=4, out=out, length=20, resume=True, progress=False)
        np.testing.assert_array_equal(done.summaries["target"], y)
        got = done.relevance if kind == "npy" else lrp_grad.stream.load_shards(out)
        np.testing.assert_allclose(got, direct, rtol=1e-5, atol=1e-7)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.npy", "r.npy.json", "shards"]


def test_single_images_and_batches_mixed_keep_their_order(setup):
    ex, x, y = setup
    mixed = [(x[0], y[0]), (x[1:4], y[1:4]), (x[4], y[4]), (x[5], y[5]), (x[6:13], y[6:13])]
    mixed += list(zip(x[13:], y[13:]))
    res = ex.explain_dataset(iter(mixed), batch_size=3, progress=False)
    np.testing.assert_allclose(res.relevance, ex(x, target=y), rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(res.summaries["target"], y)
    images = [x[i] for i in range(7)] + [x[7].astype("float64")] + list(x[8:])  # one image of another dtype
    np.testing.assert_allclose(ex.explain_dataset(images, target="predicted", batch_size=8, progress=False).relevance,
                               ex(x), rtol=1e-5, atol=1e-7)
    bad = list(zip(x, y))
    bad[9] = (x[9], -1.5)
    with pytest.raises(lrp_grad.InvalidInputError, match=r"dataset element 9: labels must be integer class indices"):
        ex.explain_dataset(bad, batch_size=8, progress=False)


@pytest.mark.parametrize("finished", [False, True], ids=["interrupted", "finished"])
def test_resume_after_the_image_list_changed_names_the_lengths(setup, tmp_path, finished):
    """Issue 21: a resume after removing (e.g. a corrupt) image blamed the output's trustworthiness
    (its shape); it must say the image list changed, with both lengths."""
    ex, x, y = setup
    out = tmp_path / "r.npy"

    def dying():
        for i, item in enumerate(zip(x, y)):
            if i == 10 and not finished:
                raise KeyboardInterrupt
            yield item

    try:
        ex.explain_dataset(dying(), batch_size=4, out=out, length=20, progress=False)
    except KeyboardInterrupt:
        pass
    with pytest.raises(lrp_grad.InvalidInputError, match=r"cannot resume .*r\.npy: it was written for a dataset of 20 "
                                                         r"images, this one has 19: the image list changed since the "
                                                         r"run started \(an image removed or added\)"):
        ex.explain_dataset(zip(x[1:], y[1:]), batch_size=4, out=out, length=19, resume=True, progress=False)
