"""noisy_target_loss: the reference's own properties, then the Triton forward/backward against it."""
import pytest
import torch

from fae_fast import ops, reference
from tests.helpers import assert_close, check_sm90_compile

triton = pytest.importorskip("triton")
from fae_fast.kernels import corrupt_and_noise as CN  # noqa: E402
from fae_fast.kernels import noisy_target_loss as K  # noqa: E402

AOT = """
from fae_fast.kernels._common import aot_compile
from fae_fast.kernels import noisy_target_loss as K
for xs, noise, flat in [("*bf16", False, True), ("*u8", True, False)]:
    sig = dict(r_ptr="*bf16", x_ptr=xs, sigma_ptr="*fp32", noise_ptr="*fp32", partial_ptr="*fp32", seed="i64")
    aot_compile(K._noisy_target_loss_fwd_kernel, sig, dict(HAS_NOISE=noise, FLAT=flat, BLOCK=1024))
    sig.update(g_ptr="*fp32", grad_ptr="*bf16", scale="fp32")
    aot_compile(K._noisy_target_loss_bwd_kernel, sig, dict(HAS_NOISE=noise, FLAT=flat, BLOCK=1024))
print("AOT-OK")
"""

SHAPES = [(1, 3, 1, 1), (2, 3, 7, 13), (1, 1, 5, 37), (3, 2, 17, 9)]


def _inputs(shape, x_dtype=torch.float32, r_dtype=torch.float32, device="cpu"):
    x = torch.rand(shape, device=device)
    x = (x * 255).round().to(torch.uint8) if x_dtype == torch.uint8 else x.to(x_dtype)
    recon = torch.rand(shape, device=device).to(r_dtype).requires_grad_()
    sigma = torch.rand(shape[0], device=device) * 0.1
    noise = torch.randn(shape, device=device) * sigma.view(-1, 1, 1, 1)
    return recon, x, sigma, noise


def _loss_and_grad(fn, recon, *args, scale=1.0, **kw):
    recon.grad = None
    loss = fn(recon, *args, **kw)
    (loss * scale).backward()
    return loss.detach(), recon.grad.clone()


# ---------------------------------------------------------------- the reference's own properties

def test_reference_zero_at_noisy_target_and_gradient_formula():
    recon, x, sigma, noise = _inputs((2, 3, 8, 8))
    target = x + noise
    assert float(reference.noisy_target_loss(target, x, sigma, 0, noise=noise)) == 0.0
    loss, grad = _loss_and_grad(reference.noisy_target_loss, recon, x, sigma, 0, noise=noise)
    assert_close(grad, 2.0 / x.numel() * (recon - x - noise).detach(), dtype=torch.float32)
    # the regenerated reference noise is the one its corrupt_and_noise added
    inp = reference.corrupt_and_noise(x, x, torch.zeros(2, 1, 8, 8), sigma, 4)
    assert float(reference.noisy_target_loss(inp, x, sigma, 4)) < 1e-12


# ---------------------------------------------------------------- kernel vs reference (explicit noise)

@pytest.mark.parametrize("shape", SHAPES)
def test_forward_backward_match_reference(shape):
    recon, x, sigma, noise = _inputs(shape)
    loss, grad = _loss_and_grad(K.noisy_target_loss_triton, recon, x, sigma, 3, noise=noise)
    ref_loss, ref_grad = _loss_and_grad(reference.noisy_target_loss, recon, x, sigma, 3, noise=noise)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert_close(loss, ref_loss, dtype=torch.float32)
    assert_close(grad, ref_grad, dtype=torch.float32, atol=1e-7)


@pytest.mark.parametrize("x_dtype,r_dtype", [(torch.float32, torch.bfloat16), (torch.float16, torch.float16),
                                             (torch.uint8, torch.float32), (torch.uint8, torch.bfloat16)])
