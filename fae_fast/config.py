"""Every knob of fae_fast in plain dataclasses, with the defaults of DESIGN.md.

Defaults marked *(chosen)* in DESIGN.md are decisions of this project where the paper is silent. A whole
:class:`FAEConfig` round-trips through ``to_dict`` / ``from_dict`` (it is stored in every model file).
"""
from __future__ import annotations

import copy
import dataclasses
import math
import numbers
import os
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
    # the coarsest octave of a mask is drawn among the scales <= this (finer ones add detail on top). The default
    # (every scale) gives many small specks besides large blobs; at 112x280 on BSData it measured better than
    # coherent blobs (perlin_base_max=4, perlin_envelope=0.3): P-AUROC 90.6 vs 87.5, one seed (docs/RESULTS.md)
    perlin_base_max: int = 32
    # > 0: each Perlin occlusion is one blob (a Gaussian envelope of its area) with edges roughened by the noise
    # at this weight; 0: the top of a noise field over the whole frame (many separate pieces)
    perlin_envelope: float = 0.0
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
    # the image itself, brightness and contrast changed: T = clip(g x + o), g ~ U(self_gain), |o| ~ U(self_offset)
    # with a random sign. Real defects are mostly the part's own surface made darker or brighter (cracks, pits,
    # stains, glare): a thin stroke of it is a crack, a faint Perlin blob of it a stain. 0.4 measured better than 0
    # on every mean metric of BSData and KolektorSDD (3 seeds each, docs/RESULTS.md)
    w_self: float = 0.4
    self_gain: tuple[float, float] = (0.5, 1.5)
    self_offset: tuple[float, float] = (0.05, 0.4)
    # procedural and texture-folder textures in grey when the training images are grey (3 equal channels): a
    # coloured occlusion on a grey part is found by its colour alone. "auto" (grey images -> grey) | "on" | "off"
    grey_textures: str = "auto"
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
    # "symmetric" (the paper: the same eps on input and target), "none", "input" (input only), "independent"
    # (separate eps on each side). Default "none": at the measured CPU recipe same-eps noise did not beat no noise
    # by more than the seed-to-seed spread on BSData and KolektorSDD (docs/RESULTS.md); the paper's method stays
    # one setting away (noise.mode="symmetric", with sigma_reference="image_noise", sigma_max=6 as measured)
    mode: str = "none"


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
    # > 0: at inference each pixel is reconstructed from one of four passes in which its hide_cell x hide_cell cell
    # was hidden under the image mean (models.UNet): defects are inpainted, not copied. 0: one plain pass
    hide_cell: int = 0
    # > 1: that many networks of this architecture, each trained on its own loss from its own seed (initialisation,
    # batches, corruption, noise: member i is the one-network run seeded fae_fast.train.member_seed(seed, i)), their
    # reconstructions averaged (models.Members); members x the training and inference compute. Not the cpu
    # preset's: BSData's pits gain, KolektorSDD's I-AUROC falls (docs/RESULTS.md)
    members: int = 1


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
    normalize: str = "zscore"
    # the per-pixel error before smoothing: "squared" (mean_c (recon - x)^2, DESIGN.md) | "gradient" (the squared
    # Sobel gradient of the residual: local structure only, smooth offsets of the reconstruction drop out) |
    # "squared+gradient" (both: thin defects and pits gain, large low-contrast ones keep their inside)
    error: str = "squared+gradient"
    # odd; "zscore" divides by the per-pixel std max-filtered over this window: structures that move a few pixels
    # between parts (edges, glare) keep their spread where the next part puts them. 1: each pixel's own std
    spread_window: int = 1
    # the image score: "max" (the normalised map's max, DESIGN.md) | "max+template" (the mean of that and of the
    # network-free template's max -- each image's error against its own mean, normalised the same way -- each
    # standardised by the held-out normal images' scores; scoring.fuse_scores). Needs a normalisation
    image_score: str = "max"
    # "max+template" only: the box-filter passes of the template's map (its window is the map's k); None: the
    # map's n. The template has no network to smooth away what it does not know, yet a thin crack or a pit of a
    # few pixels is diluted by the map's full smoothing: one pass keeps them
    template_n: int | None = None
    # "max+template" only: the template reads the frame at this many times the network's size (per side), the
    # network its scale x scale area mean (rounded to uint8, so its map is exactly the usual one of that view),
    # and the network's map is replicated to the frame's pixels: frames, maps and masks are at scale x the
    # network's size. The template costs no training, and a thin crack or a pit of a few pixels is diluted less
    # in a finer frame: 2 lifted both real sets' I-AUROC on every seed and cost the synthetic grey data's large
    # faint stains less than that on one machine, more on another (docs/RESULTS.md); the CPU recipe's 2. 1: the
    # network's size
    frame_scale: int = 1
    # "max+template" only (ignored with "max"): the template's share w of the pixel map, (1 - w) x the network's
    # normalised map + w x the template's (its map normalised by its own statistics, as the image score reads it);
    # the image score and the thresholds' quantiles are unchanged (the pixel threshold is read off the held-out
    # images' mixed maps).
    # A crack the network repaired stays dark against where normal parts put their brightness: a tenth of the
    # template lifted KolektorSDD's pixel metrics on every seed at no cost to BSData's (docs/RESULTS.md). 0: the
    # network's map alone (DESIGN.md); the CPU recipe's 0.1
    template_weight: float = 0.0
    # which normal images give the per-pixel statistics of the network's map (normalize) and of the template's
    # ("max+template"): "holdout" (the held-out ones) | "all" (the training images as well). The thresholds and
    # the image scores' standardisation still come from the held-out images, each scored by the statistics of
    # all the others. A few dozen held-out images give a noisy per-pixel std; ten times as many, the network's
    # own training images among them, measured better on both real sets, and for the template's too (it has no
    # training: BSData and the synthetic grey data up on every seed, KolektorSDD level; docs/RESULTS.md). The
    # training images' network errors are lower than new parts', which shifts every z-score up; the thresholds
    # are read off held-out images scored with the same statistics, so they shift with it
    statistics: str = "holdout"

    def normalization_label(self) -> str:
        """The normalisation in words, with the images its statistics come from (first lines)."""
        if self.normalize == "none":
            return "no normalisation"
        return f"{self.normalize} normalisation ({'all normal' if self.statistics == 'all' else 'held-out'} images)"

    def image_score_label(self) -> str:
        """The image score in words, with the template's smoothing where it is not the map's (first lines)."""
        tn = self.template_n
        parts = [] if self.image_score == "max" or tn is None else [f"{tn} pass{'' if tn == 1 else 'es'}"]
        if self.image_score != "max" and self.frame_scale != 1:
            parts.append(f"frames at {self.frame_scale}x")
        if self.image_score != "max" and self.template_weight:
            parts.append(f"{self.template_weight:g} of the pixel map")
        extra = f" (template {', '.join(parts)})" if parts else ""
        return f"image score {self.image_score}{extra}"


