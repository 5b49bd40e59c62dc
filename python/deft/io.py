"""Artifacts on disk: atomic writes, content hashes, run manifests, JSONL metrics.

Every stage writes its outputs through :func:`atomic_path` (a temporary file in
the same folder, then ``os.replace``), so a killed process never leaves a
half-written artifact behind, and records a JSON manifest (inputs and their
hashes, parameters, versions) beside them. While it runs it holds its output's
lock (:func:`output_lock`), and it publishes a set of files with
:func:`begin_publication` so that a kill between two of them leaves a state the
same command completes (see "Output locks and publications" below).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import glob
import hashlib
import importlib.metadata as md
import inspect
import json
import os
import platform
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Dict, Iterator, Mapping, Optional, Union

PathLike = Union[str, "os.PathLike[str]"]


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success flush it to disk and
    move it onto ``path`` (atomically), on error remove it. Parent folders are
    created; the file gets the usual permissions (0666 less the umask), not
    the temporary file's 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.is_file():
            with open(tmp_path, "rb") as f:  # the data reaches the disk before the rename makes it visible
                os.fsync(f.fileno())
            os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomic(path: PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json_atomic(path: PathLike, obj: Any) -> Path:
    return write_text_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=False) + "\n")


def sha256_file(path: PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


#: SHA-256 of files by "resolved path|size|mtime_ns" (see :func:`sha256_file_cached`); `deft run`
#: persists it in RUN_DIR/.hashes.json.
SHA256_MEMO: Dict[str, str] = {}


def sha256_file_cached(path: PathLike) -> str:
    """:func:`sha256_file`, remembered by path, size and modification time (as
    make trusts them), so large files such as model weights are read once per
    process -- or once per run directory, where `deft run` persists the memo."""
    p = Path(path)
    st = p.stat()
    key = f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    hit = SHA256_MEMO.get(key)
    if hit is None:
        hit = SHA256_MEMO[key] = sha256_file(p)
    return hit


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def versions() -> Dict[str, str]:
    """Versions of deft and the libraries whose behaviour shapes the results."""
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for dist in ("deft", "polars", "numpy", "tokenizers", "torch", "transformers", "safetensors", "deepspeed"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            continue
    return out


def input_record(path: Any) -> Dict[str, Any]:
    """``{"path", "sha256", "bytes"}`` for a manifest's list of inputs; for a
    Hugging Face dataset source (``hf:...``, a ``save_to_disk`` folder, a
    ``datasets.Dataset``) what :func:`deft.data.hf.source_record` gives."""
    from deft.data.hf import is_dataset_source, source_record

    if is_dataset_source(path):
        return source_record(path)
    p = Path(path)
    return {"path": str(p), "sha256": sha256_file(p), "bytes": p.stat().st_size}


def write_manifest(path: PathLike, *, stage: str, inputs: Any, parameters: Mapping[str, Any], outputs: Any = None, **extra: Any) -> Path:
    """Write a stage manifest: what ran, on what, with which parameters and versions."""
    doc = {
        "stage": stage,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": sys.argv,
        "inputs": inputs,
        "parameters": dict(parameters),
        "outputs": outputs,
        "versions": versions(),
    }
    doc.update(extra)
    return write_json_atomic(path, doc)


def refuse_existing(path: PathLike, overwrite: bool, what: str = "output") -> None:
    """Raise FileExistsError when ``path`` exists and ``overwrite`` is off."""
    p = Path(path)
    if p.exists() and not overwrite:
        raise FileExistsError(f"{what} {p} already exists; pass --overwrite to replace it")


class MetricsLog:
    """Append-only JSON Lines metrics: one object per call, with a timestamp."""

    def __init__(self, path: Optional[PathLike]):
        self.path = Path(path) if path is not None else None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, **fields: Any) -> None:
        if self.path is None:
            return
        fields.setdefault("time", round(time.time(), 3))
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(fields, ensure_ascii=False) + "\n")


# ---------------------------------------------------------------------------
# Output locks and publications
#
# Every stage holds an *output lock* while it runs: ``.deft.lock`` in its
# output folder, or ``.NAME.lock`` beside an output file (`deft select`, `deft
# distribution`). The lock is a :func:`lock_file` (``fcntl.flock``; Windows:
# ``msvcrt.locking``) on that file, so the kernel
# drops it when the holder dies: a lock file a killed process leaves behind
# never blocks a rerun. The file names the holder (pid, host, start time,
# command) for the one-line error of a second run, and is removed on release.
#
# A stage that writes several files *publishes* them: :func:`begin_publication`
# checks the existing outputs (refused unless ``overwrite``, as
# :func:`refuse_existing`), writes a marker ``.COMMIT.pending`` beside the
# commit record (the file written last, usually ``manifest.json``) and removes
# the old commit record; the stage then writes its outputs (each atomically),
# the commit record last, and calls :meth:`Publication.done`, which removes the
# marker. A folder whose marker is present holds an interrupted publication
# (the process died between two of its files): the same command replaces it
# without ``--overwrite``. A commit record without a marker describes a
# complete set of outputs.

from typing import Callable, List, Sequence

LOCK_NAME = ".deft.lock"

try:  # POSIX
    import fcntl as _fcntl
except ImportError:  # Windows: msvcrt.locking in lock_file
    _fcntl = None  # type: ignore[assignment]

# Windows locks are mandatory (they block reads of the locked bytes by other
# processes), so the lock sits on one byte far past the holder record, which a
# second run then still reads for its error message. Locking past the end of a
# file is allowed there and does not grow it.
_WIN_LOCK_OFFSET = 1 << 20
_WIN_POLL_S = 0.1  # how often a waiting lock_file retries on Windows


def lock_file(fd: int, *, wait: bool) -> None:
    """Take an exclusive lock on the open file ``fd``, dropped when the fd is
    closed or the process dies. Without ``wait`` raise :class:`BlockingIOError`
    at once when another process holds it; with ``wait`` block until it is
    free. POSIX: ``fcntl.flock``. Windows: ``msvcrt.locking`` of one byte
    (non-blocking tries every 0.1 s while waiting, with no timeout, as flock)."""
    if _fcntl is not None:
        _fcntl.flock(fd, _fcntl.LOCK_EX if wait else _fcntl.LOCK_EX | _fcntl.LOCK_NB)
        return
    import msvcrt
    while True:
        os.lseek(fd, _WIN_LOCK_OFFSET, os.SEEK_SET)  # msvcrt.locking locks from the file position
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return
        except OSError as e:  # EACCES or EDEADLOCK: another process holds the byte
            if e.errno not in (errno.EACCES, errno.EDEADLK, getattr(errno, "EDEADLOCK", errno.EDEADLK)):  # anything else is real
                raise
            if not wait:
                raise BlockingIOError(errno.EAGAIN, "the file is locked by another process") from None
        time.sleep(_WIN_POLL_S)


def unlock_file(fd: int) -> None:
    """Release a lock taken by :func:`lock_file` (closing ``fd`` also does)."""
    if _fcntl is not None:
        _fcntl.flock(fd, _fcntl.LOCK_UN)
        return
    import msvcrt
    os.lseek(fd, _WIN_LOCK_OFFSET, os.SEEK_SET)
    msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)


class OutputLockedError(FileExistsError):
    """Another process holds the output lock of a folder or file (a
    FileExistsError, so the CLI reports it as one line and exits 2)."""

    def __init__(self, target: Path, holder: Mapping[str, Any]):
        self.target, self.holder = target, dict(holder)
        who = ", ".join(f"{k} {holder[k]}" for k in ("pid", "host", "started") if holder.get(k) is not None) or "holder unknown"
        stage = holder.get("stage")
        super().__init__(f"{target} is in use by another deft {stage + ' ' if stage else ''}run ({who}); "
                         "wait for it to finish or choose another output")


_HELD: Dict[str, List[Any]] = {}  # lock file (resolved) -> [fd, depth, created folders]
_HELD_GUARD = threading.RLock()


def lock_path(target: PathLike, *, beside: bool = False) -> Path:
    """The lock file of an output folder (``FOLDER/.deft.lock``) or, with
    ``beside``, of an output file (``.NAME.lock`` in the file's folder)."""
    t = Path(target)
    return t.with_name(f".{t.name}.lock") if beside else t / LOCK_NAME


def read_lock_holder(path: PathLike) -> Dict[str, Any]:
    """What a lock file says about its holder ({} when empty or unreadable)."""
    for _ in range(5):  # the holder may be between truncating and writing it
        try:
            text = Path(path).read_text(encoding="utf-8")
            if text.strip():
                doc = json.loads(text)
                return doc if isinstance(doc, dict) else {}
        except (OSError, ValueError):
            pass
        time.sleep(0.02)
    return {}


def _mkdirs(folder: Path) -> List[Path]:
    """mkdir -p; returns the folders it created, deepest first."""
    created: List[Path] = []
    p = folder
    while not p.exists() and p != p.parent:
        created.append(p)
        p = p.parent
    folder.mkdir(parents=True, exist_ok=True)
    return created


def _acquire(lp: Path, target: Path, stage: str, wait: bool) -> List[Any]:
    created = _mkdirs(lp.parent)
    while True:
        fd = os.open(lp, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0), 0o666 & ~_umask())
        try:
            lock_file(fd, wait=wait)
        except BlockingIOError:
            os.close(fd)
            raise OutputLockedError(target, read_lock_holder(lp)) from None
        except BaseException:
            os.close(fd)
            raise
        try:  # the previous holder may have removed the file between our open and flock: lock the file now there
            same = os.stat(lp).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    holder = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "stage": stage, "command": sys.argv}
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, (json.dumps(holder) + "\n").encode("utf-8"))
    return [fd, 1, created]


