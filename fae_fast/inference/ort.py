"""The CPU backend of the :class:`~fae_fast.inference.Engine`: the exported scoring graph run by ONNX Runtime.

On the CPU the fastest way to run the FAE is not PyTorch: ONNX Runtime on the graph of
:func:`fae_fast.inference.export.export_onnx` (network + error map + n box-filter passes + max, uint8 input
normalised inside the graph): on a 2-core x86 VM (tiny preset, 256x256 uint8, batch 1) the engine ran 3.7x plain
eager PyTorch, 2.8x its own PyTorch backend and 1.2x plain ONNX Runtime on the same model (the session options
below; issue 13, ``bench/results/cpu_engine_2core-vm.json``). This module holds:

* :func:`onnx_model`: the ONNX bytes of a :class:`~fae_fast.inference.export.ReferenceGraph`, exported once per
  (weights, structure, image size, input dtype) and cached in memory (the torch.export-based exporter takes
  1-6 s; an engine built again for the same model reuses the bytes);
* :func:`session_options`: the ONNX Runtime settings the engine uses, chosen by measurement;
* :class:`OrtRunner`: uint8 or float (B, C, H, W) torch batch -> (map (B, 1, H, W), score (B,)) float32 torch
  tensors, one lazily built session per input dtype.

Nothing here is imported by ``import fae_fast``; onnxruntime and onnxscript (the exporter's dependency) are
optional (``pip install fae-fast[cpu]``).
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
import tempfile
import threading
import warnings
from collections import OrderedDict

import torch
import torch.nn as nn

__all__ = ["available", "missing", "model_fingerprint", "onnx_model", "session_options", "OrtRunner"]

_CACHE: OrderedDict[tuple, bytes] = OrderedDict()
_CACHE_SIZE = 8  # exports kept in memory (a tiny-preset graph is ~3.5 MB, the default preset ~100 MB)
_LOCK = threading.Lock()  # one export at a time (the exporter is not re-entrant), and a consistent cache


def missing() -> list[str]:
    """The packages the ONNX Runtime backend needs that are not installed (empty: it can run)."""
    return [name for name in ("onnxruntime", "onnxscript") if importlib.util.find_spec(name) is None]


def available() -> bool:
    """True when onnxruntime and the ONNX exporter's dependency (onnxscript) are installed (nothing imported)."""
    return not missing()


