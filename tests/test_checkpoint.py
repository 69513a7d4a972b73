"""Model files and training-state files: round trip, refusal of foreign files, version messages, atomicity,
checksums, weights checked against the config before anything is built, a full disk."""
import errno
import io
import os
import pickle
import warnings

import pytest
import torch

from fae_fast import _atomic
from fae_fast import checkpoint as ckpt
from fae_fast._version import __version__
from fae_fast.config import FAEConfig
from fae_fast.models import build_model


def _state():
    """The state of the network _cfg() describes (a model file must hold exactly that)."""
    net = build_model(_cfg().model)
    with torch.no_grad():
        net.stem[0].norm.running_mean.uniform_()
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
    key = "stem.0.conv.weight"
    assert s["step"] == 3 and torch.equal(s["model"][key], torch.load(p)["model"][key])


def _rewrite(path, **changes):
    """Edit a file's fields, keeping its checksum valid (as a deliberate, not an accidental, change would)."""
    obj = torch.load(path, weights_only=True)
    obj.update(changes)
    obj.pop("checksum", None)
    torch.save(ckpt._with_checksum(obj), path)


def test_a_model_file_from_before_a_changed_default_keeps_the_setting_it_was_made_with(tmp_path):
    p = _save(tmp_path / "m.pt")
    cfg = torch.load(p, weights_only=True)["config"]
    assert ckpt.load_model_file(p).config.map.error == FAEConfig().map.error == "squared+gradient"
    del cfg["map"]["error"], cfg["map"]["normalize"]  # written before map.error and map.normalize existed
    del cfg["corruption"]["w_self"], cfg["corruption"]["grey_textures"]  # and before own-surface, grey textures
    _rewrite(p, config=cfg)
    mf = ckpt.load_model_file(p)
    assert (mf.config.map.error, mf.config.map.normalize) == ("squared", "none")
    assert (mf.config.corruption.w_self, mf.config.corruption.grey_textures) == (0.0, "off")


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


# ---- checksums (issue 11, item 3)

def _flip_inside_weights(path, nbytes=4096):
    """Invert ``nbytes`` in the middle of the largest tensor's data inside the zip (the zip CRC goes bad; torch
    does not check it)."""
    import zipfile

    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    # a stored (uncompressed) member: its data follows the local header (30 bytes + name + extra)
    name_len, extra_len = int.from_bytes(data[info.header_offset + 26:info.header_offset + 28], "little"), \
        int.from_bytes(data[info.header_offset + 28:info.header_offset + 30], "little")
    start = info.header_offset + 30 + name_len + extra_len + max(0, info.file_size - nbytes) // 2
    n = min(nbytes, info.file_size)
    data[start:start + n] = bytes(b ^ 0xFF for b in data[start:start + n])
    path.write_bytes(bytes(data))


def _big_cfg():
    cfg = _cfg()
    cfg.model.widths = (16, 32, 64)  # a largest tensor of 64*64*9*4 = 147 KB, room for 4 KiB in the middle
    return cfg


def test_damaged_weights_are_refused(tmp_path):
    p = _save(tmp_path / "m.pt", config=_big_cfg(), model_state=build_model(_big_cfg().model).state_dict())
    ckpt.load_model_file(p)  # intact: loads
    _flip_inside_weights(p)
    with pytest.raises(ValueError, match=r"m\.pt is damaged: its contents do not match the checksum") as info:
        ckpt.load_model_file(p)
    assert "\n" not in str(info.value)


def test_damaged_training_state_is_refused(tmp_path):
    state = {"model": build_model(_big_cfg().model).state_dict(), "step": 3}
    p = ckpt.save_train_state(tmp_path / "state.pt", state)
    assert ckpt.load_train_state(p)["step"] == 3
    _flip_inside_weights(p)
    with pytest.raises(ValueError, match=r"state\.pt is damaged"):
        ckpt.load_train_state(p)


def test_a_changed_threshold_is_refused(tmp_path):
    p = _save(tmp_path / "m.pt")
    obj = torch.load(p, weights_only=True)
    obj["thresholds"]["image"] = 1e9  # the checksum covers every field, not only the weights
    torch.save(obj, p)
    with pytest.raises(ValueError, match="damaged"):
        ckpt.load_model_file(p)


def test_file_without_checksum_loads_with_a_warning(tmp_path):
    for p, load in ((_save(tmp_path / "m.pt"), ckpt.load_model_file),
                    (ckpt.save_train_state(tmp_path / "s.pt", {"step": 1}), ckpt.load_train_state)):
        obj = torch.load(p, weights_only=True)
        del obj["checksum"]  # as written before checksums existed
        torch.save(obj, p)
        with pytest.warns(UserWarning, match=rf"{p.name} has no checksum"):
            load(p)


def test_checksum_ignores_device_and_memory_format():
    state = _state()
    cl = {k: (v.to(memory_format=torch.channels_last) if v.dim() == 4 else v) for k, v in state.items()}
    assert ckpt._digest(state) == ckpt._digest(cl)
    assert ckpt._digest({"a": (1, 2)}) != ckpt._digest({"a": [1, 2]})
    assert ckpt._digest({"a": torch.zeros(2)}) != ckpt._digest({"a": torch.zeros(2, 1)})


