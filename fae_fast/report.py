"""Self-contained HTML evaluation report and heat-map overlays.

:func:`write_report` writes one ``report.html`` that needs nothing else: images are inlined as base64 PNG, plots
are inline SVG drawn by the small helpers below (no matplotlib, no JavaScript at all), styles are inline. It
holds the metrics table, the image-level ROC and precision-recall curves, the PRO curve up to the AU-PRO FPR
limit, a histogram of normal vs defective image scores with the image threshold, and the worst false positives
(highest-scoring good images) and false negatives (lowest-scoring defective images) as overlays.

:func:`overlay` (also used by ``fae-fast predict``) blends a jet-coloured anomaly map onto an image and draws
the contour of a mask.

Example:
    >>> from fae_fast.evaluate import evaluate
    >>> from fae_fast.report import write_report
    >>> res = evaluate(scores, maps, labels, masks, types)                       # doctest: +SKIP
    >>> write_report("out", res, scores=scores, labels=labels, maps=maps, masks=masks, images=images,
    ...              defect_types=types, paths=paths, image_threshold=0.1, pixel_threshold=0.05)  # doctest: +SKIP
    PosixPath('out/report.html')
"""
from __future__ import annotations

import base64
import datetime as _dt
import html
import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from . import _atomic
from .evaluate import METRIC_NAMES, pr_curve, pro_curve, roc_curve

__all__ = ["overlay", "write_report"]

# RGB colours of the plots and contours
_GT_COLOUR = (0, 255, 0)        # ground-truth contour: green stands out on every jet colour
_PRED_COLOUR = (255, 255, 255)  # predicted-region contour (map > pixel threshold)
_NORMAL = "#1f77b4"
_DEFECT = "#d62728"
_THUMB = 256                     # longest side of an inlined tile, in pixels: keeps the file small


# ----------------------------------------------------------------------------------------------------------
# overlays
# ----------------------------------------------------------------------------------------------------------

def _to_array(x: Any, name: str) -> np.ndarray:
    if type(x).__module__.startswith("torch"):
        x = x.detach().cpu()
        x = x.float().numpy() if x.dtype.is_floating_point else x.numpy()  # numpy has no bfloat16
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a numpy array or a torch tensor, got {type(x).__name__}")
    return x


def _as_rgb_uint8(image: Any) -> np.ndarray:
    """(H, W, 3) / (H, W) / (H, W, 1) / (3, H, W) / (1, H, W), uint8 or float in [0, 1] -> contiguous RGB uint8."""
    img = _to_array(image, "image")
    if img.ndim == 3 and img.shape[0] in (1, 3) and img.shape[-1] not in (1, 3):
        img = img.transpose(1, 2, 0)  # channels-first
    if img.ndim == 3 and img.shape[-1] == 1:
        img = img[..., 0]
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    if img.ndim != 3 or img.shape[-1] != 3:
        raise ValueError(f"image must be (H, W, 3), (H, W) or (3, H, W), got shape {img.shape}")
    if img.dtype == np.uint8:
        return np.ascontiguousarray(img)
    if img.dtype == np.bool_:
        return np.ascontiguousarray(img.astype(np.uint8) * 255)
    if img.dtype.kind == "f":
        # float images are taken to be in [0, 1] (what the models see); NaN becomes black
        return np.ascontiguousarray(np.clip(np.nan_to_num(img) * 255.0 + 0.5, 0, 255).astype(np.uint8))
    if img.dtype.kind in "iu":
        return np.ascontiguousarray(np.clip(img, 0, 255).astype(np.uint8))
    raise TypeError(f"image has unsupported dtype {img.dtype}")


def _squeeze2d(a: np.ndarray, name: str) -> np.ndarray:
    while a.ndim > 2 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != 2:
        raise ValueError(f"{name} must be (H, W) (or with leading size-1 axes), got shape {a.shape}")
    return a


