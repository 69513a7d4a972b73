"""fae_fast::elastic_warp / elastic_field / elastic_warp_field (C++ extension) against fae_fast.reference.

The extension's noise is a counter hash (not torch.Generator), so the warp is compared exactly through the
explicit ``field=`` form, and the field itself statistically. Tests that need the built ``fae_fast._C`` skip
with the reason when it is missing or disabled (``FAE_FAST_NO_EXT=1``).
"""
import math

import pytest
import torch

from fae_fast import ops
from fae_fast import reference as R
from tests.helpers import TOL, assert_close

pytestmark = pytest.mark.ext


def _mask(shape, dtype, gen_seed=0):
    g = torch.Generator().manual_seed(gen_seed)
    if dtype == torch.uint8:
        return torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
    return torch.rand(shape, generator=g).to(dtype)


def _field(B, H, W, scale=3.0, gen_seed=1):
    # a few pixels of displacement: many samples fall between pixels, some outside the image
    return torch.randn(B, 2, H, W, generator=torch.Generator().manual_seed(gen_seed)) * scale


SHAPES = [(2, 1, 17, 23), (3, 4, 13, 11), (1, 1, 1, 1), (2, 3, 31, 7), (1, 2, 1, 29)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.uint8, torch.float64], ids=str)
def test_warp_with_field_matches_reference(ext, shape, dtype):
    B, K, H, W = shape
    mask, field = _mask(shape, dtype), _field(B, H, W)
    a, s = torch.ones(B), torch.ones(B)
    got = ext.elastic_warp(mask, a, s, 0, field=field)
    want = R.elastic_warp(mask, a, s, 0, field=field)
    assert got.dtype == mask.dtype and got.shape == mask.shape
    if dtype == torch.uint8:
        # same float value, rounded: grid_sample's coordinate round trip may move a .5 to the other side
        assert (got.int() - want.int()).abs().max() <= 1
    elif dtype == torch.float64:
        # the reference computes float64 masks in float32; the extension in float64
        assert_close(got, want, dtype=torch.float32)
    else:
        assert_close(got, want, dtype=dtype)


def test_warp_noncontiguous_inputs(ext):
    base = _mask((2, 13, 17, 3), torch.float32)
    mask = base.permute(0, 3, 1, 2)  # (2, 3, 13, 17), channels-last strides
    field = _field(2, 17, 13).transpose(2, 3)  # (2, 2, 13, 17), transposed strides
    assert not mask.is_contiguous() and not field.is_contiguous()
    got = ext.elastic_warp(mask, None, None, 0, field=field)
    assert_close(got, R.elastic_warp(mask.contiguous(), None, None, 0, field=field.contiguous()))


def test_zero_displacement_is_identity(ext):
    mask = _mask((2, 3, 9, 14), torch.float32)
    out = ext.elastic_warp(mask, torch.zeros(2), torch.full((2,), 3.0), 7)
    assert torch.equal(out, mask)


def test_same_seed_bitwise_different_seed_differs(ext):
    mask = _mask((3, 2, 24, 20), torch.float32)
    a, s = torch.tensor([1.0, 2.0, 4.0]), torch.tensor([2.0, 3.0, 5.0])
    o1, o2 = ext.elastic_warp(mask, a, s, 123), ext.elastic_warp(mask, a, s, 123)
    assert torch.equal(o1, o2)
    assert not torch.equal(o1, ext.elastic_warp(mask, a, s, 124))
    f1 = ext.elastic_field(mask.shape, a, s, 123)
    assert torch.equal(f1, ext.elastic_field(mask.shape, a, s, 123))
    # warp(seed) is exactly warp(field of that seed): the RMS scale folded into the warp is the same product
    assert torch.equal(o1, ext.elastic_warp(mask, a, s, 0, field=f1))
    # sample b's noise depends only on (seed, b, y, x): with the same blur radius (the batch max smoothness),
    # sample 0 does not change with the rest of the batch
    s5 = torch.full((3,), 5.0)
    f_batch = ext.elastic_field((3, 1, 24, 20), a, s5, 123)
    assert torch.equal(f_batch[:1], ext.elastic_field((1, 1, 24, 20), a[:1], s5[:1], 123))


def test_field_does_not_depend_on_thread_count(ext):
    a, s = torch.tensor([1.0, 3.0]), torch.tensor([2.0, 4.0])
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ext.elastic_field((2, 1, 33, 35), a, s, 8)
        torch.set_num_threads(max(2, before))
        many = ext.elastic_field((2, 1, 33, 35), a, s, 8)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, many)


