"""``fae-fast bench``: plain PyTorch vs fae_fast's engine, measured in one run on one card.

Three providers score the same network (``build_model(ModelConfig(widths=...))``, random weights, BN in eval)
with the same post-processing (error map, n passes of a k x k valid-count box filter, max):

* ``eager_fp32``: what a user writes first -- eager fp32 model + the post-processing written plainly
  (as ``shared/anchors/anchor_gpu.py``);
* ``compiled_bf16``: the best off-the-shelf -- bf16 autocast, channels_last, ``torch.compile`` of model +
  post-processing (mode "reduce-overhead", i.e. Inductor's CUDA graphs, at batch 1; "default" above);
* ``engine``: :class:`fae_fast.inference.Engine` (BN folded, bf16 weights, channels_last, compiled, CUDA graphs,
  fused anomaly-map op, uint8 input).

Scenarios:

* ``gpu_resident``: input already on the device, throughput at each batch size (median of per-call CUDA-event
  timings; the plain providers get float32 input in [0, 1], the engine its native uint8 -- the input read is
  < 1 % of the work);
* ``host_latency``: batch 1, EfficientAD protocol -- the clock starts before the host->device copy of a uint8
  frame in ordinary (pageable) host memory and stops when the map and score are on the host; p50 / p99;
* ``host_throughput``: the same protocol at batch 16, calls back to back (img/s = 16 / median latency);
* ``stream``: frames submitted one by one to :class:`fae_fast.inference.InlineStream` (batching up to 16,
  overlapped copies); img/s over the whole run and per-frame latency p50 / p99 (engine only).

Usage: ``fae-fast bench [--quick] [--json FILE] [--batch-sizes 1,16,64,256] [--size 256] ...``.
``--quick`` (tiny network and images, few repetitions, no torch.compile unless ``--compile``) runs on a CPU in
seconds, for CI.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["main", "make_model", "plain_postprocess", "Providers", "time_device", "time_host"]


def plain_postprocess(x: torch.Tensor, recon: torch.Tensor, n: int, k: int):
    """The post-processing as a user writes it: error map, n box filters, max (float32)."""
    err = (recon.float() - x.float()).pow(2).mean(1, keepdim=True)
    for _ in range(n):
        err = F.avg_pool2d(err, k, 1, k // 2, count_include_pad=False)
    return err, err.amax(dim=(1, 2, 3))


def make_model(widths=(64, 128, 256, 512), dilations=(1, 2, 4, 8), seed: int = 0) -> nn.Module:
    """The benchmark network: fae_fast's U-Net with random weights (a non-zero residual head), BN in eval."""
    from ..config import ModelConfig
    from ..models import build_model

    g = torch.Generator().manual_seed(seed)
    cfg = ModelConfig(widths=tuple(widths), dilations=tuple(dilations))
    model = build_model(cfg)
    head = getattr(model, "head", None)
    if isinstance(head, nn.Conv2d):  # the residual head starts at zero (identity model): give it a real output
        with torch.no_grad():
            head.weight.copy_(torch.randn(head.weight.shape, generator=g) * 0.01)
    return model.eval()