def overlay(image: Any, amap: Any, vmin: float, vmax: float, mask: Any = None, *, alpha: float = 0.5,
            mask_colour: tuple[int, int, int] = _GT_COLOUR, thickness: int | None = None) -> np.ndarray:
    """Blend a jet-coloured anomaly map onto an image and draw the contour of ``mask``.

    Args:
        image: (H, W, 3) RGB uint8 (also accepted: (H, W) grey, (3, H, W), float in [0, 1], numpy or torch).
        amap: (H, W) float anomaly map; resized (bilinear) when its size differs from the image's. NaN counts
            as ``vmin``.
        vmin, vmax: the map values drawn as the bottom (dark blue) and top (dark red) of the jet colormap;
            values outside are clipped. ``vmax <= vmin`` draws everything above ``vmin`` at the top colour.
        mask: optional (H, W) bool (or 0/1) region whose outline is drawn (nearest-neighbour resized).
        alpha: weight of the heat map in the blend, in [0, 1].
        mask_colour: RGB colour of the contour.
        thickness: contour width in pixels; default 1 per 256 pixels of the shorter side.

    Returns:
        (H, W, 3) RGB uint8: ``(1 - alpha) * image + alpha * jet(map)`` with the contour on top.
    """
    import cv2

    img = _as_rgb_uint8(image)
    h, w = img.shape[:2]
    a = _squeeze2d(_to_array(amap, "amap"), "amap").astype(np.float32)
    if a.shape != (h, w):
        a = cv2.resize(a, (w, h), interpolation=cv2.INTER_LINEAR)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    vmin, vmax = float(vmin), float(vmax)
    if not (math.isfinite(vmin) and math.isfinite(vmax)):
        raise ValueError(f"vmin and vmax must be finite, got {vmin}, {vmax}")
    a = np.nan_to_num(a, nan=vmin, posinf=vmax, neginf=vmin)
    if vmax > vmin:
        u = np.clip((a - vmin) / (vmax - vmin), 0.0, 1.0)
    else:
        u = (a > vmin).astype(np.float32)
    heat = cv2.applyColorMap((u * 255.0 + 0.5).astype(np.uint8), cv2.COLORMAP_JET)[..., ::-1]  # BGR -> RGB
    out = cv2.addWeighted(img, 1.0 - alpha, np.ascontiguousarray(heat), alpha, 0.0)
    if mask is not None:
        _draw_contour(out, mask, mask_colour, thickness)
    return out


