"""Score saved models again with a scoring *probe*: a variant of the product's map or image score that is not a
config knob, measured before anyone builds it (no retraining).

The probe replaces one function of :mod:`fae_fast.reference` or :mod:`fae_fast.scoring` in this process, then
``fae-fast ablate --score-models ... --no-sweep`` scores the models exactly as the product does (the baseline,
``--probe none``, gives the product's digits to the last place). The JSON is ablate's, with the probe's name and
definition added under ``"probe"``: its ``config`` still names the product's map, which the probe changed.

Probes:

* ``multiscale:S1,S2,...``: the map's per-pixel error summed over scales: at scale s the error kind of
  ``map.error`` is computed on the s x s area means of the image and of its reconstruction (the template's too)
  and brought back to full size bilinearly (RIAD's multi-scale error; s = 1 is the product's error).
* ``template_gain``: the template on each image with its contrast normalised (its deviation from its own mean
  divided by its own std): differences of exposure between parts stop counting.
* ``fusion:W``: the fused image score ``(1 - W) z_network + W z_template`` instead of the mean (W = 0.5).
* ``fusion:max``: the larger of the two standardised scores instead of their mean.
* ``template_local:K``: the template on each image's deviation from its own local mean (a K x K box mean, K odd,
  replicated borders) instead of its global mean: shading that varies from part to part stops counting, thin and
  small defects stay.
* ``fusion_robust``: the fused score's two standardisations by the held-out images' median and MAD (x 1.4826)
  instead of their mean and std: a few dozen held-out scores with a heavy tail set the fusion's weights less.
* ``shift:R``: every z-score (the network's map and the template's) shift-tolerant: at each pixel the smallest
  ``(map - mean) / scale`` over the statistics of the pixels up to R px away (a (2R + 1)^2 window, replicated
  borders), held-out maps leave-one-out as the product reads them: an edge or a glare that sits a few pixels
  from where normal parts put it matches its own statistics there.
* ``template_shift:R``: the same for the template's z-score only, the network's map as the product's.
* ``template_lines:L``: the template as a line detector: each pixel's brightness (its deviation from the image's
  own mean, grey) z-scored by the per-pixel mean and std (+ the median std) of every normal image of ``--data``,
  then averaged along lines of ``L`` frame pixels at 12 orientations; the map is the largest absolute line mean.
  Thin cracks and scratches add up along their length, the grain's blobs average out. (The held-out images are in
  their own first-stage statistics here: a product would read them from every normal image the same way.)
* ``bn_recalibrate``: each network's BatchNorm running statistics estimated again before scoring, from its own
  training images (the held-out ones excluded) as they are, uncorrupted: one train-mode pass in batches of 8, a
  cumulative average. Training leaves statistics of corrupted batches, averaged over its last few dozen steps.

Run::

    python -m bench.explore_scoring --probe multiscale:1,2,4 --data ../shared/data/ksdd/kolektorsdd \\
        --models runs/m_ksdd_s0/fae_seed0.fae --json out.json --threads 1
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from fae_fast import reference, scoring


def _multiscale(scales: list[int]):
    product = reference.error_image

    def error_image(x, recon, error="squared"):
        xf, r = reference._as_float(x).float(), recon.float()
        out = 0
        for s in scales:
            if s == 1:
                out = out + product(xf, r, error)
            else:
                e = product(F.avg_pool2d(xf, s, ceil_mode=True), F.avg_pool2d(r, s, ceil_mode=True), error)
                out = out + F.interpolate(e, size=xf.shape[-2:], mode="bilinear", align_corners=False)
        return out

    reference.error_image = error_image


def _template_gain():
    def template_map(x, n, k, error, map_fn=None):
        xf = x.to(torch.float32) / (255.0 if x.dtype == torch.uint8 else 1.0)
        mean, std = xf.mean(dim=(2, 3), keepdim=True), xf.std(dim=(2, 3), keepdim=True).clamp_min(1e-4)
        xn = (xf - mean) / std * 0.1 + 0.5         # every image at one contrast (std 0.1), about mid-grey
        return reference.anomaly_map(xn, torch.full_like(xn, 0.5), n=n, k=k, error=error)[0]

    scoring._template_map = template_map


def _fusion(how: str):
    def fuse_scores(score, template_score, stats):
        zn = (score - stats["score_center"]) / stats["score_spread"]
        zt = (template_score - stats["template_center"]) / stats["template_spread"]
        if how == "max":
            return torch.maximum(zn, zt)
        w = float(how)
        return (1.0 - w) * zn + w * zt

    scoring.fuse_scores = fuse_scores


def _template_local(K: int):
    def template_map(x, n, k, error, map_fn=None):
        xf = reference._as_float(x).float()
        local = F.avg_pool2d(F.pad(xf, (K // 2,) * 4, mode="replicate"), K, stride=1)
        return reference.anomaly_map(xf - local + 0.5, torch.full_like(xf, 0.5), n=n, k=k, error=error)[0]

    scoring._template_map = template_map


def _line_kernels(L: int, orientations: int = 12) -> torch.Tensor:
    """(orientations, 1, L, L) kernels, each the mean along a line of ``L`` px through the centre."""
    ks = []
    for i in range(orientations):
        th = math.pi * i / orientations
        ker = torch.zeros(L, L)
        for t in torch.linspace(-(L - 1) / 2, (L - 1) / 2, 4 * L).tolist():
            ker[int(round((L - 1) / 2 + t * math.sin(th))), int(round((L - 1) / 2 + t * math.cos(th)))] = 1
        ks.append(ker / ker.sum())
    return torch.stack(ks)[:, None]


def _brightness(x: torch.Tensor) -> torch.Tensor:
    xf = reference._as_float(x).float().mean(dim=1, keepdim=True)
    return xf - xf.mean(dim=(2, 3), keepdim=True)


def _template_lines(L: int):
    """The template's map as ``template_lines:L`` (module doc): its first statistics from the normal images each
    run is scored with (``fae-fast ablate --score-models`` reads every normal image of ``--data``)."""
    from fae_fast import ablate

    product, w = ablate._run_scorer, _line_kernels(L)

    def run_scorer(cfg, train_images, test, device):
        d = torch.cat([_brightness(train_images[i:i + 64]) for i in range(0, train_images.shape[0], 64)])
        mean, std = d.mean(0, keepdim=True), d.std(0, keepdim=True)
        scale = std + std.flatten().median()

        def template_map(x, n, k, error, map_fn=None):
            z = (_brightness(x) - mean) / scale
            return F.conv2d(F.pad(z, (L // 2,) * 4, mode="replicate"), w).abs().amax(dim=1, keepdim=True)

        scoring._template_map = template_map
        return product(cfg, train_images, test, device)

    ablate._run_scorer = run_scorer


def _bn_recalibrate():
    from fae_fast import ablate

    product = ablate._run_scorer

    def run_scorer(cfg, train_images, test, device):
        scorer = product(cfg, train_images, test, device)
        train_idx = ablate._holdout_split(cfg, train_images)[0]

        def score(model, settings, modes):
            recalibrate_batchnorm(model, scoring.network_view(train_images[train_idx], scorer.frame_scale))
            return scorer(model, settings, modes)

        return score

    ablate._run_scorer = run_scorer


def recalibrate_batchnorm(model: torch.nn.Module, images: torch.Tensor, batch_size: int = 8) -> int:
    """Re-estimate ``model``'s BatchNorm running statistics on ``images`` (uint8, the network's view) in a fixed
    order; returns the number of BatchNorm layers. The model is left in eval mode."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [b.momentum for b in bns]
    for b in bns:
        b.reset_running_stats()
        b.momentum = None  # a cumulative average over every batch
    dev = next(model.parameters()).device
    model.train()
    with torch.no_grad():
        for i in range(0, images.shape[0], batch_size):
            model(images[i:i + batch_size].to(dev).float() / 255.0)
    for b, m in zip(bns, momenta):
        b.momentum = m
    model.eval()
    return len(bns)


