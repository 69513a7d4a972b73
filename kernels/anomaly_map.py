"""Fused anomaly map: per-pixel error, n passes of a k x k valid-count mean filter, per-image max.

The error is the channel-mean squared error, or with ``error="gradient"`` the channel mean of the squared Sobel
gradient of the residual, or their weighted sum ("squared+gradient"; :func:`fae_fast.reference.error_image`):
8 (9) shifted loads per channel instead of one, the residual replicated at the border by clamping the indices.

Why one matrix product replaces the n passes
--------------------------------------------
One pass of the valid-count k x k box (``avg_pool2d(count_include_pad=False)``) is separable and *linear*: its
window is a rectangle clipped to the image, so the count is the product of the row count and the column count
and ``box(E) = A_H @ E @ A_W^T`` with ``A_S[i, i'] = 1 / cnt_S(i)`` for ``|i - i'| <= k // 2`` (both inside
``[0, S)``), ``cnt_S(i)`` the number of such ``i'``. Out-of-image pixels are never read (they are not columns
of ``A``) and every pass renormalises by its own counts, which is exactly the reference's border rule at every
pass, not only the first. n passes are therefore ``L @ E @ R`` with ``L = A_H^n`` (H x H) and
``R = (A_W^n)^T`` (W x W), both banded with half-width ``n * (k // 2)`` (the tile halo). They depend only on
(H, W, k, n): built once in float64 on the host side, rounded to float32, cached.

The kernel computes an output tile as ``L[tile, halo rows] @ E[halo rows, halo cols] @ R[halo cols, tile]``,
E computed on the fly from x and r block by block; no intermediate map ever leaves the chip, the cost grows with
the halo n * (k // 2) (not with the passes as such), and any halo (n = 8, k = 31: 120 pixels) is just a longer
loop: no fallback path is needed. With smoothing, a non-finite error (inf, nan) is clamped to 1e30 before the
products (the reference would spread inf and nan instead); without smoothing the map is the raw error.

Registered as ``fae_fast_triton::anomaly_map`` with ``torch.library.triton_op``.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from fae_fast.config import GRADIENT_WEIGHT, MAP_ERRORS
from fae_fast.kernels._common import check_device, interpreting, to_f32

__all__ = ["anomaly_map_triton"]

# GPU tile: 64 x 64 outputs with a K step of 32 (tl.dot needs every dim >= 16). At n=4, k=7 the halo is 12 px, so
# a tile reads a 96 x 96 block of x and r (from L2 for the parts its neighbours also read) and does ~240
# multiply-adds per output pixel; "tf32x3" runs them on tensor cores with float32 accuracy (three tf32 products,
# error ~2**-22 relative), where plain "ieee" float32 falls back to FMA loops. 8 warps: ptxas (sm_90) gives this
# tile 254 registers per thread at 4 warps and 167 at 8. Not tuned on a GPU yet. The interpreter ignores the
# precision and multiplies in float32; small tiles keep it to a few programs per test image.
_GPU_CFG = dict(TH=64, TW=64, BK=32, num_warps=8)
_INTERP_CFG = dict(TH=16, TW=16, BK=16, num_warps=1)
_PRECISION = "tf32x3"


@triton.jit
def _residual_at(x_ptr, r_ptr, b, c, rows, cols, di: tl.constexpr, dj: tl.constexpr, H, W,
                 sxb, sxc, sxh, sxw, srb, src, srh, srw):
    """(r - x)[b, c] at (rows + di, cols + dj), indices clamped into the image (replicate border), float32."""
    ri = tl.minimum(tl.maximum(rows + di, 0), H - 1)
    cj = tl.minimum(tl.maximum(cols + dj, 0), W - 1)
    x = to_f32(tl.load(x_ptr + b * sxb + c * sxc + ri[:, None] * sxh + cj[None, :] * sxw))
    r = tl.load(r_ptr + b * srb + c * src + ri[:, None] * srh + cj[None, :] * srw).to(tl.float32)
    return r - x


@triton.jit
def _error_block(x_ptr, r_ptr, b, rows, cols, C, H, W, sxb, sxc, sxh, sxw, srb, src, srh, srw,
                 ERROR: tl.constexpr, GW: tl.constexpr):
    """The error on a (len(rows), len(cols)) block in float32, 0 outside the image. ``ERROR``: 0 squared,
    1 squared Sobel gradient, 2 squared + GW * gradient (the index in ``MAP_ERRORS``)."""
    inside = (rows[:, None] >= 0) & (rows[:, None] < H) & (cols[None, :] >= 0) & (cols[None, :] < W)
    acc = tl.zeros((rows.shape[0], cols.shape[0]), dtype=tl.float32)
    if ERROR > 0:
        for c in range(C):
            nw = _residual_at(x_ptr, r_ptr, b, c, rows, cols, -1, -1, H, W, sxb, sxc, sxh, sxw, srb, src, srh, srw)
            nn = _residual_at(x_ptr, r_ptr, b, c, rows, cols, -1, 0, H, W, sxb, sxc, sxh, sxw, srb, src, srh, srw)
            ne = _residual_at(x_ptr, r_ptr, b, c, rows, cols, -1, 1, H, W, sxb, sxc, sxh, sxw, srb, src, srh, srw)
            ww = _residual_at(x_ptr, r_ptr, b, c, rows, cols, 0, -1, H, W, sxb, sxc, sxh, sxw, srb, src, srh, srw)
            ee = _residual_at(x_ptr, r_ptr, b, c, rows, cols, 0, 1, H, W, sxb, sxc, sxh, sxw, srb, src, srh, srw)
            sw = _residual_at(x_ptr, r_ptr, b, c, rows, cols, 1, -1, H, W, sxb, sxc, sxh, sxw, srb, src, srh, srw)
            ss = _residual_at(x_ptr, r_ptr, b, c, rows, cols, 1, 0, H, W, sxb, sxc, sxh, sxw, srb, src, srh, srw)
            se = _residual_at(x_ptr, r_ptr, b, c, rows, cols, 1, 1, H, W, sxb, sxc, sxh, sxw, srb, src, srh, srw)
            gx = (ne + 2.0 * ee + se - nw - 2.0 * ww - sw) * 0.125
            gy = (sw + 2.0 * ss + se - nw - 2.0 * nn - ne) * 0.125
            if ERROR == 1:
                acc += gx * gx + gy * gy
            else:
                dc = _residual_at(x_ptr, r_ptr, b, c, rows, cols, 0, 0, H, W, sxb, sxc, sxh, sxw, srb, src, srh,
                                  srw)
                acc += dc * dc + GW * (gx * gx + gy * gy)
        acc = tl.where(inside, acc, 0.0)
    else:
        xo = b * sxb + rows[:, None] * sxh + cols[None, :] * sxw
        ro = b * srb + rows[:, None] * srh + cols[None, :] * srw
        for c in range(C):
            x = to_f32(tl.load(x_ptr + xo + c * sxc, mask=inside, other=0))
            r = tl.load(r_ptr + ro + c * src, mask=inside, other=0).to(tl.float32)
            d = r - x
            acc += d * d
    return acc / C


@triton.jit
def _anomaly_map_kernel(x_ptr, r_ptr, lh_ptr, rw_ptr, map_ptr, score_ptr, C, H, W, HALO,
                        sxb, sxc, sxh, sxw, srb, src, srh, srw,
                        SMOOTH: tl.constexpr, ERROR: tl.constexpr, GW: tl.constexpr, TH: tl.constexpr,
                        TW: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr):
    """map[b, tile] = L[tile, :] @ E @ R[:, tile] (E the error block);  score[b] = max over the image.

    Memory traffic: reads x and r once per tile plus the halo (1.4-2x at n=4, k=7, mostly L2 hits; DRAM sees
    them about once), reads the two float32 band matrices (L2-resident), writes one float32 per pixel and one
    atomic max per tile. Grid: (W tiles, H tiles, B).
    """
    pid_w = tl.program_id(0)
    pid_h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    i0 = pid_h * TH
    j0 = pid_w * TW
    oi = i0 + tl.arange(0, TH)
    oj = j0 + tl.arange(0, TW)
    if SMOOTH:
        acc = tl.zeros((TH, TW), dtype=tl.float32)
        a_lo = tl.maximum(i0 - HALO, 0)
        a_hi = tl.minimum(i0 + TH + HALO, H)
        c_lo = tl.maximum(j0 - HALO, 0)
        c_hi = tl.minimum(j0 + TW + HALO, W)
        for a in range(a_lo, a_hi, BK):
            ra = a + tl.arange(0, BK)
            t = tl.zeros((BK, TW), dtype=tl.float32)  # rows ra of E @ R[:, tile]: horizontally smoothed
            for cc in range(c_lo, c_hi, BK):
                cb = cc + tl.arange(0, BK)
                e = _error_block(x_ptr, r_ptr, b, ra, cb, C, H, W, sxb, sxc, sxh, sxw, srb, src, srh, srw,
                                 ERROR, GW)
                # the band matrices are mostly exact zeros and inf * 0 = nan inside a dot: bound non-finite
                # errors (an fp16 overflow, a diverged model) to 1e30 so that they stay local and huge
                e = tl.where(e == e, tl.minimum(e, 1e30), 1e30)
                rw = tl.load(rw_ptr + cb[:, None] * W + oj[None, :], mask=(cb[:, None] < W) & (oj[None, :] < W),
                             other=0.0)
                t = tl.dot(e, rw, t, input_precision=PRECISION)
            lh = tl.load(lh_ptr + oi[:, None] * H + ra[None, :], mask=(oi[:, None] < H) & (ra[None, :] < H),
                         other=0.0)
            acc = tl.dot(lh, t, acc, input_precision=PRECISION)
    else:
        acc = _error_block(x_ptr, r_ptr, b, oi, oj, C, H, W, sxb, sxc, sxh, sxw, srb, src, srh, srw, ERROR, GW)
    valid = (oi[:, None] < H) & (oj[None, :] < W)
    tl.store(map_ptr + b * H * W + oi[:, None] * W + oj[None, :], acc, mask=valid)
    # the map is >= 0, so 0 is a neutral start and float atomic_max is order-independent (deterministic)
    tl.atomic_max(score_ptr + b, tl.max(tl.max(tl.where(valid, acc, 0.0), axis=1), axis=0))


def _build_box_operator(size: int, k: int, n: int, device) -> torch.Tensor:
    """A_S^n (size x size) float32 for the valid-count box of width k: n passes along one axis."""
    i = torch.arange(size, device=device, dtype=torch.float64)
    band = ((i[:, None] - i[None, :]).abs() <= k // 2).to(torch.float64)
    a = band / band.sum(dim=1, keepdim=True)
    return torch.linalg.matrix_power(a, n).to(torch.float32)


_OPERATORS: dict = {}  # (H, W, k, n, device) -> (L, R); a few KB to MB per image size, kept for the process


def _box_operators(H, W, k, n, device):
    """(L, R) of the module doc, cached per (H, W, k, n, device).

    Under ``torch.compile`` a cached pair is read like any global tensor (a graph constant, guarded); a missing
    pair is built inside the graph (a handful of small ops per call), so warm the cache with one eager call.
    """
    key = (H, W, k, n, str(torch.device(device)))
    pair = _OPERATORS.get(key)
    if pair is None:
        pair = (_build_box_operator(H, k, n, device).contiguous(),
                _build_box_operator(W, k, n, device).t().contiguous())
        if not torch.compiler.is_compiling():
            _OPERATORS[key] = pair
    return pair


def _launch(x, recon, lh, rw, halo, error_id, cfg=None):
    B, C, H, W = x.shape
    cfg = dict(cfg or (_INTERP_CFG if interpreting() else _GPU_CFG))
    amap = torch.empty((B, 1, H, W), device=x.device, dtype=torch.float32)
    score = torch.zeros((B,), device=x.device, dtype=torch.float32)
    smooth = lh is not None
    grid = (triton.cdiv(W, cfg["TW"]), triton.cdiv(H, cfg["TH"]), B)
    wrap_triton(_anomaly_map_kernel)[grid](
        x, recon, lh if smooth else amap, rw if smooth else amap, amap, score, C, H, W, halo,
        *x.stride(), *recon.stride(),
        SMOOTH=smooth, ERROR=error_id, GW=GRADIENT_WEIGHT, TH=cfg["TH"], TW=cfg["TW"], BK=cfg["BK"],
        PRECISION=_PRECISION,
        num_warps=cfg["num_warps"])
    return amap, score


@triton_op("fae_fast_triton::anomaly_map", mutates_args={})
def _anomaly_map_op(x: torch.Tensor, recon: torch.Tensor, lh: Optional[torch.Tensor], rw: Optional[torch.Tensor],
                    halo: int, error_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch(x, recon, lh, rw, halo, error_id)


# Under the interpreter, triton_op's own fake implementation (tracing the body with fake tensors) reaches the
# interpreted kernel, which needs real data pointers; an explicit fake lets torch._dynamo trace the launcher on
# CPU (the tests prove "no graph break" there). On a GPU triton_op's traced fake is used, as intended.
if interpreting():
    @_anomaly_map_op.register_fake
    def _anomaly_map_fake(x, recon, lh, rw, halo, error_id):
        B, _, H, W = x.shape
        return x.new_empty((B, 1, H, W), dtype=torch.float32), x.new_empty((B,), dtype=torch.float32)


def anomaly_map_triton(x, recon, *, n=4, k=7, error="squared"):
    """Error map, n passes of a k x k valid-count mean filter and per-image max, in one Triton kernel.

    Args:
        x: input images (B, C, H, W), uint8 or float in [0, 1]; any strides.
        recon: reconstructions (B, C, H, W), float (bf16/fp16/fp32); any strides.
        n: number of box passes (0 = none).
        k: odd window (1 = none).
        error: one of ``MAP_ERRORS`` (:func:`fae_fast.reference.error_image`).

    Returns:
        (map (B, 1, H, W) float32, score (B,) float32), equal to the reference within float32 rounding.

    Example:
        >>> amap, score = anomaly_map_triton(x, model(x), n=4, k=7)
    """
    check_device(x, "anomaly_map")
    B, C, H, W = x.shape
    lh, rw, halo = None, None, 0
    if n > 0 and k > 1:
        lh, rw = _box_operators(H, W, k, n, x.device)
        halo = n * (k // 2)
    error_id = MAP_ERRORS.index(error)
    if torch.compiler.is_compiling():
        return _anomaly_map_op(x, recon, lh, rw, halo, error_id)
    # eager: the same launcher without the custom-op dispatcher, which costs ~20 us of host time per call
    # (measured on CPU), more than this kernel's GPU time budget at batch 64
    return _launch(x, recon, lh, rw, halo, error_id)
