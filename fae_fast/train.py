"""The training loop of the Filtering Autoencoder (DESIGN.md section 1).

One step::

    x (uint8 batch, on the device, flipped)            TrainSampler
    x~ = (1 - beta M) x + beta M T                     Corruptor (shapes, elastic warp, textures)
    sigma ~ U(0, sigma_max) per sample, seed = f(seed, step)
    input = x~ + eps                                   ops.corrupt_and_noise  (eps regenerated from the seed)
    loss  = || f(input) - (x + eps) ||^2               ops.noisy_target_loss  (the target is never stored)

with AdamW, linear warmup + cosine decay, gradient clipping, bf16 autocast on CUDA, channels_last and optional
``torch.compile``. Every random number comes from one ``torch.Generator`` seeded with ``cfg.train.seed`` (plus
the per-step noise seeds derived from it), so a CPU run is reproducible bit for bit, and a run resumed from a
training-state checkpoint continues exactly where it stopped. With ``cfg.train.streams="keyed"`` (the default
under torchrun) the corruption, sigma and noise of each sample are drawn from seeds of (seed, step, global sample
index) instead, so a batch split across processes (:mod:`fae_fast.distributed`) trains the same model.

With bf16 or fp32 the loop never waits for the device except when it logs (every ``log_every`` steps: the loss
is accumulated on the device and read back only then) and when it writes a checkpoint; fp16's GradScaler reads
its overflow flag on the host every step.

Example:
    >>> from fae_fast.train import train
    >>> res = train(cfg, images_uint8, checkpoint="run/state.pt")   # doctest: +SKIP
    >>> res.model, res.thresholds                                    # doctest: +SKIP
"""
from __future__ import annotations

import contextlib
import copy
import math
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import ops, reference
from .checkpoint import load_train_state, save_train_state, with_legacy_settings
from .config import (GRADIENT_WEIGHT, NOISE_MODES, FAEConfig, frame_scale_of, frame_size, smoothing_for_size,
                     template_passes)
from .scoring import (autocast_dtype, compute_maps, evaluating, network_view, resolve_device,
                      thresholds_from_holdout)

__all__ = ["NOISE_MODES", "TrainResult", "train", "batch_loss", "step_seed", "member_seed", "split_holdout",
           "lr_factor", "holdout_thresholds", "estimate_noise_std", "effective_sigma_max", "WeightEma"]

_MASK64 = (1 << 64) - 1
# config keys that may change between a run and its resumption without changing what the steps compute
_RESUMABLE_CHANGES = {"train.steps", "train.checkpoint_every", "train.device", "train.compile",
                      "train.num_workers",
                      # checked on what they resolve to (the state's "streams"): "auto" may resume "keyed"
                      "train.streams", "train.stream_block"}


@dataclass
class TrainResult:
    """What :func:`train` returns.

    Attributes:
        model: the trained network, in eval mode, on the training device.
        thresholds: ``{"image": float, "pixel": float}`` from the held-out normal images.
        history: one dict per logged step: ``step`` (steps done), ``loss`` (mean over the steps since the last
            log), ``lr``, ``img_per_s``.
        holdout_scores: (N_holdout,) float32 image scores of the held-out normal images (CPU).
        map_stats: per-pixel statistics of the held-out maps (``cfg.map.normalize`` != "none"), else None.
        step: steps done (``cfg.train.steps`` unless stopped early with ``stop_at``).
        config: the configuration trained with.
        live_model: with ``cfg.train.ema_decay``, the last live weights (``model`` is their average), else None.
    """

    model: torch.nn.Module
    thresholds: dict[str, float]
    history: list[dict[str, float]]
    holdout_scores: torch.Tensor
    step: int = 0
    config: FAEConfig | None = None
    holdout_indices: torch.Tensor | None = field(default=None, repr=False)
    map_stats: dict[str, torch.Tensor] | None = field(default=None, repr=False)
    live_model: torch.nn.Module | None = field(default=None, repr=False)


# --------------------------------------------------------------------------------------------------------------
# small pure helpers (tested on their own)


def _mix64(z: int) -> int:
    """splitmix64's finaliser: a bijection of 64-bit ints with good avalanche."""
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9 & _MASK64
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB & _MASK64
    return z ^ (z >> 31)


def step_seed(seed: int, step: int, stream: int = 0) -> int:
    """The noise seed of training step ``step``: a hash of (seed, step, stream) in [0, 2**63).

    ``stream`` 0 is the noise of the input (and of the target in "symmetric" mode); stream 1 is the independent
    target noise of the "independent" ablation (2 and 3: :func:`sample_stream_seed`; 7: the holdout split; 8: the
    members' seeds). Hashing (rather than ``seed + step``) keeps the noise streams of neighbouring seeds unrelated.
    """
    z = _mix64((int(seed) & _MASK64) ^ 0x632BE59BD9B4E019)
    z = _mix64((z + int(step) * 0x9E3779B97F4A7C15) & _MASK64)
    z = _mix64((z + int(stream) * 0xD1B54A32D192ED03) & _MASK64)
    return z >> 1


