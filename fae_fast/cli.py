"""Command line: ``fae-fast train | eval | predict | demo | bench | ablate``.

    fae-fast train --data DIR --out MODEL [--steps N] [--size HxW] [--preset fast]
    fae-fast eval --model MODEL --data DIR [--json FILE] [--report DIR]
    fae-fast predict --model MODEL INPUT... --out DIR [--image-threshold T] [--pixel-threshold T]
    fae-fast demo [--out DIR]
    fae-fast bench [--quick] [--json FILE]
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from . import _atomic
from .config import PRESETS, FAEConfig, parse_size, preset


class CLIError(Exception):
    """A user-facing error: printed without a traceback, exit status 2."""


def _load_config(args) -> FAEConfig:
    cfg = preset(args.preset)
    if getattr(args, "config", None):
        try:
            with open(args.config) as f:
                cfg = FAEConfig.from_dict(json.load(f))
        except (OSError, json.JSONDecodeError, ValueError, TypeError) as exc:
            raise CLIError(f"config file {args.config}: {exc}") from exc
    if getattr(args, "steps", None) is not None:
        cfg.train.steps = args.steps
    if getattr(args, "size", None):
        cfg.train.image_size = parse_size(args.size)
    elif not getattr(args, "config", None) and hasattr(args, "size"):
        cfg.train.image_size = "auto"  # the default of `train` when neither --size nor --config says otherwise
    if getattr(args, "batch_size", None):
        cfg.train.batch_size = args.batch_size
    if getattr(args, "lr", None):
        cfg.train.lr = args.lr
    if getattr(args, "seed", None) is not None:
        cfg.train.seed = args.seed
    if getattr(args, "compile", False):
        cfg.train.compile = True
    if getattr(args, "keep_aspect", False):
        cfg.train.keep_aspect = True
    return cfg


_write_json = _atomic.write_json


# ------------------------------------------------------------------------------------------ commands
def cmd_train(args) -> int:
    from .api import Detector

    cfg = _load_config(args)
    if not Path(args.data).is_dir():
        raise CLIError(f"--data {args.data}: not a folder")
    det = Detector(cfg, device=args.device)
    t0 = time.perf_counter()
    det.fit(args.data, checkpoint=args.checkpoint, resume=args.resume, progress=not args.quiet)
    det.save(args.out)
    print(f"trained {cfg.train.steps} steps in {time.perf_counter() - t0:.1f} s; model written to {args.out}")
    print(f"thresholds: image {det.thresholds['image']:.6g}, pixel {det.thresholds['pixel']:.6g}")
    return 0


def cmd_eval(args) -> int:
    from .api import Detector
    from .evaluate import format_table

    det = Detector.load(args.model, device=args.device)
    result = det.evaluate(args.data, batch_size=args.batch_size, report=args.report)
    print(format_table(result))
    if args.json:
        _write_json(args.json, result)
        print(f"metrics written to {args.json}")
    if args.report:
        print(f"report written to {Path(args.report) / 'report.html'}")
    return 0


def _expand_inputs(inputs) -> list[Path]:
    from .data import list_images

    paths: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            paths.extend(list_images(p))
        elif p.is_file():
            paths.append(p)
        else:
            raise CLIError(f"input {item}: no such file or folder")
    if not paths:
        raise CLIError("no input images")
    return paths


def predict_to_folder(det, paths: list[Path], out: Path, *, image_threshold=None, pixel_threshold=None,
                      batch_size: int = 32, save_maps: bool = False, names: list[str] | None = None) -> list[dict]:
    """Score ``paths`` and write, per image, a heatmap overlay and a mask at the image's own resolution (the map
    is brought back from the model's size), plus ``results.csv`` and ``results.json``; returns the rows.

    The colour scale is fixed across images (0 to twice the pixel threshold), so overlays compare. Output files
    are named after ``names`` (default: the file stems), which must be distinct: nothing is overwritten.
    """
    from .data import map_to_original, read_image
    from .report import overlay

    names = [p.stem for p in paths] if names is None else list(names)
    if len(names) != len(paths):
        raise ValueError(f"{len(names)} output names for {len(paths)} inputs")
    if len(set(names)) != len(names):
        dup = sorted({s for s in names if names.count(s) > 1})
        raise CLIError(f"inputs share file stems {dup[:5]}: outputs would overwrite each other")
    out.mkdir(parents=True, exist_ok=True)
    it = det.thresholds["image"] if image_threshold is None else float(image_threshold)
    pt = det.thresholds["pixel"] if pixel_threshold is None else float(pixel_threshold)
    keep = det.config.train.keep_aspect
    rows = []
    vmax = None
    for start in range(0, len(paths), batch_size):
        chunk = paths[start:start + batch_size]
        _, maps, scores = det.anomaly_maps(chunk, batch_size=batch_size)
        if vmax is None:
            vmax = 2.0 * pt if pt else max(float(maps.max()), 1e-12)
        for i, p in enumerate(chunk):
            img = read_image(p)
            amap = map_to_original(maps[i, 0].numpy(), img.shape[:2], keep)
            mask = amap > pt if pt is not None else None
            stem = names[start + i]
            _atomic.write_png(out / f"{stem}_overlay.png", overlay(img, amap, 0.0, vmax, mask=mask))
            if mask is not None:
                _atomic.write_png(out / f"{stem}_mask.png", mask.astype(np.uint8) * 255)
            if save_maps:
                buf = io.BytesIO()  # np.save on a path would append ".npy" to the temporary name
                np.save(buf, amap)
                _atomic.write_bytes(out / f"{stem}_map.npy", buf.getvalue())
            score = float(scores[i])
            rows.append({"file": str(p), "score": score,
                         "label": None if it is None else bool(score > it),
                         "defect_fraction": None if mask is None else float(mask.mean()),
                         "overlay": f"{stem}_overlay.png"})
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    _atomic.write_text(out / "results.csv", buf.getvalue())
    _write_json(out / "results.json", {"image_threshold": it, "pixel_threshold": pt, "results": rows})
    return rows


def cmd_predict(args) -> int:
    from .api import Detector

    det = Detector.load(args.model, device=args.device)
    paths = _expand_inputs(args.inputs)
    rows = predict_to_folder(det, paths, Path(args.out), image_threshold=args.image_threshold,
                             pixel_threshold=args.pixel_threshold, batch_size=args.batch_size,
                             save_maps=args.save_maps)
    n_bad = sum(1 for r in rows if r["label"])
    print(f"{len(rows)} images scored, {n_bad} anomalous; overlays, masks, results.csv and results.json "
          f"in {args.out}")
    return 0


def cmd_demo(args) -> int:
    from .api import Detector
    from .evaluate import format_table
    from .synthetic import make_dataset

    t0 = time.perf_counter()
    tmp = None
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="fae_fast_demo_")
        out = Path(tmp.name)
    try:
        cfg = demo_config(args.steps, args.seed)
        data = make_dataset(out / "data", size=tuple(cfg.train.image_size), seed=args.seed, overwrite=True)
        print(f"[demo] synthetic dataset in {data} ({time.perf_counter() - t0:.1f} s)")
        det = Detector(cfg, device=args.device)
        det.fit(data / "train" / "good", progress=not args.quiet)
        det.save(out / "model.fae")
        print(f"[demo] trained {cfg.train.steps} steps ({time.perf_counter() - t0:.1f} s)")
        result = det.evaluate(data, report=out / "report")
        _write_json(out / "eval.json", result)
        print(format_table(result))
        test_paths = sorted((data / "test").glob("*/*.png"))
        predict_to_folder(det, test_paths, out / "overlays", names=[f"{p.parent.name}_{p.stem}" for p in test_paths])
        print(f"[demo] done in {time.perf_counter() - t0:.1f} s; model, eval.json, report/ and overlays/ in {out}"
              if tmp is None else f"[demo] done in {time.perf_counter() - t0:.1f} s (temporary folder removed; "
                                  f"pass --out DIR to keep the outputs)")
    finally:
        if tmp is not None:
            tmp.cleanup()
    return 0


def demo_config(steps: int | None = None, seed: int = 0) -> FAEConfig:
    """The demo's small, CPU-friendly configuration (preset ``tiny``)."""
    cfg = preset("tiny")
    cfg.train.steps = 400 if steps is None else steps
    cfg.train.batch_size = 8
    cfg.train.lr = 3e-3
    cfg.train.checkpoint_every = 10 ** 9
    cfg.train.seed = seed
    return cfg