@dataclass
class TrainConfig:
    steps: int = 2000
    batch_size: int = 16
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 50
    grad_clip: float = 1.0
    # exponential moving average of the weights (and BatchNorm statistics), used for the thresholds and saved
    # as the model; 0 = off. The decay ramps up as min(ema_decay, (1 + t) / (10 + t)) over the first steps.
    ema_decay: float = 0.0
    # the training loss, one of LOSSES averaged over pixels: "squared" (the MSE of DESIGN.md, fused with the
    # noise) | "squared+gradient" (plus GRADIENT_WEIGHT x the squared Sobel gradient of the residual: the map's own
    # error, so fine structure is reconstructed as the map measures it; against the same target x + eps) | "gradient"
    # | "squared+ssim" (plus ssim_weight x (1 - SSIM): contrast-normalised, so faint structure counts as much as
    # strong; against the same target)
    loss: str = "squared"
    ssim_weight: float = 1.0            # the weight of 1 - SSIM in "squared+ssim" (1: DRAEM's L2 + SSIM)
    # the loss's weight on occluded pixels (mask_beta > 0) is 1 + this, elsewhere 1 (normalised by all pixels, as
    # the inpainting losses that weight hole pixels above valid ones): a 1-pixel stroke of a crack is a tiny share
    # of the plain MSE, which is almost all about copying the grain. 0 = the MSE of DESIGN.md
    occlusion_weight: float = 0.0
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
    # each training image translated by up to this many pixels per axis, the band reflected (0: off): parts that
    # sit a few pixels apart from frame to frame (the images after resizing to image_size, or the crops)
    augment_shift: int = 0
    amp: str = "auto"                   # "auto" (bf16 on CUDA, fp32 on CPU) | "bf16" | "fp16" | "fp32"
    compile: bool = False
    channels_last: bool = True
    checkpoint_every: int = 500
    seed: int = 0
    # where each sample's corruption, sigma and noise come from: "batch" (one stream per batch, the batched fast
    # path), "keyed" (a stream per block of stream_block samples keyed by (seed, step, global index): a batch split
    # across torchrun processes trains the same model), "auto" (batch on one process, keyed on several)
    streams: str = "auto"
    stream_block: int = 1
    device: str = "auto"
    num_workers: int = 2

    def loss_label(self) -> str:
        """The training loss in words, with its weights (first lines and run labels)."""
        ssim = f" (1 - SSIM x{self.ssim_weight:g})" if self.loss == "squared+ssim" else ""
        occ = f" (occluded pixels x{1 + self.occlusion_weight:g})" if self.occlusion_weight else ""
        return f"{self.loss}{ssim}{occ} loss"


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
    def from_dict(cls, d: dict[str, Any], base: "FAEConfig | None" = None) -> "FAEConfig":
        """Build from a dict, layered on ``base`` (default: the defaults): only the keys ``d`` holds change.

        Unknown sections or keys raise ``ValueError`` naming them; a ``d`` that is not a dict of dicts raises
        ``TypeError``; lists become tuples. Values are not range-checked here: call :meth:`validate`.

        Example:
            >>> cfg = FAEConfig.from_dict({"noise": {"mode": "none"}}, base=preset("tiny"))
            >>> cfg.model.widths, cfg.noise.mode
            ((16, 32, 64, 128), 'none')
        """
        if not isinstance(d, dict):
            raise TypeError(f"a config must be an object of sections (e.g. {{\"train\": {{...}}}}), "
                            f"got {type(d).__name__}")
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown config sections: {sorted(unknown)}")
        out = cls() if base is None else copy.deepcopy(base)
        for f in fields(cls):
            if f.name in d:
                setattr(out, f.name, _sub_from_dict(getattr(out, f.name), d[f.name], f.name))
        return out

    def validate(self, *, allow_zero_steps: bool = False) -> "FAEConfig":
        """Check every value's type and range; raise on the first bad one, naming its key and value.

        Meant to run before any work (loading data, the first training step), so a typo never costs a run.

        Args:
            allow_zero_steps: accept ``train.steps == 0`` (an untrained model, e.g. as a baseline in tests);
                a detector trained for 0 steps scores everything 0, so the CLI and ``Detector.fit`` refuse it.

        Returns:
            self.

        Raises:
            TypeError: a value of the wrong type (``"train.lr must be a number, got 'fast'"``).
            ValueError: a value out of range (``"train.threshold_quantile must be in [0, 1], got 2.0"``).
        """
        for sec in fields(self):
            sub = getattr(self, sec.name)
            for f in fields(sub):
                _check_type(f"{sec.name}.{f.name}", getattr(sub, f.name), str(f.type))
        for key, spec in _RANGES.items():
            sec, name = key.split(".")
            v = getattr(getattr(self, sec), name)
            if key == "train.steps" and allow_zero_steps:
                spec = "[0, inf)"
            if v is not None and not _in_range(v, spec):
                raise ValueError(f"config {key} must be in {spec}, got {v!r}")
        for key, choices in _CHOICES.items():
            sec, name = key.split(".")
            v = getattr(getattr(self, sec), name)
            if v not in choices:
                raise ValueError(f"config {key} must be one of {choices}, got {v!r}")
        c, m, t = self.corruption, self.model, self.train
        for lo, hi in (("k_min", "k_max"), ("beta_min", "beta_max")):
            if getattr(c, lo) > getattr(c, hi):
                raise ValueError(f"config corruption.{lo} ({getattr(c, lo)!r}) must be <= corruption.{hi} "
                                 f"({getattr(c, hi)!r})")
        for f in fields(c):
            v = getattr(c, f.name)
            if str(f.type) == "tuple[float, float]" and not 0 <= v[0] <= v[1]:
                raise ValueError(f"config corruption.{f.name} must be a range (lo, hi) with 0 <= lo <= hi, got {v!r}")
        if c.perlin_coverage[1] > 1 or c.elastic_smoothness[0] <= 0:
            raise ValueError(f"config corruption.perlin_coverage must be within [0, 1] and elastic_smoothness "
                             f"positive, got {c.perlin_coverage!r}, {c.elastic_smoothness!r}")
        if c.w_perlin + c.w_polygon + c.w_stroke <= 0:
            raise ValueError("config corruption.w_perlin + w_polygon + w_stroke must be > 0 (no occlusion shape left)")
        if c.w_other_image + c.w_procedural + c.w_self + (c.w_texture_dir if c.texture_dir else 0.0) <= 0:
            raise ValueError("config corruption.w_other_image + w_procedural + w_self (+ w_texture_dir with a "
                             "texture_dir) must be > 0 (no texture source left)")
        if c.texture_dir is not None and not os.path.isdir(c.texture_dir):
            raise ValueError(f"config corruption.texture_dir: no such folder {c.texture_dir!r}")
        for key, vals in (("model.widths", m.widths), ("model.dilations", m.dilations),
                          ("corruption.perlin_scales", c.perlin_scales)):
            if not vals or min(vals) < 1:
                raise ValueError(f"config {key} must be a non-empty sequence of positive ints, got {vals!r}")
        if self.map.spread_window % 2 != 1:
            raise ValueError(f"config map.spread_window must be odd, got {self.map.spread_window!r}")
        if self.map.image_score != "max" and self.map.normalize == "none":
            raise ValueError(f"config map.image_score {self.map.image_score!r} needs map.normalize 'mean' or "
                             "'zscore' (the scores are standardised by held-out normal images)")
        if self.map.frame_scale != 1 and self.map.image_score == "max":
            raise ValueError(f"config map.frame_scale {self.map.frame_scale!r} needs map.image_score "
                             "'max+template' (only the template reads the finer frame)")
        if self.map.k % 2 != 1:
            raise ValueError(f"config map.k must be odd (a centred box filter), got {self.map.k!r}")
        if t.crop_size is not None:
            ch, cw = check_image_size(t.crop_size, "config train.crop_size")
            if t.image_size != "auto" and (ch > t.image_size[0] or cw > t.image_size[1]):
                raise ValueError(f"config train.crop_size {t.crop_size!r} must fit in train.image_size "
                                 f"{t.image_size!r}")
        if t.image_size != "auto":
            h, w = check_image_size(t.image_size, "config train.image_size")
            if min(h, w) < MIN_SIDE or max(h, w) > MAX_SIDE:
                raise ValueError(f"config train.image_size must have sides in [{MIN_SIDE}, {MAX_SIDE}], "
                                 f"got {t.image_size!r}")
        return self


