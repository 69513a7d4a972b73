"""Pure-PyTorch reference of every custom op.

These are the oracles the fast paths (Triton kernels in ``fae_fast.kernels``, the C++/CUDA extension in
``csrc/``) are tested against, and the CPU fallback of every dispatcher in :mod:`fae_fast.ops`. They assume
valid input: type, shape and dtype checks live in :mod:`fae_fast.ops`.

Conventions shared by all backends:

* Images are float in [0, 1] (uint8 inputs are divided by 255), layout (B, C, H, W).
* The noise of a training step is ``eps = sigma[b] * z`` with ``z ~ N(0, 1)`` of the shape of ``x``, drawn
  from ``seed``. Within one backend the same seed always gives the same ``z``, so the loss can regenerate the
  noise that the injection added instead of storing the target ``x + eps``. Different backends draw different
  ``z`` (the reference uses ``torch.Generator``; Triton uses Philox through ``tl.randn4x`` with the counter
  (hw // 4, b * C + c) and lane hw % 4, so any block size regenerates the same eps); pass ``noise=`` to
  compare them exactly.
* ``sample_offset`` (the global index of sample 0, for a batch split across processes) keys eps per sample:
  sample b's eps then depends only on (seed, sample_offset + b, its shape), never on the batch it sits in. Triton
  adds it to the Philox row (offset 0 is its usual stream); the reference then draws each sample from its own
  generator seeded with :func:`sample_noise_seed` (None keeps its one draw for the whole batch).
* The anomaly-map box filter uses the *valid-count* border rule: at the border each output is the mean of the
  window's pixels that lie inside the image (``avg_pool2d(..., count_include_pad=False)``). It never
  darkens borders and is defined for a window wider than the image.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .config import GRADIENT_WEIGHT, LOSSES, MAP_ERRORS

__all__ = [
    "standard_noise",
    "sample_noise_seed",
    "corrupt_and_noise",
    "noisy_target_loss",
    "anomaly_map",
    "error_image",
    "ssim_error",
    "loss_image",
    "box_filter",
    "MAP_ERRORS",
    "elastic_field",
    "elastic_warp",
    "rasterize_strokes",
]


def _as_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 -> float32 in [0, 1]; floating tensors unchanged."""
    if x.dtype == torch.uint8:
        return x.float().div_(255.0)
    return x


def standard_noise(shape, seed: int, device, dtype=torch.float32) -> torch.Tensor:
    """z ~ N(0, 1) of ``shape`` drawn from ``seed`` with a fresh ``torch.Generator`` on ``device``.

    The reference's noise stream: identical for the same (shape, seed, device).
    """
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))
    return torch.randn(shape, generator=gen, device=device, dtype=torch.float32).to(dtype)


_MASK64 = (1 << 64) - 1


def sample_noise_seed(seed: int, index: int) -> int:
    """The reference's per-sample noise seed in [0, 2**63): splitmix64 of (seed, global sample ``index``)."""
    z = (int(seed) + (int(index) + 1) * 0x9E3779B97F4A7C15) & _MASK64
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9 & _MASK64
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB & _MASK64
    return (z ^ (z >> 31)) >> 1


def _noise(x: torch.Tensor, sigma: torch.Tensor, seed: int, noise: torch.Tensor | None,
           sample_offset: int | None = None) -> torch.Tensor:
    """eps = sigma[b] * z (float32), or the explicit ``noise`` (already scaled) when given; with
    ``sample_offset`` each sample's z comes from its own keyed generator (module doc)."""
    if noise is not None:
        return noise.float()
    if sample_offset is None:
        z = standard_noise(x.shape, seed, x.device)
    else:
        gen = torch.Generator(device=x.device)
        z = torch.empty(x.shape, device=x.device, dtype=torch.float32)
        for b in range(x.shape[0]):  # one small draw per sample: the CPU path, where a loop of B costs little
            gen.manual_seed(sample_noise_seed(seed, int(sample_offset) + b))
            z[b] = torch.randn(x.shape[1:], generator=gen, device=x.device)
    return z * sigma.float().view(-1, *([1] * (x.dim() - 1)))