class Providers:
    """The three pipelines of the benchmark over one model.

    Each provider has a device function (``device_fn(x) -> (map, score)`` on device tensors) and a host function
    (``host_fn(frames_uint8_BHWC_cpu) -> (map, score)`` on the host).
    """

    def __init__(self, model: nn.Module, *, image_size, n: int, k: int, device, dtype=torch.bfloat16,
                 compile: bool = True, batch_sizes=(1, 16, 64, 256), map_backend: str = "auto",
                 compile_dynamic: bool | None = False):
        from .engine import Engine

        self.device = torch.device(device)
        self.n, self.k, self.dtype, self.compile = n, k, dtype, compile
        self.image_size = tuple(image_size)
        self.eager = copy.deepcopy(model).eval().to(self.device)
        self.cl = copy.deepcopy(model).eval().to(self.device).to(memory_format=torch.channels_last)
        self._compiled: dict[tuple, Callable] = {}
        t0 = time.perf_counter()
        self.engine = Engine(model, image_size=image_size, n=n, k=k, dtype=dtype, device=self.device,
                             compile=compile, cuda_graphs=self.device.type == "cuda", batch_sizes=batch_sizes,
                             map_backend=map_backend, compile_dynamic=compile_dynamic)
        self.engine_build_s = time.perf_counter() - t0

    # plain eager fp32 --------------------------------------------------------------------------------------
    def eager_device(self, x):
        with torch.inference_mode():
            return plain_postprocess(x, self.eager(x), self.n, self.k)

    def eager_host(self, frames):
        with torch.inference_mode():
            x = frames.to(self.device).permute(0, 3, 1, 2).float().div(255.0)
            m, s = plain_postprocess(x, self.eager(x), self.n, self.k)
            return m.cpu(), s.cpu()

    # plain bf16 + channels_last + torch.compile -------------------------------------------------------------
    def _compiled_fn(self, kind: str, batch: int):
        key = (kind, batch)
        if key not in self._compiled:
            mode = "reduce-overhead" if (batch == 1 and self.device.type == "cuda") else "default"
            model, n, k = self.cl, self.n, self.k

            if kind == "device":
                def fn(x):
                    return plain_postprocess(x, model(x), n, k)
            else:
                def fn(frames_dev):
                    x = frames_dev.permute(0, 3, 1, 2).float().div(255.0)
                    return plain_postprocess(x, model(x), n, k)
            # dynamic=False: one specialised graph per batch size, the strongest plain baseline (a batch-dynamic
            # graph, torch.compile's default after a recompile, can only be slower)
            self._compiled[key] = torch.compile(fn, mode=mode, dynamic=False) if self.compile else fn
        return self._compiled[key]

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    def compiled_device(self, x):
        fn = self._compiled_fn("device", x.shape[0])
        with torch.inference_mode(), self._autocast():
            m, s = fn(x.contiguous(memory_format=torch.channels_last))
        return m, s

    def compiled_host(self, frames):
        fn = self._compiled_fn("host", frames.shape[0])
        with torch.inference_mode(), self._autocast():
            m, s = fn(frames.to(self.device))
            return m.cpu(), s.cpu()

    # fae_fast engine ---------------------------------------------------------------------------------------
    def engine_device(self, x_uint8):
        return self.engine.run(x_uint8)

    def engine_host(self, frames):
        res = self.engine.predict(frames.permute(0, 3, 1, 2))
        return res.anomaly_map, res.pred_score


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_device(fn, x, device, warmup: int, reps: int) -> list[float]:
    """Per-call seconds of ``fn(x)`` (CUDA events on the GPU, perf_counter + sync elsewhere)."""
    for _ in range(warmup):
        fn(x)
    _sync(device)
    ts = []
    cuda = torch.device(device).type == "cuda"
    for _ in range(reps):
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn(x)
            b.record()
            b.synchronize()
            ts.append(a.elapsed_time(b) / 1e3)
        else:
            t = time.perf_counter()
            fn(x)
            ts.append(time.perf_counter() - t)
    return ts


def time_host(fn, frames, warmup: int, reps: int) -> list[float]:
    """Per-call seconds of ``fn(frames)``: host frame in, map and score on the host out (the fn syncs)."""
    for _ in range(warmup):
        fn(frames)
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        m, s = fn(frames)
        ts.append(time.perf_counter() - t)
    return ts


def _pct(ts, q):
    return float(np.percentile(np.asarray(ts) * 1e3, q))


def machine_info(device) -> dict:
    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
            "machine": platform.node(), "cpu_count": os.cpu_count()}
    dev = torch.device(device)
    info["gpu"] = torch.cuda.get_device_name(dev) if dev.type == "cuda" else None
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:  # noqa: BLE001 -- optional
        info["triton"] = None
    return info


