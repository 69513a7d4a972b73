"""A synthetic anomaly-detection dataset in MVTec AD layout, for tests and the demo.

The product is one family of **brushed, machined metal surfaces**: every image differs (random brushing phase,
orientation jitter, streak length, faint periodic machining marks with random period and phase, a lighting
gradient and vignette, a slight colour tint, sensor noise) but all come from one distribution, so a detector has
to learn a texture rather than memorise a picture. Test images carry defects of several kinds and sizes:

============== ============================================================================================
``scratch``    thin (1-3 px) curved cubic-Bezier lines across the grain, darker or brighter than the surface
``stain``      soft-edged blobs (unions of blurred ellipses) with a colour change (rust, oil, residue)
``crack``      thin dark branching polylines (a random walk with 1-3 side branches)
``hole``       small dark disks (pits) with a bright rim, one to three per image
``contamination`` foreign texture patches (fibres/dust of another colour) inside a random polygon
============== ============================================================================================

Ground-truth masks come from the same rasterisation that draws the defect: hard-edged defects are exactly the
drawn pixels; a soft-edged stain is labelled where its edge profile is at least one half (the blob's own
outline), as MVTec-style annotations do.

Layout written under ``root``::

    train/good/000.png ...            normal images
    test/good/000.png ...             normal test images
    test/<defect>/000.png ...         defective test images
    ground_truth/<defect>/000_mask.png   uint8 masks, 255 = defect

Everything is numpy + OpenCV, deterministic per ``seed`` (each image has its own seed derived from
``(seed, split, index)``), about 1-2 s for the default size on one core.

Example:
    >>> from fae_fast.synthetic import make_dataset
    >>> root = make_dataset("/tmp/fae_demo", n_train=200, seed=0)   # doctest: +SKIP
    >>> sorted(p.name for p in (root / "test").iterdir())           # doctest: +SKIP
    ['contamination', 'crack', 'good', 'hole', 'scratch', 'stain']
"""
from __future__ import annotations

import math
import shutil
from pathlib import Path

import cv2
import numpy as np

from ._atomic import write_png

__all__ = ["DEFECT_TYPES", "make_dataset", "surface", "add_defect"]

DEFECT_TYPES = ("scratch", "stain", "crack", "hole", "contamination")
_SPLITS = {"train": 0, "test_good": 1}  # defect types get 2 + their index
_SHIFT = 4  # OpenCV sub-pixel drawing: coordinates are fixed point with 4 fractional bits
_ONE = 1 << _SHIFT


# --------------------------------------------------------------------------------------------------------------
# the normal surface


