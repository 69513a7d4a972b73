"""Ablations of the paper's claims as a command: ``fae-fast ablate --data DIR``.

Trains and evaluates, with several seeds, the FAE against its ablations (DESIGN.md 1.2; arXiv 2511.07233):

=====================  ======================================================================================
variant                what changes
=====================  ======================================================================================
``fae``                the default recipe: corruption + symmetric same-eps noise
``no_noise``           corruption only (sigma = 0)
``input_noise``        noise on the input only (the target is the clean image: anchors the Jacobian to zero)
``independent_noise``  independent eps on input and target
``no_thin_strokes``    no Bezier strokes among the occlusion shapes
``opaque``             opacity beta = 1 always (no semi-transparent occlusions)
``plain_ae``           a plain autoencoder: no corruption and no noise (the floor)
=====================  ======================================================================================

plus a sweep of the smoothing (n passes x k window) evaluated on the ``fae`` models without retraining. The
output is a table of mean +- std over seeds of I-AUROC, P-AUROC, AU-PRO and P-AP, as JSON and Markdown.

Everything not named above is the same for every variant (data, size, steps, seeds), so the rows compare.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import _atomic, ops
from .config import FAEConfig, parse_size, preset, smoothing_for_size

METRICS = ("image_auroc", "pixel_auroc", "pixel_aupro", "pixel_ap", "image_f1max")


def _no_noise(c):
    c.noise.mode = "none"


def _input_noise(c):
    c.noise.mode = "input"


def _independent(c):
    c.noise.mode = "independent"


def _no_strokes(c):
    c.corruption.w_stroke = 0.0


def _opaque(c):
    c.corruption.beta_min = c.corruption.beta_max = 1.0


def _plain_ae(c):
    c.corruption.p = 0.0
    c.noise.mode = "none"


VARIANTS: dict[str, Callable[[FAEConfig], None]] = {
    "fae": lambda c: None,
    "no_noise": _no_noise,
    "input_noise": _input_noise,
    "independent_noise": _independent,
    "no_thin_strokes": _no_strokes,
    "opaque": _opaque,
    "plain_ae": _plain_ae,
}


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


def maps_for_settings(model, images: torch.Tensor, settings, *, batch_size: int = 16, device=None):
    """Anomaly maps of ``images`` for several (n, k): one forward pass per batch, one map per setting.

    Returns:
        {(n, k): (maps (N, H, W) float32 numpy, scores (N,) float32 numpy)}.
    """
    from .scoring import _autocast, autocast_dtype, resolve_device

    dev = resolve_device(device or next(model.parameters()).device)
    dtype = autocast_dtype("auto", dev)
    N, _, H, W = images.shape
    out = {s: (np.empty((N, H, W), np.float32), np.empty((N,), np.float32)) for s in settings}
    model.eval()
    with torch.inference_mode():
        for i in range(0, N, batch_size):
            xb = images[i:i + batch_size].to(dev)
            with _autocast(dev, dtype):
                recon = model(xb.float() / 255.0)
            for s in settings:
                amap, score = ops.anomaly_map(xb, recon, n=s[0], k=s[1])
                out[s][0][i:i + len(xb)] = amap[:, 0].float().cpu().numpy()
                out[s][1][i:i + len(xb)] = score.float().cpu().numpy()
    return out


def _mean_std(values):
    arr = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=np.float64)
    if arr.size == 0:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    return {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if arr.size > 1 else 0.0, "n": int(arr.size)}


def run_ablation(data: str | Path, *, variants=("fae", "no_noise", "plain_ae"), seeds=(0, 1, 2),
                 base: FAEConfig | None = None, device="auto", progress: bool = False, log=print) -> dict:
    """Train every (variant, seed), evaluate on ``data``'s test split, and summarise.

    Args:
        data: MVTec-layout category root.
        variants: names from :data:`VARIANTS`.
        seeds: training seeds (each changes initialisation, corruption and noise draws, and the holdout split).
        base: the recipe every variant starts from (image size, steps, ...).
        device: training and inference device.

    Returns:
        A JSON-ready dict with ``runs`` (per run metrics), ``summary`` (variant -> metric -> mean/std/n) and
        ``smoothing`` ((n, k) -> metric -> mean/std/n, on the ``fae`` runs).
    """
    from .data import load_images, load_test_set, normal_image_paths
    from .evaluate import evaluate
    from .train import train

    base = copy.deepcopy(base) if base is not None else FAEConfig()
    size = tuple(base.train.image_size)
    keep = base.train.keep_aspect
    t0 = time.perf_counter()
    train_images = load_images(normal_image_paths(Path(data)), size, keep_aspect=keep)
    test = load_test_set(Path(data), size, keep_aspect=keep)
    labels, masks = test.labels.numpy(), test.masks[:, 0].numpy()
    log(f"[ablate] {len(train_images)} train / {len(test)} test images at {size[0]}x{size[1]} "
        f"({time.perf_counter() - t0:.1f} s)")
    n, k = smoothing_for_size(base.map, *size)
    grid = smoothing_grid(n, k)
    runs, sweep = [], {f"n={a},k={b}": [] for a, b in grid}
    for name in variants:
        for seed in seeds:
            cfg = variant_config(base, name, seed)
            t1 = time.perf_counter()
            res = train(cfg, train_images, device=device, progress=progress)
            train_s = time.perf_counter() - t1
            settings = grid if name == "fae" else [(n, k)]
            per = maps_for_settings(res.model, test.images, settings, device=device)
            for (a, b), (maps, scores) in per.items():
                metrics = evaluate(scores, maps, labels, masks, test.defect_types)["overall"]
                row = {m: float(metrics[m]) for m in METRICS}
                if (a, b) == (n, k):
                    runs.append({"variant": name, "seed": int(seed), "train_seconds": round(train_s, 2),
                                 "final_loss": float(res.history[-1]["loss"]) if res.history else None, **row})
                    log(f"[ablate] {name:18s} seed {seed}: " + ", ".join(f"{m} {row[m]:.4f}" for m in METRICS)
                        + f" ({train_s:.0f} s)")
                if name == "fae":
                    sweep[f"n={a},k={b}"].append(row)
            del res, per
    result = {
        "dataset": str(Path(data).resolve()),
        "image_size": list(size),
        "smoothing_default": [n, k],
        "steps": base.train.steps,
        "seeds": list(seeds),
        "device": str(device),
        "machine": {"node": platform.node(), "cpu_count": __import__("os").cpu_count(),
                    "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                    "torch": torch.__version__},
        "config": base.to_dict(),
        "runs": runs,
        "smoothing_runs": sweep,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    return summarise(result)


def summarise(result: dict) -> dict:
    """(Re)compute ``summary`` and ``smoothing`` (mean/std/n over seeds) from the per-run rows."""
    variants = list(dict.fromkeys(r["variant"] for r in result["runs"]))
    result["summary"] = {v: {m: _mean_std([r[m] for r in result["runs"] if r["variant"] == v]) for m in METRICS}
                         for v in variants}
    result["smoothing"] = {key: {m: _mean_std([r[m] for r in rows]) for m in METRICS}
                           for key, rows in result.get("smoothing_runs", {}).items() if rows}
    return result


def merge_results(parts: list[dict]) -> dict:
    """One result from ablations run in parts (e.g. in parallel processes) on the same data and recipe."""
    if not parts:
        raise ValueError("nothing to merge")
    keys = ("dataset", "image_size", "steps", "smoothing_default", "config")
    for part in parts[1:]:
        for key in keys:
            if part[key] != parts[0][key]:
                raise ValueError(f"cannot merge ablations with different {key}"
                                 + ("" if key == "config" else f": {parts[0][key]!r} vs {part[key]!r}"))
    out = copy.deepcopy(parts[0])
    out["runs"] = [r for part in parts for r in part["runs"]]
    seen = [(r["variant"], r["seed"]) for r in out["runs"]]
    dup = sorted({s for s in seen if seen.count(s) > 1})
    if dup:
        raise ValueError(f"the parts repeat runs {dup}: each (variant, seed) must come from one part")
    sweep: dict[str, list] = {}
    for part in parts:
        for key, rows in part.get("smoothing_runs", {}).items():
            sweep.setdefault(key, []).extend(rows)
    out["smoothing_runs"] = sweep
    out["seeds"] = sorted({s for part in parts for s in part["seeds"]})
    out["seconds"] = sum(part["seconds"] for part in parts)
    return summarise(out)


def markdown_table(result: dict) -> str:
    """The summary and the smoothing sweep as Markdown tables (mean +- std in percent)."""
    head = "| variant | " + " | ".join(METRICS) + " |\n|---|" + "---|" * len(METRICS) + "\n"
    lines = [head]
    for v, row in result["summary"].items():
        cells = [f"{100 * row[m]['mean']:.1f} ± {100 * row[m]['std']:.1f}" for m in METRICS]
        lines.append(f"| {v} (n={row[METRICS[0]]['n']}) | " + " | ".join(cells) + " |\n")
    if result.get("smoothing"):
        lines.append("\nSmoothing sweep on the `fae` models:\n\n" + head.replace("variant", "n, k"))
        for key, row in result["smoothing"].items():
            cells = [f"{100 * row[m]['mean']:.1f} ± {100 * row[m]['std']:.1f}" for m in METRICS]
            lines.append(f"| {key} | " + " | ".join(cells) + " |\n")
    return "".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="fae-fast ablate", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", help="MVTec-layout category root")
    p.add_argument("--merge", nargs="+", metavar="JSON", help="merge results of ablations run in parts instead")
    p.add_argument("--variants", default="fae,no_noise,input_noise,independent_noise,no_thin_strokes,opaque,plain_ae",
                   help=f"comma-separated, from {','.join(VARIANTS)}")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds")
    p.add_argument("--preset", default="default")
    p.add_argument("--steps", type=int)
    p.add_argument("--size", default="auto",
                   help="HxW, or 'auto': the data's aspect ratio at the preset's pixel count")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--sigma-max", type=float, help="noise range r of every variant (sigma ~ U(0, r))")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", help="write the result JSON here (e.g. bench/results/ablation_<data>_<machine>.json)")
    p.add_argument("--markdown", help="write the Markdown tables here")
    args = p.parse_args(argv)
    if args.merge:
        result = merge_results([json.loads(Path(f).read_text()) for f in args.merge])
        return _emit(result, args)
    if not args.data:
        p.error("--data is required (or --merge)")
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
        if args.batch_size:
            base.train.batch_size = args.batch_size
        if args.sigma_max is not None:
            base.noise.sigma_max = args.sigma_max
        base.train.image_size = parse_size(args.size)
        if base.train.image_size == "auto":
            from .api import resolve_auto_size

            base.train.image_size = resolve_auto_size(args.data, base.train.auto_pixels)
        result = run_ablation(args.data, variants=variants, seeds=seeds, base=base, device=args.device)
    except (ValueError, FileNotFoundError) as exc:
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
    return 0
