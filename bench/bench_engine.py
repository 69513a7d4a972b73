"""Engine throughput and latency: plain eager fp32, plain bf16 + torch.compile, fae_fast's Engine, side by side;
on the CPU also the engine's PyTorch backend, plain ONNX Runtime and OpenVINO (when installed) on the same model.

On CUDA: fae_fast's default U-Net (64-512) at 256^2, GPU-resident batches 1/16/64/256 and the host->host path
(EfficientAD protocol: uint8 frame in pageable host memory -> map and score on the host) at batch 1 and 16.
On the CPU: a tiny U-Net at 32^2, batches 1 and 2, and no torch.compile (its ~25 s compile would dominate CI);
this keeps the file from rotting, the numbers mean nothing there. ``python -m fae_fast.inference.bench`` (the
``fae-fast bench`` command) prints the same comparison as one table.
"""
import importlib.util

import pytest
import torch

from bench._common import sync
from fae_fast.inference import ort
from fae_fast.inference.bench import Providers, make_model

CUDA = torch.cuda.is_available()
SIZE = 256 if CUDA else 32
WIDTHS = (64, 128, 256, 512) if CUDA else (8, 16)
DILATIONS = (1, 2, 4, 8) if CUDA else (1, 2)
BATCHES = (1, 16, 64, 256) if CUDA else (1, 2)
HOST_BATCHES = (1, 16) if CUDA else (1,)
CPU_ONLY = () if CUDA else ("engine_torch",) + (("onnxruntime",) if ort.available() else ()) + (
    ("openvino",) if importlib.util.find_spec("openvino") is not None else ())
PROVIDERS = ("eager_fp32", "compiled_bf16", "engine") + CPU_ONLY


@pytest.fixture(scope="module")
def providers():
    dev = torch.device("cuda" if CUDA else "cpu")
    if CUDA:
        torch.backends.cudnn.benchmark = True
    return Providers(make_model(WIDTHS, DILATIONS), image_size=(SIZE, SIZE), n=4, k=7, device=dev,
                     dtype=torch.bfloat16, compile=CUDA, batch_sizes=tuple(sorted(set(BATCHES) | set(HOST_BATCHES))),
                     cpu_providers=CPU_ONLY)


def _skip_compile_on_cpu(provider):
    if provider == "compiled_bf16" and not CUDA:
        pytest.skip("torch.compile provider runs on CUDA only (the CPU compile would dominate CI)")


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_gpu_resident(benchmark, bench_info, providers, provider, batch):
    _skip_compile_on_cpu(provider)
    dev = providers.device
    gen = torch.Generator().manual_seed(0)
    x8 = torch.randint(0, 256, (batch, 3, SIZE, SIZE), dtype=torch.uint8, generator=gen).to(dev)
    x8 = x8.contiguous(memory_format=torch.channels_last)
    xf = x8.float().div(255.0).contiguous()
    fn, x = {"eager_fp32": (providers.eager_device, xf), "compiled_bf16": (providers.compiled_device, xf),
             "engine": (providers.engine_device, x8), "engine_torch": (providers.engine_torch_device, x8),
             "onnxruntime": (providers.onnxruntime_device, x8), "openvino": (providers.openvino_device, x8)}[provider]
    fn(x)  # compilation / graph capture outside the timing
    sync(dev)

    def run():
        out = fn(x)
        sync(dev)
        return out

    bench_info.update(provider=provider, scenario="gpu_resident", batch=batch, image_size=SIZE,
                      widths=list(WIDTHS), dtype="bfloat16" if CUDA and provider != "eager_fp32" else "float32",
                      input_dtype="float32" if provider in ("eager_fp32", "compiled_bf16") else "uint8",
                      engine_backend=providers.engine.backend)
    _, score = benchmark(run)
    assert score.shape == (batch,) and bool(torch.isfinite(score).all())


@pytest.mark.parametrize("batch", HOST_BATCHES)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_host_to_host(benchmark, bench_info, providers, provider, batch):
    """EfficientAD protocol: the clock runs from the uint8 frame on the host to the map on the host."""
    _skip_compile_on_cpu(provider)
    gen = torch.Generator().manual_seed(1)
    frames = torch.randint(0, 256, (batch, SIZE, SIZE, 3), dtype=torch.uint8, generator=gen)
    fn = {"eager_fp32": providers.eager_host, "compiled_bf16": providers.compiled_host,
          "engine": providers.engine_host, "engine_torch": providers.engine_torch_host,
          "onnxruntime": providers.onnxruntime_host, "openvino": providers.openvino_host}[provider]
    fn(frames)
    bench_info.update(provider=provider, scenario="host_to_host", batch=batch, image_size=SIZE,
                      widths=list(WIDTHS), protocol="EfficientAD: H2D start -> map on host")
    amap, score = benchmark(fn, frames)
    assert amap.device.type == "cpu" and score.shape == (batch,)
