"""anomaly_map: error map + n x k box filter + per-image max; providers torch, torch_compile, triton side by side.

On CUDA: batch 1, 16, 64, 256 at 256^2 and 512^2, bf16 x and recon, n=4, k=7 (DESIGN.md target: batch 64 at
256^2 <= 0.05 ms on an H200; eager 0.55 ms, compiled 0.52 ms, memory floor 0.03 ms). On CPU: one tiny case
per provider (triton only through TRITON_INTERPRET=1, torch_compile skipped: its first compile costs ~25 s).
Every error kind: "squared" (DESIGN.md), "gradient" and "squared+gradient" (8 and 9 shifted loads per channel).

Run: ``python -m pytest bench/bench_anomaly_map.py -o python_files='bench_*.py' --benchmark-json=...``.
"""
import pytest
import torch

from bench._common import COPY_BW, CUDA, OP_CASES, bandwidth_gbs, op_provider, sync
from fae_fast.config import MAP_ERRORS

N, K = 4, 7


@pytest.mark.parametrize("error", MAP_ERRORS)  # outermost: ids read [batch-size-provider-error]
@pytest.mark.parametrize("provider", ["torch", "torch_compile", "triton"])
@pytest.mark.parametrize("batch,size", OP_CASES, ids=lambda v: str(v))
def test_anomaly_map(benchmark, bench_info, device, provider, batch, size, error):
    fn = op_provider("anomaly_map", provider)
    dtype = torch.bfloat16 if CUDA else torch.float32
    x = torch.rand(batch, 3, size, size, device=device).to(dtype)
    r = (x.float() + 0.05 * torch.randn(x.shape, device=device)).to(dtype)
    fn(x, r, n=N, k=K, error=error)  # compile / JIT outside the timed region
    sync(device)

    def run():
        out = fn(x, r, n=N, k=K, error=error)
        sync(device)
        return out

    amap, score = benchmark(run)
    assert amap.shape == (batch, 1, size, size) and score.shape == (batch,)
    nbytes = 2 * x.numel() * x.element_size() + amap.numel() * 4 + score.numel() * 4
    bench_info.update(provider=provider, batch=batch, size=size, n=N, k=K, error=error, dtype=str(dtype),
                      bytes_moved=nbytes, floor_ms=nbytes / COPY_BW * 1e3)
    if benchmark.stats is not None:
        median = benchmark.stats.stats.median
        bench_info.update(median_ms=median * 1e3, achieved_gbs=bandwidth_gbs(nbytes, median))