#: bounds of ``--size`` and of the "auto" size
MIN_SIDE, MAX_SIDE = 8, 8192
NOISE_MODES = ("symmetric", "none", "input", "independent")
#: error kinds of the anomaly map (:func:`fae_fast.reference.error_image`)
MAP_ERRORS = ("squared", "gradient", "squared+gradient")
#: how the image score is made (``map.image_score``; :func:`fae_fast.scoring.fuse_scores`)
IMAGE_SCORES = ("max", "max+template")
#: the weight of the gradient term in the "squared+gradient" error
GRADIENT_WEIGHT = 4.0
#: training losses (``train.loss``): the map's error kinds, and the MSE plus ``train.ssim_weight`` times the
#: structural dissimilarity 1 - SSIM (:func:`fae_fast.reference.ssim_error`), the reconstruction loss of DRAEM
#: (Zavrtanik et al., ICCV 2021) and RIAD, whose networks also learn to repair synthetic defects
LOSSES = MAP_ERRORS + ("squared+ssim",)

# allowed ranges, "[lo, hi]" inclusive, "(lo, hi)" exclusive, in the notation the error messages print
_RANGES = {
    "corruption.p": "[0, 1]", "corruption.k_min": "[0, inf)", "corruption.k_max": "[1, inf)",
    "corruption.beta_min": "[0, 1]", "corruption.beta_max": "[0, 1]",
    "corruption.w_perlin": "[0, inf)", "corruption.w_polygon": "[0, inf)", "corruption.w_stroke": "[0, inf)",
    "corruption.soft_edge": "[0, 1]", "corruption.w_texture_dir": "[0, inf)",
    "corruption.w_other_image": "[0, inf)", "corruption.w_procedural": "[0, inf)", "corruption.w_self": "[0, inf)",
    "corruption.color_jitter": "[0, inf)", "corruption.stroke_samples": "[2, inf)",
    "corruption.capacity_sigmas": "[0, inf)", "corruption.perlin_base_max": "[1, inf)",
    "corruption.perlin_envelope": "[0, inf)",
    "noise.sigma_max": "[0, inf)",
    "model.in_channels": "[1, inf)", "model.hide_cell": "[0, inf)", "model.members": "[1, 8]",
    "map.n": "[0, inf)", "map.k": "[1, inf)", "map.ref_size": "[1, inf)", "map.spread_window": "[1, 63]",
    "map.template_n": "[0, inf)", "map.frame_scale": "[1, 4]",
    "map.template_weight": "[0, 1]",
    "train.steps": "[1, inf)", "train.batch_size": "[1, inf)", "train.lr": "(0, inf)",
    "train.weight_decay": "[0, inf)", "train.warmup_steps": "[0, inf)", "train.grad_clip": "[0, inf)",
    "train.ema_decay": "[0, 1)", "train.occlusion_weight": "[0, inf)",
    "train.ssim_weight": "[0, inf)", "train.augment_shift": "[0, inf)",
    "train.auto_pixels": f"[{MIN_SIDE * MIN_SIDE}, {MAX_SIDE * MAX_SIDE}]",
    "train.holdout_fraction": "[0, 1)", "train.threshold_quantile": "[0, 1]",
    "train.pixel_threshold_quantile": "[0, 1]", "train.checkpoint_every": "[0, inf)",
    "train.num_workers": "[0, inf)", "train.stream_block": "[1, inf)",
}
_CHOICES = {
    "noise.mode": NOISE_MODES,
    "corruption.grey_textures": ("auto", "on", "off"),
    "noise.sigma_reference": ("absolute", "image_noise"),
    "map.normalize": ("none", "mean", "zscore"),
    "map.error": MAP_ERRORS,
    "map.image_score": IMAGE_SCORES,
    "map.statistics": ("holdout", "all"),
    "model.norm": ("batch", "group", "instance", "none"),
    "model.act": ("relu", "silu", "gelu", "leaky_relu"),
    "model.skip_mode": ("concat", "add", "none"),
    "model.downsample": ("maxpool", "conv"),
    "model.upsample": ("bilinear", "transpose"),
    "train.amp": ("auto", "bf16", "fp16", "fp32"),
    "train.streams": ("auto", "batch", "keyed"),
    "train.loss": LOSSES,
}