def _release(lp: Path, entry: List[Any]) -> None:
    fd, _, created = entry
    if _fcntl is not None:
        try:
            lp.unlink(missing_ok=True)  # while still holding it: see the inode check in _acquire
        finally:
            os.close(fd)
    else:  # Windows cannot remove an open file: close first; the removal fails (and is skipped) while another process has it open
        os.close(fd)
        with contextlib.suppress(PermissionError):
            lp.unlink(missing_ok=True)
    for d in created:  # folders only this lock created (a run that failed early leaves none behind)
        try:
            d.rmdir()
        except OSError:
            break


@contextlib.contextmanager
def output_lock(target: PathLike, stage: str, *, beside: bool = False, wait: bool = False) -> Iterator[Path]:
    """Hold the output lock of ``target`` (a folder, or with ``beside`` a
    file) for the block; raise :class:`OutputLockedError` at once when another
    process holds it (``wait``: block until it is free). Re-entrant within a
    process. On an error, publications begun under it that wrote nothing lose
    their marker."""
    target = Path(target)
    lp = lock_path(target, beside=beside)
    key = os.path.abspath(lp)
    with _HELD_GUARD:
        entry = _HELD.get(key)
        if entry is not None:
            entry[1] += 1
        else:
            entry = _HELD[key] = _acquire(lp, target, stage, wait)
    try:
        yield lp
    except BaseException:
        _abandon_publications(lp.parent)
        raise
    finally:
        with _HELD_GUARD:
            entry[1] -= 1
            if entry[1] == 0:
                del _HELD[key]
                _release(lp, entry)


