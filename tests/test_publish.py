"""Publication and output locks (deft.io): a stage killed between two of its
output files is completed by the same command (no --overwrite), and two runs
into one output stop the second at once with a one-line error naming the
holder; a lock left by a killed process never blocks.

The crash-consistency matrix (benches/README.md) is ``test_crash_matrix``:
every publication point (each ``os.replace`` into the output) of grade,
distribution and select is SIGKILLed in a subprocess, the same command rerun,
and the outputs compared with an uninterrupted run.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Dict, List, Optional

import pytest

from conftest import shared_file, tiny_llama
from test_train import assets  # noqa: F401 - the tiny Llama, graded file and distribution of the train tests
from deft.io import (
    OutputLockedError,
    begin_publication,
    check_publication,
    interrupted_publication,
    lock_path,
    output_lock,
    publication_marker,
)

N_ROWS = 40

#: Python source run in a subprocess: os.replace into DEFT_TEST_ROOT is counted
#: (the list goes to DEFT_COUNT_FILE at exit) and the DEFT_KILL_AT-th one
#: SIGKILLs the process before (or with DEFT_KILL_MODE=after, after) it
#: happens; then the entry point in DEFT_ENTRY runs: "cli" (argv DEFT_ARGV) or
#: "select" (select_files with fixed embeddings, DEFT_ARGV = [input, output]).
HOOK = textwrap.dedent("""
    import atexit, json, os, signal, sys
    root = os.path.abspath(os.environ["DEFT_TEST_ROOT"])
    kill_at = int(os.environ.get("DEFT_KILL_AT", "0"))
    mode = os.environ.get("DEFT_KILL_MODE", "before")
    kill_name = os.environ.get("DEFT_KILL_NAME")
    calls = []
    _replace = os.replace
    def replace(src, dst, *a, **k):
        if not os.path.abspath(os.fspath(dst)).startswith(root):
            return _replace(src, dst, *a, **k)
        calls.append(os.path.relpath(os.path.abspath(os.fspath(dst)), root))
        if (len(calls) == kill_at or calls[-1] == kill_name) and mode == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        r = _replace(src, dst, *a, **k)
        if len(calls) == kill_at and mode == "after":
            os.kill(os.getpid(), signal.SIGKILL)
        return r
    os.replace = replace
    if os.environ.get("DEFT_COUNT_FILE"):
        atexit.register(lambda: open(os.environ["DEFT_COUNT_FILE"], "w").write(json.dumps(calls)))
    argv = json.loads(os.environ["DEFT_ARGV"])
    if os.environ["DEFT_ENTRY"] == "cli":
        from deft.cli import main
        sys.argv = ["deft"] + argv
        main()
    else:
        import numpy as np
        from deft.data import load
        from deft.select import select_files
        sys.argv = ["deft-select-test"]
        frame = load(argv[0], on_error="skip").frame
        n = int(sum(len(r) for r in frame["responses"].to_list()))
        emb = np.random.default_rng(0).normal(size=(n, 8)).astype(np.float32)
        select_files([argv[0]], argv[1], strategy="easy", fraction=0.5, embeddings=emb, plot=True,
                     on_error="skip", progress=False)
