"""The FAE's anomaly-map step: per-pixel error, ``n`` passes of a ``k x k`` mean filter, max."""
from __future__ import annotations

import torch
from torch import nn

from fae_fast import ops, reference

__all__ = ["AnomalyMapGenerator"]


def _exporting() -> bool:
    """True while torch.export / ONNX / TorchScript trace the model: the dispatcher's Python checks and a Triton
    kernel cannot be traced, the reference (the op's torch backend) can."""
    return torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export() or torch.jit.is_tracing()


class AnomalyMapGenerator(nn.Module):
    """``map = box_k^n(e)``, ``score = max_{h, w} map`` (:func:`fae_fast.ops.anomaly_map`), ``e`` the error of
    :func:`fae_fast.reference.error_image` (``mean_c (recon - x)^2`` for "squared").

    Args:
        n: box-filter passes (0..8).
        k: odd window (1..31); :func:`fae_fast.config.smoothing_for_size` gives both for an image size.
        error: "squared" | "gradient" | "squared+gradient".

    Example:
        >>> gen = AnomalyMapGenerator(n=4, k=3)
        >>> x = torch.rand(2, 3, 32, 32)
        >>> amap, score = gen(x, x.clone())
        >>> amap.shape, score.shape
        (torch.Size([2, 1, 32, 32]), torch.Size([2]))
    """

    def __init__(self, n: int = 4, k: int = 7, error: str = "squared"):
        super().__init__()
        self.n, self.k, self.error = int(n), int(k), str(error)

    def forward(self, images: torch.Tensor, recon: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Maps (B, 1, H, W) float32 and scores (B,) float32 of ``images`` (B, C, H, W) in [0, 1] and ``recon``."""
        if _exporting():
            return reference.anomaly_map(images, recon, n=self.n, k=self.k, error=self.error)
        return ops.anomaly_map(images, recon, n=self.n, k=self.k, error=self.error)
