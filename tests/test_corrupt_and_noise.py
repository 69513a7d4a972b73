"""corrupt_and_noise: the reference's own properties, then the Triton kernel against it (interpreter on CPU)."""
import pytest
import torch

from fae_fast import ops, reference
from tests.helpers import assert_close, check_sm90_compile

triton = pytest.importorskip("triton")
from fae_fast.kernels import corrupt_and_noise as K  # noqa: E402

AOT = """
from fae_fast.kernels._common import aot_compile
from fae_fast.kernels.corrupt_and_noise import _corrupt_and_noise_kernel as k
for xs, out, noise, flat in [("*bf16", "*bf16", False, True), ("*u8", "*fp32", True, False)]:
    sig = dict(x_ptr=xs, t_ptr=xs, m_ptr="*fp32", sigma_ptr="*fp32", noise_ptr="*fp32", out_ptr=out, seed="i64")
    aot_compile(k, sig, dict(HAS_NOISE=noise, FLAT=flat, BLOCK=1024))
print("AOT-OK")
"""

SHAPES = [(1, 3, 1, 1), (2, 3, 7, 13), (1, 1, 5, 37), (3, 2, 17, 9)]  # 1x1, primes, W not a block multiple


def _inputs(shape, dtype=torch.float32, tex_dtype=None, device="cpu"):
    B, C, H, W = shape
    x = torch.rand(shape, device=device)
    t = torch.rand(shape, device=device)
    x = (x * 255).round().to(torch.uint8) if dtype == torch.uint8 else x.to(dtype)
    tex_dtype = tex_dtype or dtype
    t = (t * 255).round().to(torch.uint8) if tex_dtype == torch.uint8 else t.to(tex_dtype)
    m = torch.rand(B, 1, H, W, device=device) * (torch.rand(B, 1, H, W, device=device) > 0.5)
    sigma = torch.rand(B, device=device) * 0.1
    noise = torch.randn(shape, device=device) * sigma.view(-1, 1, 1, 1)
    return x, t, m, sigma, noise


def _oracle(x, t, m, noise):
    """float64 version of the formula, the yardstick for low-precision outputs."""
    f = (lambda v: v.double() / 255.0) if x.dtype == torch.uint8 else (lambda v: v.double())
    g = (lambda v: v.double() / 255.0) if t.dtype == torch.uint8 else (lambda v: v.double())
    return f(x) + m.double() * (g(t) - f(x)) + noise.double()


# ---------------------------------------------------------------- the reference's own properties

def test_reference_identities():
    x, t, m, sigma, noise = _inputs((2, 3, 8, 8))
    zero = torch.zeros_like(m)
    assert torch.equal(reference.corrupt_and_noise(x, t, zero, torch.zeros(2), 0), x)
    assert_close(reference.corrupt_and_noise(x, t, torch.ones_like(m), torch.zeros(2), 0), t)
    assert_close(reference.corrupt_and_noise(x, t, zero, sigma, 0, noise=noise), x + noise)
    u = (x * 255).to(torch.uint8)
    assert reference.corrupt_and_noise(u, u, m, sigma, 0).dtype == torch.float32


def test_reference_noise_is_seeded():
    x, t, m, sigma, _ = _inputs((2, 3, 8, 8))
    a = reference.corrupt_and_noise(x, t, m, sigma, 7)
    assert torch.equal(a, reference.corrupt_and_noise(x, t, m, sigma, 7))
    assert not torch.equal(a, reference.corrupt_and_noise(x, t, m, sigma, 8))


# ---------------------------------------------------------------- kernel vs reference (explicit noise)

@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference_fp32(shape):
    x, t, m, sigma, noise = _inputs(shape)
    out = K.corrupt_and_noise_triton(x, t, m, sigma, 3, noise=noise)
    assert_close(out, reference.corrupt_and_noise(x, t, m, sigma, 3, noise=noise), dtype=torch.float32)


@pytest.mark.parametrize("dtype,tex_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                                             (torch.uint8, torch.uint8), (torch.float32, torch.uint8),
                                             (torch.float64, torch.float32)])
