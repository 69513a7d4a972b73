"""The public API: :class:`Detector` (fit / predict / save / load) and its typed result :class:`Prediction`.

Example:
    >>> from fae_fast import Detector                             # doctest: +SKIP
    >>> det = Detector().fit("mvtec/bottle", steps=2000)          # train/good of an MVTec category, or a folder
    >>> res = det.predict(images)                                 # numpy (H, W, 3) / (N, H, W, 3) or torch (B, 3, H, W)
    >>> res.pred_score, res.anomaly_map, res.pred_mask, res.pred_label
    >>> det.save("bottle.fae"); det = Detector.load("bottle.fae")
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._version import __version__
from .config import FAEConfig, smoothing_for_size

__all__ = ["Detector", "Prediction", "to_uint8_batch"]


@dataclass
class Prediction:
    """Per-image results, in the field's usual names.

    Attributes:
        pred_score: (N,) float32 image anomaly scores (max of the smoothed error map; higher = more anomalous).
        anomaly_map: (N, H, W) float32 smoothed error maps at the model's resolution.
        pred_mask: (N, H, W) bool, ``anomaly_map > pixel_threshold`` (None when there is no pixel threshold).
        pred_label: (N,) bool, ``pred_score > image_threshold`` (None when there is no image threshold).
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


