"""Fast loaders: files or camera frames -> ``(B, 3, H, W)`` batches already on the device.

Backends (``backend=``):

* ``"dali"``: NVIDIA DALI (:mod:`fae_fast.data.dali`). On a GPU, JPEGs are decoded on the GPU
  (``device="mixed"``); without a GPU, DALI's CPU-only mode (``device_id=None``).
* ``"cv2"``: ``cv2.imdecode`` + :func:`fae_fast.data.io.resize_image` on a thread pool (cv2 releases the GIL),
  decoded ahead of the consumer, copied to the device from pinned memory.
* ``"auto"`` (default): for a CUDA device, DALI when it imports (and its pipeline builds), cv2 otherwise; for
  the CPU, cv2 (DALI's CPU-only mode measured about 2x slower there; ``backend="dali"`` still selects it). The
  choice is logged once per process (logger ``fae_fast.data.loader``: INFO, or WARNING when a GPU run falls
  back to cv2 because DALI is missing).

Both follow the rules of :mod:`fae_fast.data.io` (RGB, alpha dropped, 16-bit scaled, stretch or keep_aspect with
reflect padding); their outputs agree within resize tolerance (DALI's antialiased resize vs cv2's
``INTER_AREA``: mean absolute difference measured 0.4-0.6 / 255 on textured test images and on BSData photos,
~11 / 255 on pure noise, where a triangle filter and a box filter disagree most; see ``tests/test_dali.py``).
Float outputs are ``uint8 / 255`` in ``[0, 1]``.

Bad files: before the first batch each file gets a cheap check (size > 0, known header bytes, JPEG end-of-image
after the last scan, PNG ``IEND``; a file failing it is confirmed with a real cv2 decode so that odd-but-valid
files pass). ``on_error="raise"`` raises ``ValueError`` naming the first bad file; ``on_error="skip"`` leaves it
out and records ``(path, reason)`` in ``Loader.skipped`` (logged). A file that passes the check but fails inside
DALI is found by decoding the failing batch's files with cv2, then raised or skipped the same way, and the
pipeline is rebuilt for the files after it: every good file is emitted exactly once, in order, never repeated.
With skips during iteration an epoch can hold fewer batches than ``len()`` said, never silently.

Example:
    >>> loader = make_loader("line3/today", size=(256, 256), batch_size=64, dtype=torch.float16)  # doctest: +SKIP
    >>> for batch in loader:                                                                      # doctest: +SKIP
    ...     scores = model(batch.images)          # (64, 3, 256, 256) fp16 on cuda; batch.names: list[str]
    >>> fs = FrameSource((256, 256), device="cuda")                                               # doctest: +SKIP
    >>> x = fs.process(frames)                    # list of HxWx3 uint8 frames -> (B, 3, 256, 256) on cuda
"""
from __future__ import annotations

import collections
import concurrent.futures as cf
import dataclasses
import logging
import os
import pathlib
from typing import Sequence, Union

import numpy as np
import torch

from .datasets import default_workers, load_images, parallel_map
from .io import (_check_on_error, check_image_size, check_image_file, fit_inside, list_images, read_image,
                 resize_image)

__all__ = ["Batch", "Loader", "FrameSource", "make_loader", "load_images_on_device", "resolve_backend"]

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

_DTYPES = (torch.uint8, torch.float16, torch.bfloat16, torch.float32)
_logged: set = set()


def _log_once(key, level: int, msg: str, *args) -> None:
    if key not in _logged:
        _logged.add(key)
        log.log(level, msg, *args)


# ----------------------------------------------------------------------------------------------------------------
# choices


def _resolve_device(device) -> torch.device:
    if device is None or (isinstance(device, str) and device == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} asked but CUDA is not available")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    elif dev.type != "cpu":
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:i]', got {device!r}")
    return dev


