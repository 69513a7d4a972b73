"""Inline streaming inference: a camera loop feeds frames, results come back per frame and in order.

:class:`InlineStream` sits between a frame source and an :class:`~fae_fast.inference.engine.Engine`:

* **opportunistic batching**: a worker takes every frame already queued (up to ``max_batch``) and waits for more
  only while the oldest queued frame is younger than ``max_delay_ms`` -- at low rates frames run alone (lowest
  latency), under load batches fill up (highest throughput), and no frame waits longer than the budget for
  companions;
* **overlap on CUDA**: each batch goes through a ring of ``depth`` slots with pinned host buffers; the
  host->device copy, the compute (the engine's CUDA graph) and the device->host copy run on three CUDA streams
  ordered by events, so batch i+1 is uploaded while batch i computes and batch i-1 downloads. On the CPU the
  same API runs without streams;
* **explicit back-pressure**: at most ``capacity`` frames may be submitted and not yet delivered. When full,
  :meth:`InlineStream.submit` blocks (``on_full="block"``; with ``timeout`` it raises :class:`QueueFull` when the
  time is up) or raises :class:`QueueFull` at once (``on_full="raise"``). A frame is never dropped silently.
  A blocked submit only ever waits for someone who can make room: a reader on *another* thread, or the engine.
  The thread that submits is never made to wait for results that only it could take (the single-thread loop
  below: submit, then poll): when no other live thread reads from the stream, submit waits only until fewer
  than ``capacity`` frames are queued or being scored, and results that are ready stay in the outbox for its
  next :meth:`~InlineStream.poll` -- it cannot deadlock;
* **errors per frame**: a bad frame (wrong shape or dtype) or a failing batch becomes a :class:`FrameError` at
  that frame's position in the output (its message names the frame index); the worker threads live on;
* **fail safe**: a frame that cannot be judged is answered as anomalous, never as good: a float32 frame with
  NaN/Inf pixels or values outside [0, 1] (e.g. 0..255 not divided by 255), or a frame whose score comes out
  NaN/Inf (a model that broke on it), gets ``pred_score = inf``, ``pred_label = True``, an all-True
  ``pred_mask`` and a ``reason`` (its index and what was wrong) -- at its position, like every result, so the
  camera loop rejects that part and goes on. A NaN map pixel is always in ``pred_mask``. (``Engine.predict`` and
  ``Detector.predict`` raise ValueError instead: they can refuse a call, a stream must answer every frame.)
  The input check is one (min, max) reduction per batch on the engine's device, copied back with the scores: no
  extra host sync; uint8 frames (the camera default) cannot be out of range and are not checked;
* **clean shutdown**: :meth:`InlineStream.close` processes every pending frame before it returns; their results
  stay available through :meth:`get` / :meth:`poll` / iteration (or have been passed to ``on_result``).

Example:
    >>> eng = Engine.from_model_file("model.pt")                                  # doctest: +SKIP
    >>> with InlineStream(eng, max_batch=16, max_delay_ms=1.0) as stream:         # doctest: +SKIP
    ...     for frame in camera:                     # (H, W, 3) uint8 numpy
    ...         stream.submit(frame)
    ...         for r in stream.poll():              # ready results, in submission order
    ...             handle(r.index, r.pred_score, r.pred_mask)
    >>> for r in stream:                                                           # doctest: +SKIP
    ...     handle(r.index, r.pred_score, r.pred_mask)    # the frames flushed by close()
"""
from __future__ import annotations

import collections
import math
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from ..api import above, value_problem
from .engine import Engine, plan_batches

__all__ = ["InlineStream", "FrameResult", "FrameError", "QueueFull", "StreamClosed"]


class QueueFull(RuntimeError):
    """The stream holds ``capacity`` undelivered frames (raised at once, or after ``timeout``)."""


class StreamClosed(RuntimeError):
    """The stream is closed: no more submissions, or no more results to get."""


class FrameError(RuntimeError):
    """A frame could not be scored; ``index`` is its submission index and ``__cause__`` the original error."""

    def __init__(self, index: int, message: str):
        super().__init__(message)
        self.index = index


