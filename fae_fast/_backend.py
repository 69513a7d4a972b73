"""Backend selection for the custom ops: lazy, import-safe, one warning per missing part.

Each op in :mod:`fae_fast.ops` names its implementations here as ``"module:function"`` strings; nothing is
imported until a call needs it, so ``import fae_fast`` never needs Triton, the compiled extension, a GPU or DALI.

Resolution of ``backend="auto"`` (overridable by the environment variable ``FAE_FAST_BACKEND``, which applies to
the ops that have the named backend; the others resolve as "auto"):

* ``"triton"`` for CUDA tensors when the op has a Triton kernel and Triton imports;
* ``"ext"`` when the op has an extension kernel for that device and the extension loads;
* ``"torch"`` (the reference) otherwise, with one warning naming what is missing. ``FAE_FAST_STRICT=1`` turns
  that warning into an error.

"auto" never picks Triton for CPU tensors: the interpreter (``TRITON_INTERPRET=1``) is for tests, and it cannot
run inside ``torch.compile`` (fake tensors have no data pointer), so compiled CPU graphs use the reference.

An explicitly requested backend that cannot run raises :class:`BackendUnavailable`.
"""
from __future__ import annotations

import importlib
import os
import warnings

import torch

BACKENDS = ("auto", "triton", "ext", "torch")


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run here."""


# op name -> backend -> "module:function"
IMPLS: dict[str, dict[str, str]] = {
    "corrupt_and_noise": {
        "torch": "fae_fast.reference:corrupt_and_noise",
        "triton": "fae_fast.kernels.corrupt_and_noise:corrupt_and_noise_triton",
    },
    "noisy_target_loss": {
        "torch": "fae_fast.reference:noisy_target_loss",
        "triton": "fae_fast.kernels.noisy_target_loss:noisy_target_loss_triton",
    },
    "anomaly_map": {
        "torch": "fae_fast.reference:anomaly_map",
        "triton": "fae_fast.kernels.anomaly_map:anomaly_map_triton",
    },
    "elastic_warp": {
        "torch": "fae_fast.reference:elastic_warp",
        "ext": "fae_fast._ext:elastic_warp",
    },
    "rasterize_strokes": {
        "torch": "fae_fast.reference:rasterize_strokes",
        "ext": "fae_fast._ext:rasterize_strokes",
    },
}

_cache: dict[str, object] = {}
_errors: dict[str, str] = {}
_warned: set[str] = set()


def _load(spec: str):
    """Import ``module:function``; None (and the reason remembered) when it cannot be imported."""
    if spec in _cache:
        return _cache[spec]
    mod_name, fn_name = spec.split(":")
    try:
        fn = getattr(importlib.import_module(mod_name), fn_name)
    except Exception as exc:  # ImportError, OSError from a bad .so, RuntimeError from version checks
        _errors[spec] = f"{type(exc).__name__}: {exc}"
        fn = None
    _cache[spec] = fn
    return fn


def why_unavailable(op: str, backend: str) -> str:
    spec = IMPLS[op].get(backend)
    if spec is None:
        return f"op {op!r} has no {backend!r} implementation"
    return _errors.get(spec, "not loaded yet")


def strict() -> bool:
    return os.environ.get("FAE_FAST_STRICT", "0") not in ("", "0", "false", "False")


def _warn_once(key: str, msg: str) -> None:
    if strict():
        raise BackendUnavailable(msg + " (FAE_FAST_STRICT=1 makes this an error)")
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=4)


def _ext_supports(device: torch.device) -> bool:
    from . import _ext_status

    return _ext_status.device_supported(device)


def resolve(op: str, backend: str, device: torch.device):
    """Return (backend_name, callable) for ``op`` on ``device``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    impls = IMPLS[op]
    if backend == "auto":
        env = os.environ.get("FAE_FAST_BACKEND", "auto")
        if env not in BACKENDS:
            raise ValueError(f"FAE_FAST_BACKEND must be one of {BACKENDS}, got {env!r}")
        # a global override applies to the ops that have that backend; the others resolve as auto
        backend = env if env in impls else "auto"
    if backend != "auto":
        spec = impls.get(backend)
        if spec is None:
            raise BackendUnavailable(f"op {op!r} has no {backend!r} backend (it has {sorted(impls)})")
        fn = _load(spec)
        if fn is None:
            raise BackendUnavailable(f"{op}: backend {backend!r} cannot be loaded: {_errors[spec]}")
        return backend, fn
    # auto
    if "triton" in impls and device.type == "cuda":
        fn = _load(impls["triton"])
        if fn is not None:
            return "triton", fn
        _warn_once("triton", f"Triton kernels unavailable ({_errors[impls['triton']]}); "
                             "falling back to the pure-PyTorch reference")
    if "ext" in impls:
        fn = _load(impls["ext"])
        if fn is not None and _ext_supports(device):
            return "ext", fn
        from . import _ext_status

        if fn is None:
            _warn_once("ext", f"fae_fast C++ extension unavailable ({_errors[impls['ext']]}); "
                              f"{_ext_status.describe()}; falling back to the pure-PyTorch reference")
        else:
            _warn_once(f"ext-{device.type}", f"the fae_fast C++ extension has no {device.type} kernels "
                                             f"({_ext_status.describe()}); falling back to the pure-PyTorch reference")
    return "torch", _load(impls["torch"])
