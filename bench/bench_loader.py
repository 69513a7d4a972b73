"""Benchmark: image files -> device batches of 256x256 fp16, one epoch per timed call.

Providers side by side on the same files:

* ``naive``: a plain loop of :func:`fae_fast.data.read_image` (one thread, what a ``DataLoader`` with
  ``num_workers=0`` does), stacked, moved to the device, converted;
* ``cv2``: fae_fast's cv2 thread loader (``make_loader(backend="cv2")``, pinned uploads);
* ``dali``: fae_fast's DALI loader (GPU decode with ``device="mixed"`` on CUDA, DALI CPU-only mode otherwise).

Data sets, generated into a temporary folder: ``jpeg1024`` (1024x1024 JPEG, quality 90) and ``mvtec_png``
(900x900 RGB PNG, like MVTec AD's bottle). Full counts on CUDA (1024 JPEGs, 256 PNGs, batch 256), tiny counts on
CPU (6 files, batch 4) so the CPU CI run stays short. The anchor to beat on an H200: cv2 + 16 threads
1,113 img/s, DALI mixed decode 8,527 img/s; target >= 8,000 JPEG img/s through this loader.

Run: ``python -m pytest bench/bench_loader.py -o python_files='bench_*.py' --benchmark-json=bench/results/loader.json``.
``extra_info["img_per_s"]`` holds the median throughput.
"""
from __future__ import annotations

import pathlib

import cv2
import numpy as np
import pytest
import torch

from bench._common import sync
from fae_fast.data import make_loader, read_image
from fae_fast.data.datasets import parallel_map
from fae_fast.data.dali import dali_status

CUDA = torch.cuda.is_available()
SIZE = (256, 256)
BATCH = 256 if CUDA else 4
SETS = {  # name: (extension, side, count on CUDA, count on CPU)
    "jpeg1024": (".jpg", 1024, 1024, 6),
    "mvtec_png": (".png", 900, 256, 6),
}
PROVIDERS = ["naive", "cv2", "dali"]


def _texture(side: int, seed: int) -> np.ndarray:
    """Photo-like content (smooth blobs + gradient + mild grain), so JPEG/PNG sizes are realistic, unlike noise."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (side // 32, side // 32, 3), dtype=np.uint8)
    img = cv2.resize(small, (side, side), interpolation=cv2.INTER_CUBIC).astype(np.int16)
    img += rng.integers(-6, 7, img.shape, dtype=np.int16)
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.fixture(scope="session")
def image_sets(tmp_path_factory):
    out = {}
    for name, (ext, side, n_cuda, n_cpu) in SETS.items():
        d = tmp_path_factory.mktemp(name)
        n = n_cuda if CUDA else n_cpu

        def _write(i, d=d, ext=ext, side=side):
            params = [cv2.IMWRITE_JPEG_QUALITY, 90] if ext == ".jpg" else [cv2.IMWRITE_PNG_COMPRESSION, 3]
            ok, buf = cv2.imencode(ext, _texture(side, i), params)
            assert ok
            buf.tofile(str(d / f"{i:05d}{ext}"))

        parallel_map(_write, range(n))
        out[name] = sorted(pathlib.Path(d).iterdir())
    return out


def _naive_epoch(files, device):
    n = 0
    for i in range(0, len(files), BATCH):
        chunk = files[i:i + BATCH]
        x = torch.from_numpy(np.stack([read_image(f, SIZE) for f in chunk])).to(device)
        x = (x.permute(0, 3, 1, 2).float() / 255).half().contiguous()
        n += x.shape[0]
    sync(device)
    return n


def _loader_epoch(loader, device):
    n = 0
    for batch in loader:
        n += batch.images.shape[0]
    sync(device)
    return n


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("dataset", list(SETS))
def test_loader_throughput(benchmark, bench_info, device, image_sets, dataset, provider):
    files = image_sets[dataset]
    if provider == "naive":
        fn = lambda: _naive_epoch(files, device)  # noqa: E731
    else:
        if provider == "dali" and not dali_status()[0]:
            pytest.skip(dali_status()[1])
        loader = make_loader(files, SIZE, BATCH, device=device, backend=provider, dtype=torch.float16)
        _loader_epoch(loader, device)  # warm-up: builds the DALI pipeline, fills the allocators
        fn = lambda: _loader_epoch(loader, device)  # noqa: E731
    bench_info.update(provider=provider, dataset=dataset, images=len(files), batch_size=BATCH,
                      out_size=list(SIZE), dtype="float16", dali=dali_status()[1] if provider == "dali" else None)
    rounds = 5 if CUDA else 1
    n = benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=0)
    assert n == len(files)  # every file exactly once per epoch
    stats = getattr(benchmark, "stats", None)
    if stats is not None and getattr(stats, "stats", None) is not None:
        bench_info["img_per_s"] = len(files) / stats.stats.median
