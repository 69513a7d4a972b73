"""Ablations and learning curves as a command: ``fae-fast ablate --data DIR``.

Trains and evaluates, with several seeds, the recipe against its ablations (DESIGN.md 1.2; arXiv 2511.07233):

=====================  ======================================================================================
variant                what changes
=====================  ======================================================================================
``fae``                the recipe as configured (``--preset``, ``--set``)
``no_noise``           corruption only (sigma = 0)
``same_noise``         the paper's same-eps noise on input and target (whatever the base's noise mode)
``input_noise``        noise on the input only (the target is the clean image: anchors the Jacobian to zero)
``independent_noise``  independent eps on input and target
``no_thin_strokes``    no Bezier strokes among the occlusion shapes
``opaque``             opacity beta = 1 always (no semi-transparent occlusions)
``residual_head``      output ``x + head(features)`` (identity-anchored head)
``plain_head``         output ``head(features)``, the paper's plain 1x1 output convolution
``plain_ae``           a fair plain autoencoder: no skip connections, plain head, no corruption, no noise
``gradient_loss``      the map's gradient error added to the training loss (``train.loss`` "squared+gradient")
``ssim_loss``          the MSE plus ``train.ssim_weight`` x (1 - SSIM) (``train.loss`` "squared+ssim", the weight
                       as configured: 0.01 in the ``cpu`` preset, 1 elsewhere)
``mse_loss``           the MSE alone (``train.loss`` "squared"), DESIGN.md's loss
``template``           no network at all: each pixel "reconstructed" as its image's mean, so the map is the
                       image's own deviation and gradient z-scored per pixel by the held-out normal images (a
                       per-pixel statistical model of aligned parts: what the network must beat)
=====================  ======================================================================================

Each run is also scored with a sweep of the smoothing (n passes x k window) and of the map normalisation by
per-pixel statistics of held-out normal images (``none``, ``mean``, ``zscore``), without retraining. With
``--eval-every N`` every run records a learning curve: the test metrics every N steps, so that "not enough
steps" and "a wrong recipe" can be told apart; ``--score-models`` scores saved models (``--save-models``)
again without training. The output, as JSON and Markdown: mean +- std over seeds of I-AUROC, P-AUROC, AU-PRO,
P-AP and I-F1max, overall and per defect type, each run's full config, the commit and the machine.

Everything not named above is the same for every variant (data, size, steps, seeds), so the rows compare.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import _atomic, ops
from .config import (MAP_ERRORS, FAEConfig, frame_scale_of, frame_size, parse_size, preset, smoothing_for_size,
                     template_passes)

METRICS = ("image_auroc", "pixel_auroc", "pixel_aupro", "pixel_ap", "image_f1max")


def _set(**changes) -> Callable[[FAEConfig], None]:
    """A variant that sets ``section__key=value`` entries of the config."""
    def apply(c: FAEConfig) -> None:
        for key, value in changes.items():
            section, name = key.split("__")
            setattr(getattr(c, section), name, value)
    return apply


def _opaque(c):
    c.corruption.beta_min = c.corruption.beta_max = 1.0


def _plain_ae(c):
    c.corruption.p = 0.0
    c.noise.mode = "none"
    c.model.gated_skips, c.model.skip_mode, c.model.residual = False, "none", False


class ImageMean(torch.nn.Module):
    """The ``template`` baseline's stand-in for a network: every pixel's "reconstruction" is its image's
    per-channel mean. Nothing to train; scored like any model (held-out statistics, sweep)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3), keepdim=True).expand_as(x)


#: variants that train nothing: name -> the module scored in place of a trained network
NO_NETWORK: dict[str, Callable[[], torch.nn.Module]] = {"template": ImageMean}

VARIANTS: dict[str, Callable[[FAEConfig], None]] = {
    "fae": lambda c: None,
    "no_noise": _set(noise__mode="none"),
    "same_noise": _set(noise__mode="symmetric"),
    "input_noise": _set(noise__mode="input"),
    "independent_noise": _set(noise__mode="independent"),
    "no_thin_strokes": _set(corruption__w_stroke=0.0),
    "opaque": _opaque,
    "residual_head": _set(model__residual=True),
    "plain_head": _set(model__residual=False),
    "plain_ae": _plain_ae,
    "gradient_loss": _set(train__loss="squared+gradient"),
    "ssim_loss": _set(train__loss="squared+ssim"),
    "mse_loss": _set(train__loss="squared"),
    "template": lambda c: None,
}
NORMALIZE = ("none", "mean", "zscore")


