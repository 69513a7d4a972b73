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

Each file also carries a SHA-256 checksum of everything else in it (tensors by dtype, shape and bytes, in a
canonical order), verified on load: a damaged file (flipped bits in the weights) is refused instead of scoring
every image as a defect. Files written before checksums existed load with a warning. A model file's tensors are
checked against the network its config describes (built on the ``meta`` device, so nothing is allocated) and
its size is bounded (:data:`MAX_PARAMETERS`) before any caller builds the model.

Both are written by :func:`atomic_save`: a temporary file in the destination folder, flushed and fsync'ed, then
``os.replace``'d over the destination. A crash or an exception while writing leaves the previous file intact and
never a half-written one under the final name; a full disk raises :class:`fae_fast._atomic.WriteError`
("no space left on device: PATH").
"""
from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import _atomic
from ._version import __version__
from .config import MAX_SIDE, MIN_SIDE, FAEConfig, check_image_size

__all__ = ["FORMAT_MARKER", "FORMAT_VERSION", "TRAIN_STATE_MARKER", "TRAIN_STATE_VERSION", "MAX_PARAMETERS",
           "ModelFile", "atomic_save", "save_model_file", "load_model_file", "save_train_state", "load_train_state"]

FORMAT_MARKER = "fae_fast.model"
FORMAT_VERSION = 1  # bump when the layout of the model file changes incompatibly
TRAIN_STATE_MARKER = "fae_fast.train_state"
TRAIN_STATE_VERSION = 1
# Largest network a model file may describe, in stored elements (the default 64-512 U-Net has 16.0 M; 2**28 is
# 1 GiB in float32). Raise it with FAE_FAST_MAX_PARAMETERS=N or load_model_file(..., max_parameters=N).
MAX_PARAMETERS = 2**28


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
    with _atomic.atomic_path(path) as tmp:  # temp + fsync + os.replace + fsync of the folder; OSError -> WriteError
        with open(tmp, "wb") as raw:
            f = _KeepOSError(raw)
            try:
                _write(obj, f)
            except RuntimeError:
                # torch's zip writer turns a failed write into "RuntimeError: [enforce fail at
                # inline_container.cc...]" and drops the errno: re-raise the OSError (ENOSPC...) it swallowed
                if f.error is not None:
                    raise f.error from None
                raise
    return path


class _KeepOSError:
    """File wrapper that remembers the OSError a write raised (torch.save hides it behind a RuntimeError)."""

    def __init__(self, f):
        self._f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self._f.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def __getattr__(self, name):
        return getattr(self._f, name)


def _write(obj: Any, f) -> None:
    """The serialiser behind :func:`atomic_save` (a separate name so tests can make it fail midway)."""
    torch.save(obj, f)


# --------------------------------------------------------------------------------------------------------------
# checksums


def _digest(obj: Any) -> str:
    """SHA-256 of plain containers and tensors in a canonical order: dict keys sorted, tensors as dtype, shape
    and their bytes in C order (so the device, strides and memory format do not matter)."""
    h = hashlib.sha256()
    _feed(h, obj)
    return "sha256:" + h.hexdigest()


def _feed(h, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(memoryview(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}".encode())
        for key in sorted(obj, key=lambda k: (type(k).__name__, repr(k))):
            _feed(h, key)
            _feed(h, obj[key])
    elif isinstance(obj, (list, tuple)):
        h.update(f"{'L' if isinstance(obj, list) else 'U'}{len(obj)}".encode())
        for value in obj:
            _feed(h, value)
    else:  # str, int, float, bool, None: repr round-trips exactly
        text = repr(obj).encode()
        h.update(f"S{type(obj).__name__}{len(text)}:".encode())
        h.update(text)


def _with_checksum(payload: dict) -> dict:
    return {**payload, "checksum": _digest(payload)}


def _verify_checksum(path, obj: dict, what: str) -> None:
    """Refuse a file whose contents do not match its checksum; warn about a file written without one."""
    stored = obj.pop("checksum", None)
    if stored is None:
        warnings.warn(f"{path} has no checksum (written by fae_fast {obj.get('fae_fast_version', 'unknown')} "
                      f"before {what}s carried one), so damage to it cannot be detected; save it again to add one",
                      UserWarning, stacklevel=4)
        return
    actual = _digest(obj)
    if stored != actual:
        raise ValueError(f"{path} is damaged: its contents do not match the checksum stored in it (stored "
                         f"{str(stored)[:23]}..., computed {actual[:23]}...); restore it from a copy or write it again")


def _read(path: str | os.PathLike, map_location, what: str) -> dict:
    """``torch.load(weights_only=True)`` with errors turned into ``ValueError`` naming the path."""
    from .data.io import open_regular_file

    path = Path(path)
    try:
        # the check is made on the opened descriptor: a FIFO named model.fae is refused, never waited on
        f = open_regular_file(path, what)
    except FileNotFoundError:
        raise ValueError(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise ValueError(f"{what} {path} is not a file but a folder") from None
    except ValueError:
        raise ValueError(f"{what} {path} is not a regular file (a pipe, socket or device?)") from None
    except OSError as exc:
        raise ValueError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    try:
        with f, warnings.catch_warnings():
            # a legacy (non-zip) pickle draws a protocol warning before it is refused or checked below
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            obj = torch.load(f, map_location=map_location, weights_only=True)
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
    version that wrote it (a warning naming both), then its checksum (ValueError when it does not match).
    Returns (object without its checksum, format_version, written_by)."""
    obj = _read(path, map_location, what)
    if obj.get("format") != marker:
        raise _marker_error(path, obj, marker, what)
    fv = obj.get("format_version")
    if fv != version:
        raise ValueError(f"{path} has {what} format_version {fv!r}, but this fae_fast {__version__} reads "
                         f"format_version {version}; {on_format}")
    _verify_checksum(path, obj, what)
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

    Raises:
        ValueError: ``model_state`` is not the state of the network ``config`` describes (its loader would
            refuse the file), or ``meta`` holds values the loader cannot read.
        fae_fast._atomic.WriteError: the file could not be written (e.g. "no space left on device: PATH"); a
            previous file at ``path`` is left intact.

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
        "image_size": _image_size(image_size),
        "thresholds": _thresholds(thresholds),
        "meta": dict(meta or {}),
    }
    _check_loadable(payload["meta"])
    _check_weights(path, payload["state"], FAEConfig.from_dict(payload["config"]), limit=None)
    return atomic_save(_with_checksum(payload), path)


