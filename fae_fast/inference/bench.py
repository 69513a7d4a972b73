"""``fae-fast bench``: plain PyTorch (and plain ONNX Runtime on the CPU) vs fae_fast's engine, in one run.

The providers score the same network (``build_model(ModelConfig(widths=...))``, random weights, BN in eval)
with the same post-processing (error map, n passes of a k x k valid-count box filter, max):

* ``eager_fp32``: what a user writes first -- eager fp32 model + the post-processing written plainly
  (as ``shared/anchors/anchor_gpu.py``);
* ``compiled_bf16``: the best off-the-shelf -- bf16 autocast, channels_last, ``torch.compile`` of model +
  post-processing (mode "reduce-overhead", i.e. Inductor's CUDA graphs, at batch 1; "default" above);
* ``engine``: :class:`fae_fast.inference.Engine` with ``backend="auto"`` (on CUDA: BN folded, bf16 weights,
  channels_last, compiled, CUDA graphs, fused anomaly-map op, uint8 input; on the CPU: ONNX Runtime on the
  exported graph, :mod:`fae_fast.inference.ort`);
* CPU only: ``engine_torch`` (the engine's PyTorch backend, fp32, BN folded), ``onnxruntime`` (plain ONNX
  Runtime on the *same* exported model bytes as the engine, default session options except
  ``intra_op_num_threads=--threads``: what a user would pick instead) and ``openvino`` (the same ONNX model in
  OpenVINO, f32, latency hint; listed when ``openvino`` is importable).

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
seconds, for CI. On the CPU: ``fae-fast bench --device cpu --preset tiny --threads 2 --json FILE`` (the JSON
names the machine, versions, threads, load average and git commit, and the engine's speed ratios).

Timing on a shared machine: ``--rounds R`` splits every provider's repetitions into R rounds that alternate
between the providers, so a load change from other jobs hits all of them rather than one.
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

__all__ = ["main", "make_model", "plain_postprocess", "Providers", "time_device", "time_host", "CPU_PROVIDERS"]

CPU_PROVIDERS = ("engine_torch", "onnxruntime", "openvino")  # providers that exist only on the CPU


def plain_postprocess(x: torch.Tensor, recon: torch.Tensor, n: int, k: int, error: str = "squared"):
    """The post-processing as a user writes it: error map, n box filters, max (float32)."""
    if error == "squared":
        err = (recon.float() - x.float()).pow(2).mean(1, keepdim=True)
    else:  # the Sobel gradient of the residual, written with conv2d
        from .. import reference

        err = reference.error_image(x, recon, error)
    for _ in range(n):
        err = F.avg_pool2d(err, k, 1, k // 2, count_include_pad=False)
    return err, err.amax(dim=(1, 2, 3))


def make_model(widths=(64, 128, 256, 512), dilations=(1, 2, 4, 8), seed: int = 0, members: int = 1) -> nn.Module:
    """The benchmark network: fae_fast's U-Net (``members`` > 1: that many, averaged) with random weights (a
    non-zero residual head), BN in eval."""
    from ..config import ModelConfig
    from ..models import build_model, networks

    g = torch.Generator().manual_seed(seed)
    cfg = ModelConfig(widths=tuple(widths), dilations=tuple(dilations), members=int(members))
    model = build_model(cfg)
    for net in networks(model):
        head = getattr(net, "head", None)
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
                 compile_dynamic: bool | None = False, threads: int | None = None, cpu_providers=()):
        from .engine import Engine

        self.device = torch.device(device)
        from ..config import MapConfig

        self.n, self.k, self.dtype, self.compile = n, k, dtype, compile
        self.error = MapConfig().error  # what the engine computes by default, so every column does the same
        self.image_size = tuple(image_size)
        self.eager = copy.deepcopy(model).eval().to(self.device)
        self.cl = copy.deepcopy(model).eval().to(self.device).to(memory_format=torch.channels_last)
        self._compiled: dict[tuple, Callable] = {}
        on_cpu = self.device.type == "cpu"
        t0 = time.perf_counter()
        # on the CPU the engine is fp32 without compile (its defaults there), so "auto" can pick ONNX Runtime
        self.engine = Engine(model, image_size=image_size, n=n, k=k, dtype="fp32" if on_cpu else dtype,
                             device=self.device, compile=compile and not on_cpu, cuda_graphs=not on_cpu,
                             batch_sizes=batch_sizes, compile_dynamic=compile_dynamic, threads=threads,
                             **({} if map_backend == "auto" else {"map_backend": map_backend}))
        self.engine_build_s = time.perf_counter() - t0
        self.engine_torch = self._ort = self._ov = None
        if "engine_torch" in cpu_providers:
            self.engine_torch = Engine(model, image_size=image_size, n=n, k=k, dtype="fp32", device="cpu",
                                       backend="torch", threads=threads)
        if "onnxruntime" in cpu_providers or "openvino" in cpu_providers:
            from .export import ReferenceGraph
            from .ort import onnx_model

            # the bytes the engine runs (the export cache hands out the same ones)
            onnx_bytes = onnx_model(ReferenceGraph(model, n=n, k=k, error=self.error), image_size=image_size,
                                    in_channels=self.engine.in_channels, input_dtype="uint8")
            if "onnxruntime" in cpu_providers:
                import onnxruntime as ort

                so = ort.SessionOptions()
                if threads is not None:
                    so.intra_op_num_threads = int(threads)
                self._ort = ort.InferenceSession(onnx_bytes, so, providers=["CPUExecutionProvider"])
            if "openvino" in cpu_providers:
                self._ov = _openvino_request(onnx_bytes, threads)

    # plain eager fp32 --------------------------------------------------------------------------------------
    def eager_device(self, x):
        with torch.inference_mode():
            return plain_postprocess(x, self.eager(x), self.n, self.k, self.error)

    def eager_host(self, frames):
        with torch.inference_mode():
            x = frames.to(self.device).permute(0, 3, 1, 2).float().div(255.0)
            m, s = plain_postprocess(x, self.eager(x), self.n, self.k, self.error)
            return m.cpu(), s.cpu()

    # plain bf16 + channels_last + torch.compile -------------------------------------------------------------
    def _compiled_fn(self, kind: str, batch: int):
        key = (kind, batch)
        if key not in self._compiled:
            mode = "reduce-overhead" if (batch == 1 and self.device.type == "cuda") else "default"
            model, n, k, error = self.cl, self.n, self.k, self.error

            if kind == "device":
                def fn(x):
                    return plain_postprocess(x, model(x), n, k, error)
            else:
                def fn(frames_dev):
                    x = frames_dev.permute(0, 3, 1, 2).float().div(255.0)
                    return plain_postprocess(x, model(x), n, k, error)
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

    # CPU only: the engine's PyTorch backend, plain ONNX Runtime, OpenVINO ---------------------------------------
    def engine_torch_device(self, x_uint8):
        return self.engine_torch.run(x_uint8)

    def engine_torch_host(self, frames):
        res = self.engine_torch.predict(frames.permute(0, 3, 1, 2))
        return res.anomaly_map, res.pred_score

    def onnxruntime_device(self, x_uint8):
        m, s = self._ort.run(None, {"images": x_uint8.contiguous().numpy()})
        return torch.from_numpy(m), torch.from_numpy(s)

    def onnxruntime_host(self, frames):  # (B, H, W, C) uint8 camera frames -> NCHW, as a user would
        m, s = self._ort.run(None, {"images": np.ascontiguousarray(frames.numpy().transpose(0, 3, 1, 2))})
        return torch.from_numpy(m), torch.from_numpy(s)

    def openvino_device(self, x_uint8):
        out = self._ov.infer({0: x_uint8.contiguous().numpy()})
        return torch.from_numpy(out[0].copy()), torch.from_numpy(out[1].copy())

    def openvino_host(self, frames):
        out = self._ov.infer({0: np.ascontiguousarray(frames.numpy().transpose(0, 3, 1, 2))})
        return torch.from_numpy(out[0].copy()), torch.from_numpy(out[1].copy())


def _openvino_request(onnx_bytes: bytes, threads: int | None):
    """An OpenVINO infer request on the ONNX model: f32 (OpenVINO would pick bf16 on CPUs that have it), the
    latency hint, ``threads`` inference threads."""
    import tempfile

    import openvino as ov

    core = ov.Core()
    with tempfile.TemporaryDirectory(prefix="fae_fast_ov_") as tmp:
        path = os.path.join(tmp, "graph.onnx")
        with open(path, "wb") as f:
            f.write(onnx_bytes)
        model = core.read_model(path)
    cfg = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
    if threads is not None:
        cfg["INFERENCE_NUM_THREADS"] = int(threads)
    return core.compile_model(model, "CPU", cfg).create_infer_request()


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


def _version(module: str) -> str | None:
    import importlib

    try:
        return getattr(importlib.import_module(module), "__version__", None)
    except Exception:  # noqa: BLE001 -- optional packages
        return None


def machine_info(device) -> dict:
    """The machine and software of a run: host, CPU, GPU, versions of torch and the runtimes, git commit."""
    from ..ablate import cpu_model, git_commit

    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
            "machine": platform.node(), "cpu": cpu_model(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            "git_commit": git_commit()}
    dev = torch.device(device)
    info["gpu"] = torch.cuda.get_device_name(dev) if dev.type == "cuda" else None
    info["triton"] = _version("triton")
    if dev.type == "cpu":
        info["onnxruntime"] = _version("onnxruntime")
        info["openvino"] = _version("openvino")
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
    p.add_argument("--preset", default=None, help="take widths and dilations from a preset (tiny | fast | default)")
    p.add_argument("--widths", type=_parse_ints, default=None, help="U-Net widths (default 64,128,256,512)")
    p.add_argument("--batch-sizes", type=_parse_ints, default=None, help="gpu_resident batches (1,16,64,256)")
    p.add_argument("--host-batch", type=int, default=16, help="batch of the host_throughput scenario")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"],
                   help="low precision of compiled/engine on CUDA (the CPU engines run fp32)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads: torch.set_num_threads, the engine's and ONNX Runtime's intra-op threads")
    p.add_argument("--rounds", type=int, default=None,
                   help="split each provider's reps into rounds alternating between providers (CPU default 3)")
    p.add_argument("--note", default=None, help="free text stored in the JSON (e.g. 'machine loaded by ...')")
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--k", type=int, default=7)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--reps", type=int, default=None, help="timed calls per gpu_resident point")
    p.add_argument("--latency-reps", type=int, default=None, help="timed calls of the host scenarios")
    p.add_argument("--stream-frames", type=int, default=None, help="frames pushed through the InlineStream")
    p.add_argument("--providers", default=None,
                   help="CUDA default eager_fp32,compiled_bf16,engine; CPU default eager_fp32,engine_torch,engine,"
                        "onnxruntime (and openvino when installed)")
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
    cpu = device.type == "cpu"
    size = args.size or (32 if q else 256)
    widths = args.widths or ((8, 16) if q else (64, 128, 256, 512))
    dilations, members = ((1, 2) if q else (1, 2, 4, 8)), 1
    if args.preset is not None:
        from ..config import PRESETS, preset

        if args.preset not in PRESETS:
            print(f"fae-fast bench: unknown preset {args.preset!r}; choose one of {PRESETS}", file=sys.stderr)
            return 2
        mcfg = preset(args.preset).model
        widths, dilations, members = args.widths or tuple(mcfg.widths), tuple(mcfg.dilations), int(mcfg.members)
    batches = args.batch_sizes or ((1, 2) if q else (1, 16, 64, 256))
    host_batch = 2 if q and args.host_batch == 16 else args.host_batch
    # the CPU runs ~100x fewer images per second: fewer repetitions by default
    warmup = args.warmup if args.warmup is not None else (1 if q else (2 if cpu else 10))
    reps = args.reps or (3 if q else (10 if cpu else 50))
    lat_reps = args.latency_reps or (5 if q else (10 if cpu else 500))
    stream_frames = args.stream_frames or (8 if q else (64 if cpu else 4096))
    rounds = max(1, args.rounds or (3 if cpu and not q else 1))
    do_compile = (not q) if args.compile is None else args.compile
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    if cpu and dtype == torch.float16:
        dtype = torch.bfloat16
    if args.threads is not None:
        if args.threads < 1:
            print(f"fae-fast bench: --threads must be >= 1, got {args.threads}", file=sys.stderr)
            return 2
        torch.set_num_threads(args.threads)
    if args.providers is None:
        providers = ["eager_fp32", "compiled_bf16", "engine"]
        if cpu:
            from . import ort

            providers = ["eager_fp32", "engine_torch", "engine"] + (["onnxruntime"] if ort.available() else [])
            providers += ["openvino"] if _version("openvino") is not None else []
    else:
        providers = [p.strip() for p in args.providers.split(",") if p.strip()]
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    bad = set(providers) - {"eager_fp32", "compiled_bf16", "engine", *CPU_PROVIDERS}
    if bad:
        print(f"fae-fast bench: unknown providers {sorted(bad)}", file=sys.stderr)
        return 2
    if not cpu and set(providers) & set(CPU_PROVIDERS):
        print(f"fae-fast bench: {sorted(set(providers) & set(CPU_PROVIDERS))} run on the CPU only "
              "(the GPU path is the engine)", file=sys.stderr)
        return 2
    bad = set(scenarios) - {"gpu_resident", "host_latency", "host_throughput", "stream"}
    if bad:
        print(f"fae-fast bench: unknown scenarios {sorted(bad)}", file=sys.stderr)
        return 2

    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    model = make_model(widths, dilations, members=members)
    # the engine captures exactly the measured sizes (specialised compilations, like the compiled baseline); the
    # stream scenario pads partial batches up to host_batch
    engine_batches = tuple(sorted(set(batches) | {1, host_batch}))
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    prov = Providers(model, image_size=(size, size), n=args.n, k=args.k, device=device, dtype=dtype,
                     compile=do_compile, batch_sizes=engine_batches, threads=args.threads,
                     cpu_providers=[p for p in providers if p in CPU_PROVIDERS])
    info = machine_info(device)
    header = dict(info, device=str(device), dtype="float32" if cpu else str(dtype).replace("torch.", ""),
                  image_size=[size, size], widths=list(widths), dilations=list(dilations), members=members,
                  preset=args.preset,
                  n=args.n, k=args.k, compile=do_compile and not cpu, quick=q, threads=args.threads,
                  rounds=rounds, warmup=warmup, reps=reps, latency_reps=lat_reps, note=args.note,
                  engine_backend=prov.engine.backend, engine_build_s=prov.engine_build_s,
                  map_backend=prov.engine.map_backend, engine=repr(prov.engine),
                  time=time.strftime("%Y-%m-%dT%H:%M:%S%z"), load_avg_start=load_start)
    print(f"fae-fast bench: {info['gpu'] or info['cpu']} torch {info['torch']} triton {info['triton']} "
          f"{size}x{size} widths {widths}{f' x {members} members' if members > 1 else ''} dtype {header['dtype']} "
          f"compile={header['compile']} engine backend {prov.engine.backend} threads {args.threads}", flush=True)
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

    def device_fns(xu8):  # provider -> (fn, its input): float input for the plain PyTorch ones, uint8 otherwise
        xf = xu8.float().div(255.0).contiguous()
        return {"eager_fp32": (prov.eager_device, xf), "compiled_bf16": (prov.compiled_device, xf),
                "engine": (prov.engine_device, xu8), "engine_torch": (prov.engine_torch_device, xu8),
                "onnxruntime": (prov.onnxruntime_device, xu8), "openvino": (prov.openvino_device, xu8)}

    def measure(scenario, batch, fns, timer, n_reps):
        """Time every provider in ``rounds`` alternating rounds (warm-up before each round's block)."""
        ts, first = {p: [] for p in fns}, {}
        per = max(1, -(-n_reps // rounds))
        for r in range(rounds):
            for p, (fn, x) in fns.items():
                if r == 0:
                    first[p] = timed_first(fn, x)
                ts[p] += timer(fn, x, warmup if r == 0 else 1, per)
        for p in fns:
            record(p, scenario, batch, ts[p], extra={"first_call_s": first[p]})

    # parity of the providers on one batch (a sanity column, not a test; compiled_bf16 would compile batch 2)
    frames = torch.randint(0, 256, (max(batches), size, size, 3), dtype=torch.uint8, generator=gen)
    x8 = frames[:2].permute(0, 3, 1, 2).to(device).contiguous(memory_format=torch.channels_last)
    fns2 = device_fns(x8)
    _, s_ref = prov.eager_device(fns2["eager_fp32"][1])
    header["max_rel_score_diff"] = {}
    for p in providers:
        if p != "compiled_bf16":
            fn, x = fns2[p]
            s = fn(x)[1].float().to(s_ref.device)
            header["max_rel_score_diff"][p] = float(((s - s_ref).abs() / s_ref.abs().clamp_min(1e-12)).max())
    header["engine_vs_eager_max_rel_score_diff"] = header["max_rel_score_diff"]["engine"] \
        if "engine" in providers else None

    if "gpu_resident" in scenarios:
        for b in batches:
            xu8 = frames[:b].permute(0, 3, 1, 2).to(device).contiguous(memory_format=torch.channels_last)
            fns = {p: f for p, f in device_fns(xu8).items() if p in providers}
            measure("gpu_resident", b, {p: fns[p] for p in providers},
                    lambda fn, x, w, n: time_device(fn, x, device, w, n), reps)
    host_fns = {"eager_fp32": prov.eager_host, "compiled_bf16": prov.compiled_host, "engine": prov.engine_host,
                "engine_torch": prov.engine_torch_host, "onnxruntime": prov.onnxruntime_host,
                "openvino": prov.openvino_host}
    for scen, b in (("host_latency", 1), ("host_throughput", host_batch)):
        if scen not in scenarios:
            continue
        fr = frames[:b].clone() if b <= frames.shape[0] else torch.randint(
            0, 256, (b, size, size, 3), dtype=torch.uint8, generator=gen)
        measure(scen, b, {p: (host_fns[p], fr) for p in providers}, time_host, lat_reps)
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

    # the engine's speed relative to each other provider, per scenario and batch (> 1: the engine is faster)
    ratios: dict[str, dict[str, dict[str, float]]] = {}
    for r in rows:
        eng = next((e for e in rows if e["provider"] == "engine" and e["scenario"] == r["scenario"]
                    and e["batch"] == r["batch"]), None)
        if eng is not None and r["provider"] != "engine":
            ratios.setdefault(r["scenario"], {}).setdefault(str(r["batch"]), {})[f"engine_vs_{r['provider']}"] = \
                eng["img_per_s"] / r["img_per_s"]
    header["ratios"] = ratios
    header["load_avg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None

    print("\n== fae-fast bench ==")
    print(f"{'scenario':16s} {'provider':14s} {'batch':>5s} {'img/s':>11s} {'p50 ms':>9s} {'p99 ms':>9s}")
    for r in rows:
        print(f"{r['scenario']:16s} {r['provider']:14s} {r['batch']:5d} {r['img_per_s']:11.1f} "
              f"{r['p50_ms']:9.3f} {r['p99_ms']:9.3f}")
    for scen, per_batch in ratios.items():
        for b, rs in per_batch.items():
            print(f"engine speed-up {scen} b={b}: " + ", ".join(f"{k[len('engine_vs_'):]} {v:.2f}x"
                                                                   for k, v in rs.items()))
    if args.json:
        from .._atomic import write_text

        write_text(args.json, json.dumps(dict(header, rows=rows), indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
