"""fae_fast.evaluate against scikit-learn, hand-worked AU-PRO values and a slow MVTec-style AU-PRO."""
from __future__ import annotations

import bisect
import json
import math
import warnings

import numpy as np
import pytest
import torch

from fae_fast import evaluate as ev
from fae_fast.evaluate import MetricWarning

sk = pytest.importorskip("sklearn.metrics")


# ------------------------------------------------------------------------------------------------------------
# random cases: continuous, heavy ties, tiny
# ------------------------------------------------------------------------------------------------------------

def _scores(rng, n, levels, dtype=np.float64):
    """levels=None: continuous; otherwise values on a grid of `levels` values (many ties)."""
    if levels is None:
        return rng.random(n).astype(dtype)
    return (rng.integers(0, levels, n) / levels).astype(dtype)


def _labels(rng, n):
    y = rng.random(n) < rng.uniform(0.2, 0.8)
    y[0], y[-1] = True, False  # both classes present
    return y


IMAGE_CASES = [(seed, n, levels) for seed, (n, levels) in enumerate(
    [(2, None), (3, None), (3, 1), (5, 2), (17, 3), (64, None), (64, 5), (200, 10), (201, None), (500, 50)])]


@pytest.mark.parametrize("seed,n,levels", IMAGE_CASES)
def test_image_metrics_match_sklearn(seed, n, levels):
    rng = np.random.default_rng(seed)
    s, y = _scores(rng, n, levels), _labels(rng, n)
    assert ev.image_auroc(s, y) == pytest.approx(sk.roc_auc_score(y, s), abs=1e-12)
    p, r, t = sk.precision_recall_curve(y, s)
    with np.errstate(invalid="ignore"):
        f1 = np.nan_to_num(2 * p * r / (p + r))
    f1_best, thr = ev.image_f1max(s, y)
    assert f1_best == pytest.approx(f1.max(), abs=1e-12)
    # the returned threshold reproduces the optimum with the rule "anomalous where score > threshold"
    assert sk.f1_score(y, s > thr) == pytest.approx(f1_best, abs=1e-12)
    assert thr < s[y].max() or f1_best == 0.0


@pytest.mark.parametrize("seed,n,levels", IMAGE_CASES)
def test_curves_match_sklearn(seed, n, levels):
    rng = np.random.default_rng(seed)
    s, y = _scores(rng, n, levels), _labels(rng, n)
    fpr, tpr, thr = ev.roc_curve(s, y)
    fpr_s, tpr_s, thr_s = sk.roc_curve(y, s, drop_intermediate=False)
    np.testing.assert_allclose(fpr, fpr_s, atol=1e-12)
    np.testing.assert_allclose(tpr, tpr_s, atol=1e-12)
    assert thr[0] == np.inf and np.array_equal(thr[1:], thr_s[1:])
    p, r, t = ev.pr_curve(s, y)
    p_s, r_s, t_s = sk.precision_recall_curve(y, s)
    np.testing.assert_allclose(p, p_s, atol=1e-12)
    np.testing.assert_allclose(r, r_s, atol=1e-12)
    np.testing.assert_array_equal(t, t_s)


def _random_pixels(seed, n=3, h=7, w=9, levels=None, dtype=np.float32):
    rng = np.random.default_rng(seed)
    maps = _scores(rng, n * h * w, levels, dtype).reshape(n, h, w)
    masks = np.zeros((n, h, w), bool)
    for i in range(1, n):  # image 0 stays good
        for _ in range(rng.integers(1, 4)):  # 1-3 random rectangles, possibly touching diagonally or merging
            y0, x0 = rng.integers(0, h), rng.integers(0, w)
            masks[i, y0:y0 + rng.integers(1, 4), x0:x0 + rng.integers(1, 4)] = True
        masks[i] |= rng.random((h, w)) < 0.05  # isolated pixels: diagonal 8-connectivity matters
    maps = maps + 0.3 * masks  # defects score higher on average
    if levels is not None:
        maps = np.round(maps * levels) / levels  # keep the ties after the shift
    return maps.astype(dtype), masks


PIXEL_CASES = [(0, None), (1, 3), (2, 8), (3, None), (4, 20), (5, 2)]