def _in_range(v, spec: str) -> bool:
    lo, hi = (float(s) for s in spec[1:-1].split(","))
    return (lo < v if spec[0] == "(" else lo <= v) and (v < hi if spec[-1] == ")" else v <= hi)


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def _check_type(key: str, v, annotation: str) -> None:
    """Checks ``v`` against a field annotation of this module ("int", "float | None", "tuple[int, ...]", ...)."""
    kinds = [k.strip() for k in annotation.split("|")]
    if "None" in kinds and v is None:
        return
    if "str" in kinds and isinstance(v, str):
        return
    kind = kinds[0]
    ok = {"bool": lambda: isinstance(v, bool), "int": lambda: _is_int(v), "float": lambda: _is_number(v),
          "str": lambda: isinstance(v, str)}.get(kind)
    if ok is not None:
        if not ok():
            what = {"bool": "true or false", "int": "an integer", "float": "a finite number",
                    "str": "a string"}[kind]
            raise TypeError(f"config {key} must be {what}, got {v!r}")
        return
    if kind.startswith("tuple["):
        elem = kind[len("tuple["):-1].split(",")[0].strip()
        pair = not kind.endswith("...]")
        check = _is_int if elem == "int" else _is_number
        if (not isinstance(v, (tuple, list)) or not all(check(x) for x in v)
                or (pair and len(v) != len(kind.split(",")))):
            n = "a pair" if pair else "a list"
            raise TypeError(f"config {key} must be {n} of {'integers' if elem == 'int' else 'numbers'}, got {v!r}")


