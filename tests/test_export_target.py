"""Export never overwrites: not the source model, not a non-empty folder, and a failed export leaves
nothing half-written (the command line and ``Explainer.export`` / ``lrp_grad.export.export``)."""
import os
import pathlib

import numpy as np
import pytest

import lrp_grad
from lrp_grad import cli
from lrp_grad.errors import OutputPathError
from kit import cnn


def _tiny(K):
    return cnn((6, 6, 2), classes=3, K=K)


def _save_source(K, root: pathlib.Path) -> pathlib.Path:
    """The model saved as a .keras file (Keras 3) or a SavedModel folder (tf-keras)."""
    path = root / ("m.keras" if K.__name__ == "keras" else "m_savedmodel")
    _tiny(K).save(path)
    return path


def _tree(path: pathlib.Path) -> dict:
    """Every file under ``path`` (or ``path`` itself) with its bytes."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p): p.read_bytes() for p in files}


def _cli(argv, capsys):
    code = cli.main([str(a) for a in argv])
    return code, capsys.readouterr().err


def test_cli_refuses_to_export_onto_or_into_the_source_model(K, tmp_path, capsys):
    src = _save_source(K, tmp_path)
    before = _tree(src)
    suggestion = str(tmp_path / "m_explainer") if K.__name__ == "keras" else str(tmp_path / "m_savedmodel_explainer")
    for target, where in ((src, "is the model being exported"), (src / "explainer", "is inside the model being exported")):
        code, err = _cli(["export", src, target], capsys)
        assert code == 2 and "Traceback" not in err, err
        assert f"lrp-grad export: the output {target} {where} ({src}); writing there would destroy " \
               f"the model. Give a new folder outside it, e.g. {suggestion}." in err, err
    assert _tree(src) == before and not (src / "explainer").exists()
    lrp_grad.load_model(src)  # still loadable


def test_export_refuses_a_non_empty_folder_and_the_loaded_models_own_path(K, tmp_path, capsys):
    src = _save_source(K, tmp_path)
    full = tmp_path / "serving" / "1"
    full.mkdir(parents=True)
    (full / "saved_model.pb").write_bytes(b"keep me")
    code, err = _cli(["export", src, full], capsys)
    assert code == 2 and "Traceback" not in err, err
    assert f"the output folder {full} is not empty (1 entry: 'saved_model.pb'); export never overwrites. " \
           f"Give a new folder, e.g. {tmp_path / 'serving' / '2'}, or remove this one first." in err, err

    ex = lrp_grad.Explainer(lrp_grad.load_model(src))
    with pytest.raises(OutputPathError, match=r"the output folder .*serving/1 is not empty"):
        ex.export(full)
    with pytest.raises(OutputPathError, match=r"is not empty"):
        lrp_grad.export.export(ex, full)
    assert (full / "saved_model.pb").read_bytes() == b"keep me"
    inside = src if K.__name__ == "tf_keras" else src / "x"
    with pytest.raises(OutputPathError, match=r"(is|is inside) the model being exported"):
        ex.export(inside)  # the Explainer knows where lrp_grad.load_model read the model
    file = tmp_path / "notes.txt"
    file.write_text("x")
    with pytest.raises(OutputPathError, match=r"the output .*notes.txt is a file; give a folder for the SavedModel"):
        ex.export(file)


def test_a_failed_export_leaves_nothing_half_written(K, tmp_path, monkeypatch):
    import tensorflow as tf

    from lrp_grad.pipelines import export as export_module

    ex = lrp_grad.Explainer(_tiny(K))

    def broken_save(module, folder, **kw):
        (pathlib.Path(folder) / "saved_model.pb").write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export_module.tf.saved_model, "save", broken_save)
    target = tmp_path / "new" / "deeper" / "sm"
    with pytest.raises(OSError, match="No space left"):
        ex.export(target)
    assert os.listdir(tmp_path) == [], os.listdir(tmp_path)  # no partial folder, no parents it created
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(OSError, match="No space left"):
        ex.export(empty)
    assert os.listdir(tmp_path) == ["empty"] and os.listdir(empty) == []

    monkeypatch.undo()
    assert tf.saved_model.save is not broken_save
    path = ex.export(empty)  # an empty folder is a fine target
    assert path == empty and (empty / "saved_model.pb").exists()
    assert sorted(os.listdir(tmp_path)) == ["empty"]  # the partial folder was renamed into place
    x = np.random.default_rng(0).uniform(-1, 1, (2, 6, 6, 2)).astype(np.float32)
    out = tf.saved_model.load(str(empty)).signatures["serving_default"](images=tf.constant(x))
    np.testing.assert_allclose(out["relevance"].numpy(), ex(x), rtol=1e-5, atol=1e-7)