def _image_size(size) -> tuple[int, int]:
    """(H, W) within the side bounds of ``--size``: an engine allocates its buffers at this size."""
    h, w = check_image_size(size, "image_size")
    if min(h, w) < MIN_SIDE or max(h, w) > MAX_SIDE:
        raise ValueError(f"image_size ({h}, {w}) has a side outside [{MIN_SIDE}, {MAX_SIDE}]")
    return h, w


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


def load_model_file(path, map_location="cpu", *, max_parameters: int | None = None) -> ModelFile:
    """Read a model file written by :func:`save_model_file`.

    The returned ``state`` is known to fit the network ``config`` describes: callers may build that network
    and ``load_state_dict`` it without allocating more than the file holds.

    Args:
        path: the model file.
        map_location: where the tensors go (``torch.load``'s argument).
        max_parameters: largest network accepted, in elements (None: ``FAE_FAST_MAX_PARAMETERS`` or
            :data:`MAX_PARAMETERS`).

    Raises:
        ValueError: ``path`` is missing, not a file, not a torch file, not a fae_fast model file (a training
            state, a random pickle), has another ``format_version`` (the message names both versions), does not
            match its checksum (damaged), holds tensors that do not fit its config or a network larger
            than ``max_parameters``, or an image size with a side outside [8, 8192].

    Warns:
        UserWarning: the file was written by another fae_fast version with the same format (names both), or
            before model files carried a checksum.
    """
    obj, fv, written_by = _read_checked(path, map_location, FORMAT_MARKER, FORMAT_VERSION, "model file",
                                        "re-export it with a matching fae_fast version", "loading it anyway")
    missing = [k for k in ("state", "config", "image_size", "thresholds") if k not in obj]
    if missing:
        raise ValueError(f"{path} is a damaged fae_fast model file: missing {missing}")
    try:
        config = FAEConfig.from_dict(with_legacy_settings(obj["config"]))
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{path} holds an invalid config: {exc}") from exc
    if not isinstance(obj["state"], dict):
        raise ValueError(f"{path} is a damaged fae_fast model file: its state is a {type(obj['state']).__name__}")
    _check_weights(path, obj["state"], config, limit=_max_parameters(max_parameters))
    try:
        image_size = _image_size(obj["image_size"])
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path} holds an invalid image size: {exc}") from None
    return ModelFile(state=obj["state"], config=config, image_size=image_size,
                     thresholds=dict(obj["thresholds"]), version=written_by, meta=dict(obj.get("meta") or {}),
                     format_version=int(fv))