def test_dtypes(x_dtype, r_dtype):
    recon, x, sigma, noise = _inputs((2, 3, 7, 13), x_dtype, r_dtype)
    loss, grad = _loss_and_grad(K.noisy_target_loss_triton, recon, x, sigma, 3, noise=noise, scale=1e3)
    ref_loss, ref_grad = _loss_and_grad(reference.noisy_target_loss, recon, x, sigma, 3, noise=noise, scale=1e3)
    assert grad.dtype == recon.dtype
    assert_close(loss, ref_loss, dtype=torch.float32)  # computed in float32 from identical inputs
    # the gradient is rounded to recon's dtype once, like the reference's cast back
    assert_close(grad, ref_grad, dtype=r_dtype if r_dtype != torch.float32 else torch.float32, atol=1e-6)


def test_non_contiguous_and_upstream_gradient():
    recon, x, sigma, noise = _inputs((2, 3, 9, 26))
    recon = recon.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    x = x[..., ::2]
    noise = noise.transpose(2, 3).contiguous().transpose(2, 3)[..., ::2]
    r = recon.detach()[..., ::2].clone().requires_grad_()
    loss, grad = _loss_and_grad(K.noisy_target_loss_triton, r, x, sigma, 3, noise=noise, scale=-2.5)
    ref_loss, ref_grad = _loss_and_grad(reference.noisy_target_loss, r, x, sigma, 3, noise=noise, scale=-2.5)
    assert_close(loss, ref_loss, dtype=torch.float32)
    assert_close(grad, ref_grad, dtype=torch.float32, atol=1e-7)
    x2 = torch.rand(2, 3, 9, 26)
    _, g_cl = _loss_and_grad(K.noisy_target_loss_triton, recon, x2, sigma, 3)
    assert g_cl.is_contiguous(memory_format=torch.channels_last)


# ---------------------------------------------------------------- the regenerated noise

@pytest.mark.parametrize("x_dtype", [torch.float32, torch.uint8])
def test_regenerates_the_injected_noise(x_dtype):
    """recon = x + (input - x~) reproduces the target x + eps: the loss and its gradient vanish."""
    _, x, sigma, _ = _inputs((2, 3, 7, 13), x_dtype)
    t = torch.rand(2, 3, 7, 13)
    m = torch.rand(2, 1, 7, 13)
    inp = CN.corrupt_and_noise_triton(x, t, m, sigma, 1234)
    clean = reference.corrupt_and_noise(x, t, m, sigma, 0, noise=torch.zeros(x.shape))
    xf = x.float() / 255 if x_dtype == torch.uint8 else x
    recon = (xf + (inp - clean)).requires_grad_()
    loss, grad = _loss_and_grad(K.noisy_target_loss_triton, recon, x, sigma, 1234)
    assert float(loss) < 1e-12 and float(grad.abs().max()) < 1e-7
    # with another seed the target moves by a fresh eps: loss ~ mean(sigma^2) * 2
    other = float(K.noisy_target_loss_triton(recon.detach(), x, sigma, 1235))
    expected = 2 * float((sigma ** 2).mean())
    assert 0.5 * expected < other < 1.5 * expected


def test_deterministic_and_block_independent():
    recon, x, sigma, _ = _inputs((2, 3, 7, 13))
    r = recon.detach()
    a = K._forward(r, x, sigma, 77, None)
    b = K._forward(r, x, sigma, 77, None, block=16)  # 6 programs per plane: other partial sums, same eps
    assert torch.equal(a, K._forward(r, x, sigma, 77, None))
    assert_close(a, b, dtype=torch.float32)
    g1 = K._backward(torch.tensor(1.0), r, x, sigma, 77, None)
    assert torch.equal(g1, K._backward(torch.tensor(1.0), r, x, sigma, 77, None, block=16))


# ---------------------------------------------------------------- through the dispatcher