def _fusion_robust():
    product = scoring.template_statistics

    def robust(v):
        med = v.median()
        return med, ((v - med).abs().median() * 1.4826).clamp_min(1e-12)

    def template_statistics(hold_images, loo_scores, **kw):
        extra, _, t_maps = product(hold_images, loo_scores, **kw)
        s, t = loo_scores.detach().float().cpu(), t_maps.amax(dim=(1, 2, 3))
        (extra["score_center"], extra["score_spread"]), (extra["template_center"], extra["template_spread"]) = \
            robust(s), robust(t)
        return extra, scoring.fuse_scores(s, t, extra), t_maps

    scoring.template_statistics = template_statistics


def _shifted(t: torch.Tensor, R: int):
    """Every (2R + 1)^2 shift of the (B, 1, H, W) tensor ``t`` (replicated borders), one at a time."""
    p = F.pad(t, (R,) * 4, mode="replicate")
    H, W = t.shape[-2:]
    for dy in range(2 * R + 1):
        for dx in range(2 * R + 1):
            yield p[..., dy:dy + H, dx:dx + W]


def _shift_min(maps: torch.Tensor, mean: torch.Tensor, scale: torch.Tensor, R: int) -> torch.Tensor:
    """The smallest ``(maps - mean') / scale'`` over the shifts of ``mean`` and ``scale`` (each (1 or N, 1, H, W))."""
    out = None
    for m, s in zip(_shifted(mean, R), _shifted(scale, R)):
        z = (maps - m) / s
        out = z if out is None else torch.minimum(out, z)
    return out


