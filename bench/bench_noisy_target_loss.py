"""noisy_target_loss forward + backward (one training step's loss); providers torch, torch_compile, triton.

The timed call is ``loss = fn(recon, x, sigma, seed); loss.backward()``: the reference materialises the target
and its gradient graph, the kernel regenerates eps twice and stores nothing but the gradient. On CUDA: batch 1,
16, 64, 256 at 256^2 and 512^2, bf16 recon and x (target: within 1.5x of the memory floor, >= 3x the compiled
reference on an H200). On CPU: one tiny case per provider (triton only through TRITON_INTERPRET=1).

Run: ``python -m pytest bench/bench_noisy_target_loss.py -o python_files='bench_*.py' --benchmark-json=...``.
"""
import pytest
import torch

from bench._common import COPY_BW, CUDA, OP_CASES, bandwidth_gbs, op_provider, sync



@pytest.mark.parametrize("provider", ["torch", "torch_compile", "triton"])
@pytest.mark.parametrize("batch,size", OP_CASES, ids=lambda v: str(v))
def test_noisy_target_loss(benchmark, bench_info, device, provider, batch, size):
    fn = op_provider("noisy_target_loss", provider)
    dtype = torch.bfloat16 if CUDA else torch.float32
    x = torch.rand(batch, 3, size, size, device=device).to(dtype)
    recon = (x.float() + 0.05 * torch.randn(x.shape, device=device)).to(dtype).requires_grad_()
    sigma = torch.rand(batch, device=device) * 0.1
    for warm_seed in (1, 2):  # compile / JIT (fwd and bwd) outside the timed region; 2 seeds: dynamic int
        fn(recon, x, sigma, warm_seed).backward()
    sync(device)
    seeds = iter(range(3, 1 << 30))

    def run():
        recon.grad = None
        loss = fn(recon, x, sigma, next(seeds))
        loss.backward()
        sync(device)
        return loss

    loss = benchmark(run)
    assert loss.dim() == 0 and recon.grad is not None
    # floor: forward reads recon and x; backward reads them again and writes the gradient
    nbytes = x.numel() * (2 * recon.element_size() + 2 * x.element_size() + recon.element_size()) + sigma.numel() * 8
    bench_info.update(provider=provider, batch=batch, size=size, dtype=str(dtype), bytes_moved=nbytes,
                      floor_ms=nbytes / COPY_BW * 1e3)
    if benchmark.stats is not None:
        median = benchmark.stats.stats.median
        bench_info.update(median_ms=median * 1e3, achieved_gbs=bandwidth_gbs(nbytes, median))
