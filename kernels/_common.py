"""Pieces shared by the Triton kernels: dtype loading, strided plane addressing, the Philox noise stream.

The noise stream is the contract between :mod:`fae_fast.kernels.corrupt_and_noise` and
:mod:`fae_fast.kernels.noisy_target_loss`: the loss regenerates the eps that the injection added, so both must
call :func:`standard_normal` with the same (seed, row, hw) and nothing else may influence it.

Importing this module imports Triton but does no CUDA work (it must import on a CPU-only machine).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

def interpreting() -> bool:
    """True when Triton runs through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_device(t: torch.Tensor, op: str) -> None:
    """Raise a clear error where Triton cannot run: compiled kernels need CUDA tensors, CPU needs the interpreter."""
    if t.device.type != "cuda" and not interpreting():
        from fae_fast._backend import BackendUnavailable

        raise BackendUnavailable(
            f"{op}: the Triton kernel needs CUDA tensors, got a tensor on {t.device}; run it on a GPU, set "
            "TRITON_INTERPRET=1 before triton is imported (CPU interpreter, for tests), or use backend='torch'")


def plane_strides(t: torch.Tensor):
    """(stride_b, stride_c, stride_h, stride_w, flat) of a 4-D tensor.

    ``flat`` is True when the (H, W) plane is addressable as ``hw * stride_w`` with ``hw = h * W + w``
    (contiguous and channels_last tensors, and any plane with H == 1 or W == 1): the kernels then skip a vector
    division per element.
    """
    sb, sc, sh, sw = t.stride()
    _, _, H, W = t.shape
    if W == 1:
        return sb, sc, 0, sh, True
    return sb, sc, sh, sw, H == 1 or sh == W * sw


@triton.jit
def to_f32(v):
    """Loaded values -> float32 image values: uint8 is divided by 255 (as the reference does), floats cast."""
    if v.dtype == tl.uint8:
        return v.to(tl.float32) / 255.0
    else:
        return v.to(tl.float32)


# The interpreter (triton 3.7) truncates float32 -> bfloat16 instead of rounding to nearest even (and its "rtne"
# path drops the mantissa carry), so under it bf16 stores round by integer arithmetic; on a GPU the hardware cvt
# rounds to nearest even already.
_BF16_BY_BITS = tl.constexpr(interpreting())


@triton.jit
def cast_for_store(v, dtype: tl.constexpr):
    """float32 -> ``dtype`` rounded to nearest even (what torch's ``.to`` does), also in the interpreter."""
    if _BF16_BY_BITS and dtype == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return v.to(dtype)


@triton.jit
def plane_offset(hw, W, sh, sw, FLAT: tl.constexpr):
    """Memory offset of flat plane indices ``hw = h * W + w``; FLAT avoids the vector div/mod."""
    if FLAT:
        return hw * sw
    else:
        h = hw // W
        return h * sh + (hw - h * W) * sw


@triton.jit
def standard_normal(seed, row, blk, BLOCK: tl.constexpr):
    """z ~ N(0, 1) for plane indices ``hw = blk * BLOCK + arange(BLOCK)`` of plane ``row = b * C + c``.

    Why groups of 4: Philox-4x32-10 costs ~150 integer instructions per call (estimate, unmeasured); one call
    per element would make the kernels compute-bound on an H200 (~7 bytes per element at ~4 TB/s leaves ~60
    instructions per element), so one ``randn4x`` call serves 4 neighbouring elements.

    Philox counter (hw // 4, row), key ``seed``; one ``randn4x`` gives the four elements of a group of 4
    (BLOCK is a multiple of 4 and blocks start at multiples of BLOCK, so groups never straddle programs).
    The result depends only on (seed, row, hw): any block size regenerates the same stream.
    """
    Q: tl.constexpr = BLOCK // 4
    q = (blk * Q + tl.arange(0, Q)).to(tl.int64)
    counter = (row.to(tl.int64) << 32) + q
    n0, n1, n2, n3 = tl.randn4x(seed, counter)
    # join(join(n0, n1), join(n2, n3)) is (Q, 2, 2) holding n0, n2, n1, n3 in flat order: a fixed permutation
    z = tl.join(tl.join(n0, n1), tl.join(n2, n3))
    return tl.reshape(z, (BLOCK, ))


def grid_block(hw: int, block: int) -> int:
    """A block size (>= ``block``) that keeps the plane grid axis under CUDA's 65535 limit."""
    while triton.cdiv(hw, block) > 65535:
        block *= 2
    return block


def aot_compile(kernel, signature: dict, constexprs: dict, *, arch: int = 90, num_warps: int = 4):
    """Compile a ``@triton.jit`` kernel for ``sm_<arch>`` down to a cubin (ptxas included) without a GPU.

    A CPU-only check that the CUDA code path builds (types, layouts, ``tl.dot`` precisions): the tests run it in
    a subprocess with ``TRITON_INTERPRET=0``, since under the interpreter ``@triton.jit`` returns interpreted
    functions that cannot be compiled. Arguments not named in ``signature`` or ``constexprs`` are ``i32``.

    Returns:
        The compiled kernel (``.asm["ptx"]``, ``.asm["cubin"]``, ``.metadata``).
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    full = {name: "constexpr" if name in constexprs else signature.get(name, "i32") for name in kernel.arg_names}
    src = ASTSource(fn=kernel, signature=full, constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=num_warps))