def _parse_ints(s: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(v) for v in s.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {s!r}") from None
    if not vals or any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"expected positive ints, got {s!r}")
    return vals


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fae-fast bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny network/images, few reps (CPU CI)")
    p.add_argument("--json", metavar="FILE", help="write the results as JSON")
    p.add_argument("--device", default="auto", help="auto | cuda | cpu")
    p.add_argument("--size", type=int, default=None, help="image side (default 256; --quick: 32)")
    p.add_argument("--widths", type=_parse_ints, default=None, help="U-Net widths (default 64,128,256,512)")
    p.add_argument("--batch-sizes", type=_parse_ints, default=None, help="gpu_resident batches (1,16,64,256)")
    p.add_argument("--host-batch", type=int, default=16, help="batch of the host_throughput scenario")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"], help="low precision of compiled/engine")
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--k", type=int, default=7)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--reps", type=int, default=None, help="timed calls per gpu_resident point")
    p.add_argument("--latency-reps", type=int, default=None, help="timed calls of the host scenarios")
    p.add_argument("--stream-frames", type=int, default=None, help="frames pushed through the InlineStream")
    p.add_argument("--providers", default="eager_fp32,compiled_bf16,engine")
    p.add_argument("--scenarios", default="gpu_resident,host_latency,host_throughput,stream")
    p.add_argument("--compile", dest="compile", action="store_true", default=None,
                   help="torch.compile the compiled provider and the engine (default: on unless --quick)")
    p.add_argument("--no-compile", dest="compile", action="store_false")
    return p


