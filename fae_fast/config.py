"""Every knob of fae_fast in plain dataclasses, with the defaults of DESIGN.md.

Defaults marked *(chosen)* in DESIGN.md are decisions of this project where the paper is silent. A whole
:class:`FAEConfig` round-trips through ``to_dict`` / ``from_dict`` (it is stored in every model file).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any


@dataclass
class CorruptionConfig:
    """Artificial occlusions x~ = (1 - beta M) x + beta M T applied to normal training images."""

    p: float = 0.8                      # probability that an image is corrupted at all (chosen)
    k_min: int = 1                      # occlusions per corrupted image, K ~ U{k_min..k_max} (chosen)
    k_max: int = 3
    beta_min: float = 0.1               # opacity beta ~ U(beta_min, beta_max): the weight of the *texture*
    beta_max: float = 1.0
    # shape mix (relative weights): Perlin blobs, ellipses/polygons, thin Bezier strokes
    w_perlin: float = 0.4
    w_polygon: float = 0.3
    w_stroke: float = 0.3
    perlin_scales: tuple[int, ...] = (2, 4, 8, 16, 32)  # grid cells across the image for Perlin octaves
    # the coarsest octave of a blob is drawn among the scales <= this (finer ones add detail on top): a base
    # octave of 32 cells made "blobs" of ~30 specks of 4 px at 112x280, which the model learns to pass through
    perlin_base_max: int = 4
    # > 0: each Perlin occlusion is one blob (a Gaussian envelope of its area) with edges roughened by the noise
    # at this weight; 0: the top of a noise field over the whole frame (many separate pieces)
    perlin_envelope: float = 0.3
    perlin_coverage: tuple[float, float] = (0.01, 0.15)  # fraction of the image a blob occlusion covers
    polygon_size: tuple[float, float] = (0.03, 0.3)  # ellipse/polygon radius, fraction of min(H, W)
    stroke_width: tuple[float, float] = (1.0, 4.0)   # pixels (scratches, cracks)
    stroke_length: tuple[float, float] = (0.1, 0.6)  # fraction of max(H, W)
    elastic_alpha: tuple[float, float] = (0.0, 0.02)  # RMS displacement, fraction of min(H, W)
    elastic_smoothness: tuple[float, float] = (0.02, 0.06)  # correlation length, fraction of min(H, W)
    soft_edge: float = 0.5              # probability of a soft (blurred) mask edge
    # texture sources (relative weights): texture folder, other training images, procedural fields
    texture_dir: str | None = None
    w_texture_dir: float = 0.4          # used only when texture_dir is set
    w_other_image: float = 0.4
    w_procedural: float = 0.2
    color_jitter: float = 0.2           # brightness/contrast/saturation jitter of borrowed textures
    stroke_samples: int = 16            # points per Bezier stroke when rasterising
    capacity_sigmas: float | None = 4.0  # occlusion slots per batch: expected + this many std (None: all slots)


@dataclass
class NoiseConfig:
    """Symmetric noise: the same eps ~ N(0, sigma^2 I) on input and target, sigma ~ U(0, sigma_max)."""

    sigma_max: float = 0.1              # r in DESIGN.md (chosen)
    # "absolute": sigma ~ U(0, sigma_max) in intensity units; "image_noise": sigma ~ U(0, sigma_max * s) with s the
    # training images' own noise std (Immerkaer's estimator), so one setting means the same on clean and grainy data
    sigma_reference: str = "absolute"
    # "symmetric" (the paper), "none", "input" (input only), "independent" (separate eps on each side)
    mode: str = "symmetric"


@dataclass
class ModelConfig:
    """The modified U-Net of DESIGN.md section 1.3."""

    in_channels: int = 3
    widths: tuple[int, ...] = (64, 128, 256, 512)
    dilations: tuple[int, ...] = (1, 2, 4, 8)  # stacked dilated 3x3 convs in the bottleneck
    norm: str = "batch"                 # "batch" | "group" | "instance" | "none"
    act: str = "relu"                   # "relu" | "silu" | "gelu"
    gated_skips: bool = True            # out = s * e + (1 - s) * d, s = sigmoid(conv([e, d]))
    skip_mode: str = "concat"           # "concat" | "add" | "none" (no skips: plain AE), when gated_skips is False
    downsample: str = "maxpool"         # "maxpool" | "conv" (stride-2 conv-norm-act)
    upsample: str = "bilinear"          # "bilinear" (+1x1 conv) | "transpose"
    residual: bool = True               # output x + head(features), head zero-initialised: starts as identity


@dataclass
class MapConfig:
    """Inference smoothing: n passes of a k x k mean filter at ``ref_size``; scaled with resolution."""

    n: int = 4
    k: int = 7
    ref_size: int = 256                 # n, k are the values at min(H, W) == ref_size
    scale_with_size: bool = True
    # per-pixel normalisation by statistics of held-out normal images: "none" | "mean" (subtract the mean map) |
    # "zscore" (and divide by the per-pixel std plus its median): pixels that are always hard to reconstruct
    # (edges, glare, the frame border) stop outscoring real defects
    normalize: str = "none"


@dataclass
class TrainConfig:
    steps: int = 2000
    batch_size: int = 16
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 50
    grad_clip: float = 1.0
    image_size: tuple[int, int] | str = (256, 256)  # (H, W), non-square allowed; or "auto" (below)
    auto_pixels: int = 256 * 256        # "auto" size: the data's aspect ratio at about this many pixels
    keep_aspect: bool = False           # resize keeping aspect ratio and pad, instead of stretching
    # train on random (h, w) crops of the resident images and infer on whole images (the U-Net is fully
    # convolutional): resolution for thin defects without the cost of whole frames per step; None = whole images
    crop_size: tuple[int, int] | None = None
    holdout_fraction: float = 0.1       # normal images kept out of training for thresholds
    threshold_quantile: float = 0.99    # image threshold = this quantile of held-out normal scores (chosen)
    pixel_threshold_quantile: float = 0.999
    # off: inspection images have a fixed geometry (thread slant, lighting) that test images never mirror
    augment_flip: bool = False
    augment_rot90: bool = False
    amp: str = "auto"                   # "auto" (bf16 on CUDA, fp32 on CPU) | "bf16" | "fp16" | "fp32"
    compile: bool = False
    channels_last: bool = True
    checkpoint_every: int = 500
    seed: int = 0
    device: str = "auto"
    num_workers: int = 2


@dataclass
class FAEConfig:
    corruption: CorruptionConfig = field(default_factory=CorruptionConfig)
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    map: MapConfig = field(default_factory=MapConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FAEConfig":
        """Build from a dict; unknown keys raise ``ValueError`` naming them, lists become tuples."""
        kwargs = {}
        for f in fields(cls):
            sub = d.get(f.name, {})
            sub_cls = f.default_factory  # type: ignore[misc]
            kwargs[f.name] = _sub_from_dict(sub_cls, sub, f.name)
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown config sections: {sorted(unknown)}")
        return cls(**kwargs)


def _sub_from_dict(sub_cls, d: dict[str, Any], section: str):
    known = {f.name: f for f in fields(sub_cls)}
    unknown = set(d) - set(known)
    if unknown:
        raise ValueError(f"unknown keys in config section {section!r}: {sorted(unknown)}")
    vals = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
    return sub_cls(**vals)


def smoothing_for_size(cfg: MapConfig, height: int, width: int) -> tuple[int, int]:
    """(n, k) for an image of ``height x width``: k scales with min(H, W) / ref_size (odd, 1..31).

    The equivalent Gaussian has variance n (k^2 - 1) / 12, so its std grows linearly with k: scaling k with
    the image keeps the smoothing a fixed fraction of the image.
    """
    if not cfg.scale_with_size:
        return cfg.n, cfg.k
    s = min(height, width) / float(cfg.ref_size)
    k = int(round((cfg.k - 1) / 2 * s)) * 2 + 1
    return cfg.n, max(1, min(31, k))


def preset(name: str) -> FAEConfig:
    """Named model presets, points on the accuracy/speed curve.

    * ``default``: the U-Net 64-128-256-512 of DESIGN.md.
    * ``fast``: 32-64-128-256, about 4x fewer FLOPs.
    * ``tiny``: 16-32-64-128 at 128x128, for the CPU demo and smoke tests.
    """
    cfg = FAEConfig()
    if name == "default":
        return cfg
    if name == "fast":
        cfg.model.widths = (32, 64, 128, 256)
        return cfg
    if name == "tiny":
        cfg.model.widths = (16, 32, 64, 128)
        cfg.model.dilations = (1, 2, 4)
        cfg.train.image_size = (128, 128)
        cfg.train.auto_pixels = 128 * 128
        cfg.map.ref_size = 256
        return cfg
    raise ValueError(f"unknown preset {name!r}; choose one of {PRESETS}")


PRESETS = ("default", "fast", "tiny")


def check_image_size(size, name: str = "size") -> tuple[int, int]:
    """``(H, W)`` as two positive ints: ``TypeError`` for a non-sequence or non-integers, ``ValueError`` for the
    wrong length or non-positive sides."""
    try:
        vals = tuple(size)
    except TypeError:
        raise TypeError(f"{name} must be a pair (H, W) of positive ints, got {size!r}") from None
    if len(vals) != 2:
        raise ValueError(f"{name} must be a pair (H, W) of positive ints, got {size!r}")
    try:
        h, w = (int(s) for s in vals)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a pair (H, W) of positive ints, got {size!r}") from None
    if h <= 0 or w <= 0 or vals != (h, w):
        raise ValueError(f"{name} must be a pair (H, W) of positive ints, got {size!r}")
    return h, w


def parse_size(text: str) -> tuple[int, int] | str:
    """'256' -> (256, 256); '208x512' -> (208, 512) as (H, W); 'auto' stays 'auto' (see :func:`auto_size`)."""
    if str(text).strip().lower() == "auto":
        return "auto"
    parts = str(text).lower().replace("*", "x").split("x")
    try:
        vals = tuple(int(p) for p in parts)
    except ValueError:
        raise ValueError(f"image size must look like 256 or HxW (e.g. 208x512), got {text!r}") from None
    if len(vals) == 1:
        vals = (vals[0], vals[0])
    if len(vals) != 2 or min(vals) < 8 or max(vals) > 8192:
        raise ValueError(f"image size must be HxW with 8 <= H, W <= 8192, got {text!r}")
    return vals


def auto_size(height: int, width: int, pixels: int = 256 * 256, multiple: int = 16) -> tuple[int, int]:
    """(H, W) with about ``pixels`` pixels, the aspect ratio of ``height x width``, multiples of ``multiple``.

    Keeps small defects of elongated images visible: a 1130 x 460 frame becomes 160 x 400, not a squashed
    256 x 256 (DESIGN.md 5; BSData's pits cover a median 0.17% of the frame).
    """
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    scale = (pixels / float(height * width)) ** 0.5
    h = max(multiple, int(round(height * scale / multiple)) * multiple)
    w = max(multiple, int(round(width * scale / multiple)) * multiple)
    return h, w