def _sub_from_dict(current, d: dict[str, Any], section: str):
    if not isinstance(d, dict):
        raise TypeError(f"config section {section!r} must be an object of keys, got {type(d).__name__}")
    known = {f.name for f in fields(current)}
    unknown = set(d) - known
    if unknown:
        raise ValueError(f"unknown keys in config section {section!r}: {sorted(unknown)}")
    vals = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
    return dataclasses.replace(current, **vals)


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


def preset(name: str, device: str | None = None) -> FAEConfig:
    """Named presets, points on the accuracy/speed curve.

    * ``default``: the U-Net 64-128-256-512 of DESIGN.md, the full recipe for a GPU.
    * ``fast``: 32-64-128-256, about 4x fewer FLOPs.
    * ``tiny``: 16-32-64-128 at 128x128, for the demo and smoke tests.
    * ``cpu``: the recipe measured on BSData and KolektorSDD that trains ~800 images of a few hundred pixels in
      under 20 minutes on 2 CPU cores (docs/RESULTS.md, "Accuracy on real data").
    * ``auto``: ``default`` on a CUDA device, ``cpu`` otherwise (``device``: "auto" | "cpu" | "cuda[:i]").
    """
    if name == "auto":
        name = resolve_preset(name, device)
    cfg = FAEConfig()
    if name == "default":
        return cfg
    if name == "fast":
        cfg.model.widths = (32, 64, 128, 256)
        return cfg
    if name in ("tiny", "cpu"):
        cfg.model.widths = (16, 32, 64, 128)
        cfg.model.dilations = (1, 2, 4)
        cfg.train.image_size = (128, 128)
        cfg.train.auto_pixels = 128 * 128
        cfg.map.ref_size = 256
        if name == "cpu":
            _cpu_recipe(cfg)
        return cfg
    raise ValueError(f"unknown preset {name!r}; choose one of {PRESETS}")