def test_dtypes(dtype, tex_dtype):
    x, t, m, sigma, noise = _inputs((2, 3, 7, 13), dtype, tex_dtype)
    out = K.corrupt_and_noise_triton(x, t, m, sigma, 3, noise=noise)
    ref = reference.corrupt_and_noise(x, t, m, sigma, 3, noise=noise)
    assert out.dtype == ref.dtype == (torch.float32 if dtype == torch.uint8 else dtype)
    if ref.dtype in (torch.bfloat16, torch.float16):
        # flash-attention's rule: at most twice the reference's own rounding error against a float64 oracle
        oracle = _oracle(x, t, m, noise)
        err, ref_err = (out.double() - oracle).abs().max(), (ref.double() - oracle).abs().max()
        assert err <= 2 * ref_err + 1e-6, (err, ref_err)
        assert_close(out, ref, dtype=ref.dtype)
    else:
        assert_close(out, ref, dtype=torch.float32)


def test_non_contiguous_inputs_and_layout():
    x, t, m, sigma, noise = _inputs((2, 3, 9, 26))
    x = x.contiguous(memory_format=torch.channels_last)      # flat plane, stride_w = C
    t = t[..., ::2]                                            # stride_w = 2: general (div/mod) addressing
    x = x[..., ::2]
    m = m.transpose(2, 3).contiguous().transpose(2, 3)[..., ::2]
    noise = noise[..., 1::2]
    out = K.corrupt_and_noise_triton(x, t, m, sigma, 3, noise=noise)
    assert_close(out, reference.corrupt_and_noise(x, t, m, sigma, 3, noise=noise), dtype=torch.float32)
    cl = x.contiguous(memory_format=torch.channels_last)
    out_cl = K.corrupt_and_noise_triton(cl, t, m, sigma, 3, noise=noise)
    assert out_cl.is_contiguous(memory_format=torch.channels_last)  # layout of x is kept for the network
    assert_close(out_cl, out, dtype=torch.float32)


# ---------------------------------------------------------------- the Philox stream

def test_same_seed_bitwise_different_seed_differs_block_independent():
    x, t, m, sigma, _ = _inputs((2, 3, 7, 13))
    a = K.corrupt_and_noise_triton(x, t, m, sigma, 11)
    assert torch.equal(a, K.corrupt_and_noise_triton(x, t, m, sigma, 11))
    assert torch.equal(a, K._launch(x, t, m, sigma, 11, None, block=16))  # 6 blocks per plane instead of 1
    assert not torch.equal(a, K.corrupt_and_noise_triton(x, t, m, sigma, 12))
    big = K.corrupt_and_noise_triton(x, t, m, sigma, 2 ** 62 + 11)  # 64-bit seeds use both key words
    assert not torch.equal(a, big)


def test_noise_moments():
    B, C, H, W = 4, 3, 32, 32
    x = torch.full((B, C, H, W), 0.5)
    sigma = torch.tensor([0.02, 0.05, 0.1, 0.2])
    eps = K.corrupt_and_noise_triton(x, x, torch.zeros(B, 1, H, W), sigma, 5) - x
    z = (eps / sigma.view(-1, 1, 1, 1)).flatten(1)  # (B, 3072) standard normals
    n = z.shape[1]
    # 6-sigma bounds: mean ~ N(0, 1/n), sample std error ~ 1/sqrt(2n)
    assert z.mean(1).abs().max() < 6 / n ** 0.5, z.mean(1)
    assert (z.std(1) - 1).abs().max() < 6 / (2 * n) ** 0.5, z.std(1)
    allz = z.flatten()
    assert abs(float(((allz.abs() < 1).float().mean())) - 0.6827) < 0.02  # a normal's shape, not just moments
    # neighbouring planes and batch items must not repeat the stream (|r| of independent planes ~ 0.03)
    planes = eps.view(B * C, -1) / sigma.repeat_interleave(C).view(-1, 1)
    assert torch.corrcoef(planes).fill_diagonal_(0).abs().max() < 0.15


# ---------------------------------------------------------------- through the dispatcher

