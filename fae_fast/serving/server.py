"""``fae-fast serve``: the :class:`~fae_fast.inference.Engine` behind NVIDIA Triton Inference Server (PyTriton).

PyTriton (``pip install 'fae_fast[serve]'``, nvidia-pytriton 0.7.0) starts the Triton server binary it ships and
binds one Python function to a model: Triton receives the requests (gRPC or HTTP), queues them, merges them into
batches (dynamic batching: up to ``max_batch`` frames, waiting at most ``max_queue_delay_us`` for more) and hands
each batch to :meth:`FaeTritonServer._infer`, which runs the engine once on all of it. The tensor contract is in
:mod:`fae_fast.serving.schema`.

Failures, each one explicit:

* a frame of the wrong size, channels or dtype: Triton itself refuses that request (the model's input dims are
  fixed), before it is queued, so it never meets a batch;
* a request Triton accepts but the model cannot judge (a NaN or infinite threshold sent with it): that request
  alone comes back with its ``error`` output set and fail-safe values (labelled anomalous, NaN score); its
  batch-mates are scored as usual (:mod:`fae_fast.serving.schema`);
* a full queue (``max_queue_size`` requests waiting): Triton rejects the new request at once with "Exceeds maximum
  queue size" (:class:`fae_fast.serving.client.QueueFull` in the client); nothing is dropped silently;
* :meth:`FaeTritonServer.stop` with requests in flight: the running batch finishes and is answered; the server
  then stops, and every other request gets an error (connection closed or "server is stopping"), never silence;
* the engine raising on a batch: every request of that batch gets Triton's error with the reason.

With a pyenv-built Python (shared libpython outside the system's library path), Triton's Python-backend stub would
load the system's ``libpython3.11`` and crash (``'_thread.RLock' object has no attribute '_recursion_count'``);
:func:`python_libdir_first` puts the running interpreter's library folder first on ``LD_LIBRARY_PATH`` before the
server starts (the server inherits this process's environment), so ``fae-fast serve`` works without setup.
"""
from __future__ import annotations

import logging
import os
import signal
import sysconfig
import threading
from collections import Counter

import numpy as np

try:
    from pytriton.model_config import DynamicBatcher, ModelConfig, QueuePolicy, Tensor
    from pytriton.triton import Triton, TritonConfig
except ImportError as exc:  # the message names the fix; the cause (e.g. numpy 2 with PyTriton 0.7) follows
    raise ImportError(f"fae_fast.serving.server needs PyTriton: pip install 'fae_fast[serve]' (nvidia-pytriton "
                      f"0.7.0, numpy<2; scripts/serve_env.sh builds such an environment) (import pytriton failed: "
                      f"{exc})") from exc

from ..api import above
from ..scoring import check_threshold
from . import schema

__all__ = ["FaeTritonServer", "python_libdir_first"]

LOG = logging.getLogger("fae_fast.serving")


def python_libdir_first(environ=os.environ) -> str | None:
    """Put this interpreter's shared-library folder first on ``LD_LIBRARY_PATH`` (in ``environ``, default the
    process environment that the Triton server inherits); returns the folder, or None for a Python without a
    shared libpython (nothing to do then)."""
    libdir = sysconfig.get_config_var("LIBDIR")
    lib = sysconfig.get_config_var("LDLIBRARY")
    if not (sysconfig.get_config_var("Py_ENABLE_SHARED") and libdir and lib
            and os.path.exists(os.path.join(libdir, lib))):
        return None
    parts = [p for p in environ.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p and p != libdir]
    environ["LD_LIBRARY_PATH"] = os.pathsep.join([libdir, *parts])
    return libdir


def _failed(rows: int, image_size, message: str) -> dict:
    """The fail-safe outputs of a request that cannot be judged: anomalous, NaN score and map, the reason."""
    H, W = image_size
    return {schema.PRED_SCORE: np.full((rows, 1), np.nan, np.float32),
            schema.PRED_LABEL: np.ones((rows, 1), np.bool_),
            schema.ANOMALY_MAP: np.full((rows, H, W), np.nan, np.float32),
            schema.PRED_MASK: np.ones((rows, H, W), np.bool_),
            schema.ERROR: np.full((rows, 1), message.encode("utf-8", "replace"), dtype=object)}


