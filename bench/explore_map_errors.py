"""Re-score saved models with other anomaly-map errors: which error kind finds the defects (no retraining).

For each model file: its held-out normal images (the training split of its own seed) give the per-pixel
statistics, the test split is scored with every error kind -- "squared", "gradient" and "squared + w x gradient"
for each ``--weights`` w (w = 4 is the product's "squared+gradient") --, z-scored and smoothed with the model's
own (n, k), and evaluated like ``fae-fast eval`` (overall and per defect type). This is how docs/RESULTS.md chose
the default map error; ``fae-fast ablate`` sweeps the product's kinds on the models it trains.

Run::

    python -m bench.explore_map_errors --data ../shared/data/ksdd/kolektorsdd --models runs/m/*.fae \\
        --json bench/results/recipe_explore/map_errors_ksdd_2core-vm.json
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from fae_fast import reference
from fae_fast.ablate import git_commit, holdout_images, load_data, machine_info
from fae_fast.api import Detector
from fae_fast.config import smoothing_for_size
from fae_fast.evaluate import evaluate
from fae_fast.scoring import map_statistics, normalize_maps

METRICS = ("image_auroc", "pixel_auroc", "pixel_aupro")


def error_maps(model, images: torch.Tensor, n: int, k: int, weights) -> dict[str, torch.Tensor]:
    """{kind: smoothed maps (N, 1, H, W)} of uint8 ``images`` for every kind explored."""
    out: dict[str, list] = {}
    with torch.inference_mode():
        for i in range(0, len(images), 16):
            x = images[i:i + 16].float() / 255
            r = model(x).float()
            sq, grad = reference.error_image(x, r, "squared"), reference.error_image(x, r, "gradient")
            kinds = {"squared": sq, "gradient": grad, **{f"squared+{w:g}xgradient": sq + w * grad for w in weights}}
            for name, e in kinds.items():
                out.setdefault(name, []).append(reference.box_filter(e, n=n, k=k))
    return {name: torch.cat(v) for name, v in out.items()}


def score_model(path: Path, data: Path, weights) -> list[dict]:
    det = Detector.load(path, device="cpu")
    cfg = det.config
    size, train, test = load_data(data, cfg)
    n, k = smoothing_for_size(cfg.map, *size)
    model = det.model.eval()
    test_maps = error_maps(model, test.images, n, k, weights)
    hold_maps = error_maps(model, holdout_images(cfg, train), n, k, weights)
    labels, masks = test.labels.numpy(), test.masks[:, 0].numpy()
    rows = []
    for kind, maps in test_maps.items():
        z = normalize_maps(maps, map_statistics(hold_maps[kind]), "zscore")
        res = evaluate(z.amax(dim=(1, 2, 3)).numpy(), z[:, 0].numpy(), labels, masks, test.defect_types,
                       regions=test.regions[:, 0].numpy())
        rows.append({"model": str(path), "seed": int(cfg.train.seed), "kind": kind, "n": n, "k": k,
                     **{m: float(res["overall"][m]) for m in METRICS},
                     "per_defect": {t: {m: float(v[m]) for m in METRICS} for t, v in res["per_defect"].items()}})
        print(f"{path.name} {kind:24s} " + " ".join(f"{m} {100 * rows[-1][m]:.1f}" for m in METRICS), flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, type=Path)
    p.add_argument("--models", required=True, nargs="+", type=Path)
    p.add_argument("--weights", default="1,4,16", help="w of the squared + w x gradient kinds")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    weights = [float(w) for w in args.weights.split(",") if w]
    t0 = time.perf_counter()
    rows = [r for m in args.models for r in score_model(m, args.data, weights)]
    if args.json:
        from fae_fast._atomic import write_text

        write_text(args.json, json.dumps({"dataset": str(args.data.resolve()), "commit": git_commit(),
                                          "machine": machine_info("cpu"), "normalize": "zscore",
                                          "seconds": round(time.perf_counter() - t0, 1), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
