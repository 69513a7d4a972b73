"""Shared test utilities: one tolerance table by dtype and an assert_close that prints the first mismatches."""
from __future__ import annotations

import torch

# (atol, rtol) for comparing a fast path with the float32/float64 reference, by the *input* dtype
TOL = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
    torch.uint8: (1e-5, 1e-5),
}


def assert_close(actual, expected, *, dtype=None, atol=None, rtol=None, max_show=8, msg=""):
    """torch.testing-like check that prints the worst few mismatching positions with their values."""
    actual = torch.as_tensor(actual)
    expected = torch.as_tensor(expected)
    assert actual.shape == expected.shape, f"{msg} shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    d_atol, d_rtol = TOL[dtype or expected.dtype]
    atol = d_atol if atol is None else atol
    rtol = d_rtol if rtol is None else rtol
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    diff = (a - e).abs()
    bad = ~(diff <= atol + rtol * e.abs())
    bad |= torch.isnan(a) != torch.isnan(e)
    if bad.any():
        idx = bad.nonzero()[:max_show]
        lines = [f"  at {tuple(i.tolist())}: got {a[tuple(i)].item():.8g}, expected {e[tuple(i)].item():.8g}"
                 for i in idx]
        raise AssertionError(
            f"{msg} {int(bad.sum())}/{bad.numel()} elements differ (atol={atol}, rtol={rtol}, "
            f"max abs diff {diff[~torch.isnan(diff)].max().item():.3g}):\n" + "\n".join(lines))


def check_sm90_compile(code: str) -> None:
    """Run ``code`` (which compiles real, non-interpreted Triton kernels to an sm_90 cubin with Triton's bundled
    ptxas and prints AOT-OK) in a subprocess without TRITON_INTERPRET: catches GPU-only type and layout errors on
    a CPU-only machine. Skips when ptxas is missing."""
    import os
    import subprocess
    import sys

    import pytest

    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 and ("ptxas" in proc.stderr and "not found" in proc.stderr.lower()):
        pytest.skip("Triton's bundled ptxas is not available")
    assert proc.returncode == 0 and "AOT-OK" in proc.stdout, proc.stderr[-3000:]


def cli_trained_model(root, *, steps: int):
    """A tiny synthetic MVTec set and a model trained on it through the CLI: (root, data, model path)."""
    from fae_fast.cli import main
    from fae_fast.synthetic import make_dataset

    data = make_dataset(root / "data", n_train=12, n_test_good=3, n_test_defect=2, size=(32, 32), seed=1)
    model = root / "model.fae"
    rc = main(["train", "--data", str(data), "--out", str(model), "--steps", str(steps), "--size", "32",
               "--preset", "tiny", "--batch-size", "4", "--quiet", "--device", "cpu"])
    assert rc == 0 and model.is_file()
    return root, data, model
