"""What the compiled extension was built against and what runs now (import-safe, no extension load).

Owned by the extension issue; the loader in :mod:`fae_fast._ext` fills in the build-time facts.
"""
from __future__ import annotations

import torch


def runtime() -> str:
    return f"run-time torch {torch.__version__}, CUDA {torch.version.cuda or 'none'}"


def describe() -> str:
    """One line naming build-time and run-time torch/CUDA versions (build-time unknown if not built)."""
    try:
        from . import _ext

        return _ext.describe()
    except Exception:
        return f"extension not built or not loadable; {runtime()}"


def device_supported(device: torch.device) -> bool:
    """True when the loaded extension has kernels for ``device``'s type."""
    try:
        from . import _ext

        return _ext.device_supported(device)
    except Exception:
        return False