# settings whose default changed: a model file written before the setting existed lacks it and was trained,
# thresholded and scored with this value, not with today's default
_LEGACY_SETTINGS = {"map": {"error": "squared", "normalize": "none"},
                    "corruption": {"w_self": 0.0, "grey_textures": "off"}}


def with_legacy_settings(config):
    """A saved config dict with the settings it lacks filled in as they were before their default changed."""
    if not isinstance(config, dict):
        return config  # from_dict names the problem
    out = dict(config)
    for section, values in _LEGACY_SETTINGS.items():
        if isinstance(out.get(section, {}), dict):
            out[section] = {**values, **out.get(section, {})}
    return out


def _max_parameters(value: int | None) -> int:
    if value is not None:
        return int(value)
    env = os.environ.get("FAE_FAST_MAX_PARAMETERS")
    if env is None:
        return MAX_PARAMETERS
    try:
        return int(env)
    except ValueError:
        raise ValueError(f"FAE_FAST_MAX_PARAMETERS must be an integer, got {env!r}") from None


def _check_weights(path, state: dict, config: FAEConfig, limit: int | None) -> None:
    """Refuse ``state`` unless it is exactly the state of the network ``config`` describes, that network is at
    most ``limit`` elements (None: no bound), and every tensor holds its own data.

    The network is built on the ``meta`` device, so a config that claims a huge network costs no memory here.
    """
    from .models import build_model

    m = config.model
    levels = len(tuple(m.widths)) + len(tuple(m.dilations))
    if levels > len(state):  # every level and dilation holds tensors: refuse before building anything
        raise ValueError(f"{path}: its config describes {levels} levels and dilations but the file stores only "
                         f"{len(state)} tensors")
    try:
        with torch.device("meta"):
            expected = build_model(m).state_dict()
    except (ValueError, TypeError, RuntimeError) as exc:
        raise ValueError(f"{path} holds an invalid model config: {exc}") from exc
    size = sum(t.numel() for t in expected.values())
    if limit is not None and size > limit:
        raise ValueError(f"{path}: its config (widths {tuple(m.widths)}) describes a network of {size:,} elements, "
                         f"more than the limit {limit:,} (raise it with FAE_FAST_MAX_PARAMETERS)")
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{path}: its weights do not fit the network its config describes (missing "
                         f"{missing[:3]}{'...' if len(missing) > 3 else ''}, unexpected "
                         f"{unexpected[:3]}{'...' if len(unexpected) > 3 else ''})")
    for key, want in expected.items():
        got = state[key]
        if not isinstance(got, torch.Tensor) or got.shape != want.shape:
            shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
            raise ValueError(f"{path}: weight {key!r} is {shape}, but its config (widths {tuple(m.widths)}) "
                             f"needs {tuple(want.shape)}")
        if got.untyped_storage().nbytes() < got.numel() * got.element_size():  # e.g. an expand()ed view
            raise ValueError(f"{path}: weight {key!r} of shape {tuple(got.shape)} holds only "
                             f"{got.untyped_storage().nbytes()} bytes of data")


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
    payload.pop("checksum", None)
    return atomic_save(_with_checksum(payload), path)


def load_train_state(path, map_location="cpu") -> dict[str, Any]:
    """Read a training state written by :func:`save_train_state`.

    Raises:
        ValueError: not a training-state file (a model file, a random pickle, garbage), another format version,
            or damaged (its contents do not match its checksum).

    Warns:
        UserWarning: written by another fae_fast version, or before training states carried a checksum.
    """
    obj, _, _ = _read_checked(path, map_location, TRAIN_STATE_MARKER, TRAIN_STATE_VERSION, "training-state file",
                              "resume with the fae_fast version that wrote it",
                              "resuming anyway, but bit-exact continuation is only promised within one version")
    return obj

