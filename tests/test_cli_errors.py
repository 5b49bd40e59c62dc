"""Anticipated failures reach the user as one line, ``error: ...``, exit 2
(deft.errors.DeftError and its kin: a shard being scored elsewhere, corrupt
score part files, a pipeline stage that failed); an unexpected exception keeps
its traceback (issue 10, item 6). The checkpoint case (--resume on an unsafe
optimizer.pt) is in test_train.py."""

from __future__ import annotations

import fcntl
import gzip
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import SMALLER_LLAMA, save_tiny_llama, save_tiny_reward_model, shared_file

pytest.importorskip("torch")
pytest.importorskip("transformers")


def _deft(*args, cwd, code=None):
    cmd = [sys.executable, "-m", "deft", *args] if code is None else [sys.executable, "-c", code, *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ), cwd=cwd, timeout=600)


def assert_one_line_error(r, *needles):
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    errors = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and r.stderr.rstrip().splitlines()[-1] == errors[0], r.stderr[-3000:]
    for n in needles:
        assert n in errors[0], errors[0]
    return errors[0]


def _rows(path: Path, n: int) -> Path:
    src = shared_file("data/pro-hh/test_harmless_base.jsonl.gz")
    path.write_text("\n".join(gzip.open(src, "rt", encoding="utf-8").read().splitlines()[:n]) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def graded_once(tmp_path_factory):
    """A finished `deft grade` with a tiny reward model: its work dir holds plan.json and one part file."""
    root = tmp_path_factory.mktemp("cli_errors")
    save_tiny_reward_model(root / "rm")
    _rows(root / "d.jsonl", 6)
    r = _deft("grade", "-i", "d.jsonl", "-o", "out", "-m", "rm", "--device", "cpu", "--max-length", "64", cwd=root)
    assert r.returncode == 0, r.stderr[-3000:]
    return root


def _rerun_setup(graded_once, tmp_path) -> Path:
    """A copy of the graded folder whose shard is not marked done (as after a kill)."""
    root = tmp_path / "g"
    shutil.copytree(graded_once, root)
    for f in ("graded.parquet", "manifest.json", "scores/shard-00000-of-00001/done.json"):
        (root / "out" / f).unlink(missing_ok=True)
    return root


GRADE = ("grade", "-i", "d.jsonl", "-o", "out", "-m", "rm", "--device", "cpu", "--max-length", "64")


def test_shard_being_scored_elsewhere_is_one_line(graded_once, tmp_path):
    root = _rerun_setup(graded_once, tmp_path)
    with open(root / "out/scores/shard-00000-of-00001/lock", "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)  # another process is scoring this shard
        r = _deft(*GRADE, cwd=root)
    assert_one_line_error(r, "shard 0/1", "is being scored by another process")


def test_corrupt_part_files_are_one_line(graded_once, tmp_path):
    root = _rerun_setup(graded_once, tmp_path)
    shard = root / "out/scores/shard-00000-of-00001"
    shutil.copy(shard / "part-000000.parquet", shard / "part-000001.parquet")  # every pair twice
    assert_one_line_error(_deft(*GRADE, cwd=root), "duplicate pairs", "corrupt")
    (shard / "part-000001.parquet").write_bytes(b"PAR1 not a parquet file")  # a torn / foreign file
    assert_one_line_error(_deft(*GRADE, cwd=root), "part-000001.parquet", "unreadable part file", "corrupt")


def test_pipeline_error_is_one_line(tmp_path):
    """A train stage whose launcher fails raises PipelineError: one line, exit 2."""
    save_tiny_llama(tmp_path / "policy", **SMALLER_LLAMA, max_position_embeddings=256)
    _rows(tmp_path / "test_harmless_base.jsonl", 30)
    sets = {"model": str(tmp_path / "policy"), "inputs.files": f"[{tmp_path / 'test_harmless_base.jsonl'}]",
            "grade.use_input_scores": "true", "grade.a": "20", "eval.enabled": "false", "run_dir": str(tmp_path / "run"),
            "launcher": shutil.which("false") or "/bin/false", "train.progress": "false"}
    r = _deft("run", *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")], cwd=tmp_path)
    assert_one_line_error(r, "train stage", "exited with status 1")


def test_unexpected_failure_keeps_its_traceback(tmp_path):
    """A bug (here: an injected RuntimeError in a stage function) is not dressed up as an error line."""
    code = ("import sys, deft.stats as s\n"
            "def boom(*a, **k):\n    raise RuntimeError('an unexpected bug')\n"
            "s.compute_stats = boom\n"
            "from deft.cli import main\nsys.argv = ['deft', 'stats'] + sys.argv[1:]\nmain()\n")
    _rows(tmp_path / "d.jsonl", 3)
    r = _deft("-i", "d.jsonl", "-t", str(shared_file("tokenizers/gpt2")), cwd=tmp_path, code=code)
    assert r.returncode == 1, r.stderr[-3000:]
    assert "Traceback" in r.stderr and "RuntimeError: an unexpected bug" in r.stderr
    assert not any(l.startswith("error:") for l in r.stderr.splitlines())


def test_a_multi_line_message_is_printed_on_one_line(tmp_path):
    code = ("import sys, deft.stats as s\n"
            "from deft.errors import DeftError\n"
            "def boom(*a, **k):\n    raise DeftError('first line\\n\\n  second line\\n')\n"
            "s.compute_stats = boom\n"
            "from deft.cli import main\nsys.argv = ['deft', 'stats'] + sys.argv[1:]\nmain()\n")
    _rows(tmp_path / "d.jsonl", 3)
    r = _deft("-i", "d.jsonl", "-t", str(shared_file("tokenizers/gpt2")), cwd=tmp_path, code=code)
    assert assert_one_line_error(r) == "error: first line; second line"


def test_checkpoint_errors_name_the_file_but_device_failures_and_bugs_pass_through(tmp_path) -> None:
    """A file --resume cannot load is one CheckpointError line; an out-of-memory or
    CUDA/NCCL failure, or a plain bug, is not blamed on the checkpoint."""
    import pickle

    import pytest

    from deft.errors import CheckpointError
    from deft.train import _load_checkpoint_file

    f = tmp_path / "optimizer.pt"

    def raising(e):
        def load(_):
            raise e
        return load

    for e in (pickle.UnpicklingError("Weights only load failed"), RuntimeError("PytorchStreamReader failed reading zip archive"),
              EOFError(), FileNotFoundError(2, "No such file"), KeyError("optimizer"), ValueError("loaded state dict has a different number of parameter groups")):
        with pytest.raises(CheckpointError, match="optimizer.pt is not a deft checkpoint or is unsafe to load"):
            _load_checkpoint_file(f, raising(e))
    for e in (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), RuntimeError("NCCL error in: ProcessGroupNCCL.cpp"),
              TypeError("unsupported operand"), AttributeError("'NoneType' object has no attribute 'load'")):
        with pytest.raises(type(e)):
            _load_checkpoint_file(f, raising(e))