def corrupt_and_noise(x, texture, mask, sigma, seed, *, noise=None, sample_offset=None):
    """Network input of a training step: ``(1 - m) * x + m * T + eps``.

    Args:
        x: clean images (B, C, H, W), uint8 or float in [0, 1].
        texture: texture images (B, C, H, W), same value range as ``x`` (uint8 allowed).
        mask: occlusion mask already multiplied by the opacity beta, (B, 1, H, W) in [0, 1]; beta is the weight
            of the *texture*: m = 1 shows only the texture.
        sigma: per-sample noise standard deviation (B,).
        seed: integer seed of the noise stream.
        noise: explicit eps (B, C, H, W), for tests; overrides ``sigma`` and ``seed``.
        sample_offset: global index of sample 0; given, eps is keyed per sample (module doc).

    Returns:
        The network input (B, C, H, W) in the dtype of ``x`` (float32 when ``x`` is uint8). The matching
        training target is ``x + eps`` with the same eps (see :func:`noisy_target_loss`).

    Example:
        >>> x = torch.rand(2, 3, 8, 8); t = torch.rand(2, 3, 8, 8); m = torch.zeros(2, 1, 8, 8)
        >>> inp = corrupt_and_noise(x, t, m, torch.zeros(2), seed=0)
        >>> torch.equal(inp, x)
        True
    """
    out_dtype = x.dtype if x.dtype.is_floating_point else torch.float32
    xf, tf, mf = _as_float(x).float(), _as_float(texture).float(), mask.float()
    blended = xf + mf * (tf - xf)
    return (blended + _noise(x, sigma, seed, noise, sample_offset)).to(out_dtype)


def noisy_target_loss(recon, x, sigma, seed, *, noise=None, sample_offset=None):
    """Mean squared error between ``recon`` and the noisy target ``x + eps`` (eps regenerated from ``seed``).

    Args:
        recon: network output (B, C, H, W), float (any precision).
        x: clean images (B, C, H, W), uint8 or float in [0, 1].
        sigma: per-sample noise standard deviation (B,).
        seed: the seed that :func:`corrupt_and_noise` used for this batch.
        noise: explicit eps, for tests.
        sample_offset: as given to :func:`corrupt_and_noise`.

    Returns:
        0-dim float32 tensor, differentiable with respect to ``recon``.
    """
    target = _as_float(x).float() + _noise(x, sigma, seed, noise, sample_offset)
    return (recon.float() - target).pow(2).mean()


# the normalised 3 x 3 Sobel derivative along W (cross-correlation); its transpose is the one along H
_SOBEL = ((-1.0, 0.0, 1.0), (-2.0, 0.0, 2.0), (-1.0, 0.0, 1.0))


def error_image(x, recon, error="squared"):
    """The per-pixel error before smoothing, (B, 1, H, W) float32.

    ``"squared"``: ``mean_c (recon - x)^2``. ``"gradient"``: ``mean_c |S (recon - x)|^2`` with ``S`` the 3 x 3
    Sobel derivatives along W and H divided by 8 (a unit step gives 1/2), the residual replicated at the border.
    ``"squared+gradient"``: the squared error plus :data:`~fae_fast.config.GRADIENT_WEIGHT` times the gradient
    one. The gradient of the residual keeps what changes within a few pixels (pits, cracks, scratches, the edges
    of a stain) and drops smooth offsets of the reconstruction; the squared term keeps the inside of large
    low-contrast defects, which the gradient alone sees only at their edges.
    """
    d = recon.float() - _as_float(x).float()
    sq = d.pow(2).mean(dim=1, keepdim=True)
    if error == "squared":
        return sq
    B, C, H, W = d.shape
    kx = torch.tensor(_SOBEL, device=d.device, dtype=torch.float32) / 8.0
    weight = torch.stack([kx, kx.t()]).unsqueeze(1)                       # (2, 1, 3, 3)
    g = F.conv2d(F.pad(d.reshape(B * C, 1, H, W), (1, 1, 1, 1), mode="replicate"), weight)
    grad = g.pow(2).sum(dim=1).reshape(B, C, H, W).mean(dim=1, keepdim=True)
    return grad if error == "gradient" else sq + GRADIENT_WEIGHT * grad


#: SSIM's Gaussian window (Wang et al. 2004): 11 taps, sigma 1.5; constants for data in [0, 1]
SSIM_WINDOW, SSIM_SIGMA, SSIM_C1, SSIM_C2 = 11, 1.5, 0.01 ** 2, 0.03 ** 2


def ssim_error(x, recon):
    """``1 - SSIM`` per pixel, (B, 1, H, W) float32: the channel mean of the structural dissimilarity of ``recon``
    to ``x`` (Wang et al., IEEE TIP 2004), local statistics under an 11-tap Gaussian window (sigma 1.5), the
    images replicated at the border, constants for data in [0, 1]. 0 where the two agree."""
    a, b = _as_float(x).float(), recon.float()
    B, C, H, W = a.shape
    t = torch.arange(SSIM_WINDOW, device=a.device, dtype=torch.float32) - SSIM_WINDOW // 2
    g = torch.exp(-t.pow(2) / (2 * SSIM_SIGMA ** 2))
    g = g / g.sum()
    r = SSIM_WINDOW // 2

    def blur(v):  # separable Gaussian, one channel per image plane
        v = F.pad(v.reshape(-1, 1, H, W), (r, r, r, r), mode="replicate")
        v = F.conv2d(F.conv2d(v, g.view(1, 1, 1, -1)), g.view(1, 1, -1, 1))
        return v.reshape(B, C, H, W)

    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b = blur(a * a) - mu_a ** 2, blur(b * b) - mu_b ** 2
    cov = blur(a * b) - mu_a * mu_b
    ssim = ((2 * mu_a * mu_b + SSIM_C1) * (2 * cov + SSIM_C2)
            / ((mu_a ** 2 + mu_b ** 2 + SSIM_C1) * (var_a + var_b + SSIM_C2)))
    return (1.0 - ssim).mean(dim=1, keepdim=True)


