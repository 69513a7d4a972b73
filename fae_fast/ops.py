"""Public dispatchers of the custom ops: validate once here, then run the chosen backend.

Every op has ``backend="auto" | "triton" | "ext" | "torch"`` (see :mod:`fae_fast._backend` for how "auto"
resolves and ``FAE_FAST_BACKEND`` overrides it). The pure-PyTorch reference of each op, with the same
signature, is in :mod:`fae_fast.reference`; the kernels may assume the input checked here.
"""
from __future__ import annotations

import numbers

import torch

from . import _backend
from .reference import MAP_ERRORS

__all__ = ["corrupt_and_noise", "noisy_target_loss", "anomaly_map", "elastic_warp", "rasterize_strokes",
           "last_backend", "noise_backend"]

_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_IMAGE_DTYPES = _FLOATS + (torch.uint8,)
_last: dict[str, str] = {}


def last_backend(op: str) -> str | None:
    """The backend the most recent call of ``op`` ran on (for logs and tests)."""
    return _last.get(op)


def noise_backend(device, backend: str = "auto") -> str:
    """The one backend for :func:`corrupt_and_noise` *and* :func:`noisy_target_loss` on ``device``.

    The two ops regenerate the same eps from a seed only within one backend (the reference draws with
    ``torch.Generator``, the Triton kernels with Philox): mixing them would silently turn same-eps noise into
    independent noise. Both resolve ``backend`` here; where they would differ (one of them fell back), both run on
    the reference.
    """
    names = {_backend.resolve(op, backend, torch.device(device))[0]
             for op in ("corrupt_and_noise", "noisy_target_loss")}
    return names.pop() if len(names) == 1 else "torch"


def _tensor(name, t, dims, dtypes):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != dims:
        raise ValueError(f"{name} must have {dims} dimensions, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} has dtype {t.dtype}; expected one of {[str(d) for d in dtypes]}")


def _same_device(**tensors):
    devs = {n: t.device for n, t in tensors.items() if t is not None}
    if len(set(devs.values())) > 1:
        raise ValueError(f"all tensors must be on one device, got {devs}")


def _seed(seed):
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an int, got {seed!r}")
    if not 0 <= int(seed) < 2 ** 63:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")
    return int(seed)


def _offset(v):
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or not 0 <= int(v) < 2 ** 31:
        raise ValueError(f"sample_offset must be None or an int in [0, 2**31), got {v!r}")
    return int(v)


def _per_sample(name, v, batch, device):
    """A contiguous (B,) float tensor from a tensor or a Python number; checks length and device (not the values:
    that would wait for the device)."""
    if isinstance(v, numbers.Real) and not isinstance(v, bool):
        v = torch.full((batch,), float(v), device=device)
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"{name} must be a tensor of shape ({batch},) or a number, got {type(v).__name__}")
    if v.dim() != 1 or v.shape[0] != batch:
        raise ValueError(f"{name} must have shape ({batch},), got {tuple(v.shape)}")
    if not v.dtype.is_floating_point:
        v = v.float()
    if v.device != device:
        raise ValueError(f"{name} is on {v.device} but the images are on {device}")
    return v.contiguous()  # the kernels index it as a plain array (an expanded or strided view would misread)


def _noise_arg(noise, like):
    if noise is None:
        return None
    _tensor("noise", noise, 4, _FLOATS)
    if noise.shape != like.shape:
        raise ValueError(f"noise must have the shape of x {tuple(like.shape)}, got {tuple(noise.shape)}")
    _same_device(x=like, noise=noise)
    return noise


def _run(op, backend, device, *args, **kwargs):
    name, fn = _backend.resolve(op, backend, device)
    _last[op] = name
    return fn(*args, **kwargs)


