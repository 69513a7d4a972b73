"""Export of the FAE scoring graph: ONNX (opset >= 17) and a ``torch.export`` / AOTInductor package.

What is exported is the *reference* graph, one module from image to score:

    uint8 or float (B, C, H, W) -> network -> e = mean_c (r - x)^2 -> n x box_k (valid-count border) -> max

built only from standard ops (the box filter is ``avg_pool2d(count_include_pad=False)``, which ONNX's
``AveragePool`` with ``count_include_pad=0`` expresses exactly), so any ONNX runtime or the AOTInductor
runtime can run it without fae_fast. The batch dimension is dynamic. Thresholds are *not* baked in: they are
applied after the graph (``map > pixel_threshold``, ``score > image_threshold``) so they can change per call
without re-exporting; the defaults travel as metadata (ONNX ``metadata_props``; a JSON file beside the AOTI
package).

Example:
    >>> from fae_fast.inference.export import export_onnx, export_aoti, load_aoti    # doctest: +SKIP
    >>> th = {"image": 0.01, "pixel": 0.02}
    >>> export_onnx(model, "fae.onnx", image_size=(256, 256), thresholds=th)      # doctest: +SKIP
    >>> export_aoti(model, "fae.pt2", image_size=(256, 256), device="cuda")          # doctest: +SKIP
    >>> amap, score = load_aoti("fae.pt2")(frames_uint8.cuda())                      # doctest: +SKIP
"""
from __future__ import annotations

import copy
import json
import os
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from .. import reference
from .._atomic import atomic_path, write_text

__all__ = ["ReferenceGraph", "export_onnx", "export_aoti", "load_aoti", "onnx_metadata"]

_MAX_BATCH = 4096


class ReferenceGraph(nn.Module):
    """Network + error map + n box-filter passes + max, in plain PyTorch ops (the exportable graph).

    Args:
        model: the network ((B, C, H, W) float in [0, 1] -> reconstruction); an eval copy is kept.
        n, k: box-filter passes and odd window.
        error: the map's error kind, "squared" | "gradient" | "squared+gradient"
            (:func:`fae_fast.reference.error_image`); None: the default MapConfig's.
        fold_bn: fold BatchNorm into the convolutions (exact to ~1e-5 in float32; smaller graph).
        normalizer: a :class:`fae_fast.scoring.MapNormalizer` applied to the map and score (None: raw maps).
        frame_scale: the frames are this many times the network's size (``map.frame_scale``): the network
            maps their area mean, its map comes back on the frame's pixels, the normalizer's template reads the
            frame.

    ``forward(x)``: x (B, C, H, W) uint8 (0..255) or float in [0, 1] -> (map (B, 1, H, W) float32, score (B,)
    float32).
    """

    def __init__(self, model: nn.Module, *, n: int, k: int, error: str | None = None, fold_bn: bool = True,
                 normalizer: nn.Module | None = None, frame_scale: int = 1):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if not (isinstance(n, int) and 0 <= n <= 8):
            raise ValueError(f"n (box-filter passes) must be an int in 0..8, got {n!r}")
        if not (isinstance(k, int) and 1 <= k <= 31 and k % 2 == 1):
            raise ValueError(f"k (window) must be an odd int in 1..31, got {k!r}")
        if error is None:
            from ..config import MapConfig

            error = MapConfig().error
        if error not in reference.MAP_ERRORS:
            raise ValueError(f"error must be one of {reference.MAP_ERRORS}, got {error!r}")
        if fold_bn:
            from ..models import fold_batchnorm

            model = fold_batchnorm(model)
        else:
            model = copy.deepcopy(model).eval()
        self.model = model.float().eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.n, self.k, self.error = n, k, error
        self.frame_scale = int(frame_scale)  # a plain attribute: part of the export cache's fingerprint
        self.normalizer = normalizer  # a scoring.MapNormalizer (per-pixel statistics of normal maps) or None

    def forward(self, x: torch.Tensor):
        from ..scoring import frame_map, network_view

        frame = reference._as_float(x).to(torch.float32)  # uint8 / 255, float32 in [0, 1]
        xv = network_view(x, self.frame_scale)
        xf = frame if xv is x else reference._as_float(xv).to(torch.float32)  # scale 1: the frame itself
        recon = self.model(xf)
        amap, score = reference.anomaly_map(xf, recon, n=self.n, k=self.k, error=self.error)
        amap = frame_map(amap, self.frame_scale)
        return (amap, score) if self.normalizer is None else self.normalizer(amap, score, frame)


