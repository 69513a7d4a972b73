"""Tests of fae_fast.data.io and fae_fast.data.datasets: formats, resizing, bad files, MVTec layout, cache, sampler."""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

from fae_fast.data import datasets as ds
from fae_fast.data import io
from fae_fast.data import (MVTecCategory, TrainSampler, is_mvtec, list_images, load_images, load_test_set,
                           normal_image_paths, read_image, read_mask)


def _rgb(h=24, w=32, seed=0):
    """A smooth RGB test image (smooth, so JPEG and resizing errors stay small)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([xx / max(w - 1, 1), yy / max(h - 1, 1), (xx + yy) / max(h + w - 2, 1)], -1)
    return np.clip(base * 200 + rng.integers(0, 40, 3), 0, 255).astype(np.uint8)


def _write(path, arr_bgr_or_grey, params=()):
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, buf = cv2.imencode(path.suffix, arr_bgr_or_grey, list(params))
    assert ok
    buf.tofile(str(path))
    return path


def _save_rgb(path, rgb, params=()):
    return _write(path, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), params)


# ------------------------------------------------------------------------------------------------ formats


def test_import_does_not_load_dali():
    code = "import sys, fae_fast.data; assert 'nvidia.dali' not in sys.modules, 'DALI imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("ext", [".png", ".bmp", ".tiff", ".webp"])
def test_lossless_formats_roundtrip_rgb(tmp_path, ext):
    rgb = _rgb()
    params = (cv2.IMWRITE_WEBP_QUALITY, 101) if ext == ".webp" else ()  # quality > 100 is lossless webp
    out = read_image(_save_rgb(tmp_path / f"a{ext}", rgb, params))
    assert out.dtype == np.uint8 and out.shape == (24, 32, 3) and out.flags.c_contiguous
    np.testing.assert_array_equal(out, rgb)  # also proves BGR -> RGB


def test_jpeg_close_and_rgb_order(tmp_path):
    rgb = _rgb()
    rgb[..., 0] = 250  # strong red, so a channel swap would be obvious
    out = read_image(_save_rgb(tmp_path / "a.jpg", rgb, (cv2.IMWRITE_JPEG_QUALITY, 95)))
    assert out.shape == rgb.shape
    assert np.abs(out.astype(int) - rgb).mean() < 3
    assert out[..., 0].mean() > 240


def test_grey_rgba_16bit_float(tmp_path):
    g = _rgb()[..., 1]
    out = read_image(_write(tmp_path / "g.png", g))
    assert out.shape == (24, 32, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], g)
    # RGBA: the alpha is dropped, not composited on black
    rgb = _rgb()
    bgra = np.dstack([cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), np.full(rgb.shape[:2], 7, np.uint8)])
    np.testing.assert_array_equal(read_image(_write(tmp_path / "a.png", bgra)), rgb)
    # 16 bit: round(v / 257), so 65535 -> 255, 257*k -> k, 128 -> 0 vs 129 -> 1 around the half
    v16 = np.array([[0, 128, 129, 257 * 100, 65535, 65535 - 128]], np.uint16)
    out = read_image(_write(tmp_path / "d.png", v16))[..., 0]
    np.testing.assert_array_equal(out[0], [0, 0, 1, 100, 255, 255])
    # float TIFF: [0, 1] scaled, out-of-range clipped
    f = np.array([[-0.5, 0.0, 0.5, 1.0, 3.0]], np.float32)
    out = read_image(_write(tmp_path / "f.tiff", f))[..., 0]
    np.testing.assert_array_equal(out[0], [0, 0, 128, 255, 255])


# ------------------------------------------------------------------------------------------------ resizing


def test_resize_stretch_interpolation(tmp_path):
    rgb = _rgb(40, 60)
    p = _save_rgb(tmp_path / "a.png", rgb)
    small = read_image(p, size=(20, 30))
    np.testing.assert_array_equal(small, cv2.resize(rgb, (30, 20), interpolation=cv2.INTER_AREA))
    big = read_image(p, size=(80, 90))
    np.testing.assert_array_equal(big, cv2.resize(rgb, (90, 80), interpolation=cv2.INTER_LINEAR))
    # one axis shrinks and the other grows: area along the first, linear along the second
    mixed = read_image(p, size=(20, 90))
    ref = cv2.resize(cv2.resize(rgb, (60, 20), interpolation=cv2.INTER_AREA), (90, 20),
                     interpolation=cv2.INTER_LINEAR)
    np.testing.assert_array_equal(mixed, ref)


def test_keep_aspect_fit_and_reflect(tmp_path):
    rgb = _rgb(20, 40)
    p = _save_rgb(tmp_path / "a.png", rgb)
    out = read_image(p, size=(30, 30), keep_aspect=True)
    assert out.shape == (30, 30, 3)
    inner = cv2.resize(rgb, (30, 15), interpolation=cv2.INTER_AREA)
    # 15 rows centred in 30: 7 above, 8 below, reflect-101 (edge row not repeated)
    np.testing.assert_array_equal(out[7:22], inner)
    np.testing.assert_array_equal(out[:7], cv2.copyMakeBorder(inner, 7, 8, 0, 0, cv2.BORDER_REFLECT_101)[:7])
    np.testing.assert_array_equal(out[6], inner[1])
    np.testing.assert_array_equal(out[22], inner[13])
    assert io.fit_inside(460, 1130, (208, 512)) == (208, 511)
    assert io.fit_inside(1130, 460, (512, 208)) == (511, 208)
    assert io.fit_inside(10, 10, (3, 7)) == (3, 3)


def test_reflect_indices_match_cv2_even_for_wide_margins():
    for n_in, n_out in [(1, 5), (2, 9), (3, 17), (5, 5), (4, 30)]:
        off = (n_out - n_in) // 2
        a = np.arange(n_in, dtype=np.uint8)[None]
        ref = cv2.copyMakeBorder(a, 0, 0, off, n_out - n_in - off, cv2.BORDER_REFLECT_101)[0]
        np.testing.assert_array_equal(io.reflect_indices(n_out, off, n_in), ref)


def test_read_mask_threshold_and_resize(tmp_path):
    m = np.zeros((8, 8), np.uint8)
    m[:, 3] = 200       # a one-pixel vertical scratch
    m[0, 0] = 127       # not > 127
    p = _write(tmp_path / "m_mask.png", m)
    full = read_mask(p)
    assert full.dtype == bool and full.sum() == 8 and not full[0, 0]
    half = read_mask(p, size=(4, 4))  # the scratch covers half of each target column-1 pixel: kept
    assert half.dtype == bool and half.shape == (4, 4)
    assert half[:, 1].all() and half.sum() == 4
    with pytest.raises(FileNotFoundError, match="nope_mask.png"):
        read_mask(tmp_path / "nope_mask.png", (4, 4))


def test_resize_regions_keeps_a_thin_defect_whole():
    # a diagonal crack one to two pixels wide: shrunk 2.2x, the mask rule keeps only part of it, and the kept
    # pixels fall apart into pieces; as regions found at the native size they stay one defect
    m = np.zeros((40, 40), bool)
    for y in range(2, 38):
        m[y, y] = True
        if y % 3:
            m[y, y + 1] = True
    m[30:34, 4:8] = True  # a second defect
    small = io.resize_mask(m, (18, 18))
    n_pieces = cv2.connectedComponents(small.astype(np.uint8), connectivity=8)[0] - 1
    reg = io.resize_regions(m, (18, 18))
    assert reg.dtype == np.int32 and reg.shape == (18, 18)
    np.testing.assert_array_equal(reg > 0, small)  # the same pixels as the mask rule
    assert n_pieces == 5 and sorted(np.unique(reg[reg > 0]).tolist()) == [1, 2]
    assert reg[14, 2] == 2 and (reg[small][reg[small] != 2] == 1).all()  # the square keeps its own id
    # unchanged size: the components themselves; keep_aspect pads the ids like the mask
    np.testing.assert_array_equal(io.resize_regions(m, (40, 40)),
                                  cv2.connectedComponents(m.astype(np.uint8), connectivity=8)[1])
    wide = io.resize_regions(m, (20, 30), keep_aspect=True)
    np.testing.assert_array_equal(wide > 0, io.resize_mask(m, (20, 30), keep_aspect=True))
    assert set(np.unique(wide).tolist()) == {0, 1, 2}
    assert not io.resize_regions(np.zeros((8, 8), bool), (4, 4)).any()


# ------------------------------------------------------------------------------------------------ bad inputs


def test_bad_files_are_named(tmp_path):
    good = _save_rgb(tmp_path / "ok.jpg", _rgb())
    data = good.read_bytes()
    cases = {
        "zero.png": b"",
        "corrupt.png": b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4,
        "trunc.jpg": data[: len(data) // 2],
        "text.jpg": b"this is not a picture" * 10,
    }
    for name, content in cases.items():
        p = tmp_path / name
        p.write_bytes(content)
        with pytest.raises(ValueError, match=name):
            read_image(p)
        fmt, reason = io.check_image_file(p)
        assert reason is not None, name
    assert io.check_image_file(good) == ("jpeg", None)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        read_image(tmp_path / "missing.png")


def test_list_images_errors_and_skip(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        list_images(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="empty"):
        list_images(empty)
    d = tmp_path / "imgs"
    _save_rgb(d / "b.png", _rgb())
    _save_rgb(d / "a.JPG", _rgb())
    (d / ".DS_Store").write_bytes(b"x")
    (d / "sub").mkdir()
    assert [p.name for p in list_images(d)] == ["a.JPG", "b.png"]
    (d / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match="notes.txt"):
        list_images(d)
    lst = list_images(d, on_error="skip")
    assert [p.name for p in lst] == ["a.JPG", "b.png"]
    assert [p.name for p, _ in lst.skipped] == ["notes.txt"]
    only_txt = tmp_path / "txt"
    only_txt.mkdir()
    (only_txt / "x.txt").write_text("x")
    with pytest.raises(ValueError, match="txt"):
        list_images(only_txt, on_error="skip")


def test_load_images_all_or_nothing_names_file(tmp_path):
    paths = [_save_rgb(tmp_path / f"{i}.png", _rgb(seed=i)) for i in range(5)]
    bad = tmp_path / "3_bad.png"
    bad.write_bytes(b"")
    with pytest.raises(ValueError, match="3_bad.png"):
        load_images(paths[:3] + [bad] + paths[3:], (8, 8), workers=3)
    with pytest.raises(ValueError, match="empty"):
        load_images([], (8, 8))
    with pytest.raises(ValueError, match="size"):
        load_images(paths, (0, 8))


# ------------------------------------------------------------------------------------------------ MVTec layout


def _make_mvtec(root, mask_size=None, drop_mask=False):
    root = pathlib.Path(root)
    for i in range(3):
        _save_rgb(root / "train" / "good" / f"{i:03d}.png", _rgb(16, 20, seed=i))
    _save_rgb(root / "test" / "good" / "000.png", _rgb(16, 20, seed=10))
    for d in ("crack", "scratch"):
        for i in range(2):
            stem = f"{i:03d}"
            img = _rgb(16, 20, seed=20 + i)
            _save_rgb(root / "test" / d / f"{stem}.png", img)
            if drop_mask and d == "scratch" and i == 1:
                continue
            m = np.zeros(mask_size or (16, 20), np.uint8)
            m[4:8, 5:10] = 255
            _write(root / "ground_truth" / d / f"{stem}_mask.png", m)
    return root


def test_mvtec_layout_parsing(tmp_path):
    root = _make_mvtec(tmp_path / "cat")
    assert is_mvtec(root) and not is_mvtec(tmp_path)
    cat = MVTecCategory(root)
    assert [p.name for p in cat.train_paths] == ["000.png", "001.png", "002.png"]
    assert [(t.defect_type, t.label, t.path.name) for t in cat.test_items] == [
        ("crack", 1, "000.png"), ("crack", 1, "001.png"), ("good", 0, "000.png"),
        ("scratch", 1, "000.png"), ("scratch", 1, "001.png")]
    assert cat.test_items[0].mask_path == root / "ground_truth" / "crack" / "000_mask.png"
    assert cat.test_items[2].mask_path is None
    assert normal_image_paths(root) == cat.train_paths
    assert normal_image_paths(root / "train" / "good") == cat.train_paths
    assert normal_image_paths([str(p) for p in cat.train_paths]) == cat.train_paths
    with pytest.raises(FileNotFoundError):
        normal_image_paths(tmp_path / "absent")


def test_missing_mask_names_image_and_expected_path(tmp_path):
    root = _make_mvtec(tmp_path / "cat", drop_mask=True)
    with pytest.raises(FileNotFoundError) as e:
        MVTecCategory(root)
    msg = str(e.value)
    assert "scratch" in msg and "001.png" in msg and "001_mask.png" in msg


def test_load_test_set(tmp_path):
    root = _make_mvtec(tmp_path / "cat")
    ts = load_test_set(root, (8, 10))
    assert ts.images.shape == (5, 3, 8, 10) and ts.images.dtype == torch.uint8
    assert ts.masks.shape == (5, 1, 8, 10) and ts.masks.dtype == torch.bool
    assert ts.labels.tolist() == [1, 1, 0, 1, 1] and ts.labels.dtype == torch.int64
    assert ts.defect_types == ["crack", "crack", "good", "scratch", "scratch"]
    assert not ts.masks[2].any()
    assert ts.regions.shape == (5, 1, 8, 10) and ts.regions.dtype == torch.int32
    for i, item in enumerate(MVTecCategory(root).test_items):  # the masks (regions > 0): fae_fast.data.io's rule
        if item.mask_path is not None:
            np.testing.assert_array_equal(ts.masks[i, 0].numpy(), io.read_mask(item.mask_path, (8, 10)) > 0)
    # rows 4:8, cols 5:10 of 16x20 -> rows 2:4, cols 2.5:5 of 8x10; column 2 is half covered and kept
    expect = np.zeros((8, 10), bool)
    expect[2:4, 2:5] = True
    np.testing.assert_array_equal(ts.masks[0, 0].numpy(), expect)
    np.testing.assert_array_equal(ts.images[0].permute(1, 2, 0).numpy(),
                                  read_image(ts.paths[0], (8, 10)))


def test_wrongly_sized_mask_names_both(tmp_path):
    root = _make_mvtec(tmp_path / "cat", mask_size=(16, 18))
    with pytest.raises(ValueError) as e:
        load_test_set(root, (8, 8), workers=1)
    msg = str(e.value)
    assert "000_mask.png" in msg and "000.png" in msg and "crack" in msg


# ------------------------------------------------------------------------------------------------ cache


def test_cache_hit_and_miss(tmp_path, monkeypatch):
    paths = [_save_rgb(tmp_path / "img" / f"{i}.png", _rgb(seed=i)) for i in range(4)]
    cache = tmp_path / "cache"
    a = load_images(paths, (12, 16), cache_dir=cache, workers=2)
    files = list(cache.glob("*.npy"))
    assert len(files) == 1 and not list(cache.glob("*.tmp"))
    calls = []
    real = ds.read_image
    monkeypatch.setattr(ds, "read_image", lambda *a, **k: calls.append(a) or real(*a, **k))
    b = load_images(paths, (12, 16), cache_dir=cache)
    assert calls == [] and torch.equal(a, b)                  # hit: nothing decoded
    load_images(paths, (12, 16), keep_aspect=True, cache_dir=cache)
    assert len(calls) == 4 and len(list(cache.glob("*.npy"))) == 2   # other settings: miss
    # a changed file changes the key: miss, and the new content is returned
    _save_rgb(paths[0], _rgb(seed=99))
    import os
    st = paths[0].stat()
    os.utime(paths[0], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    c = load_images(paths, (12, 16), cache_dir=cache)
    assert len(calls) == 8 and not torch.equal(c[0], a[0]) and torch.equal(c[1:], a[1:])
    # a corrupt cache file is ignored and rewritten
    files = sorted(cache.glob("*.npy"), key=lambda p: p.stat().st_mtime_ns)
    files[-1].write_bytes(b"garbage")
    d = load_images(paths, (12, 16), cache_dir=cache)
    assert torch.equal(c, d)


# ------------------------------------------------------------------------------------------------ sampler


def _ramp_set(n=6, h=4, w=4):
    """Channel 1 is the image's index everywhere (invariant under flips); channels 0, 2 are ramps."""
    x = (torch.arange(n * 3 * h * w, dtype=torch.int64).view(n, 3, h, w) % 251).to(torch.uint8)
    x[:, 1] = torch.arange(n, dtype=torch.uint8).view(n, 1, 1)
    return x


