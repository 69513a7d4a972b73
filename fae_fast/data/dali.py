"""NVIDIA DALI pipelines of the loaders (imported only when a DALI backend is used).

Two pipelines, both emitting ``uint8 (B, H, W, 3)`` RGB (HWC, the decoder's layout; the loader turns it into
NCHW and the requested dtype on the device, where that costs one cheap pass):

* :func:`files_pipeline`: ``readers.file`` (our own ordered file list, labels = positions in it, the last batch
  padded by repeating the last file, which the loader trims) -> ``decoders.image`` (``device="mixed"``: JPEG on
  the GPU through nvJPEG / the hardware decoder, formats nvImageCodec cannot do on the GPU fall back to its CPU
  codecs inside the same operator; ``device="cpu"`` in CPU-only mode) -> ``resize`` (antialiased linear: a
  triangle filter when shrinking, plain bilinear when growing; DALI has no box filter, so it is within
  0.4-0.6/255 mean of cv2's ``INTER_AREA`` on photos and textures, not bit-equal) -> for ``keep_aspect`` a pad
  to ``(H, W)`` at the bottom/right, with the inner size as another output; the reflect padding and centring
  are done on the device by the loader (DALI's pad only fills a constant).
* :func:`frames_pipeline`: ``external_source`` frames (host or device) -> the same resize (and pad).

The inner size for ``keep_aspect`` is computed in the graph from ``peek_image_shape`` with the rule of
:func:`fae_fast.data.io.fit_inside`, so both loaders produce the same geometry.

``adjust_orientation=False``: cv2's ``IMREAD_UNCHANGED`` ignores EXIF orientation too.
"""
from __future__ import annotations

import functools

__all__ = ["dali_status", "files_pipeline", "frames_pipeline", "to_torch"]


@functools.lru_cache(maxsize=None)
def dali_status() -> tuple[bool, str]:
    """``(True, "nvidia-dali <version>")`` when DALI imports, else ``(False, "<why>")``."""
    try:
        import nvidia.dali as dali  # noqa: F401
        from nvidia.dali.plugin.pytorch import feed_ndarray  # noqa: F401
    except Exception as e:  # ImportError, or a broken install (missing CUDA libraries) raising something else
        return False, f"nvidia.dali not importable ({type(e).__name__}: {e}); pip install 'fae_fast[dali]'"
    return True, f"nvidia-dali {dali.__version__}"


def _fit_size(h, w, H: int, W: int):
    """fit_inside() in DALI arithmetic: the limiting side exact, the other rounded half up, clamped to [1, limit]."""
    import nvidia.dali.math as dmath
    from nvidia.dali import fn

    s = dmath.min(float(H) / h, float(W) / w)
    nh = dmath.clamp(dmath.floor(h * s + 0.5), 1.0, float(H))
    nw = dmath.clamp(dmath.floor(w * s + 0.5), 1.0, float(W))
    return fn.stack(nh, nw)


def _resize(images, size, keep_aspect: bool, hw=None):
    from nvidia.dali import fn, types

    H, W = size
    if keep_aspect:
        images = fn.resize(images, size=hw, antialias=True, interp_type=types.INTERP_LINEAR)
        return fn.pad(images, axis_names="HW", shape=[H, W], fill_value=0)
    return fn.resize(images, size=[H, W], antialias=True, interp_type=types.INTERP_LINEAR)


def files_pipeline(files, size, batch_size: int, num_threads: int, device_id, keep_aspect: bool,
                   prefetch: int = 2):
    """Builds the file pipeline (see the module docstring).

    Args:
        files: ``list[str]`` of image files, in output order.
        size: ``(H, W)``.
        batch_size: samples per ``run()``; the last batch of an epoch is padded by repeating the last file.
        num_threads: DALI CPU threads.
        device_id: CUDA device index for GPU decoding, or None for DALI's CPU-only mode.
        keep_aspect: fit + pad (outputs the inner sizes too).
        prefetch: DALI's prefetch queue depth.

    Returns:
        A built ``nvidia.dali.Pipeline`` with outputs ``(images (B, H, W, 3) uint8, labels (B, 1) int32)`` and
        for ``keep_aspect`` a third, ``hw (B, 2) int32`` on the CPU: the resized size before padding.
    """
    from nvidia.dali import fn, pipeline_def, types

    H, W = size

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id,
                  prefetch_queue_depth=prefetch)
    def _pipe():
        enc, labels = fn.readers.file(files=list(files), labels=list(range(len(files))), random_shuffle=False,
                                      pad_last_batch=True, name="Reader")
        dev = "cpu" if device_id is None else "mixed"
        images = fn.decoders.image(enc, device=dev, output_type=types.RGB, adjust_orientation=False)
        if keep_aspect:
            shp = fn.peek_image_shape(enc, dtype=types.FLOAT)
            hw = _fit_size(shp[0], shp[1], H, W)
            images = _resize(images, size, True, hw)
            return images, labels, fn.cast(hw, dtype=types.INT32)
        return _resize(images, size, False), labels

    pipe = _pipe()
    pipe.build()
    return pipe


def frames_pipeline(size, max_batch: int, num_threads: int, device_id, keep_aspect: bool, input_on_gpu: bool):
    """Builds the frame pipeline: ``external_source`` named ``"frames"`` (HWC uint8) -> resize (-> pad).

    Runs synchronously (no prefetch) since each batch is handed over by the caller. With ``keep_aspect`` a
    second source ``"hw"`` takes the inner size of each frame (``float32 (2,)``), computed by the caller with
    :func:`fae_fast.data.io.fit_inside`.

    Returns:
        A built pipeline with one output, ``(B, H, W, 3)`` uint8 (on the GPU when ``device_id`` is not None).
    """
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=max_batch, num_threads=num_threads, device_id=device_id, prefetch_queue_depth=1,
                  exec_async=False, exec_pipelined=False)
    def _pipe():
        x = fn.external_source(name="frames", device="gpu" if input_on_gpu else "cpu", layout="HWC",
                               dtype=types.UINT8, no_copy=False)
        if device_id is not None and not input_on_gpu:
            x = x.gpu()  # resize on the GPU: the upload is of the camera-sized frame, once
        hw = fn.external_source(name="hw", dtype=types.FLOAT) if keep_aspect else None
        return _resize(x, size, keep_aspect, hw)

    pipe = _pipe()
    pipe.build()
    return pipe


def to_torch(tl, device, stream=None):
    """Copies a DALI TensorList of uniform shape into a new torch tensor on ``device`` (DALI's own copy)."""
    import torch
    from nvidia.dali.plugin.pytorch import feed_ndarray

    t = tl.as_tensor()
    out = torch.empty(tuple(t.shape()), dtype=torch.uint8, device=device)
    if out.is_cuda:
        feed_ndarray(t, out, cuda_stream=stream if stream is not None else torch.cuda.current_stream(out.device))
    else:
        feed_ndarray(t, out)
    return out
