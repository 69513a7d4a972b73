"""The high-FPS inference engine: folded, low-precision, compiled, graph-captured FAE scoring.

One :class:`Engine` owns one trained network and turns images into the field's usual results
(``pred_score``, ``anomaly_map``, ``pred_mask``, ``pred_label``). What it does to be fast, in order of payoff
on a GPU (DESIGN.md section 4 has the plain-PyTorch anchors it is measured against):

* BatchNorm folded into the convolutions (:func:`fae_fast.models.fold_batchnorm`): fewer kernels, no extra
  pass over the activations;
* weights cast to bf16 (or fp16) once, activations in ``channels_last`` (the layout cuDNN / Inductor convs want
  on tensor cores), instead of autocast re-casting the weights on every call;
* uint8 input accepted directly: ``x / 255`` is the first op of the compiled graph, so the host->device copy
  moves 1 byte per pixel-channel instead of 4, and the error map reads the uint8 image (not a float copy);
* the error map + n box-filter passes + max run as one op (:func:`fae_fast.ops.anomaly_map`: Triton on CUDA);
* ``torch.compile`` of the whole graph (model + map), and one CUDA graph per fixed batch size with static
  input/output buffers, which removes the launch overhead that dominates at batch 1;
* pinned host buffers for the host -> device -> host path of :meth:`Engine.predict`.

On the CPU (``backend="auto"``) the engine runs the exported scoring graph with ONNX Runtime instead
(:mod:`fae_fast.inference.ort`: the same network + error map + box filters + max, ``x / 255`` of uint8 frames
inside the graph): ~3x faster than PyTorch there (issue 13, ``bench/results/cpu_engine_2core-vm.json``). The
graph is exported once per model and image size (cached in memory) when the engine is built. Without onnxruntime
(``pip install fae-fast[cpu]``), or when the model cannot be exported, it falls back to the PyTorch engine with
one warning. The CUDA path never uses ONNX Runtime.

Thresholds are applied *after* the graph (one compare), so the caller can override them on any call without
recompiling, recapturing or re-exporting.

Fail safe: thresholds must be finite (NaN would pass every part); :meth:`Engine.predict` refuses a float frame
with NaN/Inf pixels or values outside [0, 1] (ValueError naming the frame; uint8 frames need no check); a NaN
score or map pixel, from a model that broke on a frame, counts as above the threshold (:func:`apply_thresholds`).

Agreement with the fp32 eager model (the reference: unfolded network in eval mode + reference anomaly map):

* ``dtype=torch.float32``: scores and maps within ``rtol=1e-4, atol=1e-7`` (BN folding reorders the arithmetic;
  measured ~1e-6 relative on CPU); the same bound holds for the ONNX Runtime backend against the reference and
  against the PyTorch engine (different convolution kernels; tests/test_cpu_engine.py);
* ``dtype=torch.bfloat16``: bf16 has an 8-bit mantissa, so the reconstruction carries ~2**-9 relative rounding;
  the engine's map error is bounded by twice the error of plain bf16 autocast of the same network (the
  precision the user would otherwise run at) plus ``1e-6`` absolute; scores then agree to a few per cent
  relative (the tests check this bound on CPU with the reference backend and on CUDA with Triton).

Example:
    >>> from fae_fast.models import build_model
    >>> eng = Engine(build_model(), image_size=(256, 256), thresholds={"image": 0.01, "pixel": 0.02})  # doctest: +SKIP
    >>> res = eng.predict(frames_uint8)                      # (B, 3, 256, 256) uint8, CPU or CUDA  # doctest: +SKIP
    >>> res.pred_score, res.pred_label                        # doctest: +SKIP
    >>> res = eng.predict(frames_uint8, image_threshold=0.02)  # per-call override, nothing rebuilt  # doctest: +SKIP
"""
from __future__ import annotations

import copy
import warnings
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn

from ..api import Prediction, above, check_float_images
from ..config import check_image_size
from ..scoring import MapNormalizer, check_threshold, frame_map, network_view, stored_map_statistics

__all__ = ["Engine", "InferenceResult", "apply_thresholds", "resolve_dtype", "resolve_device", "plan_batches",
           "BACKENDS"]

BACKENDS = ("auto", "torch", "onnxruntime")
_warned: set[str] = set()


def _warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=4)  # the caller of Engine(...)

_DTYPE_NAMES = {
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
}
_INPUT_DTYPES = (torch.uint8, torch.float32, torch.float16, torch.bfloat16)


def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    """``"auto"`` -> bf16 on CUDA, fp32 on CPU (CPU bf16 convolutions are slower than fp32); names or dtypes."""
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise ValueError(f"dtype must be bf16, fp16 or fp32, got {dtype}")
        return dtype
    if isinstance(dtype, str) and dtype.lower() in _DTYPE_NAMES:
        return _DTYPE_NAMES[dtype.lower()]
    raise ValueError(f"dtype must be 'auto', 'bf16', 'fp16', 'fp32' or a torch dtype, got {dtype!r}")