@pytest.mark.parametrize("seed,levels", PIXEL_CASES)
def test_pixel_metrics_match_sklearn(seed, levels):
    maps, masks = _random_pixels(seed, levels=levels)
    y, s = masks.ravel(), maps.ravel()
    assert ev.pixel_auroc(maps, masks) == pytest.approx(sk.roc_auc_score(y, s), abs=1e-12)
    assert ev.pixel_ap(maps, masks) == pytest.approx(sk.average_precision_score(y, s), abs=1e-12)
    p, r, _ = sk.precision_recall_curve(y, s)
    with np.errstate(invalid="ignore"):
        f1 = np.nan_to_num(2 * p * r / (p + r))
    f1_best, thr = ev.pixel_f1max(maps, masks)
    assert f1_best == pytest.approx(f1.max(), abs=1e-12)
    assert sk.f1_score(y, s > thr) == pytest.approx(f1_best, abs=1e-12)


def test_inputs_torch_and_shapes():
    maps, masks = _random_pixels(7, levels=5)
    expected = ev.pixel_auroc(maps, masks)
    t_maps, t_masks = torch.from_numpy(maps)[:, None], torch.from_numpy(masks)[:, None]  # (N, 1, H, W)
    assert ev.pixel_auroc(t_maps, t_masks) == expected
    assert ev.pixel_auroc(t_maps.to(torch.bfloat16), t_masks) == pytest.approx(
        sk.roc_auc_score(masks.ravel(), t_maps.to(torch.bfloat16).float().numpy().ravel()), abs=1e-12)
    assert ev.pixel_auroc(maps, masks.astype(np.uint8)) == expected  # 0/1 numbers are accepted
    assert ev.image_auroc(torch.tensor([0.1, 0.9]), torch.tensor([0, 1])) == 1.0


def test_input_errors():
    maps, masks = _random_pixels(0)
    with pytest.raises(ValueError, match="binary"):
        ev.pixel_auroc(maps, masks * np.uint8(255))
    with pytest.raises(ValueError, match="same"):
        ev.pixel_auroc(maps, masks[:, :-1])
    bad = maps.copy()
    bad[1, 2, 3] = np.nan
    with pytest.raises(ValueError, match=r"NaN.*\(1, 2, 3\)"):
        ev.pixel_auroc(bad, masks)
    with pytest.raises(ValueError, match="labels"):
        ev.image_auroc([0.1, 0.2, 0.3], [0, 1])
    with pytest.raises(TypeError, match="scores"):
        ev.image_auroc("abc", [0, 1, 1])
    with pytest.raises(ValueError, match="fpr_limit"):
        ev.pixel_aupro(maps, masks, fpr_limit=0.0)
    with pytest.raises(ValueError, match="labelled good"):
        ev.evaluate(np.zeros(3), maps, [1, 0, 1], masks | True, None)


# ------------------------------------------------------------------------------------------------------------
# AU-PRO: a slow straightforward version of the MVTec AD reference (compute_pro + trapezoid with x_max)
# ------------------------------------------------------------------------------------------------------------

def _label8(mask):
    """8-connected components by flood fill (independent of cv2)."""
    lab = np.zeros(mask.shape, int)
    n = 0
    for y0, x0 in zip(*np.nonzero(mask)):
        if lab[y0, x0]:
            continue
        n += 1
        stack = [(y0, x0)]
        lab[y0, x0] = n
        while stack:
            y, x = stack.pop()
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    yy, xx = y + dy, x + dx
                    if 0 <= yy < mask.shape[0] and 0 <= xx < mask.shape[1] and mask[yy, xx] and not lab[yy, xx]:
                        lab[yy, xx] = n
                        stack.append((yy, xx))
    return lab, n


def _slow_pro_curve(maps, masks):
    """MVTec's curve: (0, 0), then at every distinct value t (descending) the FPR and the mean region overlap."""
    regions, ok = [], []
    for m, k in zip(maps, masks):
        lab, n = _label8(k)
        regions += [m[lab == j] for j in range(1, n + 1)]
        ok.append(m[~k])
    ok = np.concatenate(ok)
    fprs, pros = [0.0], [0.0]
    for t in sorted(set(np.asarray(maps).ravel().tolist()), reverse=True):
        fprs.append(float(np.mean(ok >= t)))
        pros.append(float(np.mean([np.mean(r >= t) for r in regions])))
    return np.array(fprs), np.array(pros)


