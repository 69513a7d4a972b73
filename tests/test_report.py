"""fae_fast.report: overlay() pixels and robustness, the structure of report.html, and a headless-Chromium render."""
from __future__ import annotations

import base64
import re
import shutil
import subprocess

import cv2
import numpy as np
import pytest
import torch

from fae_fast.evaluate import evaluate
from fae_fast.report import overlay, write_report

# jet at the bottom and the top of the scale, RGB (cv2 gives BGR)
JET_LO = tuple(int(v) for v in cv2.applyColorMap(np.zeros((1, 1), np.uint8), cv2.COLORMAP_JET)[0, 0, ::-1])
JET_HI = tuple(int(v) for v in cv2.applyColorMap(np.full((1, 1), 255, np.uint8), cv2.COLORMAP_JET)[0, 0, ::-1])


# ------------------------------------------------------------------------------------------------------------
# overlay
# ------------------------------------------------------------------------------------------------------------

def test_overlay_colours_and_blend():
    img = np.full((20, 30, 3), 100, np.uint8)
    amap = np.zeros((20, 30), np.float32)
    amap[:, 15:] = 5.0  # right half at (and above) vmax, left half at vmin
    out = overlay(img, amap, 0.0, 2.0, alpha=1.0)
    assert out.dtype == np.uint8 and out.shape == (20, 30, 3)
    assert tuple(out[5, 2]) == JET_LO and tuple(out[5, 25]) == JET_HI
    assert JET_LO[2] > JET_LO[0] and JET_HI[0] > JET_HI[2]  # RGB order: blue at the bottom, red at the top
    assert np.array_equal(overlay(img, amap, 0.0, 2.0, alpha=0.0), img)
    half = overlay(img, amap, 0.0, 2.0, alpha=0.5).astype(int)
    assert np.all(np.abs(half[5, 25] - (100 + np.array(JET_HI)) / 2) <= 1)


def test_overlay_mask_contour():
    img = np.zeros((32, 32, 3), np.uint8)
    mask = np.zeros((32, 32), bool)
    mask[8:20, 10:24] = True
    out = overlay(img, np.zeros((32, 32)), 0.0, 1.0, mask=mask, alpha=0.5)
    green = np.all(out == (0, 255, 0), axis=-1)
    assert green[8, 10:24].all() and green[19, 10:24].all() and green[8:20, 10].all()  # the outline
    assert not green[12:16, 14:20].any() and not green[0:5].any()                  # not inside, not outside
    assert not np.all(overlay(img, np.zeros((32, 32)), 0.0, 1.0, mask=np.zeros((32, 32), bool)) == (0, 255, 0),
                      axis=-1).any()


def test_overlay_accepts_hostile_inputs():
    rng = np.random.default_rng(0)
    rgb = (rng.random((24, 40, 3)) * 255).astype(np.uint8)
    amap = rng.random((24, 40)).astype(np.float32)
    ref = overlay(rgb, amap, 0.0, 1.0)
    # torch CHW, float [0, 1] images, a non-contiguous view and an (1, 1, H, W) map give the same picture
    chw = torch.from_numpy(rgb).permute(2, 0, 1)
    assert np.array_equal(overlay(chw, torch.from_numpy(amap)[None, None], 0.0, 1.0), ref)
    assert np.array_equal(overlay(rgb.astype(np.float32) / 255.0, amap, 0.0, 1.0), ref)
    nc = np.ascontiguousarray(rgb.transpose(1, 0, 2)).transpose(1, 0, 2)
    assert not nc.flags.c_contiguous and np.array_equal(overlay(nc, amap, 0.0, 1.0), ref)
    # grey image, map of another size, NaN and a degenerate colour range
    grey = overlay(rgb[..., 0], cv2.resize(amap, (20, 12)), 0.0, 1.0, mask=np.ones((12, 20), np.uint8))
    assert grey.shape == (24, 40, 3)
    nan_map = amap.copy()
    nan_map[0, 0] = np.nan
    assert overlay(rgb, nan_map, 0.0, 1.0).shape == (24, 40, 3)
    flat = overlay(rgb, amap, 0.5, 0.5, alpha=1.0)
    assert {tuple(p) for p in flat.reshape(-1, 3)} == {JET_LO, JET_HI}
    with pytest.raises(ValueError, match="image"):
        overlay(np.zeros((4, 4, 2), np.uint8), np.zeros((4, 4)), 0, 1)
    with pytest.raises(ValueError, match="alpha"):
        overlay(rgb, amap, 0, 1, alpha=2.0)
    with pytest.raises(ValueError, match="amap"):
        overlay(rgb, np.zeros((2, 24, 40)), 0, 1)


# ------------------------------------------------------------------------------------------------------------
# write_report
# ------------------------------------------------------------------------------------------------------------

