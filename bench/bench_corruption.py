"""Corruption throughput: the batched :class:`fae_fast.corruption.Corruptor` vs the per-image DRAEM-style loop.

Providers, side by side in one run, each producing corrupted images x~ (B, 3, H, W):

* ``batched_torch`` -- Corruptor with the pure-PyTorch references of elastic_warp / rasterize_strokes;
* ``batched_ext``   -- Corruptor with the C++/CUDA extension ops (skipped when the extension is not loaded);
* ``draem_loop``    -- the common way (DRAEM, Zavrtanik et al. 2021, and its followers): numpy + cv2, one image
  and one occlusion at a time on the host (Perlin blob / polygon / stroke, cv2.remap elastic warp, a rotated
  and jittered patch of another image, beta blend), then one host-to-device copy of the batch.

``torch.compile`` is not a provider: the corruptor takes a ``torch.Generator`` (not traceable) and is a
handful of large launches already.

On CUDA: batch 256 at 256^2 (DESIGN.md target on an H200, unmeasured: >= 20,000 img/s and >= 50x the loop; the
loop runs 32 images, img/s is comparable). On CPU: batch 8 at 128^2 so that ``--benchmark-disable`` stays quick.

Run: ``python -m pytest bench/bench_corruption.py -o python_files='bench_*.py' --benchmark-json=...``.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from bench._common import sync
from fae_fast import _backend
from fae_fast.config import CorruptionConfig
from fae_fast.corruption import Corruptor

CUDA = torch.cuda.is_available()
BATCH, SIZE = (256, 256) if CUDA else (8, 128)
LOOP_BATCH = 32 if CUDA else BATCH
POOL = 64


# ------------------------------------------------------------------------------------------------------------
# the per-image baseline (numpy / cv2), written the way DRAEM-style generators usually are
# ------------------------------------------------------------------------------------------------------------

def _perlin_np(shape, res, rng):
    """DRAEM's rand_perlin_2d_np, generalised to sizes that are not multiples of the grid."""
    H, W = shape
    ry, rx = res
    gh, gw = math.ceil(H / ry) * ry, math.ceil(W / rx) * rx
    d = (gh // ry, gw // rx)
    grid = np.mgrid[0:ry:ry / gh, 0:rx:rx / gw].transpose(1, 2, 0) % 1
    angles = 2 * math.pi * rng.random((ry + 1, rx + 1))
    grads = np.stack((np.cos(angles), np.sin(angles)), axis=-1)

    def tile(s1, s2):
        return np.repeat(np.repeat(grads[s1[0]:s1[1], s2[0]:s2[1]], d[0], axis=0), d[1], axis=1)

    def dot(g, sh):
        return (np.stack((grid[:, :, 0] + sh[0], grid[:, :, 1] + sh[1]), axis=-1) * g).sum(axis=-1)

    n00 = dot(tile([0, -1], [0, -1]), [0, 0])
    n10 = dot(tile([1, None], [0, -1]), [-1, 0])
    n01 = dot(tile([0, -1], [1, None]), [0, -1])
    n11 = dot(tile([1, None], [1, None]), [-1, -1])
    t = 6 * grid ** 5 - 15 * grid ** 4 + 10 * grid ** 3
    n0 = n00 + t[:, :, 0:1][..., 0] * (n10 - n00)
    n1 = n01 + t[:, :, 0:1][..., 0] * (n11 - n01)
    return (math.sqrt(2) * ((1 - t[:, :, 1]) * n0 + t[:, :, 1] * n1))[:H, :W]


def _draem_one(img, pool, rng, cfg: CorruptionConfig):
    """Corrupt one (H, W, 3) float32 image in place of a copy; returns x~."""
    import cv2

    H, W = img.shape[:2]
    out = img.copy()
    if rng.random() >= cfg.p:
        return out
    mhw = min(H, W)
    w = np.array([cfg.w_perlin, cfg.w_polygon, cfg.w_stroke], np.float64)
    for _ in range(int(rng.integers(cfg.k_min, cfg.k_max + 1))):
        kind = rng.choice(3, p=w / w.sum())
        if kind == 0:
            s = 2 ** int(rng.integers(1, 6))
            noise = _perlin_np((H, W), (s, s), rng)
            rot = cv2.getRotationMatrix2D((W / 2, H / 2), float(rng.uniform(-90, 90)), 1.0)
            noise = cv2.warpAffine(noise, rot, (W, H), borderMode=cv2.BORDER_REFLECT)
            cov = rng.uniform(*cfg.perlin_coverage)
            m = (noise > np.quantile(noise, 1 - cov)).astype(np.float32)
        elif kind == 1:
            m = np.zeros((H, W), np.float32)
            r = rng.uniform(*cfg.polygon_size) * mhw
            c = (int(rng.uniform(0, W)), int(rng.uniform(0, H)))
            if rng.random() < 0.5:
                cv2.ellipse(m, c, (max(1, int(r)), max(1, int(r * rng.uniform(0.3, 1)))),
                            float(rng.uniform(0, 360)), 0, 360, 1.0, -1, cv2.LINE_AA)
            else:
                ang = np.sort(rng.uniform(0, 2 * np.pi, 7))
                rad = r * rng.uniform(0.4, 1.0, 7)
                pts = np.stack((c[0] + rad * np.cos(ang), c[1] + rad * np.sin(ang)), 1).astype(np.int32)
                cv2.fillPoly(m, [pts], 1.0, cv2.LINE_AA)
        else:
            m = np.zeros((H, W), np.float32)
            p0 = rng.uniform((0, 0), (W, H))
            L = rng.uniform(*cfg.stroke_length) * max(H, W)
            a = rng.uniform(0, 2 * np.pi)
            d, perp = np.array([np.cos(a), np.sin(a)]), np.array([-np.sin(a), np.cos(a)])
            ctrl = [p0, p0 + d * L / 3 + perp * rng.uniform(-0.4, 0.4) * L,
                    p0 + d * 2 * L / 3 + perp * rng.uniform(-0.4, 0.4) * L, p0 + d * L]
            t = np.linspace(0, 1, 16)[:, None]
            pts = ((1 - t) ** 3 * ctrl[0] + 3 * (1 - t) ** 2 * t * ctrl[1] + 3 * (1 - t) * t ** 2 * ctrl[2]
                   + t ** 3 * ctrl[3])
            cv2.polylines(m, [pts.astype(np.int32)], False, 1.0, max(1, int(rng.uniform(*cfg.stroke_width))),
                          cv2.LINE_AA)
        # elastic deformation: Gaussian-smoothed random displacement, cv2.remap
        alpha = rng.uniform(*cfg.elastic_alpha) * mhw
        sig = rng.uniform(*cfg.elastic_smoothness) * mhw
        dx = cv2.GaussianBlur(rng.standard_normal((H, W)).astype(np.float32), (0, 0), sig)
        dy = cv2.GaussianBlur(rng.standard_normal((H, W)).astype(np.float32), (0, 0), sig)
        scale = alpha / max(1e-6, float(np.sqrt((dx ** 2 + dy ** 2).mean() / 2)))
        gx, gy = np.meshgrid(np.arange(W, dtype=np.float32), np.arange(H, dtype=np.float32))
        m = cv2.remap(m, gx + dx * scale, gy + dy * scale, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
        if rng.random() < cfg.soft_edge:
            m = cv2.GaussianBlur(m, (0, 0), rng.uniform(0.5, 1.5))
        # texture: a rotated, jittered patch of another image
        src = pool[int(rng.integers(len(pool)))]
        rot = cv2.getRotationMatrix2D((W / 2, H / 2), 90.0 * int(rng.integers(4)) + rng.uniform(-15, 15),
                                      rng.uniform(0.75, 1.25))
        rot[:, 2] += rng.uniform(-W / 2, W / 2), rng.uniform(-H / 2, H / 2)
        tex = cv2.warpAffine(src, rot, (W, H), borderMode=cv2.BORDER_REFLECT).astype(np.float32) / 255.0
        j = cfg.color_jitter
        tex = np.clip((tex - tex.mean()) * (1 + rng.uniform(-j, j)) + tex.mean() + rng.uniform(-j, j), 0, 1)
        beta = rng.uniform(cfg.beta_min, cfg.beta_max)
        bm = (beta * m)[:, :, None]
        out = (1 - bm) * out + bm * tex
    return out


def draem_loop(x_host, pool_host, rng, cfg, device):
    """Per-image loop over a host batch (B, H, W, 3) float32, then one copy to the device: (B, 3, H, W)."""
    out = np.stack([_draem_one(img, pool_host, rng, cfg) for img in x_host])
    return torch.from_numpy(out).permute(0, 3, 1, 2).to(device)


# ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("provider", ["batched_torch", "batched_ext", "draem_loop"])
def test_corruption_throughput(benchmark, bench_info, device, provider):
    cfg = CorruptionConfig()
    H = W = SIZE
    g = torch.Generator(device=device).manual_seed(0)
    pool = torch.randint(0, 256, (POOL, 3, H, W), dtype=torch.uint8, device=device)
    if provider == "draem_loop":
        batch = LOOP_BATCH
        x_host = np.random.default_rng(0).random((batch, H, W, 3), dtype=np.float32)
        pool_host = [p.permute(1, 2, 0).cpu().numpy() for p in pool]
        rng = np.random.default_rng(0)

        def run():
            out = draem_loop(x_host, pool_host, rng, cfg, device)
            sync(device)
            return out
    else:
        batch = BATCH
        backend = "torch" if provider == "batched_torch" else "ext"
        if backend == "ext":
            try:
                _backend.resolve("elastic_warp", "ext", torch.device(device))
            except _backend.BackendUnavailable as exc:
                pytest.skip(f"extension unavailable: {exc}")
            if not _backend._ext_supports(torch.device(device)):
                pytest.skip(f"the extension has no kernels for {device}")
        cor = Corruptor(cfg, image_size=(H, W), device=device, backend=backend)
        x = torch.rand(batch, 3, H, W, device=device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cor.corrupt(x, g, pool)  # warm-up: caches, extension load
        sync(device)

        def run():
            out = cor.corrupt(x, g, pool)
            sync(device)
            return out

    out = benchmark(run)
    assert out.shape == (batch, 3, H, W) and torch.isfinite(out).all()
    bench_info.update(provider=provider, batch=batch, size=SIZE, device=str(device))
    if benchmark.stats is not None:
        median = benchmark.stats.stats.median
        bench_info.update(median_ms=median * 1e3, img_per_s=batch / median)