def _slow_trapezoid(x, y, x_max):
    correction = 0.0
    if x_max not in x:
        ins = bisect.bisect(x, x_max)
        y_interp = y[ins - 1] + (y[ins] - y[ins - 1]) * (x_max - x[ins - 1]) / (x[ins] - x[ins - 1])
        correction = 0.5 * (y_interp + y[ins - 1]) * (x_max - x[ins - 1])
    keep = x <= x_max
    x, y = x[keep], y[keep]
    return float(np.sum(0.5 * (y[1:] + y[:-1]) * (x[1:] - x[:-1])) + correction)


def _slow_aupro(maps, masks, fpr_limit):
    fpr, pro = _slow_pro_curve(maps, masks)
    fpr, pro = np.append(fpr, 1.0), np.append(pro, 1.0)  # MVTec appends (1, 1)
    return _slow_trapezoid(fpr, pro, fpr_limit) / fpr_limit


@pytest.mark.parametrize("seed,levels", PIXEL_CASES)
@pytest.mark.parametrize("fpr_limit", [0.05, 0.3, 1.0])
def test_aupro_matches_slow_reference(seed, levels, fpr_limit):
    maps, masks = _random_pixels(seed, levels=levels, dtype=np.float64)
    got = ev.pixel_aupro(maps, masks, fpr_limit=fpr_limit)
    assert got == pytest.approx(_slow_aupro(maps, masks, fpr_limit), abs=1e-12)


@pytest.mark.parametrize("seed,levels", PIXEL_CASES[:3])
def test_pro_curve_exact_and_sampled(seed, levels):
    maps, masks = _random_pixels(seed, levels=levels, dtype=np.float64)
    fpr, pro, thr = ev.pro_curve(maps, masks, fpr_limit=0.3, max_points=None)
    f_s, p_s = _slow_pro_curve(maps, masks)
    inside = f_s < 0.3
    np.testing.assert_allclose(fpr[:-1], f_s[inside], atol=1e-12)
    np.testing.assert_allclose(pro[:-1], p_s[inside], atol=1e-12)
    assert fpr[-1] == 0.3 and thr[0] == np.inf
    area = np.sum(0.5 * (pro[1:] + pro[:-1]) * np.diff(fpr)) / 0.3
    assert area == pytest.approx(ev.pixel_aupro(maps, masks), abs=1e-12)
    # the sampled curve goes through exact vertices: with more samples than normal values it is the same area
    fs, ps, _ = ev.pro_curve(maps, masks, fpr_limit=0.3, max_points=10_000)
    assert np.all(np.diff(fs) >= 0) and fs[-1] == 0.3
    assert np.sum(0.5 * (ps[1:] + ps[:-1]) * np.diff(fs)) / 0.3 == pytest.approx(area, abs=1e-12)
    fs, ps, _ = ev.pro_curve(maps, masks, fpr_limit=0.3, max_points=5)
    assert len(fs) <= 2 * 6 + 1 and np.all(np.diff(ps) >= 0)


# hand-worked cases: one 1 x 10 image, defective pixels at x = 0, 1 (region A) and x = 5 (region B, not
# 8-connected to A); the 7 normal pixels are x = 2, 3, 4, 6, 7, 8, 9.
_MASK_AB = np.array([[1, 1, 0, 0, 0, 1, 0, 0, 0, 0]], bool)


def test_aupro_hand_worked_two_regions():
    # A = (0.9, 0.5), B = 0.7, normals 0.8, 0.6, 0.4, 0.3, 0.2, 0.1, 0.0 (in x order 2,3,4,6,7,8,9).
    # Sweep: t=.9 -> (0, 1/4); .8 -> (1/7, 1/4); .7 -> (1/7, 3/4); .6 -> (2/7, 3/4); .5 -> (2/7, 1); .4 -> (3/7, 1)
    # Area to 0.3: 1/4 * 1/7 + 3/4 * 1/7 + 1 * (0.3 - 2/7) = 0.3 - 1/7 = 1.1/7; / 0.3 -> 11/21 = 0.5238095...
    m = np.array([[0.9, 0.5, 0.8, 0.6, 0.4, 0.7, 0.3, 0.2, 0.1, 0.0]])
    assert ev.pixel_aupro(m[None], _MASK_AB[None]) == pytest.approx(11 / 21, abs=1e-12)


