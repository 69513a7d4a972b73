"""anomaly_map: error map + n x k box filter + per-image max; providers torch, torch_compile, triton side by side.

On CUDA: batch 1, 16, 64, 256 at 256^2 and 512^2, bf16 x and recon, n=4, k=7 (DESIGN.md target: batch 64 at
256^2 <= 0.05 ms on an H200; eager 0.55 ms, compiled 0.52 ms, memory floor 0.03 ms). On CPU: one tiny case
per provider (triton only through TRITON_INTERPRET=1, torch_compile skipped: its first compile costs ~25 s).

Run: ``python -m pytest bench/bench_anomaly_map.py -o python_files='bench_*.py' --benchmark-json=...``.
"""
import os

import pytest
import torch

from bench._common import bandwidth_gbs, sync
from fae_fast import reference

CUDA = torch.cuda.is_available()
N, K = 4, 7
CASES = [(b, s) for s in (256, 512) for b in (1, 16, 64, 256)] if CUDA else [(1, 16)]
COPY_BW = 4.23e12  # bytes/s, device copy measured on the H200 of DESIGN.md: the floor quoted in extra_info
_compiled = {}


def _provider(name):
    if name == "torch":
        return reference.anomaly_map
    if name == "torch_compile":
        if not CUDA:
            pytest.skip("torch.compile is benchmarked on CUDA only (its first compile costs ~25 s on CPU)")
        if "fn" not in _compiled:
            _compiled["fn"] = torch.compile(reference.anomaly_map)
        return _compiled["fn"]
    if not CUDA and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        pytest.skip("the triton provider needs CUDA or TRITON_INTERPRET=1")
    from fae_fast.kernels.anomaly_map import anomaly_map_triton

    return anomaly_map_triton


@pytest.mark.parametrize("provider", ["torch", "torch_compile", "triton"])
@pytest.mark.parametrize("batch,size", CASES, ids=lambda v: str(v))
def test_anomaly_map(benchmark, bench_info, device, provider, batch, size):
    fn = _provider(provider)
    dtype = torch.bfloat16 if CUDA else torch.float32
    x = torch.rand(batch, 3, size, size, device=device).to(dtype)
    r = (x.float() + 0.05 * torch.randn(x.shape, device=device)).to(dtype)
    fn(x, r, n=N, k=K)  # compile / JIT outside the timed region
    sync(device)

    def run():
        out = fn(x, r, n=N, k=K)
        sync(device)
        return out

    amap, score = benchmark(run)
    assert amap.shape == (batch, 1, size, size) and score.shape == (batch,)
    nbytes = 2 * x.numel() * x.element_size() + amap.numel() * 4 + score.numel() * 4
    bench_info.update(provider=provider, batch=batch, size=size, n=N, k=K, dtype=str(dtype),
                      bytes_moved=nbytes, floor_ms=nbytes / COPY_BW * 1e3)
    if benchmark.stats is not None:
        median = benchmark.stats.stats.median
        bench_info.update(median_ms=median * 1e3, achieved_gbs=bandwidth_gbs(nbytes, median))
