"""deft.io: atomic writes."""

from __future__ import annotations

import os

import pytest

from deft.io import atomic_path, write_json_atomic


def test_atomic_write_permissions_and_cleanup(tmp_path):
    mask = os.umask(0o022)
    try:
        p = write_json_atomic(tmp_path / "sub" / "a.json", {"x": 1})
        assert p.read_text() == '{\n  "x": 1\n}\n'
        assert os.stat(p).st_mode & 0o777 == 0o644  # not mkstemp's 0600
    finally:
        os.umask(mask)
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "b.txt") as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert not (tmp_path / "b.txt").exists()
    assert [f.name for f in tmp_path.iterdir()] == ["sub"]  # no temporary left behind


# --------------------------------------------------------------------------- portable file locks


class _FakeMsvcrt:
    """msvcrt.locking as Windows does it: a byte range from the file position,
    EACCES at once (LK_NBLCK) when another handle holds it; here each fd plays
    a separate process."""

    LK_UNLCK, LK_LOCK, LK_NBLCK = 0, 1, 2

    def __init__(self):
        self.held = {}  # (inode, offset) -> fd
        self.calls = []

    def locking(self, fd, mode, nbytes):
        import errno
        assert nbytes == 1
        key = (os.fstat(fd).st_ino, os.lseek(fd, 0, os.SEEK_CUR))
        self.calls.append((mode, key[1]))
        if mode == self.LK_UNLCK:
            assert self.held.pop(key) == fd
        elif self.held.get(key, fd) != fd:
            raise PermissionError(errno.EACCES, "Permission denied")
        else:
            self.held[key] = fd


@pytest.fixture
def windows_locks(monkeypatch):
    import sys

    import deft.io as dio
    fake = _FakeMsvcrt()
    monkeypatch.setattr(dio, "_fcntl", None)
    monkeypatch.setattr(dio, "_WIN_POLL_S", 0.01)
    monkeypatch.setitem(sys.modules, "msvcrt", fake)
    return fake


def test_lock_file_posix_refuses_a_second_holder_at_once(tmp_path):
    from deft.io import lock_file, unlock_file
    p = tmp_path / "l"
    p.touch()
    a, b = os.open(p, os.O_RDWR), os.open(p, os.O_RDWR)  # flock locks belong to the open file: two opens act as two processes
    try:
        lock_file(a, wait=False)
        with pytest.raises(BlockingIOError):
            lock_file(b, wait=False)
        unlock_file(a)
        lock_file(b, wait=False)
    finally:
        os.close(a)
        os.close(b)


def test_lock_file_windows_branch(tmp_path, windows_locks):
    import threading

    from deft.io import lock_file, unlock_file
    p = tmp_path / "l"
    p.write_text("holder record")
    a, b = os.open(p, os.O_RDWR), os.open(p, os.O_RDWR)
    try:
        lock_file(a, wait=False)
        with pytest.raises(BlockingIOError):
            lock_file(b, wait=False)
        assert windows_locks.calls[0] == (_FakeMsvcrt.LK_NBLCK, 1 << 20)  # one byte past the holder record, which stays readable
        assert p.read_text() == "holder record"
        releaser = threading.Timer(0.2, unlock_file, args=(a,))
        releaser.start()
        lock_file(b, wait=True)  # polls until the holder lets go
        releaser.join()
        assert list(windows_locks.held.values()) == [b]
        assert os.path.getsize(p) == len("holder record")
    finally:
        os.close(a)
        os.close(b)


def test_output_lock_on_the_windows_branch(tmp_path, windows_locks):
    import json

    from deft.io import OutputLockedError, lock_file, output_lock
    target = tmp_path / "out"
    with output_lock(target, "grade") as lp:
        assert json.loads(lp.read_text())["pid"] == os.getpid()
        other = os.open(lp, os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):
                lock_file(other, wait=False)
        finally:
            os.close(other)
    assert not lp.exists() and not target.exists()
    squatter = target / ".deft.lock"
    target.mkdir()
    fd = os.open(squatter, os.O_RDWR | os.O_CREAT)
    try:
        lock_file(fd, wait=False)  # another process holds the lock
        with pytest.raises(OutputLockedError, match="is in use by another deft run"):
            with output_lock(target, "grade"):
                pass
    finally:
        os.close(fd)
