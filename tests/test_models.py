"""The modified U-Net (fae_fast.models): shapes, variants, channels_last, BatchNorm folding, a tiny overfit."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from fae_fast.config import ModelConfig
from fae_fast.models import UNet, build_model, count_parameters, fold_batchnorm
from tests.helpers import assert_close

TINY = dict(widths=(8, 16, 24), dilations=(1, 2))


def _randomise(net: nn.Module) -> nn.Module:
    """Non-trivial weights everywhere (the residual head starts at zero) and non-trivial BN statistics."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
        nn.init.normal_(net.head.weight, std=0.1)
    return net


@pytest.mark.parametrize("hw", [(1, 1), (7, 7), (37, 50), (64, 33), (31, 97)])
def test_shapes_odd_and_non_square(hw):
    net = UNet(**TINY).eval()
    x = torch.rand(2, 3, *hw)
    y = net(x)
    assert y.shape == x.shape
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("widths", [(4,), (4, 8), (6, 10, 14, 18, 22)])
def test_widths_configurable(widths):
    net = build_model(ModelConfig(widths=widths, dilations=(1, 2))).eval()
    x = torch.rand(1, 3, 19, 23)
    assert net(x).shape == x.shape
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert max(c.out_channels for c in convs) == max(widths)
    assert net.factor == 2 ** (len(widths) - 1)


@pytest.mark.parametrize("norm,cls", [("batch", nn.BatchNorm2d), ("group", nn.GroupNorm),
                                      ("instance", nn.InstanceNorm2d), ("none", None)])
@pytest.mark.parametrize("act", ["relu", "silu", "gelu"])
def test_norm_and_act_variants(norm, cls, act):
    net = build_model(ModelConfig(norm=norm, act=act, **TINY))
    kinds = {type(m) for m in net.modules()}
    if cls is None:
        assert not kinds & {nn.BatchNorm2d, nn.GroupNorm, nn.InstanceNorm2d}
        # no norm -> every conv carries a bias
        assert all(m.bias is not None for m in net.modules() if isinstance(m, nn.Conv2d))
    else:
        assert cls in kinds
        # conv followed by a norm has no bias
        assert all(b.conv.bias is None for b in net.modules() if hasattr(b, "conv") and hasattr(b, "norm"))
    x = torch.rand(2, 3, 20, 20)
    net.train()
    y = net(x)
    assert y.shape == x.shape
    y.sum().backward()


def test_gate_on_off():
    gated = UNet(**TINY, gated_skips=True)
    concat = UNet(**TINY, gated_skips=False, skip_mode="concat")
    add = UNet(**TINY, gated_skips=False, skip_mode="add")
    assert any(hasattr(m, "gate") for m in gated.merges)
    assert not any(hasattr(m, "gate") for m in concat.merges)
    # concat doubles the input of the first decoder conv
    assert concat.dec[0][0].conv.in_channels == 2 * add.dec[0][0].conv.in_channels
    x = torch.rand(1, 3, 24, 24)
    for net in (gated, concat, add):
        assert net.eval()(x).shape == x.shape
    with pytest.raises(ValueError, match="skip_mode"):
        UNet(**TINY, gated_skips=False, skip_mode="mul")


def test_gate_formula():
    """The gate output is s * e + (1 - s) * d with s = sigmoid(conv1x1([e, d]))."""
    merge = UNet(**TINY).merges[0]
    e, d = torch.randn(2, 16, 5, 6), torch.randn(2, 16, 5, 6)
    s = torch.sigmoid(merge.gate(torch.cat((e, d), 1)))
    assert_close(merge(e, d), s * e + (1 - s) * d, atol=1e-6, rtol=1e-6)


def test_residual_identity_at_init():
    x = torch.rand(2, 3, 21, 18)
    assert torch.equal(UNet(**TINY, residual=True).eval()(x), x)
    assert not torch.allclose(UNet(**TINY, residual=False).eval()(x), x)


@pytest.mark.parametrize("down,up", [("maxpool", "bilinear"), ("conv", "transpose")])
def test_channels_last_parity(down, up):
    net = _randomise(UNet(**TINY, downsample=down, upsample=up)).eval()
    x = torch.rand(2, 3, 29, 40)
    ref = net(x)
    xc = x.contiguous(memory_format=torch.channels_last)
    out = net.to(memory_format=torch.channels_last)(xc)
    assert_close(out, ref, atol=1e-5, rtol=1e-4)


def test_channels_last_preserved():
    net = _randomise(UNet(**TINY)).eval().to(memory_format=torch.channels_last)
    x = torch.rand(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    assert net(x).is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("down", ["maxpool", "conv"])
def test_fold_batchnorm_parity(down):
    net = _randomise(UNet(**TINY, downsample=down))
    x = torch.rand(2, 3, 23, 30)
    ref = net.eval()(x)
    folded = fold_batchnorm(net)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in net.modules())  # the original is untouched
    assert not folded.training
    assert_close(folded(x), ref, atol=1e-5, rtol=1e-5)


