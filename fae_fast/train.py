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
training-state checkpoint continues exactly where it stopped.

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
import math
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import ops
from .checkpoint import load_train_state, save_train_state
from .config import FAEConfig, smoothing_for_size
from .scoring import autocast_dtype, compute_maps, resolve_device, thresholds_from_holdout

__all__ = ["NOISE_MODES", "TrainResult", "train", "step_seed", "split_holdout", "lr_factor"]

NOISE_MODES = ("symmetric", "none", "input", "independent")
_MASK64 = (1 << 64) - 1
# config keys that may change between a run and its resumption without changing what the steps compute
_RESUMABLE_CHANGES = {"train.steps", "train.checkpoint_every", "train.device", "train.compile",
                      "train.num_workers"}


@dataclass
class TrainResult:
    """What :func:`train` returns.

    Attributes:
        model: the trained network, in eval mode, on the training device.
        thresholds: ``{"image": float, "pixel": float}`` from the held-out normal images.
        history: one dict per logged step: ``step`` (steps done), ``loss`` (mean over the steps since the last
            log), ``lr``, ``img_per_s``.
        holdout_scores: (N_holdout,) float32 image scores of the held-out normal images (CPU).
        step: steps done (``cfg.train.steps`` unless stopped early with ``stop_at``).
        config: the configuration trained with.
    """

    model: torch.nn.Module
    thresholds: dict[str, float]
    history: list[dict[str, float]]
    holdout_scores: torch.Tensor
    step: int = 0
    config: FAEConfig | None = None
    holdout_indices: torch.Tensor | None = field(default=None, repr=False)


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
    target noise of the "independent" ablation. Hashing (rather than ``seed + step``) keeps the noise streams of
    neighbouring seeds unrelated.
    """
    z = _mix64((int(seed) & _MASK64) ^ 0x632BE59BD9B4E019)
    z = _mix64((z + int(step) * 0x9E3779B97F4A7C15) & _MASK64)
    z = _mix64((z + int(stream) * 0xD1B54A32D192ED03) & _MASK64)
    return z >> 1


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


def _check_resume_config(path, saved: dict, cfg: FAEConfig) -> None:
    a, b = _flat(saved), _flat(cfg.to_dict())
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


def _progress_bar(total: int, initial: int, enabled: bool):
    if not enabled or not sys.stderr.isatty():
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is a dependency, but a bar is never worth failing a run over
        return None
    return tqdm(total=total, initial=initial, desc="fae_fast train", unit="step", dynamic_ncols=True)


# --------------------------------------------------------------------------------------------------------------
# the loop


def train(cfg: FAEConfig, images: torch.Tensor, *, holdout: torch.Tensor | None = None,
          checkpoint: str | Path | None = None, resume: str | Path | None = None, device=None,
          progress: bool = True, log_every: int = 10, stop_at: int | None = None) -> TrainResult:
    """Train a Filtering Autoencoder on normal images.

    Args:
        cfg: the full configuration (``cfg.train.image_size`` must equal the images' (H, W)).
        images: uint8 (N, 3, H, W) normal images, on any device (they are moved to the training device).
        holdout: uint8 (M, 3, H, W) normal images for the thresholds; None holds out
            ``cfg.train.holdout_fraction`` of ``images`` (a seeded random split).
        checkpoint: training-state file written atomically every ``cfg.train.checkpoint_every`` steps and at the
            end; None writes none.
        resume: a training-state file to continue from (same config except steps/device/compile/checkpointing).
        device: "auto" | "cpu" | "cuda[:i]" | torch.device; None uses ``cfg.train.device``.
        progress: a tqdm bar (only when stderr is a terminal).
        log_every: steps between history entries (each costs one device sync).
        stop_at: end this call after this many steps in total (checkpointing there), e.g. for time-boxed jobs;
            a later call with ``resume=`` continues the same schedule.

    Returns:
        :class:`TrainResult`.
    """
    from .corruption import Corruptor
    from .data import TrainSampler
    from .models import build_model

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
    if tuple(int(v) for v in tc.image_size) != (H, W):
        raise ValueError(f"images are {H}x{W} but cfg.train.image_size is {tuple(tc.image_size)}; resize them "
                         "(fae_fast.data.load_images) or set the image size")
    if holdout is not None and (not isinstance(holdout, torch.Tensor) or holdout.dtype != torch.uint8
                                or holdout.shape[1:] != images.shape[1:]):
        raise ValueError(f"holdout must be uint8 (M, {images.shape[1]}, {H}, {W}), got "
                         f"{getattr(holdout, 'dtype', type(holdout).__name__)} {tuple(getattr(holdout, 'shape', ()))}")
    if cfg.noise.mode not in NOISE_MODES:
        raise ValueError(f"cfg.noise.mode must be one of {NOISE_MODES}, got {cfg.noise.mode!r}")
    if not 0.0 <= cfg.noise.sigma_max:
        raise ValueError(f"cfg.noise.sigma_max must be >= 0, got {cfg.noise.sigma_max}")
    steps = int(tc.steps)
    if steps < 0:
        raise ValueError(f"cfg.train.steps must be >= 0, got {steps}")
    if int(log_every) < 1:
        raise ValueError(f"log_every must be >= 1, got {log_every}")
    end = steps if stop_at is None else min(steps, int(stop_at))
    dev = resolve_device(tc.device if device is None else device)
    amp_dtype = autocast_dtype(tc.amp, dev)

    # ---- data split
    if holdout is None:
        train_idx, hold_idx = split_holdout(images.shape[0], float(tc.holdout_fraction), int(tc.seed))
        hold_images = images[hold_idx.to(images.device)]
        train_images = images[train_idx.to(images.device)]
    else:
        hold_idx, train_images, hold_images = None, images, holdout
    if train_images.shape[0] == 0:
        raise ValueError("no training images left after the holdout split")
    train_images = train_images.to(dev).contiguous()

    # ---- model, optimiser, schedule, randomness
    # seeded init without touching the caller's RNG: the model is built on the CPU, so only the CPU generator
    # is forked and seeded (torch.manual_seed would also reseed every CUDA generator of the caller)
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(int(tc.seed))
        model = build_model(cfg.model)
    model = model.to(dev)
    if tc.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    opt = torch.optim.AdamW(_param_groups(model, float(tc.weight_decay)), lr=float(tc.lr),
                            fused=dev.type == "cuda")
    warmup = int(tc.warmup_steps)

    def schedule(i: int) -> float:  # a plain function: LambdaLR stores no state for it
        return lr_factor(i, warmup, steps)

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    scaler = torch.amp.GradScaler(dev.type, enabled=amp_dtype == torch.float16)
    gen = torch.Generator(device=dev)
    gen.manual_seed(int(tc.seed))
    sampler = TrainSampler(train_images, int(tc.batch_size), gen, flip=bool(tc.augment_flip),
                           rot90=bool(tc.augment_rot90))
    corruptor = Corruptor(cfg.corruption, image_size=(H, W), device=dev)
    fwd = torch.compile(model) if tc.compile else model

    start, history = 0, []
    fingerprint = _fingerprint(train_images)
    if resume is not None:
        state = load_train_state(resume, map_location="cpu")
        _check_resume_config(resume, state["config"], cfg)
        saved_dev = state.get("device_type", dev.type)
        if saved_dev != dev.type:
            # the generator states (and so every random draw) are per device type: a resumed run could not
            # continue the same streams
            raise ValueError(f"{resume} was written by a run on {saved_dev}, this run is on {dev.type}: resume on "
                             f"the device type the run started on")
        if list(state.get("fingerprint", [])) != fingerprint:
            warnings.warn(f"the training images differ from those of {resume} (shape or checksum); resuming "
                          "anyway", UserWarning, stacklevel=2)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        gen.set_state(state["generator"])
        sampler.load_state_dict(state["sampler"])
        start, history = int(state["step"]), list(state["history"])
        if start > end:
            raise ValueError(f"{resume} is at step {start}, past the requested end {end}")

    def save_state(step: int) -> None:
        save_train_state(checkpoint, {
            "model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "scaler": scaler.state_dict(), "generator": gen.get_state(), "sampler": sampler.state_dict(),
            "step": step, "history": history, "config": cfg.to_dict(), "fingerprint": fingerprint,
            "device_type": dev.type,
        })

    # ---- the loop
    B, sigma_max, mode, seed0 = int(tc.batch_size), float(cfg.noise.sigma_max), cfg.noise.mode, int(tc.seed)
    zeros = torch.zeros(B, device=dev)
    params = [p for p in model.parameters() if p.requires_grad]
    autocast = (torch.autocast(device_type=dev.type, dtype=amp_dtype) if amp_dtype is not None
                else contextlib.nullcontext())
    bar = _progress_bar(end, start, progress)
    loss_sum, n_logged = torch.zeros((), device=dev), 0
    t_log = time.perf_counter()
    try:
        for step in range(start, end):
            xb = sampler.next()                                 # uint8 (B, 3, H, W) on dev
            c = corruptor(xb.float().div_(255.0), gen, pool=train_images)
            sigma = torch.rand(B, generator=gen, device=dev) * sigma_max
            seed = step_seed(seed0, step)
            sigma_in = zeros if mode == "none" else sigma
            sigma_tgt = sigma if mode in ("symmetric", "independent") else zeros
            seed_tgt = step_seed(seed0, step, stream=1) if mode == "independent" else seed
            # the ops read the uint8 batch directly: a quarter of the bytes of a float copy
            inp = ops.corrupt_and_noise(xb, c.texture, c.mask_beta, sigma_in, seed)
            if tc.channels_last:
                inp = inp.contiguous(memory_format=torch.channels_last)
            with autocast:
                recon = fwd(inp)
            loss = ops.noisy_target_loss(recon, xb, sigma_tgt, seed_tgt)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if tc.grad_clip and tc.grad_clip > 0:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(params, float(tc.grad_clip))
            scaler.step(opt)
            scaler.update()
            lr_used = opt.param_groups[0]["lr"]  # a Python float: no sync
            sched.step()
            loss_sum += loss.detach()
            n_logged += 1
            done = step + 1
            if done % int(log_every) == 0 or done == end:
                mean_loss = float(loss_sum) / n_logged               # the one sync per log interval
                now = time.perf_counter()
                rec = {"step": done, "loss": mean_loss, "lr": float(lr_used),
                       "img_per_s": n_logged * B / max(now - t_log, 1e-9)}
                history.append(rec)
                if not math.isfinite(mean_loss):
                    raise FloatingPointError(f"training diverged at step {done}: loss {mean_loss}")
                if bar is not None:
                    bar.set_postfix(loss=f"{mean_loss:.4g}", img_s=f"{rec['img_per_s']:.0f}")
                loss_sum.zero_()
                n_logged, t_log = 0, time.perf_counter()
            if bar is not None:
                bar.update(1)
            if checkpoint is not None and tc.checkpoint_every and done % int(tc.checkpoint_every) == 0 \
                    and done != end:
                save_state(done)
    finally:
        if bar is not None:
            bar.close()
    if checkpoint is not None:
        save_state(end)

    # ---- thresholds from held-out normal images
    model.eval()
    if hold_images.shape[0] == 0:
        warnings.warn("no held-out normal images (holdout_fraction is 0 and no holdout given): thresholds are "
                      "computed on the training images and will be optimistic", UserWarning, stacklevel=2)
        hold_images = train_images
    n, k = smoothing_for_size(cfg.map, H, W)
    maps, scores = compute_maps(model, hold_images, n=n, k=k, batch_size=max(1, min(64, 2 * B)), device=dev,
                                amp=tc.amp)
    thresholds = thresholds_from_holdout(scores, maps, float(tc.threshold_quantile),
                                         float(tc.pixel_threshold_quantile))
    return TrainResult(model=model, thresholds=thresholds, history=history, holdout_scores=scores, step=end,
                       config=cfg, holdout_indices=hold_idx)
