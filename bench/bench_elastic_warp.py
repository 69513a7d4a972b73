"""elastic_warp: C++/CUDA extension vs the pure-torch reference (grid_sample) vs cv2.remap (per-image loop).

Two groups: ``full`` (field generation + warp from a seed) and ``field`` (warp of a given field, the part all
three providers can do). torch.compile of the reference runs on CUDA only (its ~25 s first compile on CPU
would dominate CI). Shapes: B=64, K=1, 256x256 with CUDA; B=8, K=1, 96x96 on CPU (CI-sized).

Run: ``python -m pytest bench/bench_elastic_warp.py -o python_files='bench_*.py'``.
"""
import numpy as np
import pytest
import torch

from bench._common import sync
from fae_fast import reference as R


def _ext():
    try:
        from fae_fast import _ext
    except ImportError as exc:
        pytest.skip(f"compiled extension not available: {exc}")
    return _ext


def _shape(device):
    return (64, 1, 256, 256) if device.type == "cuda" else (8, 1, 96, 96)


def _inputs(device):
    B, K, H, W = _shape(device)
    g = torch.Generator().manual_seed(0)
    mask = ((torch.rand(B, K, H, W, generator=g) > 0.7) * 255).to(torch.uint8).to(device)
    alpha = torch.full((B,), 3.0, device=device)
    smooth = torch.full((B,), 6.0, device=device)
    field = R.elastic_field(mask.shape, alpha, smooth, 1, device)
    return mask, alpha, smooth, field


def _cv2_warp(mask_np, maps):
    import cv2

    out = np.empty_like(mask_np)
    for b in range(mask_np.shape[0]):
        for k in range(mask_np.shape[1]):
            out[b, k] = cv2.remap(mask_np[b, k], maps[b][0], maps[b][1], cv2.INTER_LINEAR,
                                  borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return out


@pytest.mark.parametrize("provider", ["torch", "ext"])
def test_elastic_warp_full(benchmark, bench_info, device, provider):
    mask, alpha, smooth, _ = _inputs(device)
    fn = R.elastic_warp if provider == "torch" else _ext().elastic_warp
    if provider == "ext" and not _ext().device_supported(device):
        pytest.skip(f"extension has no kernels for {device}")
    bench_info.update(op="elastic_warp", group="full", provider=provider, shape=list(mask.shape), dtype="uint8",
                      alpha=3.0, smoothness=6.0)

    def run():
        out = fn(mask, alpha, smooth, 5)
        sync(device)
        return out

    out = benchmark(run)
    assert out.shape == mask.shape and out.dtype == torch.uint8


@pytest.mark.parametrize("provider", ["torch", "ext", "cv2", pytest.param("torch_compile", marks=pytest.mark.gpu)])
def test_elastic_warp_field(benchmark, bench_info, device, provider):
    mask, alpha, smooth, field = _inputs(device)
    bench_info.update(op="elastic_warp", group="field", provider=provider, shape=list(mask.shape), dtype="uint8")
    if provider == "cv2":
        pytest.importorskip("cv2")
        # cv2 is a host-memory baseline: the maps are precomputed, only the remap loop is timed
        mask_np = mask.cpu().numpy()
        f = field.cpu().numpy()
        H, W = mask_np.shape[2:]
        ys, xs = np.mgrid[0:H, 0:W].astype(np.float32)
        maps = [(xs + f[b, 0], ys + f[b, 1]) for b in range(f.shape[0])]
        out = benchmark(_cv2_warp, mask_np, maps)
        ref = R.elastic_warp(mask.cpu(), None, None, 0, field=field.cpu()).numpy()
        # cv2 interpolates with 5-bit fixed-point weights: close to, not equal to, the reference
        assert np.abs(out.astype(np.int32) - ref).max() <= 8
        return
    if provider == "torch":
        fn = R.elastic_warp
    elif provider == "torch_compile":
        fn = torch.compile(R.elastic_warp)
    else:
        ext = _ext()
        if not ext.device_supported(device):
            pytest.skip(f"extension has no kernels for {device}")
        fn = ext.elastic_warp

    def run():
        out = fn(mask, alpha, smooth, 0, field=field)
        sync(device)
        return out

    out = benchmark(run)
    assert out.shape == mask.shape
