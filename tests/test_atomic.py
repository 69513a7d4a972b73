"""The atomic writer (fae_fast._atomic): file modes, folder fsync, orphan temp files, write errors as one line."""
import errno
import os
import signal
import socket
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fae_fast import _atomic

ATOMIC_PY = Path(_atomic.__file__)


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_files_get_the_mode_the_umask_gives(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        p = _atomic.write_text(tmp_path / "report.json", "{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE(p.stat().st_mode) == mode


def test_folder_is_fsynced_after_the_rename(tmp_path, monkeypatch):
    target = tmp_path / "out.csv"
    seen = []
    real_fsync = os.fsync

    def fsync(fd):
        seen.append((stat.S_ISDIR(os.fstat(fd).st_mode), target.exists()))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    _atomic.write_text(target, "a,b\n")
    assert seen == [(False, False), (True, True)]  # the file's data before the rename, the folder after it


_KILLED_WRITER = """
import importlib.util, os, signal, sys
spec = importlib.util.spec_from_file_location("atomic", {atomic!r})
atomic = importlib.util.module_from_spec(spec)
spec.loader.exec_module(atomic)
with atomic.atomic_path({target!r}) as tmp:
    tmp.write_bytes(b"half a model")
    os.kill(os.getpid(), signal.SIGKILL)  # kill -9 mid-write
"""


def test_orphans_of_a_killed_writer_are_removed_on_the_next_write(tmp_path):
    target = tmp_path / "model.fae"
    target.write_bytes(b"old")
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(_KILLED_WRITER.format(atomic=str(ATOMIC_PY),
                                                                                   target=str(target)))])
    assert r.returncode == -signal.SIGKILL
    orphans = [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
    assert len(orphans) == 1 and orphans[0].startswith(".model.fae.")
    assert target.read_bytes() == b"old"  # the kill left the previous file intact
    host = _atomic._host()
    keep = [
        "notes.tmp", ".model.fae.tmp", "model.fae.bak",                      # not our pattern
        f".model.fae.{host}-{os.getpid()}-0123abcd.tmp",                     # a live writer (this process)
        f".model.fae.{host}-1-0123abcd.tmp",                                 # a live writer (pid 1 runs)
        ".model.fae.someotherhost-999999-0123abcd.tmp",                      # another host: cannot tell
        f".model.fae.{host}-999999-0123abcd.tmp.keep",                       # not ending in our suffix
    ]
    for name in keep:
        (tmp_path / name).write_bytes(b"x")
    _atomic.write_bytes(target, b"new")
    assert target.read_bytes() == b"new"
    assert sorted(os.listdir(tmp_path)) == sorted(keep + ["model.fae"])
    assert socket.gethostname()  # the host part comes from it


def test_temp_file_uses_the_pattern_that_cleanup_matches(tmp_path):
    with _atomic.atomic_path(tmp_path / "a.b.json") as tmp:
        m = _atomic._TEMP.fullmatch(tmp.name)
        assert m is not None and tmp.name.startswith(".a.b.json.")
        assert int(m["pid"]) == os.getpid() and m["host"] == _atomic._host()


@pytest.mark.parametrize("err, message", [
    (errno.ENOSPC, "no space left on device: {p}"),
    (errno.EACCES, "cannot write {p}: Permission denied"),
    (errno.EIO, "cannot write {p}: Input/output error"),
])
def test_write_errors_are_one_line_and_keep_the_old_file(tmp_path, monkeypatch, err, message):
    p = _atomic.write_text(tmp_path / "results.csv", "old\n")

    def fail(self, data):
        with open(self, "wb") as f:
            f.write(data[:3])  # part of the data reaches the temp file first
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(Path, "write_bytes", fail)
    with pytest.raises(_atomic.WriteError) as info:
        _atomic.write_text(p, "new, longer content\n")
    assert str(info.value) == message.format(p=p)
    assert isinstance(info.value, OSError) and info.value.errno == err
    monkeypatch.undo()
    assert p.read_text() == "old\n" and os.listdir(tmp_path) == ["results.csv"]


def test_creating_the_temp_file_fails_as_a_write_error(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(_atomic, "_create_temp", refuse)
    with pytest.raises(_atomic.WriteError, match=r"^cannot write .*x\.json: Permission denied$"):
        _atomic.write_json(tmp_path / "x.json", {"a": 1})