def _synthetic(n_good=8, n_bad=6, h=40, w=48, seed=0):
    rng = np.random.default_rng(seed)
    n = n_good + n_bad
    types = ["good"] * n_good + ["crack", "stain"] * (n_bad // 2)
    labels = np.array([t != "good" for t in types])
    images = (rng.random((n, h, w, 3)) * 255).astype(np.uint8)
    masks = np.zeros((n, h, w), bool)
    maps = rng.random((n, h, w)).astype(np.float32) * 0.5
    for i in range(n_good, n):
        y, x = rng.integers(0, h - 10), rng.integers(0, w - 10)
        masks[i, y:y + 8, x:x + 8] = True
        maps[i][masks[i]] += rng.uniform(0.0, 0.8)
    scores = maps.reshape(n, -1).max(1)
    return dict(scores=scores, labels=labels, maps=maps, masks=masks, images=images, defect_types=types,
                paths=[f"test/{t}/{i:03d}.png" for i, t in enumerate(types)])


def _report(tmp_path, **over):
    d = _synthetic()
    res = evaluate(d["scores"], d["maps"], d["labels"], d["masks"], d["defect_types"])
    d.update(over)
    kw = dict(image_threshold=float(np.quantile(d["scores"][:8], 0.9)), pixel_threshold=0.45,
              title="Report <&> test")
    kw.update({k: v for k, v in over.items() if k in kw})
    d = {k: v for k, v in d.items() if k not in kw}
    return write_report(tmp_path / "rep", res, **d, **kw), res


def test_report_structure(tmp_path):
    path, res = _report(tmp_path)
    assert path == tmp_path / "rep" / "report.html"
    assert [p.name for p in path.parent.iterdir()] == ["report.html"]  # no temporary file left behind
    text = path.read_text()
    assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")
    assert '<table id="metrics">' in text and text.count("<tr") == 1 + 3  # header, crack, stain, overall
    assert text.count("<svg") >= 4
    assert "Report &lt;&amp;&gt; test" in text and "<&>" not in text
    for name in ("crack", "stain", "overall"):
        assert f"<td>{name}</td>" in text
    assert f"<td>{100 * res['overall']['image_auroc']:.1f}</td>" in text
    # self-contained: every src is an inlined PNG, nothing is fetched, no script at all
    srcs = re.findall(r'src="([^"]*)"', text)
    assert len(srcs) == 8 + 6  # n_worst good images (8 of 8) + all 6 defective ones
    assert all(s.startswith("data:image/png;base64,") for s in srcs)
    assert "<script" not in text.lower() and "href=" not in text
    tile = cv2.imdecode(np.frombuffer(base64.b64decode(srcs[0].split(",", 1)[1]), np.uint8), cv2.IMREAD_COLOR)
    assert tile.shape == (40, 48, 3)
    # false positives: good images by decreasing score; false negatives: defective ones by increasing score
    d = _synthetic()
    fp_part, fn_part = text.split("Worst false negatives")
    fp = [int(i) for i in re.findall(r'class="path">test/good/(\d+)\.png', fp_part)]
    fn = [int(i) for i in re.findall(r'class="path">test/\w+/(\d+)\.png', fn_part)]
    assert fp == np.argsort(-d["scores"][:8], kind="stable").tolist()
    assert fn == (8 + np.argsort(d["scores"][8:], kind="stable")).tolist()


def test_report_overwrites_atomically_and_degrades(tmp_path):
    path, _ = _report(tmp_path)
    first = path.read_text()
    path2, _ = _report(tmp_path, title="second")
    assert path2 == path and "second" in path.read_text() and path.read_text() != first
    assert len(list(path.parent.iterdir())) == 1
    # no images, no thresholds: still a complete page
    path3, _ = _report(tmp_path, images=None, image_threshold=None, pixel_threshold=None)
    text = path3.read_text()
    assert text.count("<svg") >= 4 and "not set" in text
    # images as file paths
    d = _synthetic()
    files = []
    for i, im in enumerate(d["images"]):
        f = tmp_path / f"{i}.png"
        cv2.imwrite(str(f), im[..., ::-1])
        files.append(str(f))
    path4, _ = _report(tmp_path, images=files)
    assert path4.read_text().count("data:image/png;base64,") == 14
    with pytest.raises(ValueError, match="paths"):
        _report(tmp_path, paths=["x"])
    with pytest.raises(ValueError, match="regions needs maps and masks"):  # as evaluate() refuses them
        _report(tmp_path, masks=None, regions=d["masks"].astype(np.int32))


# ------------------------------------------------------------------------------------------------------------
# headless Chromium
# ------------------------------------------------------------------------------------------------------------

CHROMIUM = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
CHROME_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)")
def test_report_renders_in_chromium(tmp_path):
    path, _ = _report(tmp_path)
    url = path.resolve().as_uri()
    run = subprocess.run([CHROMIUM, *CHROME_FLAGS, f"--user-data-dir={tmp_path / 'profile'}",
                          "--enable-logging=stderr", "--v=0", "--dump-dom", url],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    dom = run.stdout
    assert '<table id="metrics">' in dom and dom.count("<svg") >= 4 and dom.count("<img") == 14
    errors = [ln for ln in run.stderr.splitlines() if "Uncaught" in ln or "net::ERR" in ln
              or "Not allowed to load" in ln or ":CONSOLE" in ln]
    assert not errors, "\n".join(errors)
    shot = tmp_path / "shot.png"
    run = subprocess.run([CHROMIUM, *CHROME_FLAGS, f"--user-data-dir={tmp_path / 'profile'}",
                          "--window-size=1200,1600", f"--screenshot={shot}", url],
                         capture_output=True, text=True, timeout=120)
    img = cv2.imread(str(shot), cv2.IMREAD_COLOR)
    assert img is not None and img.shape[:2] == (1600, 1200), run.stderr[-2000:]
    # the page is drawn: not blank, and the jet-coloured tiles put saturated colours on it
    hsv = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)
    assert img.std() > 20 and (hsv[..., 1] > 150).mean() > 0.01