def test_sampler_determinism_and_epochs():
    imgs = _ramp_set(7)
    s1 = TrainSampler(imgs, 3, torch.Generator().manual_seed(5))
    s2 = TrainSampler(imgs, 3, torch.Generator().manual_seed(5))
    s3 = TrainSampler(imgs, 3, torch.Generator().manual_seed(6))
    b1 = [s1.next() for _ in range(7)]
    b2 = [s2.next() for _ in range(7)]
    b3 = [s3.next() for _ in range(7)]
    assert all(torch.equal(a, b) for a, b in zip(b1, b2))
    assert not all(torch.equal(a, b) for a, b in zip(b1, b3))
    assert b1[0].shape == (3, 3, 4, 4) and b1[0].dtype == torch.uint8 and len(s1) == 3
    # 7 batches of 3 = exactly 3 epochs of 7: every image 3 times (identified through the invariant multiset)
    no_aug = TrainSampler(imgs, 3, 0, flip=False)
    seen = torch.cat([no_aug.next() for _ in range(7)])
    ids = seen[:, 1, 0, 0].tolist()
    assert sorted(ids) == sorted(list(range(7)) * 3)


def test_sampler_state_dict_resumes_exactly():
    imgs = _ramp_set(5)
    g = torch.Generator().manual_seed(3)
    s = TrainSampler(imgs, 3, g, rot90=True)
    s.next()
    state, gstate = s.state_dict(), g.get_state()
    ahead = [s.next() for _ in range(3)]
    g2 = torch.Generator().manual_seed(99)
    g2.set_state(gstate)
    r = TrainSampler(imgs, 3, g2, rot90=True)
    r.load_state_dict(state)
    assert all(torch.equal(a, r.next()) for a in ahead) and r.epoch == s.epoch
    with pytest.raises(ValueError, match="5"):
        TrainSampler(_ramp_set(4), 3, 0).load_state_dict(state)


