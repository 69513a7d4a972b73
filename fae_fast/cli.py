"""Command line: ``fae-fast train | eval | calibrate | predict | demo | bench | ablate``.

    fae-fast train --data DIR --out MODEL [--steps N] [--size HxW] [--preset fast]
    fae-fast eval --model MODEL --data DIR [--json FILE] [--report DIR]
    fae-fast calibrate --model MODEL --data VALIDATION_DIR --out MODEL2
    fae-fast predict --model MODEL INPUT... --out DIR [--image-threshold T] [--pixel-threshold T] [--on-error skip]
                     [--engine-backend auto|torch|onnxruntime] [--threads N]
    fae-fast demo [--out DIR]
    fae-fast bench [--quick] [--json FILE]
    fae-fast serve --model MODEL [--grpc-port 8001] [--http-port 8000] [--max-batch 16] [--max-queue-delay-us 500]
                   [--max-queue-size 64] [--device auto]          (Triton through PyTriton: pip install fae_fast[serve])
    fae-fast export --model MODEL --triton-repo DIR [--name fae]  (a Triton model repository: ONNX + config.pbtxt)
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import math
import os
import re
import socket
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from . import _atomic
from .config import PRESETS, FAEConfig, frame_size, parse_size, preset, resolve_preset

try:
    import fcntl
except ImportError:  # Windows: output folders are not locked there
    fcntl = None


class CLIError(Exception):
    """A user-facing error: printed without a traceback, exit status 2."""


# ------------------------------------------------------------------------------------------ checks
# Everything a command needs is checked before it loads data or a model: a typo never costs a training run.

_FLAG_OF_KEY = {"train.steps": "--steps", "train.batch_size": "--batch-size", "train.lr": "--lr",
                "train.seed": "--seed", "train.image_size": "--size"}


def _load_config(args) -> FAEConfig:
    """The training config, layered in one order: the preset, then the ``--config`` file's keys, then flags."""
    cfg = preset(resolve_preset(args.preset, getattr(args, "device", None)))
    file_keys: set[str] = set()
    if getattr(args, "config", None):
        _check_in_file(args.config, "--config")
        try:
            with open(args.config) as f:
                d = json.load(f)
            cfg = FAEConfig.from_dict(d, base=cfg)
        except (OSError, json.JSONDecodeError, ValueError, TypeError) as exc:
            raise CLIError(f"--config {args.config}: {exc}") from exc
        file_keys = {f"{sec}.{k}" for sec, sub in d.items() for k in sub}
    flags = {"train.steps": getattr(args, "steps", None), "train.batch_size": getattr(args, "batch_size", None),
             "train.lr": getattr(args, "lr", None), "train.seed": getattr(args, "seed", None)}
    size = getattr(args, "size", None)
    if size is not None:
        try:
            flags["train.image_size"] = parse_size(size)
        except ValueError as exc:
            raise CLIError(f"--size {size}: {exc}") from None
    elif hasattr(args, "size") and "train.image_size" not in file_keys:
        flags["train.image_size"] = "auto"  # the default of `train` when neither --size nor --config says otherwise
    for key, value in flags.items():
        if value is not None:  # `is not None`, not truthiness: --lr 0 must reach the check, not the default
            setattr(cfg.train, key.split(".")[1], value)
    if getattr(args, "compile", False):
        cfg.train.compile = True
    if getattr(args, "keep_aspect", False):
        cfg.train.keep_aspect = True
    try:
        cfg.validate()
    except (TypeError, ValueError) as exc:
        m = re.match(r"config ([\w.]+)", str(exc))
        key = m.group(1) if m else ""
        if flags.get(key) is not None and key in _FLAG_OF_KEY and key != "train.image_size":
            raise CLIError(f"{_FLAG_OF_KEY[key]} {flags[key]}: {exc}") from None
        where = f"--config {args.config}: " if key in file_keys else ""
        raise CLIError(f"{where}{exc}") from None
    return cfg


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _set_threads(args) -> None:
    """``--threads N``: torch's CPU threads (intra-op). On a loaded 2-core machine torch's default of one thread per
    core measured ~5x slower than 1 thread per process when several jobs share it."""
    n = getattr(args, "threads", None)
    if n is None:
        return
    if n < 1:
        raise CLIError(f"--threads {n}: must be >= 1")
    import torch

    torch.set_num_threads(int(n))


