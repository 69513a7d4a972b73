"""The FAE network for anomalib: the fae_fast U-Net plus the anomaly-map step."""
from __future__ import annotations

import torch
from anomalib.data import InferenceBatch
from torch import nn

from fae_fast.config import ModelConfig
from fae_fast.models import build_model

from .anomaly_map import AnomalyMapGenerator

__all__ = ["FaeModel"]


class FaeModel(nn.Module):
    """The reconstruction U-Net f of DESIGN.md section 1.3 and the FAE's smoothing of its error.

    Args:
        cfg: the network's :class:`fae_fast.config.ModelConfig`.
        n, k: the anomaly-map smoothing (passes, odd window) at the input size.
        error: the anomaly map's error kind ("squared" | "gradient" | "squared+gradient").

    Call:
        ``model(images)`` with ``images`` (B, C, H, W) float in [0, 1] (no ImageNet normalisation). In training
        mode: the reconstruction (B, C, H, W). In eval mode: ``InferenceBatch(pred_score (B,),
        anomaly_map (B, 1, H, W))``.
    """

    def __init__(self, cfg: ModelConfig, *, n: int, k: int, error: str = "squared"):
        super().__init__()
        self.net = build_model(cfg)
        self.anomaly_map_generator = AnomalyMapGenerator(n=n, k=k, error=error)

    def forward(self, images: torch.Tensor) -> torch.Tensor | InferenceBatch:
        recon = self.net(images)
        if self.training:
            return recon
        anomaly_map, pred_score = self.anomaly_map_generator(images, recon)
        return InferenceBatch(pred_score=pred_score, anomaly_map=anomaly_map)