def resolve_device(device) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def plan_batches(batch: int, sizes: Sequence[int] | None) -> list[tuple[int, int, int]]:
    """Split a batch into chunks that fit the captured batch sizes.

    Args:
        batch: number of images B >= 1.
        sizes: the batch sizes that have a CUDA graph (None or empty: run B as it is).

    Returns:
        ``[(start, count, padded), ...]``: chunks of the largest size while more than it remain, then the
        remainder padded up to the smallest captured size that holds it (padding rows are computed and dropped;
        images are independent in eval mode, so they cannot change the real rows).

    Example:
        >>> plan_batches(300, (1, 16, 64, 256))
        [(0, 256, 256), (256, 44, 64)]
    """
    if not sizes:
        return [(0, batch, batch)]
    sizes = sorted(sizes)
    out, start = [], 0
    while batch - start > sizes[-1]:
        out.append((start, sizes[-1], sizes[-1]))
        start += sizes[-1]
    rest = batch - start
    if rest > 0:
        out.append((start, rest, next(s for s in sizes if s >= rest)))
    return out


# the engine returns the API's result type: one set of names (pred_score, anomaly_map, pred_mask, pred_label)
InferenceResult = Prediction


def apply_thresholds(amap: torch.Tensor, score: torch.Tensor, image_threshold: float | None,
                     pixel_threshold: float | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(pred_mask, pred_label) from maps (B, H, W) / (B, 1, H, W) and scores (B,); None where no threshold.

    A NaN map pixel or score is above the threshold (:func:`fae_fast.api.above`): a model that breaks on an
    image flags it, it never passes it as good.
    """
    mask = above(amap, pixel_threshold) if pixel_threshold is not None else None
    label = above(score, image_threshold) if image_threshold is not None else None
    return mask, label


class _Pipeline(nn.Module):
    """uint8 or float (B, C, H, W) -> (map (B, 1, H, W) float32, score (B,) float32), the graph that is compiled.

    ``x / 255`` happens here (inside the graph) so a uint8 frame is all the device receives; the error map is
    computed against the original ``x`` (uint8 exact, or the caller's float), never against its bf16 copy.
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype, n: int, k: int, map_fn, residual: bool = False,
                 normalizer: nn.Module | None = None, error: str = "squared", frame_scale: int = 1):
        super().__init__()
        self.model = model
        self.scale = int(frame_scale)
        self.normalizer = normalizer
        self.dtype = dtype
        self.n, self.k, self.error = int(n), int(k), error
        self.map_fn = map_fn
        self.residual = bool(residual)

    def forward(self, x: torch.Tensor):
        frame, x = x, network_view(x, self.scale)  # map.frame_scale: the network sees the frame's area mean
        xf = x.to(torch.float32).mul_(1.0 / 255.0) if x.dtype == torch.uint8 else x
        out = self.model(xf.to(self.dtype))
        if self.residual:
            # the network returns only its correction h (its own `x + h` is switched off): adding it to the
            # float32 image here keeps recon - x == h exact instead of rounding x + h to bf16 (2**-9 relative,
            # which measured 5x the map error of plain autocast); Inductor fuses the add into the last conv
            out = xf.to(torch.float32) + out.to(torch.float32)
        amap, score = self.map_fn(x, out, n=self.n, k=self.k, error=self.error)
        amap = frame_map(amap, self.scale)
        # the fused image score's template map runs through the same map op as the network's (Triton on CUDA)
        return (amap, score) if self.normalizer is None else self.normalizer(amap, score, frame, self.map_fn)


class _Runner:
    """One compiled (and on CUDA graph-captured) pipeline for one (padded batch size, input dtype).

    With a CUDA graph, ``static_in`` is the only input the graph reads and ``static_map`` / ``static_score`` the
    outputs it writes: callers copy into the first and out of the others (and must copy the outputs before the
    next replay of the same runner overwrites them).
    """

    def __init__(self, fn, batch: int, in_dtype: torch.dtype, shape_chw, device, graph: bool, pool=None):
        C, H, W = shape_chw
        self.fn, self.batch, self.graph = fn, batch, None
        self.static_in = torch.zeros((batch, C, H, W), dtype=in_dtype, device=device).contiguous(
            memory_format=torch.channels_last)
        if graph:
            # warm up on a side stream (compilation, cuDNN autotuning and lazy inits must not be captured), then
            # capture one replayable graph with static buffers
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side), torch.inference_mode():
                for _ in range(3):
                    fn(self.static_in)
            torch.cuda.current_stream(device).wait_stream(side)
            torch.cuda.synchronize(device)
            self.graph = torch.cuda.CUDAGraph()
            # thread_local: other threads (an InlineStream's completer waiting on events, the caller's thread)
            # may touch CUDA while this thread captures; "global" would invalidate the capture
            with torch.inference_mode(), torch.cuda.graph(self.graph, pool=pool, capture_error_mode="thread_local"):
                self.static_map, self.static_score = fn(self.static_in)

    def __call__(self, x: torch.Tensor | None = None):
        """Run on ``x`` (copied into the static input when graph-captured) or on ``static_in`` when None."""
        if self.graph is None:
            with torch.inference_mode():
                return self.fn(self.static_in if x is None else x)
        if x is not None and x.data_ptr() != self.static_in.data_ptr():
            self.static_in.copy_(x)
        self.graph.replay()
        return self.static_map, self.static_score