def _draw_contour(out: np.ndarray, mask: Any, colour, thickness: int | None) -> None:
    import cv2

    h, w = out.shape[:2]
    m = _squeeze2d(_to_array(mask, "mask"), "mask")
    m = (m != 0).astype(np.uint8)
    if m.shape != (h, w):
        m = cv2.resize(m, (w, h), interpolation=cv2.INTER_NEAREST)
    if not m.any():
        return
    t = max(1, round(min(h, w) / 256)) if thickness is None else int(thickness)
    # RETR_LIST: holes inside a defect get their outline too
    contours, _ = cv2.findContours(m, cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(out, contours, -1, tuple(int(c) for c in colour), t)


def _png_data_uri(rgb: np.ndarray) -> str:
    import cv2

    ok, buf = cv2.imencode(".png", np.ascontiguousarray(rgb[..., ::-1]))
    if not ok:
        raise ValueError("could not encode a PNG for the report")
    return "data:image/png;base64," + base64.b64encode(buf.tobytes()).decode("ascii")


def _thumb(rgb: np.ndarray) -> np.ndarray:
    import cv2

    h, w = rgb.shape[:2]
    s = _THUMB / max(h, w)
    if s >= 1.0:
        return rgb
    return cv2.resize(rgb, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)


# ----------------------------------------------------------------------------------------------------------
# tiny SVG plotting
# ----------------------------------------------------------------------------------------------------------

_W, _H = 380, 300                  # plot size in px
_ML, _MR, _MT, _MB = 52, 14, 28, 44  # margins: left, right, top, bottom


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1e4 or abs(v) < 1e-3:
        return f"{v:.2g}"
    return f"{v:.3g}"


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About n 'nice' tick values covering [lo, hi]."""
    if not hi > lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw), default=10 * mag)
    first = math.ceil(lo / step - 1e-9) * step
    out, v = [], first
    while v <= hi + 1e-9 * step:
        out.append(0.0 if abs(v) < 1e-12 * step else v)
        v += step
    return out


class _Plot:
    """Maps data coordinates to an SVG canvas with axes, ticks and labels."""

    def __init__(self, title: str, xlim, ylim, xlabel: str, ylabel: str, legend_at: str = "tr"):
        self.x0, self.x1 = map(float, xlim)
        self.y0, self.y1 = map(float, ylim)
        if not self.x1 > self.x0:
            self.x1 = self.x0 + 1.0
        if not self.y1 > self.y0:
            self.y1 = self.y0 + 1.0
        self.parts: list[str] = []
        self.title, self.xlabel, self.ylabel = title, xlabel, ylabel
        self.legend: list[tuple[str, str, str]] = []
        self.legend_at = legend_at  # "tr" | "br" | "bl": the corner the curves leave free

    def px(self, x):
        return _ML + (np.asarray(x, float) - self.x0) / (self.x1 - self.x0) * (_W - _ML - _MR)

    def py(self, y):
        return _H - _MB - (np.asarray(y, float) - self.y0) / (self.y1 - self.y0) * (_H - _MT - _MB)

    def line(self, x, y, colour: str, label: str | None = None, width: float = 2.0, dash: str | None = None):
        x, y = np.asarray(x, float), np.asarray(y, float)
        keep = np.isfinite(x) & np.isfinite(y)
        x, y = x[keep], y[keep]
        if x.size > 4000:  # a plot needs no more points than it has pixels
            idx = np.unique(np.linspace(0, x.size - 1, 4000).round().astype(int))
            x, y = x[idx], y[idx]
        if x.size == 0:
            return
        pts = " ".join(f"{a:.1f},{b:.1f}" for a, b in zip(self.px(x), self.py(y)))
        d = f' stroke-dasharray="{dash}"' if dash else ""
        self.parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="{width}"{d} points="{pts}"/>')
        if label:
            self.legend.append((colour, label, dash or ""))

    def bars(self, edges, counts, colour: str, label: str):
        for a, b, c in zip(edges[:-1], edges[1:], counts):
            if c <= 0:
                continue
            x, x2 = self.px(a), self.px(b)
            y, y0 = self.py(c), self.py(self.y0)
            self.parts.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{max(x2 - x, 0.5):.1f}" '
                              f'height="{y0 - y:.1f}" fill="{colour}" fill-opacity="0.5" stroke="{colour}"/>')
        self.legend.append((colour, label, ""))

    def vline(self, x: float, colour: str, label: str):
        if not (math.isfinite(x) and self.x0 <= x <= self.x1):
            return
        px = self.px(x)
        self.parts.append(f'<line x1="{px:.1f}" x2="{px:.1f}" y1="{_MT}" y2="{_H - _MB}" stroke="{colour}" '
                          f'stroke-width="2" stroke-dasharray="5,3"/>')
        self.legend.append((colour, label, "5,3"))

    def point(self, x: float, y: float, colour: str, label: str):
        if math.isfinite(x) and math.isfinite(y):
            self.parts.append(f'<circle cx="{self.px(x):.1f}" cy="{self.py(y):.1f}" r="4" fill="{colour}"/>')
            self.legend.append((colour, label, "dot"))

    def svg(self) -> str:
        e = html.escape
        out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{_W}" height="{_H}" viewBox="0 0 {_W} {_H}" '
               f'role="img" aria-label="{e(self.title)}" font-family="sans-serif" font-size="11">',
               f'<rect width="{_W}" height="{_H}" fill="white"/>',
               f'<text x="{_W / 2}" y="16" text-anchor="middle" font-size="13" font-weight="bold">'
               f'{e(self.title)}</text>']
        for t in _ticks(self.x0, self.x1):
            x = self.px(t)
            out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{_MT}" y2="{_H - _MB}" stroke="#eee"/>')
            out.append(f'<text x="{x:.1f}" y="{_H - _MB + 14}" text-anchor="middle">{_fmt(t)}</text>')
        for t in _ticks(self.y0, self.y1):
            y = self.py(t)
            out.append(f'<line x1="{_ML}" x2="{_W - _MR}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eee"/>')
            out.append(f'<text x="{_ML - 5}" y="{y + 4:.1f}" text-anchor="end">{_fmt(t)}</text>')
        out.append(f'<rect x="{_ML}" y="{_MT}" width="{_W - _ML - _MR}" height="{_H - _MT - _MB}" '
                   f'fill="none" stroke="#444"/>')
        out.append(f'<text x="{(_ML + _W - _MR) / 2}" y="{_H - 8}" text-anchor="middle">{e(self.xlabel)}</text>')
        out.append(f'<text transform="translate(13,{(_MT + _H - _MB) / 2}) rotate(-90)" text-anchor="middle">'
                   f'{e(self.ylabel)}</text>')
        out.append(f'<clipPath id="c{id(self)}"><rect x="{_ML}" y="{_MT}" width="{_W - _ML - _MR}" '
                   f'height="{_H - _MT - _MB}"/></clipPath><g clip-path="url(#c{id(self)})">')
        out += self.parts
        out.append("</g>")
        n_leg = len(self.legend)
        for i, (colour, label, dash) in enumerate(self.legend):
            y = _MT + 14 + 15 * i if self.legend_at == "tr" else _H - _MB - 8 - 15 * (n_leg - 1 - i)
            x = _ML + 8 if self.legend_at == "bl" else _W - _MR - 150
            if dash == "dot":
                out.append(f'<circle cx="{x + 10}" cy="{y - 4}" r="4" fill="{colour}"/>')
            else:
                d = f' stroke-dasharray="{dash}"' if dash else ""
                out.append(f'<line x1="{x}" x2="{x + 20}" y1="{y - 4}" y2="{y - 4}" stroke="{colour}" '
                           f'stroke-width="3"{d}/>')
            out.append(f'<text x="{x + 25}" y="{y}" paint-order="stroke" stroke="white" stroke-width="3">'
                       f'{e(label)}</text>')
        out.append("</svg>")
        return "\n".join(out)


_CURVE_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")


def learning_curves_svg(runs: list[dict], metrics=("pixel_auroc", "pixel_aupro", "image_auroc"),
                        title: str = "Learning curves") -> str:
    """Test metrics against training steps, one colour per variant (mean over seeds), one line style per metric.

    Args:
        runs: rows of ``fae-fast ablate`` (each with ``variant`` and ``curve``: [{"step": int, metric: float}]).
        metrics: up to three metric names (solid, dashed, dotted).

    Returns:
        A standalone SVG document (str).
    """
    by_variant: dict[str, dict[int, list[dict]]] = {}
    for r in runs:
        for pt in r.get("curve") or ():
            by_variant.setdefault(r["variant"], {}).setdefault(int(pt["step"]), []).append(pt)
    steps = [s for pts in by_variant.values() for s in pts]
    p = _Plot(title, (0, max(steps, default=1)), (0, 1), "training step", "metric (mean over seeds)", legend_at="br")
    dashes = (None, "6,3", "2,3")
    for i, (variant, pts) in enumerate(by_variant.items()):
        colour = _CURVE_COLOURS[i % len(_CURVE_COLOURS)]
        xs = sorted(pts)
        for metric, dash in zip(metrics, dashes):
            ys = [float(np.nanmean([q.get(metric, float("nan")) for q in pts[x]])) for x in xs]
            p.line(xs, ys, colour, f"{variant} {metric}", dash=dash)
    return p.svg()


def _pct(v) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100.0 * float(v):.1f}"


# ----------------------------------------------------------------------------------------------------------
# report sections
# ----------------------------------------------------------------------------------------------------------

def _table_html(result: dict) -> str:
    e = html.escape
    head = "".join(f"<th>{e(t)}</th>" for t in ["defect", "good", "defective", *METRIC_NAMES.values()])
    rows = []
    items = list(result.get("per_defect", {}).items()) + [("overall", result["overall"])]
    for name, r in items:
        cls = ' class="overall"' if name == "overall" and r is result["overall"] else ""
        cells = [f"<td>{e(str(name))}</td>", f"<td>{r.get('n_good', '')}</td>", f"<td>{r.get('n_defective', '')}</td>"]
        cells += [f"<td>{_pct(r.get(k))}</td>" for k in METRIC_NAMES]
        rows.append(f"<tr{cls}>{''.join(cells)}</tr>")
    return (f'<table id="metrics"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'
            f'<p class="note">Percent. Per defect type: that type\'s images plus all good images (MVTec AD '
            f'convention). AU-PRO integrated up to FPR {result.get("fpr_limit", 0.3):g} and normalised.</p>')


def _roc_svg(scores, labels, auroc) -> str:
    p = _Plot("Image-level ROC", (0, 1), (0, 1), "false positive rate", "true positive rate",
              legend_at="br")
    p.line([0, 1], [0, 1], "#999", width=1, dash="4,4")
    if labels.any() and (~labels).any():
        fpr, tpr, _ = roc_curve(scores, labels)
        p.line(fpr, tpr, _DEFECT, f"ROC, AUROC {_pct(auroc)}%")
    return p.svg()


def _pr_svg(scores, labels, f1, thr) -> str:
    p = _Plot("Image-level precision-recall", (0, 1), (0, 1.02), "recall", "precision", legend_at="bl")
    if labels.any():
        prec, rec, _ = pr_curve(scores, labels)
        p.line(rec, prec, _NORMAL, "precision-recall")
        if f1 is not None and math.isfinite(f1):
            pred = scores > thr
            tp = int((pred & labels).sum())
            if pred.any():
                p.point(tp / labels.sum(), tp / pred.sum(), _DEFECT, f"F1max {_pct(f1)}%")
    return p.svg()


def _pro_svg(maps, masks, fpr_limit, aupro, regions=None) -> str:
    p = _Plot(f"PRO curve (FPR <= {fpr_limit:g})", (0, fpr_limit), (0, 1), "false positive rate (pixels)",
              "per-region overlap", legend_at="br")
    if maps is not None and masks is not None and np.any(masks):
        fpr, pro, _ = pro_curve(maps, masks, fpr_limit=fpr_limit, max_points=500, regions=regions)
        p.line(fpr, pro, _DEFECT, f"PRO, AU-PRO {_pct(aupro)}%")
    return p.svg()


def _hist_svg(scores, labels, threshold) -> str:
    finite = scores[np.isfinite(scores)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if threshold is not None and math.isfinite(threshold):
        lo, hi = min(lo, threshold), max(hi, threshold)
    if hi <= lo:
        hi = lo + 1.0
    edges = np.linspace(lo, hi, 31)
    c_norm, _ = np.histogram(scores[~labels], edges)
    c_def, _ = np.histogram(scores[labels], edges)
    p = _Plot("Image scores", (lo, hi), (0, max(1, int(max(c_norm.max(initial=0), c_def.max(initial=0))) * 1.1)),
              "image score", "images")
    p.bars(edges, c_norm, _NORMAL, f"good ({int((~labels).sum())})")
    p.bars(edges, c_def, _DEFECT, f"defective ({int(labels.sum())})")
    if threshold is not None:
        p.vline(float(threshold), "#000", f"threshold {_fmt(float(threshold))}")
    return p.svg()


def _load_image(images, i):
    if images is None:
        return None
    im = images[i]
    if isinstance(im, (str, os.PathLike)):
        import cv2

        arr = cv2.imread(str(im), cv2.IMREAD_COLOR)
        if arr is None:
            raise ValueError(f"could not read image {im}")
        return arr[..., ::-1]
    return im


def _tiles_html(idx, *, scores, labels, maps, masks, images, defect_types, paths, vmin, vmax,
                pixel_threshold, kind: str) -> str:
    e = html.escape
    if len(idx) == 0:
        return f'<p class="note">No {kind}.</p>'
    out = ['<div class="grid">']
    for i in idx:
        amap = maps[i] if maps is not None else None
        img = _load_image(images, i)
        if img is None:
            shape = amap.shape[-2:] if amap is not None else (64, 64)
            img = np.zeros((*shape, 3), np.uint8)
        if amap is None:
            tile = _as_rgb_uint8(img)
        else:
            tile = overlay(img, amap, vmin, vmax, mask=None if masks is None else masks[i])
            if pixel_threshold is not None and math.isfinite(pixel_threshold):
                _draw_contour(tile, np.asarray(amap) > pixel_threshold, _PRED_COLOUR, None)
        name = paths[i] if paths is not None else f"#{i}"
        typ = defect_types[i] if defect_types is not None else ("defective" if labels[i] else "good")
        out.append(f'<figure><img src="{_png_data_uri(_thumb(tile))}" alt="{e(str(name))}">'
                   f'<figcaption><b>{e(str(typ))}</b> score {_fmt(float(scores[i]))}<br>'
                   f'<span class="path">{e(str(name))}</span></figcaption></figure>')
    out.append("</div>")
    return "\n".join(out)


_CSS = """
body { font-family: sans-serif; margin: 24px; color: #222; max-width: 1400px; }
h1 { font-size: 22px; } h2 { font-size: 17px; margin-top: 28px; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #ccc; padding: 4px 10px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
tr.overall td { font-weight: bold; background: #f3f3f3; }
.note { color: #666; font-size: 12px; }
.plots { display: flex; flex-wrap: wrap; gap: 12px; }
.grid { display: flex; flex-wrap: wrap; gap: 10px; }
figure { margin: 0; width: 260px; }
figure img { width: 256px; height: auto; display: block; image-rendering: pixelated; }
figcaption { font-size: 12px; } .path { color: #666; word-break: break-all; }
"""


def write_report(out_dir: str | os.PathLike, result: dict, *, scores: Any, labels: Any, maps: Any = None,
                 masks: Any = None, images: Any = None, defect_types: Sequence[str] | None = None,
                 paths: Sequence[str] | None = None, image_threshold: float | None = None,
                 pixel_threshold: float | None = None, title: str = "fae_fast report", n_worst: int = 8,
                 regions: Any = None) -> Path:
    """Write ``out_dir/report.html``, a single self-contained page (atomically: temp file + ``os.replace``).

    Args:
        out_dir: folder of the report (created if needed).
        result: the dict of :func:`fae_fast.evaluate.evaluate`.
        scores: (N,) image scores; labels: (N,) bool/0-1, True = defective.
        maps: (N, H, W) or (N, 1, H, W) float anomaly maps (None: no PRO curve and no overlays).
        masks: maps-shaped bool ground truth (its contour is drawn in green), or None.
        regions: AU-PRO's regions for the PRO curve, as in :func:`fae_fast.evaluate.evaluate` (give the same).
        images: (N, H, W, 3) RGB uint8 array, or a sequence of per-image arrays (any size, also
            (3, H, W) or float in [0, 1]) or file paths; None draws the maps on black.
        defect_types: (N,) names shown in the captions; paths: (N,) file names shown in the captions.
        image_threshold: marked on the score histogram.
        pixel_threshold: the predicted region (map > threshold) is outlined in white on the overlays.
        title: page title.
        n_worst: how many false positives and false negatives to show.

    Returns:
        Path of the written ``report.html``.
    """
    from .evaluate import _as_binary, _as_scores, _squeeze_maps

    if not isinstance(result, dict) or "overall" not in result:
        raise TypeError("result must be the dict returned by fae_fast.evaluate.evaluate")
    s = _as_scores(scores, "scores").astype(np.float64)
    y = _as_binary(labels, "labels")
    if s.ndim != 1 or s.shape != y.shape:
        raise ValueError(f"scores {s.shape} and labels {y.shape} must both be (N,)")
    n = s.shape[0]
    if n == 0:
        raise ValueError("write_report needs at least one image, got 0 scores")
    m = k = None
    if maps is not None:
        m = _squeeze_maps(_as_scores(maps, "maps"), "maps")
        if m.shape[0] != n:
            raise ValueError(f"maps has {m.shape[0]} images but scores has {n}")
    if masks is not None:
        k = _squeeze_maps(_as_binary(masks, "masks"), "masks")
        if m is None or k.shape != m.shape:
            raise ValueError(f"masks {k.shape} must come with maps of the same shape")
    if regions is not None and k is None:
        raise ValueError("regions needs maps and masks")  # as evaluate() refuses them
    for name, seq in (("images", images), ("defect_types", defect_types), ("paths", paths)):
        if seq is not None and len(seq) != n:
            raise ValueError(f"{name} has {len(seq)} entries but scores has {n}")

    overall = result["overall"]
    fpr_limit = float(result.get("fpr_limit", 0.3))
    e = html.escape
    # one colour scale for all tiles so that they can be compared: from the lowest map value up, with the pixel
    # threshold in the middle of the jet scale (green) when there is one, else up to the highest map value
    if m is not None and m.size:
        vmin = float(np.min(m))
        vmax = float(np.max(m))
        if pixel_threshold is not None and math.isfinite(pixel_threshold) and pixel_threshold > vmin:
            vmax = 2.0 * float(pixel_threshold) - vmin
    else:
        vmin, vmax = 0.0, 1.0

    good_idx = np.flatnonzero(~y)
    bad_idx = np.flatnonzero(y)
    worst_fp = good_idx[np.argsort(-s[good_idx], kind="stable")][:n_worst]
    worst_fn = bad_idx[np.argsort(s[bad_idx], kind="stable")][:n_worst]
    tiles = dict(scores=s, labels=y, maps=m, masks=k, images=images, defect_types=defect_types, paths=paths,
                 vmin=vmin, vmax=vmax, pixel_threshold=pixel_threshold)

    def thr_txt(t):
        return "not set" if t is None else _fmt(float(t))

    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{e(title)}</title>", f"<style>{_CSS}</style></head><body>",
        f"<h1>{e(title)}</h1>",
        f'<p class="note">{now} &middot; {n} images ({len(good_idx)} good, {len(bad_idx)} defective) &middot; '
        f"image threshold {thr_txt(image_threshold)} &middot; pixel threshold {thr_txt(pixel_threshold)}</p>",
        "<h2>Metrics</h2>", _table_html(result),
        "<h2>Curves</h2>", '<div class="plots">',
        _roc_svg(s, y, overall.get("image_auroc")),
        _pr_svg(s, y, overall.get("image_f1max"), overall.get("image_f1_threshold", float("nan"))),
        _pro_svg(m, k, fpr_limit, overall.get("pixel_aupro"), regions),
        _hist_svg(s, y, image_threshold),
        "</div>",
        f'<h2>Worst false positives: highest-scoring good images</h2>'
        f'<p class="note">Jet overlay from map {_fmt(vmin)} (blue) to {_fmt(vmax)} (red); '
        f"green: ground-truth defect; white: map &gt; pixel threshold.</p>",
        _tiles_html(worst_fp, kind="good images", **tiles),
        "<h2>Worst false negatives: lowest-scoring defective images</h2>",
        _tiles_html(worst_fn, kind="defective images", **tiles),
        "</body></html>",
    ]
    out = Path(out_dir) / "report.html"
    return _atomic.write_text(out, "\n".join(parts))
