"""Tests of fae_fast.data.loader: DALI (CPU-only mode here, GPU tests marked) against the cv2 thread loader.

DALI's antialiased linear resize (a triangle filter) against cv2's INTER_AREA (a box filter), mean absolute
difference measured: 0.55-0.60 / 255 on the generated textured files of this file (FrameSource dali or torch vs
cv2: 0.32-0.45 / 255); 0.4 / 255 at 256x256 and 0.6 / 255 at 128x128 on real BSData photos; ~11 / 255 on pure
noise, which is why the tolerance (3 / 255) is stated for images, not noise.
"""
from __future__ import annotations

import logging
import pathlib

import cv2
import numpy as np
import pytest
import torch

from fae_fast.data import loader as ld
from fae_fast.data import FrameSource, make_loader, read_image

from fae_fast.data.dali import dali_status  # noqa: E402  (imports no DALI until called)

HAS_DALI = dali_status()[0]
needs_dali = pytest.mark.skipif(not HAS_DALI, reason="nvidia.dali not importable")

MEAN_TOL = 3.0  # / 255, mean absolute difference DALI vs cv2 (measured <= 0.6, see the module docstring)
SIZE = (24, 40)


def _texture(h, w, seed):
    """Smooth colour gradients with low-frequency blobs: image-like, unlike noise."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (max(2, h // 8), max(2, w // 8), 3), dtype=np.uint8)
    blobs = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC).astype(np.float32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    grad = np.stack([xx / w, yy / h, 1 - xx / w], -1) * 255
    return np.clip(0.5 * blobs + 0.5 * grad, 0, 255).astype(np.uint8)


def _save(path, rgb):
    ok, buf = cv2.imencode(pathlib.Path(path).suffix, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    assert ok
    buf.tofile(str(path))
    return pathlib.Path(path)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    """7 files (odd, so batches of 3 end with a partial one), JPEG and PNG, two sizes and aspect ratios."""
    d = tmp_path_factory.mktemp("imgs")
    for i in range(7):
        h, w = (60, 80) if i % 2 else (48, 100)
        _save(d / f"img_{i}.{'jpg' if i % 3 else 'png'}", _texture(h, w, i))
    return d


@pytest.fixture(scope="module")
def files(image_dir):
    return sorted(image_dir.iterdir())


def _collect(loader):
    batches = list(loader)
    return torch.cat([b.images for b in batches]), [n for b in batches for n in b.names], batches


# ------------------------------------------------------------------------------------------------ cv2 path


@pytest.mark.parametrize("keep_aspect", [False, True])
def test_cv2_loader_equals_read_image(files, keep_aspect):
    loader = make_loader(files, SIZE, 3, device="cpu", backend="cv2", keep_aspect=keep_aspect, num_threads=2)
    x, names, batches = _collect(loader)
    assert len(loader) == 3 and [len(b.names) for b in batches] == [3, 3, 1]
    assert names == [str(f) for f in files]
    ref = torch.stack([torch.from_numpy(read_image(f, SIZE, keep_aspect)).permute(2, 0, 1) for f in files])
    assert x.dtype == torch.uint8 and x.shape == (7, 3, *SIZE) and torch.equal(x, ref)


def test_float_output_and_channels_last(files):
    u8 = _collect(make_loader(files, SIZE, 4, device="cpu", backend="cv2"))[0]
    f16 = _collect(make_loader(files, SIZE, 4, device="cpu", backend="cv2", dtype=torch.float16,
                               channels_last=True))[0]
    assert f16.dtype == torch.float16 and f16.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(f16, (u8.float() / 255).half())


# ------------------------------------------------------------------------------------------------ DALI vs cv2


@needs_dali
@pytest.mark.parametrize("keep_aspect", [False, True])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float16])
def test_dali_cpu_matches_cv2(files, keep_aspect, dtype):
    kw = dict(device="cpu", keep_aspect=keep_aspect, dtype=dtype, num_threads=2)
    dl = make_loader(files, SIZE, 3, backend="dali", **kw)
    assert dl.backend == "dali" and len(dl) == 3
    xd, nd, bd = _collect(dl)
    xc, nc, _ = _collect(make_loader(files, SIZE, 3, backend="cv2", **kw))
    assert [len(b.names) for b in bd] == [3, 3, 1]                 # partial last batch, no padding repeats
    assert nd == nc == [str(f) for f in files]                     # same order, every file exactly once
    assert xd.dtype == dtype and xd.shape == xc.shape == (7, 3, *SIZE)
    scale = 255.0 if dtype != torch.uint8 else 1.0
    diff = (xd.float() - xc.float()).abs() * scale
    assert diff.mean() < MEAN_TOL, f"mean abs diff {diff.mean():.3f}/255"
    if keep_aspect:  # the geometry is the same: reflected borders line up with the content
        per_row = diff.mean(dim=(0, 1, 3))
        assert per_row.max() < 4 * MEAN_TOL
    # a second epoch from the kept pipeline: same batches
    xd2, nd2, _ = _collect(dl)
    assert nd2 == nd and torch.equal(xd2, xd)


@needs_dali
def test_dali_fit_size_matches_fit_inside():
    """The keep_aspect inner size computed in the DALI graph equals io.fit_inside (same geometry as cv2)."""
    from nvidia.dali import fn, pipeline_def, types

    from fae_fast.data.dali import _fit_size
    from fae_fast.data.io import fit_inside

    rng = np.random.default_rng(0)
    shapes = [np.array(s, np.float32) for s in rng.integers(1, 3000, (300, 2))] + [np.array([460, 1130], np.float32)]
    for H, W in [(208, 512), (256, 256), (100, 37)]:
        @pipeline_def(batch_size=len(shapes), num_threads=1, device_id=None, prefetch_queue_depth=1,
                      exec_async=False, exec_pipelined=False)
        def _p():
            s = fn.external_source(name="s", dtype=types.FLOAT)
            return _fit_size(s[0], s[1], H, W)

        pipe = _p()
        pipe.build()
        pipe.feed_input("s", shapes)
        (out,) = pipe.run()
        got = [tuple(int(v) for v in np.asarray(o)) for o in out]
        assert got == [fit_inside(int(s[0]), int(s[1]), (H, W)) for s in shapes]


@needs_dali
def test_dali_break_early_then_full_epoch(files):
    dl = make_loader(files, SIZE, 2, device="cpu", backend="dali", num_threads=2)
    it = iter(dl)
    next(it)
    it.close()  # left mid-epoch: the next epoch must still start at the first file
    _, names, _ = _collect(dl)
    assert names == [str(f) for f in files]


@pytest.mark.parametrize("backend", ["cv2"] + (["dali"] if HAS_DALI else []))
def test_load_images_on_device_matches_load_images(files, backend, tmp_path):
    from fae_fast.data import load_images, load_images_on_device

    ref = load_images(files, SIZE, keep_aspect=True, workers=2)
    x = load_images_on_device(files, SIZE, device="cpu", keep_aspect=True, backend=backend, batch_size=3,
                              num_threads=2)
    assert x.shape == ref.shape and x.dtype == torch.uint8
    diff = (x.float() - ref.float()).abs().mean()
    assert diff < MEAN_TOL and (backend == "dali" or torch.equal(x, ref))
    bad = tmp_path / "zero.png"
    bad.write_bytes(b"")
    with pytest.raises(ValueError, match="zero.png"):
        load_images_on_device(list(files[:2]) + [bad], SIZE, device="cpu", backend=backend, num_threads=2)


@pytest.mark.gpu
def test_load_images_on_device_cuda(files):
    from fae_fast.data import load_images, load_images_on_device

    x = load_images_on_device(files, SIZE, device="cuda", batch_size=4)
    assert x.is_cuda and x.shape == (7, 3, *SIZE)
    ref = load_images(files, SIZE)
    assert (x.cpu().float() - ref.float()).abs().mean() < MEAN_TOL


# ------------------------------------------------------------------------------------------------ bad files


@pytest.fixture(scope="module")
def bad_dir(tmp_path_factory, files):
    d = tmp_path_factory.mktemp("bad")
    good = [_save(d / f"g{i}.jpg", _texture(30, 40, 20 + i)) for i in range(4)]
    jpg = good[0].read_bytes()
    (d / "b_trunc.jpg").write_bytes(jpg[: len(jpg) // 2])
    (d / "c_zero.png").write_bytes(b"")
    (d / "d_text.jpg").write_bytes(b"definitely not a jpeg " * 20)
    # passes the cheap check (signature, IEND) but fails to decode: found only by decoding
    png = bytearray(cv2.imencode(".png", _texture(30, 40, 9))[1].tobytes())
    i = png.find(b"IDAT")
    png[i + 12:i + 40] = bytes(28)
    (d / "e_crc.png").write_bytes(bytes(png))
    return d


BAD = ["b_trunc.jpg", "c_zero.png", "d_text.jpg", "e_crc.png"]
GOOD = ["g0.jpg", "g1.jpg", "g2.jpg", "g3.jpg"]


def _backends():
    return ["cv2"] + (["dali"] if HAS_DALI else [])


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("check_files", [True, False])
def test_on_error_raise_names_file(bad_dir, backend, check_files):
    for name in BAD:
        files = [bad_dir / "g0.jpg", bad_dir / name, bad_dir / "g1.jpg"]
        with pytest.raises(ValueError, match=name):
            list(make_loader(files, SIZE, 2, device="cpu", backend=backend, check_files=check_files,
                             num_threads=2))


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("check_files", [True, False])
def test_on_error_skip_reports(bad_dir, backend, check_files):
    (bad_dir / "notes.txt").write_text("x")
    try:
        with pytest.raises(ValueError, match="notes.txt"):
            make_loader(bad_dir, SIZE, 3, device="cpu", backend=backend)
        loader = make_loader(bad_dir, SIZE, 3, device="cpu", backend=backend, on_error="skip",
                             check_files=check_files, num_threads=2)
        x, names, _ = _collect(loader)
    finally:
        (bad_dir / "notes.txt").unlink()
    assert [pathlib.Path(n).name for n in names] == GOOD and x.shape[0] == 4
    assert sorted(p.name for p, _ in loader.skipped) == sorted(BAD + ["notes.txt"])
    assert all(reason for _, reason in loader.skipped)
    # the next epoch: the same good files, nothing skipped twice
    _, names2, _ = _collect(loader)
    assert names2 == names and len(loader.skipped) == 5


def test_bad_arguments(files, tmp_path):
    with pytest.raises(ValueError, match="backend"):
        make_loader(files, SIZE, 2, backend="pil")
    with pytest.raises(TypeError, match="dtype"):
        make_loader(files, SIZE, 2, dtype=torch.int32)
    with pytest.raises(FileNotFoundError, match="nothere.png"):
        make_loader([tmp_path / "nothere.png"], SIZE, 2)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="empty"):
        make_loader(empty, SIZE, 2)


# ------------------------------------------------------------------------------------------------ auto choice


def _auto_records(caplog):
    return [r for r in caplog.records if r.name == "fae_fast.data.loader" and "backend auto" in r.getMessage()]


def test_auto_on_cpu_is_cv2_and_logs_once(files, monkeypatch, caplog):
    monkeypatch.setattr(ld, "_logged", set())
    with caplog.at_level(logging.INFO, logger="fae_fast.data.loader"):
        a = make_loader(files, SIZE, 4, device="cpu")
        b = make_loader(files, SIZE, 4, device="cpu")
        fs = FrameSource(SIZE, device="cpu")
    assert a.backend == b.backend == "cv2" and fs.backend == "auto-fallback"
    recs = _auto_records(caplog)
    assert len([r for r in recs if "loader" in r.getMessage()]) == 1
    assert len([r for r in recs if "frame source" in r.getMessage()]) == 1
    assert "cv2" in recs[0].getMessage()


def test_dali_asked_but_missing(files, monkeypatch):
    from fae_fast.data import dali as dali_mod

    monkeypatch.setattr(dali_mod, "dali_status", lambda: (False, "nvidia.dali not importable (test)"))
    with pytest.raises(RuntimeError, match="not importable"):
        make_loader(files, SIZE, 4, device="cpu", backend="dali")


@pytest.mark.gpu
def test_auto_on_cuda_logs_once(files, monkeypatch, caplog):
    from fae_fast.data import dali as dali_mod

    monkeypatch.setattr(ld, "_logged", set())
    with caplog.at_level(logging.INFO, logger="fae_fast.data.loader"):
        a = make_loader(files, SIZE, 4, device="cuda")
        make_loader(files, SIZE, 4, device="cuda")
    assert a.backend == ("dali" if HAS_DALI else "cv2")
    assert len(_auto_records(caplog)) == 1
    # without DALI: cv2, one WARNING
    monkeypatch.setattr(dali_mod, "dali_status", lambda: (False, "nvidia.dali not importable (test)"))
    monkeypatch.setattr(ld, "_logged", set())
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="fae_fast.data.loader"):
        c = make_loader(files, SIZE, 4, device="cuda")
        make_loader(files, SIZE, 4, device="cuda")
    recs = _auto_records(caplog)
    assert c.backend == "cv2" and len(recs) == 1 and recs[0].levelno == logging.WARNING


# ------------------------------------------------------------------------------------------------ frames


@pytest.fixture(scope="module")
def frames():
    return [_texture(50, 70, 40 + i) for i in range(3)]


@pytest.mark.parametrize("backend", ["cv2", "torch"] + (["dali"] if HAS_DALI else []))
@pytest.mark.parametrize("keep_aspect", [False, True])
def test_frame_source_inputs_agree(frames, backend, keep_aspect):
    fs = FrameSource(SIZE, device="cpu", backend=backend, keep_aspect=keep_aspect, max_batch=2, num_threads=2)
    arr = np.stack(frames)
    outs = [fs.process(frames), fs.process(arr), fs.process(torch.from_numpy(arr)),
            fs.process(torch.from_numpy(arr).permute(0, 3, 1, 2)), fs.process([torch.from_numpy(f) for f in frames])]
    for o in outs[1:]:
        assert torch.equal(o, outs[0])
    x = outs[0]
    assert x.shape == (3, 3, *SIZE) and x.dtype == torch.uint8
    ref = torch.stack([torch.from_numpy(ld.resize_image(f, SIZE, keep_aspect)).permute(2, 0, 1) for f in frames])
    diff = (x.float() - ref.float()).abs().mean()
    assert diff < MEAN_TOL, f"{backend}: mean abs diff {diff:.3f}/255 vs read_image's resize"
    if backend == "cv2":
        assert torch.equal(x, ref)
    single = fs.process(frames[0])
    assert torch.equal(single, x[:1])


def test_frame_source_bad_input():
    fs = FrameSource(SIZE, device="cpu", backend="cv2")
    with pytest.raises(TypeError, match="uint8"):
        fs.process(np.zeros((1, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="frame 1"):
        fs.process([np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), np.uint8)])
    with pytest.raises(ValueError, match="empty"):
        fs.process([])


# ------------------------------------------------------------------------------------------------ GPU


@pytest.mark.gpu
@needs_dali
@pytest.mark.parametrize("keep_aspect", [False, True])
def test_dali_gpu_decode_matches_cv2(files, keep_aspect):
    kw = dict(keep_aspect=keep_aspect, dtype=torch.float16)
    xd, nd, bd = _collect(make_loader(files, SIZE, 3, device="cuda", backend="dali", **kw))
    xc, nc, _ = _collect(make_loader(files, SIZE, 3, device="cuda", backend="cv2", **kw))
    assert xd.is_cuda and xc.is_cuda and nd == nc and [len(b.names) for b in bd] == [3, 3, 1]
    # nvJPEG's IDCT differs from libjpeg-turbo's by a grey level here and there
    assert ((xd.float() - xc.float()).abs() * 255).mean() < MEAN_TOL


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch"] + (["dali"] if HAS_DALI else []))
def test_frame_source_cuda_inputs(frames, backend):
    fs = FrameSource(SIZE, device="cuda", backend=backend, dtype=torch.float16)
    host = fs.process(frames)
    dev = fs.process(torch.from_numpy(np.stack(frames)).cuda().permute(0, 3, 1, 2))
    assert host.is_cuda and dev.is_cuda and host.dtype == torch.float16
    assert ((host.float() - dev.float()).abs() * 255).max() <= 1.0
