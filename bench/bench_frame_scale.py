"""The cost of ``map.frame_scale``: the CPU preset's network scoring KolektorSDD-sized frames with the fused image
score ("max+template"), the template reading frames at the network's size (scale 1) or at twice it (scale 2:
four times the pixels read and templated, the network on their area mean), side by side: plain PyTorch (the
engine's eager fp32 pipeline, no folding) and fae_fast's engine (ONNX Runtime on the CPU where installed, else its
PyTorch backend; compiled with CUDA graphs on CUDA).

Run: ``python -m pytest bench/bench_frame_scale.py -o python_files='bench_*.py'
--benchmark-json=bench/results/frame_scale_<machine>.json``.
"""
import pytest
import torch

from bench._common import sync
from fae_fast.inference import Engine
from fae_fast.inference.bench import make_model

CUDA = torch.cuda.is_available()
SIZE = (272, 112)  # the CPU preset's network size on KolektorSDD (176^2 pixels at the data's aspect ratio)
WIDTHS, DILATIONS = (16, 32, 64, 128), (1, 2, 4)  # the CPU preset's network
BATCH = 8
N, K = 4, 3  # the CPU preset's smoothing at this size


def _stats(h: int, w: int) -> dict:
    """Valid "max+template" statistics (zero means, unit spreads): the cost does not depend on their values."""
    one, zero = torch.ones((1, 1, h, w)), torch.zeros((1, 1, h, w))
    return {"mean": zero, "scale": one, "template_mean": zero.clone(), "template_scale": one.clone(),
            "score_center": torch.tensor(0.0), "score_spread": torch.tensor(1.0),
            "template_center": torch.tensor(0.0), "template_spread": torch.tensor(1.0)}


@pytest.fixture(scope="module")
def model():
    return make_model(WIDTHS, DILATIONS)


@pytest.mark.parametrize("scale", [1, 2])
@pytest.mark.parametrize("provider", ["eager_fp32", "engine"])
def test_frame_scale_cost(benchmark, bench_info, model, provider, scale):
    dev = torch.device("cuda" if CUDA else "cpu")
    h, w = SIZE[0] * scale, SIZE[1] * scale
    eng = Engine(model, image_size=(h, w), n=N, k=K, device=dev, normalize="zscore", map_stats=_stats(h, w),
                 image_score="max+template", template_n=1, frame_scale=scale, batch_sizes=(BATCH,),
                 threads=None if CUDA else torch.get_num_threads())
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (BATCH, 3, h, w), dtype=torch.uint8, generator=gen).to(dev)
    if provider == "eager_fp32":
        pipe = eng.reference_pipeline(model)

        def fn():
            with torch.inference_mode():
                return pipe(x)
    else:
        def fn():
            return eng.run(x)
    fn()  # export / compilation / graph capture outside the timing
    sync(dev)

    def run():
        out = fn()
        sync(dev)
        return out

    bench_info.update(provider=provider, frame_scale=scale, frame_size=[h, w], network_size=list(SIZE),
                      batch=BATCH, widths=list(WIDTHS), engine_backend=eng.backend, dtype=str(eng.dtype))
    amap, score = run()
    assert amap.shape[-2:] == (h, w) and score.shape == (BATCH,) and bool(torch.isfinite(score).all())
    benchmark(run)
