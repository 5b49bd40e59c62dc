"""`deft export`: a graded or selected preference set as TRL-ready pairs.

Input
    A ``graded.parquet`` of `deft grade` (responses best first by score;
    ``levels`` keeps some levels, e.g. A), or anything :func:`deft.data.load`
    reads: the output of `deft select`, a preference file, a Hugging Face
    dataset source. In a graded set the preference is the score: a pair is a
    higher-scored response against a lower-scored one, and a sample whose
    scores are all equal gives none. Elsewhere it is the row's order when the
    row is ``ranked`` (best first, as the source or `deft select` put it), else
    the scores; a row with neither gives no pair. Such rows are counted
    (``no_preference``), never exported.
Pairs
    ``best-worst`` (default): one pair per sample, its best response against
    its worst -- the pair `deft train` trains DPO on. ``all``: every pair
    ``(i, j)``, ``i`` before ``j`` in the preference order and strictly
    preferred; ids get ``#i-j``. A pair of one text twice is no preference.
Records
    TRL's preference format with an explicit prompt: ``prompt``, ``chosen``,
    ``rejected``. ``style="conversational"`` (default): ``prompt`` is the
    context as ``{"role", "content"}`` messages and ``chosen``/``rejected`` one
    assistant message each, so TRL applies the model's chat template;
    :func:`deft.data.load` reads them back to the same context, responses and
    scores. ``style="standard"``: plain text, ``prompt`` the HH transcript
    (:func:`deft.render.render_hh`, ending ``"\\n\\nAssistant:"``) and
    ``chosen``/``rejected`` the response after one space, what `deft train`
    tokenises with ``data.template: plain``. Besides: ``id``, ``subset``,
    ``score_chosen``/``score_rejected`` (null without scores) and, from a
    graded set, ``level``.
Containers (``format``)
    ``trl``: a Parquet file (``load_dataset("parquet", data_files=...)``);
    ``jsonl``: JSON Lines (``.jsonl`` or ``.jsonl.gz``,
    ``load_dataset("json", ...)``); ``hf``: a ``save_to_disk`` folder
    (``datasets.load_from_disk``). Outputs are written atomically (a folder
    under a temporary name, then renamed), with ``NAME.manifest.json`` beside
    them (input and its hash, parameters, counts, the output's hash).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import polars as pl

from deft.io import PathLike, atomic_path, begin_publication, check_publication, input_record, locked_output, sha256_file, write_manifest

__all__ = ["EXPORT_FORMATS", "STYLES", "PAIR_MODES", "ExportResult", "export_pairs", "export_files", "export_output_paths"]

EXPORT_FORMATS = ("trl", "jsonl", "hf")
STYLES = ("conversational", "standard")
PAIR_MODES = ("best-worst", "all")
_LEVELS = ("A", "B", "C")

_MESSAGE = pl.Struct({"role": pl.Utf8, "content": pl.Utf8})


@dataclass
class ExportResult:
    """What :func:`export_pairs` / :func:`export_files` give: the pair
    ``records``; ``counts`` (``samples`` considered, ``pairs`` exported,
    ``no_preference`` samples without a pair); the paths written."""

    records: pl.DataFrame
    counts: Dict[str, int] = field(default_factory=dict)
    output_path: Optional[Path] = None
    manifest_path: Optional[Path] = None


def _check_choice(name: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")


def _levels(levels: Optional[Sequence[str]]) -> Optional[List[str]]:
    """``levels`` as a list of A/B/C (entries may hold several, ``"A,B"``)."""
    if levels is None:
        return None
    out: List[str] = []
    for item in levels:
        for lv in str(item).split(","):
            lv = lv.strip().upper()
            if lv not in _LEVELS:
                raise ValueError(f"unknown level {lv!r}; levels are A, B and C")
            if lv not in out:
                out.append(lv)
    if not out:
        raise ValueError("levels is empty; give A, B and/or C, or leave it out for every sample")
    return out


def _order(responses: List[str], scores: Optional[List[float]], ranked: bool, graded: bool) -> Optional[List[Tuple[int, Optional[float]]]]:
    """The responses' indices in preference order with their scores, or None
    when the row states no preference."""
    idx = list(range(len(responses)))
    if graded:  # sorted best first by score already
        return [(i, scores[i] if scores else None) for i in idx]
    if ranked:
        return [(i, scores[i] if scores else None) for i in idx]
    if scores:
        return sorted(((i, scores[i]) for i in idx), key=lambda t: -t[1])  # stable: ties keep the source order
    return None


def _preferred(a: Tuple[int, Optional[float]], b: Tuple[int, Optional[float]], by_score: bool) -> bool:
    """Whether ``a`` (earlier in the order) is strictly preferred to ``b``."""
    if by_score:
        return a[1] is not None and b[1] is not None and a[1] > b[1]
    return True


def export_pairs(
    frame: pl.DataFrame,
    *,
    levels: Optional[Sequence[str]] = None,
    pairs: str = "best-worst",
    style: str = "conversational",
) -> ExportResult:
    """The TRL pair records of a canonical frame or a graded one (with a
    ``level`` column); see the module docstring."""
    from deft.render import render_hh

    _check_choice("pairs", pairs, PAIR_MODES)
    _check_choice("style", style, STYLES)
    wanted = _levels(levels)
    graded = "level" in frame.columns
    if wanted is not None:
        if not graded:
            raise ValueError("levels need a graded.parquet of `deft grade` (this input has no level column)")
        frame = frame.filter(pl.col("level").is_in(wanted))
    cols = ["id", "subset", "context", "responses", "scores", "ranked"] + (["level"] if graded else [])
    rows: Dict[str, List[Any]] = {k: [] for k in ("id", "subset", "prompt", "chosen", "rejected", "score_chosen", "score_rejected", "level")}
    n_none = 0
    for r in frame.select([c for c in cols if c in frame.columns]).iter_rows(named=True):
        responses, scores = r["responses"], r.get("scores")
        order = _order(responses, scores, bool(r.get("ranked")), graded)
        by_score = graded or not r.get("ranked")
        if order is None:
            n_none += 1
            continue
        if pairs == "best-worst":
            candidates = [(order[0], order[-1])] if len(order) >= 2 else []
        else:
            candidates = [(order[a], order[b]) for a in range(len(order)) for b in range(a + 1, len(order))]
        chosen_pairs = [(a, b) for a, b in candidates
                        if _preferred(a, b, by_score) and responses[a[0]] != responses[b[0]]]  # one text twice: no preference
        if not chosen_pairs:
            n_none += 1
            continue
        context = [{"role": t["role"], "content": t["content"]} for t in r["context"]]
        try:
            prompt: Any = context if style == "conversational" else render_hh(context)
        except ValueError as e:  # a system turn in the middle: no plain HH text for it
            raise ValueError(f"sample {r['id']}: {e}; export it with style conversational") from None
        for (i, si), (j, sj) in chosen_pairs:
            rows["id"].append(r["id"] if pairs == "best-worst" else f"{r['id']}#{i}-{j}")
            rows["subset"].append(r["subset"])
            rows["prompt"].append(prompt)
            if style == "conversational":
                rows["chosen"].append([{"role": "assistant", "content": responses[i]}])
                rows["rejected"].append([{"role": "assistant", "content": responses[j]}])
            else:
                rows["chosen"].append(" " + responses[i])
                rows["rejected"].append(" " + responses[j])
            rows["score_chosen"].append(si)
            rows["score_rejected"].append(sj)
            rows["level"].append(r.get("level"))
    text = pl.List(_MESSAGE) if style == "conversational" else pl.Utf8
    schema = {"id": pl.Utf8, "subset": pl.Utf8, "prompt": text, "chosen": text, "rejected": text,
              "score_chosen": pl.Float64, "score_rejected": pl.Float64, "level": pl.Utf8}
    if not graded:
        del rows["level"], schema["level"]
    records = pl.DataFrame(rows, schema=schema)
    counts = {"samples": frame.height, "pairs": records.height, "no_preference": n_none}
    return ExportResult(records, counts)


def export_output_paths(output: PathLike, format: Optional[str] = None) -> Tuple[str, Path, Path]:
    """``(format, output, manifest)``: the format (given, or from the output's
    name: ``.parquet`` trl, ``.jsonl``/``.jsonl.gz`` jsonl, no data-file
    extension hf) checked against the name, and ``NAME.manifest.json`` beside
    the output."""
    out = Path(output)
    lower = out.name.lower()
    by_name = "trl" if lower.endswith(".parquet") else "jsonl" if lower.endswith((".jsonl", ".jsonl.gz")) else None
    if by_name is None and lower.endswith((".json", ".json.gz", ".gz", ".csv", ".arrow")):
        raise ValueError(f"{output}: unsupported output extension; use .parquet (trl), .jsonl or .jsonl.gz (jsonl), "
                         "or a folder name without extension (hf)")
    fmt = format or by_name or "hf"
    _check_choice("format", fmt, EXPORT_FORMATS)
    expected = {"trl": ".parquet", "jsonl": ".jsonl or .jsonl.gz", "hf": "a folder name without a data-file extension"}
    if (fmt == "hf") != (by_name is None) or (by_name is not None and fmt != by_name):
        raise ValueError(f"{output}: --format {fmt} writes {expected[fmt]}")
    stem = out.name
    for suffix in (".jsonl.gz", ".jsonl", ".parquet"):
        if lower.endswith(suffix):
            stem = out.name[: -len(suffix)]
            break
    if not stem:
        raise ValueError(f"{output}: the output needs a name")
    return fmt, out, out.with_name(f"{stem}.manifest.json")


def _read_input(source: Any, on_error: str) -> Tuple[pl.DataFrame, int]:
    """A graded.parquet (with its level column), else what
    :func:`deft.data.load` makes of ``source``; and the rows rejected."""
    from deft.data.hf import is_dataset_source

    if not is_dataset_source(source):
        p = Path(source)
        if p.is_file() and p.name.lower().endswith(".parquet"):
            try:
                names = pl.read_parquet_schema(p)
            except Exception:  # not Parquet: the loader says why
                names = {}
            if "level" in names and "polarity" in names:
                from deft.grade import read_graded

                return read_graded(p, ("id", "subset", "context", "responses", "scores", "level")), 0
    from deft.data import load

    res = load(source, on_error=on_error)
    return res.frame, len(res.rejects)


def _write_folder(records: pl.DataFrame, out: Path) -> None:
    """``save_to_disk`` into a temporary folder beside ``out``, then rename it
    onto ``out`` (an existing ``out`` is moved aside first and removed after)."""
    from deft.data.hf import require_datasets

    datasets = require_datasets(str(out))
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.*.partial"):  # left by a killed export (we hold the lock)
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        ds = datasets.Dataset(records.to_arrow())
        bars = datasets.is_progress_bar_enabled()
        datasets.disable_progress_bars()  # (one line of output per export is enough)
        try:
            ds.save_to_disk(str(tmp / "d"))
        finally:
            if bars:
                datasets.enable_progress_bars()
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent)) / "old"
            os.replace(out, old)
        os.replace(tmp / "d", out)
        if old is not None:
            shutil.rmtree(old.parent, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _folder_sha256(folder: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(folder).as_posix()}\0{sha256_file(f)}\n".encode())
    return h.hexdigest()


@locked_output("export", "output", beside=True)
def export_files(
    input: Any,
    output: PathLike,
    *,
    format: Optional[str] = None,
    levels: Optional[Sequence[str]] = None,
    pairs: str = "best-worst",
    style: str = "conversational",
    on_error: str = "raise",
    overwrite: bool = False,
) -> ExportResult:
    """The `deft export` stage: read ``input`` (a graded.parquet, or any
    source :func:`deft.data.load` reads), :func:`export_pairs`, and write
    ``output`` in ``format`` (default: from its name, see
    :func:`export_output_paths`) with its manifest. An existing output is
    refused unless ``overwrite``; arguments are checked before any work."""
    from deft.data.hf import source_label

    _check_choice("pairs", pairs, PAIR_MODES)
    _check_choice("style", style, STYLES)
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    wanted = _levels(levels)
    fmt, out, manifest = export_output_paths(output, format)
    check_publication(manifest, [out, manifest], overwrite)
    if isinstance(input, (str, os.PathLike)) and Path(input).resolve() == out.resolve():
        raise ValueError(f"output {out} is the input; export to a new path")
    frame, n_rejected = _read_input(input, on_error)
    res = export_pairs(frame, levels=wanted, pairs=pairs, style=style)
    if res.records.height == 0:
        at = f" at levels {','.join(wanted)}" if wanted else ""
        raise ValueError(f"no pairs to export from {source_label(input)}: {res.counts['samples']:,} samples{at}, "
                         f"{res.counts['no_preference']:,} of them without a preference")
    pub = begin_publication(manifest, [out], overwrite=overwrite)
    if fmt == "hf":
        _write_folder(res.records, out)
        digest = _folder_sha256(out)
    else:
        with atomic_path(out) as tmp:
            if fmt == "trl":
                res.records.write_parquet(tmp)
            elif out.name.lower().endswith(".gz"):
                import gzip

                with gzip.open(tmp, "wb") as fh:
                    res.records.write_ndjson(fh)
            else:
                res.records.write_ndjson(tmp)
        digest = sha256_file(out)
    res.output_path = out
    res.manifest_path = write_manifest(
        manifest,
        stage="export",
        inputs=[input_record(input)],
        parameters={"format": fmt, "levels": wanted, "pairs": pairs, "style": style, "on_error": on_error},
        outputs={"pairs": {"path": str(out), "sha256": digest, "rows": res.records.height,
                           "columns": res.records.columns}},
        counts={**res.counts, "rejected": n_rejected},
    )
    pub.done()
    res.counts["rejected"] = n_rejected
    return res