class FaeTritonServer:
    """One engine served by a Triton server (PyTriton) with dynamic batching.

    Args:
        engine: the :class:`~fae_fast.inference.Engine` (it must have image and pixel thresholds: a model file
            written by ``fae-fast train`` has both). Used from one thread (Triton runs one batch at a time).
        name: the Triton model name clients address.
        address: interface the HTTP and gRPC endpoints bind to ("127.0.0.1": this machine only; "0.0.0.0": all).
        http_port, grpc_port: endpoint ports (None: that endpoint off).
        metrics_port: Triton's Prometheus metrics port (None: metrics off).
        max_batch: the largest batch Triton hands the engine (frames, summed over the merged requests).
        max_queue_delay_us: how long Triton may hold a request to merge it with later ones (microseconds).
        max_queue_size: requests waiting beyond this are rejected at once ("Exceeds maximum queue size");
            0: unbounded (not recommended: a stalled engine then grows the queue for ever).
        exit_timeout_s: on stop, how long Triton waits for the running batch before it gives up.

    Example:
        >>> srv = FaeTritonServer(Engine.from_model_file("m.fae"), grpc_port=8001).start()   # doctest: +SKIP
        >>> srv.stop()                                                                       # doctest: +SKIP
    """

    def __init__(self, engine, *, name: str = "fae", address: str = "127.0.0.1", http_port: int | None = 8000,
                 grpc_port: int | None = 8001, metrics_port: int | None = None, max_batch: int = 16,
                 max_queue_delay_us: int = 500, max_queue_size: int = 64, exit_timeout_s: int = 10):
        th = engine.thresholds
        missing = [k for k in ("image", "pixel") if th.get(k) is None]
        if missing:
            raise ValueError(f"the engine has no {' and no '.join(missing)} threshold: a served frame could not be "
                             "labelled (train or calibrate the model file, or set them with engine.set_thresholds)")
        for value, what in ((max_batch, "max_batch"), (exit_timeout_s, "exit_timeout_s")):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{what} must be an int >= 1, got {value!r}")
        for value, what in ((max_queue_delay_us, "max_queue_delay_us"), (max_queue_size, "max_queue_size")):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{what} must be an int >= 0, got {value!r}")
        for value, what in ((http_port, "http_port"), (grpc_port, "grpc_port"), (metrics_port, "metrics_port")):
            if value is not None and not (isinstance(value, int) and 1 <= value <= 65535):
                raise ValueError(f"{what} must be a port number 1..65535 or None, got {value!r}")
        if http_port is None and grpc_port is None:
            raise ValueError("http_port and grpc_port are both None: the server would have no endpoint")
        self.engine = engine
        self.name = name
        self.address = address
        self.http_port, self.grpc_port, self.metrics_port = http_port, grpc_port, metrics_port
        self.max_batch, self.max_queue_delay_us, self.max_queue_size = max_batch, max_queue_delay_us, max_queue_size
        self.exit_timeout_s = exit_timeout_s
        self.image_size = tuple(int(v) for v in engine.image_size)
        self.channels = int(engine.in_channels)
        self.batches: Counter[tuple[int, int]] = Counter()  # (requests, frames) of every batch run
        self._lock = threading.Lock()
        self._triton: Triton | None = None

    # ------------------------------------------------------------------ the inference function
    def _check(self, request) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(frames (n, H, W, C) uint8, image thresholds (n,), pixel thresholds (n,)) of one request, or raise
        ValueError/TypeError naming what is wrong with it."""
        frames = request[schema.FRAMES]
        want = (*self.image_size, self.channels)
        if frames.dtype != np.uint8:
            raise TypeError(f"'{schema.FRAMES}' has dtype {frames.dtype}; expected uint8")
        if frames.ndim != 4 or tuple(frames.shape[1:]) != want or frames.shape[0] < 1:
            raise ValueError(f"'{schema.FRAMES}' must have shape (B, {want[0]}, {want[1]}, {want[2]}), got "
                             f"{tuple(frames.shape)}")
        n = frames.shape[0]
        th = []
        for name, default in ((schema.IMAGE_THRESHOLD, self.engine.thresholds["image"]),
                              (schema.PIXEL_THRESHOLD, self.engine.thresholds["pixel"])):
            if name not in request.keys():
                th.append(np.full((n,), default, np.float32))
                continue
            t = np.asarray(request[name])
            if t.size != n:
                raise ValueError(f"'{name}' has {t.size} values for {n} frames")
            t = t.reshape(n).astype(np.float32)
            for v in t:
                check_threshold(float(v), name)  # NaN would pass every frame, inf flag none: refused
            th.append(t)
        return frames, th[0], th[1]

    @staticmethod
    def _rows(request) -> int:
        shape = np.shape(request.data.get(schema.FRAMES, ()))
        return int(shape[0]) if len(shape) >= 1 and shape[0] >= 1 else 1

    def _infer(self, requests) -> list[dict]:
        """One Triton batch: a list of requests (each with its own frames and thresholds) -> one output dict per
        request. Requests are checked one by one; the valid ones are scored by one engine call."""
        out: list[dict | None] = [None] * len(requests)
        good = []
        for i, req in enumerate(requests):
            try:
                good.append((i, *self._check(req)))
            except (TypeError, ValueError) as exc:
                out[i] = _failed(self._rows(req), self.image_size, f"request not judged: {exc}")
        frames_total = 0
        if good:
            x = good[0][1] if len(good) == 1 else np.concatenate([g[1] for g in good])
            frames_total = x.shape[0]
            res = self.engine.predict(x, return_map=True)  # numpy in -> numpy out; an exception fails the batch
            score, amap = np.asarray(res.pred_score, np.float32), np.asarray(res.anomaly_map, np.float32)
            start = 0
            for i, frames, it, pt in good:
                n = frames.shape[0]
                s, m = score[start:start + n], amap[start:start + n]
                start += n
                out[i] = {schema.PRED_SCORE: s[:, None], schema.PRED_LABEL: above(s, it)[:, None],
                          schema.ANOMALY_MAP: m, schema.PRED_MASK: above(m, pt[:, None, None]),
                          schema.ERROR: np.full((n, 1), b"", dtype=object)}
        with self._lock:
            self.batches[(len(requests), frames_total)] += 1
        return out

    # ------------------------------------------------------------------ lifecycle
    def _bind(self, triton: Triton) -> None:
        ins = [Tensor(name=n, dtype=dt, shape=dims, optional=opt)
               for n, dt, dims, opt in schema.inputs(self.image_size, self.channels)]
        outs = [Tensor(name=n, dtype=(bytes if dt is np.bytes_ else dt), shape=dims)
                for n, dt, dims in schema.outputs(self.image_size)]
        policy = QueuePolicy(max_queue_size=self.max_queue_size)
        batcher = DynamicBatcher(max_queue_delay_microseconds=self.max_queue_delay_us, default_queue_policy=policy)
        triton.bind(model_name=self.name, infer_func=self._infer, inputs=ins, outputs=outs,
                    config=ModelConfig(batching=True, max_batch_size=self.max_batch, batcher=batcher), strict=True)

    def start(self) -> "FaeTritonServer":
        """Start the Triton server and load the model; returns once it serves (a few seconds)."""
        if self._triton is not None:
            raise RuntimeError("the server is already started")
        python_libdir_first()
        cfg = TritonConfig(http_address=self.address, grpc_address=self.address, metrics_address=self.address,
                           allow_http=self.http_port is not None, http_port=self.http_port,
                           allow_grpc=self.grpc_port is not None, grpc_port=self.grpc_port,
                           allow_metrics=self.metrics_port is not None, metrics_port=self.metrics_port,
                           exit_timeout_secs=self.exit_timeout_s)
        triton = Triton(config=cfg)
        try:
            self._bind(triton)
            triton.run()
        except BaseException:
            triton.stop()
            raise
        self._triton = triton
        return self

    def serve(self) -> None:
        """Start (if not yet) and block until SIGINT (Ctrl-C) or SIGTERM, then stop."""
        if self._triton is None:
            self.start()

        def _term(signum, frame):
            raise KeyboardInterrupt
        old = signal.signal(signal.SIGTERM, _term) if threading.current_thread() is threading.main_thread() else None
        try:
            self._triton.serve()  # returns on KeyboardInterrupt or when the server died
        except KeyboardInterrupt:
            pass
        finally:
            if old is not None:
                signal.signal(signal.SIGTERM, old)
            self.stop()

    def stop(self) -> None:
        """Stop the server: the running batch is answered, every other pending request gets an error."""
        triton, self._triton = self._triton, None
        if triton is not None:
            triton.stop()

    @property
    def running(self) -> bool:
        return self._triton is not None and self._triton.is_alive()

    def __enter__(self) -> "FaeTritonServer":
        return self.start() if self._triton is None else self

    def __exit__(self, *exc) -> None:
        self.stop()