def loss_image(x, recon, loss="squared", ssim_weight=1.0):
    """The per-pixel training loss of ``train.loss`` (one of ``LOSSES``), (B, 1, H, W) float32: the map's
    :func:`error_image` for its error kinds; "squared+ssim": the squared error plus ``ssim_weight`` x
    :func:`ssim_error`."""
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    if loss == "squared+ssim":
        return error_image(x, recon, "squared") + ssim_weight * ssim_error(x, recon)
    return error_image(x, recon, loss)


def anomaly_map(x, recon, *, n=4, k=7, error="squared"):
    """Error map, n passes of a k x k mean filter, and the per-image max.

    ``e = error_image(x, recon, error)`` (``mean_c (recon - x)^2`` by default); ``e <- box_k(e)`` n times with the
    valid-count border rule (module doc); ``score = max_{h, w} e``.

    Args:
        x: input images (B, C, H, W), uint8 or float in [0, 1].
        recon: reconstructions (B, C, H, W), float.
        n: number of box-filter passes (0 = no smoothing).
        k: odd window size (1 = no smoothing).
        error: one of :data:`MAP_ERRORS`.

    Returns:
        (map (B, 1, H, W) float32, score (B,) float32).
    """
    err = box_filter(error_image(x, recon, error), n=n, k=k)
    return err, err.amax(dim=(1, 2, 3))


