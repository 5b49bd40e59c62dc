"""Artifacts on disk: atomic writes, content hashes, run manifests, JSONL metrics.

Every stage writes its outputs through :func:`atomic_path` (a temporary file in
the same folder, then ``os.replace``), so a killed process never leaves a
half-written artifact behind, and records a JSON manifest (inputs and their
hashes, parameters, versions) beside them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import sys
import tempfile
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
    import importlib.metadata as md

    out = {"python": platform.python_version(), "platform": platform.platform()}
    for dist in ("deft", "polars", "numpy", "tokenizers", "torch", "transformers", "safetensors", "deepspeed"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            continue
    return out


def input_record(path: PathLike) -> Dict[str, Any]:
    """``{"path", "sha256", "bytes"}`` for a manifest's list of inputs."""
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
