"""Helpers for the benchmarks: machine description, device sync, bytes-moved bookkeeping."""
from __future__ import annotations

import os
import platform
import subprocess

import torch


def git_sha() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=os.path.dirname(__file__),
                                       stderr=subprocess.DEVNULL, text=True).strip()
    except Exception:
        return "unknown"


def machine_info() -> dict:
    """Names the machine: GPU (or CPU model and core count), torch/triton/CUDA versions, git sha."""
    info = {
        "machine": platform.node(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "git_sha": git_sha(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    else:
        info["gpu"] = None
    try:
        import triton

        info["triton"] = triton.__version__
        info["triton_interpret"] = os.environ.get("TRITON_INTERPRET", "0")
    except Exception:
        info["triton"] = None
    return info


def sync(device) -> None:
    """Wait for the device so that the timed call includes the work it launched."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def bandwidth_gbs(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9 if seconds > 0 else float("nan")