""")


def _run(entry: str, argv: List[str], root: Path, *, kill_at: int = 0, mode: str = "before",
         count_file: Optional[Path] = None, kill_name: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "DEFT_TEST_ROOT": str(root), "DEFT_KILL_AT": str(kill_at), "DEFT_KILL_MODE": mode,
           "DEFT_ENTRY": entry, "DEFT_ARGV": json.dumps(argv), "DEFT_KILL_NAME": kill_name}
    env.pop("DEFT_COUNT_FILE", None)
    if count_file is not None:
        env["DEFT_COUNT_FILE"] = str(count_file)
    return subprocess.run([sys.executable, "-c", HOOK], env=env, capture_output=True, text=True, timeout=300)


def _snapshot(root: Path) -> Dict[str, object]:
    """Every file under ``root``: bytes; for manifests the JSON without its creation time, for
    safetensors files the metadata and tensors."""
    out: Dict[str, object] = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            rel = str(p.relative_to(root))
            if p.name == "metrics.jsonl":  # timings (eval): not an output to compare
                continue
            if p.name.endswith(("manifest.json", "eval.json")):
                doc = json.loads(p.read_text())
                doc.pop("created", None)
                for r in doc.get("runs", []) if p.name == "eval.json" else []:
                    r.pop("generated", None), r.pop("reused", None)  # a resumed eval reuses its stored generations
                out[rel] = doc
            elif p.suffix == ".safetensors":  # the header's key order is not fixed: compare metadata and tensors
                from safetensors import safe_open

                with safe_open(str(p), framework="numpy") as f:
                    out[rel] = (f.metadata(), {k: f.get_tensor(k).tobytes() for k in f.keys()})
            else:
                out[rel] = p.read_bytes()
    return out


@pytest.fixture(scope="module")
def pro_slice(tmp_path_factory) -> Path:
    """The first N_ROWS rows of PRO's HH harmless test file, plus one bad line (a rejects file with --on-error skip)."""
    src = shared_file("data/pro-hh/test_harmless_base.jsonl.gz")
    lines = gzip.open(src, "rt", encoding="utf-8").read().splitlines()[:N_ROWS]
    path = tmp_path_factory.mktemp("publish_data") / "harmless.jsonl"
    path.write_text("\n".join(lines + ["{not json"]) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def graded_file(pro_slice, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("publish_graded")
    r = _run("cli", ["grade", "-i", str(pro_slice), "--use-input-scores", "--on-error", "skip", "-o", str(out)], out)
    assert r.returncode == 0, r.stderr
    return out / "graded.parquet"


def _stage_command(stage: str, pro_slice: Path, graded: Path, root: Path):
    """(entry, argv) of a stage writing under ``root``."""
    if stage == "grade":
        return "cli", ["grade", "-i", str(pro_slice), "--use-input-scores", "--on-error", "skip",
                       "--rejects", str(root / "out" / "rejects.jsonl"), "--plot", "-o", str(root / "out")]
    if stage == "distribution":
        return "cli", ["distribution", "-g", str(graded), "-t", str(shared_file("tokenizers/gpt2")),
                       "-o", str(root / "out" / "qdiff.safetensors"), "--plot", str(root / "out" / "top.png"), "--top", "3"]
    if stage == "eval":
        clean = root.parent / "harmless.jsonl"  # without the bad line
        clean.write_text("".join(pro_slice.read_text(encoding="utf-8").splitlines(keepends=True)[:N_ROWS]), encoding="utf-8")
        return "cli", ["eval", "--model", str(_tiny_llama(root.parent)), "--data", str(clean), "--limit", "3",
                       "--max-new-tokens", "4", "--device", "cpu", "--no-progress", "-o", str(root / "out")]
    assert stage == "select"
    return "select", [str(pro_slice), str(root / "out" / "easy.parquet")]


def _tiny_llama(folder: Path) -> Path:
    """A tiny random Llama with the SmolLM2 tokenizer (as in test_evaluate)."""
    from transformers import AutoTokenizer

    model_dir = folder / "tiny-llama"
    if not model_dir.exists():
        tok = AutoTokenizer.from_pretrained(str(shared_file("tokenizers/smollm2")))
        tiny_llama(tok).save_pretrained(model_dir)
        tok.save_pretrained(model_dir)
    return model_dir


# --------------------------------------------------------------------------- the mechanism


def test_lock_reentrant_removed_and_folder_cleaned(tmp_path):
    target = tmp_path / "new" / "out"
    with output_lock(target, "grade") as lp:
        assert lp == target / ".deft.lock" and lp.exists()
        assert json.loads(lp.read_text())["pid"] == os.getpid()
        with output_lock(target, "grade"):  # the same process: re-entrant
            pass
        assert lp.exists()
    assert not lp.exists()
    assert not (tmp_path / "new").exists()  # folders only the lock created go again
    (tmp_path / "f").mkdir()
    with output_lock(tmp_path / "f" / "sel.parquet", "select", beside=True) as lp:
        assert lp == tmp_path / "f" / ".sel.parquet.lock"
    assert sorted(os.listdir(tmp_path / "f")) == []


def test_publication_marker_rules(tmp_path):
    out, man = tmp_path / "data.parquet", tmp_path / "manifest.json"
    out.write_text("old")
    man.write_text("{}")
    with pytest.raises(FileExistsError, match="already exists; pass --overwrite"):
        begin_publication(man, [out])  # a complete set: refused as before
    pub = begin_publication(man, [out], overwrite=True)
    assert interrupted_publication(man) and not man.exists()  # the old commit record no longer describes the files
    # a kill here: the next run needs no --overwrite
    check_publication(man, [out], overwrite=False)
    out.write_text("new")
    man.write_text("{}")
    pub.done()
    assert not publication_marker(man).exists()
    with pytest.raises(FileExistsError):
        check_publication(man, [out], overwrite=False)


def test_failed_stage_that_wrote_nothing_leaves_no_marker(tmp_path):
    with pytest.raises(RuntimeError):
        with output_lock(tmp_path, "grade"):
            begin_publication(tmp_path / "manifest.json", [tmp_path / "graded.parquet"])
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


HOLDER = textwrap.dedent("""
    import sys, time
    from deft.io import output_lock
    with output_lock(sys.argv[1], sys.argv[2], beside=sys.argv[3] == "1"):
        print("locked", flush=True)
        time.sleep(120)
""")


def _hold(target: Path, stage: str, beside: bool = False) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(target), stage, "1" if beside else "0"],
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stdout.readline().strip() == "locked"
    return p


def _kill(p: subprocess.Popen) -> None:
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=30)