def test_sampler_flips_and_rotations():
    imgs = _ramp_set(4, 5, 5)
    keys = {i: {} for i in range(4)}
    for i in range(4):
        x = imgs[i]
        for k in range(4):
            keys[i][("rot", k)] = torch.rot90(x, k, (-2, -1))
            keys[i][("rotflip", k)] = torch.rot90(x.flip(-1), k, (-2, -1))

    def classify(batch, flip, rot90):
        found = set()
        for b in batch:
            hits = [(i, t) for i in range(4) for t, v in keys[i].items() if torch.equal(b, v)]
            assert hits, "a sampled image is not a symmetry of an input image"
            found.add(hits[0][1])
        return found

    s = TrainSampler(imgs, 64, torch.Generator().manual_seed(1), flip=True, rot90=True)
    assert len(classify(s.next(), True, True)) == 8                     # all of the square's symmetries
    s = TrainSampler(imgs, 64, torch.Generator().manual_seed(1), flip=False, rot90=True)
    assert classify(s.next(), False, True) == {("rot", k) for k in range(4)}   # no mirror images
    s = TrainSampler(imgs, 64, torch.Generator().manual_seed(1), flip=True, rot90=False)
    assert classify(s.next(), True, False) == {("rot", 0), ("rot", 2), ("rotflip", 0), ("rotflip", 2)}
    with pytest.raises(ValueError, match="square"):
        TrainSampler(torch.zeros(2, 3, 4, 5, dtype=torch.uint8), 2, 0, rot90=True)
    with pytest.raises(ValueError, match="uint8"):
        TrainSampler(torch.zeros(2, 3, 4, 4), 2, 0)


