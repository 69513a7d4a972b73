"""Dispatcher validation and backend resolution (fae_fast.ops / fae_fast._backend)."""
import subprocess
import sys

import pytest
import torch

from fae_fast import _backend, ops


def _batch(b=2, c=3, h=8, w=8):
    x = torch.rand(b, c, h, w)
    return x, torch.rand_like(x), torch.rand(b, 1, h, w)


def test_import_needs_no_optional_part():
    code = ("import sys, fae_fast, fae_fast.ops, fae_fast.kernels, fae_fast.data; "
            "bad = [m for m in ('triton', 'nvidia.dali', 'fae_fast._C') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_explicit_torch_backend_runs_the_reference():
    x, t, m = _batch()
    ops.corrupt_and_noise(x, t, m, 0.1, seed=1, backend="torch")
    assert ops.last_backend("corrupt_and_noise") == "torch"


def test_auto_on_cpu_never_picks_triton():
    x, t, m = _batch()
    ops.anomaly_map(x, t)
    assert ops.last_backend("anomaly_map") == "torch"


def test_env_override(monkeypatch):
    monkeypatch.setenv("FAE_FAST_BACKEND", "torch")
    x, t, m = _batch()
    ops.anomaly_map(x, t, backend="auto")
    assert ops.last_backend("anomaly_map") == "torch"
    monkeypatch.setenv("FAE_FAST_BACKEND", "cuda-please")
    with pytest.raises(ValueError, match="FAE_FAST_BACKEND"):
        ops.anomaly_map(x, t)


def test_unknown_and_missing_backends():
    x, t, m = _batch()
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.anomaly_map(x, t, backend="cuda")
    with pytest.raises(_backend.BackendUnavailable, match="no 'ext' backend"):
        ops.anomaly_map(x, t, backend="ext")


@pytest.mark.parametrize("call, match", [
    (lambda x, t, m: ops.corrupt_and_noise(x.numpy(), t, m, 0.1, 0), "must be a torch.Tensor"),
    (lambda x, t, m: ops.corrupt_and_noise(x, t[:, :2], m, 0.1, 0), "texture must have the shape"),
    (lambda x, t, m: ops.corrupt_and_noise(x, t, m[:, :, :4], 0.1, 0), "mask must have shape"),
    (lambda x, t, m: ops.corrupt_and_noise(x, t, m, torch.ones(3), 0), r"sigma must have shape \(2,\)"),
    (lambda x, t, m: ops.corrupt_and_noise(x, t, m, 0.1, 1.5), "seed must be an int"),
    (lambda x, t, m: ops.corrupt_and_noise(x, t, m, 0.1, -1), "seed must be in"),
    (lambda x, t, m: ops.corrupt_and_noise(x, t, m.int(), 0.1, 0), "mask has dtype"),
    (lambda x, t, m: ops.corrupt_and_noise(x, t, m, 0.1, 0, noise=torch.zeros(1)), "noise must have 4"),
    (lambda x, t, m: ops.noisy_target_loss(x[:1], x, 0.1, 0), "recon shape"),
    (lambda x, t, m: ops.anomaly_map(x, t, n=9), r"n \(box-filter passes\)"),
    (lambda x, t, m: ops.anomaly_map(x, t, k=4), r"k \(window\) must be an odd"),
    (lambda x, t, m: ops.anomaly_map(x, t, k=33), r"k \(window\) must be an odd"),
    (lambda x, t, m: ops.anomaly_map(x, t.long()), "recon has dtype"),
    (lambda x, t, m: ops.elastic_warp(m, 1.0, 4.0, 0, field=torch.zeros(2, 2, 3, 3)), "field must have shape"),
    (lambda x, t, m: ops.rasterize_strokes(torch.zeros(2, 1, 3, 2), torch.ones(2, 1), 8, 8), "ctrl must have"),
    (lambda x, t, m: ops.rasterize_strokes(torch.zeros(2, 1, 4, 2), torch.ones(2, 1), 0, 8), "height must be"),
])
def test_validation_names_the_value(call, match):
    x, t, m = _batch()
    with pytest.raises((TypeError, ValueError), match=match):
        call(x, t, m)


def test_env_override_applies_only_to_ops_that_have_the_backend(monkeypatch):
    monkeypatch.setenv("FAE_FAST_BACKEND", "ext")
    x, t, m = _batch()
    ops.anomaly_map(x, t)  # anomaly_map has no ext backend: it resolves as auto
    assert ops.last_backend("anomaly_map") == "torch"
    with pytest.raises(_backend.BackendUnavailable):
        ops.anomaly_map(x, t, backend="ext")  # an explicit request still fails loudly


def test_per_sample_arguments_may_be_strided_views():
    x, t, m = _batch(b=3)
    sig = torch.tensor([[0.1, 9.0], [0.0, 9.0], [0.05, 9.0]])[:, 0]  # stride 2
    noise = torch.randn(3, 3, 8, 8)
    a = ops.corrupt_and_noise(x, t, m, sig, 4, backend="torch")
    b = ops.corrupt_and_noise(x, t, m, sig.clone(), 4, backend="torch")
    assert torch.equal(a, b)
    pytest.importorskip("triton")
    for s in (sig, torch.tensor([0.07]).expand(3)):
        tri = ops.corrupt_and_noise(x, t, m, s, 4, noise=noise * s.view(-1, 1, 1, 1), backend="triton")
        ref = ops.corrupt_and_noise(x, t, m, s, 4, noise=noise * s.view(-1, 1, 1, 1), backend="torch")
        torch.testing.assert_close(tri, ref)
        eps_tri = ops.corrupt_and_noise(x, t, m, s, 4, backend="triton") - \
            ops.corrupt_and_noise(x, t, m, torch.zeros(3), 4, backend="triton")
        per_sample_std = eps_tri.flatten(1).std(dim=1)
        torch.testing.assert_close(per_sample_std, s.contiguous(), atol=0.035, rtol=0.3)


@pytest.mark.ext
def test_auto_picks_the_extension_on_cpu_when_it_is_built(ext):
    _, _, m = _batch()
    ops.elastic_warp(m, 1.0, 2.0, seed=3)
    assert ops.last_backend("elastic_warp") == "ext"  # the registry asks the loaded _C which devices it has