def resolve_backend(backend: str, device: torch.device, what: str = "loader") -> str:
    """``"dali"`` or ``"cv2"`` for ``backend`` in ``("auto", "dali", "cv2")``; "auto" is logged once."""
    from .dali import dali_status

    if backend not in ("auto", "dali", "cv2"):
        raise ValueError(f"backend must be 'auto', 'dali' or 'cv2', got {backend!r}")
    if backend == "cv2":
        return "cv2"
    ok, why = dali_status()
    if backend == "dali":
        if not ok:
            raise RuntimeError(f"backend='dali' asked but {why}")
        return "dali"
    if device.type != "cuda":
        # DALI's CPU-only mode decodes with the same libjpeg-turbo but was about 2x slower than the cv2 threads
        # (26-37 vs 52-62 img/s, 1130x460 JPEG -> 256x256, 2 shared cores): it stays available as backend="dali"
        _log_once((what, "cv2", "cpu"), logging.INFO, "fae_fast %s: backend auto -> cv2 threads on the CPU "
                  "(backend='dali' forces DALI's CPU-only mode; %s)", what, why)
        return "cv2"
    if ok:
        _log_once((what, "dali", "cuda"), logging.INFO, "fae_fast %s: backend auto -> dali, GPU decode (%s)",
                  what, why)
        return "dali"
    _log_once((what, "cv2", "cuda"), logging.WARNING, "fae_fast %s: backend auto -> cv2 threads for a CUDA "
              "device: %s", what, why)
    return "cv2"


# ----------------------------------------------------------------------------------------------------------------
# shared post-processing on the device


def _reflect_rows(n_out: int, offset: torch.Tensor, n_in: torch.Tensor) -> torch.Tensor:
    """Batched :func:`fae_fast.data.io.reflect_indices`: ``(B, n_out)`` int64 source indices."""
    i = torch.arange(n_out, device=offset.device, dtype=torch.int64)[None, :] - offset[:, None]
    n = n_in[:, None]
    period = torch.clamp(2 * (n - 1), min=1)
    i = torch.remainder(i, period)  # non-negative: sign of the divisor
    return torch.where(i >= n, period - i, i)