def _resize_batch(x: torch.Tensor, size: tuple[int, int], keep_aspect: bool) -> torch.Tensor:
    """Resize a uint8 (B, 3, h, w) batch to ``size`` with the same rule as the file reader."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    from .data import resize_image

    out = [torch.from_numpy(resize_image(img.permute(1, 2, 0).numpy(), size, keep_aspect)).permute(2, 0, 1)
           for img in x.cpu()]
    return torch.stack(out)


def _hwc_to_rgb(arr: np.ndarray, what: str) -> np.ndarray:
    """(H, W), (H, W, 1|3|4) -> (H, W, 3)."""
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        raise ValueError(f"{what}: expected (H, W), (H, W, 1|3|4) pixels, got shape {arr.shape}")
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    return arr[:, :, :3]


def _to_uint8(t: torch.Tensor, what: str) -> torch.Tensor:
    if t.dtype == torch.uint8:
        return t
    if getattr(torch, "uint16", None) is not None and t.dtype == torch.uint16:
        return ((t.to(torch.int32) + 128) // 257).to(torch.uint8)  # rounded, like the file reader
    if t.dtype.is_floating_point:
        if t.numel() and (float(t.min()) < -1e-3 or float(t.max()) > 1 + 1e-3):
            raise ValueError(f"{what}: float images must be in [0, 1], got range "
                             f"[{float(t.min()):.3g}, {float(t.max()):.3g}]")
        return (t.float().clamp(0, 1) * 255).round().to(torch.uint8)
    raise TypeError(f"{what}: unsupported dtype {t.dtype} (use uint8, uint16 or float in [0, 1])")


def to_uint8_batch(images, size: tuple[int, int], keep_aspect: bool = False) -> tuple[torch.Tensor, str]:
    """Turn any supported image input into a uint8 (B, 3, H, W) batch at ``size``.

    Accepts: a path or a list of paths; numpy (H, W), (H, W, C) or (N, H, W, C) (channels last, C in 1, 3, 4);
    torch (C, H, W) or (B, C, H, W) (channels first); uint8, uint16 or float in [0, 1]. Also a list of numpy
    images of different sizes. Returns the batch and the kind of input ("numpy", "torch" or "paths").
    """
    from .data import load_images

    if isinstance(images, (str, os.PathLike)):
        images = [images]
    if isinstance(images, (list, tuple)) and images and all(isinstance(p, (str, os.PathLike)) for p in images):
        return load_images([Path(p) for p in images], size, keep_aspect=keep_aspect), "paths"
    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError("no images given")
        batches = [to_uint8_batch(im, size, keep_aspect)[0] for im in images]
        return torch.cat(batches), "numpy" if isinstance(images[0], np.ndarray) else "torch"
    if isinstance(images, np.ndarray):
        arr = images
        if arr.dtype == np.uint16:
            arr = ((arr.astype(np.uint32) + 128) // 257).astype(np.uint8)  # rounded, like the file reader
        if arr.ndim == 4:
            arr = np.stack([_hwc_to_rgb(a, f"image {i}") for i, a in enumerate(arr)])
        elif arr.ndim in (2, 3):
            arr = _hwc_to_rgb(arr, "image")[None]
        else:
            raise ValueError(f"numpy images must be (H, W), (H, W, C) or (N, H, W, C), got shape {arr.shape}")
        t = _to_uint8(torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2), "images")
        return _resize_batch(t, size, keep_aspect), "numpy"
    if isinstance(images, torch.Tensor):
        t = images.detach()
        if t.dim() == 3:
            t = t[None]
        if t.dim() != 4 or t.shape[1] not in (1, 3, 4):
            raise ValueError(f"torch images must be (C, H, W) or (B, C, H, W) with C in 1, 3, 4, "
                             f"got shape {tuple(images.shape)}")
        t = t[:, :3] if t.shape[1] != 1 else t.expand(-1, 3, -1, -1)
        t = _to_uint8(t.cpu(), "images")
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


def _resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class Detector:
    """Filtering Autoencoder anomaly detector.

    Args:
        config: a :class:`~fae_fast.config.FAEConfig` (defaults of DESIGN.md when None).
        device: "auto" (CUDA if available), "cpu", "cuda", "cuda:1", ...

    The image threshold defaults to a quantile of held-out normal scores (``train.threshold_quantile``); both
    thresholds can be set with :meth:`set_thresholds` or overridden per call of :meth:`predict`.
    """

    def __init__(self, config: FAEConfig | None = None, *, device: str | torch.device = "auto"):
        self.config = copy.deepcopy(config) if config is not None else FAEConfig()
        self.device = _resolve_device(device)
        self.model: torch.nn.Module | None = None
        self.thresholds: dict[str, float | None] = {"image": None, "pixel": None}
        self.history: list[dict] = []

    # ---------------------------------------------------------------- properties
    @property
    def image_size(self) -> tuple[int, int]:
        if self.config.train.image_size == "auto":
            raise RuntimeError("the image size is 'auto' until fit() has seen the data")
        return tuple(self.config.train.image_size)

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
            image_size: (H, W) the model works at, or "auto": the aspect ratio of the first training image at
                about ``config.train.auto_pixels`` pixels (default ``config.train.image_size``).
            checkpoint: where periodic training-state checkpoints go (atomic); None keeps none.
            resume: a training-state checkpoint to continue from.
            progress: show a progress bar.

        Returns:
            self, trained, with thresholds from the held-out normal images.
        """
        from . import train as train_mod
        from .data import load_images, normal_image_paths

        if steps is not None:
            self.config.train.steps = int(steps)
        if image_size is not None:
            self.config.train.image_size = image_size if image_size == "auto" else tuple(int(v) for v in image_size)
        self.config.validate()  # every value checked before any image is read
        paths = normal_image_paths(Path(data)) if isinstance(data, (str, os.PathLike)) else None
        if self.config.train.image_size == "auto":
            self.config.train.image_size = resolve_auto_size(paths if paths is not None else data,
                                                             self.config.train.auto_pixels)
        size = self.image_size
        if paths is not None:
            images = load_images(paths, size, keep_aspect=self.config.train.keep_aspect)
        else:
            images, _ = to_uint8_batch(data, size, self.config.train.keep_aspect)
        result = train_mod.train(self.config, images, checkpoint=checkpoint, resume=resume,
                                 device=self.device, progress=progress)
        self.model = result.model
        self.thresholds = {"image": float(result.thresholds["image"]), "pixel": float(result.thresholds["pixel"])}
        self.history = list(result.history)
        return self

    def set_thresholds(self, image: float | None = None, pixel: float | None = None) -> "Detector":
        """Replace the stored image and/or pixel threshold (kept by :meth:`save`)."""
        if image is not None:
            self.thresholds["image"] = float(image)
        if pixel is not None:
            self.thresholds["pixel"] = float(pixel)
        return self

    # ---------------------------------------------------------------- inference
    def anomaly_maps(self, images, *, batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """uint8 batch (N, 3, H, W), maps (N, 1, H, W) float32 and scores (N,) float32, all on the CPU."""
        return self._score(images, batch_size)[:3]

    def _score(self, images, batch_size):
        from .scoring import compute_maps

        model = self._require_model()
        batch, kind = to_uint8_batch(images, self.image_size, self.config.train.keep_aspect)
        n, k = self.smoothing
        maps, scores = compute_maps(model, batch, n=n, k=k, batch_size=batch_size, device=self.device,
                                    amp=self.config.train.amp)
        return batch, maps, scores, kind

    def predict(self, images, *, image_threshold: float | None = None, pixel_threshold: float | None = None,
                batch_size: int = 32) -> Prediction:
        """Score images.

        Args:
            images: see :func:`to_uint8_batch` (single image or batch, numpy, torch or paths).
            image_threshold, pixel_threshold: override the stored thresholds for this call only.
            batch_size: images per forward pass.

        Returns:
            :class:`Prediction` (numpy arrays for numpy/path input, CPU tensors for torch input).
        """
        _, maps, scores, kind = self._score(images, batch_size)
        it = self.thresholds["image"] if image_threshold is None else float(image_threshold)
        pt = self.thresholds["pixel"] if pixel_threshold is None else float(pixel_threshold)
        amap = maps[:, 0]
        mask = amap > pt if pt is not None else None
        label = scores > it if it is not None else None
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

        test = load_test_set(Path(root), self.image_size, keep_aspect=self.config.train.keep_aspect)
        _, maps, scores = self.anomaly_maps(test.images, batch_size=batch_size)
        result = evaluate(scores.numpy(), maps[:, 0].numpy(), test.labels.numpy(), test.masks[:, 0].numpy(),
                          test.defect_types)
        result["thresholds"] = dict(self.thresholds)
        if report is not None:
            from .report import write_report

            write_report(report, result, scores=scores.numpy(), labels=test.labels.numpy(),
                         maps=maps[:, 0].numpy(), masks=test.masks[:, 0].numpy(),
                         images=test.images.permute(0, 2, 3, 1).numpy(), defect_types=test.defect_types,
                         paths=[str(p) for p in test.paths], image_threshold=self.thresholds["image"],
                         pixel_threshold=self.thresholds["pixel"], title=f"fae_fast report: {Path(root).name}")
        return result

    # ---------------------------------------------------------------- persistence
    def save(self, path: str | os.PathLike) -> Path:
        """Write weights, config, image size, thresholds and the version to ``path`` (atomically)."""
        from .checkpoint import save_model_file

        model = self._require_model()
        save_model_file(path, model_state=model.state_dict(), config=self.config, image_size=self.image_size,
                        thresholds=dict(self.thresholds), meta={"history_tail": self.history[-5:]})
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike, *, device: str | torch.device = "auto") -> "Detector":
        """Load a file written by :meth:`save`; a file from another format version raises, naming both."""
        from .checkpoint import load_model_file
        from .models import build_model

        mf = load_model_file(path, map_location="cpu")
        det = cls(mf.config, device=device)
        det.config.train.image_size = tuple(mf.image_size)
        model = build_model(det.config.model)
        try:
            model.load_state_dict(mf.state)
        except RuntimeError as exc:
            raise ValueError(f"{path}: weights do not match the stored model config: {exc}") from exc
        det.model = model.to(det.device).eval()
        det.thresholds = {"image": mf.thresholds.get("image"), "pixel": mf.thresholds.get("pixel")}
        return det

    def __repr__(self) -> str:
        m = self.config.model
        return (f"Detector(widths={tuple(m.widths)}, image_size={self.config.train.image_size}, device={self.device}, "
                f"trained={self.model is not None}, thresholds={self.thresholds}, version={__version__})")