def test_second_grade_stops_with_one_line_naming_the_holder_and_stale_lock_does_not_block(pro_slice, tmp_path):
    out = tmp_path / "grade"
    holder = _hold(out, "grade")
    try:
        t0 = time.monotonic()
        r = subprocess.run([sys.executable, "-m", "deft", "grade", "-i", str(pro_slice), "--use-input-scores",
                            "--on-error", "skip", "-o", str(out)], capture_output=True, text=True, timeout=120)
        assert r.returncode == 2, r.stderr
        assert time.monotonic() - t0 < 60
        lines = [l for l in r.stderr.splitlines() if l.strip()]
        assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
        assert str(out) in lines[0] and f"pid {holder.pid}" in lines[0] and "started" in lines[0], lines[0]
        assert not (out / "graded.parquet").exists()
    finally:
        _kill(holder)
    assert (out / ".deft.lock").exists()  # left behind by the SIGKILLed holder
    r = subprocess.run([sys.executable, "-m", "deft", "grade", "-i", str(pro_slice), "--use-input-scores",
                        "--on-error", "skip", "-o", str(out)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert (out / "graded.parquet").exists() and not (out / ".deft.lock").exists()


def test_every_stage_refuses_a_locked_output(graded_file, tmp_path):
    """select, distribution, eval, train and `deft run` stop before any work when their output is locked."""
    from deft.distribution import save_distribution
    from deft.evaluate import evaluate
    from deft.pipeline import run_pipeline
    from deft.select import select_files
    from deft.train import train

    sel = tmp_path / "sel" / "easy.parquet"
    (tmp_path / "sel").mkdir()
    holders = [_hold(sel, "select", beside=True), _hold(tmp_path / "q.safetensors", "distribution", beside=True),
               _hold(tmp_path / "eval", "eval"), _hold(tmp_path / "train", "train"), _hold(tmp_path / "run", "run")]
    try:
        calls = [
            lambda: select_files([graded_file], sel, strategy="easy"),
            lambda: save_distribution(None, tmp_path / "q.safetensors"),  # type: ignore[arg-type]
            lambda: evaluate(["no-such-model"], [graded_file], tmp_path / "eval"),
            lambda: train({"train": {"output_dir": str(tmp_path / "train")}}),
            lambda: run_pipeline({"run_dir": str(tmp_path / "run")}),
        ]
        for call, h in zip(calls, holders):
            with pytest.raises(OutputLockedError, match=f"pid {h.pid}"):
                call()
        r = subprocess.run([sys.executable, "-m", "deft", "distribution", "-g", str(graded_file), "-t",
                            str(shared_file("tokenizers/gpt2")), "-o", str(tmp_path / "q.safetensors")],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert str(tmp_path / "q.safetensors") in r.stderr and f"pid {holders[1].pid}" in r.stderr
    finally:
        for h in holders:
            _kill(h)


def test_train_lock_only_on_rank_zero(tmp_path, monkeypatch):
    """Under torchrun only rank 0 writes (and locks); the other ranks never contend for the lock."""
    from deft.train import train

    holder = _hold(tmp_path / "train", "train")
    try:
        monkeypatch.setenv("RANK", "1")
        with pytest.raises(Exception) as e:
            train({"train": {"output_dir": str(tmp_path / "train")}})
        assert not isinstance(e.value, OutputLockedError)
    finally:
        _kill(holder)


def test_lock_path_is_hidden_and_not_an_output(tmp_path):
    assert lock_path(tmp_path).name.startswith(".") and lock_path(tmp_path / "x.parquet", beside=True).name == ".x.parquet.lock"


# --------------------------------------------------------------------------- item 3: the kill between two outputs


def test_grade_killed_between_graded_and_manifest_is_completed_by_the_same_command(pro_slice, graded_file, tmp_path):
    entry, argv = _stage_command("grade", pro_slice, graded_file, tmp_path)
    r = _run(entry, argv, tmp_path)
    assert r.returncode == 0, r.stderr
    ref = _snapshot(tmp_path / "out")
    shutil.rmtree(tmp_path / "out")
    counted = tmp_path / "count.json"
    # kill right before manifest.json is moved into place: graded.parquet (and the plot) are there, no manifest
    _run(entry, argv, tmp_path, count_file=counted)
    calls = json.loads(counted.read_text())
    shutil.rmtree(tmp_path / "out")
    n = calls.index(os.path.join("out", "manifest.json")) + 1
    r = _run(entry, argv, tmp_path, kill_at=n)
    assert r.returncode == -signal.SIGKILL
    assert (tmp_path / "out" / "graded.parquet").exists() and not (tmp_path / "out" / "manifest.json").exists()
    r = _run(entry, argv, tmp_path)  # the same command, no --overwrite
    assert r.returncode == 0, r.stderr
    assert _snapshot(tmp_path / "out") == ref
    r = _run(entry, argv, tmp_path)  # complete now: refused as before
    assert r.returncode == 2 and "already exists; pass --overwrite" in r.stderr


def test_overwrite_killed_midway_is_completed_without_overwrite(pro_slice, graded_file, tmp_path):
    """`deft grade --overwrite` killed after replacing graded.parquet: the old manifest is gone (it no longer
    describes the files) and the same command without --overwrite completes."""
    entry, argv = _stage_command("grade", pro_slice, graded_file, tmp_path)
    assert _run(entry, argv, tmp_path).returncode == 0
    ref = _snapshot(tmp_path / "out")
    counted = tmp_path / "count.json"
    assert _run(entry, argv + ["--overwrite", "--a", "10"], tmp_path, count_file=counted).returncode == 0
    n = json.loads(counted.read_text()).index(os.path.join("out", "graded.parquet")) + 1
    r = _run(entry, argv + ["--overwrite", "--a", "10"], tmp_path, kill_at=n, mode="after")
    assert r.returncode == -signal.SIGKILL
    assert not (tmp_path / "out" / "manifest.json").exists()
    r = _run(entry, argv, tmp_path)
    assert r.returncode == 0, r.stderr
    assert _snapshot(tmp_path / "out") == ref


# --------------------------------------------------------------------------- item 11: the crash-consistency matrix


@pytest.mark.parametrize("stage", ["grade", "distribution", "select",
                                   pytest.param("eval", marks=pytest.mark.slow)])  # eval: ~15 processes of ~15 s
def test_crash_matrix(stage, pro_slice, graded_file, tmp_path):
    """kill -9 at each publication point (before each os.replace into the output, and after the last one),
    then the same command: the outputs equal those of an uninterrupted run, with no temporaries, markers or locks."""
    root = tmp_path / "run"  # the tiny model (eval) lives outside the compared folder
    root.mkdir()
    entry, argv = _stage_command(stage, pro_slice, graded_file, root)
    tmp_path = root
    counted = tmp_path / "count.json"
    r = _run(entry, argv, tmp_path, count_file=counted)
    assert r.returncode == 0, r.stderr
    points = json.loads(counted.read_text())
    assert len(points) >= 2, points
    ref = _snapshot(tmp_path / "out")
    assert not any(Path(k).name.startswith(".") for k in ref), sorted(ref)
    shutil.rmtree(tmp_path / "out")
    matrix = []
    for n, mode in [(i + 1, "before") for i in range(len(points))] + [(len(points), "after")]:
        r = _run(entry, argv, tmp_path, kill_at=n, mode=mode)
        assert r.returncode == -signal.SIGKILL, (n, mode, r.stderr)
        r = _run(entry, argv, tmp_path)
        assert r.returncode == 0, (n, mode, r.stderr)
        assert _snapshot(tmp_path / "out") == ref, (n, mode)
        matrix.append(f"{stage}: kill {mode} {points[n - 1]} -> rerun ok, outputs identical")
        shutil.rmtree(tmp_path / "out")
    print("\n" + "\n".join(matrix))


# --------------------------------------------------------------------------- train: the final save


@pytest.mark.slow  # five fresh training processes: ~1-2 min on a shared 2-core CPU
def test_train_killed_in_its_final_publication_is_completed_by_the_same_command(assets, tmp_path):
    """kill -9 before model/ is renamed into place, and between model/ and manifest.json: `deft train` (the
    same command, no --resume) continues from the newest checkpoint and publishes bitwise the same weights."""
    import torch

    from test_train import load_weights, overrides

    extra = {"train.max_steps": 4, "train.save_steps": 3, "train.ref_cache_dir": str(tmp_path / "rc")}

    def argv(out):
        return ["train"] + [a for o in overrides(assets, out, **extra) for a in ("--set", o)]

    full = tmp_path / "full"
    r = _run("cli", argv(full), full)
    assert r.returncode == 0, r.stderr[-3000:]
    for point in ("model", "manifest.json"):
        out = tmp_path / f"killed-{point}"
        r = _run("cli", argv(out), out, kill_name=point)
        assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
        assert not (out / "manifest.json").exists() and interrupted_publication(out / "manifest.json")
        r = _run("cli", argv(out), out)
        assert r.returncode == 0, r.stderr[-3000:]
        assert "final save of the previous run was interrupted" in r.stderr
        a, b = load_weights(full / "model"), load_weights(out / "model")
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
        assert (out / "manifest.json").exists() and not interrupted_publication(out / "manifest.json")
        assert not (out / ".tmp-model").exists() and not (out / ".deft.lock").exists()
        steps = [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines()]
        assert steps == [1, 2, 3, 4]
        r = _run("cli", argv(out), out)  # complete now: refused as before
        assert r.returncode == 2 and "already holds a run" in r.stderr



# --------------------------------------------------------------------------- select: the publication begins at the first write


def _select_embeddings(path: Path):
    import numpy as np

    from deft.data import load

    frame = load(path, on_error="skip").frame
    n = int(sum(len(r) for r in frame["responses"].to_list()))
    return np.random.default_rng(0).normal(size=(n, 8)).astype(np.float32)


def _no_pair_input(folder: Path, bad_line: bool = True) -> Path:
    """One prompt whose two responses are the same text (nothing to select), and (``bad_line``) one bad line."""
    path = folder / "no_pair.jsonl"
    path.write_text(json.dumps({"id": "E", "prompt": "Repeat.", "ranked": True, "responses": ["again", "again"]})
                    + ("\n{not json\n" if bad_line else "\n"), encoding="utf-8")
    return path


@pytest.mark.parametrize("failure", ["bad input", "no distinct pair", "embedder load"])
def test_failed_select_overwrite_leaves_the_earlier_selection_complete(failure, pro_slice, tmp_path, monkeypatch):
    """`deft select --overwrite` failing before its first output write (bad input, the embedder): the earlier
    selection keeps its manifest, no marker is left, and a later run without --overwrite is still refused."""
    import deft.select as select_mod
    from deft.select import select_files

    out = tmp_path / "sel" / "easy.parquet"
    select_files([pro_slice], out, strategy="easy", embeddings=_select_embeddings(pro_slice), plot=True,
                 on_error="skip", progress=False)
    ref = _snapshot(tmp_path / "sel")
    assert "easy.manifest.json" in ref and "easy.rejects.jsonl" in ref
    if failure == "bad input":  # on_error="raise": the bad line stops the load
        with pytest.raises(ValueError, match="invalid JSON"):
            select_files([_no_pair_input(tmp_path)], out, strategy="easy", plot=True, progress=False, overwrite=True,
                         embeddings=_select_embeddings(pro_slice))
    elif failure == "no distinct pair":
        with pytest.raises(ValueError, match="two distinct responses"):
            select_files([_no_pair_input(tmp_path, bad_line=False)], out, strategy="easy", plot=True, progress=False, overwrite=True,
                         embeddings=_select_embeddings(pro_slice))
    else:
        def broken(*a, **k):
            raise RuntimeError("no embedder here")

        monkeypatch.setattr(select_mod.ResponseEmbedder, "load", broken)
        with pytest.raises(RuntimeError, match="no embedder here"):
            select_files([pro_slice], out, strategy="easy", plot=True, on_error="skip", progress=False, overwrite=True)
    assert not interrupted_publication(out.with_name("easy.manifest.json"))
    assert _snapshot(tmp_path / "sel") == ref  # outputs, manifest and rejects as they were; no marker, no lock
    with pytest.raises(FileExistsError, match="already exists; pass --overwrite"):
        select_files([pro_slice], out, strategy="hard", embeddings=_select_embeddings(pro_slice), on_error="skip",
                     progress=False)


def test_first_select_failing_with_on_error_skip_leaves_no_marker(pro_slice, tmp_path):
    """A first `deft select --on-error skip` that fails after writing its rejects file leaves no marker, and the
    rejects file does not block the next run (it is not a refused output)."""
    from deft.select import select_files

    out = tmp_path / "sel" / "easy.parquet"
    with pytest.raises(ValueError, match="two distinct responses"):
        select_files([_no_pair_input(tmp_path)], out, strategy="easy", on_error="skip", progress=False,
                     embeddings=_select_embeddings(pro_slice))
    assert out.with_name("easy.rejects.jsonl").exists()  # written while loading: it says what was skipped
    assert not interrupted_publication(out.with_name("easy.manifest.json"))
    assert sorted(os.listdir(out.parent)) == ["easy.rejects.jsonl"]
    res = select_files([pro_slice], out, strategy="easy", embeddings=_select_embeddings(pro_slice), on_error="skip",
                       progress=False)  # no --overwrite needed
    assert res.manifest_path.exists() and not interrupted_publication(res.manifest_path)


# --------------------------------------------------------------------------- sharded grade: the merge publishes under the lock


def test_sharded_grade_publishes_under_the_folder_lock(pro_slice, tmp_path):
    """Shards score without the folder lock (concurrently with its holder); the shard that merges grades and
    publishes under it: refused with OutputLockedError while another process holds it, nothing published."""
    from deft.grade import grade_files

    out = tmp_path / "grade"
    kw = dict(reward_model="builtin", on_error="skip", progress=False, batch_size=16)
    holder = _hold(out, "grade")
    try:
        first = grade_files([pro_slice], out, shard=(0, 2), **kw)  # scores its part only: no folder lock needed
        assert first.graded is None and (out / "scores").is_dir()
        with pytest.raises(OutputLockedError, match=f"pid {holder.pid}"):
            grade_files([pro_slice], out, shard=(1, 2), **kw)  # the last shard: merges, then would publish
        assert not (out / "graded.parquet").exists() and not (out / "manifest.json").exists()
        assert not interrupted_publication(out / "manifest.json")
    finally:
        _kill(holder)
    run = grade_files([pro_slice], out, shard=(1, 2), **kw)  # the lock is free: the merge publishes
    assert run.graded is not None and (out / "manifest.json").exists() and not interrupted_publication(out / "manifest.json")
    assert not (out / ".deft.lock").exists()


# --------------------------------------------------------------------------- deft run: a stage with a marker is not complete


def test_pipeline_stage_with_an_interrupted_publication_is_resumed_not_skipped(pro_slice, tmp_path):
    """Every output of a stage present but its publication marker too (a kill between manifest.json and the
    marker's removal): not complete on disk, and a stage recorded done is resumed (plan) instead of skipped."""
    from deft.pipeline import STAGES, _STAGE_CLASSES, _write_stage, load_pipeline_config, plan_pipeline

    run_dir = tmp_path / "run"
    cfg = load_pipeline_config(None, [f"run_dir={run_dir}", f"model={_tiny_llama(tmp_path)}",
                                      f"inputs.files={json.dumps([str(pro_slice)])}", "select.enabled=true",
                                      "eval.enabled=true", f"eval.files={json.dumps([str(pro_slice)])}"])
    upstream: Dict[str, str] = {}
    stages = {}
    for name in STAGES:  # a finished run, as run_pipeline records it (the outputs as empty files)
        stage = stages[name] = _STAGE_CLASSES[name](cfg, run_dir, dict(upstream))
        fp = stage.fingerprint()
        for p in stage.outputs().values():
            p.parent.mkdir(parents=True, exist_ok=True)
            p.mkdir() if p.name == "model" else p.write_text("x")
        _write_stage(stage.folder, {"stage": name, "fingerprint": fp, "status": "done", "upstream": dict(upstream)})
        upstream[name] = fp
    assert [p["action"] for p in plan_pipeline(cfg)] == ["skip"] * len(STAGES)
    train = stages["train"]
    assert train.complete_on_disk()  # a kill after the final save, before stage.json says done: nothing to redo
    marker = publication_marker(run_dir / "train" / "manifest.json")
    marker.write_text("{}")  # ... but killed before the publication ended
    assert not train.complete_on_disk()
    plan = {p["stage"]: (p["action"], p["reason"]) for p in plan_pipeline(cfg)}
    assert plan["train"] == ("resume", "interrupted") and plan["eval"][0] == "run"
    assert all(plan[s][0] == "skip" for s in ("select", "grade", "distribution"))
    marker.unlink()
    assert stages["distribution"].commit_record() is None  # it publishes nothing (a marker would never go)
    for name, commit in {"select": "selected.manifest.json", "grade": "manifest.json", "eval": "manifest.json"}.items():
        # the other stages that publish: the same rule (each removes the marker when it has run)
        m = publication_marker(run_dir / name / commit)
        m.write_text("{}")
        assert not stages[name].complete_on_disk() and stages[name].interrupted()
        plan = {p["stage"]: p["action"] for p in plan_pipeline(cfg)}
        assert plan[name] == "resume", (name, plan)
        m.unlink()
