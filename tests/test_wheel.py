"""The built wheel in dist/ (scripts/build-wheels.sh, which scripts/install.sh runs): its tags
say abi3 and manylinux2014, auditwheel agrees, it holds the whole package, and once installed
into a fresh venv its `deft` command and native core work."""

from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
import sys
import tarfile
import zipfile
from email.parser import Parser
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
from tokenizers import Tokenizer as PyTokenizer

from conftest import shared_file

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="manylinux wheels are Linux's; other platforms are built by .github/workflows/release.yml"
)


@pytest.fixture(scope="module")
def wheel() -> Path:
    found = sorted((ROOT / "dist").glob("deft-*.whl"), key=lambda p: p.stat().st_mtime)
    if not found:
        pytest.skip(f"no wheel in {ROOT / 'dist'}: build one with `bash scripts/build-wheels.sh` (scripts/install.sh runs it)")
    return found[-1]


def _wheel_metadata(wheel: Path) -> Dict[str, object]:
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        dist_info = {n.split("/", 1)[0] for n in names if n.split("/", 1)[0].endswith(".dist-info")}
        assert len(dist_info) == 1, f"{wheel}: expected one .dist-info folder, found {sorted(dist_info)}"
        info = dist_info.pop()
        wheel_file = Parser().parsestr(zf.read(f"{info}/WHEEL").decode())
        metadata = Parser().parsestr(zf.read(f"{info}/METADATA").decode())
    return {"names": names, "wheel": wheel_file, "metadata": metadata}


def _project_version() -> str:
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    m = re.search(r'^version\s*=\s*"([^"]+)"', text, flags=re.MULTILINE)
    assert m, "pyproject.toml: no [project] version"
    return m.group(1)


def test_wheel_tags_and_contents(wheel: Path) -> None:
    meta = _wheel_metadata(wheel)
    tags = meta["wheel"].get_all("Tag")
    arch = os.uname().machine
    # one abi3 wheel for CPython >= 3.9, tagged with both spellings of manylinux2014
    assert sorted(tags) == sorted([f"cp39-abi3-manylinux_2_17_{arch}", f"cp39-abi3-manylinux2014_{arch}"]), (
        f"{wheel.name}: WHEEL tags {tags}; build it with scripts/build-wheels.sh (zig, manylinux2014)"
    )
    assert meta["wheel"]["Root-Is-Purelib"] == "false"
    metadata = meta["metadata"]
    assert metadata["Name"] == "deft"
    assert metadata["Version"] == _project_version(), f"{wheel.name} is not the version of this source tree"
    assert metadata["Requires-Python"] == ">=3.9"
    requires = {re.split(r"[ ;<>=!~\[]", r, 1)[0].lower() for r in metadata.get_all("Requires-Dist")}
    assert {"numpy", "typer", "rich", "tokenizers", "torch"} <= requires

    # the whole Python package (every module and asset of the source tree) and the extension
    names = set(meta["names"])
    source = ROOT / "python"
    expected = {
        p.relative_to(source).as_posix()
        for p in source.joinpath("deft").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix not in {".pyc", ".so"}
    }
    missing = sorted(expected - names)
    assert not missing, f"{wheel.name} lacks {missing[:10]} (built before they were added? rerun scripts/build-wheels.sh)"
    assert "deft/_native.abi3.so" in names
    assert {"deft/py.typed", "deft/_native.pyi"} <= names