def _cpu_recipe(cfg: FAEConfig) -> None:
    """The CPU preset's recipe on top of ``tiny`` (each value measured: docs/RESULTS.md)."""
    cfg.train.steps = 500
    cfg.train.auto_pixels = 176 * 176  # BSData 112x272, KolektorSDD 272x112: pits and cracks stay a few pixels
    cfg.train.batch_size = 8
    cfg.train.lr = 3e-3
    cfg.train.image_size = "auto"
    # the noise range used when noise.mode="symmetric" is chosen (6x the images' own noise: docs/RESULTS.md)
    cfg.noise.sigma_reference, cfg.noise.sigma_max = "image_noise", 6.0
    # the image score fused with the network-free template's (I-AUROC +7.5 on KolektorSDD, +1.9 on BSData, the
    # maps unchanged; -0.2 on the synthetic demo data: docs/RESULTS.md)
    cfg.map.image_score = "max+template"
    # the MSE plus 0.01 x (1 - SSIM): every mean of both real sets higher than with the MSE alone, and of the
    # synthetic grey data's faint stains too (not every seed: docs/RESULTS.md)
    cfg.train.loss, cfg.train.ssim_weight = "squared+ssim", 0.01
    # the template's map smoothed by one pass, not the map's four (I-AUROC +2.1 on KolektorSDD, +0.6 on BSData,
    # every seed; faint stains +0.7 on the synthetic grey data, -0.4 on the colour demo's: docs/RESULTS.md)
    cfg.map.template_n = 1
    # the network map's per-pixel statistics from every normal image, not only the tenth held out (the same
    # models: BSData I-AUROC +1.9, every metric of every seed up; KolektorSDD +0.4, P-AUROC up on every seed,
    # AU-PRO down on one; the synthetic grey data's faint stains -0.9: docs/RESULTS.md)
    cfg.map.statistics = "all"
    # a tenth of the template's z-map in the pixel map (the same models: KolektorSDD's P-AUROC +2.5 and AU-PRO +5.1,
    # every seed up; BSData's and the synthetic grey data's faint stains level: docs/RESULTS.md)
    cfg.map.template_weight = 0.1
    # the template reads frames at twice the network's size (I-AUROC up on every seed of both real sets, BSData
    # +0.9, KolektorSDD +0.7, KolektorSDD's AU-PRO +2.0; the synthetic grey data's large faint stains -0.5, -0.1,
    # -1.6 by seed, their AU-PRO up; +25% per batch in the CPU engine: docs/RESULTS.md)
    cfg.map.frame_scale = 2


