"""Same-eps training loss: MSE between the reconstruction and ``x + eps`` with eps regenerated from the seed.

Forward: ``loss = mean((r - x - eps)^2)``; backward: ``dL/dr = g * 2 / N * (r - x - eps)``. Both kernels
regenerate eps with :func:`fae_fast.kernels._common.standard_normal` from the seed that
:mod:`fae_fast.kernels.corrupt_and_noise` used, so the target ``x + eps`` is never stored.

Registered as ``fae_fast_triton::noisy_target_loss`` (and ``..._backward``) with ``torch.library.triton_op``; the
gradient is attached with ``register_autograd`` so ``torch.compile`` traces forward and backward with no graph
break.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from fae_fast.kernels._common import (cast_for_store, check_device, grid_block, interpreting, plane_offset,
                                      plane_strides, standard_normal, to_f32)

__all__ = ["noisy_target_loss_triton"]

# Same reasoning as corrupt_and_noise: 1024 elements per program keeps HBM busy; the forward writes one float
# per program (N / 1024 partial sums, 0.1 % of the bytes it reads) so the sum stays deterministic (no atomics).
_BLOCK = 1024


@triton.jit
def _residual(r_ptr, x_ptr, sigma_ptr, noise_ptr, seed, row0, row, blk, b, c, hw, valid, W,
              srb, src, srh, srw, sxb, sxc, sxh, sxw, snb, snc, snh, snw,
              HAS_NOISE: tl.constexpr, FLAT: tl.constexpr, BLOCK: tl.constexpr):
    """d = r - x - eps in float32 (0 outside the plane), eps regenerated exactly as the injection drew it."""
    r = tl.load(r_ptr + b * srb + c * src + plane_offset(hw, W, srh, srw, FLAT), mask=valid, other=0).to(tl.float32)
    x = to_f32(tl.load(x_ptr + b * sxb + c * sxc + plane_offset(hw, W, sxh, sxw, FLAT), mask=valid, other=0))
    if HAS_NOISE:
        eps = tl.load(noise_ptr + b * snb + c * snc + plane_offset(hw, W, snh, snw, FLAT), mask=valid,
                      other=0).to(tl.float32)
    else:
        eps = standard_normal(seed, row0 + row, blk, BLOCK) * tl.load(sigma_ptr + b).to(tl.float32)
    return tl.where(valid, r - (x + eps), 0.0)


@triton.jit(do_not_specialize=["seed", "row0"])
def _noisy_target_loss_fwd_kernel(r_ptr, x_ptr, sigma_ptr, noise_ptr, partial_ptr, seed, row0, C, H, W,
                                  srb, src, srh, srw, sxb, sxc, sxh, sxw, snb, snc, snh, snw,
                                  HAS_NOISE: tl.constexpr, FLAT: tl.constexpr, BLOCK: tl.constexpr):
    """partial[row, blk] = sum over the block of (r - (x + eps))^2.

    Memory traffic: reads r and x once, writes one float32 per BLOCK elements; the final mean is a tiny torch
    sum over the partials (deterministic, unlike atomics).
    """
    row = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    b = row // C
    c = row - b * C
    hw = blk * BLOCK + tl.arange(0, BLOCK)
    valid = hw < H * W
    d = _residual(r_ptr, x_ptr, sigma_ptr, noise_ptr, seed, row0, row, blk, b, c, hw, valid, W,
                  srb, src, srh, srw, sxb, sxc, sxh, sxw, snb, snc, snh, snw, HAS_NOISE, FLAT, BLOCK)
    tl.store(partial_ptr + row * tl.num_programs(1) + blk, tl.sum(d * d, axis=0))


@triton.jit(do_not_specialize=["seed", "row0"])
def _noisy_target_loss_bwd_kernel(r_ptr, x_ptr, sigma_ptr, noise_ptr, g_ptr, grad_ptr, seed, row0, scale, C, H, W,
                                  srb, src, srh, srw, sxb, sxc, sxh, sxw, snb, snc, snh, snw,
                                  sgb, sgc, sgh, sgw,
                                  HAS_NOISE: tl.constexpr, FLAT: tl.constexpr, BLOCK: tl.constexpr):
    """grad = g * (2 / N) * (r - (x + eps)), stored in r's dtype.

    Memory traffic: reads r and x, writes grad, once each; the upstream gradient g is read from device memory
    (no host sync on its value).
    """
    row = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    b = row // C
    c = row - b * C
    hw = blk * BLOCK + tl.arange(0, BLOCK)
    valid = hw < H * W
    d = _residual(r_ptr, x_ptr, sigma_ptr, noise_ptr, seed, row0, row, blk, b, c, hw, valid, W,
                  srb, src, srh, srw, sxb, sxc, sxh, sxw, snb, snc, snh, snw, HAS_NOISE, FLAT, BLOCK)
    g = tl.load(g_ptr).to(tl.float32) * scale
    tl.store(grad_ptr + b * sgb + c * sgc + plane_offset(hw, W, sgh, sgw, FLAT),
             cast_for_store(d * g, grad_ptr.dtype.element_ty), mask=valid)


def _geometry(recon, x, noise, extra=None, block=None):
    """Strides of every tensor, the FLAT flag and the block size shared by both kernels."""
    B, C, H, W = x.shape
    tensors = [recon, x] + ([noise] if noise is not None else []) + ([extra] if extra is not None else [])
    strides = [plane_strides(t) for t in tensors]
    flat = all(s[4] for s in strides)
    sr, sx = strides[0], strides[1]
    sn = strides[2] if noise is not None else (0, 0, 0, 0, True)
    block = grid_block(H * W, block or (min(_BLOCK, max(16, triton.next_power_of_2(H * W))) if interpreting()
                                        else _BLOCK))
    args = (sr[0], sr[1], sr[2], sr[3], sx[0], sx[1], sx[2], sx[3], sn[0], sn[1], sn[2], sn[3])
    return args, flat, block, (B * C, triton.cdiv(H * W, block))


def _forward(recon, x, sigma, seed, noise, block=None, sample_offset=0):
    B, C, H, W = x.shape
    args, flat, block, grid = _geometry(recon, x, noise, block=block)
    partial = torch.empty(grid[0] * grid[1], device=x.device, dtype=torch.float32)
    wrap_triton(_noisy_target_loss_fwd_kernel)[grid](
        recon, x, sigma, noise if noise is not None else x, partial, seed, int(sample_offset) * C, C, H, W, *args,
        HAS_NOISE=noise is not None, FLAT=flat, BLOCK=block, num_warps=4)
    return partial.sum() / x.numel()


def _backward(grad_out, recon, x, sigma, seed, noise, block=None, sample_offset=0):
    B, C, H, W = x.shape
    grad = torch.empty_like(recon)  # recon's dtype and layout: the gradient the network expects
    args, flat, block, grid = _geometry(recon, x, noise, extra=grad, block=block)
    sg = plane_strides(grad)
    wrap_triton(_noisy_target_loss_bwd_kernel)[grid](
        recon, x, sigma, noise if noise is not None else x, grad_out, grad, seed, int(sample_offset) * C,
        2.0 / x.numel(), C, H, W,
        *args, sg[0], sg[1], sg[2], sg[3],
        HAS_NOISE=noise is not None, FLAT=flat, BLOCK=block, num_warps=4)
    return grad


@triton_op("fae_fast_triton::noisy_target_loss", mutates_args={})
def _noisy_target_loss_op(recon: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor, seed: int,
                          noise: Optional[torch.Tensor] = None, sample_offset: int = 0) -> torch.Tensor:
    return _forward(recon, x, sigma, seed, noise, sample_offset=sample_offset)


@triton_op("fae_fast_triton::noisy_target_loss_backward", mutates_args={})
def _noisy_target_loss_backward_op(grad_out: torch.Tensor, recon: torch.Tensor, x: torch.Tensor,
                                   sigma: torch.Tensor, seed: int,
                                   noise: Optional[torch.Tensor] = None, sample_offset: int = 0) -> torch.Tensor:
    return _backward(grad_out, recon, x, sigma, seed, noise, sample_offset=sample_offset)


# Under the interpreter, triton_op's own fake implementation (tracing the body with fake tensors) reaches the
# interpreted kernel, which needs real data pointers; an explicit fake lets torch._dynamo trace the launcher on
# CPU (the tests prove "no graph break" there). On a GPU triton_op's traced fake is used, as intended.
if interpreting():
    @_noisy_target_loss_op.register_fake
    def _noisy_target_loss_fake(recon, x, sigma, seed, noise=None, sample_offset=0):
        return x.new_empty((), dtype=torch.float32)

    @_noisy_target_loss_backward_op.register_fake
    def _noisy_target_loss_backward_fake(grad_out, recon, x, sigma, seed, noise=None, sample_offset=0):
        return torch.empty_like(recon)


def _setup_context(ctx, inputs, output):
    recon, x, sigma, seed, noise, sample_offset = inputs
    ctx.seed, ctx.sample_offset = seed, sample_offset
    ctx.has_noise = noise is not None
    ctx.save_for_backward(recon, x, sigma, noise if noise is not None else sigma)


def _autograd_backward(ctx, grad_out):
    recon, x, sigma, noise = ctx.saved_tensors
    grad = torch.ops.fae_fast_triton.noisy_target_loss_backward(
        grad_out.contiguous(), recon, x, sigma, ctx.seed, noise if ctx.has_noise else None, ctx.sample_offset)
    return grad, None, None, None, None, None


_noisy_target_loss_op.register_autograd(_autograd_backward, setup_context=_setup_context)


def noisy_target_loss_triton(recon, x, sigma, seed, *, noise=None, sample_offset=None):
    """MSE between ``recon`` and ``x + eps``, eps regenerated from ``seed`` (same contract as the reference).

    Args:
        recon: network output (B, C, H, W), float; differentiable (the gradient is recon's dtype and layout).
        x: clean images (B, C, H, W), uint8 or float in [0, 1].
        sigma: (B,) float noise std per sample.
        seed: the seed given to :func:`fae_fast.kernels.corrupt_and_noise.corrupt_and_noise_triton`.
        noise: explicit eps (B, C, H, W) (tests); replaces ``sigma * z``.
        sample_offset: global index of sample 0 (None: 0), as given to the injection.

    Returns:
        0-dim float32 loss.

    Example:
        >>> loss = noisy_target_loss_triton(model(inp), x, sigma, seed=3)
        >>> loss.backward()
    """
    check_device(recon, "noisy_target_loss")
    if torch.compiler.is_compiling() or (torch.is_grad_enabled() and recon.requires_grad):
        return _noisy_target_loss_op(recon, x, sigma, int(seed), noise, int(sample_offset or 0))
    # eager without autograd (validation losses): skip the custom-op dispatcher (~20 us of host time per call)
    return _forward(recon, x, sigma, int(seed), noise, sample_offset=int(sample_offset or 0))