@dataclass
class FrameResult:
    """The result of one frame.

    Attributes:
        index: submission index (0, 1, 2, ... in the order of :meth:`InlineStream.submit`).
        pred_score: image score (max of the smoothed error map).
        pred_label: ``pred_score > image_threshold`` (None without an image threshold); True for a frame with a
            ``reason``, with or without a threshold.
        pred_mask: (H, W) bool ``anomaly_map > pixel_threshold``, NaN pixels included (None without a pixel
            threshold); all True for a frame with a ``reason``.
        anomaly_map: (H, W) float32 smoothed error map, when the stream was made with ``return_map=True``.
        latency_ms: from the submit call to the result being ready on the host.
        batch_size: number of frames in the batch this frame ran in.
        error: the :class:`FrameError` of a failed frame (``get`` / ``poll`` / iteration raise it instead of
            returning the result; ``on_result`` receives the result with this set).
        reason: why the frame was judged anomalous without a usable score (NaN/Inf or out-of-range pixels, a
            non-finite score), naming its index; None for a normally scored frame. Such a frame has
            ``pred_score = inf`` and ``pred_label = True``: it is delivered like any result, never as "good".
    """

    index: int
    pred_score: float | None = None
    pred_label: bool | None = None
    pred_mask: np.ndarray | None = None
    anomaly_map: np.ndarray | None = None
    latency_ms: float = 0.0
    batch_size: int = 0
    error: FrameError | None = None
    reason: str | None = None


class _Item:
    __slots__ = ("index", "frame", "error", "t_submit")

    def __init__(self, index, frame, error, t_submit):
        self.index, self.frame, self.error, self.t_submit = index, frame, error, t_submit


class _Slot:
    """Pinned host and device buffers of one in-flight batch (CUDA only), plus the events that order them."""

    def __init__(self, max_batch, H, W, C, np_dtype, device, want_map, want_mask):
        tdtype = torch.from_numpy(np.zeros(1, dtype=np_dtype)).dtype
        want_range = tdtype.is_floating_point  # per-frame (min, max) of float input, for the fail-safe check
        self.pin_in = torch.empty((max_batch, H, W, C), dtype=tdtype, pin_memory=True)
        self.pin_in_np = self.pin_in.numpy()
        self.dev_in = torch.empty((max_batch, H, W, C), dtype=tdtype, device=device)
        self.dev_score = torch.empty((max_batch,), dtype=torch.float32, device=device)
        self.pin_score = torch.empty((max_batch,), dtype=torch.float32, pin_memory=True)
        self.dev_map = torch.empty((max_batch, H, W), dtype=torch.float32, device=device) if want_map else None
        self.pin_map = torch.empty((max_batch, H, W), dtype=torch.float32, pin_memory=True) if want_map else None
        self.dev_mask = torch.empty((max_batch, H, W), dtype=torch.bool, device=device) if want_mask else None
        self.pin_mask = torch.empty((max_batch, H, W), dtype=torch.bool, pin_memory=True) if want_mask else None
        self.dev_range = torch.empty((2, max_batch), dtype=torch.float32, device=device) if want_range else None
        self.pin_range = torch.empty((2, max_batch), dtype=torch.float32, pin_memory=True) if want_range else None
        self.h2d_done = torch.cuda.Event()
        self.compute_done = torch.cuda.Event()
        self.d2h_done = torch.cuda.Event()


class _Record:
    """One launched batch on its way to the completer: items in order, and where their outputs are."""

    __slots__ = ("items", "good", "slot", "score", "map", "mask", "range", "image_t", "pixel_t", "error")

    def __init__(self, items, good):
        self.items, self.good = items, good
        self.slot = self.score = self.map = self.mask = self.range = None
        self.image_t = self.pixel_t = None
        self.error = None