def cmd_bench(args, rest) -> int:
    from .inference import bench

    return int(bench.main(rest) or 0)


# ------------------------------------------------------------------------------------------ parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fae-fast", description="Filtering Autoencoder anomaly detection, fast.")
    from ._version import __version__

    p.add_argument("--version", action="version", version=f"fae_fast {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp):
        sp.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")

    t = sub.add_parser("train", help="train a model on normal images")
    t.add_argument("--data", required=True, help="MVTec category root or a folder of normal images")
    t.add_argument("--out", required=True, help="model file to write")
    t.add_argument("--steps", type=int)
    t.add_argument("--size",
                   help="image size HxW (e.g. 256 or 208x512), or 'auto' (default): the data's aspect ratio at "
                        "the preset's pixel count (256^2 for default/fast), sides multiples of 16")
    t.add_argument("--preset", default="default", choices=PRESETS)
    t.add_argument("--config", help="JSON config file (FAEConfig.to_dict layout)")
    t.add_argument("--batch-size", type=int)
    t.add_argument("--lr", type=float)
    t.add_argument("--seed", type=int)
    t.add_argument("--keep-aspect", action="store_true", help="resize keeping the aspect ratio (pads)")
    t.add_argument("--compile", action="store_true", help="torch.compile the model")
    t.add_argument("--checkpoint", help="training-state checkpoint file (written periodically, atomically)")
    t.add_argument("--resume", help="continue from a training-state checkpoint")
    t.add_argument("--quiet", action="store_true")
    common(t)

    e = sub.add_parser("eval", help="metrics on an MVTec-layout test set")
    e.add_argument("--model", required=True)
    e.add_argument("--data", required=True)
    e.add_argument("--json", help="write the metrics as JSON")
    e.add_argument("--report", help="write a self-contained HTML report into this folder")
    e.add_argument("--batch-size", type=int, default=32)
    common(e)

    pr = sub.add_parser("predict", help="score images; write overlays, masks, CSV and JSON")
    pr.add_argument("--model", required=True)
    pr.add_argument("inputs", nargs="+", help="image files or folders")
    pr.add_argument("--out", required=True)
    pr.add_argument("--image-threshold", type=float)
    pr.add_argument("--pixel-threshold", type=float)
    pr.add_argument("--batch-size", type=int, default=32)
    pr.add_argument("--save-maps", action="store_true", help="also write each map as .npy")
    common(pr)

    d = sub.add_parser("demo", help="synthetic data -> train -> eval -> overlays, on the CPU in minutes")
    d.add_argument("--out", help="keep data, model, overlays and eval JSON here")
    d.add_argument("--steps", type=int)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--quiet", action="store_true")
    common(d)

    sub.add_parser("bench", help="throughput/latency: plain PyTorch vs fae_fast (see fae-fast bench --help)",
                   add_help=False)
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        return cmd_bench(None, argv[1:])
    if argv and argv[0] == "ablate":
        from .ablate import main as ablate_main

        return int(ablate_main(argv[1:]) or 0)
    args = build_parser().parse_args(argv)
    handlers = {"train": cmd_train, "eval": cmd_eval, "predict": cmd_predict, "demo": cmd_demo}
    try:
        return handlers[args.command](args)
    except CLIError as exc:
        print(f"fae-fast {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, TypeError) as exc:
        # bad input (a file, a value): one clear line, no traceback; FAE_FAST_DEBUG=1 shows it
        if os.environ.get("FAE_FAST_DEBUG"):
            raise
        print(f"fae-fast {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
