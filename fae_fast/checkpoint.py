"""Model files and training-state files: one atomic writer, strict loaders.

Two kinds of file are written here, both with :func:`torch.save` and read back with
``torch.load(weights_only=True)`` (so a file can hold only plain containers, numbers, strings and tensors, and
loading one never runs code from it):

* the **model file** (:func:`save_model_file` / :func:`load_model_file`): what a trained detector needs at
  inference: weights, the whole :class:`~fae_fast.config.FAEConfig`, the image size and the thresholds;
* the **training state** (:func:`save_train_state` / :func:`load_train_state`): everything
  :func:`fae_fast.train.train` needs to continue a run bit-exactly (model, optimiser, scheduler, step,
  generator states, config).

Each file carries a format marker that says which kind it is, so a training state handed to the model loader
(or any other torch file) is refused with a clear message instead of failing later on a missing key.

Both are written by :func:`atomic_save`: a temporary file in the destination folder, flushed and fsync'ed, then
``os.replace``'d over the destination. A crash or an exception while writing leaves the previous file intact and
never a half-written one under the final name.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import _atomic
from ._version import __version__
from .config import FAEConfig, check_image_size

__all__ = ["FORMAT_MARKER", "FORMAT_VERSION", "TRAIN_STATE_MARKER", "TRAIN_STATE_VERSION", "ModelFile",
           "atomic_save", "save_model_file", "load_model_file", "save_train_state", "load_train_state"]

FORMAT_MARKER = "fae_fast.model"
FORMAT_VERSION = 1  # bump when the layout of the model file changes incompatibly
TRAIN_STATE_MARKER = "fae_fast.train_state"
TRAIN_STATE_VERSION = 1


@dataclass
class ModelFile:
    """Contents of a model file.

    Attributes:
        state: the model's ``state_dict`` (tensors on ``map_location``).
        config: the full configuration the model was trained with.
        image_size: (H, W) the model was trained at.
        thresholds: ``{"image": float, "pixel": float}`` (may be empty when the model was saved untrained).
        version: the fae_fast version that wrote the file.
        meta: free-form plain data (training history summary, dataset name, ...).
        format_version: the layout version of the file (:data:`FORMAT_VERSION` for files written now).
    """

    state: dict[str, torch.Tensor]
    config: FAEConfig
    image_size: tuple[int, int]
    thresholds: dict[str, float]
    version: str
    meta: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION


# --------------------------------------------------------------------------------------------------------------
# the one writer


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` to ``path`` atomically: temp file in the same folder + fsync + ``os.replace``.

    Uses :func:`fae_fast._atomic.atomic_path` (the temporary file lives in the destination folder because
    ``os.replace`` is atomic only within one file system), then fsyncs the folder so the rename itself is
    durable. On any exception the temporary file is removed and the previous ``path`` (if any) is untouched.

    Args:
        obj: plain containers and tensors (anything ``torch.load(weights_only=True)`` can read back).
        path: destination file; its folder is created if missing.

    Returns:
        The destination as a :class:`~pathlib.Path`.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"cannot write {path}: it is a directory")
    with _atomic.atomic_path(path) as tmp:  # the project's one temp + fsync + os.replace writer
        with open(tmp, "wb") as f:
            _write(obj, f)
    _fsync_dir(path.parent)
    return path


def _write(obj: Any, f) -> None:
    """The serialiser behind :func:`atomic_save` (a separate name so tests can make it fail midway)."""
    torch.save(obj, f)


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where directories cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _read(path: str | os.PathLike, map_location, what: str) -> dict:
    """``torch.load(weights_only=True)`` with errors turned into ``ValueError`` naming the path."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{what} {path} does not exist")
    if not path.is_file():
        raise ValueError(f"{what} {path} is not a file")
    try:
        with warnings.catch_warnings():
            # a legacy (non-zip) pickle draws a protocol warning before it is refused or checked below
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        # weights_only refuses arbitrary pickles (UnpicklingError); garbage bytes fail anywhere in zip or
        # pickle parsing (BadZipFile, EOFError, KeyError, RuntimeError...): all mean "not one of our files"
        raise ValueError(f"{path} is not a fae_fast {what} (not a torch file, or it holds objects other than "
                         f"plain containers and tensors): {type(exc).__name__}: {str(exc)[:200]}") from exc
    if not isinstance(obj, dict):
        raise ValueError(f"{path} is not a fae_fast {what}: it holds a {type(obj).__name__}, not a dict")
    return obj


def _read_checked(path, map_location, marker: str, version: int, what: str, on_format: str, on_version: str):
    """Read ``path`` and check its marker (ValueError), format version (ValueError naming both) and the fae_fast
    version that wrote it (a warning naming both). Returns (object, format_version, written_by)."""
    obj = _read(path, map_location, what)
    if obj.get("format") != marker:
        raise _marker_error(path, obj, marker, what)
    fv = obj.get("format_version")
    if fv != version:
        raise ValueError(f"{path} has {what} format_version {fv!r}, but this fae_fast {__version__} reads "
                         f"format_version {version}; {on_format}")
    written_by = str(obj.get("fae_fast_version", "unknown"))
    if written_by != __version__:
        warnings.warn(f"{path} was written by fae_fast {written_by}, this is fae_fast {__version__} (same {what} "
                      f"format {version}); {on_version}", UserWarning, stacklevel=3)
    return obj, fv, written_by