def test_aupro_hand_worked_interpolation_at_limit():
    # As above but B = 0.6 ties with the normal 0.6, so the curve goes diagonally from (1/7, 1/4) to (2/7, 3/4).
    # fpr_limit = 0.2 falls inside that segment: PRO(0.2) = 1/4 + 1/2 * (0.2 - 1/7) / (1/7) = 0.45.
    # Area = 1/4 * 1/7 + (1/4 + 0.45) / 2 * (0.2 - 1/7) = 0.25/7 + 0.35 * 0.4/7 = 0.39/7;
    # / 0.2 -> 0.39/1.4 = 39/140 = 0.2785714... (without the interpolated point it would be 0.25/1.4 = 0.1786)
    m = np.array([[0.9, 0.5, 0.8, 0.4, 0.3, 0.6, 0.6, 0.2, 0.1, 0.0]])
    assert ev.pixel_aupro(m[None], _MASK_AB[None], fpr_limit=0.2) == pytest.approx(39 / 140, abs=1e-12)
    fpr, pro, _ = ev.pro_curve(m[None], _MASK_AB[None], fpr_limit=0.2, max_points=None)
    np.testing.assert_allclose(fpr, [0, 0, 1 / 7, 0.2])
    np.testing.assert_allclose(pro, [0, 0.25, 0.25, 0.45])


def test_aupro_perfect_and_constant_maps():
    maps, masks = _random_pixels(3)
    # perfect: every defective pixel above every normal one -> PRO is 1 from FPR 0 on
    assert ev.pixel_aupro(masks.astype(np.float32), masks) == pytest.approx(1.0, abs=1e-12)
    # constant: one threshold, the curve is the diagonal (0, 0) -> (1, 1): area 0.3^2 / 2 / 0.3 = 0.15
    assert ev.pixel_aupro(np.full(maps.shape, 0.5, np.float32), masks) == pytest.approx(0.15, abs=1e-12)
    assert ev.pixel_aupro(np.full(maps.shape, 0.5, np.float32), masks, fpr_limit=1.0) == pytest.approx(0.5)
    # reversed (defects lowest): PRO stays 0 until FPR 1
    assert ev.pixel_aupro(1.0 - masks.astype(np.float32), masks) == 0.0


def test_aupro_uses_8_connectivity():
    # (0,0) and (1,1) touch diagonally: one region of 2 pixels (4-connectivity would make it 2 regions);
    # (1, 3) is a region of its own. Regions weigh equally: the 2-pixel region counts each pixel for 1/4.
    mask = np.zeros((1, 2, 4), bool)
    mask[0, 0, 0] = mask[0, 1, 1] = mask[0, 1, 3] = True
    m = np.zeros((1, 2, 4))
    m[0, 0, 0] = 1.0  # only one pixel of the diagonal region is detected
    # Sweep: t=1 -> (FPR 0, PRO (1/2 + 0)/2 = 1/4); t=0 -> (1, 1). Curve (0,0) -> (0,1/4) -> (1,1):
    # area to FPR 1 = (1/4 + 1)/2 = 0.625 (4-connectivity: PRO(1) = 1/3, area 0.667)
    assert ev.pixel_aupro(m, mask, fpr_limit=1.0) == pytest.approx(0.625, abs=1e-12)
    with pytest.warns(MetricWarning, match="image_auroc"):  # one image: image metrics are undefined
        res = ev.evaluate([0.0], m, [1], mask, ["x"])
    assert res["overall"]["n_regions"] == 2