# ---- weights checked against the config before anything is built (item 4)

def test_config_claiming_a_huge_network_is_refused_without_allocating(tmp_path):
    p = _save(tmp_path / "m.pt")
    huge = _cfg()
    huge.model.widths = (8192, 16384, 32768, 65536)  # 262 G elements if it were built
    _rewrite(p, config=huge.to_dict())
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ValueError, match=r"m\.pt: its config \(widths \(8192, 16384, 32768, 65536\)\).*limit"):
        ckpt.load_model_file(p)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # KiB: nothing was allocated


def test_weights_that_do_not_fit_the_config_are_refused(tmp_path):
    p = _save(tmp_path / "m.pt")
    wider = _cfg()
    wider.model.widths = (8, 32)
    _rewrite(p, config=wider.to_dict())
    with pytest.raises(ValueError, match=r"m\.pt: weight '.*' is \(.*\), but its config \(widths \(8, 32\)\) needs"):
        ckpt.load_model_file(p)
    deeper = _cfg()
    deeper.model.widths = (8, 16) * 40
    _rewrite(p, config=deeper.to_dict())
    with pytest.raises(ValueError, match=r"describes 84 levels and dilations but the file stores only 66"):
        ckpt.load_model_file(p)
    state = _state()
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"do not fit.*unexpected \['extra.weight'\]"):
        _save(tmp_path / "n.pt", model_state=state)  # never written: its loader would refuse it
    assert not (tmp_path / "n.pt").exists()


def test_expanded_tensor_is_refused(tmp_path):
    p = _save(tmp_path / "m.pt")
    state = _state()
    key = "stem.0.conv.weight"
    state[key] = torch.zeros(1).expand(state[key].shape)  # a full-size shape over 4 bytes of data
    _rewrite(p, state=state)
    with pytest.raises(ValueError, match=rf"weight '{key}' of shape .* holds only 4 bytes"):
        ckpt.load_model_file(p)


def test_parameter_limit_is_configurable(tmp_path, monkeypatch):
    p = _save(tmp_path / "m.pt")
    n = sum(v.numel() for v in _state().values())
    with pytest.raises(ValueError, match=f"{n:,} elements, more than the limit {n - 1:,}"):
        ckpt.load_model_file(p, max_parameters=n - 1)
    monkeypatch.setenv("FAE_FAST_MAX_PARAMETERS", str(n - 1))
    with pytest.raises(ValueError, match="limit"):
        ckpt.load_model_file(p)
    ckpt.load_model_file(p, max_parameters=n)
    monkeypatch.setenv("FAE_FAST_MAX_PARAMETERS", "lots")
    with pytest.raises(ValueError, match="FAE_FAST_MAX_PARAMETERS must be an integer, got 'lots'"):
        ckpt.load_model_file(p)


# ---- a full disk (item 8)

class _FullAfter(io.RawIOBase):
    """A file that takes ``room`` bytes and then fails as a full disk does."""

    def __init__(self, f, room):
        self._f, self._room = f, room

    def writable(self):
        return True

    def write(self, data):
        if len(data) > self._room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._room -= len(data)
        return self._f.write(data)

    def close(self):
        self._f.close()
        super().close()


@pytest.mark.parametrize("room", [0, 1000], ids=["at-once", "inside-torch-save"])
def test_full_disk_is_one_line_and_keeps_the_old_file(tmp_path, monkeypatch, room):
    p = _save(tmp_path / "m.pt", thresholds={"image": 1.0, "pixel": 2.0})
    before = p.read_bytes()
    real_open = open
    monkeypatch.setattr(ckpt, "open", lambda *a, **k: _FullAfter(real_open(*a, **k), room), raising=False)
    with pytest.raises(_atomic.WriteError) as info:
        _save(p, thresholds={"image": 3.0, "pixel": 4.0})
    assert str(info.value) == f"no space left on device: {p}"
    assert isinstance(info.value, OSError) and info.value.errno == errno.ENOSPC
    with pytest.raises(_atomic.WriteError, match=r"no space left on device: .*state\.pt$"):
        ckpt.save_train_state(tmp_path / "state.pt", {"model": _state(), "step": 1})
    assert p.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["m.pt"]


def test_a_failure_that_is_not_a_write_error_stays_itself(tmp_path, monkeypatch):
    def broken(obj, f):
        raise RuntimeError("a bug in the serialiser")

    monkeypatch.setattr(ckpt, "_write", broken)
    with pytest.raises(RuntimeError, match="a bug in the serialiser"):
        ckpt.save_train_state(tmp_path / "state.pt", {"step": 1})
    assert os.listdir(tmp_path) == []


def test_written_files_get_the_umask_mode(tmp_path):
    old = os.umask(0o022)
    try:
        p = _save(tmp_path / "m.pt")
    finally:
        os.umask(old)
    assert oct(p.stat().st_mode & 0o777) == oct(0o644)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fresh file: no version or checksum warning
        ckpt.load_model_file(p)
