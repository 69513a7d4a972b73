"""anomaly_map: the reference's own properties, then the fused Triton kernel against it."""
import pytest
import torch
import torch.nn.functional as F

from fae_fast import ops, reference
from fae_fast.config import GRADIENT_WEIGHT
from tests.helpers import assert_close, check_sm90_compile

triton = pytest.importorskip("triton")
from fae_fast.kernels import anomaly_map as K  # noqa: E402

AOT = """
from fae_fast.kernels._common import aot_compile
from fae_fast.kernels import anomaly_map as K
cfg = dict(K._GPU_CFG)
nw = cfg.pop("num_warps")
for xs, rs, smooth in [("*bf16", "*bf16", True), ("*u8", "*fp32", False)]:
    sig = dict(x_ptr=xs, r_ptr=rs, lh_ptr="*fp32", rw_ptr="*fp32", map_ptr="*fp32", score_ptr="*fp32")
    for error_id in range(3):
        consts = dict(SMOOTH=smooth, ERROR=error_id, GW=K.GRADIENT_WEIGHT, PRECISION=K._PRECISION, **cfg)
        aot_compile(K._anomaly_map_kernel, sig, consts, num_warps=nw)
import torch
from fae_fast._backend import BackendUnavailable
try:  # compiled Triton on CPU tensors: a clear error, not Triton's "0 active drivers"
    K.anomaly_map_triton(torch.rand(1, 3, 4, 4), torch.rand(1, 3, 4, 4))
    raise SystemExit("no error for CPU tensors without the interpreter")
except BackendUnavailable as exc:
    assert "TRITON_INTERPRET" in str(exc)
print("AOT-OK")
"""

# (B, C, H, W, n, k): 1x1, primes, non-square, W and H not tile multiples (tile 16 in the interpreter),
# several tiles per image, a filter wider than the image, n = 0, k = 1, k = 31, the maximal halo n = 8, k = 31
CASES = [
    (1, 3, 1, 1, 4, 7),
    (2, 3, 7, 13, 4, 7),
    (1, 3, 7, 13, 1, 31),
    (2, 1, 37, 21, 4, 7),
    (1, 3, 20, 33, 8, 31),
    (2, 3, 7, 13, 0, 7),
    (2, 3, 7, 13, 3, 1),
    (1, 2, 40, 5, 2, 3),
    (1, 3, 18, 1, 3, 5),
]


