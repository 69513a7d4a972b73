"""Loader of the compiled extension ``fae_fast._C`` and the Python face of its ops.

Importing this module either gives working ops or raises :class:`ImportError` with the reason, which the
backend registry (:mod:`fae_fast._backend`) turns into one fallback warning (or an error under
``FAE_FAST_STRICT=1``). It raises when:

* ``FAE_FAST_NO_EXT=1`` is set at run time (the extension is then never loaded);
* ``fae_fast._C`` is not built or cannot be loaded;
* the torch (or CUDA) version recorded in the binary at build time differs from the running one: a C++
  extension is only ABI-compatible with the torch it was compiled against.

On success it registers the fake (meta) kernels so that ``torch.compile`` traces the ops without running them,
and exposes :func:`elastic_warp`, :func:`elastic_field` and :func:`rasterize_strokes` with the signatures of
their references in :mod:`fae_fast.reference`.
"""
from __future__ import annotations

import os

import torch

from . import _ext_status

__all__ = ["elastic_warp", "elastic_field", "rasterize_strokes", "describe", "device_supported"]

if os.environ.get("FAE_FAST_NO_EXT", "0") not in ("", "0"):
    raise ImportError("the compiled extension is disabled at run time by FAE_FAST_NO_EXT=1")


try:
    from . import _C  # registers torch.ops.fae_fast.* (TORCH_LIBRARY) as a side effect
except Exception as exc:  # ImportError, OSError (undefined symbol after a torch upgrade)
    raise ImportError(f"fae_fast._C cannot be loaded ({type(exc).__name__}: {exc}); "
                      f"{_ext_status.build_time()}; {_ext_status.runtime()}; build it against this torch with "
                      f"`{_ext_status.fix_command()}`") from exc

_ext_status.check_versions(_C.torch_version, _C.cuda_version, torch.__version__, torch.version.cuda)

_ops = torch.ops.fae_fast


# ---- fake (meta) kernels: shapes and dtypes only, so torch.compile / FakeTensor tracing never runs C++ ----

@torch.library.register_fake("fae_fast::elastic_field")
def _elastic_field_fake(alpha, smoothness, seed, height, width):
    return alpha.new_empty((alpha.shape[0], 2, height, width), dtype=torch.float32)


@torch.library.register_fake("fae_fast::elastic_warp")
def _elastic_warp_fake(mask, alpha, smoothness, seed):
    return torch.empty_like(mask, memory_format=torch.contiguous_format)


@torch.library.register_fake("fae_fast::elastic_warp_field")
def _elastic_warp_field_fake(mask, field):
    return torch.empty_like(mask, memory_format=torch.contiguous_format)


@torch.library.register_fake("fae_fast::rasterize_strokes")
def _rasterize_strokes_fake(ctrl, width, height, width_px, samples):
    return ctrl.new_empty((ctrl.shape[0], 1, height, width_px), dtype=torch.float32)


# ---- the functions the dispatchers call (same signatures as fae_fast.reference) ----

def elastic_field(shape, alpha, smoothness, seed, device=None):
    """Smooth random displacement field (B, 2, H, W) float32 (dx, dy) in pixels, from the extension.

    Same semantics as :func:`fae_fast.reference.elastic_field` (Gaussian-blurred white noise, reflect border,
    radius ``ceil(3 * max(smoothness))`` cropped to the image, unit RMS times ``alpha[b]``), but the noise comes
    from a counter hash of (seed, b, y, x) with Box-Muller: identical on CPU and CUDA, not equal to
    ``torch.Generator``'s stream.

    Args:
        shape: (B, K, H, W) of the masks (K is ignored).
        alpha: (B,) RMS displacement in pixels.
        smoothness: (B,) Gaussian std in pixels.
        seed: int in [0, 2**63).
        device: device of the field (defaults to alpha's).
    """
    B, _, H, W = shape
    device = alpha.device if device is None else torch.device(device)
    return _ops.elastic_field(alpha.to(device), smoothness.to(device), int(seed), H, W)


def elastic_warp(mask, alpha, smoothness, seed, *, field=None):
    """Warp masks (B, K, H, W) by the extension's elastic field (or an explicit ``field`` (B, 2, H, W)).

    Bilinear with pixel centres at integer coordinates, zeros outside; same shape and dtype as ``mask`` (uint8
    rounded half to even). See :func:`fae_fast.reference.elastic_warp`.

    Example:
        >>> m = torch.zeros(2, 1, 32, 32, dtype=torch.uint8); m[:, :, 8:24, 8:24] = 255
        >>> out = elastic_warp(m, torch.full((2,), 2.0), torch.full((2,), 4.0), seed=0)
    """
    if field is not None:
        return _ops.elastic_warp_field(mask, field)
    return _ops.elastic_warp(mask, alpha, smoothness, int(seed))


def rasterize_strokes(ctrl, width, height, width_px, *, samples=32):
    """Anti-aliased cubic Bezier strokes (B, 1, H, W) float32 from ctrl (B, S, 4, 2) and width (B, S).

    Same result as :func:`fae_fast.reference.rasterize_strokes`; each row only visits segments whose bounding
    box (inflated by w/2 + 1) covers it.
    """
    return _ops.rasterize_strokes(ctrl, width, int(height), int(width_px), int(samples))


def describe() -> str:
    """One line: build-time and run-time torch/CUDA versions and which kernels are compiled in."""
    kinds = "CPU + CUDA" if _C.with_cuda else "CPU only"
    return (f"fae_fast._C ({kinds}, OpenMP {'on' if _C.with_openmp else 'off'}) build-time torch {_C.torch_version}, "
            f"CUDA {_C.cuda_version or 'none'}; {_ext_status.runtime()}")


def device_supported(device) -> bool:
    """True when the extension has kernels for ``device``'s type (CPU always; CUDA when compiled with it)."""
    kind = torch.device(device).type
    return kind == "cpu" or (kind == "cuda" and bool(_C.with_cuda))