def _example(image_size, in_channels, input_dtype, device, batch=2):
    H, W = (int(v) for v in image_size)
    if input_dtype in ("uint8", torch.uint8):
        return torch.randint(0, 256, (batch, in_channels, H, W), dtype=torch.uint8, device=device)
    if input_dtype in ("float32", torch.float32):
        return torch.rand(batch, in_channels, H, W, device=device)
    raise ValueError(f"input_dtype must be 'uint8' or 'float32', got {input_dtype!r}")


def onnx_metadata(*, image_size, n, k, error="squared", thresholds=None, input_dtype="uint8") -> dict[str, str]:
    """The key/value strings stored with an export: sizes, smoothing, error kind, input dtype, default thresholds."""
    from .._version import __version__

    th = dict(thresholds or {})
    return {
        "fae_fast_version": __version__,
        "image_size": json.dumps([int(v) for v in image_size]),
        "n": str(int(n)), "k": str(int(k)), "error": str(error),
        "input_dtype": str(input_dtype).replace("torch.", ""),
        "image_threshold": json.dumps(th.get("image")),
        "pixel_threshold": json.dumps(th.get("pixel")),
        "outputs": "anomaly_map (B,1,H,W) float32, pred_score (B,) float32; "
                   "pred_mask = anomaly_map > pixel_threshold, pred_label = pred_score > image_threshold",
    }


def _nk(image_size, n, k):
    from ..config import MapConfig, smoothing_for_size

    dn, dk = smoothing_for_size(MapConfig(), *image_size)
    return (dn if n is None else int(n)), (dk if k is None else int(k))


def export_onnx(model: nn.Module, path, *, image_size, n: int | None = None, k: int | None = None,
                error: str | None = None, thresholds: dict | None = None, input_dtype: str = "uint8", opset: int = 18,
                in_channels: int = 3, fold_bn: bool = True, dynamo: bool = True, verbose: bool | None = None) -> Path:
    """Write the reference graph as ONNX with a dynamic batch dimension.

    Args:
        model: the network (or a :class:`ReferenceGraph`, used as it is).
        path: destination ``.onnx`` file.
        image_size: (H, W) of the inputs (fixed in the graph; the batch is dynamic).
        n, k: smoothing (None: ``smoothing_for_size`` of the default MapConfig).
        error: the map's error kind, "squared" | "gradient" | "squared+gradient" (None: the default MapConfig's).
        thresholds: default ``{"image", "pixel"}`` thresholds, stored as metadata only.
        input_dtype: "uint8" (normalisation inside the graph) or "float32" (input in [0, 1]).
        opset: ONNX opset, >= 17 (default 18: the native opset of the torch.export-based exporter; asking for
            17 makes it down-convert, which can fail for Reduce* ops and then keeps 18 with a warning).
        fold_bn: fold BatchNorm before export.
        dynamo: use the ``torch.export``-based exporter (needs onnxscript); False: the TorchScript exporter.
        verbose: ``verbose=`` of ``torch.onnx.export`` (False: no progress lines on stdout).

    Returns:
        The path written. Inputs: ``images`` (B, C, H, W); outputs ``anomaly_map``, ``pred_score``.
    """
    if opset < 17:
        raise ValueError(f"opset must be >= 17, got {opset}")
    if isinstance(model, ReferenceGraph):  # the graph's own smoothing is what the file computes
        graph, n, k, error = model, model.n, model.k, model.error
    else:
        n, k = _nk(image_size, n, k)
        graph = ReferenceGraph(model, n=n, k=k, error=error, fold_bn=fold_bn)
        error = graph.error
    graph = graph.cpu().eval()
    x = _example(image_size, in_channels, input_dtype, "cpu")
    path = Path(path)
    names = dict(input_names=["images"], output_names=["anomaly_map", "pred_score"])
    meta = onnx_metadata(image_size=image_size, n=n, k=k, error=error, thresholds=thresholds,
                         input_dtype=input_dtype)
    try:
        import onnx
    except ImportError:  # the file is complete without metadata; onnx is only needed to add it
        onnx = None
    # everything goes to a temporary file beside ``path``, renamed onto it only once complete
    with atomic_path(path) as tmp:
        with torch.no_grad():
            if dynamo:
                batch = torch.export.Dim("batch", min=1, max=_MAX_BATCH)
                prog = torch.onnx.export(graph, (x,), None, opset_version=opset, dynamo=True, verbose=verbose,
                                         dynamic_shapes={"x": {0: batch}}, **names)
                prog.save(str(tmp))
            else:
                torch.onnx.export(graph, (x,), str(tmp), opset_version=opset, dynamo=False, verbose=bool(verbose),
                                  dynamic_axes={"images": {0: "batch"}, "anomaly_map": {0: "batch"},
                                                "pred_score": {0: "batch"}}, **names)
        if onnx is not None:
            m = onnx.load(str(tmp), format="protobuf")
            got = max((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), default=None)
            if got != opset:
                warnings.warn(f"{path}: asked for ONNX opset {opset}, the exporter wrote opset {got}",
                              RuntimeWarning, stacklevel=2)
            for key, value in meta.items():
                prop = m.metadata_props.add()
                prop.key, prop.value = key, value
            onnx.save(m, str(tmp), format="protobuf")
    if onnx is None:
        write_text(path.with_suffix(path.suffix + ".json"), json.dumps(meta, indent=1))
    return path