def test_sampler_shift_translates_with_reflected_borders():
    imgs = (torch.rand(6, 3, 7, 9) * 255).to(torch.uint8)
    plain = TrainSampler(imgs, 40, torch.Generator().manual_seed(2), flip=False).next()
    s = TrainSampler(imgs, 40, torch.Generator().manual_seed(2), flip=False, shift=3)
    batch = s.next()
    # the same images in the same order (the offsets are drawn after the permutation), each a translate of its
    # own image by some (dy, dx) within 3 px, reflected as np.pad(mode="reflect") does
    padded = np.pad(plain.numpy(), ((0, 0), (0, 0), (3, 3), (3, 3)), mode="reflect")
    offsets = set()
    for i in range(40):
        hits = [(dy, dx) for dy in range(-3, 4) for dx in range(-3, 4)
                if np.array_equal(batch[i].numpy(), padded[i, :, 3 - dy:3 - dy + 7, 3 - dx:3 - dx + 9])]
        assert hits, f"image {i} is not a reflected translate of its source"
        offsets.update(hits)
    assert len(offsets) > 10                                        # many of the 49 offsets drawn
    assert max(abs(dy) for dy, _ in offsets) == 3 and max(abs(dx) for _, dx in offsets) == 3
    # shift=0 draws nothing: the stream (and so every earlier model) is unchanged
    again = TrainSampler(imgs, 40, torch.Generator().manual_seed(2), flip=False, shift=0).next()
    assert torch.equal(again, plain)
    for bad in (-1, 7, 2.5, True):
        with pytest.raises(ValueError, match="shift must be an int in \\[0, 7\\) for 7 x 9"):
            TrainSampler(imgs, 4, 0, shift=bad)
    assert TrainSampler(imgs, 4, 0, shift=6, crop=(7, 7)).next().shape == (4, 3, 7, 7)
    assert next(iter(s)).shape == (40, 3, 7, 9)                    # still an iterator


