"""The `.pyi` stub of `deft._native` against the compiled module: every public
name on both sides, and for every function and method the same parameters
(names, kinds, which have defaults, and the defaults' values where the
compiled signature shows them), static methods and properties as such.

An equivalent of mypy's stubtest for this one module, without mypy: the
compiled side is read from the ``__text_signature__`` PyO3 generates, the stub
side with ``ast``. A signature changed in Rust without the stub fails here."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path
from typing import Dict, List

import pytest

import deft._native as native

REPO = Path(__file__).resolve().parents[1]
STUB = REPO / "python" / "deft" / "_native.pyi"


def _stub_params(fn: ast.FunctionDef, drop_self: bool) -> List[tuple]:
    a = fn.args
    out = []
    pos = a.posonlyargs + a.args
    defaults = [None] * (len(pos) - len(a.defaults)) + list(a.defaults)
    for p, d in zip(pos, defaults):
        out.append((p.arg, "positional", d))
    for p, d in zip(a.kwonlyargs, a.kw_defaults):
        out.append((p.arg, "keyword", d))
    if a.vararg or a.kwarg:
        out.append(("*", "var", None))
    return out[1:] if drop_self else out


def _runtime_params(obj) -> List[tuple]:
    sig = inspect.signature(obj)
    out = []
    for p in sig.parameters.values():
        if p.name in ("self", "$self", "$type"):
            continue
        kind = {p.KEYWORD_ONLY: "keyword", p.VAR_POSITIONAL: "var", p.VAR_KEYWORD: "var"}.get(p.kind, "positional")
        if kind == "var":
            if out and out[-1][1] == "var":
                continue
            out.append(("*", "var", None))
            continue
        out.append((p.name, kind, p.default))
    return out


def _compare(where: str, stub_fn: ast.FunctionDef, runtime, drop_self: bool) -> List[str]:
    s, r = _stub_params(stub_fn, drop_self), _runtime_params(runtime)
    if [(n, k) for n, k, _ in s] != [(n, k) for n, k, _ in r]:
        return [f"{where}: stub parameters {[(n, k) for n, k, _ in s]} but compiled {[(n, k) for n, k, _ in r]}"]
    errs = []
    for (name, _, sd), (_, _, rd) in zip(s, r):
        has_r = rd is not inspect.Parameter.empty
        if (sd is not None) != has_r:
            errs.append(f"{where}({name}): default in the stub: {sd is not None}, compiled: {has_r}")
        elif has_r and rd is not Ellipsis and ast.literal_eval(sd) != rd:
            errs.append(f"{where}({name}): stub default {ast.unparse(sd)} but compiled {rd!r}")
    return errs


def _decorators(fn: ast.FunctionDef) -> set:
    return {d.id for d in fn.decorator_list if isinstance(d, ast.Name)}


def stub_mismatches(module, stub_text: str) -> List[str]:
    """What differs between ``module`` and the stub ``stub_text`` (empty: none)."""
    tree = ast.parse(stub_text)
    errs: List[str] = []
    stub_names: Dict[str, ast.AST] = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            stub_names[node.name] = node
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            stub_names[node.target.id] = node  # a runtime value (``__version__: str``); plain assignments are type aliases
    runtime_names = {n for n in dir(module) if not n.startswith("_")} | ({"__version__"} if hasattr(module, "__version__") else set())
    for n in sorted(runtime_names - set(stub_names)):
        errs.append(f"{n}: in the compiled module, not in the stub")
    for n in sorted(set(stub_names) - runtime_names):
        errs.append(f"{n}: in the stub, not in the compiled module")
    for n in sorted(runtime_names & set(stub_names)):
        node, obj = stub_names[n], getattr(module, n)
        if isinstance(node, ast.FunctionDef):
            errs += _compare(n, node, obj, drop_self=False)
        elif isinstance(node, ast.ClassDef):
            if not inspect.isclass(obj):
                errs.append(f"{n}: a class in the stub, {type(obj).__name__} compiled")
                continue
            members = {m.name: m for m in node.body if isinstance(m, ast.FunctionDef)}
            public = {m for m in vars(obj) if not m.startswith("_")}
            for m in sorted(public - set(members)):
                errs.append(f"{n}.{m}: in the compiled class, not in the stub")
            for m in sorted(set(members) - public - {"__init__"}):
                errs.append(f"{n}.{m}: in the stub, not in the compiled class")
            if "__init__" in members:  # the class's own text signature is its constructor's
                errs += _compare(f"{n}()", members["__init__"], obj, drop_self=True)
            for m in sorted(public & set(members)):
                fn, raw = members[m], vars(obj)[m]
                decos = _decorators(fn)
                is_prop = inspect.isgetsetdescriptor(raw) or isinstance(raw, property)
                if ("property" in decos) != is_prop:
                    errs.append(f"{n}.{m}: property in the stub: {'property' in decos}, compiled: {is_prop}")
                    continue
                if is_prop:
                    continue
                is_static = isinstance(raw, staticmethod)
                if ("staticmethod" in decos) != is_static:
                    errs.append(f"{n}.{m}: staticmethod in the stub: {'staticmethod' in decos}, compiled: {is_static}")
                    continue
                errs += _compare(f"{n}.{m}", fn, getattr(obj, m), drop_self=not is_static)
    return errs


def test_stub_matches_the_compiled_module():
    assert stub_mismatches(native, STUB.read_text(encoding="utf-8")) == []


def test_installed_stub_is_the_repository_stub():
    installed = Path(native.__file__).with_name("_native.pyi")
    if not installed.exists():
        pytest.skip(f"no stub beside {native.__file__} (an in-place build)")
    assert installed.read_text(encoding="utf-8") == STUB.read_text(encoding="utf-8")


@pytest.mark.parametrize("edit, expected", [
    (("num_threads: Optional[int] = None,\n) -> npt.NDArray[np.uint64]:\n    \"\"\"Count",
      "num_threads: Optional[int] = None,\n    chunk: int = 0,\n) -> npt.NDArray[np.uint64]:\n    \"\"\"Count"),
     "count_tokens: stub parameters"),
    (("truncation_side: str = \"right\"", "truncation_side: str = \"left\""), "Tokenizer.encode(truncation_side): stub default"),
    (("    def id_to_token(self, id: int) -> Optional[str]: ...\n", ""), "Tokenizer.id_to_token: in the compiled class, not in the stub"),
    (("    @property\n    def source(self)", "    def source(self)"), "Tokenizer.source: property in the stub: False"),
    (("def assign_polarity(", "def assign_polarities("), "assign_polarity: in the compiled module, not in the stub"),
    (("    def __init__(self, source:", "    def __init__(self, path:"), "Tokenizer(): stub parameters"),
])
def test_the_check_finds_a_wrong_stub(edit, expected):
    text = STUB.read_text(encoding="utf-8")
    old, new = edit
    assert text.count(old) == 1, old
    errs = stub_mismatches(native, text.replace(old, new))
    assert any(e.startswith(expected) for e in errs), errs
