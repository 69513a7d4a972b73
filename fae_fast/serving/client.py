"""A small client of ``fae-fast serve`` (tritonclient, gRPC or HTTP): frames in, a Prediction out.

Any Triton client works (the tensor contract is :mod:`fae_fast.serving.schema`); this one adds the checks a camera
loop needs: every failure is one exception with a clear message, never a result that looks good.

* :class:`QueueFull`: the server's queue held ``--max-queue-size`` requests and refused this one (retry later or
  add capacity);
* :class:`RequestFailed`: the server answered but could not judge the frames (a wrong shape or dtype, a NaN
  threshold, the engine failing on the batch); the message is the server's;
* :class:`ServingError` (the base class): anything else, e.g. the server is stopping or unreachable.

Example:
    >>> from fae_fast.serving.client import FaeClient                   # doctest: +SKIP
    >>> client = FaeClient("127.0.0.1:8001")                            # gRPC (the default protocol)
    >>> res = client.predict(frames_uint8)                              # (B, H, W, C) or (H, W, C)
    >>> res.pred_score, res.pred_label, res.anomaly_map.shape           # (B,), (B,), (B, H, W)
    >>> client.predict(frame, image_threshold=0.02)                     # per-request override
"""
from __future__ import annotations

import numpy as np

from ..api import Prediction
from . import schema

__all__ = ["FaeClient", "ServingError", "QueueFull", "RequestFailed"]


class ServingError(RuntimeError):
    """A request to the server failed; ``str()`` says why."""


class QueueFull(ServingError):
    """The server's queue was full (its ``--max-queue-size``): the request was rejected, not queued."""


class RequestFailed(ServingError):
    """The server could not judge the request's frames; the message is the server's reason."""


class FaeClient:
    """Client of one served FAE model.

    Args:
        url: "host:port" of the gRPC (default) or HTTP endpoint.
        model: the served model's name (``fae-fast serve --name``, default "fae").
        protocol: "grpc" or "http".
        timeout_s: per-request timeout (None: none; gRPC and HTTP).

    One client per thread (tritonclient's clients are not shared across threads here); processes make their own.
    """

    def __init__(self, url: str, model: str = "fae", *, protocol: str = "grpc", timeout_s: float | None = 60.0):
        if protocol == "grpc":
            try:
                import tritonclient.grpc as tc
            except ImportError as exc:
                raise ImportError(f"FaeClient needs tritonclient: pip install 'tritonclient[grpc,http]' (or "
                                  f"'fae_fast[serve]'): {exc}") from exc
            self._client = tc.InferenceServerClient(url)
        elif protocol == "http":
            try:
                import tritonclient.http as tc
            except ImportError as exc:
                raise ImportError(f"FaeClient needs tritonclient: pip install 'tritonclient[grpc,http]' (or "
                                  f"'fae_fast[serve]'): {exc}") from exc
            self._client = tc.InferenceServerClient(url, network_timeout=timeout_s or 60.0)
        else:
            raise ValueError(f"protocol must be 'grpc' or 'http', got {protocol!r}")
        from tritonclient.utils import InferenceServerException

        self._tc, self._exc = tc, InferenceServerException
        self.url, self.model, self.protocol, self.timeout_s = url, model, protocol, timeout_s

    def _input(self, name: str, array: np.ndarray):
        dtype = {np.uint8: "UINT8", np.float32: "FP32"}[array.dtype.type]
        t = self._tc.InferInput(name, list(array.shape), dtype)
        t.set_data_from_numpy(array)
        return t

    def infer_raw(self, frames: np.ndarray, image_threshold=None, pixel_threshold=None) -> dict[str, np.ndarray]:
        """The server's output arrays (per :mod:`fae_fast.serving.schema`) for a (B, H, W, C) frame batch as it is
        (no checks here: the server's own); raises :class:`QueueFull` / :class:`ServingError`."""
        frames = np.asarray(frames)
        n = frames.shape[0] if frames.ndim else 1
        inputs = [self._input(schema.FRAMES, frames)]
        for name, value in ((schema.IMAGE_THRESHOLD, image_threshold), (schema.PIXEL_THRESHOLD, pixel_threshold)):
            if value is not None:
                inputs.append(self._input(name, np.broadcast_to(np.asarray(value, np.float32).reshape(-1, 1),
                                                                (n, 1)).copy()))
        outputs = [self._tc.InferRequestedOutput(name) for name in schema.OUTPUTS]
        kw = {"client_timeout": self.timeout_s} if self.protocol == "grpc" else {}
        try:
            res = self._client.infer(self.model, inputs, outputs=outputs, **kw)
        except self._exc as exc:
            msg = exc.message() if callable(getattr(exc, "message", None)) else str(exc)
            if "maximum queue size" in str(msg):
                raise QueueFull(f"{self.url}: the server's queue is full (its --max-queue-size): request rejected, "
                                f"not queued; retry later or add capacity (Triton: {msg})") from None
            status = str(exc.status() if callable(getattr(exc, "status", None)) else "")
            if status in ("StatusCode.INVALID_ARGUMENT", "400"):  # Triton checked the inputs against the model
                raise RequestFailed(f"{self.url}: the server refused the request: {msg}") from None
            raise ServingError(f"{self.url}: request failed: {msg}") from None
        except (OSError, ConnectionError) as exc:
            raise ServingError(f"{self.url}: request failed: {exc}") from None
        return {name: res.as_numpy(name) for name in schema.OUTPUTS}

    def predict(self, frames, *, image_threshold: float | None = None,
                pixel_threshold: float | None = None) -> Prediction:
        """Score frames on the server.

        Args:
            frames: uint8 numpy (B, H, W, C) or one frame (H, W, C), the served model's size.
            image_threshold, pixel_threshold: override the model's thresholds for this request.

        Returns:
            :class:`~fae_fast.api.Prediction` of numpy arrays: ``pred_score`` (B,), ``pred_label`` (B,),
            ``anomaly_map`` (B, H, W), ``pred_mask`` (B, H, W); ``image_threshold``/``pixel_threshold`` as sent
            (None: the model's).

        Raises:
            QueueFull: the server's queue was full.
            RequestFailed: the server refused or could not judge the frames (reason in the message).
            ServingError: any other failure (server stopping, unreachable, timed out).
        """
        a = np.asarray(frames)
        if a.ndim == 3:
            a = a[None]
        out = self.infer_raw(np.ascontiguousarray(a), image_threshold, pixel_threshold)
        errors = [e.decode("utf-8", "replace") if isinstance(e, bytes) else str(e) for e in out[schema.ERROR].ravel()]
        bad = [e for e in errors if e]
        if bad:
            raise RequestFailed(f"{self.url}: {bad[0]}")
        return Prediction(pred_score=out[schema.PRED_SCORE].reshape(-1), pred_label=out[schema.PRED_LABEL].reshape(-1),
                          anomaly_map=out[schema.ANOMALY_MAP], pred_mask=out[schema.PRED_MASK],
                          image_threshold=image_threshold, pixel_threshold=pixel_threshold)

    def ready(self) -> bool:
        """True when the server is up and the model is ready."""
        try:
            return bool(self._client.is_server_ready() and self._client.is_model_ready(self.model))
        except Exception:  # noqa: BLE001 -- unreachable counts as not ready
            return False

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> "FaeClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
