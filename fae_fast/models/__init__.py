"""Networks of fae_fast: the modified U-Net of DESIGN.md 1.3 and its inference-time BatchNorm folding.

Example:
    >>> from fae_fast.config import ModelConfig
    >>> net = build_model(ModelConfig(widths=(8, 16, 32), dilations=(1, 2)))
    >>> net(torch.rand(1, 3, 33, 48)).shape
    torch.Size([1, 3, 33, 48])
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..config import ModelConfig
from .members import Members, networks
from .unet import ACTS, NORMS, ConvNormAct, UNet, count_parameters, fold_batchnorm

__all__ = ["UNet", "Members", "networks", "ConvNormAct", "build_model", "fold_batchnorm", "count_parameters",
           "NORMS", "ACTS"]


def build_model(cfg: ModelConfig | None = None, seeds=None) -> nn.Module:
    """Build the U-Net described by ``cfg`` (defaults: widths 64-128-256-512, dilations 1-2-4-8, BatchNorm,
    ReLU, gated skips, max-pool down, bilinear up, residual output).

    Args:
        cfg: a :class:`fae_fast.config.ModelConfig` (None: the defaults).
        seeds: one int per network (``cfg.members`` of them): each is initialised from its own seed, the caller's
            random state untouched; None: built one after the other from the current random state.

    Returns:
        A :class:`UNet` mapping (B, C, H, W) to (B, C, H, W); with ``cfg.members`` > 1, :class:`Members` of that
        many.
    """
    if cfg is None:
        cfg = ModelConfig()
    if not isinstance(cfg, ModelConfig):
        raise TypeError(f"build_model expects a ModelConfig, got {type(cfg).__name__}")
    k = int(cfg.members)
    if seeds is not None and len(seeds) != k:
        raise ValueError(f"build_model: {len(seeds)} seeds for model.members={k}")

    def one():
        return UNet(cfg.in_channels, tuple(cfg.widths), tuple(cfg.dilations), norm=cfg.norm, act=cfg.act,
                    gated_skips=cfg.gated_skips, skip_mode=cfg.skip_mode, downsample=cfg.downsample,
                    upsample=cfg.upsample, residual=cfg.residual, hide_cell=cfg.hide_cell)

    if seeds is None:
        nets = [one() for _ in range(k)]
    else:
        nets = []
        for seed in seeds:
            # the model is built on the CPU: only the CPU generator is forked (manual_seed would reseed CUDA's too)
            with torch.random.fork_rng(devices=[]):
                torch.random.default_generator.manual_seed(int(seed))
                nets.append(one())
    return nets[0] if k == 1 else Members(nets)