def _check_device(text: str) -> str:
    """``--device``: a device torch knows and this machine has (one line instead of a traceback later)."""
    import torch

    if text == "auto":
        return text
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise CLIError(f"--device {text!r}: not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise CLIError(f"--device {text}: CUDA is not available here (torch {torch.__version__}, CUDA build "
                           f"{torch.version.cuda or 'none'}); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise CLIError(f"--device {text}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type != "cpu":
        raise CLIError(f"--device {text}: only cpu and cuda devices are supported")
    return text


def _check_positive(value: int, flag: str) -> int:
    if value < 1:
        raise CLIError(f"{flag} {value}: must be >= 1")
    return value


def _check_threshold(value: float | None, flag: str) -> float | None:
    if value is not None and not math.isfinite(value):
        raise CLIError(f"{flag} {value}: a threshold must be a finite number (a NaN threshold passes everything)")
    return value


def _writable_folder(folder: Path, flag: str, value) -> None:
    """The nearest existing ancestor of ``folder`` must be a folder we can create files in."""
    a = folder.absolute()
    while not a.exists() and a != a.parent:
        a = a.parent
    if not a.is_dir():
        raise CLIError(f"{flag} {value}: {a} is not a folder")
    if not os.access(a, os.W_OK | os.X_OK):
        raise CLIError(f"{flag} {value}: folder {a} is not writable")


def _check_in_file(value, flag: str) -> Path:
    """A file the command reads: it exists and is a regular file (a FIFO would block the reader for ever)."""
    p = Path(value)
    if not p.exists():
        raise CLIError(f"{flag} {value}: no such file")
    if not p.is_file():
        raise CLIError(f"{flag} {value}: not a regular file")
    return p


def _check_out_file(value, flag: str) -> Path:
    """A file the command will (over)write: not a folder, in a writable folder."""
    p = Path(value)
    if p.is_dir():
        raise CLIError(f"{flag} {value}: is a folder, expected a file name")
    if p.exists() and not p.is_file():
        raise CLIError(f"{flag} {value}: exists and is not a regular file")
    _writable_folder(p.parent, flag, value)
    return p


def _check_out_dir(value, flag: str) -> Path:
    """A folder the command will write into: a folder or nothing yet, never an existing file."""
    p = Path(value)
    if p.exists() and not p.is_dir():
        raise CLIError(f"{flag} {value}: exists and is not a folder")
    _writable_folder(p, flag, value)
    return p


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror and exc.filename:  # "no space left on device: PATH"
        return f"{exc.strerror[0].lower()}{exc.strerror[1:]}: {exc.filename}"
    return str(exc)


_write_json = _atomic.write_json


# ------------------------------------------------------------------------------------------ commands
def _resume_of(args, restarts: int) -> tuple[str | None, str]:
    """The file to resume from and why: ``--resume FILE``; ``--resume auto``: ``--checkpoint`` if it exists;
    no ``--resume`` in a job torchrun has restarted (``--max-restarts``): ``--checkpoint`` if it exists."""
    if args.resume == "auto" or (args.resume is None and restarts > 0):
        if not args.checkpoint:
            if args.resume == "auto":
                raise CLIError("--resume auto resumes from --checkpoint: give --checkpoint FILE")
            return None, ""
        if Path(args.checkpoint).exists():
            why = "--resume auto" if args.resume == "auto" else f"torchrun restart {restarts}"
            return args.checkpoint, f"resuming from {args.checkpoint} ({why})"
        return None, ""
    if args.resume:
        _check_in_file(args.resume, "--resume")
    return args.resume, (f"resuming from {args.resume}" if args.resume else "")


def cmd_train(args) -> int:
    from . import distributed
    from .api import Detector, resolve_auto_size
    from .data import normal_image_paths
    from .scoring import resolve_device

    cfg = _load_config(args)
    device = _check_device(args.device)
    out = _check_out_file(args.out, "--out")
    if args.checkpoint:
        _check_out_file(args.checkpoint, "--checkpoint")
    resume, resume_note = _resume_of(args, distributed.restart_count())
    # under torchrun: join the process group now; only rank 0 prints and writes files
    dist, dev = distributed.setup(resolve_device(device))
    say = print if dist.is_main else (lambda *a, **k: None)
    if not Path(args.data).is_dir():
        raise CLIError(f"--data {args.data}: not a folder")
    paths = normal_image_paths(args.data)  # refuses a folder without images, naming it
    if out.resolve() in {p.resolve() for p in paths}:
        raise CLIError(f"--out {args.out} is one of the training images")
    if cfg.train.image_size == "auto":
        cfg.train.image_size = resolve_auto_size(paths, cfg.train.auto_pixels)
    (h, w), t = cfg.train.image_size, cfg.train
    chosen = resolve_preset(args.preset, device)
    source = (f"preset {chosen}" + (f" (auto: {'a CUDA device' if chosen == 'default' else 'no GPU'})"
                                    if args.preset == "auto" else "")
              + (f" + {args.config}" if args.config else ""))
    crop = "" if t.crop_size is None else f", crops {t.crop_size[0]}x{t.crop_size[1]}"
    fh, fw = frame_size(cfg.map, (h, w))  # map.frame_scale: the frames are read finer than the network's size
    frames = f", frames {fh}x{fw} (the template's)" if (fh, fw) != (h, w) else ""
    nz = cfg.noise
    noise = nz.mode if nz.mode == "none" else f"{nz.mode} (sigma_max {nz.sigma_max:g} {nz.sigma_reference})"
    world = f"{distributed.describe(dist, dev, cfg.model.norm)}, " if dist.active else ""
    threads = _torch_threads()
    say(f"train: {world}{source}, size {h}x{w} (HxW){frames}{crop}, {t.steps} steps, batch {t.batch_size}"
        f"{' (global)' if dist.world_size > 1 else ''}, lr {t.lr:g}, noise {noise}, {t.loss_label()}, "
        f"map {cfg.map.error} error, {cfg.map.normalization_label()}, {cfg.map.image_score_label()}, "
        f"widths {tuple(cfg.model.widths)}"
        f"{f' x {cfg.model.members} members averaged' if cfg.model.members > 1 else ''}"
        f"{f', {cfg.model.hide_cell} px cells inpainted at test time' if cfg.model.hide_cell else ''}, "
        f"{len(paths)} images, "
        f"{threads} CPU thread{'' if threads == 1 else 's'}", flush=True)
    if resume_note:
        say(resume_note, flush=True)
    det = Detector(cfg, device=str(dev) if dist.active else device)
    t0 = time.perf_counter()
    det.fit(paths, checkpoint=args.checkpoint, resume=resume, progress=not args.quiet and dist.is_main)
    if dist.is_main:
        det.save(out)
    say(f"trained {cfg.train.steps} steps in {time.perf_counter() - t0:.1f} s; model written to {args.out}")
    say(f"thresholds: image {det.thresholds['image']:.6g}, pixel {det.thresholds['pixel']:.6g}")
    distributed.shutdown()
    return 0


def _load_detector(args, device: str):
    """The Detector of ``--model``, scoring with ``--engine-backend`` and ``--threads`` on the CPU; its engine is
    built here, so that a backend that cannot run fails before any output is written."""
    from .api import Detector

    det = Detector.load(_check_in_file(args.model, "--model"), device=device, engine_backend=args.engine_backend,
                        threads=args.threads)
    det._cpu_engine()
    return det


def cmd_eval(args) -> int:
    from . import distributed
    from .data import load_test_set
    from .evaluate import evaluate, format_table
    from .scoring import resolve_device

    device = _check_device(args.device)
    _check_positive(args.batch_size, "--batch-size")
    if args.json:
        _check_out_file(args.json, "--json")
    if args.report:
        _check_out_dir(args.report, "--report")
    # under torchrun the maps are computed split across the ranks and gathered; rank 0 reports
    dist, dev = distributed.setup(resolve_device(device))
    det = _load_detector(args, str(dev) if dist.active else device)
    # Detector.evaluate, unrolled so that the metrics are printed before any file is written (a full disk
    # must not lose them)
    test = load_test_set(Path(args.data), det.input_size, keep_aspect=det.config.train.keep_aspect)
    maps, scores = distributed.sharded_map(lambda imgs: det.anomaly_maps(imgs, batch_size=args.batch_size)[1:],
                                           test.images, dist, dev)
    if not dist.is_main:
        distributed.shutdown()
        return 0
    scores, maps = scores.numpy(), maps[:, 0].numpy()
    labels, masks = test.labels.numpy(), test.masks[:, 0].numpy()
    regions = test.regions[:, 0].numpy()
    result = evaluate(scores, maps, labels, masks, test.defect_types, regions=regions)
    result["thresholds"] = dict(det.thresholds)
    print(format_table(result), flush=True)
    if args.json:
        _write_json(args.json, result)
        print(f"metrics written to {args.json}")
    if args.report:
        from .report import write_report

        write_report(args.report, result, scores=scores, labels=labels, maps=maps, masks=masks, regions=regions,
                     images=test.images.permute(0, 2, 3, 1).numpy(), defect_types=test.defect_types,
                     paths=[str(p) for p in test.paths], image_threshold=det.thresholds["image"],
                     pixel_threshold=det.thresholds["pixel"], title=f"fae_fast report: {Path(args.data).name}")
        print(f"report written to {Path(args.report) / 'report.html'}")
    distributed.shutdown()
    return 0


def cmd_calibrate(args) -> int:
    """F1-optimal thresholds from a labelled validation set, written into a model file."""
    from .evaluate import format_table

    device = _check_device(args.device)
    _check_positive(args.batch_size, "--batch-size")
    out = _check_out_file(args.out, "--out")
    det = _load_detector(args, device)
    result = det.calibrate(args.data, batch_size=args.batch_size)
    print(format_table(result), flush=True)
    old, new = result["previous_thresholds"], result["thresholds"]
    print(f"thresholds (F1-optimal on {args.data}): image {old['image']:.6g} -> {new['image']:.6g}, "
          f"pixel {old['pixel']:.6g} -> {new['pixel']:.6g}")
    det.save(out)
    print(f"model with the new thresholds written to {out}")
    return 0


def _expand_inputs(inputs, on_error: str = "raise") -> tuple[list[Path], list[tuple[Path, str]]]:
    """The image files named by ``inputs`` (files, or folders listed with :func:`fae_fast.data.list_images`), and
    the files of those folders left out with ``on_error="skip"`` (with the reason)."""
    from .data import list_images

    paths: list[Path] = []
    skipped: list[tuple[Path, str]] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            lst = list_images(p, on_error)
            paths.extend(lst)
            skipped.extend(lst.skipped)
        elif p.is_file():
            paths.append(p)
        elif p.exists():
            raise CLIError(f"input {item}: not a regular file or folder (a pipe or device?)")
        else:
            raise CLIError(f"input {item}: no such file or folder")
    if not paths:
        raise CLIError("no input images")
    return paths, skipped


LOCK_NAME = ".fae_fast.lock"
RESULT_FIELDS = ("file", "score", "label", "defect_fraction", "overlay", "error")


@contextlib.contextmanager
def lock_folder(folder: Path):
    """Hold an exclusive lock on ``folder`` (``flock`` on ``folder/.fae_fast.lock``) for the ``with`` block.

    A second writer, in this process or another, is refused with :class:`CLIError` naming the holder's pid.
    The kernel drops the lock when the holder exits, even by ``kill -9``: a lock is never stale. The lock file
    is left in place (removing it would let two runs lock two different files).
    """
    folder.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        warnings.warn(f"no folder locks on this platform: {folder} is not protected against a concurrent run")
    f = open(folder / LOCK_NAME, "a+")
    try:
        if fcntl is not None:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                f.seek(0)
                holder = f.read().strip() or "another process"
                raise CLIError(f"output folder {folder} is in use by another fae-fast run ({holder}); wait for it "
                               "to finish or choose another --out") from None
        try:  # the holder's name, for the message of a refused second run
            f.seek(0)
            f.truncate()
            f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
            f.flush()
        except OSError as exc:  # a full disk: "no space left on device: PATH", not a bare errno
            raise _atomic._write_error(folder / LOCK_NAME, exc) from None
        yield folder
    finally:
        with contextlib.suppress(OSError):  # closing retries a failed flush: its error must not hide the first
            f.close()


def _inside(path: Path, folder_real: Path) -> bool:
    """True when ``path`` (its directory entry, or what it links to) lies inside ``folder_real`` (resolved)."""
    entry = path.absolute().parent.resolve() / path.name
    return any(folder_real == q or folder_real in q.parents for q in (entry, path.resolve()))


def _write_image_outputs(out: Path, stem: str, img, amap, pt, vmax, save_maps: bool):
    """``stem_overlay.png``, ``stem_mask.png`` (with a pixel threshold) and ``stem_map.npy``; returns the mask."""
    from .report import overlay

    mask = amap > pt if pt is not None else None
    _atomic.write_png(out / f"{stem}_overlay.png", overlay(img, amap, 0.0, vmax, mask=mask))
    if mask is not None:
        _atomic.write_png(out / f"{stem}_mask.png", mask.astype(np.uint8) * 255)
    if save_maps:
        buf = io.BytesIO()  # np.save on a path would append ".npy" to the temporary name
        np.save(buf, amap)
        _atomic.write_bytes(out / f"{stem}_map.npy", buf.getvalue())
    return mask


def _append_rows(log, rows: list[dict]) -> None:
    """Append ``rows`` as JSON Lines and push them to the disk: a kill -9 or a power cut keeps them."""
    for row in rows:
        log.write(json.dumps(_atomic._plain(row)) + "\n")
    log.flush()
    os.fsync(log.fileno())


def predict_to_folder(det, paths: list[Path], out: Path, *, image_threshold=None, pixel_threshold=None,
                      batch_size: int = 32, save_maps: bool = False, names: list[str] | None = None,
                      on_error: str = "raise", skipped: list[tuple[Path, str]] | None = None) -> list[dict]:
    """Score ``paths`` and write, per image, a heatmap overlay and a mask at the image's own resolution (the map
    is brought back from the model's size), plus the results; returns the rows.

    Nothing is lost or overwritten:

    * an ``out`` folder that holds any input is refused (an output could replace an input, e.g. a ground-truth
      ``part_mask.png``), and the output names (``names``, default the file stems) must be distinct;
    * ``out`` is locked for the run (:func:`lock_folder`): a concurrent run into the same folder is refused;
    * each batch's rows are appended to ``results.jsonl`` and flushed to disk as soon as they are scored, so a
      crash, a kill or a bad image keeps every row before it; ``results.csv`` and ``results.json`` (the
      summary) are written at the end, and an older run's summary is removed at the start;
    * ``on_error="skip"``: an image that cannot be read gets a row with its ``error`` (and no score) instead of
      ending the run; ``skipped`` adds rows for files left out before (e.g. non-images of a folder).

    The colour scale is fixed across images (0 to twice the pixel threshold), so overlays compare.
    """
    from .data import map_to_original, read_image

    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    _check_positive(int(batch_size), "--batch-size")
    names = [p.stem for p in paths] if names is None else list(names)
    if len(names) != len(paths):
        raise ValueError(f"{len(names)} output names for {len(paths)} inputs")
    if len(set(names)) != len(names):
        dup = sorted({s for s in names if names.count(s) > 1})
        raise CLIError(f"inputs share file stems {dup[:5]}: outputs would overwrite each other")
    out = Path(out)
    out_real = out.resolve()
    for p in [*paths, *(q for q, _ in skipped or ())]:
        if _inside(Path(p), out_real):
            raise CLIError(f"--out {out} holds the input {p}: outputs could overwrite inputs; choose another folder")
    it = det.thresholds["image"] if image_threshold is None else _check_threshold(image_threshold,
                                                                                 "--image-threshold")
    pt = det.thresholds["pixel"] if pixel_threshold is None else _check_threshold(pixel_threshold,
                                                                                 "--pixel-threshold")
    keep = det.config.train.keep_aspect
    rows = [{**dict.fromkeys(RESULT_FIELDS), "file": str(p), "error": reason} for p, reason in skipped or ()]
    vmax = None
    with lock_folder(out):
        for old in ("results.csv", "results.json"):  # an older run's summary must not sit beside new overlays
            (out / old).unlink(missing_ok=True)
        with open(out / "results.jsonl", "w", encoding="utf-8") as log:
            _append_rows(log, rows)
            for start in range(0, len(paths), batch_size):
                chunk, images, batch_rows = paths[start:start + batch_size], [], []
                for i, p in enumerate(chunk):
                    batch_rows.append({**dict.fromkeys(RESULT_FIELDS), "file": str(p)})
                    try:
                        images.append((i, read_image(p)))
                    except (ValueError, OSError) as exc:
                        if on_error == "raise":
                            raise CLIError(f"{_one_line(exc)}; the {len(rows)} rows before it are in "
                                           f"{out / 'results.jsonl'}; pass --on-error skip to go on") from exc
                        batch_rows[i]["error"] = _one_line(exc)
                if images:
                    _, maps, scores = det.anomaly_maps([img for _, img in images], batch_size=batch_size)
                    if vmax is None:
                        vmax = 2.0 * pt if pt else max(float(maps.max()), 1e-12)
                for j, (i, img) in enumerate(images):
                    amap = map_to_original(maps[j, 0].numpy(), img.shape[:2], keep)
                    mask = _write_image_outputs(out, names[start + i], img, amap, pt, vmax, save_maps)
                    score = float(scores[j])
                    batch_rows[i].update(score=score, label=None if it is None else bool(score > it),
                                         defect_fraction=None if mask is None else float(mask.mean()),
                                         overlay=f"{names[start + i]}_overlay.png")
                _append_rows(log, batch_rows)
                rows.extend(batch_rows)
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(RESULT_FIELDS))
        w.writeheader()
        w.writerows(rows)
        _atomic.write_text(out / "results.csv", buf.getvalue())
        n_err = sum(1 for r in rows if r["error"])
        _write_json(out / "results.json", {"image_threshold": it, "pixel_threshold": pt,
                                           "n_scored": len(rows) - n_err, "n_skipped": n_err, "results": rows})
    return rows


def cmd_predict(args) -> int:
    device = _check_device(args.device)
    _check_positive(args.batch_size, "--batch-size")
    _check_threshold(args.image_threshold, "--image-threshold")
    _check_threshold(args.pixel_threshold, "--pixel-threshold")
    out = _check_out_dir(args.out, "--out")
    paths, skipped = _expand_inputs(args.inputs, args.on_error)
    det = _load_detector(args, device)
    rows = predict_to_folder(det, paths, out, image_threshold=args.image_threshold,
                             pixel_threshold=args.pixel_threshold, batch_size=args.batch_size,
                             save_maps=args.save_maps, on_error=args.on_error, skipped=skipped)
    bad = [r for r in rows if r["error"]]
    n_anom = sum(1 for r in rows if r["label"])
    print(f"{len(rows) - len(bad)} images scored, {n_anom} anomalous"
          + (f", {len(bad)} skipped (listed with the reason)" if bad else "")
          + f"; overlays, masks, results.jsonl, results.csv and results.json in {args.out}")
    if bad:
        print(f"fae-fast predict: warning: {len(bad)} input(s) skipped, first: {bad[0]['file']}: {bad[0]['error']}",
              file=sys.stderr)
    return 0


def cmd_demo(args) -> int:
    from .api import Detector
    from .evaluate import format_table
    from .synthetic import make_dataset

    device = _check_device(args.device)
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
        det = Detector(cfg, device=device, threads=args.threads)
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


# ------------------------------------------------------------------------------------------ serving (issue 12)
def _check_port(value: int, flag: str, off_ok: bool = False) -> int | None:
    """A TCP port 1..65535; 0 turns the endpoint off where ``off_ok``."""
    if off_ok and value == 0:
        return None
    if not 1 <= value <= 65535:
        raise CLIError(f"{flag} {value}: a port must be 1..65535" + (" (0: off)" if off_ok else ""))
    return value


def _check_batching(args) -> None:
    _check_positive(args.max_batch, "--max-batch")
    for value, flag in ((args.max_queue_delay_us, "--max-queue-delay-us"), (args.max_queue_size, "--max-queue-size")):
        if value < 0:
            raise CLIError(f"{flag} {value}: must be >= 0")


def cmd_serve(args) -> int:
    """The engine of ``--model`` behind a Triton server (PyTriton) until Ctrl-C or SIGTERM."""
    device = _check_device(args.device)
    model = _check_in_file(args.model, "--model")
    grpc_port = _check_port(args.grpc_port, "--grpc-port", off_ok=True)
    http_port = _check_port(args.http_port, "--http-port", off_ok=True)
    metrics_port = _check_port(args.metrics_port, "--metrics-port", off_ok=True)
    if grpc_port is None and http_port is None:
        raise CLIError("--grpc-port 0 and --http-port 0: the server would have no endpoint")
    _check_batching(args)
    try:
        from .serving.server import FaeTritonServer
    except ImportError as exc:
        raise CLIError(str(exc)) from None
    from .inference import Engine

    kwargs = {"device": device, "backend": args.engine_backend, "threads": args.threads}
    if device != "cpu":  # CUDA graphs for every power of two up to --max-batch: a merged batch is padded at most 2x
        kwargs["batch_sizes"] = sorted({1, args.max_batch, *(2 ** i for i in range(12) if 2 ** i <= args.max_batch)})
    eng = Engine.from_model_file(model, **kwargs).warmup()  # compiled / captured / exported before serving
    srv = FaeTritonServer(eng, name=args.name, address=args.address, grpc_port=grpc_port, http_port=http_port,
                          metrics_port=metrics_port, max_batch=args.max_batch,
                          max_queue_delay_us=args.max_queue_delay_us, max_queue_size=args.max_queue_size)
    srv.start()
    (h, w), ends = eng.image_size, []
    for what, port in (("gRPC", grpc_port), ("HTTP", http_port), ("metrics", metrics_port)):
        if port is not None:
            ends.append(f"{what} {args.address}:{port}")
    print(f"serving {model} as model '{args.name}' ({h}x{w}x{eng.in_channels} uint8 frames; engine {eng.backend} on "
          f"{eng.device}): {', '.join(ends)}; max batch {args.max_batch}, queue delay {args.max_queue_delay_us} us, "
          f"queue size {args.max_queue_size}; Ctrl-C stops", flush=True)
    srv.serve()
    print(f"fae-fast serve: stopped ({sum(srv.batches.values())} batches, "
          f"{sum(n * c for (_, n), c in srv.batches.items())} frames served)")
    return 0


def cmd_export(args) -> int:
    """``--triton-repo DIR``: a Triton model repository (ONNX graph + config.pbtxt) of ``--model``."""
    model = _check_in_file(args.model, "--model")
    repo = _check_out_dir(args.triton_repo, "--triton-repo")
    _check_batching(args)
    from .serving.triton_repo import export_triton_repo

    folder = export_triton_repo(model, repo, name=args.name, max_batch=args.max_batch,
                                max_queue_delay_us=args.max_queue_delay_us, max_queue_size=args.max_queue_size,
                                tensorrt=args.tensorrt)
    print(f"Triton model repository written: {folder / 'config.pbtxt'} and {folder / '1' / 'model.onnx'}; serve it "
          f"with: tritonserver --model-repository {repo}")
    return 0


def _add_serving_parsers(sub, common, engine) -> None:
    """``serve`` and ``export``."""
    def batching(sp):
        sp.add_argument("--name", default="fae", help="the Triton model name clients address (default fae)")
        sp.add_argument("--max-batch", type=int, default=16,
                        help="largest batch Triton's dynamic batcher forms, in frames (default 16)")
        sp.add_argument("--max-queue-delay-us", type=int, default=500,
                        help="how long Triton may hold a request to batch it with later ones (default 500 us)")
        sp.add_argument("--max-queue-size", type=int, default=64,
                        help="requests waiting beyond this are rejected with 'Exceeds maximum queue size' "
                             "(default 64; 0: unbounded)")

    sv = sub.add_parser("serve", help="serve a model through NVIDIA Triton (PyTriton; pip install fae_fast[serve])")
    sv.add_argument("--model", required=True)
    sv.add_argument("--address", default="127.0.0.1",
                    help="interface to listen on (default 127.0.0.1: this machine only; 0.0.0.0: every interface)")
    sv.add_argument("--grpc-port", type=int, default=8001, help="gRPC port (default 8001; 0: off)")
    sv.add_argument("--http-port", type=int, default=8000, help="HTTP port (default 8000; 0: off)")
    sv.add_argument("--metrics-port", type=int, default=0, help="Triton's Prometheus metrics port (default 0: off)")
    batching(sv)
    common(sv)
    engine(sv)

    ex = sub.add_parser("export", help="a Triton model repository (ONNX graph + config.pbtxt) for a Triton server")
    ex.add_argument("--model", required=True)
    ex.add_argument("--triton-repo", required=True, metavar="DIR",
                    help="repository folder: writes DIR/<name>/config.pbtxt and DIR/<name>/1/model.onnx")
    ex.add_argument("--tensorrt", action="store_true",
                    help="GPU instances running the graph through TensorRT (ONNX Runtime's accelerator, FP16)")
    batching(ex)


# ------------------------------------------------------------------------------------------ parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fae-fast", description="Filtering Autoencoder anomaly detection, fast.")
    from ._version import __version__

    p.add_argument("--version", action="version", version=f"fae_fast {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp):
        sp.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
        sp.add_argument("--threads", type=int, help="CPU threads of torch and of the CPU scoring engine (ONNX "
                                                      "Runtime; default: each runtime's own; 1 per job when "
                                                      "several share a small machine)")

    def engine(sp):
        # the CPU scoring engines of fae_fast.api.ENGINE_BACKENDS (not imported here: the parser needs no torch)
        sp.add_argument("--engine-backend", default="auto", choices=("auto", "torch", "onnxruntime"),
                        help="how the CPU scores: auto (default: ONNX Runtime when installed, else PyTorch), torch "
                             "or onnxruntime; on CUDA the eager path scores (onnxruntime is refused there)")

    t = sub.add_parser("train", help="train a model on normal images")
    t.add_argument("--data", required=True, help="MVTec category root or a folder of normal images")
    t.add_argument("--out", required=True, help="model file to write")
    t.add_argument("--steps", type=int)
    t.add_argument("--size",
                   help="image size HxW (e.g. 256 or 208x512), or 'auto' (default): the data's aspect ratio at "
                        "the preset's pixel count (256^2 for default/fast), sides multiples of 16")
    t.add_argument("--preset", default="auto", choices=PRESETS,
                   help="auto (default): 'default' on a CUDA device, 'cpu' (the measured CPU recipe, < 20 min for "
                        "~800 images on 2 cores) otherwise")
    t.add_argument("--config", help="JSON config file (FAEConfig.to_dict layout)")
    t.add_argument("--batch-size", type=int)
    t.add_argument("--lr", type=float)
    t.add_argument("--seed", type=int)
    t.add_argument("--keep-aspect", action="store_true", help="resize keeping the aspect ratio (pads)")
    t.add_argument("--compile", action="store_true", help="torch.compile the model")
    t.add_argument("--checkpoint", help="training-state checkpoint file (written periodically, atomically)")
    t.add_argument("--resume", help="continue from a training-state checkpoint; 'auto': from --checkpoint if it "
                                    "exists (under torchrun a restarted job does this without the flag)")
    t.add_argument("--quiet", action="store_true")
    common(t)

    e = sub.add_parser("eval", help="metrics on an MVTec-layout test set")
    e.add_argument("--model", required=True)
    e.add_argument("--data", required=True)
    e.add_argument("--json", help="write the metrics as JSON")
    e.add_argument("--report", help="write a self-contained HTML report into this folder")
    e.add_argument("--batch-size", type=int, default=32)
    common(e)
    engine(e)

    c = sub.add_parser("calibrate", help="F1-optimal thresholds from a labelled validation set (MVTec layout)")
    c.add_argument("--model", required=True)
    c.add_argument("--data", required=True, help="validation set: test/good, test/<defect>, ground_truth/")
    c.add_argument("--out", required=True, help="model file to write with the new thresholds (may be --model)")
    c.add_argument("--batch-size", type=int, default=32)
    common(c)
    engine(c)

    pr = sub.add_parser("predict", help="score images; write overlays, masks, CSV and JSON")
    pr.add_argument("--model", required=True)
    pr.add_argument("inputs", nargs="+", help="image files or folders")
    pr.add_argument("--out", required=True)
    pr.add_argument("--image-threshold", type=float)
    pr.add_argument("--pixel-threshold", type=float)
    pr.add_argument("--batch-size", type=int, default=32)
    pr.add_argument("--save-maps", action="store_true", help="also write each map as .npy")
    pr.add_argument("--on-error", choices=("raise", "skip"), default="raise",
                    help="an unreadable input: stop (raise, the default; rows scored so far stay in results.jsonl) "
                         "or skip it and go on (skip: it is listed in the results with the reason)")
    common(pr)
    engine(pr)

    d = sub.add_parser("demo", help="synthetic data -> train -> eval -> overlays, on the CPU in minutes")
    d.add_argument("--out", help="keep data, model, overlays and eval JSON here")
    d.add_argument("--steps", type=int)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--quiet", action="store_true")
    common(d)

    sub.add_parser("bench", help="throughput/latency: plain PyTorch vs fae_fast (see fae-fast bench --help)",
                   add_help=False)
    _add_serving_parsers(sub, common, engine)
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        return cmd_bench(None, argv[1:])
    if argv and argv[0] == "ablate":
        from .ablate import main as ablate_main

        return int(ablate_main(argv[1:]) or 0)
    args = build_parser().parse_args(argv)
    handlers = {"train": cmd_train, "eval": cmd_eval, "calibrate": cmd_calibrate, "predict": cmd_predict,
                "demo": cmd_demo, "serve": cmd_serve, "export": cmd_export}

    def one_line_warning(message, category, filename, lineno, file=None, line=None):
        print(f"fae-fast {args.command}: warning: {message}", file=sys.stderr)

    try:
        with warnings.catch_warnings():
            warnings.showwarning = one_line_warning
            _set_threads(args)
            return handlers[args.command](args)
    except CLIError as exc:
        print(f"fae-fast {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, TypeError, OSError) as exc:
        # bad input (a file, a value) or a failed write (no space left, permission): one clear line, no
        # traceback; FAE_FAST_DEBUG=1 shows it
        if os.environ.get("FAE_FAST_DEBUG"):
            raise
        print(f"fae-fast {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