def test_field_is_unit_rms_times_alpha(ext):
    a, s = torch.tensor([0.5, 2.0, 7.0]), torch.tensor([0.0, 2.0, 6.0])
    f = ext.elastic_field((3, 1, 40, 36), a, s, 5)
    assert f.shape == (3, 2, 40, 36) and f.dtype == torch.float32
    rms = f.double().pow(2).mean(dim=(1, 2, 3)).sqrt()
    assert_close(rms, a.double(), atol=1e-5, rtol=1e-5)


def test_white_noise_is_standard_normal(ext):
    # smoothness 0: radius 0, no blur, so the field is the raw Box-Muller noise rescaled to unit RMS
    f = ext.elastic_field((4, 1, 64, 64), torch.ones(4), torch.zeros(4), 11).flatten()
    n = f.numel()
    assert abs(float(f.mean())) < 4 / math.sqrt(n)
    inside = float((f.abs() < 1).float().mean())
    assert abs(inside - 0.6827) < 0.01
    kurt = float(f.pow(4).mean())  # 3 for a Gaussian
    assert abs(kurt - 3.0) < 0.15
    g = ext.elastic_field((4, 1, 64, 64), torch.ones(4), torch.zeros(4), 11)
    dx, dy = g[:, 0].flatten(), g[:, 1].flatten()
    assert abs(float((dx * dy).mean())) < 4 / math.sqrt(n / 2)  # the two components are uncorrelated


def _neighbour_corr(f):
    f = f - f.mean(dim=(2, 3), keepdim=True)
    num = (f[..., :, 1:] * f[..., :, :-1]).mean()
    return float(num / f.pow(2).mean())


def test_smoothness_sets_correlation_length_like_reference(ext):
    B, H, W = 8, 48, 48
    corr = []
    for sm in (1.0, 3.0, 6.0):
        s = torch.full((B,), sm)
        c_ext = _neighbour_corr(ext.elastic_field((B, 1, H, W), torch.ones(B), s, 3))
        c_ref = _neighbour_corr(R.elastic_field((B, 1, H, W), torch.ones(B), s, 3))
        # same blur, different white noise: the statistic agrees up to sampling error
        assert abs(c_ext - c_ref) < 0.03, (sm, c_ext, c_ref)
        corr.append(c_ext)
    assert corr[0] < corr[1] < corr[2]
    # a Gaussian of std s makes the lag-1 correlation exp(-1 / (4 s^2)) (before border effects)
    assert abs(corr[1] - math.exp(-1 / 36)) < 0.03


def test_radius_is_cropped_on_tiny_images(ext):
    # smoothness far wider than the image: the kernel is cropped to n - 1 and renormalised (reflect border)
    for H, W in ((1, 1), (2, 5), (3, 1)):
        f = ext.elastic_field((2, 1, H, W), torch.tensor([1.0, 3.0]), torch.tensor([20.0, 0.5]), 9)
        assert torch.isfinite(f).all()
        assert_close(f.pow(2).mean(dim=(1, 2, 3)).sqrt(), torch.tensor([1.0, 3.0]), atol=1e-5, rtol=1e-5)


def test_uint8_masks_stay_binary_like_and_in_range(ext):
    mask = torch.zeros(2, 1, 32, 32, dtype=torch.uint8)
    mask[:, :, 8:24, 8:24] = 255
    out = ext.elastic_warp(mask, torch.full((2,), 2.0), torch.full((2,), 4.0), 1)
    assert out.dtype == torch.uint8
    frac = out.float().mean() / mask.float().mean()
    assert 0.8 < float(frac) < 1.2  # a smooth warp roughly preserves the area
    assert not torch.equal(out, mask)


def test_dispatcher_uses_ext_on_cpu(ext):
    mask = _mask((2, 1, 12, 12), torch.float32)
    out = ops.elastic_warp(mask, 1.5, 2.0, seed=4, backend="ext")
    assert ops.last_backend("elastic_warp") == "ext"
    assert torch.equal(out, ext.elastic_warp(mask, torch.full((2,), 1.5), torch.full((2,), 2.0), 4))
    ops.elastic_warp(mask, 1.5, 2.0, seed=4)
    assert ops.last_backend("elastic_warp") == "ext"  # auto picks the extension on CPU when it loads