def test_auditwheel_confirms_manylinux2014(wheel: Path) -> None:
    pytest.importorskip("auditwheel", reason="auditwheel is not installed (scripts/build-wheels.sh installs it)")
    out = subprocess.run(
        [sys.executable, "-m", "auditwheel", "show", "--json", str(wheel)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    # the most compatible tag the extension's symbol versions and libraries satisfy
    assert report["overall_tag"] == f"manylinux_2_17_{os.uname().machine}", report["overall_tag"]


def test_sdist_holds_what_a_build_needs() -> None:
    found = sorted((ROOT / "dist").glob("deft-*.tar.gz"), key=lambda p: p.stat().st_mtime)
    if not found:
        pytest.skip(f"no sdist in {ROOT / 'dist'}: build one with `bash scripts/build-wheels.sh` (scripts/install.sh runs it)")
    with tarfile.open(found[-1]) as tf:
        names = {n.split("/", 1)[1] for n in tf.getnames() if "/" in n}
    # the Rust crate with its lock file (a build from the sdist uses the tested dependency versions),
    # the Python package and the build configuration; nothing built
    needed = {"Cargo.toml", "Cargo.lock", "pyproject.toml", "README.md", "PKG-INFO"}
    needed |= {p.relative_to(ROOT).as_posix() for p in (ROOT / "rust").glob("*.rs")}
    needed |= {
        p.relative_to(ROOT).as_posix()
        for p in (ROOT / "python" / "deft").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix not in {".pyc", ".so"}
    }
    missing = sorted(needed - names)
    assert not missing, f"{found[-1].name} lacks {missing[:10]} (built before they were added? rerun scripts/build-wheels.sh)"
    built = sorted(n for n in names if n.endswith((".so", ".whl")) or n.startswith(("target/", "dist/")))
    assert not built, f"{found[-1].name} holds build outputs: {built[:10]}"


def _hh_texts(n: int) -> List[str]:
    path = shared_file("data/hh-rlhf/harmless-base-test.jsonl.gz")
    texts: List[str] = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            texts += [rec["chosen"], rec["rejected"]]
            if len(texts) >= n:
                break
    return texts


def test_wheel_installs_into_a_fresh_venv_and_runs(wheel: Path, tmp_path: Path) -> None:
    """Install the wheel (not the source tree, not the system's deft) into a new venv and use it.

    The venv sees this interpreter's site-packages for the dependencies (a fresh PyTorch is 4 GB),
    after its own; deft itself must come from the venv: the test checks where `deft`, its extension
    and its entry point are loaded from, and that `deft --help` imports neither torch nor
    transformers."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    # a .pth file rather than --system-site-packages, which would miss the packages when pytest itself
    # runs in a venv; its paths come after the venv's own site-packages
    venv_site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout.strip()
    outer = [p for p in sys.path if Path(p).name in {"site-packages", "dist-packages"}]
    Path(venv_site, "outer-site-packages.pth").write_text("\n".join(outer) + "\n", encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP"}}
    env["PYTHONNOUSERSITE"] = "1"
    # pip from the outer site-packages, installing into the venv; --ignore-installed: a deft installed
    # there must not count as "already satisfied"
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-index", "--no-deps",
         "--ignore-installed", str(wheel)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert install.returncode == 0, install.stderr

    deft_cmd = venv / "bin" / "deft"
    shebang = deft_cmd.read_text().splitlines()[0]
    assert Path(shebang[2:]).parent == venv / "bin", f"the deft entry point runs {shebang!r}, not the venv's Python"
    helped = subprocess.run([str(deft_cmd), "--help"], env=env, capture_output=True, text=True, timeout=120)
    assert helped.returncode == 0, helped.stderr
    for command in ("grade", "distribution", "train", "eval", "select", "run", "experiment", "stats", "export"):
        assert re.search(rf"^\W*{command}\b", helped.stdout, flags=re.MULTILINE), f"`deft --help` lists no {command}:\n{helped.stdout}"

    texts = _hh_texts(200)
    texts_file = tmp_path / "texts.json"
    texts_file.write_text(json.dumps(texts), encoding="utf-8")
    tokenizer = shared_file("tokenizers/smollm2/tokenizer.json")
    counts_file = tmp_path / "counts.npy"
    probe = f"""
import json, sys
import deft.cli  # what `deft --help` imports
heavy = sorted(m for m in ("torch", "transformers", "deepspeed") if m in sys.modules)
import importlib.metadata as md
import numpy as np
import deft, deft._native
from deft._native import count_tokens
texts = json.load(open({str(texts_file)!r}, encoding="utf-8"))
np.save({str(counts_file)!r}, count_tokens(texts, {str(tokenizer)!r}, num_threads=2))
print(json.dumps({{"deft": deft.__file__, "native": deft._native.__file__, "heavy": heavy,
                  "dist": str(md.distribution("deft").locate_file("deft/__init__.py"))}}))
"""
    ran = subprocess.run([str(python), "-c", probe], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stderr
    where = json.loads(ran.stdout.strip().splitlines()[-1])
    venv_lib = venv / "lib"
    for key in ("deft", "native", "dist"):
        assert Path(where[key]).resolve().is_relative_to(venv_lib.resolve()), f"{key} loaded from {where[key]}, not from the venv"
    assert where["heavy"] == [], f"`deft --help` imports {where['heavy']}"

    counts = np.load(counts_file, allow_pickle=False)
    ref_tok = PyTokenizer.from_file(str(tokenizer))
    ids = np.concatenate([np.asarray(e.ids, dtype=np.int64) for e in ref_tok.encode_batch(texts, add_special_tokens=False)])
    expected = np.bincount(ids, minlength=ref_tok.get_vocab_size(with_added_tokens=True))
    assert counts.dtype == np.uint64 and counts.shape == expected.shape
    assert int(counts.sum()) > 10_000
    np.testing.assert_array_equal(counts, expected)
