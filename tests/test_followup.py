"""Issue 11 leftovers: empty image inputs, FIFOs handed to the model loaders, the checked reader for texture
folders, the decode cache written through fae_fast._atomic."""
from __future__ import annotations

import errno
import os
import pathlib
import threading

import cv2
import numpy as np
import pytest
import torch

from fae_fast import Detector, _atomic
from fae_fast.api import to_uint8_batch
from fae_fast.checkpoint import load_model_file, load_train_state
from fae_fast.config import preset
from fae_fast.corruption import load_texture_dir
from fae_fast.data import datasets, load_images

needs_fifo = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs os.mkfifo")


def _one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text, text
    return text


def _png(path: pathlib.Path, h: int = 20, w: int = 30, value: int = 100) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), np.full((h, w, 3), value, np.uint8))
    return path


def _in_thread(fn, fifo: pathlib.Path, seconds: float = 10.0):
    """Run ``fn()`` in a thread; if it is still blocked on ``fifo`` after ``seconds``, release it (open the write
    end and close it, so the reader sees end-of-file) and fail: the call waited on a FIFO."""
    box: dict = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            box["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass
        t.join(5)
        pytest.fail(f"blocked for {seconds:.0f} s on the FIFO {fifo}")
    return box


# ----------------------------------------------------------------------------------------------------------------
# empty image inputs (issue 11 item 10)


@pytest.mark.parametrize("images, shape", [
    (np.zeros((0, 8, 8, 3), np.uint8), "(0, 8, 8, 3)"),
    (np.zeros((2, 0, 8, 3), np.uint8), "(2, 0, 8, 3)"),
    (np.zeros((8, 0, 3), np.uint8), "(8, 0, 3)"),
    (np.zeros((0, 8), np.float32), "(0, 8)"),
    ([np.zeros((8, 8, 3), np.uint8), np.zeros((0, 8, 3), np.uint8)], "(0, 8, 3)"),
    (torch.zeros(0, 3, 8, 8, dtype=torch.uint8), "(0, 3, 8, 8)"),
    (torch.zeros(3, 0, 8), "(3, 0, 8)"),
    ([], "empty list"),
    ((), "empty tuple"),
])
def test_empty_image_inputs_are_one_line_value_errors_naming_the_shape(images, shape):
    with pytest.raises(ValueError) as exc:
        to_uint8_batch(images, (16, 16))
    assert shape in _one_line(exc)


def test_the_second_image_of_a_list_is_named_by_its_index():
    with pytest.raises(ValueError, match=r"image 1: empty image of shape \(0, 8, 3\)"):
        to_uint8_batch([np.zeros((8, 8, 3), np.uint8), np.zeros((0, 8, 3), np.uint8)], (16, 16))


@pytest.mark.parametrize("data", [np.zeros((0, 32, 32, 3), np.uint8), torch.zeros(0, 3, 32, 32), []])
def test_fit_on_zero_images_with_an_explicit_size_says_so(data):
    det = Detector(preset("tiny"), device="cpu")
    with pytest.raises(ValueError, match=r"fit: no training images \(got an empty") as exc:
        det.fit(data, steps=2, image_size=(32, 32), progress=False)
    _one_line(exc)
    assert det.model is None


# ----------------------------------------------------------------------------------------------------------------
# model files and training states: never wait on a FIFO (issue 11 item 9)


@needs_fifo
@pytest.mark.parametrize("load", [load_model_file, load_train_state])
def test_model_loaders_refuse_a_fifo_as_not_a_regular_file(tmp_path, load):
    fifo = tmp_path / "model.fae"
    os.mkfifo(fifo)
    box = _in_thread(lambda: load(fifo), fifo)
    assert isinstance(box.get("error"), ValueError), box
    text = str(box["error"])
    assert "not a regular file" in text and str(fifo) in text and "\n" not in text


@needs_fifo
@pytest.mark.parametrize("load", [load_model_file, load_train_state])
def test_model_loaders_check_the_opened_file_not_only_the_name(tmp_path, monkeypatch, load):
    # a path checked as a regular file that is a FIFO by the time it is read (the check-then-open race,
    # simulated by a name check that says "regular file"): the loader must check what it opened
    fifo = tmp_path / "model.fae"
    os.mkfifo(fifo)
    monkeypatch.setattr(pathlib.Path, "is_file", lambda self: True)
    monkeypatch.setattr(pathlib.Path, "exists", lambda self, **kw: True)
    box = _in_thread(lambda: load(fifo), fifo)
    assert isinstance(box.get("error"), ValueError) and "not a regular file" in str(box["error"]), box


def test_model_loaders_name_a_folder(tmp_path):
    with pytest.raises(ValueError, match=f"model file {tmp_path} is not a file but a folder"):
        load_model_file(tmp_path)


# ----------------------------------------------------------------------------------------------------------------
# texture folders go through the checked reader


@needs_fifo
def test_texture_dir_refuses_a_fifo_named_like_an_image(tmp_path):
    _png(tmp_path / "a.png")
    fifo = tmp_path / "b.png"
    os.mkfifo(fifo)
    box = _in_thread(lambda: load_texture_dir(str(tmp_path), (16, 16)), fifo)
    assert isinstance(box.get("error"), ValueError), box
    assert "not a regular file" in str(box["error"]) and "b.png" in str(box["error"])


def test_texture_dir_bounds_decoded_pixels_before_decoding(tmp_path, monkeypatch):
    _png(tmp_path / "a.png", 20, 30)
    _png(tmp_path / "big.png", 40, 50)
    monkeypatch.setenv("FAE_FAST_MAX_IMAGE_PIXELS", "1000")  # a.png has 600, big.png 2000
    with pytest.raises(ValueError, match=r"texture_dir: image too large: .*big\.png is 50x40") as exc:
        load_texture_dir(str(tmp_path), (16, 16))
    _one_line(exc)


def test_texture_dir_names_a_corrupt_file_and_keeps_its_pixels(tmp_path):
    _png(tmp_path / "a.png", 20, 30, value=100)
    t = load_texture_dir(str(tmp_path), (16, 16))
    assert t.shape == (1, 3, 16, 16) and t.dtype == torch.uint8 and bool((t == 100).all())
    grey = load_texture_dir(str(tmp_path), (8, 8), channels=1)
    assert grey.shape == (1, 1, 8, 8) and bool((grey == 100).all())
    (tmp_path / "z.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(ValueError, match=r"texture_dir: cannot decode image.*z\.jpg"):
        load_texture_dir(str(tmp_path), (16, 16))


# ----------------------------------------------------------------------------------------------------------------
# the decode cache is written through fae_fast._atomic


def test_decode_cache_gets_the_umask_mode_and_removes_orphans_of_killed_writers(tmp_path):
    paths = [_png(tmp_path / "imgs" / f"{i}.png", 20, 30, value=10 * i) for i in range(3)]
    cache = tmp_path / "cache"
    cache.mkdir()
    # a temporary file left by a writer of this host that was killed (pid 2**22 + 1 is above Linux's pid_max)
    host = _atomic._host()
    orphan = cache / f".images_3x16x16_x.npy.{host}-{2**22 + 1}-0123abcd.tmp"
    orphan.write_bytes(b"half")
    old = os.umask(0o022)
    try:
        first = load_images(paths, (16, 16), cache_dir=cache)
    finally:
        os.umask(old)
    files = [p for p in cache.iterdir() if p.suffix == ".npy"]
    assert len(files) == 1 and not orphan.exists()
    assert files[0].stat().st_mode & 0o777 == 0o644
    assert torch.equal(load_images(paths, (16, 16), cache_dir=cache), first)  # served from the cache


def test_a_full_disk_while_writing_the_cache_warns_and_keeps_the_decoded_images(tmp_path, monkeypatch):
    paths = [_png(tmp_path / "imgs" / f"{i}.png", 20, 30, value=10 * i) for i in range(2)]
    want = load_images(paths, (16, 16))

    def full(f, arr):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(datasets.np, "save", full)
    with pytest.warns(UserWarning, match=r"no space left on device: .*images_2x16x16_.*\.npy"):
        got = load_images(paths, (16, 16), cache_dir=tmp_path / "cache")
    assert torch.equal(got, want)
    assert not [p for p in (tmp_path / "cache").iterdir()], "no temporary file is left behind"


# ----------------------------------------------------------------------------------------------------------------
# the output-folder lock on a full disk


class _FullDisk:
    """A buffered file on a full disk: written data fails with ENOSPC when it is flushed, and again on close."""

    def __init__(self, f):
        self._f, self._pending = f, False

    def write(self, data):
        self._pending = True
        return len(data)

    def flush(self):
        if self._pending:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def close(self):
        self._f.close()
        self.flush()

    def __getattr__(self, name):
        return getattr(self._f, name)


def test_a_full_disk_while_taking_the_output_folder_lock_is_one_line_naming_the_lock_file(tmp_path, monkeypatch):
    from fae_fast import cli

    monkeypatch.setattr(cli, "open", lambda *a, **kw: _FullDisk(open(*a, **kw)), raising=False)
    out = tmp_path / "out"
    with pytest.raises(OSError) as exc:
        with cli.lock_folder(out):
            pass
    assert _one_line(exc) == f"no space left on device: {out / cli.LOCK_NAME}"
    assert cli._one_line(exc.value) == str(exc.value)  # what the CLI prints after "fae-fast predict: error: "


def test_a_model_file_with_an_image_size_outside_the_side_bounds_is_refused_naming_the_file(tmp_path):
    from fae_fast import checkpoint
    from fae_fast.models import build_model

    cfg = preset("tiny")
    state = build_model(cfg.model).state_dict()
    with pytest.raises(ValueError, match=r"image_size \(4, 32\) has a side outside \[8, 8192\]"):
        checkpoint.save_model_file(tmp_path / "small.fae", model_state=state, config=cfg, image_size=(4, 32),
                                   thresholds={})
    good = checkpoint.save_model_file(tmp_path / "m.fae", model_state=state, config=cfg, image_size=(32, 32),
                                      thresholds={"image": 0.1, "pixel": 0.1})
    obj = torch.load(good, weights_only=True)
    obj.pop("checksum")
    for name, size in (("zero.fae", [0, 32]), ("huge.fae", [100000, 100000])):
        # a consistent checksum: the file is well-formed, only its image size is absurd (an engine would
        # allocate buffers of that size)
        torch.save(checkpoint._with_checksum({**obj, "image_size": size}), tmp_path / name)
        with pytest.raises(ValueError, match=f"{name} holds an invalid image size") as exc:
            checkpoint.load_model_file(tmp_path / name)
        _one_line(exc)