class InlineStream:
    """Frame-by-frame (or burst) scoring with opportunistic batching, overlap, back-pressure and ordered results.

    Args:
        engine: the :class:`Engine` to run (the stream's worker becomes its only user).
        max_batch: most frames per batch. On CUDA, give the engine ``batch_sizes`` that cover 1..max_batch
            (e.g. ``(1, 2, 4, 8, 16)``) so partial batches are padded little.
        max_delay_ms: longest time the oldest queued frame waits for companions before its batch starts
            (0: never wait; batches form only from frames already queued).
        capacity: most frames submitted and not yet delivered (back-pressure bound, >= 1).
        on_full: "block" (wait for room; ``timeout`` of :meth:`submit` bounds the wait) or "raise". A blocked
            submit waits for a reader on another thread when there is one, otherwise only for the engine (so a
            single thread that submits and polls never deadlocks; see the module docstring).
        return_map: put the (H, W) float32 map into each result (otherwise only score, label and mask are copied
            back to the host: 1 byte per pixel instead of 4).
        image_threshold, pixel_threshold: override the engine's thresholds for this stream
            (:meth:`set_thresholds` changes them for later batches).
        on_result: optional callback ``fn(FrameResult)``, called in order from the completer thread; results
            then do not queue up for :meth:`get`. An exception in it is re-raised by :meth:`close`.
        depth: in-flight batches on CUDA (slots of pinned buffers; 3 = upload, compute, download at once).
        input_dtype: numpy dtype of the frames (uint8 camera frames by default; float32 in [0, 1] allowed).
        copy_frames: copy each frame at :meth:`submit` (default), so the caller may reuse its buffer at once.
    """

    def __init__(self, engine: Engine, *, max_batch: int = 16, max_delay_ms: float = 1.0, capacity: int = 64,
                 on_full: str = "block", return_map: bool = False, image_threshold: float | None = None,
                 pixel_threshold: float | None = None, on_result: Callable[[FrameResult], Any] | None = None,
                 depth: int = 3, input_dtype=np.uint8, copy_frames: bool = True):
        if not isinstance(engine, Engine):
            raise TypeError(f"engine must be a fae_fast Engine, got {type(engine).__name__}")
        for name, v, lo in (("max_batch", max_batch, 1), ("capacity", capacity, 1), ("depth", depth, 1)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
        if not max_delay_ms >= 0:
            raise ValueError(f"max_delay_ms must be >= 0, got {max_delay_ms!r}")
        if on_full not in ("block", "raise"):
            raise ValueError(f"on_full must be 'block' or 'raise', got {on_full!r}")
        self.input_dtype = np.dtype(input_dtype)
        if self.input_dtype not in (np.dtype(np.uint8), np.dtype(np.float32)):
            raise ValueError(f"input_dtype must be uint8 or float32, got {self.input_dtype}")
        self.engine = engine
        self.max_batch, self.capacity, self.on_full = max_batch, capacity, on_full
        self.max_delay = float(max_delay_ms) / 1e3
        self.return_map, self.on_result, self.copy_frames = bool(return_map), on_result, bool(copy_frames)
        self._image_t, self._pixel_t = engine.resolve_thresholds(image_threshold, pixel_threshold)
        H, W = engine.image_size
        self._hwc = (H, W, engine.in_channels)

        self._cond = threading.Condition()
        self._inbox: collections.deque[_Item] = collections.deque()
        self._outbox: collections.deque[FrameResult] = collections.deque()
        self._next_index = 0
        self._outstanding = 0      # submitted, not yet delivered (the back-pressure count)
        self._completed = 0        # results produced (delivered or waiting in the outbox)
        self._closing = False
        self._readers: set[threading.Thread] = set()  # threads that took results (get / poll / iteration)
        self._callback_errors: list[BaseException] = []
        self.stats = {"batches": 0, "frames": 0, "batch_sizes": collections.Counter()}

        self._cuda = engine.device.type == "cuda"
        if self._cuda:
            dev = engine.device
            if engine.cuda_graphs:
                # capture every graph a batch of 1..max_batch can need now, on this thread, before the workers
                # start: a capture later, on the launcher thread, would stall the pipeline for seconds
                tdt = torch.from_numpy(np.zeros(1, dtype=self.input_dtype)).dtype
                for size in sorted({p for b in range(1, max_batch + 1)
                                    for _, _, p in plan_batches(b, engine.batch_sizes)}):
                    engine.runner(size, tdt)
            want_mask = True  # allocate always: a later set_thresholds may add a pixel threshold
            self._slots: queue.Queue[_Slot] = queue.Queue()
            for _ in range(depth):
                self._slots.put(_Slot(max_batch, H, W, engine.in_channels, self.input_dtype, dev, self.return_map,
                                      want_mask))
            self._h2d = torch.cuda.Stream(dev)
            self._compute = torch.cuda.Stream(dev)
            self._d2h = torch.cuda.Stream(dev)
        self._done_q: queue.Queue[_Record | None] = queue.Queue()
        self._launcher = threading.Thread(target=self._launch_loop, name="fae-stream-launch", daemon=True)
        self._completer = threading.Thread(target=self._complete_loop, name="fae-stream-complete", daemon=True)
        self._launcher.start()
        self._completer.start()

    # ------------------------------------------------------------------ producer side
    def set_thresholds(self, image: float | None = None, pixel: float | None = None) -> None:
        """Change the thresholds for batches launched from now on (None leaves one unchanged)."""
        it, pt = self.engine.resolve_thresholds(image, pixel)
        with self._cond:
            if image is not None:
                self._image_t = it
            if pixel is not None:
                self._pixel_t = pt

    def _prepare(self, frame):
        """(H, W, C) numpy view (or copy) of a frame; raises ValueError/TypeError (the caller adds the index)."""
        H, W, C = self._hwc
        if isinstance(frame, torch.Tensor):
            if frame.device.type != "cpu":
                raise ValueError(f"the stream takes host frames, got a tensor on {frame.device}")
            t = frame.detach()
            if t.dim() == 3:  # torch convention (C, H, W)
                t = t.permute(1, 2, 0)
            a = t.numpy()
        elif isinstance(frame, np.ndarray):
            a = frame
        else:
            raise TypeError(f"expected a numpy array or torch tensor, got {type(frame).__name__}")
        if a.dtype != self.input_dtype:
            raise TypeError(f"dtype {a.dtype}, this stream takes {self.input_dtype}")
        if a.ndim == 2:
            a = a[:, :, None]
        if a.ndim != 3 or a.shape[:2] != (H, W) or a.shape[2] not in (1, C):
            raise ValueError(f"shape {tuple(frame.shape)}, expected ({H}, {W}, {C}) or ({H}, {W}) (numpy) / "
                             f"({C}, {H}, {W}) (torch)")
        if a.shape[2] != C:
            if self.copy_frames:  # a real copy: broadcast_to would be a view of the caller's buffer
                a = np.repeat(a, C, axis=2)
            else:
                a = np.broadcast_to(a, (H, W, C))  # grey: replicated when the batch is stacked
        elif self.copy_frames:
            a = np.array(a, copy=True)
        return a

    def submit(self, frame, *, timeout: float | None = None) -> int:
        """Queue one frame; returns its index (results come back in index order).

        Args:
            frame: numpy (H, W, C) / (H, W) or torch (C, H, W) / (H, W) on the CPU, of the stream's dtype.
                A frame of the wrong shape or dtype is accepted and comes back as a :class:`FrameError`
                at its position, so the order and the count of results always match the submissions.
            timeout: with ``on_full="block"``, the longest wait for room, in seconds (None: no limit). When no
                other live thread has read from the stream, the wait ends as soon as fewer than ``capacity``
                frames are queued or being scored: results that only this thread can take never block it.

        Raises:
            QueueFull: no room (``on_full="raise"``), or none within ``timeout``.
            StreamClosed: after :meth:`close`.
        """
        t0 = time.perf_counter()
        if self._closing:
            raise StreamClosed("submit() after close()")
        try:
            prepared, bad = self._prepare(frame), None
        except (TypeError, ValueError) as exc:
            prepared, bad = None, exc
        with self._cond:
            if self._outstanding >= self.capacity:
                if self.on_full == "raise":
                    raise QueueFull(f"stream full: {self._outstanding} frames submitted and not yet delivered "
                                    f"(capacity {self.capacity}); read results with poll()/get()")
                deadline = None if timeout is None else t0 + timeout
                while not self._room_locked() and not self._closing:
                    rem = None if deadline is None else deadline - time.perf_counter()
                    if rem is not None and rem <= 0:
                        raise QueueFull(f"stream still full after {timeout} s: {self._outstanding} frames "
                                        f"undelivered (capacity {self.capacity}); read results with poll()/get()")
                    self._cond.wait(rem)
            if self._closing:
                raise StreamClosed("submit() after close()")
            index = self._next_index
            err = None
            if bad is not None:
                err = FrameError(index, f"frame {index}: {bad}")
                err.__cause__ = bad
            self._next_index += 1
            self._outstanding += 1
            self._inbox.append(_Item(index, prepared, err, t0))
            self._cond.notify_all()
        return index

    def _add_reader(self) -> None:
        """Remember the calling thread as a reader (the caller holds ``self._cond``)."""
        me = threading.current_thread()
        if me not in self._readers:
            self._readers = {t for t in self._readers if t.is_alive()}
            self._readers.add(me)

    def _room_locked(self) -> bool:
        """Whether a blocked submit may go on (the caller holds ``self._cond``)."""
        if self._outstanding < self.capacity:
            return True
        me = threading.current_thread()
        if any(t is not me and t.is_alive() for t in self._readers):
            return False  # another thread reads: it makes room, wait for it
        # nobody but this thread can take the ready results: waiting for them would wait for ever (the
        # single-thread submit-then-poll loop). Wait only for the engine: frames queued or being scored.
        return self._outstanding - len(self._outbox) < self.capacity

    def submit_many(self, frames, *, timeout: float | None = None) -> list[int]:
        """Submit a burst (an iterable of frames, or a (B, H, W, C) numpy array); returns their indices."""
        return [self.submit(f, timeout=timeout) for f in frames]

    # ------------------------------------------------------------------ consumer side
    def _pop_locked(self) -> FrameResult:
        r = self._outbox.popleft()
        self._outstanding -= 1
        self._cond.notify_all()
        return r

    def get(self, timeout: float | None = None) -> FrameResult:
        """The next result in submission order, waiting up to ``timeout`` seconds (None: no limit).

        Raises:
            FrameError: that frame failed (the stream goes on: the next call returns the next frame).
            TimeoutError: nothing ready within ``timeout``.
            StreamClosed: the stream is closed and every result has been delivered.
        """
        deadline = None if timeout is None else time.perf_counter() + timeout
        with self._cond:
            self._add_reader()
            while not self._outbox:
                if self._closing and self._completed == self._next_index:
                    raise StreamClosed("stream closed and every result delivered")
                rem = None if deadline is None else deadline - time.perf_counter()
                if rem is not None and rem <= 0:
                    raise TimeoutError(f"no result within {timeout} s")
                self._cond.wait(rem)
            r = self._pop_locked()
        if r.error is not None:
            raise r.error
        return r

    def poll(self) -> list[FrameResult]:
        """Every result ready now, in order, without waiting; stops before a failed frame, and raises its
        :class:`FrameError` when the failed frame is first."""
        out = []
        with self._cond:
            self._add_reader()
            while self._outbox:
                if self._outbox[0].error is not None:
                    if out:
                        break
                    raise self._pop_locked().error
                out.append(self._pop_locked())
        return out

    def __iter__(self):
        """Results in order until the stream is closed and drained (raises FrameError for failed frames)."""
        while True:
            try:
                yield self.get()
            except StreamClosed:
                return

    def pending(self) -> int:
        """Frames submitted whose result has not been delivered yet."""
        with self._cond:
            return self._outstanding

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every frame submitted so far has a result (delivered or ready)."""
        deadline = None if timeout is None else time.perf_counter() + timeout
        with self._cond:
            target = self._next_index
            self._cond.notify_all()
            while self._completed < target:
                rem = None if deadline is None else deadline - time.perf_counter()
                if rem is not None and rem <= 0:
                    raise TimeoutError(f"flush: {target - self._completed} frames still pending after {timeout} s")
                self._cond.wait(rem)

    def close(self, timeout: float | None = None) -> None:
        """Stop accepting frames, process every pending one, stop the threads.

        Results of the flushed frames remain available through :meth:`get` / :meth:`poll` / iteration (or were
        passed to ``on_result``). Re-raises the first exception of ``on_result``, if any.
        """
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._launcher.join(timeout)
        self._completer.join(timeout)
        if self._launcher.is_alive() or self._completer.is_alive():
            raise TimeoutError(f"close: the stream's threads did not finish within {timeout} s")
        if self._callback_errors:
            raise RuntimeError("on_result raised") from self._callback_errors[0]

    def __enter__(self) -> "InlineStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ worker: batching and launching
    def _next_batch(self) -> list[_Item] | None:
        with self._cond:
            while not self._inbox and not self._closing:
                self._cond.wait()
            if not self._inbox:
                return None  # closing and drained
            # opportunistic: wait for companions only while the oldest frame is within its delay budget
            deadline = self._inbox[0].t_submit + self.max_delay
            while len(self._inbox) < self.max_batch and not self._closing:
                rem = deadline - time.perf_counter()
                if rem <= 0:
                    break
                self._cond.wait(rem)
            items = [self._inbox.popleft() for _ in range(min(self.max_batch, len(self._inbox)))]
            image_t, pixel_t = self._image_t, self._pixel_t
        rec = _Record(items, [it for it in items if it.error is None])
        rec.image_t, rec.pixel_t = image_t, pixel_t
        return rec

    def _launch_loop(self) -> None:
        while True:
            rec = self._next_batch()
            if rec is None:
                break
            if rec.good:
                try:
                    with torch.inference_mode():
                        (self._launch_cuda if self._cuda else self._launch_cpu)(rec)
                except BaseException as exc:  # noqa: BLE001 -- any failure belongs to this batch's frames only
                    rec.error = exc
            self._done_q.put(rec)
        self._done_q.put(None)

    def _stack(self, frames, out=None) -> np.ndarray:
        return np.stack(frames, axis=0, out=out)

    @staticmethod
    def _frame_range(x_nhwc: torch.Tensor, out: torch.Tensor) -> None:
        """(min, max) of each frame of a contiguous (b, H, W, C) float batch into ``out`` (2, b); NaN propagates."""
        b = x_nhwc.shape[0]
        torch.aminmax(x_nhwc.view(b, -1), dim=1, out=(out[0], out[1]))

    def _launch_cpu(self, rec: _Record) -> None:
        b = len(rec.good)
        xs = torch.from_numpy(self._stack([it.frame for it in rec.good]))
        if xs.dtype.is_floating_point:
            rec.range = torch.empty((2, b), dtype=torch.float32)
            self._frame_range(xs, rec.range)
        x = xs.permute(0, 3, 1, 2)
        m, s = self.engine.run(x)
        m = m[:, 0]
        rec.score = s.float().clone()
        if rec.pixel_t is not None:
            rec.mask = above(m, rec.pixel_t)
        if self.return_map:
            rec.map = m.clone()
        self._count(b)

    def _launch_cuda(self, rec: _Record) -> None:
        b = len(rec.good)
        slot = self._slots.get()  # blocks while `depth` batches are in flight
        rec.slot = slot
        self._stack([it.frame for it in rec.good], out=slot.pin_in_np[:b])
        with torch.cuda.stream(self._h2d):
            slot.dev_in[:b].copy_(slot.pin_in[:b], non_blocking=True)
            slot.h2d_done.record(self._h2d)
        with torch.cuda.stream(self._compute):
            self._compute.wait_event(slot.h2d_done)
            if slot.dev_range is not None:  # float input: one reduction, copied back with the scores (no sync)
                self._frame_range(slot.dev_in[:b], slot.dev_range[:, :b])
            x = slot.dev_in[:b].permute(0, 3, 1, 2)  # (b, C, H, W) channels_last view, no copy
            m, s = self.engine.run(x)
            slot.dev_score[:b].copy_(s[:b])
            if rec.pixel_t is not None:  # above(): `not (m <= t)`, so NaN pixels are in the mask
                torch.le(m[:b, 0], rec.pixel_t, out=slot.dev_mask[:b])
                slot.dev_mask[:b].logical_not_()
            if self.return_map:
                slot.dev_map[:b].copy_(m[:b, 0])
            slot.compute_done.record(self._compute)
        with torch.cuda.stream(self._d2h):
            self._d2h.wait_event(slot.compute_done)
            slot.pin_score[:b].copy_(slot.dev_score[:b], non_blocking=True)
            if rec.pixel_t is not None:
                slot.pin_mask[:b].copy_(slot.dev_mask[:b], non_blocking=True)
            if self.return_map:
                slot.pin_map[:b].copy_(slot.dev_map[:b], non_blocking=True)
            if slot.dev_range is not None:
                slot.pin_range[:, :b].copy_(slot.dev_range[:, :b], non_blocking=True)
            slot.d2h_done.record(self._d2h)
        rec.score = slot.pin_score
        rec.range = slot.pin_range
        rec.mask = slot.pin_mask if rec.pixel_t is not None else None
        rec.map = slot.pin_map if self.return_map else None
        self._count(b)

    def _count(self, b: int) -> None:
        self.stats["batches"] += 1
        self.stats["frames"] += b
        self.stats["batch_sizes"][b] += 1

    # ------------------------------------------------------------------ worker: completion, in order
    def _complete_loop(self) -> None:
        while True:
            rec = self._done_q.get()
            if rec is None:
                break
            try:
                results = self._results(rec)
            except BaseException as exc:  # noqa: BLE001 -- never leave a frame without a result
                results = []
                for it in rec.items:
                    err = FrameError(it.index, f"frame {it.index}: collecting its result failed: {exc!r}")
                    err.__cause__ = exc
                    results.append(FrameResult(index=it.index, error=err))
            for r in results:
                self._deliver(r)

    def _results(self, rec: _Record) -> list[FrameResult]:
        try:
            if rec.error is None and rec.slot is not None:
                rec.slot.d2h_done.synchronize()  # releases the GIL while the copies finish
            if rec.error is None and rec.good:
                scores = rec.score[:len(rec.good)].tolist()
                masks = rec.mask[:len(rec.good)].numpy() if rec.mask is not None else None
                maps = rec.map[:len(rec.good)].numpy() if rec.map is not None else None
                lows, highs = rec.range[:, :len(rec.good)].tolist() if rec.range is not None else (None, None)
        except BaseException as exc:  # noqa: BLE001 -- e.g. a CUDA error surfacing at the sync
            rec.error = exc
        now = time.perf_counter()
        out, j = [], 0
        indices = [it.index for it in rec.good]
        for it in rec.items:
            lat = (now - it.t_submit) * 1e3
            if it.error is not None:
                out.append(FrameResult(index=it.index, latency_ms=lat, error=it.error))
                continue
            if rec.error is not None:
                err = FrameError(it.index, f"frame {it.index}: its batch (frames {indices}) failed: "
                                           f"{type(rec.error).__name__}: {rec.error}")
                err.__cause__ = rec.error
                out.append(FrameResult(index=it.index, latency_ms=lat, batch_size=len(rec.good), error=err))
            else:
                sc = scores[j]
                reason = self._reason(it.index, sc, lows[j] if lows is not None else None,
                                      highs[j] if highs is not None else None)
                mask = masks[j].copy() if masks is not None else None
                if reason is not None:  # fail safe: cannot be judged, so anomalous (never "good")
                    label, sc = True, math.inf
                    if mask is not None:
                        mask[:] = True
                else:
                    label = (sc > rec.image_t) if rec.image_t is not None else None
                out.append(FrameResult(
                    index=it.index, pred_score=sc, pred_label=label, pred_mask=mask,
                    anomaly_map=maps[j].copy() if maps is not None else None,
                    latency_ms=lat, batch_size=len(rec.good), reason=reason))
            j += 1
        if rec.slot is not None:  # host copies taken: the slot may take the next batch
            if rec.error is not None:
                try:  # a failed launch may have left copies queued on the slot's buffers: let them finish
                    torch.cuda.synchronize(self.engine.device)
                except BaseException:  # noqa: BLE001 -- a sticky CUDA error is reported per frame already
                    pass
            self._slots.put(rec.slot)
        return out

    @staticmethod
    def _reason(index: int, score: float, lo: float | None, hi: float | None) -> str | None:
        """Why frame ``index`` cannot be judged (its input's value range ``[lo, hi]``, its score), or None."""
        problem = value_problem(lo, hi) if lo is not None else None
        if problem is not None:
            return f"frame {index} {problem}"
        if not math.isfinite(score):
            return f"frame {index}: the model's score is {score} (NaN/Inf in its anomaly map)"
        return None

    def _deliver(self, r: FrameResult) -> None:
        if self.on_result is not None:
            try:
                self.on_result(r)
            except BaseException as exc:  # noqa: BLE001 -- the worker must outlive a faulty callback
                self._callback_errors.append(exc)
            with self._cond:
                self._completed += 1
                self._outstanding -= 1
                self._cond.notify_all()
        else:
            with self._cond:
                self._outbox.append(r)
                self._completed += 1
                self._cond.notify_all()