def corrupt_and_noise(x, texture, mask, sigma, seed, *, noise=None, sample_offset=None, backend="auto"):
    """Network input of a training step: ``(1 - m) * x + m * T + eps``, eps = sigma[b] * N(0, 1) from seed.

    Args:
        x: clean images (B, C, H, W), uint8 or float in [0, 1].
        texture: (B, C, H, W), uint8 or float, blended where the mask is on.
        mask: (B, 1, H, W) float in [0, 1], already multiplied by the opacity beta (beta weights the texture).
        sigma: (B,) noise std per sample, or a number.
        seed: int seed of the noise; :func:`noisy_target_loss` with the same seed regenerates the same eps.
        noise: explicit eps (B, C, H, W) for tests.
        sample_offset: global index of sample 0 when a batch is split across processes: eps of every sample is
            then keyed by (seed, its global index) alone, so a slice regenerates the eps of the whole batch's rows
            (:mod:`fae_fast.reference`, module doc). None: the backend's batch stream.
        backend: "auto" | "triton" | "torch".

    Returns:
        (B, C, H, W) in x's dtype (float32 for uint8 x).

    Example:
        >>> x = torch.rand(4, 3, 32, 32)
        >>> inp = corrupt_and_noise(x, torch.rand_like(x), torch.zeros(4, 1, 32, 32), 0.05, seed=1)
    """
    _tensor("x", x, 4, _IMAGE_DTYPES)
    _tensor("texture", texture, 4, _IMAGE_DTYPES)
    _tensor("mask", mask, 4, _FLOATS)
    if texture.shape != x.shape:
        raise ValueError(f"texture must have the shape of x {tuple(x.shape)}, got {tuple(texture.shape)}")
    B, _, H, W = x.shape
    if mask.shape != (B, 1, H, W):
        raise ValueError(f"mask must have shape {(B, 1, H, W)}, got {tuple(mask.shape)}")
    _same_device(x=x, texture=texture, mask=mask)
    sigma = _per_sample("sigma", sigma, B, x.device)
    return _run("corrupt_and_noise", backend, x.device, x, texture, mask, sigma, _seed(seed),
                noise=_noise_arg(noise, x), sample_offset=_offset(sample_offset))


def noisy_target_loss(recon, x, sigma, seed, *, noise=None, sample_offset=None, backend="auto"):
    """MSE between ``recon`` and ``x + eps``, eps regenerated from ``seed`` (the target is never stored).

    Args:
        recon: network output (B, C, H, W), float; gradients flow to it.
        x: clean images (B, C, H, W), uint8 or float in [0, 1].
        sigma: (B,) noise std per sample, or a number.
        seed: the seed passed to :func:`corrupt_and_noise` for this batch.
        noise: explicit eps for tests.
        sample_offset: as given to :func:`corrupt_and_noise`.
        backend: "auto" | "triton" | "torch".

    Returns:
        0-dim float32 tensor.
    """
    _tensor("recon", recon, 4, _FLOATS)
    _tensor("x", x, 4, _IMAGE_DTYPES)
    if recon.shape != x.shape:
        raise ValueError(f"recon shape {tuple(recon.shape)} != x shape {tuple(x.shape)}")
    _same_device(recon=recon, x=x)
    sigma = _per_sample("sigma", sigma, x.shape[0], x.device)
    return _run("noisy_target_loss", backend, x.device, recon, x, sigma, _seed(seed),
                noise=_noise_arg(noise, x), sample_offset=_offset(sample_offset))


