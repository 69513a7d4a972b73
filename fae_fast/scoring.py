"""Batched scoring of images with a trained model, and thresholds from held-out normal images.

``compute_maps`` runs the model in eval mode under ``torch.inference_mode`` and turns each reconstruction into
an anomaly map with :func:`fae_fast.ops.anomaly_map` (channel-mean squared error, ``n`` passes of a ``k x k``
mean filter, per-image max). ``thresholds_from_holdout`` reads the image and pixel thresholds off normal images
that training never saw (DESIGN.md section 1.6).

Example:
    >>> n, k = smoothing_for_size(cfg.map, 256, 256)                           # doctest: +SKIP
    >>> maps, scores = compute_maps(model, holdout_uint8, n=n, k=k)            # doctest: +SKIP
    >>> thresholds_from_holdout(scores, maps, 0.99, 0.999)                     # doctest: +SKIP
    {'image': 0.0123, 'pixel': 0.0101}
"""
from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
import torch.nn.functional as F

from . import ops, reference
from .config import IMAGE_SCORES, frame_size, template_passes

__all__ = ["resolve_device", "autocast_dtype", "compute_maps", "evaluating", "reconstruct", "network_view", "frame_map",
           "thresholds_from_holdout", "check_threshold", "MapNormalizer",
           "map_statistics", "normalize_maps", "check_map_statistics", "stored_map_statistics",
           "leave_one_out_normalized", "template_maps", "template_statistics", "fuse_scores",
           "template_fused", "mix_template", "check_template_weight",
           "NORMALIZE_MODES", "IMAGE_SCORES", "TEMPLATE_KEYS"]

_AMP = ("auto", "bf16", "fp16", "fp32")