def test_aupro_regions_given_by_the_caller():
    # _MASK_AB's pixels as ONE defect (ids 1, 1, 1): the regions the caller found where the mask was drawn
    # replace the components of the mask. Sweep: t=.9 -> (0, 1/3); .8 -> (1/7, 1/3); .7 -> (1/7, 2/3); .6 ->
    # (2/7, 2/3); .5 -> (2/7, 1). Area to 0.3: 1/3 * 1/7 + 2/3 * 1/7 + 1 * (0.3 - 2/7) = 0.3 - 1/7; as two regions
    # the same map gives 11/21 (test_aupro_hand_worked_two_regions), as one it is the pixel-weighted PRO
    m = np.array([[0.9, 0.5, 0.8, 0.6, 0.4, 0.7, 0.3, 0.2, 0.1, 0.0]])[None]
    one = _MASK_AB.astype(np.int32)[None]
    assert ev.pixel_aupro(m, _MASK_AB[None], regions=one) == pytest.approx((0.3 - 1 / 7) / 0.3, abs=1e-12)
    # the components themselves as ids give the components' result, also in evaluate() and the curve
    two = one.copy()
    two[0, 0, 5] = 7
    assert ev.pixel_aupro(m, _MASK_AB[None], regions=two) == pytest.approx(11 / 21, abs=1e-12)
    maps, masks = _random_pixels(4)
    import cv2
    comps = np.stack([cv2.connectedComponents(k.astype(np.uint8), connectivity=8)[1] for k in masks])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MetricWarning)
        labels = masks.any(axis=(1, 2))
        scores = maps.max(axis=(1, 2))
        a = ev.evaluate(scores, maps, labels, masks, ["d"] * len(maps))
        b = ev.evaluate(scores, maps, labels, masks, ["d"] * len(maps), regions=comps)
        merged = ev.evaluate(scores, maps, labels, masks, ["d"] * len(maps), regions=masks.astype(np.uint8))
    assert a == b
    # one region per image: as many regions as defective images, and AU-PRO moves
    assert merged["overall"]["n_regions"] == int(labels.sum()) < a["overall"]["n_regions"]
    assert merged["overall"]["pixel_aupro"] != a["overall"]["pixel_aupro"]
    assert merged["per_defect"]["d"]["pixel_aupro"] == merged["overall"]["pixel_aupro"]
    f, p, _ = ev.pro_curve(maps, masks, max_points=None, regions=masks.astype(np.uint8))
    assert np.sum(0.5 * (p[1:] + p[:-1]) * np.diff(f)) / 0.3 == pytest.approx(merged["overall"]["pixel_aupro"])


def test_aupro_regions_must_match_the_masks():
    m, k = np.zeros((1, 1, 10)), _MASK_AB[None]
    bad = k.astype(np.int32)
    bad[0, 0, 9] = 2  # a region id on a normal pixel
    with pytest.raises(ValueError, match=r"regions must be > 0 exactly where masks is True; 1 pixel\(s\) differ, "
                                         r"the first at index \(0, 0, 9\)"):
        ev.pixel_aupro(m, k, regions=bad)
    with pytest.raises(TypeError, match="integer region ids"):
        ev.pixel_aupro(m, k, regions=k.astype(np.float32))
    with pytest.raises(ValueError, match="regions"):
        ev.evaluate([0.0], m, [1], k, regions=k.astype(np.int32)[:, :, :5])
    with pytest.raises(ValueError, match="regions needs maps and masks"):
        ev.evaluate([0.0, 1.0], None, [0, 1], None, regions=k.astype(np.int32))


# ------------------------------------------------------------------------------------------------------------
# degenerate inputs and evaluate()
# ------------------------------------------------------------------------------------------------------------

def test_degenerate_inputs_warn_and_return_nan():
    with pytest.warns(MetricWarning, match="no normal"):
        assert math.isnan(ev.image_auroc([0.1, 0.5], [1, 1]))
    with pytest.warns(MetricWarning, match="none of the 2 images"):
        assert math.isnan(ev.image_auroc([0.1, 0.5], [0, 0]))
    with pytest.warns(MetricWarning):
        f1, thr = ev.image_f1max([0.1, 0.5], [0, 0])
    assert math.isnan(f1) and math.isnan(thr)
    f1, thr = ev.image_f1max([0.1, 0.5], [1, 1])  # all defective: defined, everything flagged
    assert f1 == 1.0 and thr < 0.1
    maps = np.random.default_rng(0).random((2, 4, 4))
    empty = np.zeros((2, 4, 4), bool)
    for fn in (ev.pixel_auroc, ev.pixel_ap, ev.pixel_aupro):
        with pytest.warns(MetricWarning, match="defective"):
            assert math.isnan(fn(maps, empty))
    with pytest.warns(MetricWarning):
        assert math.isnan(ev.pixel_aupro(maps, ~empty))


def _dataset(seed=0):
    """6 good images, 3 'crack' and 2 'hole' images with masks; 'crack' is detected better than 'hole'."""
    rng = np.random.default_rng(seed)
    types = ["good"] * 6 + ["crack"] * 3 + ["hole"] * 2
    n = len(types)
    labels = np.array([t != "good" for t in types])
    maps = rng.random((n, 1, 12, 10)).astype(np.float32)
    masks = np.zeros_like(maps, dtype=bool)
    for i, t in enumerate(types):
        if t != "good":
            y, x = rng.integers(0, 8, 2)
            masks[i, 0, y:y + 3, x:x + 3] = True
            maps[i, 0][masks[i, 0]] += 0.8 if t == "crack" else 0.2
    scores = maps.reshape(n, -1).max(1)
    return scores, maps, labels, masks, types