def test_fold_batchnorm_sequential_and_type_error():
    seq = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU())
    _randomise_bn = seq[1]
    with torch.no_grad():
        _randomise_bn.running_var.fill_(2.0)
        _randomise_bn.running_mean.fill_(0.3)
    x = torch.rand(1, 3, 8, 8)
    ref = seq.eval()(x)
    folded = fold_batchnorm(seq)
    assert isinstance(folded[1], nn.Identity)
    assert_close(folded(x), ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(TypeError):
        fold_batchnorm("not a model")


def test_hide_cell_inpaints_what_it_hides():
    """In eval mode, a pixel's output does not depend on its own cell (the pass that hid it sees the image mean
    there); the plain pass does. Training mode is the plain pass."""
    net = _randomise(UNet(**TINY, hide_cell=4)).eval()
    plain = UNet(**TINY).eval()
    plain.load_state_dict(net.state_dict())
    # multiples of 1/256: the image sums, and so the means that fill the hidden cells, are exact in float32
    x = torch.randint(0, 256, (2, 3, 23, 30), generator=torch.Generator().manual_seed(0)).float() / 256
    y = x.clone()
    y[:, :, 9, 5] += 0.25     # a change inside the cell rows 8-11, columns 4-7 that keeps the image mean exactly
    y[:, :, 10, 6] -= 0.25
    cell = (slice(None), slice(None), slice(8, 12), slice(4, 8))
    with torch.no_grad():
        assert torch.equal(net(x)[cell], net(y)[cell])
        assert not torch.allclose(plain(x)[cell], plain(y)[cell], atol=1e-3)
        # each pixel comes from its own pass: the cells that pass 0 hides, reconstructed by hand
        hide = net.hidden_cells(23, 30)[0]
        assert hide.sum() > 0 and torch.equal(net.hidden_cells(23, 30).sum(0), torch.ones(1, 23, 30))
        by_hand = plain(torch.lerp(x, x.mean(dim=(2, 3), keepdim=True), hide))
        assert_close(net(x) * hide, by_hand * hide, atol=1e-5, rtol=1e-5)
        assert_close(net.train()(x), plain.train()(x), atol=0, rtol=0)
    with pytest.raises(ValueError, match="hide_cell"):
        UNet(**TINY, hide_cell=-1)
    assert build_model(ModelConfig(**TINY, hide_cell=8)).hide_cell == 8


def test_default_param_count():
    n = count_parameters(build_model(ModelConfig()))
    # widths 64-128-256-512, dilated bottleneck 1-2-4-8, gated skips: about 16.0 M parameters
    assert 15.5e6 < n < 16.5e6, n


def test_bad_config_raises():
    with pytest.raises(ValueError, match="norm"):
        build_model(ModelConfig(norm="layer"))
    with pytest.raises(ValueError, match="act"):
        build_model(ModelConfig(act="tanh"))
    with pytest.raises(TypeError):
        build_model({"widths": (8,)})
    with pytest.raises(ValueError, match="UNet expects"):
        UNet(**TINY)(torch.rand(1, 1, 8, 8))


def test_tiny_overfit_reduces_loss():
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: threads only add contention on a shared CI machine
    try:
        net = UNet(widths=(8, 16), dilations=(1,), residual=False)
        x = torch.rand(2, 3, 16, 16)
        opt = torch.optim.Adam(net.parameters(), lr=1e-2)
        losses = []
        for _ in range(12):
            loss = (net(x) - x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    finally:
        torch.set_num_threads(threads)
    assert losses[-1] < 0.5 * losses[0], losses


def test_members_average_their_reconstructions():
    """``model.members`` = K: K networks of the configured architecture, each with its own initialisation, whose
    outputs are averaged; ``residual`` and ``hide_cell`` read and set every member's; BatchNorm folds in each."""
    from fae_fast.models import Members

    torch.manual_seed(0)
    assert isinstance(build_model(ModelConfig(**TINY)), UNet)  # one member: the plain network, as before
    m = build_model(ModelConfig(**TINY, members=3))
    assert isinstance(m, Members) and len(m.members) == 3 and m.in_channels == 3
    for net in m.members:
        _randomise(net)
    sd = [net.state_dict() for net in m.members]
    assert not torch.equal(sd[0]["stem.0.conv.weight"], sd[1]["stem.0.conv.weight"])  # own initialisations
    m.eval()
    x = torch.rand(2, 3, 21, 30)
    with torch.no_grad():
        outs = [net(x) for net in m.members]
        assert_close(m(x), (outs[0] + outs[1] + outs[2]) / 3, atol=1e-6, rtol=1e-6)
        assert_close(fold_batchnorm(m)(x), m(x), atol=1e-5, rtol=1e-5)
        # residual off everywhere: the mean of the corrections, x + that mean is the model's output
        assert m.residual is True
        m.residual = False
        assert [net.residual for net in m.members] == [False] * 3 and m.residual is False
        assert_close(x + m(x), (outs[0] + outs[1] + outs[2]) / 3, atol=1e-6, rtol=1e-6)
    m.hide_cell = 4
    assert [net.hide_cell for net in m.members] == [4] * 3 and m.hide_cell == 4
    with pytest.raises(ValueError, match="at least 2 networks"):
        Members([UNet(**TINY)])
