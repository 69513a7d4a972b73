"""What the compiled extension was built against and what runs now (import-safe, never loads the extension).

The build-time facts come from a marker string that ``csrc/ext.cpp`` compiles into the binary
(``FAE_FAST_BUILD_INFO{torch=...;cuda=...;with_cuda=...}``), read from the file's bytes, so they can be named
even when the ``.so`` cannot be loaded at all (undefined symbols after a torch upgrade is the usual case).

Imports flow one way: :mod:`fae_fast._ext` imports this module, never the reverse.
"""
from __future__ import annotations

import os
import re
import shlex
import sys

import torch

_MARKER = re.compile(rb"FAE_FAST_BUILD_INFO\{torch=([^;}]*);cuda=([^;}]*);with_cuda=([01])\}")


def runtime() -> str:
    """``"run-time torch X, CUDA Y"`` of this process."""
    return f"run-time torch {torch.__version__}, CUDA {torch.version.cuda or 'none'}"


def library_path() -> str | None:
    """Path of the compiled ``fae_fast/_C`` that this interpreter would import (or None when not built)."""
    import importlib.machinery

    here = os.path.dirname(os.path.abspath(__file__))
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:  # this interpreter's ABI tags, most specific first
        path = os.path.join(here, "_C" + suffix)
        if os.path.isfile(path):
            return path
    return None


def build_info(path: str | None = None) -> dict | None:
    """``{"torch", "cuda", "with_cuda", "path"}`` read from the binary without loading it; None if not built."""
    path = path or library_path()
    if path is None:
        return None
    try:
        with open(path, "rb") as fh:
            m = _MARKER.search(fh.read())
    except OSError:
        return None
    if m is None:
        return {"torch": "unknown", "cuda": "unknown", "with_cuda": False, "path": path}
    return {"torch": m.group(1).decode(), "cuda": m.group(2).decode() or "none", "with_cuda": m.group(3) == b"1",
            "path": path}


def fix_command() -> str:
    """The command that (re)builds the extension against the torch of this interpreter.

    ``--no-build-isolation`` is the point: without it pip builds in a fresh environment with whatever torch it
    downloads there, and the extension then refuses to load with the torch installed here.
    """
    pip = f"{shlex.quote(sys.executable)} -m pip install --no-build-isolation"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.path.isfile(os.path.join(root, "setup.py")):  # a source checkout (editable install)
        return f"{pip} -e {shlex.quote(root)}"
    return f"{pip} --force-reinstall --no-deps <path of the fae_fast source>"


def build_time() -> str:
    """``"build-time torch X, CUDA Y"`` of the compiled extension, or that there is none."""
    info = build_info()
    if info is None:
        return "extension not built (no fae_fast/_C*.so)"
    return f"build-time torch {info['torch']}, CUDA {info['cuda']}"


def describe() -> str:
    """One line naming build-time and run-time torch/CUDA versions, and whether the extension is disabled."""
    off = os.environ.get("FAE_FAST_NO_EXT", "0") not in ("", "0")
    prefix = "disabled by FAE_FAST_NO_EXT=1; " if off else ""
    return f"{prefix}{build_time()}; {runtime()}"


def check_versions(built_torch: str, built_cuda: str, run_torch: str, run_cuda: str | None) -> None:
    """Raise ImportError naming both sides when the build-time and run-time torch/CUDA versions differ.

    A C++ extension is only ABI-compatible with the torch it was compiled against, so any difference counts.
    """
    run_cuda = run_cuda or ""
    if built_torch != run_torch or (built_cuda or "") != run_cuda:
        raise ImportError(
            f"fae_fast._C was built against torch {built_torch}, CUDA {built_cuda or 'none'} but this process runs "
            f"torch {run_torch}, CUDA {run_cuda or 'none'} (a `pip install` without --no-build-isolation builds "
            f"against the torch it downloads); rebuild it against this torch with `{fix_command()}`")


def device_supported(device: torch.device) -> bool:
    """True when the loaded extension has kernels for ``device``'s type (CPU always; CUDA when compiled with it).

    Asks the already loaded ``fae_fast._C`` (False when it is not loaded), so this module never imports
    :mod:`fae_fast._ext`.
    """
    lib = sys.modules.get("fae_fast._C")
    kind = torch.device(device).type
    return lib is not None and (kind == "cpu" or (kind == "cuda" and bool(lib.with_cuda)))
