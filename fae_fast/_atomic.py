"""Atomic output files: write to a temporary file in the same folder, fsync, ``os.replace``, fsync the folder.

A crash or an exception mid-write leaves the previous file (or no file) in place, never half a file. Files get
the mode the umask gives (0644 under umask 022), like any file a program creates. A failed write raises
:class:`WriteError` (an :class:`OSError`) with one line naming the destination, e.g.
``no space left on device: out/model.pt``.

The temporary file is ``.<name>.<host>-<pid>-<random>.tmp`` beside the destination. A writer killed mid-write
(kill -9) leaves it behind; the first write of a process into a folder removes the temporary files there that a
process of this host left and that no longer runs (once per folder: a results folder of 10,000 overlays is
listed once, not 10,000 times). Nothing else is ever removed.
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import socket
from pathlib import Path
from typing import Callable, Iterator

__all__ = ["WriteError", "atomic_path", "write_bytes", "write_text", "write_json", "write_with", "write_png",
           "fsync_dir"]

_READABLE = {errno.ENOSPC: "no space left on device", getattr(errno, "EDQUOT", -1): "disk quota exceeded"}


class WriteError(OSError):
    """A file could not be written; ``str()`` is one line naming the destination (``errno`` is kept)."""

    def __str__(self) -> str:
        return str(self.strerror)


def _write_error(path: Path, exc: OSError) -> WriteError:
    what = _READABLE.get(exc.errno)
    if what is not None:
        return WriteError(exc.errno, f"{what}: {path}")
    return WriteError(exc.errno, f"cannot write {path}: {exc.strerror or exc}")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:32] or "host"


_TEMP = re.compile(r"\..+\.(?P<host>[A-Za-z0-9]+)-(?P<pid>\d+)-[0-9a-f]{8}\.tmp")
_swept: set[str] = set()  # folders this process has already cleaned


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it runs, as another user
        return True
    return True


def _remove_orphans(folder: Path) -> None:
    """Remove our temporary files in ``folder`` left by dead writers of this host (never anything else)."""
    key = os.path.abspath(folder)
    if key in _swept:
        return
    _swept.add(key)
    host = _host()
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        m = _TEMP.fullmatch(name)
        if m is None or m["host"] != host or int(m["pid"]) == os.getpid() or _pid_running(int(m["pid"])):
            continue
        with contextlib.suppress(OSError):
            os.unlink(folder / name)


def _create_temp(path: Path) -> Path:
    """Create an empty temporary file beside ``path`` with the umask's mode (``mkstemp`` would force 0600)."""
    prefix = f".{path.name}.{_host()}-{os.getpid()}-"
    while True:
        tmp = path.parent / f"{prefix}{secrets.token_hex(4)}.tmp"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a rename in ``folder`` durable (POSIX); a no-op where folders cannot be opened (Windows)."""
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


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is fsynced and renamed onto ``path``.

    Raises:
        WriteError: an ``OSError`` while creating, writing (in the ``with`` body) or renaming the file; the
            temporary file is removed and a previous ``path`` is left intact.

    Example:
        >>> with atomic_path("out.json") as tmp:                 # doctest: +SKIP
        ...     tmp.write_text("{}")
    """
    path = Path(path)
    tmp_path = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_orphans(path.parent)
        tmp_path = _create_temp(path)
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except OSError as exc:
        if isinstance(exc, WriteError):
            raise
        raise _write_error(path, exc) from exc
    finally:
        if tmp_path is not None and tmp_path.exists():
            tmp_path.unlink()
    fsync_dir(path.parent)


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj) -> Path:
    """Strict JSON (nan and inf become null; numpy scalars and arrays, paths become plain values), atomically."""
    import json

    return write_text(path, json.dumps(_plain(obj), indent=2, allow_nan=False) + "\n")


def _plain(o):
    import numpy as np

    if isinstance(o, (np.floating, np.integer, np.bool_)):
        o = o.item()
    if isinstance(o, float) and (o != o or o in (float("inf"), float("-inf"))):
        return None
    if isinstance(o, dict):
        return {str(k): _plain(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_plain(v) for v in o]
    if isinstance(o, np.ndarray):
        return _plain(o.tolist())
    if isinstance(o, os.PathLike):
        return os.fspath(o)
    return o


def write_with(path: str | os.PathLike, writer: Callable[[Path], None]) -> Path:
    """Atomically create ``path`` with ``writer(tmp_path)`` (e.g. ``lambda p: torch.save(obj, p)``)."""
    with atomic_path(path) as tmp:
        writer(tmp)
    return Path(path)


def write_png(path: str | os.PathLike, image) -> Path:
    """Encode an RGB (H, W, 3) or grey (H, W) uint8 array as PNG and write it atomically."""
    import cv2
    import numpy as np

    arr = np.ascontiguousarray(image)
    if arr.ndim == 3:
        arr = cv2.cvtColor(arr, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".png", arr)
    if not ok:
        raise ValueError(f"could not encode PNG for {path}")
    return write_bytes(path, buf.tobytes())