def test_ops_backend_triton_and_validation():
    recon, x, sigma, noise = _inputs((2, 3, 7, 13))
    loss, grad = _loss_and_grad(ops.noisy_target_loss, recon, x, sigma, 3, noise=noise, backend="triton")
    assert ops.last_backend("noisy_target_loss") == "triton"
    ref_loss, ref_grad = _loss_and_grad(reference.noisy_target_loss, recon, x, sigma, 3, noise=noise)
    assert_close(loss, ref_loss, dtype=torch.float32)
    assert_close(grad, ref_grad, dtype=torch.float32, atol=1e-7)
    with pytest.raises(ValueError, match="recon shape"):
        ops.noisy_target_loss(recon[:1], x, sigma, 3, backend="triton")
    with pytest.raises(TypeError, match="recon"):
        ops.noisy_target_loss(x.to(torch.uint8), x, sigma, 3, backend="triton")
    with pytest.raises(ValueError, match="seed"):
        ops.noisy_target_loss(recon, x, sigma, -1, backend="triton")


def test_no_grad_path_matches_autograd_path():
    """Without autograd the launcher skips the custom op; both paths give the same loss."""
    recon, x, sigma, _ = _inputs((2, 3, 7, 13))
    with_grad = K.noisy_target_loss_triton(recon, x, sigma, 8)
    assert with_grad.requires_grad
    with torch.no_grad():
        without = K.noisy_target_loss_triton(recon, x, sigma, 8)
    assert not without.requires_grad and torch.equal(with_grad.detach(), without)


def test_no_graph_break_under_dynamo():
    """torch._dynamo traces the launcher into one graph around the custom op (CPU: interpreter-only fake)."""
    recon, x, sigma, _ = _inputs((1, 3, 8, 8))
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(lambda r, x, s: K.noisy_target_loss_triton(r, x, s, 3))(recon, x, sigma)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1, explanation.break_reasons
    assert "fae_fast_triton.noisy_target_loss" in explanation.graphs[0].code


# ---------------------------------------------------------------- the CUDA build, checked without a GPU

@pytest.mark.slow
def test_cuda_code_path_compiles_for_sm90():
    """The real (non-interpreted) kernels compile for sm_90 (in a subprocess: this process interprets)."""
    check_sm90_compile(AOT)


# ---------------------------------------------------------------- GPU only

@pytest.mark.gpu
@pytest.mark.parametrize("r_dtype", [torch.float32, torch.bfloat16])
def test_gpu_full_size_matches_reference(r_dtype):
    recon, x, sigma, noise = _inputs((16, 3, 256, 256), torch.uint8, r_dtype, device="cuda")
    loss, grad = _loss_and_grad(K.noisy_target_loss_triton, recon, x, sigma, 3, noise=noise, scale=1e6)
    ref_loss, ref_grad = _loss_and_grad(reference.noisy_target_loss, recon, x, sigma, 3, noise=noise, scale=1e6)
    assert_close(loss, ref_loss, dtype=torch.float32, rtol=1e-4)  # 3M-term sums in different orders
    assert_close(grad, ref_grad, dtype=r_dtype if r_dtype != torch.float32 else torch.float32, atol=1e-5)
    inp = CN.corrupt_and_noise_triton(x, x, torch.zeros(16, 1, 256, 256, device="cuda"), sigma, 5)
    assert float(K.noisy_target_loss_triton(inp, x, sigma, 5)) < 1e-10


@pytest.mark.gpu
def test_gpu_no_graph_break_forward_and_backward():
    recon, x, sigma, _ = _inputs((4, 3, 64, 64), torch.uint8, torch.bfloat16, device="cuda")
    fn = lambda r, x, s: K.noisy_target_loss_triton(r * 1.0, x, s, 3)  # noqa: E731
    explanation = torch._dynamo.explain(fn)(recon, x, sigma)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    # AOTAutograd traces the registered backward too: compiled and eager agree on loss and gradient
    loss, grad = _loss_and_grad(torch.compile(fn), recon, x, sigma)
    ref_loss, ref_grad = _loss_and_grad(fn, recon, x, sigma)
    assert_close(loss, ref_loss, dtype=torch.float32)
    assert_close(grad, ref_grad, dtype=torch.bfloat16)
