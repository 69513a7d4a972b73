"""Training throughput: fae_fast's step (corruption + same-eps noise + noisy-target loss, ``_Trainer.step``) vs the
same U-Net trained plainly (clean batches, no corruption, no noise, an MSE loss), side by side.

Both providers share the network, AdamW (fused on CUDA), gradient clipping, autocast, channels_last and
``torch.compile`` of the network; the difference is the cost of fae_fast's corruption and noise. One timed call is
``STEPS`` steps back to back and one sync (img/s = STEPS x batch / median).

On CUDA: preset default (U-Net 64-512), 256^2, batch 32, bf16, compiled (DESIGN.md target on an H200, unmeasured:
>= 1,200 img/s with corruption and noise). On the CPU: preset tiny at 32^2, batch 2, no compile, so CI's
``--benchmark-disable`` run takes seconds. With ``BENCH_PROFILE_DIR`` set, each provider also writes
``train_step_<provider>_profile.txt`` there (torch.profiler: wall vs device-busy time per step, top-20 kernels).

Run: ``python -m pytest bench/bench_train_step.py -o python_files='bench_*.py' --benchmark-json=...``.
"""
from __future__ import annotations

import contextlib
import itertools
import os
import time

import pytest
import torch
import torch.nn.functional as F

from bench._common import CUDA, profile_table, sync
from fae_fast.config import preset
from fae_fast.models import build_model
from fae_fast.scoring import autocast_dtype
from fae_fast.train import _Trainer

PRESET, SIZE, BATCH, N_IMAGES = ("default", 256, 32, 256) if CUDA else ("tiny", 32, 2, 8)
STEPS, ROUNDS, WARMUP = (10, 8, 3) if CUDA else (1, 2, 1)  # WARMUP steps: compilation, cuDNN autotuning


class _PlainStep:
    """The same U-Net, optimiser, clipping, autocast, channels_last and compile as ``_Trainer``, trained as a
    plain autoencoder: a random batch of clean images in, MSE to the same images."""

    def __init__(self, cfg, images: torch.Tensor, dev: torch.device):
        tc = cfg.train
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(tc.seed))
            model = build_model(cfg.model)
        self.model = model.to(dev).to(memory_format=torch.channels_last).train()
        self.fwd = torch.compile(self.model) if tc.compile else self.model
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=float(tc.lr), weight_decay=float(tc.weight_decay),
                                     fused=dev.type == "cuda")
        amp = autocast_dtype(tc.amp, dev)
        self.autocast = torch.autocast(dev.type, dtype=amp) if amp is not None else contextlib.nullcontext()
        self.images, self.batch, self.dev, self.clip = images, int(tc.batch_size), dev, float(tc.grad_clip)

    def step(self, step: int) -> torch.Tensor:
        idx = torch.randint(self.images.shape[0], (self.batch,), device=self.dev)
        x = self.images[idx].float().div_(255.0).contiguous(memory_format=torch.channels_last)
        with self.autocast:
            recon = self.fwd(x)
        loss = F.mse_loss(recon.float(), x)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.opt.step()
        return loss.detach()


def _config(device: torch.device):
    cfg = preset(PRESET)
    cfg.train.image_size = (SIZE, SIZE)
    cfg.train.batch_size = BATCH
    cfg.train.compile = CUDA
    cfg.train.device = device.type
    cfg.train.steps = 100_000  # the learning-rate schedule only
    return cfg


@pytest.mark.parametrize("provider", ["fae_fast", "plain"])
def test_train_step(benchmark, bench_info, device, provider):
    cfg = _config(device)
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (N_IMAGES, 3, SIZE, SIZE), dtype=torch.uint8, generator=gen).to(device)
    trainer = _Trainer(cfg, images, device) if provider == "fae_fast" else _PlainStep(cfg, images, device)
    counter = itertools.count()

    def steps():
        for _ in range(STEPS):
            loss = trainer.step(next(counter))
        return loss

    def run():
        loss = steps()
        sync(device)
        return loss

    t0 = time.perf_counter()
    for _ in range(WARMUP):
        trainer.step(next(counter))
    sync(device)
    bench_info.update(provider=provider, preset=PRESET, widths=list(cfg.model.widths), size=SIZE, batch=BATCH,
                      steps_per_call=STEPS, dtype="bf16" if CUDA else "fp32", compile=cfg.train.compile,
                      warmup_steps=WARMUP, warmup_s=time.perf_counter() - t0,
                      noise_backend=getattr(trainer, "noise_backend", None))
    loss = benchmark.pedantic(run, rounds=ROUNDS, iterations=1)
    assert bool(torch.isfinite(loss))
    if benchmark.stats is not None:
        median = benchmark.stats.stats.median
        bench_info.update(median_ms_per_step=median / STEPS * 1e3, img_per_s=STEPS * BATCH / median)
        print(f"\ntrain_step {provider}: {STEPS * BATCH / median:.0f} img/s, {median / STEPS * 1e3:.2f} ms per step "
              f"(batch {BATCH}, {SIZE}^2, preset {PRESET})", flush=True)
    out = os.environ.get("BENCH_PROFILE_DIR")
    if out:
        try:
            text = profile_table(lambda: trainer.step(next(counter)), 5 if CUDA else 1, device)
        except Exception as exc:  # the numbers above are what matters; a profiler quirk must not lose them
            text = f"profiling failed: {type(exc).__name__}: {exc}"
        with open(os.path.join(out, f"train_step_{provider}_profile.txt"), "w") as f:
            f.write(f"train step, {provider}, preset {PRESET}, {SIZE}^2, batch {BATCH}\n{text}\n")
