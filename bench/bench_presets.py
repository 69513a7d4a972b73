"""Model presets side by side: inference throughput (model + anomaly map + score) of ``default`` (64-512),
``fast`` (32-256) and ``tiny`` (16-128), with parameters and FLOPs per image in ``extra_info``.

Accuracy of the presets is in docs/RESULTS.md (it needs training runs, not a micro-benchmark). On CUDA: 256^2,
batch 64, bf16 autocast, channels_last; on CPU: 64^2, batch 2, fp32 (CI runs it once with timing disabled).

Run: ``python -m pytest bench/bench_presets.py -o python_files='bench_*.py' --benchmark-json=...``.
"""
import pytest
import torch

from bench._common import CUDA, sync
from fae_fast import ops
from fae_fast.config import preset
from fae_fast.models import build_model, count_parameters

SIZE, BATCH = (256, 64) if CUDA else (64, 2)


def _flops_per_image(model, x) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(x[:1].float())
    return float(fc.get_total_flops())


@pytest.mark.parametrize("name", ["default", "fast", "tiny"])
def test_preset_inference(benchmark, bench_info, device, name):
    cfg = preset(name)
    model = build_model(cfg.model).to(device).eval()
    x = torch.rand(BATCH, 3, SIZE, SIZE, device=device)
    bench_info.update(preset=name, widths=list(cfg.model.widths), params=count_parameters(model),
                      flops_per_image=_flops_per_image(model, x), batch=BATCH, size=SIZE,
                      dtype="bf16" if CUDA else "fp32")
    if CUDA:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)

    def run():
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=CUDA):
            recon = model(x)
            _, score = ops.anomaly_map(x, recon, n=4, k=7)
        sync(device)
        return score

    run()
    benchmark(run)
    if benchmark.stats is not None:
        bench_info["img_per_s"] = BATCH / benchmark.stats.stats.median
