"""corrupt_and_noise: blend + symmetric noise in one pass; providers torch, torch_compile, triton side by side.

On CUDA: batch 1, 16, 64, 256 at 256^2 and 512^2, bf16 x, texture and mask (target: within 1.5x of the memory
floor and >= 3x the compiled reference on an H200). On CPU: one tiny case per provider (triton only through
TRITON_INTERPRET=1, torch_compile skipped: its first compile costs ~25 s).

Run: ``python -m pytest bench/bench_corrupt_and_noise.py -o python_files='bench_*.py' --benchmark-json=...``.
"""
import pytest
import torch

from bench._common import COPY_BW, CUDA, OP_CASES, bandwidth_gbs, op_provider, sync



@pytest.mark.parametrize("provider", ["torch", "torch_compile", "triton"])
@pytest.mark.parametrize("batch,size", OP_CASES, ids=lambda v: str(v))
def test_corrupt_and_noise(benchmark, bench_info, device, provider, batch, size):
    fn = op_provider("corrupt_and_noise", provider)
    dtype = torch.bfloat16 if CUDA else torch.float32
    x = torch.rand(batch, 3, size, size, device=device).to(dtype)
    tex = torch.rand(batch, 3, size, size, device=device).to(dtype)
    mask = torch.rand(batch, 1, size, size, device=device).to(dtype)
    sigma = torch.rand(batch, device=device) * 0.1
    for warm_seed in (1, 2):  # compile / JIT outside the timed region; a second seed makes dynamo go dynamic
        fn(x, tex, mask, sigma, warm_seed)
    sync(device)
    seeds = iter(range(3, 1 << 30))  # a new seed per step, as in training

    def run():
        out = fn(x, tex, mask, sigma, next(seeds))
        sync(device)
        return out

    out = benchmark(run)
    assert out.shape == x.shape and out.dtype == dtype
    nbytes = (x.numel() * (x.element_size() + tex.element_size() + out.element_size())
              + mask.numel() * mask.element_size() + sigma.numel() * 4)
    bench_info.update(provider=provider, batch=batch, size=size, dtype=str(dtype), bytes_moved=nbytes,
                      floor_ms=nbytes / COPY_BW * 1e3)
    if benchmark.stats is not None:
        median = benchmark.stats.stats.median
        bench_info.update(median_ms=median * 1e3, achieved_gbs=bandwidth_gbs(nbytes, median))