def box_filter(err, *, n, k):
    """``n`` passes of the valid-count ``k x k`` mean filter (module doc) over (B, 1, H, W) maps."""
    if k > 1:
        for _ in range(n):
            err = F.avg_pool2d(err, k, stride=1, padding=k // 2, count_include_pad=False)
    return err


def _gaussian_kernels(smoothness: torch.Tensor, radius: int) -> torch.Tensor:
    """Normalised 1-D Gaussian kernels, one per sample: (B, 2 * radius + 1) float32."""
    t = torch.arange(-radius, radius + 1, device=smoothness.device, dtype=torch.float32)
    s = smoothness.float().clamp_min(1e-3).view(-1, 1)
    w = torch.exp(-0.5 * (t / s) ** 2)
    return w / w.sum(dim=1, keepdim=True)


def elastic_field(shape, alpha, smoothness, seed, device=None):
    """Smooth random displacement field (B, 2, H, W) float32, channel 0 = dx, channel 1 = dy, in pixels.

    White noise z ~ N(0, 1) per pixel and component (drawn from ``seed`` like :func:`standard_noise`) is
    blurred by a Gaussian of std ``smoothness[b]`` pixels (separable, reflect border, radius
    ``ceil(3 * max(smoothness))`` capped by the image size), then rescaled to unit RMS over the image, then
    multiplied by ``alpha[b]``: alpha is the RMS displacement in pixels, smoothness its correlation length.

    Args:
        shape: (B, K, H, W) of the masks (K is ignored: one field per sample).
        alpha: (B,) RMS displacement in pixels.
        smoothness: (B,) Gaussian std in pixels.
        seed: integer seed.
        device: device of the field (defaults to alpha's).
    """
    B, _, H, W = shape
    device = alpha.device if device is None else device
    z = standard_noise((B, 2, H, W), seed, device)
    smax = float(smoothness.max()) if smoothness.numel() else 0.0
    radius = int(math.ceil(3.0 * smax))
    if radius > 0:
        g = _gaussian_kernels(smoothness.to(device), radius)  # (B, K)
        # one kernel per (sample, component): grouped separable convolution, reflect border
        wy = g.repeat_interleave(2, dim=0).view(B * 2, 1, -1, 1)
        wx = g.repeat_interleave(2, dim=0).view(B * 2, 1, 1, -1)
        z = z.view(1, B * 2, H, W)
        ry, rx = min(radius, H - 1), min(radius, W - 1)
        cy, cx = radius - ry, radius - rx  # crop the kernel where the image is smaller than it
        wy = wy[:, :, cy:wy.shape[2] - cy]
        wx = wx[:, :, :, cx:wx.shape[3] - cx]
        if ry > 0:
            z = F.conv2d(F.pad(z, (0, 0, ry, ry), mode="reflect"), wy / wy.sum(2, keepdim=True), groups=B * 2)
        if rx > 0:
            z = F.conv2d(F.pad(z, (rx, rx, 0, 0), mode="reflect"), wx / wx.sum(3, keepdim=True), groups=B * 2)
        z = z.view(B, 2, H, W)
    rms = z.pow(2).mean(dim=(1, 2, 3), keepdim=True).sqrt().clamp_min(1e-12)
    return z / rms * alpha.float().to(device).view(B, 1, 1, 1)


def elastic_warp(mask, alpha, smoothness, seed, *, field=None):
    """Warp masks by a smooth random displacement field, resampled bilinearly.

    ``out[b, k, y, x] = bilinear(mask[b, k], x + dx[b, y, x], y + dy[b, y, x])`` with pixel centres at integer
    coordinates; samples outside the image read 0 (a mask never grows from the border).

    Args:
        mask: (B, K, H, W) uint8 or float.
        alpha: (B,) RMS displacement in pixels.
        smoothness: (B,) correlation length (Gaussian std) of the field in pixels.
        seed: integer seed of the field.
        field: explicit (B, 2, H, W) displacement (dx, dy) in pixels; overrides alpha, smoothness and seed.

    Returns:
        Warped masks, same shape and dtype as ``mask`` (uint8 is rounded).
    """
    B, K, H, W = mask.shape
    if field is None:
        field = elastic_field(mask.shape, alpha, smoothness, seed, mask.device)
    field = field.float()
    ys = torch.arange(H, device=mask.device, dtype=torch.float32).view(1, H, 1)
    xs = torch.arange(W, device=mask.device, dtype=torch.float32).view(1, 1, W)
    sx = xs + field[:, 0]
    sy = ys + field[:, 1]
    # align_corners=False: pixel i has its centre at normalised (2i + 1) / W - 1; defined for W = 1 too
    grid = torch.stack(((2 * sx + 1) / W - 1, (2 * sy + 1) / H - 1), dim=-1)
    out = F.grid_sample(mask.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if mask.dtype == torch.uint8:
        return out.round_().clamp_(0, 255).to(torch.uint8)
    return out.to(mask.dtype)


def bezier_points(ctrl: torch.Tensor, samples: int) -> torch.Tensor:
    """Points of cubic Bezier curves: ctrl (..., 4, 2) -> (..., samples, 2)."""
    t = torch.linspace(0.0, 1.0, samples, device=ctrl.device, dtype=torch.float32).view(-1, 1)
    u = 1.0 - t
    c = ctrl.float()
    return (u ** 3 * c[..., 0:1, :] + 3 * u * u * t * c[..., 1:2, :]
            + 3 * u * t * t * c[..., 2:3, :] + t ** 3 * c[..., 3:4, :])


def rasterize_strokes(ctrl, width, height, width_px, *, samples=32):
    """Anti-aliased thin strokes along cubic Bezier curves (scratches, cracks).

    Each curve is flattened into ``samples - 1`` segments; a pixel's coverage is
    ``clamp(width / 2 + 0.5 - d, 0, 1)`` where d is the distance from the pixel centre to the polyline
    (a one-pixel linear ramp at the edge), and strokes of one sample are combined by max. A stroke of width
    <= 0 draws nothing, which lets a batch carry a variable number of strokes without host synchronisation.

    Args:
        ctrl: control points (B, S, 4, 2) as (x, y) in pixels.
        width: stroke widths (B, S) in pixels.
        height: output height H.
        width_px: output width W.
        samples: points per curve.

    Returns:
        (B, 1, H, W) float32 coverage in [0, 1].
    """
    B, S = ctrl.shape[:2]
    dev = ctrl.device
    pts = bezier_points(ctrl, samples)  # (B, S, T, 2)
    a, b = pts[:, :, :-1], pts[:, :, 1:]
    ys = torch.arange(height, device=dev, dtype=torch.float32).view(1, 1, height, 1)
    xs = torch.arange(width_px, device=dev, dtype=torch.float32).view(1, 1, 1, width_px)
    dist = torch.full((B, S, height, width_px), float("inf"), device=dev)
    for i in range(samples - 1):  # loop over segments, not images: memory stays (B, S, H, W)
        ax, ay = a[:, :, i, 0, None, None], a[:, :, i, 1, None, None]
        dx, dy = b[:, :, i, 0, None, None] - ax, b[:, :, i, 1, None, None] - ay
        L2 = (dx * dx + dy * dy).clamp_min(1e-12)
        t = (((xs - ax) * dx + (ys - ay) * dy) / L2).clamp(0.0, 1.0)
        px, py = ax + t * dx - xs, ay + t * dy - ys
        dist = torch.minimum(dist, (px * px + py * py).sqrt())
    w = width.float().view(B, S, 1, 1)
    cov = (w * 0.5 + 0.5 - dist).clamp(0.0, 1.0) * (w > 0)
    return cov.amax(dim=1, keepdim=True)