@pytest.mark.gpu
def test_sampler_on_cuda_with_cuda_generator():
    imgs = _ramp_set(8, 6, 6).cuda()
    s = TrainSampler(imgs, 5, torch.Generator("cuda").manual_seed(0), rot90=True)
    b = s.next()
    assert b.is_cuda and b.shape == (5, 3, 6, 6)
    s_cpu = TrainSampler(imgs, 5, torch.Generator().manual_seed(0), rot90=True)
    assert s_cpu.next().is_cuda


# ------------------------------------------------------------------------------------------------ real data


def test_bsdata_category(bsdata_dir):
    cat = MVTecCategory(bsdata_dir)
    assert len(cat.train_paths) > 100
    assert "good" in cat.defect_types and "pitting" in cat.defect_types
    defective = [t for t in cat.test_items if t.label == 1]
    assert defective and all(t.mask_path is not None and t.mask_path.is_file() for t in defective)
    x = load_images(cat.train_paths[:4], (208, 512), keep_aspect=True, workers=2)
    assert x.shape == (4, 3, 208, 512) and x.dtype == torch.uint8 and x.float().std() > 5
    m = read_mask(defective[0].mask_path, (208, 512), keep_aspect=True)
    assert m.shape == (208, 512) and m.any()


# ------------------------------------------------------------------------------------------------ resource bombs


