"""High-FPS inference: the :class:`Engine` (folded, bf16, compiled, CUDA-graph-captured FAE scoring on a GPU; the
exported graph in ONNX Runtime on the CPU, :mod:`fae_fast.inference.ort`), the :class:`InlineStream` a camera
loop feeds frame by frame, the throughput benchmark (``fae-fast bench``, :mod:`fae_fast.inference.bench`) and the
exporters (:mod:`fae_fast.inference.export`: ONNX, AOTInductor).

Importing this package needs no GPU, no Triton and no onnx: each part loads what it needs on use.

Example:
    >>> from fae_fast.inference import Engine, InlineStream       # doctest: +SKIP
    >>> eng = Engine.from_model_file("model.pt")                   # doctest: +SKIP
    >>> eng.predict(frames).pred_score                             # doctest: +SKIP
"""
from .engine import Engine, InferenceResult, apply_thresholds, plan_batches
from .stream import FrameError, FrameResult, InlineStream, QueueFull, StreamClosed

__all__ = ["Engine", "InferenceResult", "apply_thresholds", "plan_batches", "InlineStream", "FrameResult",
           "FrameError", "QueueFull", "StreamClosed", "export_onnx", "export_aoti", "load_aoti", "ReferenceGraph"]


def __getattr__(name):  # the exporters import onnx / inductor machinery only when asked for
    if name in ("export_onnx", "export_aoti", "load_aoti", "ReferenceGraph"):
        from . import export

        return getattr(export, name)
    raise AttributeError(f"module 'fae_fast.inference' has no attribute {name!r}")
