"""fae_fast::rasterize_strokes (C++ extension) against fae_fast.reference.rasterize_strokes.

The extension evaluates the same float expressions in the same order as the reference (only the segments whose
inflated bounding box covers a pixel), so it matches to ~1e-6. Tests that need the built ``fae_fast._C`` skip
with the reason when it is missing or disabled (``FAE_FAST_NO_EXT=1``).
"""
import pytest
import torch

from fae_fast import ops
from fae_fast import reference as R
from tests.helpers import assert_close

pytestmark = pytest.mark.ext


def _strokes(B, S, H, W, wmax=4.0, gen_seed=0, margin=0.2):
    """Control points that spill a little outside the image, widths in (-0.5, wmax) so some draw nothing."""
    g = torch.Generator().manual_seed(gen_seed)
    lo = torch.tensor([-margin * W, -margin * H])
    span = torch.tensor([(1 + 2 * margin) * W, (1 + 2 * margin) * H])
    ctrl = lo + torch.rand(B, S, 4, 2, generator=g) * span
    width = torch.rand(B, S, generator=g) * (wmax + 0.5) - 0.5
    return ctrl, width


CASES = [  # B, S, H, W, samples
    (2, 3, 17, 23, 32),
    (1, 1, 1, 1, 32),
    (3, 5, 31, 7, 5),
    (2, 4, 29, 37, 2),
    (1, 6, 41, 43, 100),
]


@pytest.mark.parametrize("B,S,H,W,samples", CASES, ids=lambda v: str(v))
def test_matches_reference(ext, B, S, H, W, samples):
    ctrl, width = _strokes(B, S, H, W)
    got = ext.rasterize_strokes(ctrl, width, H, W, samples=samples)
    want = R.rasterize_strokes(ctrl, width, H, W, samples=samples)
    assert got.shape == (B, 1, H, W) and got.dtype == torch.float32
    assert_close(got, want, atol=1e-5, rtol=0)


def test_thick_strokes_and_bbox_margin(ext):
    # wide strokes: the culling box (w/2 + 1) must contain every pixel with non-zero coverage
    ctrl, _ = _strokes(2, 3, 40, 40, gen_seed=3)
    width = torch.tensor([[12.0, 0.3, 25.0], [7.5, 1.0, 0.01]])
    assert_close(ext.rasterize_strokes(ctrl, width, 40, 40), R.rasterize_strokes(ctrl, width, 40, 40),
                 atol=1e-5, rtol=0)


def test_degenerate_curves(ext):
    # all four control points equal: zero-length segments (L2 clamped to 1e-12) draw a disc
    ctrl = torch.full((1, 2, 4, 2), 10.0)
    ctrl[0, 1] = torch.tensor([3.0, 15.0])
    width = torch.tensor([[4.0, 1.0]])
    got = ext.rasterize_strokes(ctrl, width, 20, 20)
    assert_close(got, R.rasterize_strokes(ctrl, width, 20, 20), atol=1e-5, rtol=0)
    assert float(got[0, 0, 10, 10]) == 1.0


def test_non_positive_widths_draw_nothing(ext):
    ctrl, _ = _strokes(2, 3, 16, 16)
    out = ext.rasterize_strokes(ctrl, torch.tensor([[0.0, -1.0, -0.0], [0.0, 0.0, -5.0]]), 16, 16)
    assert torch.equal(out, torch.zeros(2, 1, 16, 16))


def test_noncontiguous_and_float64_inputs(ext):
    ctrl, width = _strokes(3, 4, 19, 21)
    ctrl_nc = ctrl.transpose(0, 1).contiguous().transpose(0, 1)  # (3, 4, 4, 2) with permuted strides
    width_nc = width.t().contiguous().t()
    assert not ctrl_nc.is_contiguous() and not width_nc.is_contiguous()
    want = R.rasterize_strokes(ctrl, width, 19, 21)
    assert_close(ext.rasterize_strokes(ctrl_nc, width_nc, 19, 21), want, atol=1e-5, rtol=0)
    # float64 control points are rounded to float32 first, like the reference's bezier_points
    assert_close(ext.rasterize_strokes(ctrl.double(), width.double(), 19, 21), want, atol=1e-5, rtol=0)


def test_deterministic_and_dispatcher(ext):
    ctrl, width = _strokes(2, 3, 24, 24)
    a = ext.rasterize_strokes(ctrl, width, 24, 24)
    assert torch.equal(a, ext.rasterize_strokes(ctrl, width, 24, 24))
    b = ops.rasterize_strokes(ctrl, width, 24, 24, backend="ext")
    assert ops.last_backend("rasterize_strokes") == "ext" and torch.equal(a, b)


def test_opcheck(ext):
    ctrl, width = _strokes(2, 3, 12, 10)
    torch.library.opcheck(torch.ops.fae_fast.rasterize_strokes, (ctrl, width, 12, 10, 8))


@pytest.mark.gpu
def test_cuda_matches_reference(ext):
    if not ext.device_supported(torch.device("cuda")):
        pytest.skip("extension built without CUDA")
    for B, S, H, W, samples in CASES + [(16, 8, 256, 256, 32)]:
        ctrl, width = _strokes(B, S, H, W)
        ctrl, width = ctrl.cuda(), width.cuda()
        got = ext.rasterize_strokes(ctrl, width, H, W, samples=samples)
        assert_close(got, R.rasterize_strokes(ctrl, width, H, W, samples=samples), atol=1e-5, rtol=0)
        assert torch.equal(got, ext.rasterize_strokes(ctrl, width, H, W, samples=samples))
    # many segments: more than one 256-segment chunk per tile
    ctrl, width = _strokes(2, 40, 64, 64, gen_seed=5)
    ctrl, width = ctrl.cuda(), width.cuda()
    assert_close(ext.rasterize_strokes(ctrl, width, 64, 64), R.rasterize_strokes(ctrl, width, 64, 64),
                 atol=1e-5, rtol=0)