def test_evaluate_structure_and_per_defect_convention():
    scores, maps, labels, masks, types = _dataset()
    res = ev.evaluate(scores, maps, labels, masks, types)
    assert set(res["per_defect"]) == {"crack", "hole"}
    keys = {"image_auroc", "pixel_auroc", "pixel_aupro", "pixel_ap", "image_f1max"}
    for r in [res["overall"], *res["per_defect"].values()]:
        assert keys <= set(r)
        assert all(0.0 <= r[k] <= 1.0 for k in keys)
    o = res["overall"]
    assert (o["n_images"], o["n_good"], o["n_defective"]) == (11, 6, 5)
    assert o["n_pixels"] == 11 * 120 and o["n_defect_pixels"] == int(masks.sum()) and o["n_regions"] == 5
    assert o["image_auroc"] == pytest.approx(sk.roc_auc_score(labels, scores), abs=1e-12)
    assert o["pixel_aupro"] == pytest.approx(ev.pixel_aupro(maps, masks), abs=1e-12)
    assert o["pixel_f1max"] == pytest.approx(ev.pixel_f1max(maps, masks)[0], abs=1e-12)
    for name in ("crack", "hole"):  # the MVTec convention: that type's images plus all good images
        sel = np.array([t in ("good", name) for t in types])
        r = res["per_defect"][name]
        assert r["n_good"] == 6 and r["n_defective"] == types.count(name)
        assert r["image_auroc"] == pytest.approx(sk.roc_auc_score(labels[sel], scores[sel]), abs=1e-12)
        assert r["pixel_auroc"] == pytest.approx(
            sk.roc_auc_score(masks[sel].ravel(), maps[sel].ravel()), abs=1e-12)
        assert r["pixel_ap"] == pytest.approx(
            sk.average_precision_score(masks[sel].ravel(), maps[sel].ravel()), abs=1e-12)
        assert r["pixel_aupro"] == pytest.approx(_slow_aupro(maps[sel, 0], masks[sel, 0], 0.3), abs=1e-12)
        assert r["image_f1max"] == pytest.approx(ev.image_f1max(scores[sel], labels[sel])[0], abs=1e-12)
    assert res["per_defect"]["crack"]["pixel_aupro"] > res["per_defect"]["hole"]["pixel_aupro"]
    assert json.loads(json.dumps(res)) == res  # plain Python numbers: the CLI writes it as JSON
    # without types or without maps
    res2 = ev.evaluate(scores, maps, labels, masks)
    assert res2["per_defect"] == {} and res2["overall"]["pixel_ap"] == o["pixel_ap"]
    res3 = ev.evaluate(scores, None, labels, None, types)
    assert math.isnan(res3["overall"]["pixel_auroc"]) and res3["overall"]["image_auroc"] == o["image_auroc"]


def test_evaluate_degenerate_never_crashes():
    scores, maps, labels, masks, types = _dataset()
    good = ~labels
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        res = ev.evaluate(scores[good], maps[good], labels[good], masks[good], [types[i] for i in np.flatnonzero(good)])
    assert math.isnan(res["overall"]["image_auroc"]) and math.isnan(res["overall"]["pixel_aupro"])
    assert any(issubclass(w.category, MetricWarning) for w in rec)
    assert "n/a" in ev.format_table(res)


def test_format_table():
    scores, maps, labels, masks, types = _dataset()
    res = ev.evaluate(scores, maps, labels, masks, types)
    table = ev.format_table(res)
    lines = table.splitlines()
    rows = [ln.split()[0] for ln in lines if ln and not ln.startswith("-")]
    assert rows == ["defect", "crack", "hole", "overall"]
    assert len({len(ln) for ln in lines}) == 1  # aligned
    assert f"{100 * res['overall']['image_auroc']:.1f}" in lines[-1]
    for title in ev.METRIC_NAMES.values():
        assert title in lines[0]


def test_pixel_auroc_1m_pixels_with_ties():
    """1M pixels on 1000 levels (heavy ties): still identical to sklearn."""
    rng = np.random.default_rng(0)
    maps = (rng.integers(0, 1000, (16, 256, 256)) / 1000).astype(np.float32)
    masks = np.zeros(maps.shape, bool)
    masks[8:, 100:140, 60:90] = True
    maps[masks] += 0.2
    assert ev.pixel_auroc(maps, masks) == pytest.approx(sk.roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-12)