def test_opcheck(ext):
    mask = _mask((2, 2, 9, 11), torch.float32)
    a, s = torch.tensor([1.0, 2.0]), torch.tensor([1.5, 2.5])
    torch.library.opcheck(torch.ops.fae_fast.elastic_warp, (mask, a, s, 3))
    torch.library.opcheck(torch.ops.fae_fast.elastic_warp_field, (mask, _field(2, 9, 11)))
    torch.library.opcheck(torch.ops.fae_fast.elastic_warp_field, (_mask((2, 1, 9, 11), torch.uint8), _field(2, 9, 11)))
    torch.library.opcheck(torch.ops.fae_fast.elastic_field, (a, s, 3, 9, 11))


def test_torch_compile_fullgraph(ext):
    """The one torch.compile test of the extension (~25 s on CPU): both ops trace through their fakes."""
    from fae_fast._ext import elastic_warp, rasterize_strokes

    def f(mask, a, s, ctrl, width):
        strokes = rasterize_strokes(ctrl, width, mask.shape[2], mask.shape[3], samples=8)
        return elastic_warp(torch.maximum(mask, strokes), a, s, 5) * 2.0

    mask = _mask((2, 1, 16, 16), torch.float32)
    a, s = torch.tensor([1.0, 2.0]), torch.tensor([2.0, 3.0])
    ctrl, width = torch.rand(2, 3, 4, 2) * 16, torch.tensor([[1.0, 2.0, 0.0], [3.0, -1.0, 1.5]])
    compiled = torch.compile(f, fullgraph=True)  # inductor: the ops stay extern calls inside generated code
    assert torch.equal(compiled(mask, a, s, ctrl, width), f(mask, a, s, ctrl, width))


# ---------------------------------------------------------------- CUDA (run on a GPU machine)

@pytest.mark.gpu
def test_cuda_field_equals_cpu_field(ext):
    if not ext.device_supported(torch.device("cuda")):
        pytest.skip("extension built without CUDA")
    a, s = torch.tensor([1.0, 2.5, 4.0]), torch.tensor([0.0, 2.0, 7.0])
    for shape in ((3, 1, 64, 48), (3, 2, 7, 131), (3, 1, 1, 1)):
        f_cpu = ext.elastic_field(shape, a, s, 42)
        f_gpu = ext.elastic_field(shape, a.cuda(), s.cuda(), 42)
        # same hash and float expressions (no libm, no FMA): equal up to the RMS reduction order
        assert_close(f_gpu, f_cpu, atol=1e-4, rtol=1e-4)
        assert torch.equal(f_gpu, ext.elastic_field(shape, a.cuda(), s.cuda(), 42))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.uint8], ids=str)
def test_cuda_warp_matches_reference(ext, dtype):
    if not ext.device_supported(torch.device("cuda")):
        pytest.skip("extension built without CUDA")
    shape = (4, 3, 61, 53)
    mask, field = _mask(shape, dtype).cuda(), _field(4, 61, 53).cuda()
    got = ext.elastic_warp(mask, None, None, 0, field=field)
    want = R.elastic_warp(mask, None, None, 0, field=field)
    if dtype == torch.uint8:
        assert (got.int() - want.int()).abs().max() <= 1
    else:
        assert_close(got, want, dtype=dtype)
    a, s = torch.full((4,), 3.0, device="cuda"), torch.full((4,), 5.0, device="cuda")
    o = ext.elastic_warp(mask, a, s, 9)
    assert torch.equal(o, ext.elastic_warp(mask, a, s, 9))
    assert torch.equal(o, ext.elastic_warp(mask, a, s, 0, field=ext.elastic_field(shape, a, s, 9)))


@pytest.mark.gpu
def test_cuda_big_batch_matches_cpu(ext):
    if not ext.device_supported(torch.device("cuda")):
        pytest.skip("extension built without CUDA")
    mask = _mask((64, 1, 256, 256), torch.uint8)
    a, s = torch.rand(64) * 4, torch.rand(64) * 8 + 0.5
    cpu = ext.elastic_warp(mask, a, s, 77)
    gpu = ext.elastic_warp(mask.cuda(), a.cuda(), s.cuda(), 77).cpu()
    assert (cpu.int() - gpu.int()).abs().max() <= 1
    assert float((cpu != gpu).float().mean()) < 1e-4
