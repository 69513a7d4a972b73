"""Helpers for the benchmarks: machine description, device sync, bytes-moved bookkeeping."""
from __future__ import annotations

import os

import torch

from fae_fast.inference.bench import machine_info as engine_machine_info


def machine_info() -> dict:
    """Names the machine: the engine benchmark's record (host, CPU model and cores, GPU, versions, git commit)
    plus whether Triton runs through its interpreter."""
    info = engine_machine_info("cuda" if torch.cuda.is_available() else "cpu")
    info["triton_interpret"] = os.environ.get("TRITON_INTERPRET", "0")
    return info


def sync(device) -> None:
    """Wait for the device so that the timed call includes the work it launched."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def profile_table(fn, calls: int, device, kernels: int = 20, cpu_ops: int = 10) -> str:
    """``calls`` calls of ``fn()`` under torch.profiler, as text: wall and device-busy time per call (busy well
    below wall: the host does not launch fast enough), the top ``kernels`` CUDA kernels by device time and the
    top ``cpu_ops`` operators by self CPU time. Warm ``fn`` up first: compilation would fill the tables."""
    import time

    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.device(device).type == "cuda"
    sync(device)
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        sync(device)
        wall = time.perf_counter() - t0
    events = prof.key_averages()
    out = [f"{calls} calls: wall {wall / calls * 1e3:.3f} ms per call"]
    if cuda:
        key = "self_device_time_total" if hasattr(events[0], "self_device_time_total") else "self_cuda_time_total"
        kern = sorted((e for e in events if e.device_type == DeviceType.CUDA), key=lambda e: -getattr(e, key))
        busy = sum(getattr(e, key) for e in kern)  # microseconds, kernels + copies + sets
        out[0] += f", device busy {busy / calls / 1e3:.3f} ms per call ({busy / 1e4 / wall:.0f} % of wall)"
        out.append(f"\ntop {kernels} of {len(kern)} CUDA kernels by device time:")
        out.append(f"{'ms/call':>9s} {'%busy':>6s} {'n/call':>7s}  name")
        for e in kern[:kernels]:
            t = getattr(e, key)
            out.append(f"{t / calls / 1e3:9.4f} {100 * t / max(busy, 1e-9):6.1f} {e.count / calls:7.1f}  {e.key[:110]}")
        if not kern:  # no kernel records came back (CUPTI): the operators by device time instead
            out.append(events.table(sort_by=key, row_limit=kernels))
    out.append(f"\ntop {cpu_ops} operators by self CPU time:")
    out.append(events.table(sort_by="self_cpu_time_total", row_limit=cpu_ops))
    return "\n".join(out)


def bandwidth_gbs(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9 if seconds > 0 else float("nan")


CUDA = torch.cuda.is_available()
# batch x size grid of the op benchmarks: the full grid on a GPU, one tiny case on the CPU (CI runs them once)
OP_CASES = [(b, s) for s in (256, 512) for b in (1, 16, 64, 256)] if CUDA else [(1, 16)]
COPY_BW = 4.23e12  # bytes/s, device copy measured on the H200 of DESIGN.md: the floor quoted in extra_info
_compiled: dict = {}


def op_provider(op: str, name: str):
    """The callable of ``provider`` for a Triton-backed op: ``torch`` (the reference), ``torch_compile`` (the
    reference compiled; CUDA only, its first compile costs ~25 s on CPU) or ``triton`` (the kernel; CUDA or
    ``TRITON_INTERPRET=1``). Skips the benchmark where the provider cannot run."""
    import importlib

    import pytest

    from fae_fast import reference

    ref = getattr(reference, op)
    if name == "torch":
        return ref
    if name == "torch_compile":
        if not CUDA:
            pytest.skip("torch.compile is benchmarked on CUDA only (its first compile costs ~25 s on CPU)")
        if op not in _compiled:
            _compiled[op] = torch.compile(ref)
        return _compiled[op]
    if not CUDA and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        pytest.skip("the triton provider needs CUDA or TRITON_INTERPRET=1")
    return getattr(importlib.import_module(f"fae_fast.kernels.{op}"), f"{op}_triton")
