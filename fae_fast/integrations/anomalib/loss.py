"""The FAE training loss on an anomalib batch: fae_fast's corruption, then the same-eps noisy-target MSE."""
from __future__ import annotations

import torch
from torch import nn

from fae_fast import ops
from fae_fast.config import FAEConfig
from fae_fast.corruption import Corruptor
from fae_fast.models import networks
from fae_fast.train import batch_loss, effective_sigma_max, member_seed

__all__ = ["FaeLoss"]


class FaeLoss(nn.Module):
    """``|| f(x~ + eps) - (x + eps) ||^2`` with x~ the corrupted batch (:func:`fae_fast.train.batch_loss`).

    The corruption and sigma are drawn from one generator seeded with ``cfg.train.seed`` (created on the batch's
    device at the first call); the noise seed of each step comes from the seed and the step, and one backend
    (:func:`fae_fast.ops.noise_backend`) injects and regenerates eps, so both sides get the same eps.

    Args:
        cfg: the full configuration (corruption, noise, seed).
        image_size: (H, W) of the batches (the pre-processor's size).
    """

    def __init__(self, cfg: FAEConfig, image_size: tuple[int, int]):
        super().__init__()
        self.cfg = cfg
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.gen: torch.Generator | None = None
        self.corruptor: Corruptor | None = None
        self.sigma_max: float | None = None

    def forward(self, net: nn.Module, images: torch.Tensor, step: int) -> torch.Tensor:
        """The loss of ``images`` (B, C, H, W) float in [0, 1] at 0-based ``step``: a 0-dim float32 tensor.

        With ``model.members`` > 1 (``net`` a :class:`~fae_fast.models.Members`): the sum of each member's own loss
        (own corruption draws and noise seed, as :mod:`fae_fast.train` trains them), so each member's gradient is
        its own loss's; Lightning clips the members' gradients together, not each alone as ``fae-fast train``.
        """
        dev = images.device
        if self.gen is None or self.gen.device != dev:
            self.gen = torch.Generator(device=dev)
            self.gen.manual_seed(int(self.cfg.train.seed))
            self.corruptor = Corruptor(self.cfg.corruption, image_size=self.image_size, device=dev,
                                       channels=int(images.shape[1]))
        if self.sigma_max is None:  # "image_noise" reads the images' own noise off the first batch
            as_uint8 = images.detach().clamp(0, 1).mul(255).round().to(torch.uint8)
            self.sigma_max = effective_sigma_max(self.cfg, as_uint8)
        losses = [batch_loss(m, images, self.corruptor, self.gen, step=int(step),
                             seed=member_seed(int(self.cfg.train.seed), i), sigma_max=self.sigma_max,
                             mode=self.cfg.noise.mode, noise_backend=ops.noise_backend(dev))
                  for i, m in enumerate(networks(net))]
        return losses[0] if len(losses) == 1 else torch.stack(losses).sum()
