"""The public API: :class:`Detector` (fit / predict / save / load) and its typed result :class:`Prediction`.

Example:
    >>> from fae_fast import Detector                             # doctest: +SKIP
    >>> det = Detector().fit("mvtec/bottle")      # train/good of an MVTec category, or a folder; the device's recipe
    >>> res = det.predict(images)                                 # numpy (H, W, 3) / (N, H, W, 3) or torch (B, 3, H, W)
    >>> res.pred_score, res.anomaly_map, res.pred_mask, res.pred_label
    >>> det.save("bottle.fae"); det = Detector.load("bottle.fae")
"""
from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._version import __version__
from .config import FAEConfig, frame_scale_of, frame_size, preset, smoothing_for_size
from .scoring import check_threshold, stored_map_statistics

__all__ = ["Detector", "Prediction", "to_uint8_batch"]

# the scoring engines a Detector can use on the CPU (fae_fast.inference.engine.BACKENDS, not imported here:
# ``import fae_fast`` stays free of the inference package)
ENGINE_BACKENDS = ("auto", "torch", "onnxruntime")


@dataclass
class Prediction:
    """Per-image results, in the field's usual names.

    Attributes:
        pred_score: (N,) float32 image anomaly scores (max of the smoothed error map; higher = more anomalous).
        anomaly_map: (N, H, W) float32 smoothed error maps at the frames' resolution (the model's, or
            ``map.frame_scale`` times it).
        pred_mask: (N, H, W) bool, ``anomaly_map > pixel_threshold`` (None when there is no pixel threshold).
        pred_label: (N,) bool, ``pred_score > image_threshold`` (None when there is no image threshold).
            A NaN score or map pixel (a model that broke on that image) counts as above the threshold: anomalous,
            never "good" (see :func:`above`).
        image_threshold, pixel_threshold: the thresholds used.
    Arrays are numpy when the input was numpy or paths, torch (CPU) when it was torch.
    """

    pred_score: Any
    anomaly_map: Any
    pred_mask: Any
    pred_label: Any
    image_threshold: float | None
    pixel_threshold: float | None

    def __len__(self) -> int:
        return len(self.pred_score)


def above(values: torch.Tensor, threshold: float) -> torch.Tensor:
    """``values > threshold`` for scores and maps, where NaN counts as above.

    Written ``~(values <= threshold)``: NaN compares False both ways, so a NaN score or map pixel (an input or a
    model gone wrong) is anomalous, never "good"; +inf is above any (finite) threshold. Scores and maps are
    squared errors, never -inf, so for every other value this is exactly ``values > threshold``.
    """
    return ~(values <= threshold)


# float images may overshoot [0, 1] by this much (interpolation rounding); they are clamped when converted
_FLOAT_SLACK = 1e-3


def value_problem(lo: float, hi: float) -> str | None:
    """Why a float image whose values span ``[lo, hi]`` cannot be scored, or None when it can (finite, in [0, 1])."""
    if math.isnan(lo) or math.isnan(hi):
        return "has NaN pixels; float images must be finite and in [0, 1]"
    if math.isinf(lo) or math.isinf(hi):
        return "has Inf pixels; float images must be finite and in [0, 1]"
    if lo < -_FLOAT_SLACK or hi > 1 + _FLOAT_SLACK:
        return (f"has values outside [0, 1] (range [{lo:.3g}, {hi:.3g}]); float images must be in [0, 1] "
                f"(8-bit values divided by 255)")
    return None


def check_float_images(t: torch.Tensor, noun: str = "image", first: int = 0) -> None:
    """Raise ValueError naming the first image of a float (B, ...) batch that has NaN/Inf pixels or values outside
    [0, 1] (integer batches always pass). ``first`` is the index of ``t[0]`` in the caller's numbering.

    On a CUDA tensor this costs one host sync (the verdict); uint8 input, the camera path, is never checked.
    """
    if not t.dtype.is_floating_point or t.numel() == 0:
        return
    dims = tuple(range(1, t.dim()))
    lo, hi = t.amin(dim=dims).float(), t.amax(dim=dims).float()  # NaN propagates through both
    ok = (lo >= -_FLOAT_SLACK) & (hi <= 1 + _FLOAT_SLACK)  # False for NaN and +-inf
    if bool(ok.all()):
        return
    i = int((~ok).nonzero()[0, 0])
    raise ValueError(f"{noun} {first + i} {value_problem(float(lo[i]), float(hi[i]))}")