def sample_stream_seed(seed: int, step: int, index: int, stream: int) -> int:
    """The seed of block (or sample) ``index`` of step ``step`` in keyed-stream training: a hash of all four.

    ``stream`` 2 is the corruption, 3 is sigma (0 and 1 are the noise streams of :func:`step_seed`).
    """
    return step_seed(step_seed(seed, step, stream), index)


def member_seed(seed: int, member: int) -> int:
    """The seed of member ``member`` of a run seeded ``seed`` (``model.members``): ``seed`` itself for member 0
    (one member trains as before), a hash of both for the others."""
    return int(seed) if member == 0 else step_seed(seed, member, stream=8)


def split_holdout(n: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded random split of ``n`` images into (train indices, holdout indices), both sorted.

    ``round(n * fraction)`` images are held out, at least one when ``fraction > 0`` and ``n >= 2``, and at least
    one image always stays for training.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"holdout_fraction must be in [0, 1), got {fraction!r}")
    k = int(round(n * fraction))
    if fraction > 0 and n >= 2:
        k = max(k, 1)
    k = min(k, n - 1) if n >= 1 else 0
    g = torch.Generator().manual_seed(step_seed(seed, 0, stream=7))
    perm = torch.randperm(n, generator=g)
    return perm[k:].sort().values, perm[:k].sort().values


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Learning-rate multiplier at 0-based ``step``: linear warmup to 1 over ``warmup`` steps, then cosine to 0.

    The first step already has a non-zero rate (1 / warmup), and the last of ``total`` steps a small positive one.
    """
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup + 1) / (span + 1))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


# --------------------------------------------------------------------------------------------------------------
# pieces of the loop


def _is_grey(images: torch.Tensor) -> bool:
    """Whether (N, 3, H, W) images hold grey pictures (three equal channels); one host sync, at set-up."""
    return images.shape[1] == 3 and bool((images[:, :1] == images[:, 1:]).all())


def batch_loss(fwd, x: torch.Tensor, corruptor, gen: torch.Generator, *, step: int, seed: int, sigma_max: float,
               mode: str = "symmetric", noise_backend: str = "torch", pool: torch.Tensor | None = None,
               channels_last: bool = False, autocast=None, keyed: tuple[int, int] | None = None,
               loss: str = "squared", occlusion_weight: float = 0.0, ssim_weight: float = 1.0) -> torch.Tensor:
    """The FAE loss of one batch of normal images, with gradients to ``fwd``'s parameters (no optimiser step).

    ``x~ = corruptor(x)``; sigma ~ U(0, sigma_max) per sample from ``gen``; ``input = x~ + eps``;
    ``loss = ||fwd(input) - (x + eps)||^2`` with the same eps on both sides in "symmetric" mode (the ablation
    modes of :data:`NOISE_MODES` change the two sides' sigma and seed as in DESIGN.md section 1.2).

    Args:
        fwd: the network (or its compiled form), (B, C, H, W) -> (B, C, H, W).
        x: normal images (B, C, H, W), uint8 or float in [0, 1], on ``gen``'s device.
        corruptor: a :class:`fae_fast.corruption.Corruptor`.
        gen: the generator of the corruption and of sigma.
        step: 0-based step: with ``seed`` it gives the noise seed (:func:`step_seed`).
        seed: the run's seed.
        sigma_max: the noise range r (:func:`effective_sigma_max`).
        mode: one of :data:`NOISE_MODES`.
        noise_backend: the one backend of both noise ops (:func:`fae_fast.ops.noise_backend`).
        pool: images the "other image" textures are cut from (None: the batch itself).
        channels_last: feed the network a channels_last input.
        autocast: a context manager around the forward pass (None: none).
        keyed: ``(offset, block)``: keyed streams. ``x`` holds the global samples ``offset ..``; each block of
            ``block`` of them draws its corruption and sigma from ``gen`` reseeded with
            :func:`sample_stream_seed` of its global block index, and the noise is keyed per global sample
            (``sample_offset``), so the loss's terms do not depend on how a global batch is split. None: one
            stream for the batch (``gen``'s state).
        loss: ``train.loss``: "squared" (the MSE above), "gradient" (the pixel mean of
            ``reference.error_image(target, recon, "gradient")``, the map's gradient error against the same target
            ``x + eps``), "squared+gradient" (the MSE plus :data:`~fae_fast.config.GRADIENT_WEIGHT` times it) or
            "squared+ssim" (the MSE plus ``ssim_weight`` times the pixel mean of
            ``reference.ssim_error(target, recon)``).
        occlusion_weight: ``train.occlusion_weight`` w: the per-pixel loss (:func:`fae_fast.reference.loss_image`
            of ``loss``) counts ``1 + w`` times on occluded pixels (``mask_beta > 0``), averaged over all pixels.
        ssim_weight: ``train.ssim_weight``, the weight of 1 - SSIM in the "squared+ssim" loss.

    Returns:
        0-dim float32 loss.
    """
    B = x.shape[0]
    xf = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
    offset = None
    if keyed is None:
        c = corruptor(xf, gen, pool=pool)
        sigma = torch.rand(B, generator=gen, device=x.device) * sigma_max
    else:
        offset, block = int(keyed[0]), int(keyed[1])
        first, n = offset // block, B // block
        c = corruptor.keyed(xf, gen, [sample_stream_seed(seed, step, first + i, 2) for i in range(n)], pool=pool)
        parts = []
        for i in range(n):
            gen.manual_seed(sample_stream_seed(seed, step, first + i, 3))
            parts.append(torch.rand(block, generator=gen, device=x.device))
        sigma = torch.cat(parts) * sigma_max
    zeros = torch.zeros_like(sigma)
    noise_seed = step_seed(seed, step)
    sigma_in = zeros if mode == "none" else sigma
    sigma_tgt = sigma if mode in ("symmetric", "independent") else zeros
    seed_tgt = step_seed(seed, step, stream=1) if mode == "independent" else noise_seed
    # the ops read a uint8 batch directly: a quarter of the bytes of a float copy
    inp = ops.corrupt_and_noise(x, c.texture, c.mask_beta, sigma_in, noise_seed, sample_offset=offset,
                                backend=noise_backend)
    if channels_last:
        inp = inp.contiguous(memory_format=torch.channels_last)
    with autocast if autocast is not None else contextlib.nullcontext():
        recon = fwd(inp)
    weight = float(occlusion_weight)
    if loss == "squared" and weight == 0:
        return ops.noisy_target_loss(recon, x, sigma_tgt, seed_tgt, sample_offset=offset, backend=noise_backend)
    # the other losses need the target itself: x + eps drawn by the same op and backend as the input's eps
    target = xf if mode in ("none", "input") else ops.corrupt_and_noise(
        x, x, torch.zeros_like(c.mask_beta), sigma_tgt, seed_tgt, sample_offset=offset, backend=noise_backend)
    if weight:
        err = reference.loss_image(target, recon, loss, ssim_weight)
        return (err * (1.0 + weight * (c.mask_beta > 0).float())).mean()
    if loss == "squared+ssim":
        extra = ssim_weight * reference.ssim_error(target, recon).mean()
    else:
        grad = reference.error_image(target, recon, "gradient").mean()
        if loss == "gradient":
            return grad
        extra = GRADIENT_WEIGHT * grad
    mse = ops.noisy_target_loss(recon, x, sigma_tgt, seed_tgt, sample_offset=offset, backend=noise_backend)
    return mse + extra


def _param_groups(model: torch.nn.Module, weight_decay: float):
    """Weight decay on conv/linear weights only: decaying norm scales and biases only hurts."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = tuple(v) if isinstance(v, list) else v
    return out


def estimate_noise_std(images: torch.Tensor, max_images: int = 64) -> float:
    """The images' own noise std in [0, 1] units (Immerkaer 1996): the mean absolute response to the Laplacian
    difference mask [[1, -2, 1], [-2, 4, -2], [1, -2, 1]], which cancels smooth structure, times sqrt(pi / 2) / 6.

    Args:
        images: uint8 (N, C, H, W); at most ``max_images`` evenly spaced ones are used (deterministic).
    """
    if images.dim() != 4 or min(images.shape[2:]) < 3:
        raise ValueError(f"noise estimation needs (N, C, H >= 3, W >= 3) images, got {tuple(images.shape)}")
    idx = torch.linspace(0, images.shape[0] - 1, min(max_images, images.shape[0])).round().long()
    x = images[idx.to(images.device)].float().mean(1, keepdim=True).div_(255.0)
    k = torch.tensor([[1.0, -2.0, 1.0], [-2.0, 4.0, -2.0], [1.0, -2.0, 1.0]], device=x.device).view(1, 1, 3, 3)
    r = torch.nn.functional.conv2d(x, k)
    return float(r.abs().mean() * math.sqrt(math.pi / 2.0) / 6.0)


def effective_sigma_max(cfg: FAEConfig, images: torch.Tensor) -> float:
    """The noise range r of sigma ~ U(0, r) this run uses (``cfg.noise.sigma_reference``)."""
    if cfg.noise.sigma_reference == "absolute":
        return float(cfg.noise.sigma_max)
    if cfg.noise.sigma_reference == "image_noise":
        return float(cfg.noise.sigma_max) * estimate_noise_std(images)
    raise ValueError(f"cfg.noise.sigma_reference must be 'absolute' or 'image_noise', got "
                     f"{cfg.noise.sigma_reference!r}")


def _check_resume_config(path, saved: dict, cfg: FAEConfig) -> None:
    # a key the saved config lacks was written by a version without that setting: it ran with the default of
    # then (today's, or the value before a changed default: checkpoint._LEGACY_SETTINGS)
    a, b = {**_flat(FAEConfig().to_dict()), **_flat(with_legacy_settings(saved))}, _flat(cfg.to_dict())
    diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and k not in _RESUMABLE_CHANGES)
    if diff:
        raise ValueError(f"cannot resume from {path}: its config differs from this one in "
                         + ", ".join(f"{k} ({a.get(k)!r} -> {b.get(k)!r})" for k in diff))
    if a.get("train.steps") != b.get("train.steps"):
        warnings.warn(f"resuming {path} with train.steps {a.get('train.steps')} -> {b.get('train.steps')}: the "
                      "cosine schedule is stretched from here on", UserWarning, stacklevel=3)


def _fingerprint(images: torch.Tensor) -> list[int]:
    """A cheap identity check of the training images (shape and a strided checksum)."""
    flat = images.reshape(images.shape[0], -1)
    return [*map(int, images.shape), int(flat[:, ::97].sum(dtype=torch.int64))]


class WeightEma:
    """An exponential moving average of a network's floating-point state (weights and BatchNorm statistics).

    After optimisation step ``t`` (0-based), :meth:`update` sets ``ema <- d * ema + (1 - d) * live`` with
    ``d = min(decay, (1 + t) / (10 + t))`` (the ramp keeps the first steps' random init from dominating a short
    run); integer buffers (BatchNorm's step counts) are copied. ``self.model`` is a copy in eval mode.

    Example:
        >>> ema = WeightEma(torch.nn.Linear(2, 2), decay=0.99)
        >>> ema.update(step=0)   # after each optimiser step
    """

    def __init__(self, live: torch.nn.Module, decay: float):
        self.decay = float(decay)
        self.model = copy.deepcopy(live).eval().requires_grad_(False)
        pairs = list(zip(self.model.state_dict(keep_vars=True).values(), live.state_dict(keep_vars=True).values()))
        self._float = ([e.detach() for e, v in pairs if e.is_floating_point()],
                       [v.detach() for e, v in pairs if e.is_floating_point()])
        self._other = [(e.detach(), v.detach()) for e, v in pairs if not e.is_floating_point()]

    @torch.no_grad()
    def update(self, step: int) -> None:
        d = min(self.decay, (1.0 + step) / (10.0 + step))
        torch._foreach_lerp_(self._float[0], self._float[1], 1.0 - d)
        for e, v in self._other:
            e.copy_(v)


class _Progress:
    """Progress of the loop: a tqdm bar on a terminal; otherwise (logs, CI, nohup) one plain line on stderr at most
    every ``every_s`` seconds, with the ETA, so that a long run is never silent."""

    def __init__(self, total: int, initial: int, enabled: bool, every_s: float = 30.0):
        self.total, self.enabled, self.every_s = total, enabled, every_s
        self.bar = None
        self.t0 = self.t_print = time.perf_counter()
        self.initial = initial
        if enabled and sys.stderr.isatty():
            try:
                from tqdm.auto import tqdm
                self.bar = tqdm(total=total, initial=initial, desc="fae_fast train", unit="step", dynamic_ncols=True)
            except ImportError:  # tqdm is a dependency, but a bar is never worth failing a run over
                self.bar = None

    def update(self, done: int, rec: dict | None) -> None:
        if self.bar is not None:
            if rec is not None:
                self.bar.set_postfix(loss=f"{rec['loss']:.4g}", img_s=f"{rec['img_per_s']:.0f}")
            self.bar.update(1)
            return
        now = time.perf_counter()
        if not self.enabled or (now - self.t_print < self.every_s and done != self.total):
            return
        self.t_print = now
        rate = (done - self.initial) / max(now - self.t0, 1e-9)
        eta = (self.total - done) / rate if rate > 0 else float("inf")
        loss = f", loss {rec['loss']:.4g}" if rec is not None else ""
        print(f"fae_fast train: step {done}/{self.total} ({100 * done / max(self.total, 1):.0f}%){loss}, "
              f"{rate:.2f} steps/s, ETA {_fmt_seconds(eta)}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _fmt_seconds(t: float) -> str:
    if not math.isfinite(t):
        return "?"
    t = int(round(t))
    return f"{t // 3600}h{t // 60 % 60:02d}m" if t >= 3600 else f"{t // 60}m{t % 60:02d}s"


class _Trainer:
    """What a training run evolves (network, AdamW, schedule, loss scaler, generator, sampler) and its step.

    Every random draw of a step comes from a member's generator and sampler (``self.draws``: the batch, corruption
    and sigma) or from the per-step noise seeds, so :meth:`state_dict` / :meth:`load_state`
    resume a run bit for bit.
    """

    def __init__(self, cfg: FAEConfig, train_images: torch.Tensor, dev: torch.device, dist=None):
        from . import distributed
        from .corruption import Corruptor
        from .data import TrainSampler
        from .models import build_model, networks

        d = self.dist = distributed.Dist() if dist is None else dist
        tc = self.tc = cfg.train
        # batch: one stream per batch; keyed: per block of global samples (any split of the batch, same model)
        self.streams = ("keyed" if d.active else "batch") if tc.streams == "auto" else tc.streams
        if d.active and self.streams != "keyed":
            raise ValueError(f"train.streams='batch' cannot run under torchrun (world size {d.world_size}): a batch "
                             "split across processes needs 'keyed' (or 'auto')")
        if d.active and int(cfg.model.members) > 1:
            raise ValueError(f"model.members={cfg.model.members} cannot run under torchrun (world size "
                             f"{d.world_size}): train the members on one process (model.members=1 scales out)")
        self.block = int(tc.stream_block) if self.streams == "keyed" else None
        rows = distributed.rank_rows(int(tc.batch_size), d, self.block or 1) if d.active else None
        self.offset = rows[0] if rows is not None else 0
        self.cfg, self.dev = cfg, dev
        self.steps = int(tc.steps)
        self.amp_dtype = autocast_dtype(tc.amp, dev)
        self.train_images = train_images
        H, W = int(train_images.shape[2]), int(train_images.shape[3])
        crop = None if tc.crop_size is None else tuple(int(v) for v in tc.crop_size)  # checked by the sampler
        # each member (model.members; one network: the model) initialised from its own seed, the caller's RNG
        # untouched: member i trains as the one-network run seeded member_seed(seed, i) (batches and draws below)
        seeds = [member_seed(int(tc.seed), i) for i in range(int(cfg.model.members))]
        model = build_model(cfg.model, seeds=seeds)
        model = distributed.prepare_model(model.to(dev), d, dev)  # SyncBatchNorm on CUDA with several processes
        if tc.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model.train()
        self.opt = torch.optim.AdamW(_param_groups(model, float(tc.weight_decay)), lr=float(tc.lr),
                                     fused=dev.type == "cuda")
        warmup, steps = int(tc.warmup_steps), self.steps

        def schedule(i: int) -> float:  # a plain function: LambdaLR stores no state for it
            return lr_factor(i, warmup, steps)

        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, schedule)
        self.scaler = torch.amp.GradScaler(dev.type, enabled=self.amp_dtype == torch.float16)
        # every member draws its batches, corruption and sigma from its own generator and sampler, and its noise
        # from its seed: (seed, generator, sampler) per member, K one-network runs on the same held-out split
        self.draws = []
        for seed in seeds:
            gen = torch.Generator(device=dev)
            gen.manual_seed(seed)
            self.draws.append((seed, gen, TrainSampler(train_images, int(tc.batch_size), gen,
                                                       flip=bool(tc.augment_flip), rot90=bool(tc.augment_rot90),
                                                       crop=crop, rows=rows, shift=int(tc.augment_shift))))
        # keyed streams reseed their own generator per block (nothing of it to checkpoint); the samplers'
        # generators evolve alike on every process
        self.key_gen = torch.Generator(device=dev) if self.streams == "keyed" else None
        self.corruptor = Corruptor(cfg.corruption, image_size=crop or (H, W), device=dev,
                                   grey=_is_grey(train_images))
        # with crops, textures are borrowed from the batch's own crops (same scale); otherwise from every image
        self.pool = None if crop is not None else train_images
        # the networks trained, each on its own loss: the model, or each of its members (model.members)
        nets = networks(model)
        self.fwds = [torch.compile(net) if tc.compile else net for net in nets]
        self.ema = WeightEma(model, float(tc.ema_decay)) if tc.ema_decay > 0 else None
        # one backend for noise injection and loss: the reference and the Triton kernel draw different eps from a
        # seed, so a fallback of one op alone would silently turn same-eps noise into independent noise
        self.noise_backend = ops.noise_backend(dev)
        self.param_sets = [[p for p in net.parameters() if p.requires_grad] for net in nets]
        self.autocast = (torch.autocast(device_type=dev.type, dtype=self.amp_dtype)
                         if self.amp_dtype is not None else contextlib.nullcontext())
        self.fingerprint = _fingerprint(train_images)
        # the noise estimate reads up to 64 images: only worth it when there is noise (sigma is drawn either way,
        # so the random streams do not depend on it)
        self.sigma_max = 0.0 if cfg.noise.mode == "none" else effective_sigma_max(cfg, train_images)
        if d.active:  # DDP averages the gradients over the ranks; self.model stays the plain network
            ddp = distributed.wrap(model, d, dev)
            self.fwds = [torch.compile(ddp) if tc.compile else ddp]

    def step(self, step: int) -> torch.Tensor:
        """One optimisation step (0-based ``step``); returns the detached loss on the device (no sync)."""
        tc = self.tc
        keyed = None if self.block is None else (self.offset, self.block)
        self.opt.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.dev)
        for fwd, (seed, gen, sampler) in zip(self.fwds, self.draws):  # each member: its own batch and draws
            xb = sampler.next()                             # uint8 (B, 3, h, w) on dev
            loss = batch_loss(fwd, xb, self.corruptor, self.key_gen or gen, step=step, seed=seed,
                              sigma_max=self.sigma_max, mode=self.cfg.noise.mode, noise_backend=self.noise_backend,
                              pool=self.pool, channels_last=bool(tc.channels_last), autocast=self.autocast, keyed=keyed,
                              loss=tc.loss, occlusion_weight=tc.occlusion_weight, ssim_weight=tc.ssim_weight)
            self.scaler.scale(loss).backward()
            total += loss.detach()
        if tc.grad_clip and tc.grad_clip > 0:
            self.scaler.unscale_(self.opt)
            for params in self.param_sets:  # each member's gradient clipped alone, as if trained alone
                torch.nn.utils.clip_grad_norm_(params, float(tc.grad_clip))
        self.scaler.step(self.opt)
        self.scaler.update()
        self.sched.step()
        if self.ema is not None:
            self.ema.update(step)
        return total / len(self.fwds)

    def eval_model(self) -> torch.nn.Module:
        """The network that is scored and saved: the weight average with ``train.ema_decay``, else the live one."""
        return self.model if self.ema is None else self.ema.model

    def state_dict(self, step: int, history: list) -> dict:
        return {"streams": {"mode": self.streams, "block": self.block},
                "model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(), "scaler": self.scaler.state_dict(),
                # member 0's streams under the one-network keys, the others' in member_draws
                "generator": self.draws[0][1].get_state(), "sampler": self.draws[0][2].state_dict(), "step": step,
                "member_draws": [{"generator": g.get_state(), "sampler": s.state_dict()} for _, g, s in self.draws[1:]],
                "history": history, "config": self.cfg.to_dict(), "fingerprint": self.fingerprint,
                "device_type": self.dev.type, "ema": None if self.ema is None else self.ema.model.state_dict()}

    def load_state(self, path) -> tuple[int, list]:
        """Continue from the training-state file ``path``: returns (steps done, history)."""
        state = load_train_state(path, map_location="cpu")
        _check_resume_config(path, state["config"], self.cfg)
        saved_dev = state.get("device_type", self.dev.type)
        if saved_dev != self.dev.type:
            # the generator states (and so every random draw) are per device type: a resumed run could not
            # continue the same streams
            raise ValueError(f"{path} was written by a run on {saved_dev}, this run is on {self.dev.type}: resume "
                             f"on the device type the run started on")
        saved = state.get("streams", {"mode": "batch", "block": None})  # files from before keyed streams
        if saved["mode"] != self.streams or saved["block"] != self.block:
            if self.cfg.train.streams != "auto" or self.dist.active or saved["mode"] != "keyed":
                what = (f"streams {saved['mode']!r}" + (f" (block {saved['block']})" if saved["block"] else ""))
                raise ValueError(f"cannot resume from {path} with train.streams={self.cfg.train.streams!r} on "
                                 f"{self.dist.world_size} process(es): it was trained with {what}; a 'batch' run "
                                 "resumes on one process only, a 'keyed' one with the same train.stream_block")
            self._use_keyed(int(saved["block"]))  # one process, "auto": continue the keyed streams of the file
        if list(state.get("fingerprint", [])) != self.fingerprint:
            warnings.warn(f"the training images differ from those of {path} (shape or checksum); resuming "
                          "anyway", UserWarning, stacklevel=3)
        self.model.load_state_dict(state["model"])
        if self.ema is not None:
            self.ema.model.load_state_dict(state["ema"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        others = state.get("member_draws", [])
        if len(others) != len(self.draws) - 1:  # files of members that shared one batch stream (before this field)
            raise ValueError(f"{path} holds the batch streams of {len(others) + 1} member(s), this run trains "
                             f"{len(self.draws)} (model.members): train again rather than resume it")
        for (_, gen, sampler), saved_draws in zip(self.draws, [state] + others):
            gen.set_state(saved_draws["generator"])
            sampler.load_state_dict(saved_draws["sampler"])
        return int(state["step"]), list(state["history"])

    def _use_keyed(self, block: int) -> None:
        """Switch a one-process run to keyed streams of ``block`` (resuming a file trained that way)."""
        if int(self.tc.batch_size) % block:
            raise ValueError(f"train.batch_size {self.tc.batch_size} must be a multiple of the stream block {block} "
                             "of the resumed run")
        self.streams, self.block, self.offset = "keyed", block, 0
        self.key_gen = torch.Generator(device=self.dev)


def _check_train_args(cfg: FAEConfig, images, holdout, log_every: int) -> None:
    if not isinstance(cfg, FAEConfig):
        raise TypeError(f"cfg must be a FAEConfig, got {type(cfg).__name__}")
    cfg.validate(allow_zero_steps=True)  # every value, before the first step (0 steps: an untrained baseline)
    tc = cfg.train
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a uint8 torch.Tensor (N, 3, H, W), got {type(images).__name__}")
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != cfg.model.in_channels:
        raise ValueError(f"images must be uint8 (N, {cfg.model.in_channels}, H, W), got {images.dtype} "
                         f"of shape {tuple(images.shape)}")
    H, W = int(images.shape[2]), int(images.shape[3])
    if frame_size(cfg.map, tc.image_size) != (H, W):
        scale = frame_scale_of(cfg.map)
        finer = f" times map.frame_scale {scale}" if scale != 1 else ""
        raise ValueError(f"images are {H}x{W} but cfg.train.image_size is {tuple(tc.image_size)}{finer}; resize "
                         "them (fae_fast.data.load_images) or set the image size")
    if holdout is not None and (not isinstance(holdout, torch.Tensor) or holdout.dtype != torch.uint8
                                or holdout.shape[1:] != images.shape[1:]):
        raise ValueError(f"holdout must be uint8 (M, {images.shape[1]}, {H}, {W}), got "
                         f"{getattr(holdout, 'dtype', type(holdout).__name__)} {tuple(getattr(holdout, 'shape', ()))}")
    if int(log_every) < 1:
        raise ValueError(f"log_every must be >= 1, got {log_every}")


def holdout_thresholds(model: torch.nn.Module, cfg: FAEConfig, hold_images: torch.Tensor, dev,
                       batch_size: int = 32, pool_images: torch.Tensor | None = None
                       ) -> tuple[dict[str, float], torch.Tensor, dict | None]:
    """Thresholds (and, with ``cfg.map.normalize``, the per-pixel map statistics) from held-out normal images.

    With ``cfg.map.statistics`` "all", the statistics (the network's map's, and the template's for "max+template")
    come from ``pool_images`` (the training images) and the held-out images together; the thresholds still come
    from the held-out images alone, each normalised by the statistics of all the others. Under torchrun each rank
    maps its shard of the images and the maps are gathered in order: every rank gets the thresholds one process
    computes.

    Returns:
        (thresholds, image scores of the held-out images, statistics or None). With a normalisation the
        thresholds are read off leave-one-out normalised maps, as new normal images will be scored. With too few
        held-out images for the statistics, ``cfg.map.normalize`` is set to "none" (with a warning).
    """
    from .scoring import holdout_statistics, template_maps

    scale = frame_scale_of(cfg.map)  # hold_images (and pool_images) are frames: scale x the network's size
    n, k = smoothing_for_size(cfg.map, int(hold_images.shape[2]) // scale, int(hold_images.shape[3]) // scale)
    from .distributed import current, sharded_map

    def maps_of(imgs):
        return compute_maps(model, imgs, n=n, k=k, error=cfg.map.error, batch_size=batch_size, device=dev,
                            amp=cfg.train.amp, frame_scale=scale)

    maps, scores = sharded_map(maps_of, hold_images, current(), dev)
    stats = None
    need = 3 if cfg.map.normalize == "zscore" or cfg.map.image_score != "max" else 2
    if cfg.map.normalize != "none" and maps.shape[0] < need:
        # leave-one-out statistics need this many; a model whose maps are not normalised is still a valid
        # detector, and its config says so (cfg.map.normalize is set to "none" with a warning, never silently)
        warnings.warn(f"map.normalize={cfg.map.normalize!r} needs at least {need} held-out normal images, got "
                      f"{maps.shape[0]}: the maps are not normalised (raise train.holdout_fraction or pass more "
                      "images)", UserWarning, stacklevel=3)
        cfg.map.normalize = "none"
        if cfg.map.image_score != "max":
            warnings.warn(f"map.image_score={cfg.map.image_score!r} needs the normalisation: the image score is the "
                          "map's max", UserWarning, stacklevel=3)
            cfg.map.image_score = "max"
            cfg.map.frame_scale = 1  # the frames were the network's view already: the score reads that size
    if cfg.map.normalize != "none":
        pool = None  # map.statistics "all": the training images' maps join the statistics (not the thresholds)
        if cfg.map.statistics == "all" and pool_images is not None:
            pool = sharded_map(maps_of, pool_images, current(), dev)[0]
        fused, tn = cfg.map.image_score != "max", template_passes(cfg.map.template_n, n)
        pool_t = None if pool is None or not fused else template_maps(pool_images, n=tn, k=k, error=cfg.map.error)
        stats, maps, scores = holdout_statistics(maps, cfg.map.normalize, cfg.map.spread_window, pool,
                                                 hold_images=hold_images if fused else None, template_n=tn, k=k,
                                                 error=cfg.map.error, template_weight=cfg.map.template_weight,
                                                 pool_templates=pool_t)
    thresholds = thresholds_from_holdout(scores, maps, float(cfg.train.threshold_quantile),
                                         float(cfg.train.pixel_threshold_quantile))
    return thresholds, scores, stats


# --------------------------------------------------------------------------------------------------------------
# the loop


def _split_images(images: torch.Tensor, holdout: torch.Tensor | None, tc):
    """(holdout indices or None, training images, held-out images): ``holdout`` as given, or a seeded random
    ``tc.holdout_fraction`` of ``images``."""
    if holdout is None:
        train_idx, hold_idx = split_holdout(images.shape[0], float(tc.holdout_fraction), int(tc.seed))
        hold_images = images[hold_idx.to(images.device)]
        train_images = images[train_idx.to(images.device)]
    else:
        hold_idx, train_images, hold_images = None, images, holdout
    if train_images.shape[0] == 0:
        raise ValueError("no training images left after the holdout split")
    return hold_idx, train_images, hold_images


def _call_back(trainer, callback, done: int) -> None:
    """``callback(done, model)`` with the model in eval mode, back in its mode (training) afterwards."""
    with evaluating(trainer.model):
        callback(done, trainer.eval_model())


def _loop(trainer, start: int, end: int, history: list, *, dist, checkpoint, progress: bool, log_every: int,
          callback, callback_every: int) -> None:
    """Steps ``start`` .. ``end`` of :func:`train`: history entries every ``log_every`` steps (appended to
    ``history``), the training state every ``checkpoint_every`` steps and at the end, the callback."""
    from . import distributed

    tc = trainer.cfg.train
    B = int(tc.batch_size)
    fault = distributed.fault_hook(dist)
    bar = _Progress(end, start, progress)
    loss_sum, n_logged = torch.zeros((), device=trainer.dev), 0
    t_log = time.perf_counter()
    try:
        for step in range(start, end):
            lr_used = trainer.opt.param_groups[0]["lr"]  # a Python float: no sync
            loss_sum += trainer.step(step)
            n_logged += 1
            done, rec = step + 1, None
            if fault is not None:
                fault(done)
            if done % int(log_every) == 0 or done == end:
                mean_loss = float(distributed.mean_across(loss_sum, dist)) / n_logged  # one sync per log interval
                now = time.perf_counter()
                rec = {"step": done, "loss": mean_loss, "lr": float(lr_used),
                       "img_per_s": n_logged * B / max(now - t_log, 1e-9)}
                history.append(rec)
                if not math.isfinite(mean_loss):
                    raise FloatingPointError(f"training diverged at step {done}: loss {mean_loss}")
                loss_sum.zero_()
                n_logged, t_log = 0, time.perf_counter()
            bar.update(done, rec if rec is not None else (history[-1] if history else None))
            if checkpoint is not None and tc.checkpoint_every and done % int(tc.checkpoint_every) == 0 \
                    and done != end:
                save_train_state(checkpoint, trainer.state_dict(done, history))
            if callback is not None and callback_every and done % int(callback_every) == 0 and done != end:
                _call_back(trainer, callback, done)
    finally:
        bar.close()
    distributed.finish_models(trainer, dist)  # rank 0's BatchNorm statistics everywhere, BatchNorm2d layers again
    if checkpoint is not None:
        save_train_state(checkpoint, trainer.state_dict(end, history))
    if callback is not None:
        _call_back(trainer, callback, end)


def train(cfg: FAEConfig, images: torch.Tensor, *, holdout: torch.Tensor | None = None,
          checkpoint: str | Path | None = None, resume: str | Path | None = None, device=None,
          progress: bool = True, log_every: int = 10, stop_at: int | None = None,
          callback=None, callback_every: int = 0) -> TrainResult:
    """Train a Filtering Autoencoder on normal images.

    Args:
        cfg: the full configuration (``cfg.train.image_size`` must equal the images' (H, W)).
        images: uint8 (N, 3, H, W) normal images, on any device (they are moved to the training device); with
            ``map.frame_scale`` > 1 ("max+template") frames at that many times ``cfg.train.image_size``: the
            network trains on their area mean (:func:`fae_fast.scoring.network_view`).
        holdout: uint8 (M, 3, H, W) normal images for the thresholds; None holds out
            ``cfg.train.holdout_fraction`` of ``images`` (a seeded random split).
        checkpoint: training-state file written atomically every ``cfg.train.checkpoint_every`` steps and at the
            end; None writes none.
        resume: a training-state file to continue from (same config except steps/device/compile/checkpointing).
        device: "auto" | "cpu" | "cuda[:i]" | torch.device; None uses ``cfg.train.device``.
        progress: a tqdm bar on a terminal, otherwise a line with the ETA on stderr every 30 s.
        log_every: steps between history entries (each costs one device sync).
        stop_at: end this call after this many steps in total (checkpointing there), e.g. for time-boxed jobs;
            a later call with ``resume=`` continues the same schedule.
        callback: ``callback(steps_done, model)`` every ``callback_every`` steps and after the last one, with the
            model in eval mode (e.g. learning curves); it draws nothing from the training's random streams.
        callback_every: steps between callback calls (0: only after the last step).

    Returns:
        :class:`TrainResult`.
    """
    _check_train_args(cfg, images, holdout, log_every)
    tc = cfg.train
    steps = int(tc.steps)
    end = steps if stop_at is None else min(steps, int(stop_at))
    dev = resolve_device(tc.device if device is None else device)
    from . import distributed

    dist, dev = distributed.setup(dev)  # torchrun: join the job, one device per local rank; else a no-op
    progress = progress and dist.is_main
    if dist.active and dist.is_main and progress:
        print(f"fae_fast train: {distributed.describe(dist, dev, cfg.model.norm)}", file=sys.stderr, flush=True)

    hold_idx, train_images, hold_images = _split_images(images, holdout, tc)
    # map.frame_scale: the images are frames finer than the network; it trains on their area mean, the view
    # it scores (the frames themselves give the statistics and the template)
    train_images = train_images.to(dev)
    trainer = _Trainer(cfg, network_view(train_images, frame_scale_of(cfg.map)).contiguous(), dev, dist)
    if not dist.is_main:
        checkpoint = None  # rank 0 writes the (rank-independent) training state
    start, history = (0, []) if resume is None else trainer.load_state(resume)
    if start > end:
        raise ValueError(f"{resume} is at step {start}, past the requested end {end}")

    _loop(trainer, start, end, history, dist=dist, checkpoint=checkpoint, progress=progress, log_every=log_every,
          callback=callback, callback_every=callback_every)

    # ---- thresholds from held-out normal images
    trainer.model.eval()
    model = trainer.eval_model()
    pool = train_images  # with map.statistics "all", these join the held-out images' statistics
    if hold_images.shape[0] == 0:
        warnings.warn("no held-out normal images (holdout_fraction is 0 and no holdout given): thresholds are "
                      "computed on the training images and will be optimistic", UserWarning, stacklevel=2)
        hold_images, pool = train_images, None
    thresholds, scores, stats = holdout_thresholds(model, cfg, hold_images, dev,
                                                   batch_size=max(1, min(64, 2 * int(tc.batch_size))),
                                                   pool_images=pool)
    return TrainResult(model=model, thresholds=thresholds, history=history, holdout_scores=scores, step=end,
                       config=cfg, holdout_indices=hold_idx, map_stats=stats,
                       live_model=None if trainer.ema is None else trainer.model)