def export_aoti(model: nn.Module, path, *, image_size, n: int | None = None, k: int | None = None,
                error: str | None = None, thresholds: dict | None = None, input_dtype: str = "uint8", device="cpu",
                in_channels: int = 3, fold_bn: bool = True, max_batch: int = _MAX_BATCH) -> Path:
    """``torch.export`` the reference graph (dynamic batch) and compile it with AOTInductor into a package.

    Args:
        model: the network (or a :class:`ReferenceGraph`).
        path: destination ``.pt2`` package.
        image_size, n, k, error, thresholds, input_dtype, in_channels, fold_bn: as :func:`export_onnx`.
        device: where the package runs ("cpu" or "cuda"); the compiled code is device-specific.
        max_batch: the largest batch the package accepts.

    Returns:
        The package path; :func:`load_aoti` runs it. The metadata goes to ``<path>.json``.
    """
    if isinstance(model, ReferenceGraph):  # the graph's own smoothing is what the package computes
        graph, n, k, error = model, model.n, model.k, model.error
    else:
        n, k = _nk(image_size, n, k)
        graph = ReferenceGraph(model, n=n, k=k, error=error, fold_bn=fold_bn)
        error = graph.error
    device = torch.device(device)
    graph = graph.to(device).eval()
    x = _example(image_size, in_channels, input_dtype, device)
    batch = torch.export.Dim("batch", min=1, max=int(max_batch))
    with torch.no_grad():
        ep = torch.export.export(graph, (x,), dynamic_shapes={"x": {0: batch}})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch._inductor.aoti_compile_and_package(ep, package_path=str(path))
    meta = onnx_metadata(image_size=image_size, n=n, k=k, error=error, thresholds=thresholds,
                         input_dtype=input_dtype)
    meta["device"] = device.type
    write_text(str(path) + ".json", json.dumps(meta, indent=1))
    return path


def load_aoti(path):
    """Load a package written by :func:`export_aoti`: a callable ``x -> (map (B, 1, H, W), score (B,))``."""
    if not os.path.isfile(path):
        raise ValueError(f"{path} is not a file")
    return torch._inductor.aoti_load_package(str(path))
