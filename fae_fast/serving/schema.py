"""The tensor contract of the served model (``fae-fast serve``), shared by the server, the client and the docs.

Per request (Triton adds the batch dimension B in front of every tensor; the model's ``max_batch_size`` is the
server's ``--max-batch``):

==================  =======  ===========  ==================================================================
name                dtype    dims         meaning
==================  =======  ===========  ==================================================================
``frames``          UINT8    (H, W, C)    camera frames, 0..255 (fixed size: Triton refuses another shape)
``image_threshold`` FP32     (1,)         optional: overrides the model file's image threshold, per frame
``pixel_threshold`` FP32     (1,)         optional: overrides the pixel threshold, per frame
``pred_score``      FP32     (1,)         max of the smoothed anomaly map
``pred_label``      BOOL     (1,)         ``pred_score > image_threshold`` (NaN counts as above)
``anomaly_map``     FP32     (H, W)       the smoothed (and, where the model file says so, normalised) map
``pred_mask``       BOOL     (H, W)       ``anomaly_map > pixel_threshold`` (NaN counts as above)
``error``           BYTES    (1,)         empty when the frame was judged; else why it was not
==================  =======  ===========  ==================================================================

Fail safe: a frame that cannot be judged (e.g. a NaN threshold sent with it) comes back with its ``error`` set
and ``pred_label`` True, ``pred_mask`` all True, ``pred_score`` and ``anomaly_map`` NaN: never as good.
"""
from __future__ import annotations

import numpy as np

FRAMES, IMAGE_THRESHOLD, PIXEL_THRESHOLD = "frames", "image_threshold", "pixel_threshold"
PRED_SCORE, PRED_LABEL, ANOMALY_MAP, PRED_MASK, ERROR = "pred_score", "pred_label", "anomaly_map", "pred_mask", "error"
OUTPUTS = (PRED_SCORE, PRED_LABEL, ANOMALY_MAP, PRED_MASK, ERROR)


def inputs(image_size, channels: int) -> list[tuple[str, type, tuple[int, ...], bool]]:
    """``[(name, numpy dtype, dims without the batch, optional), ...]`` of the served model."""
    H, W = (int(v) for v in image_size)
    return [(FRAMES, np.uint8, (H, W, int(channels)), False),
            (IMAGE_THRESHOLD, np.float32, (1,), True),
            (PIXEL_THRESHOLD, np.float32, (1,), True)]


def outputs(image_size) -> list[tuple[str, type, tuple[int, ...]]]:
    """``[(name, numpy dtype, dims without the batch), ...]`` of the served model."""
    H, W = (int(v) for v in image_size)
    return [(PRED_SCORE, np.float32, (1,)), (PRED_LABEL, np.bool_, (1,)), (ANOMALY_MAP, np.float32, (H, W)),
            (PRED_MASK, np.bool_, (H, W)), (ERROR, np.bytes_, (1,))]