def _marker_error(path, obj: dict, expected: str, what: str) -> ValueError:
    marker = obj.get("format")
    if marker == TRAIN_STATE_MARKER:
        found = "a fae_fast training-state file"
    elif marker == FORMAT_MARKER:
        found = "a fae_fast model file"
    else:
        found = "a torch file without the fae_fast format marker"
    hint = ""
    if expected == FORMAT_MARKER and marker == TRAIN_STATE_MARKER:
        hint = " (resume training from it with train(..., resume=path), or save a model file at the end)"
    return ValueError(f"{path} is not a fae_fast {what}: it is {found}{hint}")


# --------------------------------------------------------------------------------------------------------------
# model files


def _config_dict(config) -> dict:
    if isinstance(config, FAEConfig):
        return config.to_dict()
    if isinstance(config, dict):
        FAEConfig.from_dict(config)  # validate now rather than at load time
        return dict(config)
    raise TypeError(f"config must be a FAEConfig or a dict, got {type(config).__name__}")


def _thresholds(thresholds) -> dict[str, float]:
    if thresholds is None:
        return {}
    if not isinstance(thresholds, dict):
        raise TypeError(f"thresholds must be a dict like {{'image': t, 'pixel': t}}, got {type(thresholds).__name__}")
    # None is kept: a detector may be saved before its thresholds are known
    return {str(k): (None if v is None else float(v)) for k, v in thresholds.items()}


def save_model_file(path, *, model_state: dict[str, torch.Tensor], config, image_size, thresholds,
                    meta: dict | None = None) -> Path:
    """Write a model file atomically.

    Args:
        path: destination (conventionally ``*.pt``).
        model_state: ``model.state_dict()``; tensors are copied to the CPU (a file loads anywhere).
        config: :class:`~fae_fast.config.FAEConfig` (or its dict).
        image_size: (H, W) the model expects.
        thresholds: ``{"image": float, "pixel": float}``.
        meta: optional plain data (str/int/float/bool/None/list/tuple/dict, tensors).

    Returns:
        The path written.

    Example:
        >>> save_model_file("m.pt", model_state=model.state_dict(), config=cfg, image_size=(256, 256),
        ...                 thresholds={"image": 0.01, "pixel": 0.02})  # doctest: +SKIP
    """
    if not isinstance(model_state, dict):
        raise TypeError(f"model_state must be a state_dict (dict of tensors), got {type(model_state).__name__}")
    payload = {
        "format": FORMAT_MARKER,
        "format_version": FORMAT_VERSION,
        "fae_fast_version": __version__,
        "state": {k: (v.detach().cpu() if isinstance(v, torch.Tensor) else v) for k, v in model_state.items()},
        "config": _config_dict(config),
        "image_size": check_image_size(image_size, "image_size"),
        "thresholds": _thresholds(thresholds),
        "meta": dict(meta or {}),
    }
    _check_loadable(payload["meta"])
    return atomic_save(payload, path)


def _check_loadable(meta: dict) -> None:
    """Refuse metadata that ``torch.load(weights_only=True)`` would not read back (numpy scalars, paths, objects):
    a model file must never be written that its own loader rejects."""
    import io

    for key, value in meta.items():
        buf = io.BytesIO()
        torch.save(value, buf)
        buf.seek(0)
        try:
            torch.load(buf, weights_only=True)
        except Exception as exc:
            raise ValueError(f"meta[{key!r}] = {value!r} cannot be stored in a model file (use plain Python numbers, "
                             f"strings, lists, dicts or tensors): {type(exc).__name__}") from None


def load_model_file(path, map_location="cpu") -> ModelFile:
    """Read a model file written by :func:`save_model_file`.

    Raises:
        ValueError: ``path`` is missing, not a file, not a torch file, not a fae_fast model file (a training
            state, a random pickle), or has another ``format_version`` (the message names both versions).

    Warns:
        UserWarning: the file was written by another fae_fast version with the same format (names both).
    """
    obj, fv, written_by = _read_checked(path, map_location, FORMAT_MARKER, FORMAT_VERSION, "model file",
                                        "re-export it with a matching fae_fast version", "loading it anyway")
    missing = [k for k in ("state", "config", "image_size", "thresholds") if k not in obj]
    if missing:
        raise ValueError(f"{path} is a damaged fae_fast model file: missing {missing}")
    try:
        config = FAEConfig.from_dict(obj["config"])
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{path} holds an invalid config: {exc}") from exc
    return ModelFile(state=obj["state"], config=config, image_size=tuple(int(v) for v in obj["image_size"]),
                     thresholds=dict(obj["thresholds"]), version=written_by, meta=dict(obj.get("meta") or {}),
                     format_version=int(fv))


# --------------------------------------------------------------------------------------------------------------
# training state


def save_train_state(path, state: dict[str, Any]) -> Path:
    """Write a training state atomically (see :func:`fae_fast.train.train` for the keys it stores).

    Args:
        path: destination.
        state: plain containers and tensors; the format marker and versions are added here.
    """
    if not isinstance(state, dict):
        raise TypeError(f"state must be a dict, got {type(state).__name__}")
    payload = dict(state)
    payload.update(format=TRAIN_STATE_MARKER, format_version=TRAIN_STATE_VERSION, fae_fast_version=__version__)
    return atomic_save(payload, path)


def load_train_state(path, map_location="cpu") -> dict[str, Any]:
    """Read a training state written by :func:`save_train_state`.

    Raises:
        ValueError: not a training-state file (a model file, a random pickle, garbage) or another format version.
    """
    obj, _, _ = _read_checked(path, map_location, TRAIN_STATE_MARKER, TRAIN_STATE_VERSION, "training-state file",
                              "resume with the fae_fast version that wrote it",
                              "resuming anyway, but bit-exact continuation is only promised within one version")
    return obj

