"""The modified U-Net of the Filtering Autoencoder (DESIGN.md section 1.3).

Layout, for ``widths = (w0, ..., wL)``::

    x (B, C, H, W) --replicate-pad to a multiple of 2**L-->
      stem      : 2 x (3x3 conv - norm - act)                  -> w0 at H
      encoder i : downsample (max-pool or stride-2 conv), 2 x (conv - norm - act) -> wi at H / 2**i
      bottleneck: stacked dilated 3x3 conv - norm - act (dilations 1, 2, 4, 8), each residual
      decoder i : upsample (bilinear + 1x1 conv, or 2x2 transposed conv), skip merge, 2 x (conv - norm - act)
      head      : 1x1 conv, no sigmoid
    --crop back--> out = x + head (identity-anchored residual, default) or head

The skip merge is a learned gate ``s * e + (1 - s) * d`` with ``s = sigmoid(conv1x1([e, d]))`` (per channel and
pixel); with the gate off it is a concatenation (or a sum). Every op here keeps a channels_last input in
channels_last: no ``.view``/``.contiguous()`` on activations.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["UNet", "ConvNormAct", "fold_batchnorm", "count_parameters", "NORMS", "ACTS"]

NORMS = ("batch", "group", "instance", "none")
ACTS = ("relu", "silu", "gelu", "leaky_relu")
DOWNSAMPLES = ("maxpool", "conv")
UPSAMPLES = ("bilinear", "transpose")
SKIPS = ("gate", "concat", "add", "none")


def _make_norm(norm: str, channels: int) -> nn.Module:
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "group":
        # 32 groups as in the GroupNorm paper, fewer when the width is not divisible (any width works)
        return nn.GroupNorm(math.gcd(32, channels), channels)
    if norm == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    if norm == "none":
        return nn.Identity()
    raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


def _make_act(act: str) -> nn.Module:
    if act == "relu":
        return nn.ReLU(inplace=True)
    if act == "silu":
        return nn.SiLU(inplace=True)
    if act == "gelu":
        return nn.GELU()
    if act == "leaky_relu":
        return nn.LeakyReLU(0.1, inplace=True)
    raise ValueError(f"act must be one of {ACTS}, got {act!r}")


class ConvNormAct(nn.Module):
    """3x3 (or k x k) convolution, normalisation, activation; (B, Cin, H, W) -> (B, Cout, H/stride, W/stride).

    The convolution has no bias when a normalisation follows (the norm's shift makes it redundant), so that
    :func:`fold_batchnorm` turns each block into a single biased convolution.
    """

    def __init__(self, cin: int, cout: int, *, kernel: int = 3, stride: int = 1, dilation: int = 1,
                 norm: str = "batch", act: str = "relu"):
        super().__init__()
        pad = dilation * (kernel // 2)
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=pad, dilation=dilation,
                              bias=(norm == "none"))
        self.norm = _make_norm(norm, cout)
        self.act = _make_act(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x)))


class _DoubleConv(nn.Sequential):
    def __init__(self, cin: int, cout: int, norm: str, act: str):
        super().__init__(ConvNormAct(cin, cout, norm=norm, act=act), ConvNormAct(cout, cout, norm=norm, act=act))


class _DilatedBottleneck(nn.Module):
    """Stacked dilated 3x3 conv-norm-act, each with a residual connection: receptive field grows to
    ``1 + 2 * sum(dilations)`` pixels at the lowest resolution (inpainting context for large occlusions)."""

    def __init__(self, channels: int, dilations, norm: str, act: str):
        super().__init__()
        self.layers = nn.ModuleList(ConvNormAct(channels, channels, dilation=int(d), norm=norm, act=act)
                                    for d in dilations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + layer(x)
        return x


class _Up(nn.Module):
    """x2 upsampling from ``cin`` to ``cout`` channels."""

    def __init__(self, cin: int, cout: int, mode: str):
        super().__init__()
        if mode not in UPSAMPLES:
            raise ValueError(f"upsample must be one of {UPSAMPLES}, got {mode!r}")
        self.mode = mode
        if mode == "transpose":
            self.proj = nn.ConvTranspose2d(cin, cout, 2, stride=2)
        else:
            # project first (1x1 at low resolution is 4x cheaper than after the upsampling, and linear ops commute)
            self.proj = nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "transpose":
            return self.proj(x)
        return F.interpolate(self.proj(x), scale_factor=2.0, mode="bilinear", align_corners=False)


class _SkipMerge(nn.Module):
    """Mix encoder features e and decoder features d (both (B, C, H, W)).

    ``gate``: ``s * e + (1 - s) * d`` with ``s = sigmoid(conv1x1([e, d]))`` -> C channels;
    ``concat``: ``[e, d]`` -> 2C channels; ``add``: ``e + d`` -> C channels; ``none``: ``d`` alone (no skip:
    the network is a plain bottleneck autoencoder, the fair baseline of the ablations).
    """

    def __init__(self, channels: int, mode: str):
        super().__init__()
        if mode not in SKIPS:
            raise ValueError(f"skip must be one of {SKIPS}, got {mode!r}")
        self.mode = mode
        self.out_channels = 2 * channels if mode == "concat" else channels
        if mode == "gate":
            self.gate = nn.Conv2d(2 * channels, channels, 1)

    def forward(self, e: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        if self.mode == "concat":
            return torch.cat((e, d), dim=1)
        if self.mode == "add":
            return e + d
        if self.mode == "none":
            return d
        s = torch.sigmoid(self.gate(torch.cat((e, d), dim=1)))
        return d + s * (e - d)  # == s * e + (1 - s) * d with one multiply


class UNet(nn.Module):
    """Modified U-Net: f(x) for (B, C, H, W) images in [0, 1] of any size (odd, non-square).

    Args:
        in_channels: C of the input (and of the output).
        widths: channels per level; ``len(widths) - 1`` downsamplings.
        dilations: dilations of the residual 3x3 convs in the bottleneck (empty: no bottleneck).
        norm: "batch" | "group" | "instance" | "none".
        act: "relu" | "silu" | "gelu" | "leaky_relu".
        gated_skips: learned gate ``s * e + (1 - s) * d``; when False the skip is ``skip_mode``.
        skip_mode: "concat" | "add" | "none" (no skip connections), used when ``gated_skips`` is False.
        downsample: "maxpool" | "conv" (stride-2 3x3 conv-norm-act).
        upsample: "bilinear" (+1x1 conv) | "transpose" (2x2 stride-2 transposed conv).
        residual: output ``x + head(features)`` (identity-anchored; the head starts at zero so the untrained
            model is the identity) instead of ``head(features)``.
        hide_cell: in eval mode, reconstruct each pixel from a pass in which its cell was hidden (0: one plain
            pass, also in training mode). The image is cut into ``hide_cell`` x ``hide_cell`` cells in a 2 x 2
            pattern; each of four passes (one batched forward) fills one quarter of the cells with the image's
            per-channel mean, and each pixel's output comes from the pass that hid it: the network cannot copy a
            defect it does not see, it has to inpaint the cell from its surroundings (inpainting at test time as
            in RIAD, Zavrtanik et al., Pattern Recognition 2021). Four times the compute.

    Example:
        >>> net = UNet(widths=(8, 16), dilations=(1, 2))
        >>> net(torch.rand(2, 3, 37, 50)).shape
        torch.Size([2, 3, 37, 50])
    """

    def __init__(self, in_channels: int = 3, widths=(64, 128, 256, 512), dilations=(1, 2, 4, 8), *,
                 norm: str = "batch", act: str = "relu", gated_skips: bool = True, skip_mode: str = "concat",
                 downsample: str = "maxpool", upsample: str = "bilinear", residual: bool = True,
                 hide_cell: int = 0):
        super().__init__()
        widths = tuple(int(w) for w in widths)
        if len(widths) < 1 or any(w < 1 for w in widths):
            raise ValueError(f"widths must be a non-empty sequence of positive ints, got {widths!r}")
        if isinstance(in_channels, bool) or int(in_channels) < 1:
            raise ValueError(f"in_channels must be a positive int, got {in_channels!r}")
        if any(int(d) < 1 for d in dilations):
            raise ValueError(f"dilations must be positive ints, got {tuple(dilations)!r}")
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        if act not in ACTS:
            raise ValueError(f"act must be one of {ACTS}, got {act!r}")
        if downsample not in DOWNSAMPLES:
            raise ValueError(f"downsample must be one of {DOWNSAMPLES}, got {downsample!r}")
        if not gated_skips and skip_mode not in ("concat", "add", "none"):
            raise ValueError(f"skip_mode must be 'concat', 'add' or 'none', got {skip_mode!r}")
        if isinstance(hide_cell, bool) or not isinstance(hide_cell, int) or hide_cell < 0:
            raise ValueError(f"hide_cell must be an int >= 0 (0: off), got {hide_cell!r}")
        self.in_channels = int(in_channels)
        self.hide_cell = hide_cell
        self.widths = widths
        self.residual = bool(residual)
        self.factor = 2 ** (len(widths) - 1)

        self.stem = _DoubleConv(self.in_channels, widths[0], norm, act)
        self.downs = nn.ModuleList()
        self.enc = nn.ModuleList()
        for cin, cout in zip(widths[:-1], widths[1:]):
            if downsample == "maxpool":
                self.downs.append(nn.MaxPool2d(2))
            else:
                self.downs.append(ConvNormAct(cin, cin, stride=2, norm=norm, act=act))
            self.enc.append(_DoubleConv(cin, cout, norm, act))
        self.bottleneck = _DilatedBottleneck(widths[-1], tuple(dilations), norm, act)
        self.ups = nn.ModuleList()
        self.merges = nn.ModuleList()
        self.dec = nn.ModuleList()
        mode = "gate" if gated_skips else skip_mode
        for cin, cout in zip(widths[:0:-1], widths[-2::-1]):  # deepest first
            self.ups.append(_Up(cin, cout, upsample))
            merge = _SkipMerge(cout, mode)
            self.merges.append(merge)
            self.dec.append(_DoubleConv(merge.out_channels, cout, norm, act))
        self.head = nn.Conv2d(widths[0], self.in_channels, 1)
        if self.residual:
            # identity at initialisation: the network starts as f(x) = x and learns the correction
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) float -> (B, C, H, W) reconstruction (no sigmoid)."""
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"UNet expects (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        if self.hide_cell and not self.training:
            return self._inpaint_cells(x)
        return self._reconstruct(x)

    def hidden_cells(self, H: int, W: int, device=None) -> torch.Tensor:
        """(4, 1, H, W) float 0/1: ``hide_cell`` x ``hide_cell`` cells in a 2 x 2 pattern; pass p hides the cells
        whose (row, column) cell index parities are (p // 2, p % 2), so that every pixel is hidden in exactly one
        pass."""
        ys = (torch.arange(H, device=device) // self.hide_cell) % 2
        xs = (torch.arange(W, device=device) // self.hide_cell) % 2
        code = (2 * ys[:, None] + xs[None, :])[None, None]
        return (code == torch.arange(4, device=device)[:, None, None, None]).float()

    def _inpaint_cells(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        hide = self.hidden_cells(H, W, x.device).to(x.dtype)                  # (4, 1, H, W)
        fill = x.mean(dim=(2, 3), keepdim=True)
        # the four passes of every image in one batch: (4, B, C, H, W) -> (4B, C, H, W)
        passes = torch.lerp(x.unsqueeze(0), fill.unsqueeze(0), hide.unsqueeze(1))
        out = self._reconstruct(passes.reshape(4 * B, C, H, W)).reshape(4, B, C, H, W)
        return (out * hide.unsqueeze(1)).sum(0)

    def _reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[-2:]
        ph, pw = (-H) % self.factor, (-W) % self.factor
        # replicate padding at the bottom/right: no artificial edges for the first convs to react to
        h = F.pad(x, (0, pw, 0, ph), mode="replicate") if (ph or pw) else x
        h = self.stem(h)
        skips = [h]
        for down, enc in zip(self.downs, self.enc):
            h = enc(down(h))
            skips.append(h)
        h = self.bottleneck(skips.pop())
        for up, merge, dec in zip(self.ups, self.merges, self.dec):
            h = dec(merge(skips.pop(), up(h)))
        h = self.head(h)
        if ph or pw:
            h = h[:, :, :H, :W]
        return x + h if self.residual else h


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """An eval-mode deep copy of ``model`` with every Conv2d + BatchNorm2d pair folded into one conv.

    Folds :class:`ConvNormAct` blocks and adjacent (Conv2d, BatchNorm2d) children of ``nn.Sequential``;
    the folded norm becomes ``nn.Identity``. Matches the eval-mode model to ~1e-5 in float32.

    Args:
        model: any module (it is not modified).

    Returns:
        The folded copy, in eval mode, with ``requires_grad`` kept.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    if not isinstance(model, nn.Module):
        raise TypeError(f"fold_batchnorm expects an nn.Module, got {type(model).__name__}")
    folded = copy.deepcopy(model).eval()
    for mod in folded.modules():
        if isinstance(mod, ConvNormAct) and isinstance(mod.norm, nn.BatchNorm2d) \
                and isinstance(mod.conv, nn.Conv2d) and mod.norm.track_running_stats:
            mod.conv = fuse_conv_bn_eval(mod.conv, mod.norm)
            mod.norm = nn.Identity()
        elif isinstance(mod, nn.Sequential):
            names = list(mod._modules)
            for a, b in zip(names[:-1], names[1:]):
                ca, nb = mod._modules[a], mod._modules[b]
                if isinstance(ca, nn.Conv2d) and isinstance(nb, nn.BatchNorm2d) and nb.track_running_stats:
                    mod._modules[a] = fuse_conv_bn_eval(ca, nb)
                    mod._modules[b] = nn.Identity()
    return folded


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