def locked_output(stage: str, target: Union[str, Callable[[Mapping[str, Any]], Any]], *, beside: bool = False,
                  when: Optional[Callable[[Mapping[str, Any]], bool]] = None) -> Callable:
    """Decorator: run the function under :func:`output_lock`. ``target``: the
    name of the argument holding the output path, or a function of the bound
    arguments; no lock when it is None or ``when(arguments)`` is false."""

    def deco(fn: Callable) -> Callable:
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            bound = sig.bind(*args, **kwargs)
            bound.apply_defaults()
            a = bound.arguments
            t = a.get(target) if isinstance(target, str) else target(a)
            if t is None or (when is not None and not when(a)):
                return fn(*args, **kwargs)
            with output_lock(t, stage, beside=beside):
                return fn(*args, **kwargs)

        return wrapper

    return deco


def publication_marker(commit: PathLike) -> Path:
    """The marker of an unfinished publication whose commit record is ``commit``."""
    c = Path(commit)
    return c.with_name(f".{c.name}.pending")


def interrupted_publication(commit: PathLike) -> bool:
    """Whether a publication with this commit record began and did not finish
    (in a process that is gone, when the output lock is held)."""
    return publication_marker(commit).exists()


def check_publication(commit: PathLike, outputs: Sequence[PathLike], overwrite: bool, what: str = "output") -> None:
    """:func:`refuse_existing` for each of ``outputs``, except after an
    interrupted publication (which the same command completes)."""
    if overwrite or interrupted_publication(commit):
        return
    for p in outputs:
        refuse_existing(p, False, what)