def parse_value(text: str):
    """A config value from the command line: JSON (numbers, true/false, null, lists), ``HxW`` pairs, or a string."""
    t = text.strip()
    if "x" in t.lower() and all(p.strip().isdigit() for p in t.lower().split("x")):
        return [int(p) for p in t.lower().split("x")]
    try:
        return json.loads(t)
    except json.JSONDecodeError:
        return t


def apply_overrides(cfg: FAEConfig, items) -> FAEConfig:
    """``cfg`` with ``section.key=value`` overrides applied (a copy; unknown keys raise ``ValueError``)."""
    d = cfg.to_dict()
    for item in items or ():
        key, sep, value = str(item).partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot:
            raise ValueError(f"override {item!r} must look like section.key=value (e.g. train.steps=800)")
        if section not in d or name not in d[section]:
            raise ValueError(f"override {item!r}: unknown config key {key.strip()!r}")
        d[section][name] = parse_value(value)
    return FAEConfig.from_dict(d)


def describe(cfg: FAEConfig) -> str:
    """What a run actually trained, in one line (its label in tables)."""
    m, nz, c, t = cfg.model, cfg.noise, cfg.corruption, cfg.train
    skips = "gate" if m.gated_skips else m.skip_mode
    scale = "" if nz.sigma_reference == "absolute" else " x image noise"
    noise = "none" if nz.mode == "none" or nz.sigma_max == 0 else f"{nz.mode} sigma<={nz.sigma_max:g}{scale}"
    crop = "" if t.crop_size is None else f", crops {t.crop_size[0]}x{t.crop_size[1]}"
    crop += f", shifts up to {t.augment_shift} px" if t.augment_shift else ""
    head = f"{'residual' if m.residual else 'plain'} head"
    if m.hide_cell:
        head += f", {m.hide_cell} px cells inpainted"
    if m.members > 1:
        head += f", {m.members} members averaged"
    return (f"widths {'-'.join(map(str, m.widths))}, skips {skips}, {head}, "
            f"noise {noise}, {t.loss_label()}, corruption p={c.p:g} (self textures {c.w_self:g}, "
            f"grey {c.grey_textures}), {t.steps} steps x {t.batch_size}{crop}")


def variant_config(base: FAEConfig, name: str, seed: int) -> FAEConfig:
    """The config of one ablation run: ``base`` with the variant's change and the seed."""
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; choose from {sorted(VARIANTS)}")
    cfg = copy.deepcopy(base)
    VARIANTS[name](cfg)
    cfg.train.seed = int(seed)
    return cfg


