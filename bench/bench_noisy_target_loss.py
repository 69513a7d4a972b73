"""noisy_target_loss forward + backward (one training step's loss); providers torch, torch_compile, triton.

The timed call is ``loss = fn(recon, x, sigma, seed); loss.backward()``: the reference materialises the target
and its gradient graph, the kernel regenerates eps twice and stores nothing but the gradient. On CUDA: batch 1,
16, 64, 256 at 256^2 and 512^2, bf16 recon and x (target: within 1.5x of the memory floor, >= 3x the compiled
reference on an H200). On CPU: one tiny case per provider (triton only through TRITON_INTERPRET=1).

Run: ``python -m pytest bench/bench_noisy_target_loss.py -o python_files='bench_*.py' --benchmark-json=...``.
"""
import os

import pytest
import torch

from bench._common import bandwidth_gbs, sync
from fae_fast import reference

CUDA = torch.cuda.is_available()
CASES = [(b, s) for s in (256, 512) for b in (1, 16, 64, 256)] if CUDA else [(1, 16)]
COPY_BW = 4.23e12  # bytes/s, device copy measured on the H200 of DESIGN.md: the floor quoted in extra_info
_compiled = {}


def _provider(name):
    if name == "torch":
        return reference.noisy_target_loss
    if name == "torch_compile":
        if not CUDA:
            pytest.skip("torch.compile is benchmarked on CUDA only (its first compile costs ~25 s on CPU)")
        if "fn" not in _compiled:
            _compiled["fn"] = torch.compile(reference.noisy_target_loss)
        return _compiled["fn"]
    if not CUDA and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        pytest.skip("the triton provider needs CUDA or TRITON_INTERPRET=1")
    from fae_fast.kernels.noisy_target_loss import noisy_target_loss_triton

    return noisy_target_loss_triton


@pytest.mark.parametrize("provider", ["torch", "torch_compile", "triton"])
@pytest.mark.parametrize("batch,size", CASES, ids=lambda v: str(v))
def test_noisy_target_loss(benchmark, bench_info, device, provider, batch, size):
    fn = _provider(provider)
    dtype = torch.bfloat16 if CUDA else torch.float32
    x = torch.rand(batch, 3, size, size, device=device).to(dtype)
    recon = (x.float() + 0.05 * torch.randn(x.shape, device=device)).to(dtype).requires_grad_()
    sigma = torch.rand(batch, device=device) * 0.1
    fn(recon, x, sigma, 1).backward()  # compile / JIT (forward and backward) outside the timed region
    sync(device)
    seeds = iter(range(2, 1 << 30))

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