class Publication:
    """A publication in progress (see :func:`begin_publication`)."""

    def __init__(self, commit: Path, outputs: Sequence[Path]):
        self.commit, self.outputs, self.marker = commit, list(outputs), publication_marker(commit)

    def done(self) -> None:
        """Every output and the commit record are written: the set is complete."""
        self.marker.unlink(missing_ok=True)
        _discard(self)

    def abandon(self) -> None:
        """The stage failed: keep the marker only if some output was written."""
        if not any(p.exists() for p in self.outputs + [self.commit]):
            self.marker.unlink(missing_ok=True)
        _discard(self)


_ACTIVE: List[Publication] = []


def _discard(pub: Publication) -> None:
    with _HELD_GUARD:
        if pub in _ACTIVE:
            _ACTIVE.remove(pub)


def _abandon_publications(folder: Path) -> None:
    with _HELD_GUARD:
        pubs = [p for p in _ACTIVE if os.path.abspath(p.marker.parent) == os.path.abspath(folder)]
    for p in pubs:
        p.abandon()


def remove_stale_temporaries(folder: PathLike) -> None:
    """Remove the temporaries (``.NAME.*.tmp``) of :func:`atomic_path` writes a
    kill interrupted in ``folder``; only under the folder's output lock."""
    f = Path(folder)
    if f.is_dir():
        for tmp in f.glob(".*.tmp"):
            if tmp.is_file():
                tmp.unlink(missing_ok=True)


def begin_publication(commit: PathLike, outputs: Sequence[Optional[PathLike]] = (), *, overwrite: bool = False,
                      refuse: Optional[Sequence[PathLike]] = None, what: str = "output") -> Publication:
    """Start publishing ``outputs`` with the commit record ``commit`` (written
    last by the caller): refuse existing ones (``refuse``, default ``outputs``
    and ``commit``) unless ``overwrite`` or a previous publication was
    interrupted, write the marker, remove stale temporaries of these files and
    the old commit record. Call :meth:`Publication.done` after writing
    ``commit``. Hold the output lock around it."""
    commit = Path(commit)
    outs = [Path(p) for p in outputs if p is not None]
    check_publication(commit, [Path(p) for p in refuse] if refuse is not None else outs + [commit], overwrite, what)
    pub = Publication(commit, outs)
    pub.marker.parent.mkdir(parents=True, exist_ok=True)
    with open(pub.marker, "w", encoding="utf-8") as f:  # its existence is the record (a torn one still counts)
        f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                            "commit": str(commit), "outputs": [str(p) for p in outs]}) + "\n")
        f.flush()
        os.fsync(f.fileno())
    for p in outs + [commit]:  # temporaries of atomic writes a kill interrupted
        if p.parent.is_dir():
            for tmp in p.parent.glob(f".{glob.escape(p.name)}.*.tmp"):
                tmp.unlink(missing_ok=True)
    commit.unlink(missing_ok=True)
    with _HELD_GUARD:
        _ACTIVE.append(pub)
    return pub
