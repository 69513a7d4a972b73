"""Fused corruption blend + symmetric noise: the network input of a training step in one pass.

``out = x + m * (T - x) + sigma[b] * z`` with z drawn by Philox from ``seed`` (see
:func:`fae_fast.kernels._common.standard_normal`); :mod:`fae_fast.kernels.noisy_target_loss` regenerates the
same z from the same seed, so the target ``x + eps`` is never stored.

The launcher is registered as the custom op ``fae_fast_triton::corrupt_and_noise`` through
``torch.library.triton_op`` so ``torch.compile`` traces through it without a graph break.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from fae_fast.kernels._common import (cast_for_store, check_device, grid_block, interpreting, plane_offset,
                                      plane_strides, standard_normal, to_f32)

__all__ = ["corrupt_and_noise_triton"]

# 1024 elements per program = 8 per thread at 4 warps: enough bytes in flight per SM to saturate HBM
# (Little's law at ~4 TB/s), few enough registers for the Philox state. The interpreter pays per program, not per
# element, so tests run one program per plane.
_BLOCK = 1024


@triton.jit(do_not_specialize=["seed", "row0"])
def _corrupt_and_noise_kernel(x_ptr, t_ptr, m_ptr, sigma_ptr, noise_ptr, out_ptr, seed, row0,
                              C, H, W,
                              sxb, sxc, sxh, sxw, stb, stc, sth, stw, smb, smh, smw,
                              snb, snc, snh, snw, sob, soc, soh, sow,
                              HAS_NOISE: tl.constexpr, FLAT: tl.constexpr, BLOCK: tl.constexpr):
    """out[b, c, h, w] = x + m[b, 0] * (T - x) + (noise or sigma[b] * z); all in float32, stored in out's dtype.

    Memory traffic: reads x, T and the mask (once per channel, from L2 after the first) and writes out, once:
    about 3 * itemsize + 4 / C bytes per element; no eps is ever written. Grid: (B * C planes, plane blocks).
    """
    row = tl.program_id(0).to(tl.int64)  # int64: b * stride_b overflows int32 beyond 2**31 elements
    blk = tl.program_id(1)
    b = row // C
    c = row - b * C
    hw = blk * BLOCK + tl.arange(0, BLOCK)
    valid = hw < H * W
    x = to_f32(tl.load(x_ptr + b * sxb + c * sxc + plane_offset(hw, W, sxh, sxw, FLAT), mask=valid, other=0))
    t = to_f32(tl.load(t_ptr + b * stb + c * stc + plane_offset(hw, W, sth, stw, FLAT), mask=valid, other=0))
    m = tl.load(m_ptr + b * smb + plane_offset(hw, W, smh, smw, FLAT), mask=valid, other=0).to(tl.float32)
    if HAS_NOISE:
        eps = tl.load(noise_ptr + b * snb + c * snc + plane_offset(hw, W, snh, snw, FLAT), mask=valid,
                      other=0).to(tl.float32)
    else:
        sigma = tl.load(sigma_ptr + b).to(tl.float32)
        eps = standard_normal(seed, row0 + row, blk, BLOCK) * sigma  # row0: first sample's global plane
    out = x + m * (t - x) + eps
    tl.store(out_ptr + b * sob + c * soc + plane_offset(hw, W, soh, sow, FLAT),
             cast_for_store(out, out_ptr.dtype.element_ty), mask=valid)


def _launch(x, texture, mask, sigma, seed, noise, block=None, sample_offset=0):
    """Allocate the output (x's layout preserved: channels_last stays channels_last) and launch the kernel."""
    B, C, H, W = x.shape
    out_dtype = x.dtype if x.dtype.is_floating_point else torch.float32
    out = torch.empty_like(x, dtype=out_dtype)
    if out.numel() == 0:
        return out
    tensors = [x, texture, mask, out] + ([noise] if noise is not None else [])
    strides = [plane_strides(t) for t in tensors]
    flat = all(s[4] for s in strides)
    sx, st, sm, so = strides[:4]
    sn = strides[4] if noise is not None else (0, 0, 0, 0, True)
    block = grid_block(H * W, block or (min(_BLOCK, max(16, triton.next_power_of_2(H * W))) if interpreting()
                                        else _BLOCK))
    grid = (B * C, triton.cdiv(H * W, block))
    wrap_triton(_corrupt_and_noise_kernel)[grid](
        x, texture, mask, sigma, noise if noise is not None else x, out, seed, int(sample_offset) * C,
        C, H, W,
        sx[0], sx[1], sx[2], sx[3], st[0], st[1], st[2], st[3], sm[0], sm[2], sm[3],
        sn[0], sn[1], sn[2], sn[3], so[0], so[1], so[2], so[3],
        HAS_NOISE=noise is not None, FLAT=flat, BLOCK=block, num_warps=4)
    return out


@triton_op("fae_fast_triton::corrupt_and_noise", mutates_args={})
def _corrupt_and_noise_op(x: torch.Tensor, texture: torch.Tensor, mask: torch.Tensor, sigma: torch.Tensor,
                          seed: int, noise: Optional[torch.Tensor] = None, sample_offset: int = 0) -> torch.Tensor:
    return _launch(x, texture, mask, sigma, seed, noise, sample_offset=sample_offset)


# Under the interpreter, triton_op's own fake implementation (tracing the body with fake tensors) reaches the
# interpreted kernel, which needs real data pointers; an explicit fake lets torch._dynamo trace the launcher on
# CPU (the tests prove "no graph break" there). On a GPU triton_op's traced fake is used, as intended.
if interpreting():
    @_corrupt_and_noise_op.register_fake
    def _corrupt_and_noise_fake(x, texture, mask, sigma, seed, noise=None, sample_offset=0):
        return torch.empty_like(x, dtype=x.dtype if x.dtype.is_floating_point else torch.float32)


def corrupt_and_noise_triton(x, texture, mask, sigma, seed, *, noise=None, sample_offset=None):
    """Network input ``(1 - m) * x + m * T + eps`` in one Triton pass (same contract as the reference).

    Args:
        x: clean images (B, C, H, W), uint8 or float in [0, 1]; any strides.
        texture: (B, C, H, W), uint8 or float, same value range as ``x``.
        mask: (B, 1, H, W) float, opacity-weighted mask (beta weights the texture).
        sigma: (B,) float noise std per sample.
        seed: int in [0, 2**63), key of the Philox stream; the loss regenerates eps from it.
        noise: explicit eps (B, C, H, W) (tests); replaces ``sigma * z``.
        sample_offset: global index of sample 0 (None: 0); eps of global sample j depends only on (seed, j):
            the Philox counter's row is ``(sample_offset + b) * C + c``.

    Returns:
        (B, C, H, W) in x's dtype (float32 for uint8 x), in x's memory layout.

    Example:
        >>> x = torch.rand(2, 3, 8, 8, device="cuda")
        >>> inp = corrupt_and_noise_triton(x, x, torch.zeros(2, 1, 8, 8, device="cuda"),
        ...                                torch.full((2,), 0.05, device="cuda"), seed=3)
    """
    check_device(x, "corrupt_and_noise")
    if torch.compiler.is_compiling():
        return _corrupt_and_noise_op(x, texture, mask, sigma, int(seed), noise, int(sample_offset or 0))
    # eager: the same launcher without the custom-op dispatcher (~20 us of host time per call, measured on CPU);
    # nothing here needs autograd: the network input is not differentiated
    return _launch(x, texture, mask, sigma, int(seed), noise, sample_offset=int(sample_offset or 0))
