"""Model files and training-state files: round trip, refusal of foreign files, version messages, atomicity."""
import os
import pickle

import pytest
import torch

from fae_fast import checkpoint as ckpt
from fae_fast._version import __version__
from fae_fast.config import FAEConfig


def _state():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    with torch.no_grad():
        net[1].running_mean.uniform_()
    return net.state_dict()


def _cfg():
    cfg = FAEConfig()
    cfg.model.widths = (8, 16)
    cfg.train.image_size = (32, 48)
    return cfg


def _save(path, **kw):
    args = dict(model_state=_state(), config=_cfg(), image_size=(32, 48), thresholds={"image": 0.5, "pixel": 0.25},
                meta={"note": "x", "history_tail": [{"step": 1, "loss": 0.1}]})
    args.update(kw)
    return ckpt.save_model_file(path, **args)


def test_round_trip(tmp_path):
    state = _state()
    p = _save(tmp_path / "m.pt", model_state=state)
    mf = ckpt.load_model_file(p)
    assert set(mf.state) == set(state)
    for k in state:
        assert torch.equal(mf.state[k], state[k]), k
    assert mf.config == _cfg()
    assert mf.config.model.widths == (8, 16)  # tuples survive (lists would break equality)
    assert mf.image_size == (32, 48)
    assert mf.thresholds == {"image": 0.5, "pixel": 0.25}
    assert mf.version == __version__ and mf.format_version == ckpt.FORMAT_VERSION
    assert mf.meta["history_tail"][0]["loss"] == 0.1
    assert [f for f in os.listdir(tmp_path)] == ["m.pt"]  # no temp file left behind


def test_unset_thresholds_are_kept(tmp_path):
    mf = ckpt.load_model_file(_save(tmp_path / "m.pt", thresholds={"image": None, "pixel": 0.1}))
    assert mf.thresholds == {"image": None, "pixel": 0.1}


def test_bad_arguments(tmp_path):
    with pytest.raises(TypeError, match="config"):
        _save(tmp_path / "m.pt", config="nope")
    with pytest.raises(ValueError, match="image_size"):
        _save(tmp_path / "m.pt", image_size=(0, 4))
    with pytest.raises(TypeError, match="model_state"):
        _save(tmp_path / "m.pt", model_state=[1, 2])
    with pytest.raises(ValueError, match="directory"):
        _save(tmp_path)


def test_missing_and_directory(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        ckpt.load_model_file(tmp_path / "nope.pt")
    with pytest.raises(ValueError, match="not a file"):
        ckpt.load_model_file(tmp_path)


@pytest.mark.parametrize("content", [b"", b"hello, this is not a torch file" * 10, bytes(range(256)) * 4],
                         ids=["empty", "text", "bytes"])
def test_garbage_is_refused(tmp_path, content):
    p = tmp_path / "junk.pt"
    p.write_bytes(content)
    with pytest.raises(ValueError, match="junk.pt"):
        ckpt.load_model_file(p)


class _Evil:
    def __reduce__(self):  # would run code on a plain pickle.load: weights_only must refuse it
        return (os.system, ("echo pwned",))


def test_arbitrary_pickle_is_refused(tmp_path):
    p = tmp_path / "evil.pt"
    torch.save({"format": ckpt.FORMAT_MARKER, "x": _Evil()}, p)
    with pytest.raises(ValueError, match="evil.pt"):
        ckpt.load_model_file(p)
    q = tmp_path / "plain.pkl"
    q.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(ValueError, match="plain.pkl"):
        ckpt.load_model_file(q)


def test_torch_file_without_marker(tmp_path):
    p = tmp_path / "weights.pt"
    torch.save(_state(), p)
    with pytest.raises(ValueError, match="weights.pt.*format marker"):
        ckpt.load_model_file(p)
    torch.save([1, 2, 3], p)
    with pytest.raises(ValueError, match="list"):
        ckpt.load_model_file(p)


def test_training_state_is_not_a_model_file(tmp_path):
    p = ckpt.save_train_state(tmp_path / "state.pt", {"model": _state(), "step": 3})
    with pytest.raises(ValueError, match="state.pt.*training-state"):
        ckpt.load_model_file(p)
    m = _save(tmp_path / "m.pt")
    with pytest.raises(ValueError, match="m.pt.*model file"):
        ckpt.load_train_state(m)
    s = ckpt.load_train_state(p)
    assert s["step"] == 3 and torch.equal(s["model"]["0.weight"], torch.load(p)["model"]["0.weight"])


def _rewrite(path, **changes):
    obj = torch.load(path, weights_only=True)
    obj.update(changes)
    torch.save(obj, path)


def test_other_format_version_names_both(tmp_path):
    p = _save(tmp_path / "m.pt")
    _rewrite(p, format_version=99)
    with pytest.raises(ValueError, match=rf"format_version 99.*format_version {ckpt.FORMAT_VERSION}"):
        ckpt.load_model_file(p)


def test_other_package_version_warns_with_both(tmp_path):
    p = _save(tmp_path / "m.pt")
    _rewrite(p, fae_fast_version="0.0.1")
    with pytest.warns(UserWarning, match=rf"fae_fast 0\.0\.1, this is fae_fast {__version__}"):
        mf = ckpt.load_model_file(p)
    assert mf.version == "0.0.1"


def test_damaged_config_is_refused(tmp_path):
    p = _save(tmp_path / "m.pt")
    _rewrite(p, config={"train": {"no_such_key": 1}})
    with pytest.raises(ValueError, match="invalid config.*no_such_key"):
        ckpt.load_model_file(p)


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    p = _save(tmp_path / "m.pt", thresholds={"image": 1.0, "pixel": 2.0})
    before = p.read_bytes()

    def broken(obj, f):
        f.write(b"PK\x03\x04 half a file")  # some bytes reach the temp file, then the writer dies
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "_write", broken)
    with pytest.raises(OSError, match="disk full"):
        _save(p, thresholds={"image": 3.0, "pixel": 4.0})
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_train_state(tmp_path / "state.pt", {"step": 1})
    assert p.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["m.pt"]  # neither a temp file nor a half-written state
    monkeypatch.undo()
    assert ckpt.load_model_file(p).thresholds == {"image": 1.0, "pixel": 2.0}


def test_meta_that_the_loader_would_refuse_is_refused_before_writing(tmp_path):
    import numpy as np

    p = tmp_path / "m.pt"
    with pytest.raises(ValueError, match=r"meta\['auroc'\]"):
        _save(p, meta={"auroc": np.float64(0.9)})
    assert not p.exists()