def anomaly_map(x, recon, *, n=4, k=7, error="squared", backend="auto"):
    """Per-pixel error, ``n`` passes of a ``k x k`` mean filter (valid-count borders), per-image max.

    Args:
        x: input images (B, C, H, W), uint8 or float in [0, 1].
        recon: reconstructions (B, C, H, W), float (bf16/fp16 allowed).
        n: passes, 0..8.
        k: odd window, 1..31.
        error: "squared" (channel-mean squared error) | "gradient" (channel mean of the squared Sobel gradient of
            the residual; :func:`fae_fast.reference.error_image`).
        backend: "auto" | "triton" | "torch".

    Returns:
        (map (B, 1, H, W) float32, score (B,) float32).

    Example:
        >>> x = torch.rand(2, 3, 16, 16)
        >>> amap, score = anomaly_map(x, x.clone(), n=2, k=5)
        >>> float(score.max())
        0.0
    """
    _tensor("x", x, 4, _IMAGE_DTYPES)
    _tensor("recon", recon, 4, _FLOATS)
    if recon.shape != x.shape:
        raise ValueError(f"recon shape {tuple(recon.shape)} != x shape {tuple(x.shape)}")
    _same_device(x=x, recon=recon)
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or not 0 <= n <= 8:
        raise ValueError(f"n (box-filter passes) must be an int in 0..8, got {n!r}")
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not (1 <= k <= 31 and k % 2 == 1):
        raise ValueError(f"k (window) must be an odd int in 1..31, got {k!r}")
    if error not in MAP_ERRORS:
        raise ValueError(f"error must be one of {MAP_ERRORS}, got {error!r}")
    if min(x.shape) == 0:
        raise ValueError(f"x must be non-empty, got shape {tuple(x.shape)}")
    return _run("anomaly_map", backend, x.device, x, recon, n=int(n), k=int(k), error=error)


def elastic_warp(mask, alpha, smoothness, seed, *, field=None, backend="auto"):
    """Warp masks by a smooth random displacement field (bilinear, zeros outside the image).

    Args:
        mask: (B, K, H, W) uint8 or float.
        alpha: (B,) RMS displacement in pixels, or a number.
        smoothness: (B,) correlation length (Gaussian std) in pixels, or a number; > 0.
        seed: int seed of the field (deterministic per device and backend).
        field: explicit (B, 2, H, W) displacement (dx, dy) in pixels, to compare backends exactly.
        backend: "auto" | "ext" | "torch".

    Returns:
        Same shape and dtype as ``mask``.
    """
    _tensor("mask", mask, 4, _IMAGE_DTYPES)
    B, _, H, W = mask.shape
    alpha = _per_sample("alpha", alpha, B, mask.device)
    smoothness = _per_sample("smoothness", smoothness, B, mask.device)
    if field is not None:
        _tensor("field", field, 4, _FLOATS)
        if field.shape != (B, 2, H, W):
            raise ValueError(f"field must have shape {(B, 2, H, W)}, got {tuple(field.shape)}")
        _same_device(mask=mask, field=field)
    return _run("elastic_warp", backend, mask.device, mask, alpha, smoothness, _seed(seed), field=field)


def rasterize_strokes(ctrl, width, height, width_px, *, samples=32, backend="auto"):
    """Anti-aliased cubic Bezier strokes (B, 1, H, W) float32 in [0, 1]; widths <= 0 draw nothing.

    Args:
        ctrl: (B, S, 4, 2) control points (x, y) in pixels.
        width: (B, S) stroke widths in pixels.
        height, width_px: output size.
        samples: points per curve (>= 2).
        backend: "auto" | "ext" | "torch".
    """
    _tensor("ctrl", ctrl, 4, _FLOATS)
    if ctrl.shape[2:] != (4, 2):
        raise ValueError(f"ctrl must have shape (B, S, 4, 2), got {tuple(ctrl.shape)}")
    _tensor("width", width, 2, _FLOATS)
    if width.shape != ctrl.shape[:2]:
        raise ValueError(f"width must have shape {tuple(ctrl.shape[:2])}, got {tuple(width.shape)}")
    _same_device(ctrl=ctrl, width=width)
    for name, v in (("height", height), ("width_px", width_px)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if isinstance(samples, bool) or not isinstance(samples, numbers.Integral) or samples < 2:
        raise ValueError(f"samples must be an int >= 2, got {samples!r}")
    return _run("rasterize_strokes", backend, ctrl.device, ctrl, width, int(height), int(width_px),
                samples=int(samples))