def main(argv=None) -> int:
    """Run the benchmark; prints a table, writes JSON with ``--json``. Returns 0."""
    args = _parser().parse_args(argv)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("fae-fast bench: CUDA requested but not available", file=sys.stderr)
        return 2
    q = args.quick
    size = args.size or (32 if q else 256)
    widths = args.widths or ((8, 16) if q else (64, 128, 256, 512))
    dilations = (1, 2) if q else (1, 2, 4, 8)
    batches = args.batch_sizes or ((1, 2) if q else (1, 16, 64, 256))
    host_batch = 2 if q and args.host_batch == 16 else args.host_batch
    warmup = args.warmup if args.warmup is not None else (1 if q else 10)
    reps = args.reps or (3 if q else 50)
    lat_reps = args.latency_reps or (5 if q else 500)
    stream_frames = args.stream_frames or (8 if q else 4096)
    do_compile = (not q) if args.compile is None else args.compile
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    if device.type == "cpu" and dtype == torch.float16:
        dtype = torch.bfloat16
    providers = [p.strip() for p in args.providers.split(",") if p.strip()]
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    bad = set(providers) - {"eager_fp32", "compiled_bf16", "engine"}
    if bad:
        print(f"fae-fast bench: unknown providers {sorted(bad)}", file=sys.stderr)
        return 2
    bad = set(scenarios) - {"gpu_resident", "host_latency", "host_throughput", "stream"}
    if bad:
        print(f"fae-fast bench: unknown scenarios {sorted(bad)}", file=sys.stderr)
        return 2

    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    model = make_model(widths, dilations)
    # the engine captures exactly the measured sizes (specialised compilations, like the compiled baseline); the
    # stream scenario pads partial batches up to host_batch
    engine_batches = tuple(sorted(set(batches) | {1, host_batch}))
    prov = Providers(model, image_size=(size, size), n=args.n, k=args.k, device=device, dtype=dtype,
                     compile=do_compile, batch_sizes=engine_batches)
    info = machine_info(device)
    header = dict(info, device=str(device), dtype=str(dtype).replace("torch.", ""), image_size=[size, size],
                  widths=list(widths), n=args.n, k=args.k, compile=do_compile, quick=q,
                  map_backend=prov.engine.map_backend, engine=repr(prov.engine))
    print(f"fae-fast bench: {info['gpu'] or 'CPU'} torch {info['torch']} triton {info['triton']} "
          f"{size}x{size} widths {widths} dtype {header['dtype']} compile={do_compile}", flush=True)
    rows: list[dict] = []
    gen = torch.Generator().manual_seed(0)

    def record(provider, scenario, batch, ts, img_per_s=None, extra=None):
        med = float(np.median(ts))
        row = dict(provider=provider, scenario=scenario, batch=batch,
                   img_per_s=img_per_s if img_per_s is not None else batch / med,
                   p50_ms=_pct(ts, 50), p99_ms=_pct(ts, 99), reps=len(ts))
        row.update(extra or {})
        rows.append(row)
        print(f"  {scenario:16s} {provider:14s} b={batch:4d} {row['img_per_s']:11.1f} img/s "
              f"p50 {row['p50_ms']:8.3f} ms p99 {row['p99_ms']:8.3f} ms", flush=True)

    def timed_first(fn, *a):  # first call: compilation / capture, reported separately
        t = time.perf_counter()
        fn(*a)
        _sync(device)
        return time.perf_counter() - t

    # parity of the providers on one batch (a sanity column, not a test)
    frames = torch.randint(0, 256, (max(batches), size, size, 3), dtype=torch.uint8, generator=gen)
    x8 = frames[:2].permute(0, 3, 1, 2).to(device)
    _, s_ref = prov.eager_device(x8.float() / 255)
    _, s_eng = prov.engine_device(x8.contiguous(memory_format=torch.channels_last))
    header["engine_vs_eager_max_rel_score_diff"] = float(((s_eng.float() - s_ref).abs()
                                                           / s_ref.abs().clamp_min(1e-12)).max())

    if "gpu_resident" in scenarios:
        for b in batches:
            xu8 = frames[:b].permute(0, 3, 1, 2).to(device).contiguous(memory_format=torch.channels_last)
            xf = xu8.float().div(255.0).contiguous()
            for p in providers:
                fn, x = {"eager_fp32": (prov.eager_device, xf), "compiled_bf16": (prov.compiled_device, xf),
                         "engine": (prov.engine_device, xu8)}[p]
                first = timed_first(fn, x)
                record(p, "gpu_resident", b, time_device(fn, x, device, warmup, reps), extra={"first_call_s": first})
    host_fns = {"eager_fp32": prov.eager_host, "compiled_bf16": prov.compiled_host, "engine": prov.engine_host}
    for scen, b in (("host_latency", 1), ("host_throughput", host_batch)):
        if scen not in scenarios:
            continue
        fr = frames[:b].clone() if b <= frames.shape[0] else torch.randint(
            0, 256, (b, size, size, 3), dtype=torch.uint8, generator=gen)
        for p in providers:
            first = timed_first(host_fns[p], fr)
            record(p, scen, b, time_host(host_fns[p], fr, warmup, lat_reps), extra={"first_call_s": first})
    if "stream" in scenarios and "engine" in providers:
        from .stream import InlineStream

        one = [frames[i % frames.shape[0]].numpy() for i in range(stream_frames)]
        stream = InlineStream(prov.engine, max_batch=host_batch, max_delay_ms=0.5, capacity=4 * host_batch,
                              copy_frames=False)
        for f in one[:2 * host_batch]:  # warm-up (captures the partial-batch graphs)
            stream.submit(f)
        stream.flush()
        while stream.poll():
            pass
        lat = []
        t0 = time.perf_counter()
        for f in one:
            stream.submit(f)
            lat.extend(r.latency_ms / 1e3 for r in stream.poll())
        stream.close()
        lat.extend(r.latency_ms / 1e3 for r in stream)
        wall = time.perf_counter() - t0
        record("engine", "stream", host_batch, lat, img_per_s=stream_frames / wall,
               extra={"mean_batch": stream.stats["frames"] / max(1, stream.stats["batches"])})

    print("\n== fae-fast bench ==")
    print(f"{'scenario':16s} {'provider':14s} {'batch':>5s} {'img/s':>11s} {'p50 ms':>9s} {'p99 ms':>9s}")
    for r in rows:
        print(f"{r['scenario']:16s} {r['provider']:14s} {r['batch']:5d} {r['img_per_s']:11.1f} "
              f"{r['p50_ms']:9.3f} {r['p99_ms']:9.3f}")
    if args.json:
        from .._atomic import write_text

        write_text(args.json, json.dumps(dict(header, rows=rows), indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
