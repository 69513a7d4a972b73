"""Several networks of one architecture whose reconstructions are averaged (``model.members``).

Each member is trained on its own loss from its own seed: its own initialisation, batches, corruption and noise
(:class:`fae_fast.train._Trainer`; member i is the one-network run seeded ``member_seed(seed, i)`` on the same
training images): an ensemble of separately optimised repairs, not one wider network. The average of their
reconstructions is the model's: everything downstream (maps, normalisation, thresholds, the engine, the ONNX graph)
sees one network.
"""
from __future__ import annotations

import torch
import torch.nn as nn


class Members(nn.Module):
    """``mean_i member_i(x)`` of two or more networks mapping (B, C, H, W) to (B, C, H, W).

    ``residual`` and ``hide_cell`` read and set those of every member (the engine turns the residual off to add
    ``x`` in float32 itself: ``mean_i (x + h_i) = x + mean_i h_i``).

    Example:
        >>> from fae_fast.models import UNet
        >>> m = Members([UNet(widths=(8, 16), dilations=(1,)) for _ in range(2)])
        >>> m(torch.rand(1, 3, 20, 24)).shape
        torch.Size([1, 3, 20, 24])
    """

    def __init__(self, nets):
        super().__init__()
        nets = list(nets)
        if len(nets) < 2:
            raise ValueError(f"Members needs at least 2 networks, got {len(nets)}")
        self.members = nn.ModuleList(nets)
        self.in_channels = int(nets[0].in_channels)

    @property
    def residual(self) -> bool:
        return all(bool(getattr(m, "residual", False)) for m in self.members)

    @residual.setter
    def residual(self, value: bool) -> None:
        for m in self.members:
            m.residual = bool(value)

    @property
    def hide_cell(self) -> int:
        return int(getattr(self.members[0], "hide_cell", 0))

    @hide_cell.setter
    def hide_cell(self, value: int) -> None:
        for m in self.members:
            m.hide_cell = value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.members[0](x)
        for m in self.members[1:]:
            out = out + m(x)
        return out / len(self.members)


def networks(model: nn.Module) -> list[nn.Module]:
    """The networks ``model`` is made of, each trained on its own loss: its members, or ``model`` itself."""
    return list(model.members) if isinstance(model, Members) else [model]