class Engine:
    """Fast FAE inference for one network at one image size.

    Args:
        model: the trained network, (B, C, H, W) float in [0, 1] -> reconstruction of the same shape. It is not
            modified: the engine keeps an eval-mode copy (BatchNorm folded when ``fold_bn``).
        image_size: (H, W) of the frames (the size the model was trained at).
        n, k: box-filter passes and odd window of the anomaly map; None: ``smoothing_for_size`` of the default
            :class:`~fae_fast.config.MapConfig` at ``image_size``.
        error: the map's error kind, "squared" | "gradient" | "squared+gradient"
            (:func:`fae_fast.reference.error_image`); None: the default :class:`~fae_fast.config.MapConfig`'s.
        thresholds: ``{"image": float, "pixel": float}`` defaults for ``pred_label`` / ``pred_mask`` (either may
            be missing or None; overridable per call).
        dtype: "auto" (bf16 on CUDA, fp32 on CPU), "bf16", "fp16", "fp32" or a torch dtype: the precision of the
            weights and activations. The map and scores are always float32.
        device: "auto" | "cpu" | "cuda" | "cuda:N" | torch.device.
        compile: None/"auto" (on for CUDA, off on CPU), True, False, or an Inductor mode string
            ("default", "max-autotune-no-cudagraphs"; "reduce-overhead" is refused: the engine captures its
            own CUDA graphs, and Inductor's would nest inside them).
        cuda_graphs: None/"auto" (on for CUDA), True (needs CUDA), False.
        batch_sizes: the batch sizes that get a CUDA graph; other batches are split and padded to them
            (:func:`plan_batches`). Ignored without CUDA graphs.
        fold_bn: fold BatchNorm into the convolutions.
        map_backend: backend of :func:`fae_fast.ops.anomaly_map` ("auto": Triton on CUDA, reference on CPU) on
            the PyTorch path (the ONNX Runtime backend computes the map inside its graph).
        in_channels: channels the model expects (grey frames are replicated to it).
        cudnn_benchmark: set ``torch.backends.cudnn.benchmark = True`` (a process-wide flag) on CUDA.
        compile_dynamic: ``dynamic=`` of torch.compile. None (default): batch 1 and the first other size compile
            specialised, later sizes reuse a batch-dynamic graph (2-3 compilations for any number of captured
            sizes); False: one specialised compilation per size (slower start, maybe faster small kernels).
        backend: "auto" | "torch" | "onnxruntime". "auto": ONNX Runtime on the CPU when it is installed and the
            engine runs fp32 without torch.compile or an explicit ``map_backend`` (the settings of the PyTorch
            path), else PyTorch; on CUDA always PyTorch. "onnxruntime" needs the CPU, fp32 and no compile.
        threads: CPU threads: ONNX Runtime's intra-op threads, or ``torch.set_num_threads`` (process-wide) for
            the PyTorch backend on the CPU. None: the runtime's default. Ignored on CUDA.
        normalize, map_stats: per-pixel normalisation of the map by statistics of normal images
            (:class:`fae_fast.scoring.MapNormalizer`; a model file trained with ``map.normalize`` brings both).
        image_score: "max" | "max+template" (``map.image_score``; ``map_stats`` then holds the template's too).
        template_n: the template's box-filter passes for "max+template" (``map.template_n``); None: ``n``.
        template_weight: the template's share of the pixel map ("max+template" only, ``map.template_weight``).
        frame_scale: ``image_size`` is the frames' size, this many times the network's (``map.frame_scale``,
            "max+template" only): the network maps their area mean at its own size (``n``, ``k`` are its
            smoothing), the map comes back on the frame's pixels and the template reads the frame.

    The engine is not thread-safe: one thread at a time (the :class:`~fae_fast.inference.stream.InlineStream`
    worker, or the caller).
    """

    def __init__(self, model: nn.Module, *, image_size, n: int | None = None, k: int | None = None,
                 error: str | None = None, thresholds: dict | None = None, dtype="auto", device="auto", compile=None,
                 cuda_graphs=None,
                 batch_sizes: Sequence[int] = (1, 16, 64, 256), fold_bn: bool = True, map_backend: str = "auto",
                 in_channels: int = 3, cudnn_benchmark: bool = True, compile_dynamic: bool | None = None,
                 backend: str = "auto", threads: int | None = None, normalize: str = "none",
                 map_stats: dict | None = None, image_score: str = "max", template_n: int | None = None,
                 frame_scale: int = 1, template_weight: float = 0.0):
        from .. import _backend
        from ..config import MapConfig, smoothing_for_size

        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.image_size = check_image_size(image_size, "image_size")
        H, W = self.image_size
        if isinstance(frame_scale, bool) or not isinstance(frame_scale, int) or not 1 <= frame_scale <= 4 \
                or H % frame_scale or W % frame_scale:
            raise ValueError(f"frame_scale must be an int in 1..4 dividing the frame size {H}x{W}, got "
                             f"{frame_scale!r}")
        if frame_scale != 1 and image_score == "max":
            raise ValueError("frame_scale > 1 needs image_score 'max+template' (only the template reads the "
                             "finer frame)")
        self.frame_scale = frame_scale
        dn, dk = smoothing_for_size(MapConfig(), H // frame_scale, W // frame_scale)
        self.n = dn if n is None else int(n)
        self.k = dk if k is None else int(k)
        if not 0 <= self.n <= 8:
            raise ValueError(f"n (box-filter passes) must be in 0..8, got {n!r}")
        if not (1 <= self.k <= 31 and self.k % 2 == 1):
            raise ValueError(f"k (window) must be an odd int in 1..31, got {k!r}")
        if template_n is not None and (isinstance(template_n, bool) or not isinstance(template_n, int)
                                       or not 0 <= template_n <= 8):
            raise ValueError(f"template_n (the template's box-filter passes) must be None or in 0..8, "
                             f"got {template_n!r}")
        from ..reference import MAP_ERRORS

        error = MapConfig().error if error is None else error
        if error not in MAP_ERRORS:
            raise ValueError(f"error (the map's error kind) must be one of {MAP_ERRORS}, got {error!r}")
        self.error = error
        self.in_channels = int(in_channels)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        on_cuda = self.device.type == "cuda"
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise ValueError(f"threads must be a positive int or None, got {threads!r}")
        self.threads = threads
        self.backend = self._resolve_backend(backend, compile, map_backend)

        if cuda_graphs in (None, "auto"):
            cuda_graphs = on_cuda
        if cuda_graphs and not on_cuda:
            raise ValueError(f"cuda_graphs=True needs a CUDA device, the engine is on {self.device}")
        self.cuda_graphs = bool(cuda_graphs)
        if compile in (None, "auto"):
            compile = on_cuda
        if compile in ("reduce-overhead", "max-autotune") and self.cuda_graphs:
            raise ValueError(f"compile={compile!r} turns on Inductor's own CUDA graphs, which cannot nest in the "
                             "engine's: use compile=True or 'max-autotune-no-cudagraphs' with cuda_graphs=True")
        self.compile_mode = None if compile is False else ("default" if compile is True else str(compile))

        sizes = sorted({int(b) for b in batch_sizes}) if batch_sizes else []
        if any(b < 1 for b in sizes):
            raise ValueError(f"batch_sizes must be positive ints, got {tuple(batch_sizes)!r}")
        if self.cuda_graphs and not sizes:
            raise ValueError("cuda_graphs=True needs at least one batch size in batch_sizes")
        self.batch_sizes = tuple(sizes)

        self._thresholds = {"image": None, "pixel": None}
        self.set_thresholds(**(self._check_thresholds(thresholds)))

        # the network: an eval copy, BN folded, cast once, channels_last, no autograd
        if fold_bn:
            from ..models import fold_batchnorm

            net = fold_batchnorm(model)
        else:
            net = copy.deepcopy(model).eval()
        net = net.to(device=self.device, dtype=self.dtype).to(memory_format=torch.channels_last)
        for p in net.parameters():
            p.requires_grad_(False)
        self.model = net

        # resolve the map backend once, outside any compiled region: the dispatcher's bookkeeping (env lookup,
        # lazy import, last-backend dict) is Python that torch.compile need not trace
        self.map_backend, map_fn = _backend.resolve("anomaly_map", map_backend, self.device)
        # a residual network (fae_fast's UNet: recon = x + h) adds x in float32 in the pipeline instead; not one that
        # inpaints hidden cells (its passes add h to the filled input, not to x)
        residual = isinstance(getattr(net, "residual", None), bool) and net.residual \
            and not getattr(net, "hide_cell", 0)
        if residual:
            net.residual = False
        self.normalizer = MapNormalizer(normalize, map_stats, self.image_size, image_score=image_score, n=self.n,
                                        k=self.k, error=self.error, template_n=template_n,
                                        template_weight=template_weight).to(self.device)
        self._pipeline = _Pipeline(net, self.dtype, self.n, self.k, map_fn, residual=residual,
                                   normalizer=self.normalizer, error=self.error,
                                   frame_scale=frame_scale).eval()
        if on_cuda:
            # one eager call of the map op: the Triton kernel caches its box-filter operators per image size on the
            # first eager call, so the compiled graph reads them as constants instead of rebuilding them
            # (and the template's, when its passes differ)
            s = frame_scale
            calls = {(self.n, H // s, W // s)} | ({(self.normalizer.n, H, W)}
                                                  if self.normalizer.image_score != "max" else set())
            with torch.inference_mode():
                for n, h, w in sorted(calls):
                    map_fn(torch.zeros((1, self.in_channels, h, w), dtype=torch.uint8, device=self.device),
                           torch.zeros((1, self.in_channels, h, w), device=self.device), n=n, k=self.k,
                           error=self.error)
        fn = self._pipeline
        if self.compile_mode is not None:
            import torch._dynamo.config as dcfg

            if compile_dynamic is False:
                # one specialised graph per (batch size, input dtype): raise the recompile limit so that all
                # captured sizes of both input dtypes fit (a process-wide setting; only ever raised)
                dcfg.recompile_limit = max(dcfg.recompile_limit, 4 * max(1, len(sizes)) + 8)
            fn = torch.compile(self._pipeline, mode=self.compile_mode, dynamic=compile_dynamic)
        self._fn = fn
        if on_cuda and cudnn_benchmark:
            torch.backends.cudnn.benchmark = True
        self._runners: dict[tuple[int, torch.dtype], _Runner] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.cuda_graphs else None
        self._pinned: dict[tuple, torch.Tensor] = {}
        self._ort = None
        if self.backend == "onnxruntime":
            self._ort = self._build_ort(model, fold_bn, explicit=backend == "onnxruntime")
        if self.backend == "torch" and not on_cuda and threads is not None:
            torch.set_num_threads(threads)

    def _resolve_backend(self, backend, compile, map_backend) -> str:
        """"torch" or "onnxruntime" for the requested backend and the engine's device, dtype and compile."""
        from . import ort

        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        torch_settings = (self.device.type == "cuda" or self.dtype != torch.float32
                          or compile not in (None, "auto", False) or map_backend != "auto")
        if backend == "onnxruntime":
            if torch_settings:
                raise ValueError(f"backend='onnxruntime' runs fp32 on the CPU without torch.compile or a "
                                 f"map_backend; got device={self.device}, dtype={self.dtype}, compile={compile!r}, "
                                 f"map_backend={map_backend!r}")
            if not ort.available():
                raise ValueError(f"backend='onnxruntime' needs {' and '.join(ort.missing())} "
                                 "(pip install fae-fast[cpu])")
            return backend
        if backend == "torch" or torch_settings:
            return "torch"
        if not ort.available():
            _warn_once("ort-missing", f"{' and '.join(ort.missing())} not installed: the CPU engine runs PyTorch, "
                                      "2-3x slower than ONNX Runtime (pip install fae-fast[cpu])")
            return "torch"
        return "onnxruntime"

    def _build_ort(self, model: nn.Module, fold_bn: bool, explicit: bool):
        """The ONNX Runtime runner, its uint8 graph exported (or taken from the cache) and its session built now,
        so that an export failure shows here; with backend="auto" it falls back to PyTorch with a warning."""
        from .export import ReferenceGraph
        from .ort import OrtRunner

        try:
            graph = ReferenceGraph(model, n=self.n, k=self.k, error=self.error, fold_bn=fold_bn,
                                   normalizer=copy.deepcopy(self.normalizer).cpu(),
                                   frame_scale=self.frame_scale)
            runner = OrtRunner(graph, image_size=self.image_size, in_channels=self.in_channels, threads=self.threads)
            runner.session("uint8")
            return runner
        except Exception as exc:  # noqa: BLE001 -- any exporter / runtime failure means "use PyTorch"
            if explicit:
                raise RuntimeError(f"backend='onnxruntime': exporting {type(model).__name__} to ONNX or loading it "
                                   f"failed: {exc}") from exc
            _warn_once(f"ort-export-{type(model).__qualname__}",
                       f"the CPU engine runs PyTorch: exporting {type(model).__name__} to ONNX for ONNX Runtime "
                       f"failed ({type(exc).__name__}: {str(exc)[:200]})")
            self.backend = "torch"
            if self.threads is not None:
                torch.set_num_threads(self.threads)
            return None

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def from_model_file(cls, path, **kwargs) -> "Engine":
        """Build an engine from a model file (:func:`fae_fast.checkpoint.load_model_file`).

        The file gives the network, the image size, the smoothing (``smoothing_for_size`` of its MapConfig) and
        the default thresholds; ``kwargs`` go to :class:`Engine` and override those (e.g. ``thresholds=``,
        ``dtype=``, ``device=``). Non-finite stored thresholds raise ValueError naming the file, unless
        ``thresholds=`` replaces them.
        """
        from ..checkpoint import load_model_file
        from ..config import frame_size, smoothing_for_size
        from ..models import build_model

        mf = load_model_file(path, map_location="cpu")
        model = build_model(mf.config.model)
        try:
            model.load_state_dict(mf.state)
        except RuntimeError as exc:
            raise ValueError(f"{path}: weights do not match the model its config describes: {exc}") from exc
        n, k = smoothing_for_size(mf.config.map, *mf.image_size)
        kwargs.setdefault("n", n)
        kwargs.setdefault("k", k)
        kwargs.setdefault("error", mf.config.map.error)
        if "thresholds" not in kwargs:  # stored thresholds must be finite (given ones are checked by __init__)
            kwargs["thresholds"] = {k: check_threshold(v, f"{path}: stored {k} threshold")
                                    for k, v in mf.thresholds.items() if k in ("image", "pixel")}
        kwargs.setdefault("in_channels", mf.config.model.in_channels)
        stats = stored_map_statistics(mf, path)
        if stats is not None:
            kwargs.setdefault("normalize", mf.config.map.normalize)
            kwargs.setdefault("map_stats", stats)
            kwargs.setdefault("image_score", mf.config.map.image_score)
            kwargs.setdefault("template_n", mf.config.map.template_n)
            kwargs.setdefault("template_weight", mf.config.map.template_weight)
            if kwargs["image_score"] != "max":
                kwargs.setdefault("frame_scale", int(mf.config.map.frame_scale))
        return cls(model.eval(), image_size=frame_size(mf.config.map, mf.image_size), **kwargs)

    @staticmethod
    def _check_thresholds(thresholds) -> dict:
        if thresholds is None:
            return {}
        if not isinstance(thresholds, dict):
            raise TypeError(f"thresholds must be a dict like {{'image': t, 'pixel': t}}, got "
                            f"{type(thresholds).__name__}")
        unknown = set(thresholds) - {"image", "pixel"}
        if unknown:
            raise ValueError(f"unknown threshold keys {sorted(unknown)}; expected 'image' and/or 'pixel'")
        return dict(thresholds)

    # ------------------------------------------------------------------ thresholds
    @property
    def thresholds(self) -> dict:
        """The default thresholds ``{"image": float | None, "pixel": float | None}`` (a copy)."""
        return dict(self._thresholds)

    def set_thresholds(self, image: float | None = None, pixel: float | None = None) -> "Engine":
        """Replace the default image and/or pixel threshold (None leaves one unchanged); nothing is rebuilt."""
        image, pixel = check_threshold(image, "image threshold"), check_threshold(pixel, "pixel threshold")
        if image is not None:
            self._thresholds["image"] = image
        if pixel is not None:
            self._thresholds["pixel"] = pixel
        return self

    def resolve_thresholds(self, image_threshold=None, pixel_threshold=None) -> tuple[float | None, float | None]:
        """The thresholds of one call: the overrides where given, else the engine's defaults."""
        it = self._thresholds["image"] if image_threshold is None else check_threshold(image_threshold,
                                                                                       "image_threshold")
        pt = self._thresholds["pixel"] if pixel_threshold is None else check_threshold(pixel_threshold,
                                                                                       "pixel_threshold")
        return it, pt

    # ------------------------------------------------------------------ device-level API
    def check_batch(self, x: torch.Tensor, what: str = "images") -> None:
        """Raise TypeError/ValueError unless ``x`` is a (B, C, H, W) batch of this engine's size."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in _INPUT_DTYPES:
            raise TypeError(f"{what} has dtype {x.dtype}; expected uint8 or float32/float16/bfloat16")
        H, W = self.image_size
        if x.dim() != 4 or x.shape[1] != self.in_channels or tuple(x.shape[2:]) != (H, W) or x.shape[0] < 1:
            raise ValueError(f"{what} must have shape (B, {self.in_channels}, {H}, {W}), got {tuple(x.shape)}")

    def runner(self, batch: int, in_dtype: torch.dtype = torch.uint8) -> _Runner:
        """The (lazily built: compiled, warmed up, captured) runner for a padded batch size and input dtype."""
        key = (int(batch), in_dtype)
        r = self._runners.get(key)
        if r is None:
            try:
                r = _Runner(self._fn, int(batch), in_dtype, (self.in_channels, *self.image_size), self.device,
                            self.cuda_graphs, self._pool)
            except RuntimeError as exc:
                if not self.cuda_graphs:
                    raise
                raise RuntimeError(
                    f"capturing the CUDA graph for batch {batch} ({in_dtype}) failed: {exc}. Something in the "
                    f"pipeline synchronises with the host (map backend {self.map_backend!r}, compile "
                    f"{self.compile_mode!r}); try map_backend='torch' or cuda_graphs=False") from exc
            self._runners[key] = r
        return r

    def warmup(self, dtypes: Sequence[torch.dtype] = (torch.uint8,)) -> "Engine":
        """Compile and capture every batch size in ``batch_sizes`` now (otherwise the first call of each does);
        with ONNX Runtime, export and load the graph of each input dtype and run it once."""
        if self._ort is not None:
            for dt in dtypes:
                self._ort(torch.zeros((1, self.in_channels, *self.image_size), dtype=dt))
            return self
        for dt in dtypes:
            for b in (self.batch_sizes if self.cuda_graphs else self.batch_sizes[:1] or (1,)):
                self.runner(b, dt)(None)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return self

    def run(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Maps and scores of a batch already on the engine's device.

        Args:
            x: (B, C, H, W) uint8 (0..255) or float in [0, 1], on ``self.device``. The values are not checked
                here (the device-level call stays free of host syncs): :meth:`predict` refuses NaN/Inf and
                out-of-range float frames, :class:`~fae_fast.inference.stream.InlineStream` flags them.

        Returns:
            (map (B, 1, H, W) float32, score (B,) float32) on the device. With CUDA graphs and a batch that is
            exactly one captured size, these are the graph's static buffers: valid until the next call with that
            batch size (copy them to keep them).
        """
        self.check_batch(x)
        if x.device != self.device:
            raise ValueError(f"images are on {x.device}, the engine on {self.device}; use predict() for host input")
        if self._ort is not None:
            return self._ort(x)
        if not self.cuda_graphs:
            with torch.inference_mode():
                return self._fn(x)
        plan = plan_batches(x.shape[0], self.batch_sizes)
        if len(plan) == 1 and plan[0][1] == plan[0][2]:
            return self.runner(plan[0][2], x.dtype)(x)
        maps = torch.empty((x.shape[0], 1, *self.image_size), dtype=torch.float32, device=self.device)
        scores = torch.empty((x.shape[0],), dtype=torch.float32, device=self.device)
        for start, count, padded in plan:
            r = self.runner(padded, x.dtype)
            r.static_in[:count].copy_(x[start:start + count])
            m, s = r(None)
            maps[start:start + count].copy_(m[:count])
            scores[start:start + count].copy_(s[:count])
        return maps, scores

    # ------------------------------------------------------------------ user-level API
    def to_batch(self, images) -> tuple[torch.Tensor, str]:
        """Normalise user input to a (B, C, H, W) tensor; returns it and the input kind ("numpy" | "torch").

        Accepts torch (C, H, W) / (B, C, H, W), numpy (H, W), (H, W, C) or (B, H, W, C) (camera layout; kept as a
        zero-copy view, which is channels_last in NCHW terms), uint8 or float in [0, 1]. Grey (one channel) is
        replicated to the model's channels.
        """
        kind = "torch"
        if isinstance(images, np.ndarray):
            kind = "numpy"
            a = images
            if a.ndim == 2:
                a = a[None, :, :, None]
            elif a.ndim == 3:
                a = a[None]
            if a.ndim != 4:
                raise ValueError(f"numpy images must be (H, W), (H, W, C) or (B, H, W, C), got shape {images.shape}")
            if a.dtype not in (np.uint8, np.float32, np.float16):
                raise TypeError(f"numpy images have dtype {a.dtype}; expected uint8, float32 or float16")
            x = torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2)
        elif isinstance(images, torch.Tensor):
            x = images[None] if images.dim() == 3 else images
        else:
            raise TypeError(f"images must be a torch.Tensor or numpy array, got {type(images).__name__}")
        if x.dim() == 4 and x.shape[1] == 1 and self.in_channels != 1:
            x = x.expand(-1, self.in_channels, -1, -1)
        self.check_batch(x)
        return x, kind

    def _pinned_buffer(self, name: str, shape, dtype, channels_last=False) -> torch.Tensor:
        """A cached page-locked host buffer (async copies need pinned memory to overlap and to be fast)."""
        key = (name, tuple(shape), dtype, channels_last)
        buf = self._pinned.get(key)
        if buf is None:
            if channels_last:  # allocate NHWC and view it as NCHW: the channels_last layout, pinned
                B, C, H, W = shape
                buf = torch.empty((B, H, W, C), dtype=dtype, pin_memory=True).permute(0, 3, 1, 2)
            else:
                buf = torch.empty(shape, dtype=dtype, pin_memory=True)
            self._pinned[key] = buf
        return buf

    def _host_to_host(self, x: torch.Tensor, return_map: bool):
        """CPU batch -> CUDA -> CPU results through pinned buffers; the copies are asynchronous.

        A batch that fits one chunk syncs once, at the end; a batch split into several chunks syncs after every
        chunk (the pinned buffers of one padded size are reused by the next chunk, so they must be drained first).

        The EfficientAD latency protocol measures exactly this: the clock starts before the host->device copy and
        stops when the map is on the host.
        """
        B = x.shape[0]
        maps = torch.empty((B, 1, *self.image_size), dtype=torch.float32) if return_map else None
        scores = torch.empty((B,), dtype=torch.float32)
        plan = plan_batches(B, self.batch_sizes if self.cuda_graphs else None)
        pending = []
        for start, count, padded in plan:
            pin_in = self._pinned_buffer("in", (padded, *x.shape[1:]), x.dtype, channels_last=True)
            pin_in[:count].copy_(x[start:start + count])
            if self.cuda_graphs:
                r = self.runner(padded, x.dtype)
                r.static_in[:count].copy_(pin_in[:count], non_blocking=True)
                m, s = r(None)
            else:
                dev_in = pin_in[:count].to(self.device, non_blocking=True)
                with torch.inference_mode():
                    m, s = self._fn(dev_in)
            pin_s = self._pinned_buffer("score", (padded,), torch.float32)
            pin_s[:count].copy_(s[:count], non_blocking=True)
            pin_m = None
            if return_map:
                pin_m = self._pinned_buffer("map", (padded, 1, *self.image_size), torch.float32)
                pin_m[:count].copy_(m[:count], non_blocking=True)
            pending.append((start, count, pin_m, pin_s))
            if len(plan) > 1:  # the pinned buffers of one padded size are reused by the next chunk
                torch.cuda.current_stream(self.device).synchronize()
                self._collect(pending, maps, scores)
                pending = []
        torch.cuda.current_stream(self.device).synchronize()
        self._collect(pending, maps, scores)
        return maps, scores

    @staticmethod
    def _collect(pending, maps, scores):
        for start, count, pin_m, pin_s in pending:
            scores[start:start + count] = pin_s[:count]
            if maps is not None:
                maps[start:start + count] = pin_m[:count]

    def predict(self, images, *, image_threshold: float | None = None, pixel_threshold: float | None = None,
                return_map: bool = True) -> InferenceResult:
        """Score a batch: maps, scores, masks and labels.

        Args:
            images: see :meth:`to_batch`: torch (B, C, H, W) / (C, H, W) on any device, or numpy camera frames
                (B, H, W, C) / (H, W, C) / (H, W); uint8 or float in [0, 1].
            image_threshold, pixel_threshold: override the engine's thresholds for this call only.
            return_map: False drops ``anomaly_map`` from the result (less device->host traffic); ``pred_mask``
                is still computed when there is a pixel threshold.

        Returns:
            :class:`InferenceResult`; on the input's device for torch input (CPU input to a CUDA engine comes back
            on the CPU, through pinned buffers), numpy for numpy input. A NaN score or map pixel (a model that
            broke on that frame) is labelled anomalous (:func:`apply_thresholds`).

        Raises:
            ValueError: a float frame has NaN/Inf pixels or values outside [0, 1] (e.g. 0..255 not divided by
                255); the message names the first such frame. Nothing is scored then.
        """
        x, kind = self.to_batch(images)
        it, pt = self.resolve_thresholds(image_threshold, pixel_threshold)
        # float input only (uint8 cannot be out of range): a host pass for host input; for float input already on
        # the GPU one host sync per call, the price of raising before anything is returned
        check_float_images(x, "frame")
        need_map = return_map or pt is not None
        if x.device == self.device:
            m, s = self.run(x)
            m, s = m.clone(), s.clone()  # detach from the static graph buffers
        elif x.device.type == "cpu" and self.device.type == "cuda":
            m, s = self._host_to_host(x, need_map)
        else:
            m, s = self.run(x.to(self.device))
            m, s = m.to(x.device), s.to(x.device)
        amap = m[:, 0] if m is not None else None
        mask, label = apply_thresholds(amap, s, it, pt)  # amap is None only without a pixel threshold
        if not return_map:
            amap = None
        if kind == "numpy":
            conv = (lambda t: None if t is None else t.cpu().numpy())
            amap, s, mask, label = conv(amap), conv(s), conv(mask), conv(label)
        return InferenceResult(pred_score=s, anomaly_map=amap, pred_mask=mask, pred_label=label,
                               image_threshold=it, pixel_threshold=pt)

    __call__ = predict

    def reference_pipeline(self, model: nn.Module) -> nn.Module:
        """A plain eager fp32 pipeline of ``model`` (no folding, reference map) on this engine's settings, for
        parity checks and the honest baseline of the benchmark."""
        from .. import reference

        net = copy.deepcopy(model).eval().to(self.device)
        return _Pipeline(net, torch.float32, self.n, self.k, reference.anomaly_map,
                         normalizer=self.normalizer, error=self.error, frame_scale=self.frame_scale).eval()

    def __repr__(self) -> str:
        return (f"Engine(image_size={self.image_size}, frame_scale={self.frame_scale}, n={self.n}, k={self.k}, "
                f"error={self.error!r}, "
                f"dtype={self.dtype}, "
                f"device={self.device}, backend={self.backend!r}, threads={self.threads}, "
                f"compile={self.compile_mode}, cuda_graphs={self.cuda_graphs}, batch_sizes={self.batch_sizes}, "
                f"map_backend={self.map_backend!r}, thresholds={self.thresholds})")