def _resize_batch(x: torch.Tensor, size: tuple[int, int], keep_aspect: bool) -> torch.Tensor:
    """Resize a uint8 (B, 3, h, w) batch to ``size`` with the same rule as the file reader."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    from .data import resize_image

    out = [torch.from_numpy(resize_image(img.permute(1, 2, 0).numpy(), size, keep_aspect)).permute(2, 0, 1)
           for img in x.cpu()]
    return torch.stack(out)


def _hwc_to_rgb(arr: np.ndarray, what: str) -> np.ndarray:
    """(H, W), (H, W, 1|3|4) -> (H, W, 3); ValueError naming the shape for anything else or an empty image."""
    shape = arr.shape
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        raise ValueError(f"{what}: expected (H, W), (H, W, 1|3|4) pixels, got shape {shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{what}: empty image of shape {shape} (H and W must be at least 1)")
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    return arr[:, :, :3]


def _to_uint8(t: torch.Tensor, first: int = 0) -> torch.Tensor:
    """uint8 of a (B, C, H, W) batch; ``first`` is the index of ``t[0]`` in the caller's images (for errors)."""
    if t.dtype == torch.uint8:
        return t
    if getattr(torch, "uint16", None) is not None and t.dtype == torch.uint16:
        return ((t.to(torch.int32) + 128) // 257).to(torch.uint8)  # rounded, like the file reader
    if t.dtype.is_floating_point:
        # NaN/Inf must be refused here: clamp + round would turn NaN into a black pixel, a "good" part
        check_float_images(t, "image", first)
        return (t.float().clamp(0, 1) * 255).round().to(torch.uint8)
    raise TypeError(f"images: unsupported dtype {t.dtype} (use uint8, uint16 or float in [0, 1])")


def to_uint8_batch(images, size: tuple[int, int], keep_aspect: bool = False) -> tuple[torch.Tensor, str]:
    """Turn any supported image input into a uint8 (B, 3, H, W) batch at ``size``.

    Accepts: a path or a list of paths; numpy (H, W), (H, W, C) or (N, H, W, C) (channels last, C in 1, 3, 4);
    torch (C, H, W) or (B, C, H, W) (channels first); uint8, uint16 or float in [0, 1]. Also a list of numpy
    images of different sizes. Returns the batch and the kind of input ("numpy", "torch" or "paths").

    Raises:
        ValueError: a float image has NaN/Inf pixels or values outside [0, 1] (the message names its index).
    """
    return _to_uint8_batch(images, size, keep_aspect, 0)


def _to_uint8_batch(images, size, keep_aspect, first: int) -> tuple[torch.Tensor, str]:
    """:func:`to_uint8_batch`, numbering the images from ``first`` in its errors."""
    from .data import load_images

    if isinstance(images, (str, os.PathLike)):
        images = [images]
    if isinstance(images, (list, tuple)) and images and all(isinstance(p, (str, os.PathLike)) for p in images):
        return load_images([Path(p) for p in images], size, keep_aspect=keep_aspect), "paths"
    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError(f"no images given (an empty {type(images).__name__})")
        batches = []
        for im in images:
            batches.append(_to_uint8_batch(im, size, keep_aspect, first + sum(len(b) for b in batches))[0])
        return torch.cat(batches), "numpy" if isinstance(images[0], np.ndarray) else "torch"
    if isinstance(images, np.ndarray):
        arr = images
        if arr.dtype == np.uint16:
            arr = ((arr.astype(np.uint32) + 128) // 257).astype(np.uint8)  # rounded, like the file reader
        if arr.ndim == 4:
            if 0 in arr.shape[:3]:
                raise ValueError(f"numpy images: empty batch of shape {arr.shape} (N, H and W must be at least 1)")
            arr = np.stack([_hwc_to_rgb(a, f"image {first + i}") for i, a in enumerate(arr)])
        elif arr.ndim in (2, 3):
            arr = _hwc_to_rgb(arr, f"image {first}")[None]
        else:
            raise ValueError(f"numpy images must be (H, W), (H, W, C) or (N, H, W, C), got shape {arr.shape}")
        t = _to_uint8(torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2), first)
        return _resize_batch(t, size, keep_aspect), "numpy"
    if isinstance(images, torch.Tensor):
        t = images.detach()
        if t.dim() == 3:
            t = t[None]
        if t.dim() != 4 or t.shape[1] not in (1, 3, 4):
            raise ValueError(f"torch images must be (C, H, W) or (B, C, H, W) with C in 1, 3, 4, "
                             f"got shape {tuple(images.shape)}")
        if 0 in (t.shape[0], t.shape[2], t.shape[3]):
            raise ValueError(f"torch images: empty batch of shape {tuple(images.shape)} (B, H and W must be at "
                             f"least 1)")
        t = t[:, :3] if t.shape[1] != 1 else t.expand(-1, 3, -1, -1)
        t = _to_uint8(t.cpu(), first)
        return _resize_batch(t.contiguous(), size, keep_aspect), "torch"
    raise TypeError(f"unsupported image input of type {type(images).__name__}")


def resolve_auto_size(data, pixels: int) -> tuple[int, int]:
    """The "auto" image size of ``data`` (a list of paths, a folder, or an image batch): the median aspect ratio
    of *all* the images at about ``pixels`` pixels, sides multiples of 16 within ``[16, 8192]``
    (:func:`fae_fast.config.auto_size`). File sizes come from the headers, nothing is decoded.

    A warning names the images whose ratio is more than twice off the median (they are stretched to the
    common size), and says so when the median ratio is too extreme to keep within the side bounds.
    """
    import warnings

    from .config import auto_size
    from .data import image_size_of, normal_image_paths

    if isinstance(data, (str, os.PathLike)):
        data = normal_image_paths(Path(data))
    if isinstance(data, (list, tuple, np.ndarray, torch.Tensor)) and len(data) == 0:
        raise ValueError("no training images (an empty set)")
    if isinstance(data, (list, tuple)) and isinstance(data[0], (str, os.PathLike)):
        sizes = [image_size_of(p) for p in data]
    elif isinstance(data, np.ndarray):
        sizes = [data.shape[-3:-1] if data.ndim >= 3 and data.shape[-1] in (1, 3, 4) else data.shape[-2:]]
    elif isinstance(data, torch.Tensor):
        sizes = [data.shape[-2:]]
    else:
        raise TypeError(f"cannot infer an image size from {type(data).__name__}; pass image_size=(H, W)")
    if min(min(hw) for hw in sizes) < 1:
        raise ValueError(f"cannot infer an image size from images of size {min(sizes, key=min)} (H, W)")
    ratios = np.array([w / h for h, w in sizes], dtype=np.float64)
    order = np.argsort(ratios, kind="stable")
    h, w = (int(v) for v in sizes[order[(len(order) - 1) // 2]])  # the image of median ratio
    size = auto_size(h, w, pixels)
    off = np.flatnonzero(np.abs(np.log(ratios / (w / h))) > np.log(2.0))
    if off.size:
        first = data[off[0]] if isinstance(data, (list, tuple)) else "image 0"
        fh, fw = sizes[off[0]]
        warnings.warn(f"{off.size} of {len(sizes)} training images have an aspect ratio over 2x off the median "
                      f"{w}x{h} (WxH), first: {first} ({fw}x{fh}); they are stretched to the auto size "
                      f"{size[0]}x{size[1]} (HxW)", UserWarning, stacklevel=2)
    if abs(np.log((size[1] / size[0]) / (w / h))) > np.log(1.5):
        warnings.warn(f"the median aspect ratio {w}x{h} (WxH) is too extreme for --size auto (sides within "
                      f"[16, 8192]): using {size[0]}x{size[1]} (HxW); pass an explicit size", UserWarning,
                      stacklevel=2)
    return size


def _engine_maps(engine, batch: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Maps (N, 1, H, W) and scores (N,) float32 of a uint8 CPU batch (N, C, H, W), ``batch_size`` images per
    engine call (the batches of :func:`fae_fast.scoring.compute_maps`)."""
    N = batch.shape[0]
    maps = torch.empty((N, 1, *batch.shape[2:]), dtype=torch.float32)
    scores = torch.empty((N,), dtype=torch.float32)
    for s in range(0, N, batch_size):
        m, sc = engine.run(batch[s:s + batch_size])
        maps[s:s + batch_size].copy_(m)
        scores[s:s + batch_size].copy_(sc)
    return maps, scores


def _resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class Detector:
    """Filtering Autoencoder anomaly detector.

    Args:
        config: a :class:`~fae_fast.config.FAEConfig`; None: ``preset("auto")``, the recipe for the device (the
            full one of DESIGN.md on CUDA, the measured ``cpu`` preset elsewhere).
        device: "auto" (CUDA if available), "cpu", "cuda", "cuda:1", ...
        engine_backend: how the CPU scores: "auto" (ONNX Runtime when installed and the model exports, else
            PyTorch), "torch" or "onnxruntime"; see :class:`~fae_fast.inference.Engine`. On CUDA the detector
            scores with :func:`~fae_fast.scoring.compute_maps` ("onnxruntime" is refused there).
        threads: CPU threads of the scoring engine (ONNX Runtime's intra-op threads, or
            ``torch.set_num_threads`` for the PyTorch engine); None: the runtime's default. Ignored on CUDA.

    On the CPU, :meth:`predict`, :meth:`anomaly_maps`, :meth:`evaluate` and :meth:`calibrate` score through one
    cached :class:`~fae_fast.inference.Engine` (fp32, BatchNorm folded, the map normalisation of
    ``config.map.normalize`` inside the graph): it is built on first use and rebuilt only when what it depends on
    changes (a new or in-place modified model, new map statistics, image size, smoothing, normalisation,
    ``engine_backend`` or ``threads``); thresholds stay the detector's and never rebuild it. Its maps and scores
    equal those of the eager path within the engine's fp32 bound (``rtol=1e-4, atol=1e-7``). With
    ``config.train.amp`` bf16/fp16 the CPU keeps the eager autocast path.

    The image threshold defaults to a quantile of held-out normal scores (``train.threshold_quantile``); both
    thresholds can be set with :meth:`set_thresholds` or overridden per call of :meth:`predict`. Thresholds must
    be finite numbers (NaN would make every part "good"); float images must be finite and in [0, 1]: a NaN/Inf
    or unscaled (0..255) float image raises ValueError naming it, in :meth:`fit` and :meth:`predict` alike.
    """

    def __init__(self, config: FAEConfig | None = None, *, device: str | torch.device = "auto",
                 engine_backend: str = "auto", threads: int | None = None):
        self.device = _resolve_device(device)
        # no config: the recipe for this device, as `fae-fast train` picks it (the full one on CUDA, "cpu" else)
        self.config = copy.deepcopy(config) if config is not None else preset("auto", str(self.device))
        if engine_backend not in ENGINE_BACKENDS:
            raise ValueError(f"engine_backend must be one of {ENGINE_BACKENDS}, got {engine_backend!r}")
        if engine_backend == "onnxruntime" and self.device.type != "cpu":
            raise ValueError(f"engine_backend='onnxruntime' scores on the CPU, this Detector is on {self.device} "
                             f"(use device='cpu')")
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise ValueError(f"threads must be a positive int or None, got {threads!r}")
        self.engine_backend = engine_backend
        self.threads = threads
        self._engine = None  # (signature, objects it was built from, Engine): see _cpu_engine
        self.model: torch.nn.Module | None = None
        self.thresholds: dict[str, float | None] = {"image": None, "pixel": None}
        self.history: list[dict] = []
        # per-pixel statistics of held-out normal maps (config.map.normalize != "none"), set by fit / load
        self.map_stats: dict[str, torch.Tensor] | None = None

    # ---------------------------------------------------------------- properties
    @property
    def image_size(self) -> tuple[int, int]:
        if self.config.train.image_size == "auto":
            raise RuntimeError("the image size is 'auto' until fit() has seen the data")
        return tuple(self.config.train.image_size)

    @property
    def input_size(self) -> tuple[int, int]:
        """(H, W) the frames are read at: :attr:`image_size` (the network's) times ``map.frame_scale``; the maps,
        masks and map statistics are at this size."""
        return frame_size(self.config.map, self.image_size)

    @property
    def smoothing(self) -> tuple[int, int]:
        """(n, k) of the box filter at this detector's image size."""
        return smoothing_for_size(self.config.map, *self.image_size)

    def _require_model(self):
        if self.model is None:
            raise RuntimeError("this Detector has no trained model: call fit() or Detector.load() first")
        return self.model

    # ---------------------------------------------------------------- training
    def fit(self, data, *, steps: int | None = None, image_size: tuple[int, int] | None = None,
            checkpoint: str | os.PathLike | None = None, resume: str | os.PathLike | None = None,
            progress: bool = True) -> "Detector":
        """Train on normal images.

        Args:
            data: an MVTec category root (its ``train/good`` is used), a folder of normal images, a list of image
                paths, or images (numpy (N, H, W, C) / torch (N, C, H, W)).
            steps: training steps (default ``config.train.steps``).
            image_size: (H, W) the model works at, or "auto": the median aspect ratio of all the training images
                at about ``config.train.auto_pixels`` pixels (see :func:`resolve_auto_size`; default
                ``config.train.image_size``).
            checkpoint: where periodic training-state checkpoints go (atomic); None keeps none.
            resume: a training-state checkpoint to continue from.
            progress: show a progress bar.

        Returns:
            self, trained, with thresholds from the held-out normal images.

        Raises:
            ValueError: no training images (an empty list, folder or batch), an invalid config value, or an image
                that cannot be used (named).
        """
        from . import train as train_mod
        from .data import load_images, normal_image_paths

        if steps is not None:
            self.config.train.steps = int(steps)
        if image_size is not None:
            self.config.train.image_size = image_size if image_size == "auto" else tuple(int(v) for v in image_size)
        self.config.validate()  # every value checked before any image is read
        if isinstance(data, (list, tuple, np.ndarray, torch.Tensor)) and len(data) == 0:
            shape = f" of shape {tuple(data.shape)}" if hasattr(data, "shape") else ""
            raise ValueError(f"fit: no training images (got an empty {type(data).__name__}{shape})")
        paths = normal_image_paths(Path(data)) if isinstance(data, (str, os.PathLike)) else None
        if self.config.train.image_size == "auto":
            self.config.train.image_size = resolve_auto_size(paths if paths is not None else data,
                                                             self.config.train.auto_pixels)
        size = self.input_size  # frames: the network's size, or finer where the template reads them finer
        if paths is not None:
            from . import distributed
            from .scoring import resolve_device

            # under torchrun each rank decodes its shard of the files (DALI's shard rule) and they are gathered
            dist, dev = distributed.setup(resolve_device(self.device))
            images = distributed.sharded_load(
                paths, lambda ps: load_images(ps, size, keep_aspect=self.config.train.keep_aspect), dist, dev)
        else:
            images, _ = to_uint8_batch(data, size, self.config.train.keep_aspect)
        result = train_mod.train(self.config, images, checkpoint=checkpoint, resume=resume,
                                 device=self.device, progress=progress)
        try:
            thresholds = {k: check_threshold(result.thresholds[k], f"{k} threshold") for k in ("image", "pixel")}
        except ValueError as exc:
            raise ValueError(f"training gave a non-finite threshold ({exc}): the model diverged "
                             f"(NaN/Inf loss); try a lower learning rate") from None
        self.model = result.model
        self.thresholds = thresholds
        self.history = list(result.history)
        self.map_stats = result.map_stats
        self._engine = None  # built for the old model: free it now (the next predict builds one)
        return self

    def set_thresholds(self, image: float | None = None, pixel: float | None = None) -> "Detector":
        """Replace the stored image and/or pixel threshold (kept by :meth:`save`); None leaves one unchanged.

        Raises:
            TypeError / ValueError: not a number, or not finite (nothing is changed).
        """
        image = check_threshold(image, "image threshold")
        pixel = check_threshold(pixel, "pixel threshold")
        if image is not None:
            self.thresholds["image"] = image
        if pixel is not None:
            self.thresholds["pixel"] = pixel
        return self

    def _thresholds_for(self, image_threshold, pixel_threshold) -> tuple[float | None, float | None]:
        """The thresholds of one call (overrides or the stored ones), checked finite."""
        if image_threshold is None:
            it = check_threshold(self.thresholds.get("image"), "stored image threshold")
        else:
            it = check_threshold(image_threshold, "image_threshold")
        if pixel_threshold is None:
            pt = check_threshold(self.thresholds.get("pixel"), "stored pixel threshold")
        else:
            pt = check_threshold(pixel_threshold, "pixel_threshold")
        return it, pt

    # ---------------------------------------------------------------- inference
    def anomaly_maps(self, images, *, batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """uint8 batch (N, 3, H, W), maps (N, 1, H, W) float32 and scores (N,) float32, all on the CPU."""
        return self._score(images, batch_size)[:3]

    def _score(self, images, batch_size):
        from .scoring import compute_maps

        model = self._require_model()
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        batch, kind = to_uint8_batch(images, self.input_size, self.config.train.keep_aspect)
        engine = self._cpu_engine()
        if engine is None:
            n, k = self.smoothing
            maps, scores = compute_maps(model, batch, n=n, k=k, error=self.config.map.error,
                                        batch_size=batch_size, device=self.device,
                                        amp=self.config.train.amp, normalize=self.config.map.normalize,
                                        stats=self.map_stats, image_score=self.config.map.image_score,
                                        template_n=self.config.map.template_n,
                                        template_weight=self.config.map.template_weight,
                                        frame_scale=frame_scale_of(self.config.map))
        else:
            maps, scores = _engine_maps(engine, batch, batch_size)
        return batch, maps, scores, kind

    def _cpu_engine(self):
        """The cached :class:`~fae_fast.inference.Engine` that scores on the CPU, (re)built when what it depends
        on changed; None where the eager path scores (CUDA, or bf16/fp16 autocast on the CPU)."""
        from .scoring import autocast_dtype, check_map_statistics

        if self.device.type != "cpu":
            return None
        if autocast_dtype(self.config.train.amp, self.device) is not None:
            if self.engine_backend == "onnxruntime":
                raise ValueError(f"engine_backend='onnxruntime' scores in fp32, config.train.amp is "
                                 f"{self.config.train.amp!r} (set it to 'auto' or 'fp32')")
            return None
        model = self._require_model()
        mode, image_score = self.config.map.normalize, self.config.map.image_score
        stats = self.map_stats if mode != "none" else None
        if mode != "none":
            check_map_statistics(stats, self.input_size, mode, image_score=image_score)
        stat_tensors = tuple(stats.values()) if stats else ()
        objects = (model, stats, *stat_tensors)
        tensors = [*model.parameters(), *model.buffers(), *stat_tensors]
        try:  # in-place changes (load_state_dict, an optimizer step) bump a tensor's version counter
            versions = tuple(t._version for t in tensors)
        except RuntimeError:  # inference-mode tensors have no version counter: always rebuild (exports are cached)
            versions = None
        n, k = self.smoothing
        signature = (tuple(map(id, objects)), tuple(map(id, tensors)), versions, self.input_size, n, k,
                     self.config.map.error, mode, image_score, self.config.map.template_n,
                     self.config.map.template_weight,
                     self.config.model.in_channels, self.engine_backend, self.threads)
        cached = self._engine
        # the cache holds the objects themselves, so their ids cannot be reused by others while it lives
        if cached is not None and versions is not None and cached[0] == signature:
            return cached[2]
        from .inference import Engine

        engine = Engine(model, image_size=self.input_size, n=n, k=k, error=self.config.map.error, dtype="fp32",
                        device="cpu",
                        backend=self.engine_backend, threads=self.threads, normalize=mode, map_stats=stats,
                        image_score=image_score, template_n=self.config.map.template_n,
                        template_weight=self.config.map.template_weight,
                        frame_scale=frame_scale_of(self.config.map),
                        in_channels=self.config.model.in_channels)
        self._engine = (signature, (objects, tensors), engine)
        return engine

    def predict(self, images, *, image_threshold: float | None = None, pixel_threshold: float | None = None,
                batch_size: int = 32) -> Prediction:
        """Score images.

        Args:
            images: see :func:`to_uint8_batch` (single image or batch, numpy, torch or paths).
            image_threshold, pixel_threshold: override the stored thresholds for this call only.
            batch_size: images per forward pass.

        Returns:
            :class:`Prediction` (numpy arrays for numpy/path input, CPU tensors for torch input). A NaN score or
            map pixel (a model that broke on that image) is labelled anomalous.

        Raises:
            ValueError: a float image has NaN/Inf pixels or values outside [0, 1] (names the image), or a
                threshold is not finite.
        """
        it, pt = self._thresholds_for(image_threshold, pixel_threshold)
        _, maps, scores, kind = self._score(images, batch_size)
        amap = maps[:, 0]
        mask = above(amap, pt) if pt is not None else None
        label = above(scores, it) if it is not None else None
        if kind != "torch":
            amap, scores = amap.numpy(), scores.numpy()
            mask = mask.numpy() if mask is not None else None
            label = label.numpy() if label is not None else None
        return Prediction(pred_score=scores, anomaly_map=amap, pred_mask=mask, pred_label=label,
                          image_threshold=it, pixel_threshold=pt)

    __call__ = predict

    def evaluate(self, root: str | os.PathLike, *, batch_size: int = 32, report: str | os.PathLike | None = None):
        """Metrics on an MVTec-layout test set (``test/<type>``, ``ground_truth``).

        Returns:
            The dict of :func:`fae_fast.evaluate.evaluate` (``overall`` and ``per_defect``), with
            ``thresholds`` added. With ``report`` a self-contained HTML report is written into that folder.
        """
        from .data import load_test_set
        from .evaluate import evaluate

        test = load_test_set(Path(root), self.input_size, keep_aspect=self.config.train.keep_aspect)
        _, maps, scores = self.anomaly_maps(test.images, batch_size=batch_size)
        result = evaluate(scores.numpy(), maps[:, 0].numpy(), test.labels.numpy(), test.masks[:, 0].numpy(),
                          test.defect_types, regions=test.regions[:, 0].numpy())
        result["thresholds"] = dict(self.thresholds)
        if report is not None:
            from .report import write_report

            write_report(report, result, scores=scores.numpy(), labels=test.labels.numpy(),
                         maps=maps[:, 0].numpy(), masks=test.masks[:, 0].numpy(),
                         regions=test.regions[:, 0].numpy(),
                         images=test.images.permute(0, 2, 3, 1).numpy(), defect_types=test.defect_types,
                         paths=[str(p) for p in test.paths], image_threshold=self.thresholds["image"],
                         pixel_threshold=self.thresholds["pixel"], title=f"fae_fast report: {Path(root).name}")
        return result

    def calibrate(self, root: str | os.PathLike, *, batch_size: int = 32) -> dict:
        """Set the F1-optimal image and pixel thresholds from a labelled validation set (DESIGN.md 1.6).

        The held-out quantile thresholds of :meth:`fit` need no labels; where labelled defects exist, the thresholds
        that maximise F1 on them (image level: defective vs good images; pixel level: every pixel) serve the line
        better. Use a validation split, not the test set the model is judged on.

        Args:
            root: MVTec-layout folder with ``test/good``, ``test/<defect>`` and ``ground_truth`` (at least one good
                and one defective image).

        Returns:
            The metrics of :meth:`evaluate` before the change, with ``thresholds`` the new ones and
            ``previous_thresholds`` the old ones. The model keeps the new thresholds (``save`` stores them).
        """
        result = self.evaluate(root, batch_size=batch_size)
        overall = result["overall"]
        new = {"image": overall["image_f1_threshold"], "pixel": overall["pixel_f1_threshold"]}
        try:
            new = {k: check_threshold(v, f"F1-optimal {k} threshold") for k, v in new.items()}
        except ValueError as exc:
            raise ValueError(f"{root}: cannot calibrate ({exc}); it needs good and defective images with masks") \
                from None
        result["previous_thresholds"] = dict(self.thresholds)
        self.thresholds = new
        result["thresholds"] = dict(new)
        return result

    # ---------------------------------------------------------------- persistence
    def save(self, path: str | os.PathLike) -> Path:
        """Write weights, config, image size, thresholds and the version to ``path`` (atomically)."""
        from .checkpoint import save_model_file

        model = self._require_model()
        for k in ("image", "pixel"):  # a file whose thresholds its own loader refuses must never be written
            check_threshold(self.thresholds.get(k), f"{k} threshold")
        meta = {"history_tail": self.history[-5:]}
        if self.config.map.normalize != "none":
            from .scoring import check_map_statistics

            check_map_statistics(self.map_stats, self.input_size, self.config.map.normalize,
                                 image_score=self.config.map.image_score)
            meta["map_stats"] = {k: v.detach().cpu() for k, v in self.map_stats.items()}
        save_model_file(path, model_state=model.state_dict(), config=self.config, image_size=self.image_size,
                        thresholds=dict(self.thresholds), meta=meta)
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike, *, device: str | torch.device = "auto", engine_backend: str = "auto",
             threads: int | None = None) -> "Detector":
        """Load a file written by :meth:`save`; a file from another format version, or with non-finite stored
        thresholds, raises ValueError naming the file. ``engine_backend`` and ``threads``: as in :class:`Detector`
        (how the CPU scores)."""
        from .checkpoint import load_model_file
        from .models import build_model

        mf = load_model_file(path, map_location="cpu")
        thresholds = {k: check_threshold(mf.thresholds.get(k), f"{path}: stored {k} threshold")
                      for k in ("image", "pixel")}
        det = cls(mf.config, device=device, engine_backend=engine_backend, threads=threads)
        det.config.train.image_size = tuple(mf.image_size)
        model = build_model(det.config.model)
        try:
            model.load_state_dict(mf.state)
        except RuntimeError as exc:
            raise ValueError(f"{path}: weights do not match the stored model config: {exc}") from exc
        det.model = model.to(det.device).eval()
        det.thresholds = thresholds
        det.map_stats = stored_map_statistics(mf, path)
        return det

    def __getstate__(self) -> dict:
        """Pickle / deepcopy without the cached engine (ONNX Runtime sessions cannot be copied; it is rebuilt)."""
        state = self.__dict__.copy()
        state["_engine"] = None
        return state

    def __repr__(self) -> str:
        m = self.config.model
        return (f"Detector(widths={tuple(m.widths)}, image_size={self.config.train.image_size}, device={self.device}, "
                f"engine_backend={self.engine_backend!r}, threads={self.threads}, trained={self.model is not None}, "
                f"thresholds={self.thresholds}, version={__version__})")