def _shift(R: int, template_only: bool):
    product_normalize, product_loo = scoring.normalize_maps, scoring.leave_one_out_normalized

    def normalize_maps(maps, stats, mode):
        if mode != "zscore":
            return product_normalize(maps, stats, mode)
        return _shift_min(maps, stats["mean"].to(maps.device), stats["scale"].to(maps.device), R)

    def leave_one_out_normalized(maps, mode, window=1, pool=None, chunk=256):
        if mode != "zscore":
            return product_loo(maps, mode, window, pool, chunk)
        # the product's leave-one-out statistics (the mean and the scale of all the other maps), shift-tolerant
        allm = maps if pool is None else torch.cat([maps, pool])
        out = torch.empty(maps.shape, dtype=torch.float32, device=maps.device)
        for i in range(maps.shape[0]):
            stats = scoring.map_statistics(torch.cat([allm[:i], allm[i + 1:]]), window)
            out[i:i + 1] = _shift_min(maps[i:i + 1].float(), stats["mean"], stats["scale"], R)
        return out

    if not template_only:
        scoring.normalize_maps, scoring.leave_one_out_normalized = normalize_maps, leave_one_out_normalized
        return
    product_fused, product_stats = scoring.template_fused, scoring.template_statistics

    def template_fused(amap, score, template_map, stats, mode, weight=0.0):
        scoring.normalize_maps = normalize_maps
        try:
            return product_fused(amap, score, template_map, stats, mode, weight)
        finally:
            scoring.normalize_maps = product_normalize

    def template_statistics(*a, **kw):
        scoring.leave_one_out_normalized = leave_one_out_normalized
        try:
            return product_stats(*a, **kw)
        finally:
            scoring.leave_one_out_normalized = product_loo

    scoring.template_fused, scoring.template_statistics = template_fused, template_statistics


def apply_probe(probe: str) -> None:
    """Patch this process for ``probe`` (module doc); "none" leaves the product as it is."""
    name, _, arg = probe.partition(":")
    if name == "none":
        return
    if name == "multiscale":
        scales = [int(s) for s in arg.split(",") if s]
        if not scales or min(scales) < 1:
            raise SystemExit(f"explore_scoring: multiscale needs scales >= 1, got {arg!r}")
        return _multiscale(scales)
    if name == "template_gain" and not arg:
        return _template_gain()
    if name == "template_local" and arg.isdigit() and int(arg) % 2 == 1:
        return _template_local(int(arg))
    if name in ("shift", "template_shift") and arg.isdigit() and int(arg) >= 1:
        return _shift(int(arg), template_only=name == "template_shift")
    if name == "template_lines" and arg.isdigit() and int(arg) % 2 == 1:
        return _template_lines(int(arg))
    if name == "bn_recalibrate" and not arg:
        return _bn_recalibrate()
    if name == "fusion_robust" and not arg:
        return _fusion_robust()
    if name == "fusion" and (arg == "max" or arg.replace(".", "", 1).isdigit()):
        if arg != "max" and not 0 <= float(arg) <= 1:
            raise SystemExit(f"explore_scoring: fusion weight must be in [0, 1], got {arg!r}")
        return _fusion(arg)
    raise SystemExit(f"explore_scoring: unknown probe {probe!r} (module doc: multiscale:S,..., template_gain, "
                     f"template_local:K, fusion_robust, shift:R, template_shift:R, template_lines:L, bn_recalibrate, "
                     f"fusion:W, fusion:max, none)")


def definition(probe: str) -> str:
    """The module doc's bullet of ``probe`` on one line: the one named exactly (``fusion:max``), else the one of
    its name with a placeholder argument (``fusion:W``)."""
    text = __doc__.split("Probes:")[1].split("Run::")[0]
    bullets = {b.split("``")[1]: " ".join(b.split()) for b in text.split("* ") if b.startswith("``")}
    if probe in bullets:
        return bullets[probe]
    name = probe.partition(":")[0]
    generic = [v for key, v in bullets.items() if key.partition(":")[0] == name and not key.partition(":")[2].islower()]
    return generic[0] if generic else "the product's scoring, unchanged"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--probe", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--models", required=True, nargs="+")
    p.add_argument("--json", required=True, type=Path)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a scoring override for every model, as fae-fast ablate --score-models --set takes it")
    args = p.parse_args(argv)
    apply_probe(args.probe)
    from fae_fast._atomic import write_json
    from fae_fast.ablate import main as ablate_main

    rc = ablate_main(["--data", args.data, "--score-models", *args.models, "--no-sweep", "--threads",
                      str(args.threads), "--json", str(args.json), *(a for kv in args.set for a in ("--set", kv))])
    if rc == 0:
        result = json.loads(args.json.read_text())
        result["probe"] = {"name": args.probe, "definition": definition(args.probe)}
        write_json(args.json, result)
    return rc


if __name__ == "__main__":
    sys.exit(main())