def _reflect_pad(x: torch.Tensor, hw: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """``x (B, H, W, C)`` with each image's content at the top-left, of size ``hw (B, 2)`` -> centred and
    reflect-101 padded to ``(H, W)`` like :func:`fae_fast.data.io.resize_image` (one gather, no per-image loop)."""
    hw = hw.to(device=x.device, dtype=torch.int64)
    nh, nw = hw[:, 0], hw[:, 1]
    rows = _reflect_rows(H, (H - nh) // 2, nh)
    cols = _reflect_rows(W, (W - nw) // 2, nw)
    b = torch.arange(x.shape[0], device=x.device)[:, None, None]
    return x[b, rows[:, :, None], cols[:, None, :]]


def _finish(x: torch.Tensor, dtype: torch.dtype, channels_last: bool) -> torch.Tensor:
    """``uint8 (B, H, W, 3)`` -> ``(B, 3, H, W)`` of ``dtype`` (floats are ``/ 255``), NCHW or channels_last."""
    x = x.permute(0, 3, 1, 2)  # a channels_last view: free
    if dtype != torch.uint8:
        x = (x.to(torch.float32) * (1.0 / 255.0)).to(dtype)
    return x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


# ----------------------------------------------------------------------------------------------------------------
# file loader


@dataclasses.dataclass
class Batch:
    """One batch of a :class:`Loader`.

    Attributes:
        images: ``(B, 3, H, W)`` uint8 (or float in ``[0, 1]``) on the loader's device; the last batch of an
            epoch may be shorter.
        names: ``list[str]`` of length B, the file of each image (as given or as listed).
    """

    images: torch.Tensor
    names: list[str]


class Loader:
    """Iterable of :class:`Batch` over a fixed list of image files; build it with :func:`make_loader`.

    Attributes:
        files: the files that will be emitted (after checks and skips), in order.
        skipped: ``list[tuple[pathlib.Path, str]]`` of files left out with ``on_error="skip"``.
        backend: ``"dali"`` or ``"cv2"``. device: the output device.
    """

    def __init__(self, files: Sequence[pathlib.Path], size, batch_size: int, device: torch.device, backend: str,
                 dtype: torch.dtype, keep_aspect: bool, on_error: str, num_threads: int, channels_last: bool,
                 skipped=(), prefetch: int = 2, auto: bool = False):
        self.files = list(files)
        self.size = size
        self.batch_size = batch_size
        self.device = device
        self.backend = backend
        self.dtype = dtype
        self.keep_aspect = keep_aspect
        self.on_error = on_error
        self.num_threads = num_threads
        self.channels_last = channels_last
        self.skipped: list[tuple[pathlib.Path, str]] = list(skipped)
        self.prefetch = max(1, int(prefetch))
        self._auto = auto
        self._pipe = None  # DALI pipeline positioned at the start of an epoch of self.files, or None

    def __len__(self) -> int:
        return -(-len(self.files) // self.batch_size)

    def __repr__(self) -> str:
        return (f"Loader({len(self.files)} files, size={self.size}, batch_size={self.batch_size}, "
                f"backend={self.backend!r}, device={str(self.device)!r}, dtype={self.dtype}, "
                f"keep_aspect={self.keep_aspect}, skipped={len(self.skipped)})")

    def __iter__(self):
        if self.backend == "dali":
            return self._iter_dali()
        return self._iter_cv2()

    # -- bookkeeping

    def _skip(self, path: pathlib.Path, reason: str) -> None:
        self.skipped.append((path, reason))
        log.warning("fae_fast loader: skipped %s (%s)", path, reason)

    def _emit(self, host: np.ndarray | torch.Tensor, names: list[str], hw=None) -> Batch:
        x = torch.from_numpy(host) if isinstance(host, np.ndarray) else host
        if x.device != self.device:
            x = x.to(self.device, non_blocking=x.is_pinned())
        if hw is not None:
            x = _reflect_pad(x, hw, *self.size)
        return Batch(_finish(x, self.dtype, self.channels_last), names)

    # -- cv2 threads

    def _stack(self, imgs: list[np.ndarray]) -> torch.Tensor:
        # for a GPU, stack straight into pinned memory: one host copy, and the upload can be asynchronous (the
        # caching host allocator recycles the block only after the copy has completed)
        pin = self.device.type == "cuda"
        out = torch.empty((len(imgs), *imgs[0].shape), dtype=torch.uint8, pin_memory=pin)
        np.stack(imgs, out=out.numpy())
        return out

    def _decode(self, path: pathlib.Path) -> np.ndarray:
        return read_image(path, self.size, self.keep_aspect)

    def _iter_cv2(self):
        B, files = self.batch_size, self.files
        ahead = (self.prefetch + 1) * B
        ex = cf.ThreadPoolExecutor(self.num_threads, thread_name_prefix="fae_fast_cv2")
        window: collections.deque = collections.deque()
        kept: list[pathlib.Path] = []
        nxt = 0
        try:
            imgs, names = [], []
            while nxt < len(files) or window:
                while nxt < len(files) and len(window) < ahead:
                    window.append((files[nxt], ex.submit(self._decode, files[nxt])))
                    nxt += 1
                path, fut = window.popleft()
                try:
                    img = fut.result()
                except (ValueError, OSError) as e:
                    if self.on_error == "raise":
                        raise
                    self._skip(path, str(e))
                    continue
                kept.append(path)
                imgs.append(img)
                names.append(str(path))
                if len(imgs) == B:
                    yield self._emit(self._stack(imgs), names)
                    imgs, names = [], []
            if imgs:
                yield self._emit(self._stack(imgs), names)
            self.files = kept  # a skip during the epoch is not retried in the next one
        finally:
            ex.shutdown(wait=False, cancel_futures=True)

    # -- DALI

    def _build(self, files):
        from .dali import files_pipeline

        device_id = self.device.index if self.device.type == "cuda" else None
        return files_pipeline([str(f) for f in files], self.size, self.batch_size, self.num_threads, device_id,
                              self.keep_aspect, prefetch=self.prefetch)

    def _find_bad(self, files, start: int, err: Exception):
        """Decodes files from ``start`` with cv2 (the batch that failed and the ones DALI had prefetched, then the
        rest) and returns the first ``(index, reason)`` that fails, or None."""
        B = self.batch_size
        stop = min(len(files), start + (self.prefetch + 2) * B)
        for lo, hi in ((start, stop), (stop, len(files))):
            def _check(i):
                try:
                    read_image(files[i])
                except (ValueError, OSError) as e:
                    return i, str(e)
                return None
            found = [r for r in parallel_map(_check, range(lo, hi), self.num_threads) if r is not None]
            if found:
                return found[0]
        return None

    def _iter_dali(self):
        from .dali import to_torch

        B = self.batch_size
        files = list(self.files)
        start, clean = 0, True
        while start < len(files):
            pipe, self._pipe = self._pipe, None  # whoever leaves early leaves no positioned pipeline behind
            if pipe is None or start > 0:
                try:
                    pipe = self._build(files[start:])
                except Exception as e:  # not about files (they were checked): DALI itself cannot run here
                    if not self._auto:
                        raise
                    _log_once(("loader", "dali-build-failed"), logging.WARNING,
                              "fae_fast loader: DALI pipeline failed to build (%s); falling back to cv2", e)
                    self.backend = "cv2"
                    self.files = files
                    yield from self._iter_cv2()
                    return
            n = len(files) - start
            nb = -(-n // B)
            k = 0
            failed = None
            while k < nb:
                try:
                    outs = pipe.run()
                    x = to_torch(outs[0], self.device)
                except Exception as e:  # DALI raises RuntimeError/IndexError...; the pipeline is now invalid
                    failed = e
                    break
                labels = np.asarray(outs[1].as_tensor()).reshape(-1)
                count = min(B, n - k * B)
                expect = np.arange(k * B, k * B + count)
                if not np.array_equal(labels[:count], expect):  # order is our contract: check, never assume
                    raise RuntimeError(f"DALI reader order broken: got {labels[:count]}, expected {expect}")
                hw = None
                if self.keep_aspect:
                    hw = torch.from_numpy(np.asarray(outs[2].as_tensor())[:count].copy())
                names = [str(files[start + i]) for i in expect]
                yield self._emit(x[:count], names, hw)
                k += 1
            if failed is None:
                if start == 0 and clean:
                    self._pipe = pipe  # padded epoch boundary: it is at the start of the next epoch
                break
            del pipe
            clean = False
            at = start + k * B
            bad = self._find_bad(files, at, failed)
            if bad is None:
                raise RuntimeError(f"DALI failed on a batch starting at {files[at]} but cv2 decodes every file "
                                   f"from there; use backend='cv2'. DALI said: {failed}") from failed
            i, reason = bad
            if self.on_error == "raise":
                raise ValueError(f"{reason}") from failed
            self._skip(files[i], reason)
            files = files[:i] + files[i + 1:]
            start = at
        self.files = files


def _gather_files(src, on_error: str):
    skipped: list[tuple[pathlib.Path, str]] = []
    if isinstance(src, (str, os.PathLike)):
        p = pathlib.Path(src)
        if p.is_dir():
            lst = list_images(p, on_error)
            return list(lst), list(lst.skipped)
        if not p.exists():
            raise FileNotFoundError(f"no such folder or image file: {p}")
        return [p], skipped
    if isinstance(src, (list, tuple)) or hasattr(src, "__iter__"):
        files = []
        for f in src:
            p = pathlib.Path(f)
            if not p.is_file():
                if on_error == "raise":
                    raise FileNotFoundError(f"image file not found: {p}")
                skipped.append((p, "file not found"))
                continue
            files.append(p)
        return files, skipped
    raise TypeError(f"paths_or_folder must be a folder, a file or a list of paths, got {type(src).__name__}")


def _precheck(files, on_error: str, workers: int):
    """Cheap header/tail check of every file; a failure is confirmed with a real cv2 decode."""
    def _one(p):
        fmt, reason = check_image_file(p)
        if reason is None:
            return None
        try:
            read_image(p)
            return None  # odd but decodable (e.g. data after the JPEG end marker)
        except (ValueError, OSError) as e:
            return str(e) if str(p) in str(e) else f"{reason}: {p}"

    reasons = parallel_map(_one, files, workers)
    good, bad = [], []
    for p, r in zip(files, reasons):
        if r is None:
            good.append(p)
        elif on_error == "raise":
            raise ValueError(r)
        else:
            bad.append((p, r))
    return good, bad


def make_loader(paths_or_folder, size: Sequence[int], batch_size: int, device="auto", backend: str = "auto",
                dtype: torch.dtype = torch.uint8, keep_aspect: bool = False, on_error: str = "raise",
                num_threads: int | None = None, channels_last: bool = False, check_files: bool = True,
                prefetch: int = 2) -> Loader:
    """A loader of image files as device batches (see the module docstring for backends and bad files).

    Args:
        paths_or_folder: a folder (its images, sorted), one image file, or a sequence of image paths (in order).
        size: ``(H, W)`` of the output images.
        batch_size: images per batch; the last batch holds the remainder (no repeats, no losses).
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``/``"cuda:i"`` or a ``torch.device``.
        backend: ``"auto"``, ``"dali"`` or ``"cv2"``.
        dtype: ``torch.uint8``, or ``torch.float16`` / ``bfloat16`` / ``float32`` scaled to ``[0, 1]``.
        keep_aspect: fit inside ``size`` keeping the ratio, centre and reflect-pad (as
            :func:`fae_fast.data.io.read_image`).
        on_error: ``"raise"`` or ``"skip"`` (skips in ``Loader.skipped``).
        num_threads: decoding threads (default: one per core, at most 32).
        channels_last: emit ``torch.channels_last`` tensors (what the inference engine wants; saves a copy).
        check_files: run the cheap per-file check before the first batch (recommended with DALI).
        prefetch: batches decoded ahead.

    Returns:
        A :class:`Loader`; ``len()`` is its number of batches.
    """
    _check_on_error(on_error)
    H, W = check_image_size(size)
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if dtype not in _DTYPES:
        raise TypeError(f"dtype must be one of {_DTYPES}, got {dtype}")
    dev = _resolve_device(device)
    chosen = resolve_backend(backend, dev)
    threads = default_workers() if num_threads is None else int(num_threads)
    if threads < 1:
        raise ValueError(f"num_threads must be >= 1, got {num_threads}")
    files, skipped = _gather_files(paths_or_folder, on_error)
    if check_files and files:
        files, bad = _precheck(files, on_error, threads)
        skipped += bad
    if skipped:
        log.warning("fae_fast loader: skipped %d file(s), first: %s (%s)", len(skipped), *skipped[0])
    if not files:
        raise ValueError(f"no readable image files in {paths_or_folder!r} ({len(skipped)} skipped)")
    return Loader(files, (H, W), int(batch_size), dev, chosen, dtype, bool(keep_aspect), on_error, threads,
                  bool(channels_last), skipped, prefetch, auto=(backend == "auto"))


def load_images_on_device(paths: Sequence[PathLike], size: Sequence[int], device="auto", keep_aspect: bool = False,
                          backend: str = "auto", batch_size: int = 256, num_threads: int | None = None,
                          cache_dir: PathLike | None = None) -> torch.Tensor:
    """Decodes a training set once into a ``uint8 (N, 3, H, W)`` tensor resident on ``device``, all or nothing.

    The device-side counterpart of :func:`fae_fast.data.load_images` for :class:`fae_fast.data.TrainSampler`:
    with DALI on a GPU the images are decoded there and written batch by batch into one preallocated device
    tensor (no host round trip); otherwise (or with ``cache_dir``, whose ``.npy`` cache is host-side)
    :func:`~fae_fast.data.load_images` decodes on cv2 threads and the result is copied once.

    Args:
        paths: image files, in output order. size: ``(H, W)``. device: ``"auto"``, ``"cpu"``, ``"cuda[:i]"``.
        keep_aspect: fit + reflect pad. backend: ``"auto"``, ``"dali"`` or ``"cv2"``.
        batch_size: DALI batch. num_threads: decoding threads. cache_dir: see :func:`~fae_fast.data.load_images`.

    Raises:
        ValueError / FileNotFoundError naming the first bad file.
    """
    paths = [pathlib.Path(p) for p in paths]
    if not paths:
        raise ValueError("load_images_on_device: empty list of paths")
    H, W = check_image_size(size)
    dev = _resolve_device(device)
    chosen = resolve_backend(backend, dev, what="training set")
    if chosen == "cv2" or cache_dir is not None:
        x = load_images(paths, (H, W), keep_aspect, workers=num_threads, cache_dir=cache_dir)
        return x.to(dev)
    loader = make_loader(paths, (H, W), batch_size, device=dev, backend="dali", keep_aspect=keep_aspect,
                         num_threads=num_threads)
    out = torch.empty((len(paths), 3, H, W), dtype=torch.uint8, device=dev)
    i = 0
    for batch in loader:
        out[i:i + batch.images.shape[0]] = batch.images
        i += batch.images.shape[0]
    if i != len(paths):  # on_error="raise" cannot lose files; guard the contract anyway
        raise RuntimeError(f"load_images_on_device: decoded {i} of {len(paths)} images")
    return out


# ----------------------------------------------------------------------------------------------------------------
# frames handed over by the caller


class FrameSource:
    """The loaders' preprocessing for frames a caller already holds (a camera loop).

    ``process`` takes a list of ``(H, W, 3)`` uint8 RGB frames (numpy or torch, sizes may differ), a
    ``(B, H, W, 3)`` array/tensor, or a ``(B, 3, H, W)`` tensor, on the host or on a CUDA device, and returns
    ``(B, 3, H, W)`` of ``dtype`` on ``device``, resized like :func:`fae_fast.data.io.read_image`.

    Backends: ``"dali"`` (an ``external_source`` pipeline, resize on the GPU when ``device`` is CUDA),
    ``"cv2"`` (host frames resized on threads; device frames are copied to the host first), ``"torch"``
    (``F.interpolate`` bilinear with antialias on the frames' device: close to, not equal to, cv2's
    ``INTER_AREA``), ``"auto"`` (DALI for a CUDA device when available, else cv2 for host frames and torch for
    device frames).

    Args:
        size: ``(H, W)``. device: output device (``"auto"``, ``"cpu"``, ``"cuda"``). backend: see above.
        dtype: ``torch.uint8`` or a float dtype (``/ 255``). keep_aspect: fit + reflect pad.
        max_batch: the DALI pipeline's batch capacity (larger inputs are processed in chunks).
        num_threads: CPU threads. channels_last: emit channels_last tensors.

    Attributes:
        backend: ``"dali"``, ``"cv2"``, ``"torch"``, or ``"auto-fallback"`` (auto without DALI or on the CPU: cv2
            for host frames, torch for device frames).

    Example:
        >>> fs = FrameSource((256, 256), device="cuda", dtype=torch.float16)     # doctest: +SKIP
        >>> x = fs.process([frame_rgb])                                           # (1, 3, 256, 256)
    """

    def __init__(self, size: Sequence[int], device="auto", backend: str = "auto", dtype: torch.dtype = torch.uint8,
                 keep_aspect: bool = False, max_batch: int = 64, num_threads: int | None = None,
                 channels_last: bool = False):
        self.size = check_image_size(size)
        self.device = _resolve_device(device)
        if backend not in ("auto", "dali", "cv2", "torch"):
            raise ValueError(f"backend must be 'auto', 'dali', 'cv2' or 'torch', got {backend!r}")
        if backend == "torch":
            self.backend = "torch"
        elif backend == "cv2":
            self.backend = "cv2"
        else:
            b = resolve_backend(backend, self.device, what="frame source")
            self.backend = b if b == "dali" else "auto-fallback"
        if dtype not in _DTYPES:
            raise TypeError(f"dtype must be one of {_DTYPES}, got {dtype}")
        self.dtype = dtype
        self.keep_aspect = bool(keep_aspect)
        self.max_batch = int(max_batch)
        self.num_threads = default_workers() if num_threads is None else int(num_threads)
        self.channels_last = bool(channels_last)
        self._pipes: dict = {}

    # -- input normalisation

    @staticmethod
    def _as_frames(frames):
        """-> ``(list of HWC frames, is_device)``; a single dense batch stays one (B, H, W, 3) item."""
        if isinstance(frames, torch.Tensor):
            if frames.dtype != torch.uint8:
                raise TypeError(f"frames must be uint8, got {frames.dtype}")
            if frames.dim() == 3:
                frames = frames[None]
            if frames.dim() != 4:
                raise ValueError(f"frames tensor must be (B, H, W, 3) or (B, 3, H, W), got {tuple(frames.shape)}")
            if frames.shape[-1] != 3:
                if frames.shape[1] != 3:
                    raise ValueError(f"frames tensor must be (B, H, W, 3) or (B, 3, H, W), got "
                                     f"{tuple(frames.shape)}")
                frames = frames.permute(0, 2, 3, 1)
            return [frames], frames.is_cuda
        if isinstance(frames, np.ndarray):
            if frames.dtype != np.uint8:
                raise TypeError(f"frames must be uint8, got {frames.dtype}")
            if frames.ndim == 3:
                frames = frames[None]
            if frames.ndim != 4 or frames.shape[-1] != 3:
                raise ValueError(f"frames array must be (B, H, W, 3) or (H, W, 3), got {frames.shape}")
            return [frames], False
        if isinstance(frames, (list, tuple)):
            if not frames:
                raise ValueError("empty list of frames")
            out, on_dev = [], set()
            for i, f in enumerate(frames):
                if isinstance(f, torch.Tensor):
                    on_dev.add(f.is_cuda)
                    dt = f.dtype == torch.uint8
                elif isinstance(f, np.ndarray):
                    on_dev.add(False)
                    dt = f.dtype == np.uint8
                else:
                    raise TypeError(f"frame {i} is a {type(f).__name__}, expected a numpy array or torch tensor")
                if not dt:
                    raise TypeError(f"frame {i} must be uint8, got {f.dtype}")
                if f.ndim != 3 or f.shape[-1] != 3:
                    raise ValueError(f"frame {i} must be (H, W, 3), got {tuple(f.shape)}")
                out.append(f[None])
            if len(on_dev) > 1:
                raise ValueError("frames mix host and device arrays")
            return out, on_dev.pop()
        raise TypeError(f"frames must be a list of (H, W, 3) arrays, an array or a tensor, got {type(frames).__name__}")

    # -- backends

    def _process_cv2(self, items) -> torch.Tensor:
        frames = [f[j] for f in items for j in range(f.shape[0])]
        frames = [f.cpu().numpy() if isinstance(f, torch.Tensor) else f for f in frames]
        out = parallel_map(lambda f: resize_image(f, self.size, self.keep_aspect), frames, self.num_threads)
        x = torch.from_numpy(np.stack(out))
        if self.device.type == "cuda":
            x = x.pin_memory().to(self.device, non_blocking=True)
        return _finish(x, self.dtype, self.channels_last)

    def _process_torch(self, items) -> torch.Tensor:
        import torch.nn.functional as F

        H, W = self.size
        outs = []
        for f in items:  # one call per dense batch (a list of differently sized frames: one per frame)
            f = torch.as_tensor(f).to(self.device)
            x = f.permute(0, 3, 1, 2).to(torch.float32)
            h, w = x.shape[-2:]
            nh, nw = fit_inside(h, w, (H, W)) if self.keep_aspect else (H, W)
            if (nh, nw) != (h, w):
                x = F.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
            x = x.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
            if self.keep_aspect and (nh, nw) != (H, W):
                hw = torch.tensor([[nh, nw]] * x.shape[0])
                pad = torch.zeros((x.shape[0], H, W, 3), dtype=torch.uint8, device=x.device)
                pad[:, :nh, :nw] = x
                x = _reflect_pad(pad, hw, H, W)
            outs.append(x)
        return _finish(torch.cat(outs), self.dtype, self.channels_last)

    def _pipe(self, on_gpu: bool):
        from .dali import frames_pipeline

        key = on_gpu
        if key not in self._pipes:
            device_id = self.device.index if self.device.type == "cuda" else None
            self._pipes[key] = frames_pipeline(self.size, self.max_batch, self.num_threads, device_id,
                                               self.keep_aspect, on_gpu and device_id is not None)
        return self._pipes[key]

    def _process_dali(self, items, on_dev: bool) -> torch.Tensor:
        from .dali import to_torch

        if on_dev and self.device.type != "cuda":
            items, on_dev = [f.cpu() for f in items], False
        frames = [f[j] for f in items for j in range(f.shape[0])]
        if not on_dev:
            frames = [np.ascontiguousarray(f.numpy() if isinstance(f, torch.Tensor) else f) for f in frames]
        else:
            frames = [f.to(self.device).contiguous() for f in frames]
        pipe = self._pipe(on_dev)
        H, W = self.size
        outs = []
        for lo in range(0, len(frames), self.max_batch):
            chunk = frames[lo:lo + self.max_batch]
            if on_dev:
                pipe.feed_input("frames", chunk, cuda_stream=torch.cuda.current_stream(self.device).cuda_stream)
            else:
                pipe.feed_input("frames", chunk)
            hw = None
            if self.keep_aspect:
                hw = np.array([fit_inside(f.shape[0], f.shape[1], (H, W)) for f in chunk], dtype=np.float32)
                pipe.feed_input("hw", list(hw))
            (o,) = pipe.run()
            x = to_torch(o, self.device)
            if hw is not None:
                x = _reflect_pad(x, torch.from_numpy(hw.astype(np.int64)), H, W)
            outs.append(x)
        x = outs[0] if len(outs) == 1 else torch.cat(outs)
        return _finish(x, self.dtype, self.channels_last)

    def process(self, frames) -> torch.Tensor:
        """Frames -> ``(B, 3, H, W)`` of ``dtype`` on ``device`` (see the class docstring for the inputs)."""
        items, on_dev = self._as_frames(frames)
        if self.backend == "dali":
            return self._process_dali(items, on_dev)
        if self.backend == "torch" or (self.backend == "auto-fallback" and on_dev):
            return self._process_torch(items)
        return self._process_cv2(items)

    __call__ = process
