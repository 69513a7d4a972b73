"""rasterize_strokes: C++/CUDA extension (bbox-culled / tiled) vs the pure-torch reference (every segment at
every pixel); torch.compile of the reference on CUDA only. Shapes: B=64, S=4, 256x256, 32 samples with CUDA;
B=4, S=4, 64x64 on CPU (CI-sized).

Run: ``python -m pytest bench/bench_rasterize_strokes.py -o python_files='bench_*.py'``.
"""
import pytest
import torch

from bench._common import sync
from fae_fast import reference as R


def _inputs(device):
    B, S, H, W = (64, 4, 256, 256) if device.type == "cuda" else (4, 4, 64, 64)
    g = torch.Generator().manual_seed(0)
    ctrl = (torch.rand(B, S, 4, 2, generator=g) * torch.tensor([W, H])).to(device)
    width = (torch.rand(B, S, generator=g) * 3 + 1).to(device)  # 1..4 px, the scratch widths of DESIGN.md
    return ctrl, width, H, W


@pytest.mark.parametrize("provider", ["torch", "ext", pytest.param("torch_compile", marks=pytest.mark.gpu)])
def test_rasterize_strokes(benchmark, bench_info, device, provider):
    ctrl, width, H, W = _inputs(device)
    if provider == "torch":
        fn = R.rasterize_strokes
    elif provider == "torch_compile":
        fn = torch.compile(R.rasterize_strokes)
    else:
        try:
            from fae_fast import _ext
        except ImportError as exc:
            pytest.skip(f"compiled extension not available: {exc}")
        if not _ext.device_supported(device):
            pytest.skip(f"extension has no kernels for {device}")
        fn = _ext.rasterize_strokes
    bench_info.update(op="rasterize_strokes", provider=provider, shape=[*ctrl.shape[:2], H, W], samples=32)

    def run():
        out = fn(ctrl, width, H, W, samples=32)
        sync(device)
        return out

    out = benchmark(run)
    assert out.shape == (ctrl.shape[0], 1, H, W)