def _line_kernel(length: int, angle_deg: float) -> np.ndarray:
    """A normalised line (motion-blur) kernel of ``length`` pixels at ``angle_deg`` (0 = horizontal)."""
    k = np.zeros((length, length), np.float32)
    k[length // 2, :] = 1.0
    rot = cv2.getRotationMatrix2D(((length - 1) / 2.0, (length - 1) / 2.0), angle_deg, 1.0)
    k = cv2.warpAffine(k, rot, (length, length), flags=cv2.INTER_LINEAR)
    return k / k.sum()


def _unit(a: np.ndarray) -> np.ndarray:
    return (a - a.mean()) / (a.std() + 1e-6)


def surface(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    """One clean brushed-metal image, float32 (H, W, 3) around 0.5 (before sensor noise).

    Args:
        rng: the image's random generator.
        size: (H, W).
    """
    H, W = size
    pad = 24  # filter on a padded field so the streaks do not bend or fade at the image border
    angle = rng.normal(0.0, 4.0)  # brushing orientation jitter (degrees)
    length = int(rng.integers(10, 20)) * 2 + 1
    streaks = cv2.filter2D(rng.standard_normal((H + 2 * pad, W + 2 * pad), dtype=np.float32), -1,
                           _line_kernel(length, angle), borderType=cv2.BORDER_REFLECT)[pad:-pad, pad:-pad]
    grain = cv2.GaussianBlur(rng.standard_normal((H, W), dtype=np.float32), (0, 0), 0.8,
                             borderType=cv2.BORDER_REFLECT)
    ys, xs = np.mgrid[0:H, 0:W].astype(np.float32)
    # faint periodic machining marks across the brushing direction, random period and phase
    period = rng.uniform(5.0, 9.0)
    phi = math.radians(angle + 90.0 + rng.normal(0.0, 3.0))
    marks = np.sin(2 * np.pi * (xs * math.cos(phi) + ys * math.sin(phi)) / period + rng.uniform(0, 2 * np.pi))
    # lighting: a linear ramp in a random direction and an off-centre vignette
    g = rng.uniform(0, 2 * np.pi)
    ramp = ((xs / max(W - 1, 1) - 0.5) * math.cos(g) + (ys / max(H - 1, 1) - 0.5) * math.sin(g))
    cy, cx = rng.uniform(0.3, 0.7) * H, rng.uniform(0.3, 0.7) * W
    vignette = ((ys - cy) ** 2 + (xs - cx) ** 2) / float(H * H + W * W)
    lum = (rng.uniform(0.45, 0.58) + 0.055 * _unit(streaks) + 0.02 * _unit(grain) + 0.012 * marks
           + rng.uniform(0.04, 0.1) * ramp - rng.uniform(0.0, 0.25) * vignette)
    tint = np.array([1.0, 1.0, 1.0], np.float32) + rng.normal(0.0, 0.015, 3).astype(np.float32)
    tint[2] += 0.03  # a cool, slightly blue steel
    return (lum[..., None] * tint).astype(np.float32)


# --------------------------------------------------------------------------------------------------------------
# defects: each draws into img (float32 H x W x 3, modified in place) and returns its bool mask


def _bezier(ctrl: np.ndarray, samples: int = 48) -> np.ndarray:
    t = np.linspace(0.0, 1.0, samples, dtype=np.float64)[:, None]
    u = 1.0 - t
    return u ** 3 * ctrl[0] + 3 * u * u * t * ctrl[1] + 3 * u * t * t * ctrl[2] + t ** 3 * ctrl[3]


def _fixed(pts: np.ndarray) -> np.ndarray:
    return np.round(np.asarray(pts) * _ONE).astype(np.int32).reshape(-1, 1, 2)


def _scratch(img, rng):
    H, W = img.shape[:2]
    m = np.zeros((H, W), np.uint8)
    L = rng.uniform(0.3, 0.75) * min(H, W)
    # handling scratches cross the grain: at least 20 degrees off the brushing direction, otherwise a long thin
    # line is indistinguishable from a brushing streak even to a person
    a = rng.uniform(np.radians(20.0), np.radians(160.0))
    c = np.array([rng.uniform(0.2, 0.8) * W, rng.uniform(0.2, 0.8) * H])
    d = np.array([math.cos(a), math.sin(a)]) * L / 2
    n = np.array([-d[1], d[0]]) / max(np.linalg.norm(d), 1e-6)
    bend = rng.uniform(-0.25, 0.25, 2) * L
    ctrl = np.stack([c - d, c - d / 3 + n * bend[0], c + d / 3 + n * bend[1], c + d])
    pts = _bezier(ctrl)
    width = int(rng.choice([1, 2, 2, 3]))
    # OpenCV's thickness t draws about 2t - 1 px: 1 -> 1 px, 2 -> 3 px; 2 px is a 1 px line drawn twice,
    # the second copy one pixel across (along the axis closer to the curve's normal)
    cv2.polylines(m, [_fixed(pts)], False, 255, thickness=1 if width < 3 else 2, lineType=cv2.LINE_8,
                  shift=_SHIFT)
    if width == 2:
        off = np.array([1.0, 0.0]) if abs(n[0]) > abs(n[1]) else np.array([0.0, 1.0])
        cv2.polylines(m, [_fixed(pts + off)], False, 255, thickness=1, lineType=cv2.LINE_8, shift=_SHIFT)
    mask = m > 0
    # the depth of a scratch varies along it; darker (groove) or brighter (specular edge)
    along = cv2.GaussianBlur(rng.uniform(0.75, 1.0, (H, W)).astype(np.float32), (0, 0), 6)
    sign = -1.0 if rng.random() < 0.6 else 1.0
    # a 1 px line loses most of its energy to the map's box filters: it needs a few texture stds of contrast
    amp = rng.uniform(0.18, 0.35)
    img[mask] += (sign * amp * along[mask] / along[mask].max())[:, None]
    return mask


def _stain(img, rng):
    H, W = img.shape[:2]
    s = min(H, W)
    cx, cy = rng.uniform(0.15, 0.85) * W, rng.uniform(0.15, 0.85) * H
    blob = np.zeros((H, W), np.uint8)
    r0 = rng.uniform(0.04, 0.14) * s
    for _ in range(int(rng.integers(2, 5))):
        ox, oy = rng.normal(0, 0.5 * r0, 2)
        ax = (max(1.5, r0 * rng.uniform(0.6, 1.2)), max(1.5, r0 * rng.uniform(0.4, 1.0)))
        cv2.ellipse(blob, (int(round((cx + ox) * _ONE)), int(round((cy + oy) * _ONE))),
                    (int(round(ax[0] * _ONE)), int(round(ax[1] * _ONE))), float(rng.uniform(0, 180)), 0, 360,
                    255, -1, cv2.LINE_8, _SHIFT)
    edge = rng.uniform(1.0, 0.25 * r0 + 1.0)
    profile = cv2.GaussianBlur(blob.astype(np.float32) / 255.0, (0, 0), edge, borderType=cv2.BORDER_CONSTANT)
    mask = profile >= 0.5
    kind = rng.integers(3)
    if kind == 0:    # rust: brown-orange
        colour = np.array([0.55, 0.33, 0.16]) * rng.uniform(0.8, 1.15)
    elif kind == 1:  # oil: dark, slightly warm
        colour = np.array([0.25, 0.23, 0.2]) * rng.uniform(0.8, 1.2)
    else:            # dried residue: pale yellowish
        colour = np.array([0.72, 0.68, 0.5]) * rng.uniform(0.9, 1.1)
    opacity = rng.uniform(0.45, 0.8)
    alpha = (opacity * profile)[..., None]
    # keep the surface's texture under the stain (a stain tints, it does not paint over)
    shade = img / max(float(img.mean()), 1e-3)
    img[:] = (1 - alpha) * img + alpha * (colour.astype(np.float32) * shade)
    return mask


def _crack(img, rng):
    H, W = img.shape[:2]
    s = min(H, W)
    m = np.zeros((H, W), np.uint8)
    p = np.array([rng.uniform(0.2, 0.8) * W, rng.uniform(0.2, 0.8) * H])
    a = rng.uniform(0, 2 * np.pi)
    main = [p.copy()]
    for _ in range(int(rng.integers(8, 16))):
        a += rng.normal(0, 0.45)
        p = p + rng.uniform(0.02, 0.045) * s * np.array([math.cos(a), math.sin(a)])
        main.append(p.copy())
    main = np.array(main)
    paths = [main]
    for _ in range(int(rng.integers(1, 4))):
        q = main[int(rng.integers(1, len(main) - 1))].copy()
        b = a + rng.choice([-1, 1]) * rng.uniform(0.5, 1.2) + rng.normal(0, 0.3)
        br = [q.copy()]
        for _ in range(int(rng.integers(3, 7))):
            b += rng.normal(0, 0.4)
            q = q + rng.uniform(0.015, 0.035) * s * np.array([math.cos(b), math.sin(b)])
            br.append(q.copy())
        paths.append(np.array(br))
    main_w = int(rng.choice([1, 2]))
    for i, path in enumerate(paths):
        cv2.polylines(m, [_fixed(path)], False, 255, thickness=main_w if i == 0 else 1, lineType=cv2.LINE_8,
                      shift=_SHIFT)
    mask = m > 0
    img[mask] *= rng.uniform(0.35, 0.6)  # a crack is a shadowed gap: multiplicative darkening
    return mask


def _hole(img, rng):
    H, W = img.shape[:2]
    s = min(H, W)
    mask = np.zeros((H, W), bool)
    for _ in range(int(rng.integers(1, 4))):
        r = rng.uniform(0.02, 0.05) * s
        rim = rng.uniform(0.8, 1.8)
        c = (int(round(rng.uniform(0.1, 0.9) * W * _ONE)), int(round(rng.uniform(0.1, 0.9) * H * _ONE)))
        outer = np.zeros((H, W), np.uint8)
        inner = np.zeros((H, W), np.uint8)
        cv2.circle(outer, c, int(round((r + rim) * _ONE)), 255, -1, cv2.LINE_8, _SHIFT)
        cv2.circle(inner, c, int(round(r * _ONE)), 255, -1, cv2.LINE_8, _SHIFT)
        o, i = outer > 0, inner > 0
        img[o & ~i] = np.minimum(img[o & ~i] + rng.uniform(0.12, 0.25), 1.0)  # raised bright rim
        img[i] *= rng.uniform(0.15, 0.4)                                     # dark pit
        mask |= o
    return mask


def _contamination(img, rng):
    H, W = img.shape[:2]
    s = min(H, W)
    r = rng.uniform(0.05, 0.12) * s
    c = np.array([rng.uniform(0.15, 0.85) * W, rng.uniform(0.15, 0.85) * H])
    k = int(rng.integers(6, 11))
    ang = np.sort(rng.uniform(0, 2 * np.pi, k))
    rad = r * rng.uniform(0.55, 1.0, k)
    poly = c + np.stack([np.cos(ang) * rad, np.sin(ang) * rad], 1)
    m = np.zeros((H, W), np.uint8)
    cv2.fillPoly(m, [_fixed(poly)], 255, cv2.LINE_8, shift=_SHIFT)
    mask = m > 0
    # foreign texture: short random fibres / dust specks of another colour, on an isotropic mottled base
    fib = cv2.GaussianBlur(rng.standard_normal((H, W), dtype=np.float32), (0, 0), rng.uniform(0.8, 2.0))
    # plausible dirt rather than a signal colour: the surface's grey made darker or lighter, with a mild cast
    grey = float(img[mask].mean())
    colour = (grey * rng.choice([rng.uniform(0.45, 0.75), rng.uniform(1.25, 1.5)])
              + rng.uniform(-0.06, 0.06, 3)).astype(np.float32)
    patch = colour + 0.08 * _unit(fib)[..., None]
    alpha = rng.uniform(0.7, 1.0)
    img[mask] = (1 - alpha) * img[mask] + alpha * patch[mask]
    return mask


_DEFECTS = {"scratch": _scratch, "stain": _stain, "crack": _crack, "hole": _hole, "contamination": _contamination}


def add_defect(img: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """Draw one defect of ``kind`` into ``img`` (float32 (H, W, 3), modified in place); return its bool mask.

    Draws again (with the next random numbers) in the rare case the defect falls outside the image.
    """
    if kind not in _DEFECTS:
        raise ValueError(f"unknown defect type {kind!r}; known: {list(_DEFECTS)}")
    for _ in range(20):
        trial = img.copy()
        mask = _DEFECTS[kind](trial, rng)
        if mask.any():
            img[:] = trial
            return mask
    raise RuntimeError(f"could not place a {kind!r} defect on a {img.shape[1]}x{img.shape[0]} image")


def _finish(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Sensor noise (after the defects, which are photographed too), clip, quantise to uint8 RGB."""
    img = img + rng.normal(0.0, 0.012, img.shape).astype(np.float32)
    return np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8)


def _rng(seed: int, split: int, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(split), int(index)]))


def make_dataset(root, *, n_train: int = 200, n_test_good: int = 40, n_test_defect: int = 20,
                 size: tuple[int, int] = (128, 128), seed: int = 0,
                 defects: tuple[str, ...] = DEFECT_TYPES, overwrite: bool = False) -> Path:
    """Write the synthetic dataset in MVTec AD layout under ``root`` and return ``Path(root)``.

    Args:
        root: category folder to create; it must be empty or missing unless ``overwrite``.
        n_train: normal training images.
        n_test_good: normal test images.
        n_test_defect: defective test images *per defect type*.
        size: (H, W) of every image.
        seed: the whole dataset is a function of ``seed`` (and the counts and size).
        defects: defect types to generate, a subset of :data:`DEFECT_TYPES`.
        overwrite: replace the ``train``, ``test`` and ``ground_truth`` folders of an existing dataset in
            ``root`` (files elsewhere in ``root`` are left alone), so that no image of an earlier run remains.

    Returns:
        ``Path(root)``.
    """
    try:
        H, W = (int(v) for v in size)
    except (TypeError, ValueError):
        raise ValueError(f"size must be (H, W), got {size!r}") from None
    if H < 16 or W < 16:
        raise ValueError(f"size must be at least 16 x 16, got {size!r}")
    for name, n in (("n_train", n_train), ("n_test_good", n_test_good), ("n_test_defect", n_test_defect)):
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise ValueError(f"{name} must be a non-negative int, got {n!r}")
    unknown = [d for d in defects if d not in _DEFECTS]
    if unknown:
        raise ValueError(f"unknown defect types {unknown}; known: {list(DEFECT_TYPES)}")
    root = Path(root)
    if root.exists() and any(root.iterdir()):
        if not overwrite:
            raise ValueError(f"{root} is not empty: pass overwrite=True to replace a dataset written there")
        for sub in ("train", "test", "ground_truth"):
            shutil.rmtree(root / sub, ignore_errors=True)
    width = max(3, len(str(max(n_train, n_test_good, n_test_defect, 1) - 1)))
    jobs = [("train/good", None, _SPLITS["train"], n_train), ("test/good", None, _SPLITS["test_good"], n_test_good)]
    jobs += [(f"test/{d}", d, 2 + DEFECT_TYPES.index(d), n_test_defect) for d in defects]
    for folder, kind, split, count in jobs:
        out = root / folder
        out.mkdir(parents=True, exist_ok=True)
        if kind is not None:
            (root / "ground_truth" / kind).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            rng = _rng(seed, split, i)
            img = surface(rng, (H, W))
            stem = f"{i:0{width}d}"
            mask = add_defect(img, kind, rng) if kind is not None else None
            # atomically, the image before its mask: an interrupted run never leaves a mask without its image
            write_png(out / f"{stem}.png", _finish(img, rng))
            if mask is not None:
                write_png(root / "ground_truth" / kind / f"{stem}_mask.png", mask.astype(np.uint8) * 255)
    return root


def main(argv=None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description="write the fae_fast synthetic dataset (MVTec layout)")
    ap.add_argument("root")
    ap.add_argument("--n-train", type=int, default=200)
    ap.add_argument("--n-test-good", type=int, default=40)
    ap.add_argument("--n-test-defect", type=int, default=20)
    ap.add_argument("--size", type=int, nargs=2, default=(128, 128), metavar=("H", "W"))
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    print(make_dataset(a.root, n_train=a.n_train, n_test_good=a.n_test_good, n_test_defect=a.n_test_defect,
                       size=tuple(a.size), seed=a.seed))


if __name__ == "__main__":
    main()