def _inputs(shape, x_dtype=torch.float32, r_dtype=torch.float32, device="cpu"):
    x = torch.rand(shape, device=device)
    r = (x + 0.2 * torch.randn(shape, device=device)).clamp(0, 1)
    r[..., : shape[2] // 2, : shape[3] // 3] += 0.5  # a "defect": a hot region whose border the filter spreads
    x = (x * 255).round().to(torch.uint8) if x_dtype == torch.uint8 else x.to(x_dtype)
    return x, r.to(r_dtype)


# ---------------------------------------------------------------- the reference's own properties

def test_reference_properties():
    x, r = _inputs((2, 3, 9, 11))
    amap, score = reference.anomaly_map(x, x.clone(), n=3, k=5)
    assert float(amap.abs().max()) == 0.0 and float(score.max()) == 0.0
    raw = (r - x).pow(2).mean(1, keepdim=True)
    assert_close(reference.anomaly_map(x, r, n=0, k=7)[0], raw)
    assert_close(reference.anomaly_map(x, r, n=4, k=1)[0], raw)
    # valid-count borders never darken: a constant error stays constant everywhere, borders included
    const, _ = reference.anomaly_map(x, x + 0.1, n=4, k=7)
    assert_close(const, torch.full_like(const, 0.01), atol=1e-7)
    # one pass of a window covering the whole image from every pixel is the image mean
    wide, s = reference.anomaly_map(x, r, n=1, k=2 * 11 + 1)
    assert_close(wide, raw.mean(dim=(2, 3), keepdim=True).expand_as(wide))
    assert_close(s, wide.amax(dim=(1, 2, 3)))
    # every pass is a weighted average (weights >= 0, sum 1): the max never grows
    amap, s = reference.anomaly_map(x, r, n=2, k=3)
    assert (s <= raw.amax(dim=(1, 2, 3)) + 1e-7).all()


def test_gradient_error_is_the_sobel_of_the_residual():
    x = torch.zeros(1, 3, 6, 7)
    step = x.clone()
    step[..., 3:] = 1.0                        # a unit step along W in every channel
    e = reference.error_image(x, step, "gradient")[0, 0]
    # |d/dW| = (1 + 2 + 1) / 8 = 1/2 on the two columns either side of the step, 0 elsewhere (also at the
    # replicated border): a step is scored where it is, not where the border is
    assert_close(e[:, 2:4], torch.full((6, 2), 0.25))
    assert float(e[:, :2].abs().max()) == 0.0 and float(e[:, 4:].abs().max()) == 0.0
    # a brightness offset of the whole reconstruction is no error at all for the gradient (it is for squared)
    assert float(reference.error_image(x, x + 0.3, "gradient").abs().max()) == 0.0
    assert_close(reference.error_image(x, x + 0.3, "squared"), torch.full((1, 1, 6, 7), 0.09))
    # the channel mean of per-channel gradients
    two = step.clone()
    two[:, 1:] = 0.0
    assert_close(reference.error_image(x, two, "gradient"), reference.error_image(x, step, "gradient") / 3)
    # both: the squared error plus the weighted gradient one
    both = reference.error_image(x, step, "squared+gradient")
    assert_close(both, reference.error_image(x, step, "squared")
                 + GRADIENT_WEIGHT * reference.error_image(x, step, "gradient"))


def test_separable_operator_equals_n_passes():
    """The L @ E @ R of the kernel is exactly n valid-count passes (checked in float64, all borders)."""
    e = torch.rand(1, 1, 11, 6, dtype=torch.float64)
    for n, k in [(1, 3), (3, 5), (2, 31)]:
        ref = e
        for _ in range(n):
            ref = F.avg_pool2d(ref, k, stride=1, padding=k // 2, count_include_pad=False)
        lh = K._build_box_operator(11, k, n, "cpu").double()
        rw = K._build_box_operator(6, k, n, "cpu").double().t()
        assert_close(lh @ e[0, 0] @ rw, ref[0, 0], dtype=torch.float32)


# ---------------------------------------------------------------- kernel vs reference

@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("error", reference.MAP_ERRORS)
def test_matches_reference(case, error):
    B, C, H, W, n, k = case
    x, r = _inputs((B, C, H, W))
    amap, score = K.anomaly_map_triton(x, r, n=n, k=k, error=error)
    ref_map, ref_score = reference.anomaly_map(x, r, n=n, k=k, error=error)
    assert amap.shape == (B, 1, H, W) and amap.dtype == torch.float32 and score.shape == (B,)
    assert_close(amap, ref_map, dtype=torch.float32)
    assert_close(score, ref_score, dtype=torch.float32)


@pytest.mark.parametrize("x_dtype,r_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                                             (torch.uint8, torch.bfloat16), (torch.uint8, torch.float32),
                                             (torch.float32, torch.float16)])
@pytest.mark.parametrize("error", reference.MAP_ERRORS)
def test_dtypes(x_dtype, r_dtype, error):
    # both sides upcast the same low-precision values to float32, so the float32 tolerance applies
    x, r = _inputs((2, 3, 7, 13), x_dtype, r_dtype)
    amap, score = K.anomaly_map_triton(x, r, n=2, k=5, error=error)
    ref_map, ref_score = reference.anomaly_map(x, r, n=2, k=5, error=error)
    assert_close(amap, ref_map, dtype=torch.float32)
    assert_close(score, ref_score, dtype=torch.float32)


@pytest.mark.parametrize("error", reference.MAP_ERRORS)
def test_non_contiguous_inputs(error):
    x, r = _inputs((2, 3, 17, 26))
    x = x.contiguous(memory_format=torch.channels_last)
    r = r.transpose(2, 3).contiguous().transpose(2, 3)[..., ::2]  # column-major plane, stride_w = 2 * H
    x = x[..., 1::2]
    amap, score = K.anomaly_map_triton(x, r, n=2, k=7, error=error)
    ref_map, ref_score = reference.anomaly_map(x, r, n=2, k=7, error=error)
    assert_close(amap, ref_map, dtype=torch.float32)
    assert_close(score, ref_score, dtype=torch.float32)


def test_tile_shapes_agree():
    """A 16x16 tile with a 16-deep K loop and a 32x16 tile give the same map (tile seams are exact)."""
    x, r = _inputs((1, 3, 35, 19))
    lh, rw = K._box_operators(35, 19, 5, 3, x.device)
    a, sa = K._launch(x, r, lh, rw, 3 * 2, 2, dict(TH=16, TW=16, BK=16, num_warps=1))
    b, sb = K._launch(x, r, lh, rw, 3 * 2, 2, dict(TH=32, TW=16, BK=16, num_warps=1))
    assert_close(a, b, dtype=torch.float32, atol=1e-7)
    assert torch.equal(sa, a.amax(dim=(1, 2, 3))) and torch.equal(sb, b.amax(dim=(1, 2, 3)))


# ---------------------------------------------------------------- through the dispatcher

def test_non_finite_error_stays_local_and_huge():
    """inf * 0 inside the band products would smear nan over the tile: the kernel bounds the error instead."""
    x, r = _inputs((1, 3, 20, 20))
    r[0, 1, 9, 9] = float("inf")
    amap, score = K.anomaly_map_triton(x, r, n=1, k=3)
    assert not torch.isnan(amap).any()
    assert float(score) >= 1e29
    ref, _ = reference.anomaly_map(x, r, n=1, k=3)
    far = torch.ones(20, 20, dtype=torch.bool)
    far[7:12, 7:12] = False  # outside the 3x3 neighbourhood (and a margin) the maps agree
    assert_close(amap[0, 0][far], ref[0, 0][far], dtype=torch.float32)


def test_ops_backend_triton_and_validation():
    x, r = _inputs((2, 3, 7, 13))
    amap, score = ops.anomaly_map(x, r, n=4, k=7, backend="triton")
    assert ops.last_backend("anomaly_map") == "triton"
    assert_close(amap, reference.anomaly_map(x, r, n=4, k=7)[0], dtype=torch.float32)
    for kw, match in [(dict(n=9), "n"), (dict(k=4), "k"), (dict(k=33), "k"), (dict(n=True), "n")]:
        with pytest.raises(ValueError, match=match):
            ops.anomaly_map(x, r, backend="triton", **kw)
    with pytest.raises(TypeError, match="recon"):
        ops.anomaly_map(x, r.to(torch.uint8), backend="triton")
    with pytest.raises(ValueError, match="recon shape"):
        ops.anomaly_map(x, r[:, :2], backend="triton")


def test_custom_op_path_matches_eager_path():
    """torch.ops.fae_fast_triton.anomaly_map (what torch.compile calls) gives what the eager launcher gives."""
    x, r = _inputs((2, 3, 7, 13))
    lh, rw = K._box_operators(7, 13, 5, 2, x.device)
    for error_id, error in enumerate(reference.MAP_ERRORS):
        amap, score = torch.ops.fae_fast_triton.anomaly_map(x, r, lh, rw, 4, error_id)
        ref_map, ref_score = reference.anomaly_map(x, r, n=2, k=5, error=error)
        assert_close(amap, ref_map, dtype=torch.float32)
        assert_close(score, ref_score, dtype=torch.float32)
        raw, _ = torch.ops.fae_fast_triton.anomaly_map(x, r, None, None, 0, error_id)
        assert_close(raw, reference.anomaly_map(x, r, n=0, k=5, error=error)[0], dtype=torch.float32)


def test_no_graph_break_under_dynamo_and_cached_operators():
    """One graph around the custom op; with a warm cache the band operators enter as constants (no rebuild)."""
    x, r = _inputs((1, 3, 8, 9))
    fn = lambda x, r: K.anomaly_map_triton(x, r, n=2, k=3)  # noqa: E731
    fn(x, r)  # eager call: fills the operator cache
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(fn)(x, r)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1, explanation.break_reasons
    code = explanation.graphs[0].code
    assert "fae_fast_triton.anomaly_map" in code and "matrix_power" not in code


# ---------------------------------------------------------------- the CUDA build, checked without a GPU

@pytest.mark.slow
def test_cuda_code_path_compiles_for_sm90():
    """The real (non-interpreted) kernels compile for sm_90 (in a subprocess: this process interprets)."""
    check_sm90_compile(AOT)


# ---------------------------------------------------------------- GPU only

GPU_CASES = [(64, 3, 256, 256, 4, 7), (3, 3, 512, 512, 4, 7), (512, 3, 33, 47, 2, 5), (2, 3, 300, 200, 8, 31),
             (4, 3, 256, 256, 0, 7), (1, 3, 1, 1, 4, 7)]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("r_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("error", reference.MAP_ERRORS)
def test_gpu_matches_reference(case, r_dtype, error):
    B, C, H, W, n, k = case
    x, r = _inputs((B, C, H, W), torch.uint8, r_dtype, device="cuda")
    amap, score = K.anomaly_map_triton(x, r, n=n, k=k, error=error)
    ref_map, ref_score = reference.anomaly_map(x, r, n=n, k=k, error=error)
    assert_close(amap, ref_map, dtype=torch.float32)  # tf32x3 on tensor cores must keep float32 accuracy
    assert_close(score, ref_score, dtype=torch.float32)


@pytest.mark.gpu
def test_gpu_no_graph_break():
    x, r = _inputs((4, 3, 64, 64), torch.uint8, torch.bfloat16, device="cuda")
    fn = lambda x, r: K.anomaly_map_triton(x, r, n=4, k=7)  # noqa: E731
    explanation = torch._dynamo.explain(fn)(x, r)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    amap, score = torch.compile(fn)(x, r)
    assert_close(amap, fn(x, r)[0], dtype=torch.float32)