def model_fingerprint(model: nn.Module) -> str:
    """A hash of what an export of ``model`` depends on: each submodule's class and plain attributes (e.g. a
    U-Net's ``residual`` flag) and every parameter and buffer (name, shape, dtype, bytes)."""
    h = hashlib.blake2b(digest_size=20)
    for name, mod in model.named_modules():
        attrs = sorted((k, repr(v)) for k, v in vars(mod).items()
                       if not k.startswith("_") and isinstance(v, (bool, int, float, str, tuple, type(None))))
        h.update(repr((name, type(mod).__module__, type(mod).__qualname__, attrs)).encode())
    for name, t in model.state_dict(keep_vars=False).items():
        t = t.detach().cpu().contiguous()
        h.update(repr((name, tuple(t.shape), str(t.dtype))).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@contextlib.contextmanager
def _quiet_exporter():
    """Silence the exporter's per-export "torchvision is not installed. Skipping torchvision::nms" warnings (an
    engine exports as a side effect; the four lines say nothing about the FAE graph)."""
    log = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        # torch's own exporter internals raise deprecation warnings about its pytree API (torch 2.13: "isinstance(
        # treespec, LeafSpec) is deprecated"): nothing a user of the engine can act on
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        log.setLevel(level)


def onnx_model(graph: nn.Module, *, image_size, in_channels: int, input_dtype: str) -> bytes:
    """The ONNX bytes of ``graph`` (a :class:`~fae_fast.inference.export.ReferenceGraph`), exported with
    :func:`~fae_fast.inference.export.export_onnx` (dynamic batch) on the first request and cached in memory.

    Args:
        graph: the reference graph (its ``n``/``k`` are part of its fingerprint).
        image_size: (H, W) fixed in the graph.
        in_channels: C of the input.
        input_dtype: "uint8" (``x / 255`` inside the graph) or "float32" (input in [0, 1]).
    """
    from .export import export_onnx

    key = (model_fingerprint(graph), tuple(int(v) for v in image_size), int(in_channels), str(input_dtype))
    with _LOCK:
        data = _CACHE.get(key)
        if data is None:
            with tempfile.TemporaryDirectory(prefix="fae_fast_onnx_") as tmp, _quiet_exporter():
                path = os.path.join(tmp, "graph.onnx")
                export_onnx(graph, path, image_size=image_size, input_dtype=input_dtype, in_channels=in_channels,
                            verbose=False)
                with open(path, "rb") as f:
                    data = f.read()
            _CACHE[key] = data
            while len(_CACHE) > _CACHE_SIZE:
                _CACHE.popitem(last=False)
        else:
            _CACHE.move_to_end(key)
        return data


def session_options(threads: int | None = None):
    """The engine's ONNX Runtime session options.

    Chosen by measurement (tiny preset, 256x256 uint8, batch 1, 2-core AMD EPYC VM shared with training jobs,
    median ms per call, sessions timed one after another in 3 rounds, onnxruntime 1.32):

    * ``session.intra_op.allow_spinning = 0``: 62 ms vs 99 ms spinning (ORT's default) at 2 threads. Spinning
      worker threads burn the cores that the other thread of the same op (or another process) needs; on a
      machine with other load (an inspection PC also runs acquisition and a GUI) that costs more than the
      wake-up latency it saves;
    * graph optimisation ``ORT_ENABLE_ALL`` (the default; NCHWc convolutions): 99 ms vs 143 ms with EXTENDED;
    * execution mode sequential (the default): 99 ms vs 156 ms with ``ORT_PARALLEL`` (the graph is a chain);
    * memory arena on (the default): 99 ms vs 92 ms off, inside the noise, so left on;
    * ``intra_op_num_threads``: ``threads`` (None: ORT's default, one per physical core).

    Args:
        threads: intra-op threads (None: ORT's default).
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    if threads is not None:
        so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return so


class OrtRunner:
    """ONNX Runtime sessions of one reference graph: ``runner(x) -> (map (B, 1, H, W), score (B,))``.

    Args:
        graph: the :class:`~fae_fast.inference.export.ReferenceGraph` to run (exported lazily, cached).
        image_size: (H, W) of the frames.
        in_channels: C of the frames.
        threads: ONNX Runtime intra-op threads (None: its default).

    uint8 input runs the uint8 graph (``x / 255`` inside it); float16/bfloat16/float32 input in [0, 1] is
    converted to float32 (exact) and runs the float32 graph, exported on the first float call. Both return
    float32 torch tensors on the CPU that share memory with ONNX Runtime's output arrays (no copy).
    """

    def __init__(self, graph: nn.Module, *, image_size, in_channels: int, threads: int | None = None):
        self.graph = graph
        self.image_size = tuple(int(v) for v in image_size)
        self.in_channels = int(in_channels)
        self.threads = threads
        self._sessions: dict[str, object] = {}

    def session(self, input_dtype: str = "uint8"):
        """The (lazily exported and built) ONNX Runtime session for ``input_dtype`` ("uint8" | "float32")."""
        s = self._sessions.get(input_dtype)
        if s is None:
            import onnxruntime as ort

            data = onnx_model(self.graph, image_size=self.image_size, in_channels=self.in_channels,
                              input_dtype=input_dtype)
            s = ort.InferenceSession(data, session_options(self.threads), providers=["CPUExecutionProvider"])
            self._sessions[input_dtype] = s
        return s

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Maps and scores of a CPU batch (B, C, H, W), uint8 or float in [0, 1] (any memory layout)."""
        if x.dtype == torch.uint8:
            kind, a = "uint8", x.detach().contiguous().numpy()
        else:
            kind, a = "float32", x.detach().to(torch.float32).contiguous().numpy()
        amap, score = self.session(kind).run(["anomaly_map", "pred_score"], {"images": a})
        return torch.from_numpy(amap), torch.from_numpy(score)