@pytest.mark.parametrize("ext, params", [(".png", ()), (".jpg", ()), (".jpg", (cv2.IMWRITE_JPEG_PROGRESSIVE, 1)),
                                         (".bmp", ()), (".tiff", ()), (".webp", ()),
                                         (".webp", (cv2.IMWRITE_WEBP_QUALITY, 101))])
def test_header_size_without_decoding(tmp_path, ext, params):
    p = _save_rgb(tmp_path / f"x{ext}", _rgb(37, 53), params)
    assert io.header_size(p.read_bytes()) == (37, 53)
    assert io.image_size_of(p) == (37, 53) == read_image(p).shape[:2]


def _png_declaring(path, h, w):
    """A small PNG whose header claims ``h x w`` pixels (what a decompression bomb looks like to the reader)."""
    buf = bytearray(cv2.imencode(".png", np.zeros((4, 4), np.uint8))[1].tobytes())
    buf[16:24] = np.array([w, h], dtype=">u4").tobytes()
    path.write_bytes(bytes(buf))
    return path


def test_pixel_bomb_is_refused_before_decoding(tmp_path, monkeypatch):
    bomb = _png_declaring(tmp_path / "bomb.png", 20000, 20000)
    for read in (read_image, read_mask):
        with pytest.raises(ValueError, match=r"too large: .*bomb\.png is 20000x20000.*FAE_FAST_MAX_IMAGE_PIXELS"):
            read(bomb)
    with pytest.raises(ValueError, match="bomb.png"):
        load_images([bomb], (16, 16))
    fmt, reason = io.check_image_file(bomb)  # the check before DALI, which cannot name a file
    assert fmt == "png" and "too large" in reason
    real = _save_rgb(tmp_path / "real.png", _rgb(40, 50))
    monkeypatch.setenv("FAE_FAST_MAX_IMAGE_PIXELS", "1999")  # 40 x 50 = 2000 pixels
    with pytest.raises(ValueError, match="real.png is 50x40"):
        read_image(real)
    monkeypatch.setenv("FAE_FAST_MAX_IMAGE_PIXELS", "2000")
    assert read_image(real).shape == (40, 50, 3)
    monkeypatch.setenv("FAE_FAST_MAX_IMAGE_PIXELS", "lots")
    with pytest.raises(ValueError, match="FAE_FAST_MAX_IMAGE_PIXELS must be a positive number"):
        read_image(real)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs os.mkfifo")
def test_a_fifo_named_like_an_image_is_refused_not_waited_on(tmp_path):
    d = tmp_path / "imgs"
    _save_rgb(d / "a.png", _rgb())
    fifo = d / "frame.png"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match=r"not a regular file.*frame\.png"):
        read_image(fifo)
    with pytest.raises(ValueError, match=r"not a regular file.*frame\.png"):
        list_images(d)
    lst = list_images(d, on_error="skip")
    assert [p.name for p in lst] == ["a.png"] and [p.name for p, _ in lst.skipped] == ["frame.png"]
    assert io.check_image_file(fifo) == (None, "not a regular file")
    with pytest.raises(ValueError, match=r"not a regular file.*frame\.png"):
        normal_image_paths([d / "a.png", fifo])
    with pytest.raises(IsADirectoryError, match="folder"):
        read_image(d)