def resolve_device(device) -> torch.device:
    """``None``/``"auto"`` -> CUDA when available, else CPU; strings and devices pass through."""
    if device is None or (isinstance(device, str) and device == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda[:i]' or a torch.device, got {device!r}") from None


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``amp`` on ``device``; None means plain fp32.

    "auto" is bf16 on CUDA (no loss scaling needed, full fp32 range) and fp32 on the CPU (CPU bf16 convolutions
    are slower than fp32 on most CPUs and would make CPU runs differ from the reference).
    """
    if amp not in _AMP:
        raise ValueError(f"amp must be one of {_AMP}, got {amp!r}")
    if amp == "fp32" or (amp == "auto" and device.type != "cuda"):
        return None
    if amp == "fp16":
        return torch.float16
    return torch.bfloat16


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def network_view(x: torch.Tensor, scale: int) -> torch.Tensor:
    """What the network sees of frames read at ``scale`` x its size (``map.frame_scale``): their
    ``scale x scale`` area mean, rounded back to uint8 for uint8 frames (so the network's map is exactly the one of
    an image of the network's size); float frames stay float. ``scale`` 1: the frames themselves."""
    if scale == 1:
        return x
    if x.dtype == torch.uint8:
        return F.avg_pool2d(x.to(torch.float32), scale).round_().to(torch.uint8)
    return F.avg_pool2d(x, scale)


def frame_map(maps: torch.Tensor, scale: int) -> torch.Tensor:
    """The network's (B, 1, H, W) maps on the frame's pixels: each value repeated ``scale x scale`` times
    (nearest neighbour, exact; the max, the image score, is unchanged)."""
    return maps if scale == 1 else F.interpolate(maps, scale_factor=float(scale), mode="nearest")


@contextlib.contextmanager
def evaluating(model: torch.nn.Module):
    """``model`` in eval mode for the block, its own mode restored after (also when the block raises)."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def reconstruct(model: torch.nn.Module, frames: torch.Tensor, frame_scale: int, dtype: torch.dtype | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(the network's view of ``frames`` (:func:`network_view`), its reconstruction): the view / 255 through
    ``model`` under autocast to ``dtype`` (None: float32), channels-last on CUDA. The view stays as it is (uint8):
    the error map is taken against it, never against its low-precision copy. The caller sets eval and inference
    mode."""
    view = network_view(frames, frame_scale)
    inp = view.float().div_(255.0)
    if frames.device.type == "cuda":
        inp = inp.contiguous(memory_format=torch.channels_last)
    with _autocast(frames.device, dtype):
        return view, model(inp)


def compute_maps(model: torch.nn.Module, images: torch.Tensor, *, n: int, k: int, error: str | None = None,
                 batch_size: int = 32, device=None, amp: str = "auto", normalize: str = "none",
                 stats: dict[str, torch.Tensor] | None = None, image_score: str = "max",
                 template_n: int | None = None, frame_scale: int = 1, template_weight: float = 0.0
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Anomaly maps and image scores of ``images``.

    Args:
        model: reconstruction network, (B, 3, H, W) float in [0, 1] -> (B, 3, H, W). It is switched to eval mode
            for the call and restored afterwards.
        images: uint8 (N, 3, H, W), on any device (batches are moved to ``device`` one at a time).
        n: box-filter passes; k: odd window (see :func:`fae_fast.config.smoothing_for_size`).
        error: the error kind (:func:`fae_fast.reference.error_image`); None: the default
            :class:`~fae_fast.config.MapConfig`'s.
        batch_size: images per forward pass.
        device: where to run; None = the model's device. The model is not moved.
        amp: "auto" (bf16 on CUDA, fp32 on CPU) | "bf16" | "fp16" | "fp32".
        normalize, stats: per-pixel normalisation of the maps (:func:`normalize_maps`); the score is then the max
            of the normalised map.
        image_score: "max" | "max+template" (:class:`MapNormalizer`; ``stats`` must then hold the template's).
        template_n: the template's box-filter passes (``map.template_n``); None: ``n``.
        template_weight: the template's share of the pixel map (``map.template_weight``; "max+template" only).
        frame_scale: ``images`` are frames at this many times the network's size (``map.frame_scale``):
            the network maps :func:`network_view` of them (``n``, ``k`` are its own), the maps come back on the
            frame's pixels (:func:`frame_map`) and the template reads the frames.

    Returns:
        (maps (N, 1, H, W) float32 on the CPU, scores (N,) float32 on the CPU), at the frames' (H, W).
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a uint8 torch.Tensor (N, 3, H, W), got {type(images).__name__}")
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} of shape {tuple(images.shape)}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    dev = _model_device(model) if device is None else resolve_device(device)
    dtype = autocast_dtype(amp, dev)
    if error is None:
        from .config import MapConfig

        error = MapConfig().error
    N, _, H, W = images.shape
    scale = int(frame_scale)
    if scale < 1 or H % scale or W % scale:
        raise ValueError(f"frames of {H}x{W} are not {scale} x the network's size (frame_scale {frame_scale!r})")
    normalizer = MapNormalizer(normalize, stats, (H, W), image_score=image_score, n=n, k=k, error=error,
                               template_n=template_n, template_weight=template_weight).to(dev)
    maps = torch.empty((N, 1, H, W), dtype=torch.float32)
    scores = torch.empty((N,), dtype=torch.float32)
    # pinned host buffers let the device->host copies overlap the next batch (CUDA only)
    pin = dev.type == "cuda"
    if pin:
        maps, scores = maps.pin_memory(), scores.pin_memory()
    with evaluating(model), torch.inference_mode():
        for s in range(0, N, batch_size):
            xb = images[s:s + batch_size].to(dev, non_blocking=True)
            xv, recon = reconstruct(model, xb, scale, dtype)
            amap, score = ops.anomaly_map(xv, recon, n=n, k=k, error=error)
            amap, score = normalizer(frame_map(amap, scale), score, xb)
            maps[s:s + len(xb)].copy_(amap, non_blocking=pin)
            scores[s:s + len(xb)].copy_(score, non_blocking=pin)
        if pin:
            torch.cuda.synchronize(dev)
    return maps, scores


def _quantile(values: torch.Tensor, q: float) -> float:
    # numpy, not torch.quantile: torch.quantile refuses inputs above 16 M elements (a few hundred 256^2 maps)
    arr = values.detach().reshape(-1).cpu().double().numpy()
    return float(np.quantile(arr, q))


def thresholds_from_holdout(scores: torch.Tensor, maps: torch.Tensor, image_q: float,
                            pixel_q: float) -> dict[str, float]:
    """Image and pixel thresholds as quantiles of held-out normal scores and map pixels.

    Args:
        scores: (N,) image scores of held-out normal images.
        maps: (N, 1, H, W) their anomaly maps.
        image_q: quantile of ``scores`` for the image threshold, in [0, 1].
        pixel_q: quantile of all map pixels for the pixel threshold, in [0, 1].

    Returns:
        ``{"image": float, "pixel": float}``.
    """
    for name, q in (("image_q", image_q), ("pixel_q", pixel_q)):
        if not 0.0 <= float(q) <= 1.0:
            raise ValueError(f"{name} must be a quantile in [0, 1], got {q!r}")
    if not isinstance(scores, torch.Tensor) or not isinstance(maps, torch.Tensor):
        raise TypeError("scores and maps must be torch tensors")
    if scores.numel() == 0 or maps.numel() == 0:
        raise ValueError("thresholds need at least one held-out normal image (got none)")
    return {"image": _quantile(scores, float(image_q)), "pixel": _quantile(maps, float(pixel_q))}


# --------------------------------------------------------------------------------------------------------------
# normalising the error map by per-pixel statistics of normal images

NORMALIZE_MODES = ("none", "mean", "zscore")


def map_statistics(maps: torch.Tensor, window: int = 1, pool: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Per-pixel statistics of the anomaly maps of normal images, for :func:`normalize_maps`.

    Args:
        maps: (N, 1, H, W) float maps of held-out normal images (at least 2 together with ``pool``).
        window: odd; the per-pixel std is replaced by its maximum over a ``window x window`` neighbourhood
            (``map.spread_window``): structures that move by a few pixels from part to part (edges, glare) keep
            their spread where the next part puts them. 1: each pixel's own std.
        pool: (P, 1, H, W) maps of further normal images in the statistics (``map.statistics`` "all": the
            training images'), as in :func:`leave_one_out_normalized`; None: ``maps`` alone.

    Returns:
        ``{"mean": (1, 1, H, W), "scale": (1, 1, H, W)}``: the per-pixel mean, and the per-pixel std plus the
        median of all per-pixel stds (a floor: with a few dozen images a pixel's own std is noisy, and dividing
        by a near-zero one would turn quiet pixels into false alarms).
    """
    if not isinstance(maps, torch.Tensor) or maps.dim() != 4 or maps.shape[1] != 1:
        raise ValueError(f"maps must be a (N, 1, H, W) tensor, got {getattr(maps, 'shape', type(maps).__name__)}")
    if pool is not None:
        maps = torch.cat([pool, maps])
    if maps.shape[0] < 2:
        raise ValueError(f"per-pixel statistics need at least 2 normal images, got {maps.shape[0]}")
    m = maps.double()
    mean = m.mean(0, keepdim=True)
    std = _spread(m.std(0, keepdim=True, correction=1), window)
    floor = std.flatten().median()
    return {"mean": mean.float(), "scale": (std + floor).clamp_min(1e-12).float()}


def _spread(std: torch.Tensor, window: int) -> torch.Tensor:
    """(N, 1, H, W) per-pixel stds, max-filtered over ``window x window`` (odd; borders see fewer pixels)."""
    window = int(window)
    if window < 1 or window % 2 != 1:
        raise ValueError(f"spread window must be an odd int >= 1, got {window!r}")
    return std if window == 1 else F.max_pool2d(std, window, stride=1, padding=window // 2)


def check_map_statistics(stats, size: tuple[int, int], mode: str = "zscore", what: str = "map statistics",
                         image_score: str = "max") -> None:
    """``stats`` must be what :func:`map_statistics` returns for maps of ``size`` (H, W), with finite values (and,
    for ``image_score`` "max+template", what :func:`template_statistics` adds)."""
    if mode not in NORMALIZE_MODES:
        raise ValueError(f"normalize mode must be one of {NORMALIZE_MODES}, got {mode!r}")
    if image_score not in IMAGE_SCORES:
        raise ValueError(f"image score must be one of {IMAGE_SCORES}, got {image_score!r}")
    if mode == "none":
        if image_score != "max":
            raise ValueError(f"{what}: image score {image_score!r} needs a map normalisation ('mean' or 'zscore')")
        return
    keys = _stat_keys(image_score)
    if not isinstance(stats, dict) or not set(keys) <= set(stats):
        raise ValueError(f"{what}: normalize mode {mode!r}" + ("" if image_score == "max" else
                         f" with image score {image_score!r}") + f" needs per-pixel statistics {list(keys)} of "
                         "normal images")
    for key in keys:
        t = stats[key]
        shape = (1, 1, *size) if key in ("mean", "scale", "template_mean", "template_scale") else ()
        positive = key.endswith(("scale", "spread"))
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
            raise ValueError(f"{what}: {key} must be a {shape or 'scalar'} tensor, got "
                             f"{tuple(getattr(t, 'shape', ())) or type(t).__name__}")
        if not bool(torch.isfinite(t).all()) or (positive and not bool((t > 0).all())):
            raise ValueError(f"{what}: {key} holds non-finite{' or non-positive' if positive else ''} values")


def stored_map_statistics(model_file, path) -> dict[str, torch.Tensor] | None:
    """The per-pixel statistics a model file (:class:`fae_fast.checkpoint.ModelFile`) carries for its
    ``map.normalize`` (None for "none"), checked against its frame size (``map.frame_scale`` x its image size);
    ``ValueError`` naming ``path``."""
    mode = model_file.config.map.normalize
    if mode == "none":
        return None
    stats = model_file.meta.get("map_stats")
    check_map_statistics(stats, frame_size(model_file.config.map, model_file.image_size), mode, what=str(path),
                         image_score=model_file.config.map.image_score)
    return {k: v.float() for k, v in stats.items()}


def leave_one_out_normalized(maps: torch.Tensor, mode: str, window: int = 1, pool: torch.Tensor | None = None,
                             chunk: int = 256) -> torch.Tensor:
    """Each map normalised by the statistics of the *other* maps (N >= 3; ``window`` as in
    :func:`map_statistics`): the held-out normal images give both the statistics and the thresholds, and
    normalising an image by statistics that include it would shrink its own extremes and set the thresholds too
    low.

    Args:
        pool: (P, 1, H, W) maps of further normal images in every map's statistics (``map.statistics`` "all": the
            training images'), not normalised themselves.
        chunk: maps normalised at a time (the per-pixel sums are taken once, in float64), so a large pool costs
            about its own memory, not several float64 copies of it.
    """
    if mode == "none":
        return maps
    groups = [maps] if pool is None else [maps, pool]
    N = sum(g.shape[0] for g in groups)
    if N < (3 if mode == "zscore" else 2):
        raise ValueError(f"leave-one-out {mode} statistics need at least {3 if mode == 'zscore' else 2} normal "
                         f"images, got {N}")
    s1 = torch.zeros((1, *maps.shape[1:]), dtype=torch.float64, device=maps.device)
    s2 = torch.zeros_like(s1)
    for g in groups:
        for i in range(0, g.shape[0], chunk):
            m = g[i:i + chunk].double()
            s1 += m.sum(0, keepdim=True)
            s2 += (m * m).sum(0, keepdim=True)
    out = torch.empty(maps.shape, dtype=torch.float32, device=maps.device)
    for i in range(0, maps.shape[0], chunk):
        m = maps[i:i + chunk].double()
        mean = (s1 - m) / (N - 1)
        o = m - mean
        if mode == "zscore":  # N >= 3: the other N - 1 >= 2 images have a std
            var = ((s2 - m * m) - (N - 1) * mean * mean) / (N - 2)
            std = _spread(var.clamp_min(0.0).sqrt(), window)
            floor = std.flatten(1).median(dim=1).values.view(-1, 1, 1, 1)
            o = o / (std + floor).clamp_min(1e-12)
        out[i:i + chunk] = o.float()
    return out


#: what :func:`template_statistics` adds to the map statistics for ``map.image_score`` "max+template"
TEMPLATE_KEYS = ("template_mean", "template_scale", "score_center", "score_spread", "template_center",
                 "template_spread")


def _stat_keys(image_score: str) -> tuple[str, ...]:
    """The statistics a normalising model with ``image_score`` carries."""
    return ("mean", "scale") + (TEMPLATE_KEYS if image_score != "max" else ())


def template_maps(images: torch.Tensor, *, n: int, k: int, error: str, batch_size: int = 64) -> torch.Tensor:
    """The maps of the network-free template: each image's error against its own per-channel mean, smoothed as
    the model's map (``n``, ``k``, ``error``). Z-scored per pixel by normal images, it is a statistical model of
    aligned parts: how far each pixel is from where normal parts put their brightness and edges.

    Args:
        images: (N, C, H, W) uint8, or float in [0, 1].

    Returns:
        (N, 1, H, W) float32 maps on ``images``' device.
    """
    out = [_template_map(images[i:i + batch_size], n, k, error) for i in range(0, images.shape[0], batch_size)]
    return torch.cat(out) if out else images.new_zeros((0, 1, *images.shape[2:]), dtype=torch.float32)


def _template_map(x: torch.Tensor, n: int, k: int, error: str, map_fn=None) -> torch.Tensor:
    """The template's map of ``x`` through ``map_fn`` (an :func:`fae_fast.ops.anomaly_map` backend: the engine's own,
    Triton on CUDA) or, when None, the pure-PyTorch reference (also what an ONNX export traces). ``x`` goes to the
    map op as it is (uint8 is read directly, as for the network's map): only its per-channel mean is taken here."""
    mean = x.to(torch.float32).mean(dim=(2, 3), keepdim=True)
    fill = (mean / 255.0 if x.dtype == torch.uint8 else mean).expand(x.shape)
    if map_fn is None:
        return reference.anomaly_map(x, fill, n=n, k=k, error=error)[0]
    return map_fn(x, fill.contiguous(), n=n, k=k, error=error)[0]


def fuse_scores(score: torch.Tensor, template_score: torch.Tensor, stats: dict[str, torch.Tensor]) -> torch.Tensor:
    """``map.image_score`` "max+template": the mean of the network's and the template's image scores (the max of
    each normalised map), each standardised by the mean and std of the held-out normal images' scores, so that
    neither dominates by its units and a frame far from normal in either counts."""
    return 0.5 * ((score - stats["score_center"]) / stats["score_spread"]
                  + (template_score - stats["template_center"]) / stats["template_spread"])


def template_fused(amap: torch.Tensor, score: torch.Tensor, template_map: torch.Tensor,
                   stats: dict[str, torch.Tensor], mode: str, weight: float = 0.0
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The normalised map ``amap`` and its ``score`` with the template's: ``template_map`` (raw, as
    :func:`template_maps` gives it) normalised by the template's statistics in ``stats``; the score
    :func:`fuse_scores` of both maxima, the map :func:`mix_template` of both maps by ``weight``
    (``map.template_weight``)."""
    t = normalize_maps(template_map, {"mean": stats["template_mean"], "scale": stats["template_scale"]}, mode)
    return mix_template(amap, t, weight), fuse_scores(score, t.amax(dim=(1, 2, 3)), stats)


def mix_template(amap: torch.Tensor, template_map: torch.Tensor, weight: float) -> torch.Tensor:
    """``map.template_weight`` w: the pixel map ``(1 - w) amap + w template_map``, both normalised maps of one
    size; ``amap`` itself for w = 0."""
    w = float(weight)
    return amap if w == 0 else amap * (1.0 - w) + template_map * w


def template_statistics(hold_images: torch.Tensor, loo_scores: torch.Tensor, *, n: int, k: int, error: str,
                        mode: str, window: int = 1, hold_templates: torch.Tensor | None = None,
                        pool_templates: torch.Tensor | None = None
                        ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """What ``map.image_score`` "max+template" adds to the map statistics, from the held-out normal images.

    Args:
        hold_images: the held-out normal images (N >= 3), uint8.
        loo_scores: their network scores, each from leave-one-out normalised maps (as the thresholds are read).
        n, k, error: the model's smoothing and error kind; mode, window: its normalisation (not "none").
        hold_templates: the held-out images' template maps (:func:`template_maps`), when the caller has them.
        pool_templates: (P, 1, H, W) template maps of further normal images in the template's per-pixel
            statistics (``map.statistics`` "all": the training images'; the template has no training, so they
            are as new to it as the held-out ones); the standardisation of its score still comes from the
            held-out images, each normalised by the statistics of all the others.

    Returns:
        ({TEMPLATE_KEYS: tensors}, the held-out images' fused scores, leave-one-out as well: the image threshold
        is read off them, and their leave-one-out normalised template maps (N, 1, H, W): ``map.template_weight``
        mixes them into the held-out maps the pixel threshold is read off).
    """
    if mode == "none":
        raise ValueError("image score 'max+template' needs a map normalisation ('mean' or 'zscore')")
    if hold_images.shape[0] < 3 or loo_scores.shape[0] != hold_images.shape[0]:
        raise ValueError(f"template statistics need >= 3 held-out images and one score each, got "
                         f"{hold_images.shape[0]} images and {loo_scores.shape[0]} scores")
    t = (template_maps(hold_images, n=n, k=k, error=error) if hold_templates is None else hold_templates).cpu()
    pool = None if pool_templates is None else pool_templates.cpu()
    tstats = map_statistics(t, window, pool=pool)
    t_maps = leave_one_out_normalized(t, mode, window, pool=pool)
    t_loo = t_maps.amax(dim=(1, 2, 3))
    s = loo_scores.detach().float().cpu()
    extra = {"template_mean": tstats["mean"], "template_scale": tstats["scale"],
             "score_center": s.mean(), "score_spread": s.std().clamp_min(1e-12),
             "template_center": t_loo.mean(), "template_spread": t_loo.std().clamp_min(1e-12)}
    return extra, fuse_scores(s, t_loo, extra), t_maps


def holdout_statistics(hold_maps: torch.Tensor, mode: str, window: int = 1, pool: torch.Tensor | None = None, *,
                       hold_images: torch.Tensor | None = None, template_n: int = 1, k: int = 3,
                       error: str = "squared", template_weight: float = 0.0,
                       hold_templates: torch.Tensor | None = None, pool_templates: torch.Tensor | None = None
                       ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Everything a normalising model reads off its held-out normal images, as :func:`fae_fast.train.train` and
    ``fae-fast ablate`` both take it.

    Args:
        hold_maps: (N, 1, H, W) raw maps of the held-out images; pool: those of further normal images in the
            per-pixel statistics (``map.statistics`` "all"), as in :func:`map_statistics`.
        mode, window: the normalisation (not "none") and ``map.spread_window``.
        hold_images: the held-out images themselves for ``map.image_score`` "max+template" (None: the plain max);
            with them the template's ``template_n`` passes of window ``k``, ``error``, its share of the pixel map
            ``template_weight``, and its maps where the caller has them (``hold_templates``; ``pool_templates``
            for "all"), as :func:`template_statistics` takes them.

    Returns:
        (the statistics: :func:`map_statistics`' and, with the template, :data:`TEMPLATE_KEYS`; the held-out
        maps, each normalised leave-one-out (the template's share mixed in); their image scores, the max or the
        fused score): the thresholds are read off the last two, as new normal images will be scored.
    """
    stats = map_statistics(hold_maps, window, pool=pool)
    maps = leave_one_out_normalized(hold_maps, mode, window, pool=pool)
    scores = maps.amax(dim=(1, 2, 3))
    if hold_images is not None:
        extra, scores, t_maps = template_statistics(hold_images, scores, n=template_n, k=k, error=error, mode=mode,
                                                    window=window, hold_templates=hold_templates,
                                                    pool_templates=pool_templates)
        stats.update(extra)
        maps = mix_template(maps, t_maps, template_weight)
    return stats, maps, scores


def normalize_maps(maps: torch.Tensor, stats: dict[str, torch.Tensor] | None, mode: str) -> torch.Tensor:
    """``mode`` "none": maps as they are; "mean": ``maps - mean``; "zscore": ``(maps - mean) / scale``
    (``stats`` from :func:`map_statistics`). A pixel where normal images always reconstruct badly (edges, glare,
    the frame border) then stops outscoring a real defect elsewhere."""
    if mode not in NORMALIZE_MODES:
        raise ValueError(f"normalize mode must be one of {NORMALIZE_MODES}, got {mode!r}")
    if mode == "none":
        return maps
    if stats is None:
        raise ValueError(f"normalize mode {mode!r} needs per-pixel statistics of normal images")
    out = maps - stats["mean"].to(maps.device)
    return out if mode == "mean" else out / stats["scale"].to(maps.device)


class MapNormalizer(torch.nn.Module):
    """:func:`normalize_maps` as a module, for compiled and exported graphs: ``(map, score, x) -> (map', score')``
    with ``score' = max(map')``, or with ``image_score`` "max+template" the fused score of :func:`fuse_scores`
    (the template's map of ``x`` normalised by its own statistics); the identity for mode "none".

    The statistics are buffers: they travel with ``.to()`` and are part of an ONNX export and of a graph's
    fingerprint.
    """

    def __init__(self, mode: str = "none", stats: dict[str, torch.Tensor] | None = None,
                 size: tuple[int, int] | None = None, *, image_score: str = "max", n: int = 4, k: int = 7,
                 error: str = "squared", template_n: int | None = None, template_weight: float = 0.0):
        super().__init__()
        self.mode, self.image_score = mode, image_score
        self.template_weight = check_template_weight(template_weight)
        # the template's smoothing: template_n passes (None: n, the map's) of the map's window k
        self.n, self.k, self.error = template_passes(template_n, n), int(k), error
        if mode == "none" and image_score == "max":
            return
        if size is None:
            size = tuple(stats["mean"].shape[-2:]) if isinstance(stats, dict) and "mean" in stats else (0, 0)
        check_map_statistics(stats, tuple(size), mode, image_score=image_score)
        for key in _stat_keys(image_score):
            self.register_buffer(key, stats[key].float().clone())

    def forward(self, amap: torch.Tensor, score: torch.Tensor, x: torch.Tensor | None = None,
                map_fn=None) -> tuple[torch.Tensor, torch.Tensor]:
        """``map_fn``: the map op of the template's map (None: the reference; the engine passes its own)."""
        if self.mode == "none":
            return amap, score
        out = normalize_maps(amap, {"mean": self.mean, "scale": self.scale}, self.mode)
        score = out.amax(dim=(1, 2, 3))
        if self.image_score == "max":
            return out, score
        if x is None:
            raise ValueError(f"image score {self.image_score!r} needs the images (x) the maps came from")
        return template_fused(out, score, _template_map(x, self.n, self.k, self.error, map_fn),
                              {key: getattr(self, key) for key in TEMPLATE_KEYS}, self.mode, self.template_weight)


def check_template_weight(value) -> float:
    """``map.template_weight`` as a float in [0, 1] (used with ``image_score`` "max+template" only)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ValueError(f"template_weight (the template's share of the pixel map) must be in [0, 1], got {value!r}")
    return float(value)


def check_threshold(value, name: str) -> float | None:
    """``value`` as a finite float (None stays None); the one validation of every image and pixel threshold.

    A NaN threshold makes every ``score > t`` False (every part "good") and an infinite one makes a class
    impossible, so both are refused.

    Args:
        value: a real number (Python, numpy or a one-element tensor) or None.
        name: what to call it in the error, e.g. ``"image_threshold"`` or ``"model.fae: stored pixel threshold"``.

    Raises:
        TypeError: not a number (a string, a bool, a container).
        ValueError: NaN or +-inf.
    """
    if value is None:
        return None
    if isinstance(value, (str, bytes, bool)):
        raise TypeError(f"{name} must be a number or None, got {type(value).__name__} {value!r}")
    try:
        v = float(value)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{name} must be a number or None, got {type(value).__name__}") from None
    if not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number, got {v}")
    return v