def frame_scale_of(cfg: MapConfig) -> int:
    """``map.frame_scale`` where the template is scored ("max+template"), else 1 (``validate`` refuses a scale
    with "max"; a model whose normalisation fell back to "max" reads frames of the network's size)."""
    return int(cfg.frame_scale) if cfg.image_score != "max" else 1


def frame_size(cfg: MapConfig, image_size) -> tuple[int, int]:
    """The (H, W) frames are read at: the network's ``image_size`` times :func:`frame_scale_of`."""
    s = frame_scale_of(cfg)
    return int(image_size[0]) * s, int(image_size[1]) * s


def template_passes(template_n: int | None, n: int) -> int:
    """The box-filter passes of the template's map: ``template_n`` (``map.template_n``), or None: ``n``, the
    map's own."""
    return int(n if template_n is None else template_n)


def resolve_preset(name: str, device: str | None = None) -> str:
    """``auto`` -> ``default`` where training runs on CUDA, ``cpu`` elsewhere; other names pass through."""
    if name != "auto":
        return name
    import torch

    dev = "auto" if device is None else str(device)
    cuda = torch.cuda.is_available() if dev == "auto" else dev.startswith("cuda")
    return "default" if cuda else "cpu"


PRESETS = ("auto", "default", "fast", "tiny", "cpu")


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
    if len(vals) != 2 or min(vals) < MIN_SIDE or max(vals) > MAX_SIDE:
        raise ValueError(f"image size must be HxW with {MIN_SIDE} <= H, W <= {MAX_SIDE}, got {text!r}")
    return vals


def auto_size(height: int, width: int, pixels: int = 256 * 256, multiple: int = 16) -> tuple[int, int]:
    """(H, W) with about ``pixels`` pixels, the aspect ratio of ``height x width``, multiples of ``multiple``.

    Keeps small defects of elongated images visible: a 1130 x 460 frame becomes 160 x 400, not a squashed
    256 x 256 (DESIGN.md 5; BSData's pits cover a median 0.17% of the frame). Each side stays within
    ``[multiple, MAX_SIDE]`` (the bounds of ``--size``), so an extreme ratio gives fewer pixels, never a side
    past the cap.
    """
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    scale = (pixels / float(height * width)) ** 0.5
    top = MAX_SIDE // multiple * multiple
    h = min(top, max(multiple, int(round(height * scale / multiple)) * multiple))
    w = min(top, max(multiple, int(round(width * scale / multiple)) * multiple))
    return h, w