def smoothing_grid(n: int, k: int) -> list[tuple[int, int]]:
    """(n, k) settings around the default: raw map, fewer/more passes, about 2x and 4x wider windows."""
    grid = [(0, 1), (max(1, n // 2), k), (n, k), (min(8, 2 * n), k), (n, min(31, 2 * k + 1)),
            (n, min(31, 4 * k + 1))]
    return list(dict.fromkeys(grid))


def maps_for_settings(model, images: torch.Tensor, settings, *, batch_size: int = 16, device=None,
                      frame_scale: int = 1):
    """Anomaly maps of ``images`` for several (n, k, error): one forward pass per batch, one map per setting.
    ``frame_scale``: the images are frames at that many times the network's size (``map.frame_scale``).

    Returns:
        {(n, k, error): (maps (N, 1, H, W) float32, scores (N,) float32)} on the CPU, at the images' (H, W).
    """
    from .scoring import _model_device, autocast_dtype, evaluating, frame_map, reconstruct, resolve_device

    dev = resolve_device(device or _model_device(model))
    dtype = autocast_dtype("auto", dev)
    N, _, H, W = images.shape
    out = {s: (torch.empty((N, 1, H, W)), torch.empty((N,))) for s in settings}
    with evaluating(model), torch.inference_mode():
        for i in range(0, N, batch_size):
            xv, recon = reconstruct(model, images[i:i + batch_size].to(dev), frame_scale, dtype)
            for s in settings:
                amap, score = ops.anomaly_map(xv, recon, n=s[0], k=s[1], error=s[2])
                out[s][0][i:i + len(xv)] = frame_map(amap.float(), frame_scale).cpu()
                out[s][1][i:i + len(xv)] = score.float().cpu()
    return out


def edge_max_fraction(maps: torch.Tensor, band: float = 0.05) -> float:
    """Fraction of the maps whose maximum lies in the outer ``band`` of the frame (on good images this should be
    about the band's share of the area, ~19% for 5%; far more means systematic false positives at the edges)."""
    N, _, H, W = maps.shape
    idx = maps.reshape(N, -1).argmax(1)
    y, x = idx // W, idx % W
    by, bx = max(1, int(round(band * H))), max(1, int(round(band * W)))
    edge = (y < by) | (y >= H - by) | (x < bx) | (x >= W - bx)
    return float(edge.float().mean()) if N else float("nan")


class _Scorer:
    """Scores a model on the test set, with the normalisation's statistics from its held-out normal images (and,
    for ``map.statistics`` "all", its training images: ``pool_images``), as :func:`fae_fast.train.train` takes
    them."""

    def __init__(self, test, hold_images: torch.Tensor, device, spread_window: int = 1, image_score: str = "max",
                 template_n: int | None = None, pool_images: torch.Tensor | None = None, frame_scale: int = 1,
                 template_weight: float = 0.0):
        self.test, self.hold, self.device, self.window = test, hold_images, device, int(spread_window)
        self.frame_scale = int(frame_scale)  # the images are frames at this many times the network's size
        self.pool = pool_images
        self.labels, self.masks = test.labels.numpy(), test.masks[:, 0].numpy()
        self.regions = test.regions[:, 0].numpy()
        self.image_score, self.template_n, self.template_weight = image_score, template_n, template_weight
        # setting -> (test, held-out, pool) template maps: no network in them, so every model this scorer sees
        # (seeds' checkpoints, learning-curve points) shares them
        self._templates: dict = {}

    def _template_key(self, s) -> tuple:
        """The template's (passes, k, error) for the map's setting ``s`` = (n, k, error)."""
        return (template_passes(self.template_n, s[0]), *s[1:3])

    def _statistics(self, s, mode, hold_maps, pool_maps) -> dict:
        """The statistics of setting ``s`` = (n, k, error) in ``mode`` (not "none"), as :func:`fae_fast.train.train`
        takes them, with the template's for ``map.image_score`` "max+template" (its maps cached)."""
        from .scoring import holdout_statistics, map_statistics, template_maps

        if self.image_score == "max":  # the per-pixel statistics alone: the held-out images' scores are not read here
            return map_statistics(hold_maps, self.window, pool=pool_maps)
        t = self._template_key(s)
        if t not in self._templates:
            self._templates[t] = tuple(None if imgs is None else template_maps(imgs, n=t[0], k=t[1], error=t[2])
                                       for imgs in (self.test.images, self.hold, self.pool))
        _, hold_t, pool_t = self._templates[t]
        return holdout_statistics(hold_maps, mode, self.window, pool_maps, hold_images=self.hold, template_n=t[0],
                                  k=t[1], error=t[2], hold_templates=hold_t, pool_templates=pool_t)[0]

    def __call__(self, model, settings, modes) -> dict:
        """{(n, k, error, mode): evaluate() result, with the edge diagnostic as ``edge_max_fraction_good``}."""
        from .evaluate import evaluate
        from .scoring import normalize_maps, template_fused

        fs = self.frame_scale
        test = maps_for_settings(model, self.test.images, settings, device=self.device, frame_scale=fs)
        hold = maps_for_settings(model, self.hold, settings, device=self.device, frame_scale=fs) \
            if any(m != "none" for m in modes) and len(self.hold) >= 2 else {}
        pool = maps_for_settings(model, self.pool, settings, device=self.device, frame_scale=fs) \
            if hold and self.pool is not None else {}
        out = {}
        good = torch.from_numpy(self.labels == 0)
        for s in settings:
            for mode in modes:
                if mode != "none" and s not in hold:
                    continue
                stats = None if mode == "none" else self._statistics(s, mode, hold[s][0], pool.get(s, (None,))[0])
                maps = normalize_maps(test[s][0], stats, mode)
                scores = maps.amax(dim=(1, 2, 3))
                if self.image_score != "max" and mode != "none":
                    maps, scores = template_fused(maps, scores, self._templates[self._template_key(s)][0], stats,
                                                  mode, self.template_weight)
                res = evaluate(scores.numpy(), maps[:, 0].numpy(), self.labels, self.masks, self.test.defect_types,
                               regions=self.regions)
                res["edge_max_fraction_good"] = edge_max_fraction(maps[good]) if good.any() else float("nan")
                out[(*s, mode)] = res
        return out


def _row(res: dict) -> dict:
    row = {m: float(res["overall"][m]) for m in METRICS}
    row["per_defect"] = {t: {m: float(v[m]) for m in METRICS} for t, v in res.get("per_defect", {}).items()}
    row["edge_max_fraction_good"] = res.get("edge_max_fraction_good")
    return row


def git_commit(path: str | Path | None = None) -> str | None:
    """The checkout's commit (with ``-dirty`` when it has uncommitted changes to tracked files); where the copy has
    no .git (a lent GPU machine) ``$FAE_FAST_COMMIT``, else None."""
    where = str(Path(path or __file__).resolve().parent)
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha, dirty = "", ""
    if not sha:
        return os.environ.get("FAE_FAST_COMMIT") or None
    return sha + ("-dirty" if dirty else "")


def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else the platform's processor or architecture."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device="auto") -> dict:
    """The machine a result was measured on (name it in every result file): two VMs both called ``vm`` with the
    same core count trained the same recipe to different digits, so the CPU model is named too."""
    return {"node": platform.node(), "cpu": cpu_model(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "torch": torch.__version__, "python": platform.python_version(), "device": str(device)}


def run_ablation(data: str | Path, *, variants=("fae", "no_noise", "plain_ae"), seeds=(0, 1, 2),
                 base: FAEConfig | None = None, device="auto", progress: bool = False, eval_every: int = 0,
                 sweep: bool = True, save_models: str | Path | None = None, log=print) -> dict:
    """Train every (variant, seed), evaluate on ``data``'s test split, and summarise.

    Args:
        data: MVTec-layout category root.
        variants: names from :data:`VARIANTS`.
        seeds: training seeds (each changes initialisation, corruption and noise draws, and the holdout split).
        base: the recipe every variant starts from (image size, steps, ...).
        device: training and inference device.
        eval_every: record the test metrics every this many steps (0: only at the end).
        sweep: also score each run with the smoothing x normalisation sweep (else only the config's setting).
        save_models: a folder: each run's model is saved there as ``<variant>_seed<seed>.fae`` (the network-free
            ``template`` saves nothing).

    Returns:
        A JSON-ready dict with ``runs`` (per run: metrics, per defect type, config, learning curve), ``summary``
        (variant -> metric -> mean/std/n), ``scoring`` ("variant|n=..,k=..,error,mode" -> metric -> mean/std/n),
        the commit and the machine.
    """
    from .train import train

    base = copy.deepcopy(base) if base is not None else FAEConfig()
    t0 = time.perf_counter()
    size, train_images, test = load_data(data, base, log)
    main_key, grid, modes = _settings(base, size, sweep)
    runs, scoring_runs = [], {}
    for name in variants:
        for seed in seeds:
            cfg = variant_config(base, name, seed)
            scorer = _run_scorer(cfg, train_images, test, device)
            curve: list[dict] = []

            def on_eval(step, model, scorer=scorer, curve=curve):
                res = scorer(model, [main_key[:3]], (main_key[3],))[main_key]
                curve.append({"step": int(step), **_row(res)})
                log(f"[ablate]   {name} seed {seed} step {step}: "
                    + ", ".join(f"{m} {curve[-1][m]:.4f}" for m in METRICS[:3]))

            if name in NO_NETWORK:
                scored = scorer(NO_NETWORK[name](), grid, modes)
                _record(runs, scoring_runs, name, cfg, scored, main_key, log, train_seconds=0.0, final_loss=None,
                        curve=[], label="no network: the image mean as reconstruction")
                continue
            t1 = time.perf_counter()
            res = train(cfg, train_images, device=device, progress=progress,
                        callback=on_eval if eval_every else None, callback_every=int(eval_every))
            train_s = time.perf_counter() - t1
            if save_models:
                from .api import Detector

                det = Detector(cfg, device=device)
                det.model, det.thresholds, det.history = res.model, dict(res.thresholds), res.history
                det.map_stats = res.map_stats
                det.save(Path(save_models) / f"{name}_seed{seed}.fae")
            scored = scorer(res.model, grid, modes)
            if res.live_model is not None:  # the same run without the weight average: a paired comparison
                scored[("live", *main_key)] = scorer(res.live_model, [main_key[:3]], (main_key[3],))[main_key]
            _record(runs, scoring_runs, name, cfg, scored, main_key, log, train_seconds=round(train_s, 2),
                    final_loss=float(res.history[-1]["loss"]) if res.history else None, curve=curve)
            del res, scored
    return _result(data, size, base, seeds, main_key, runs, scoring_runs, t0, device)


#: what ``--score-models`` may change with ``--set``: how a trained network is scored, not how it was trained
SCORING_KEYS = ("map.", "model.hide_cell")


def score_models(data: str | Path, models, *, device="auto", sweep: bool = True, overrides=(), log=print) -> dict:
    """Score saved models (``--save-models`` files ``<variant>_seed<seed>.fae``) on ``data``'s test split as
    :func:`run_ablation` scores the models it trains: the same statistics from each run's held-out normal
    images, the same sweep and the same JSON (each run's config from its file; no training time, no curve).

    For re-scoring a finished ablation without retraining, or recovering one whose process was stopped after
    it saved its models. The models must have been trained on ``data``'s training images (each run's holdout is
    drawn again from its seed) and share the image size and the map settings; the first one's config stands for
    the base. ``overrides`` (``section.key=value``, only keys of :data:`SCORING_KEYS`) change how every model is
    scored, e.g. ``model.hide_cell=8`` to inpaint a network trained on plain passes.
    """
    from .api import Detector

    bad = [o for o in overrides if not str(o).strip().startswith(SCORING_KEYS)]
    if bad:
        raise ValueError(f"--set with --score-models changes only the scoring ({', '.join(SCORING_KEYS)}...), "
                         f"got {bad}")
    dets = [(Path(m), Detector.load(m, device=device)) for m in models]
    if not dets:
        raise ValueError("no models to score")
    for _, det in dets:
        det.config = apply_overrides(det.config, overrides).validate()
        det.model.hide_cell = det.config.model.hide_cell
    base = dets[0][1].config
    for path, det in dets[1:]:
        if tuple(det.config.train.image_size) != tuple(base.train.image_size):
            raise ValueError(f"{path}: image size {tuple(det.config.train.image_size)} differs from "
                             f"{dets[0][0]}'s {tuple(base.train.image_size)}")
        if det.config.map != base.map:
            raise ValueError(f"{path}: map settings {det.config.map} differ from {dets[0][0]}'s {base.map}")
    t0 = time.perf_counter()
    size, train_images, test = load_data(data, base, log)
    main_key, grid, modes = _settings(base, size, sweep)
    runs, scoring_runs = [], {}
    for path, det in dets:
        cfg = det.config
        name = path.stem.rsplit("_seed", 1)[0] if "_seed" in path.stem else path.stem
        scored = _run_scorer(cfg, train_images, test, device)(det.model, grid, modes)
        _record(runs, scoring_runs, name, cfg, scored, main_key, log, train_seconds=None, final_loss=None,
                curve=[], model=str(path))
    return _result(data, size, base, sorted({r["seed"] for r in runs}), main_key, runs, scoring_runs, t0,
                   device)


def _holdout_split(cfg: FAEConfig, train_images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(trained-on indices, held-out indices) of a run: its seed's split, drawn as :func:`fae_fast.train.train`
    draws it."""
    from .train import split_holdout

    return split_holdout(len(train_images), float(cfg.train.holdout_fraction), int(cfg.train.seed))


def holdout_images(cfg: FAEConfig, train_images: torch.Tensor) -> torch.Tensor:
    """The normal images a run held out of its training (the statistics and thresholds come from them)."""
    return train_images[_holdout_split(cfg, train_images)[1]]


def _run_scorer(cfg: FAEConfig, train_images: torch.Tensor, test, device) -> _Scorer:
    """The scorer of one run: statistics from the normal images its training held out (and, for
    ``map.statistics`` "all", from those it trained on)."""
    train_idx, hold_idx = _holdout_split(cfg, train_images)
    pool = train_images[train_idx] if cfg.map.statistics == "all" and len(hold_idx) else None
    return _Scorer(test, train_images[hold_idx], device, cfg.map.spread_window, cfg.map.image_score,
                   cfg.map.template_n, pool_images=pool, frame_scale=frame_scale_of(cfg.map),
                   template_weight=cfg.map.template_weight)


def load_data(data, base: FAEConfig, log=print):
    """(size, training images, test set) of ``data`` at ``base``'s image size (the network's; the images are
    read at its frame size, ``map.frame_scale`` times it) and its ``keep_aspect``."""
    from .data import load_images, load_test_set, normal_image_paths

    size = tuple(base.train.image_size)
    frames = frame_size(base.map, size)
    keep = base.train.keep_aspect
    t0 = time.perf_counter()
    train_images = load_images(normal_image_paths(Path(data)), frames, keep_aspect=keep)
    test = load_test_set(Path(data), frames, keep_aspect=keep)
    log(f"[ablate] {len(train_images)} train / {len(test)} test images at {frames[0]}x{frames[1]} "
        f"({time.perf_counter() - t0:.1f} s); commit {git_commit()}")
    return size, train_images, test


def _settings(base: FAEConfig, size, sweep: bool):
    """(the config's (n, k, error, mode), the (n, k, error) grid scored, the normalisations scored)."""
    n, k = smoothing_for_size(base.map, *size)
    main_key = (n, k, base.map.error, base.map.normalize)
    grid = [(a, b, e) for a, b in smoothing_grid(n, k) for e in MAP_ERRORS] if sweep else [main_key[:3]]
    modes = NORMALIZE if sweep else (main_key[3],)
    return main_key, grid, modes


def _record(runs: list, scoring_runs: dict, name: str, cfg: FAEConfig, scored: dict, main_key, log, **extra):
    """One run's row (``extra``: training time, loss, curve, ...) and its sweep rows, logged."""
    main = _row(scored[main_key])
    runs.append({"variant": name, "seed": int(cfg.train.seed), "label": describe(cfg), "config": cfg.to_dict(),
                 **extra, **main})
    for key, r in scored.items():
        a, b, e, mode = key[-4:]
        live = "live weights," if key[0] == "live" else ""
        scoring_runs.setdefault(f"{name}|{live}n={a},k={b},{e},{mode}", []).append(_row(r))
    seconds = extra.get("train_seconds")
    log(f"[ablate] {name:18s} seed {cfg.train.seed}: " + ", ".join(f"{m} {main[m]:.4f}" for m in METRICS)
        + ("" if seconds is None else f" ({seconds:.0f} s)"))


def _result(data, size, base: FAEConfig, seeds, main_key, runs: list, scoring_runs: dict, t0: float,
            device) -> dict:
    """The JSON-ready result of :func:`run_ablation` and :func:`score_models`, summarised."""
    result = {
        "dataset": str(Path(data).resolve()),
        "image_size": list(size),
        "smoothing_default": list(main_key[:2]),
        "normalize_default": main_key[3],
        "error_default": main_key[2],
        "steps": base.train.steps,
        "seeds": list(seeds),
        "commit": git_commit(),
        "machine": machine_info(device),
        "config": base.to_dict(),
        "runs": runs,
        "scoring_runs": scoring_runs,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    return summarise(result)


def _mean_std(values):
    arr = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=np.float64)
    if arr.size == 0:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    return {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if arr.size > 1 else 0.0, "n": int(arr.size)}


def summarise(result: dict) -> dict:
    """(Re)compute ``summary`` (per variant, overall and per defect type) and ``scoring`` (mean/std/n over seeds)
    from the per-run rows."""
    def stats(rows):
        out = {m: _mean_std([r[m] for r in rows]) for m in METRICS}
        types = sorted({t for r in rows for t in r.get("per_defect", {})})
        if types:
            out["per_defect"] = {t: {m: _mean_std([r["per_defect"][t][m] for r in rows
                                                    if t in r.get("per_defect", {})]) for m in METRICS}
                                 for t in types}
        return out

    variants = list(dict.fromkeys(r["variant"] for r in result["runs"]))
    result["summary"] = {v: stats([r for r in result["runs"] if r["variant"] == v]) for v in variants}
    result["scoring"] = {key: stats(rows) for key, rows in result.get("scoring_runs", {}).items() if rows}
    return result


def _without_seed(config: dict | None) -> dict | None:
    """``config`` without ``train.seed``."""
    if not config or "seed" not in config.get("train", {}):
        return config
    return {**config, "train": {k: v for k, v in config["train"].items() if k != "seed"}}


def merge_results(parts: list[dict]) -> dict:
    """One result from ablations run in parts (e.g. in parallel processes) on the same data and recipe."""
    if not parts:
        raise ValueError("nothing to merge")
    keys = ("dataset", "image_size", "steps", "smoothing_default", "config", "commit")

    def same(key, part):
        if key != "config":
            return part.get(key) == parts[0].get(key)
        # each run names its seed; a --score-models part's config is its first model's, training seed included
        return _without_seed(part.get(key)) == _without_seed(parts[0].get(key))

    for part in parts[1:]:
        for key in keys:
            if not same(key, part):
                raise ValueError(f"cannot merge ablations with different {key}"
                                 + ("" if key == "config" else f": {parts[0].get(key)!r} vs {part.get(key)!r}"))
    out = copy.deepcopy(parts[0])
    out["runs"] = [r for part in parts for r in part["runs"]]
    seen = [(r["variant"], r["seed"]) for r in out["runs"]]
    dup = sorted({s for s in seen if seen.count(s) > 1})
    if dup:
        raise ValueError(f"the parts repeat runs {dup}: each (variant, seed) must come from one part")
    sweep: dict[str, list] = {}
    for part in parts:
        for key, rows in part.get("scoring_runs", {}).items():
            sweep.setdefault(key, []).extend(rows)
    out["scoring_runs"] = sweep
    out["seeds"] = sorted({s for part in parts for s in part["seeds"]})
    out["seconds"] = sum(part["seconds"] for part in parts)
    return summarise(out)


def _cells(row: dict) -> str:
    return " | ".join(f"{100 * row[m]['mean']:.1f} ± {100 * row[m]['std']:.1f}" for m in METRICS)


def markdown_table(result: dict) -> str:
    """The summary (overall and per defect type), the scoring sweep and the learning curves as Markdown
    (mean +- std over seeds, in percent)."""
    head = "| {} | " + " | ".join(METRICS) + " |\n|---|" + "---|" * len(METRICS) + "\n"
    machine = result.get("machine", {})
    cpu = f" ({machine['cpu']})" if machine.get("cpu") else ""  # files from before the CPU model was recorded
    lines = [f"Commit {result.get('commit')}, {machine.get('node')}{cpu}, "
             f"{result['image_size'][0]}x{result['image_size'][1]}, {result['steps']} steps\n\n",
             head.format("variant")]
    labels = {r["variant"]: r.get("label", "") for r in result["runs"]}
    for v, row in result["summary"].items():
        lines.append(f"| {v} (n={row[METRICS[0]]['n']}) | {_cells(row)} |\n")
        for t, trow in row.get("per_defect", {}).items():
            lines.append(f"| {v} / {t} | {_cells(trow)} |\n")
    lines.append("\n" + "".join(f"- `{v}`: {lab}\n" for v, lab in labels.items()))
    if result.get("scoring"):
        lines.append("\nScoring sweep (smoothing n, k, error kind and map normalisation), same models:\n\n"
                     + head.format("variant, n, k, error, normalisation"))
        for key, row in result["scoring"].items():
            lines.append(f"| {key} | {_cells(row)} |\n")
    curves = [r for r in result["runs"] if r.get("curve")]
    if curves:
        lines.append("\nLearning curves (test metrics during training):\n\n| variant | seed | step | "
                     + " | ".join(METRICS[:3]) + " |\n|---|---|---|---|---|---|\n")
        for r in curves:
            for pt in r["curve"]:
                lines.append(f"| {r['variant']} | {r['seed']} | {pt['step']} | "
                             + " | ".join(f"{100 * pt[m]:.1f}" for m in METRICS[:3]) + " |\n")
    return "".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="fae-fast ablate", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", help="MVTec-layout category root")
    p.add_argument("--merge", nargs="+", metavar="JSON", help="merge results of ablations run in parts instead")
    p.add_argument("--variants", default="fae,no_noise,same_noise,input_noise,independent_noise,plain_ae",
                   help=f"comma-separated, from {','.join(VARIANTS)}")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds")
    p.add_argument("--preset", default="default")
    p.add_argument("--steps", type=int)
    p.add_argument("--size", default="auto",
                   help="HxW, or 'auto': the data's aspect ratio at the preset's pixel count")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--sigma-max", type=float, help="noise range r of every variant (sigma ~ U(0, r))")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override any config value of the base recipe, e.g. --set train.crop_size=96x96 "
                        "(repeatable)")
    p.add_argument("--eval-every", type=int, default=0,
                   help="learning curves: test metrics every N steps (0: only at the end)")
    p.add_argument("--no-sweep", action="store_true", help="score with the config's smoothing only")
    p.add_argument("--save-models", metavar="DIR", help="save each run's model as DIR/<variant>_seed<seed>.fae")
    p.add_argument("--score-models", nargs="+", metavar="FAE",
                   help="score these saved models (<variant>_seed<seed>.fae) on --data instead of training")
    p.add_argument("--threads", type=int, help="torch CPU threads (1 per process when running several)")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", help="write the result JSON here (e.g. bench/results/ablation_<data>_<machine>.json)")
    p.add_argument("--markdown", help="write the Markdown tables here")
    p.add_argument("--plot", help="write the learning curves here as an SVG (needs --eval-every)")
    args = p.parse_args(argv)
    if args.merge:
        result = merge_results([json.loads(Path(f).read_text()) for f in args.merge])
        return _emit(result, args)
    if not args.data:
        p.error("--data is required (or --merge)")
    if args.threads is not None:
        if args.threads < 1:
            print(f"fae-fast ablate: error: --threads must be >= 1, got {args.threads}", file=sys.stderr)
            return 2
        torch.set_num_threads(args.threads)
    if args.score_models:
        try:
            result = score_models(args.data, args.score_models, device=args.device, sweep=not args.no_sweep,
                                  overrides=args.overrides)
        except (ValueError, TypeError, FileNotFoundError) as exc:
            print(f"fae-fast ablate: error: {exc}", file=sys.stderr)
            return 2
        return _emit(result, args)
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        print(f"fae-fast ablate: error: unknown variants {unknown}; choose from {sorted(VARIANTS)}", file=sys.stderr)
        return 2
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s]
        base = preset(args.preset)
        if args.steps is not None:
            base.train.steps = args.steps
        if args.batch_size is not None:
            base.train.batch_size = args.batch_size
        if args.sigma_max is not None:
            base.noise.sigma_max = args.sigma_max
        base.train.image_size = parse_size(args.size)
        base = apply_overrides(base, args.overrides)
        if base.train.image_size == "auto":
            from .api import resolve_auto_size

            base.train.image_size = resolve_auto_size(args.data, base.train.auto_pixels)
        if args.save_models:
            Path(args.save_models).mkdir(parents=True, exist_ok=True)
        result = run_ablation(args.data, variants=variants, seeds=seeds, base=base, device=args.device,
                              eval_every=args.eval_every, sweep=not args.no_sweep, save_models=args.save_models)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        print(f"fae-fast ablate: error: {exc}", file=sys.stderr)
        return 2
    return _emit(result, args)


def _emit(result: dict, args) -> int:
    table = markdown_table(result)
    print(table)
    if args.json:
        _atomic.write_json(args.json, result)
    if args.markdown:
        _atomic.write_text(args.markdown, table)
    if args.plot:
        from .report import learning_curves_svg

        _atomic.write_text(args.plot, learning_curves_svg(result["runs"], title=f"Learning curves: "
                                                          f"{Path(result['dataset']).name}"))
    return 0
