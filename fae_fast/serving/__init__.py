"""Serving the :class:`~fae_fast.inference.Engine` through NVIDIA Triton Inference Server.

Two ways, both with Triton's dynamic batching (many cameras send single frames, Triton merges them into batches):

* ``fae-fast serve --model M.fae`` (:mod:`.server`): the engine itself behind a Triton server started by PyTriton
  (``pip install 'fae_fast[serve]'``; PyTriton ships the server binary). Inputs: a uint8 frame batch
  (B, H, W, C) and optional per-request thresholds; outputs: ``pred_score``, ``pred_label``, ``anomaly_map``,
  ``pred_mask`` and ``error`` (the tensor contract: :mod:`.schema`). :class:`.client.FaeClient` is a small
  gRPC/HTTP client that turns the outputs back into a :class:`~fae_fast.api.Prediction` and every failure into one
  clear exception;
* ``fae-fast export --triton-repo DIR`` (:mod:`.triton_repo`): a Triton model repository (the ONNX scoring graph +
  ``config.pbtxt``) for plants that run their own Triton with the ONNX Runtime or TensorRT backend. Needs onnx and
  onnxscript, not PyTriton.

Nothing here is imported by ``import fae_fast``; importing this package imports neither PyTriton nor tritonclient
(each module loads what it needs on use, and :mod:`.server` / :mod:`.client` fail with one line naming the extra).

Example:
    >>> from fae_fast.inference import Engine                                # doctest: +SKIP
    >>> from fae_fast.serving import FaeTritonServer, FaeClient              # doctest: +SKIP
    >>> with FaeTritonServer(Engine.from_model_file("m.fae"), grpc_port=8001) as srv:   # doctest: +SKIP
    ...     res = FaeClient("127.0.0.1:8001").predict(frames_uint8)          # doctest: +SKIP
"""
from __future__ import annotations

__all__ = ["FaeTritonServer", "FaeClient", "ServingError", "QueueFull", "RequestFailed", "export_triton_repo"]

_WHERE = {"FaeTritonServer": "server", "FaeClient": "client", "ServingError": "client", "QueueFull": "client",
          "RequestFailed": "client", "export_triton_repo": "triton_repo"}


def __getattr__(name):
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module 'fae_fast.serving' has no attribute {name!r}")