def test_ops_backend_triton_and_validation():
    x, t, m, sigma, noise = _inputs((2, 3, 7, 13))
    out = ops.corrupt_and_noise(x, t, m, sigma, 3, noise=noise, backend="triton")
    assert ops.last_backend("corrupt_and_noise") == "triton"
    assert_close(out, reference.corrupt_and_noise(x, t, m, sigma, 3, noise=noise), dtype=torch.float32)
    out = ops.corrupt_and_noise(x, t, m, 0.05, 3, backend="triton")  # a number for sigma
    assert out.shape == x.shape
    with pytest.raises(ValueError, match="mask"):
        ops.corrupt_and_noise(x, t, m[:, :, :3], sigma, 3, backend="triton")
    with pytest.raises(TypeError, match="seed"):
        ops.corrupt_and_noise(x, t, m, sigma, 1.5, backend="triton")
    with pytest.raises(ValueError, match="noise"):
        ops.corrupt_and_noise(x, t, m, sigma, 3, noise=noise[:1], backend="triton")
    with pytest.raises(ValueError, match="sigma"):
        ops.corrupt_and_noise(x, t, m, sigma[:1], 3, backend="triton")


def test_custom_op_path_matches_eager_path():
    """torch.ops.fae_fast_triton.corrupt_and_noise (what torch.compile calls) gives what the eager launcher gives."""
    x, t, m, sigma, noise = _inputs((2, 3, 7, 13))
    assert torch.equal(torch.ops.fae_fast_triton.corrupt_and_noise(x, t, m, sigma, 5, None),
                       K.corrupt_and_noise_triton(x, t, m, sigma, 5))
    assert_close(torch.ops.fae_fast_triton.corrupt_and_noise(x, t, m, sigma, 5, noise),
                 reference.corrupt_and_noise(x, t, m, sigma, 5, noise=noise), dtype=torch.float32)


def test_no_graph_break_under_dynamo():
    """torch._dynamo traces the launcher into one graph around the custom op (CPU: interpreter-only fake)."""
    x, t, m, sigma, noise = _inputs((1, 3, 8, 8))
    for kw in ({}, {"noise": noise}):
        fn = lambda x, t, m, s: K.corrupt_and_noise_triton(x, t, m, s, 3, **kw) * 2  # noqa: E731
        torch._dynamo.reset()
        explanation = torch._dynamo.explain(fn)(x, t, m, sigma)
        assert explanation.graph_break_count == 0 and explanation.graph_count == 1, explanation.break_reasons
        assert "fae_fast_triton.corrupt_and_noise" in explanation.graphs[0].code


# ---------------------------------------------------------------- the CUDA build, checked without a GPU

@pytest.mark.slow
def test_cuda_code_path_compiles_for_sm90():
    """The real (non-interpreted) kernels compile for sm_90 (in a subprocess: this process interprets)."""
    check_sm90_compile(AOT)


# ---------------------------------------------------------------- GPU only

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.uint8])
def test_gpu_full_size_matches_reference(dtype):
    x, t, m, sigma, noise = _inputs((16, 3, 256, 256), dtype, device="cuda")
    out = K.corrupt_and_noise_triton(x, t, m, sigma, 3, noise=noise)
    ref = reference.corrupt_and_noise(x, t, m, sigma, 3, noise=noise)
    assert_close(out, ref, dtype=ref.dtype)
    if dtype == torch.float32:
        sigma = torch.linspace(0.02, 0.1, 16, device="cuda")
        eps = K.corrupt_and_noise_triton(x, t, m, sigma, 9) - K.corrupt_and_noise_triton(x, t, m, sigma * 0, 9)
        z = eps / sigma.view(-1, 1, 1, 1)
        bound = 5 / z.numel() ** 0.5  # 5 standard errors of the mean (the std's is smaller still)
        assert abs(float(z.mean())) < bound and abs(float(z.std()) - 1) < bound


@pytest.mark.gpu
def test_gpu_no_graph_break():
    x, t, m, sigma, _ = _inputs((4, 3, 64, 64), torch.bfloat16, device="cuda")
    fn = lambda x, t, m, s: K.corrupt_and_noise_triton(x, t, m, s, 3) * 2  # noqa: E731
    explanation = torch._dynamo.explain(fn)(x, t, m, sigma)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert torch.equal(torch.compile(fn)(x, t, m, sigma), fn(x, t, m, sigma))
