"""Grading (`deft grade`): levels A/B/C and DEFT's Q+/Q- polarity per response.

Levels
    Samples are ranked by their best response's score (ties broken by ``id``,
    ascending, so the result is deterministic). Of ``n`` samples in a grading
    group (one subset with ``per_subset``, else all), the top
    ``n_A = floor(n * a / 100 + 0.5)`` are level A and the bottom
    ``n_C = floor(n * c / 100 + 0.5)`` level C (round half up; ``n_A`` is at
    least 1 when ``a > 0`` and ``n >= 1``; ``n_C`` is cut so that A and C never
    overlap); the rest are B. With the paper's a = 3.73 and c = 12.5, 160,800
    samples give 5,998 A and 20,100 C.
Polarity
    Per sample, responses are sorted best-first by score (stable) and scores
    min-max normalised, ``r = (s - min) / (max - min)``. The best response goes
    to Q+ (+1), the worst to Q- (-1), and, by level (thresholds strict):
    A: r > 0.8 -> Q+;  B: r > 0.9 -> Q+, r < 0.1 -> Q-;  C: r < 0.2 -> Q-.
    All-equal scores carry no preference: r = 0.5 and polarity 0 for every
    response. The assignment runs in Rust (:func:`deft._native.assign_polarity`)
    over the Arrow columns; :func:`polarity_reference` is the plain-Python
    definition the tests compare it to.

Output columns (``graded.parquet``): the canonical columns with ``responses``
and ``scores`` re-ordered best-first by score, plus ``human_order`` (the
original index of each response: the source's order), ``norm_scores``,
``polarity`` (list[i8]), ``best_score``, ``level`` ("A"/"B"/"C") and
``level_rank`` (1 = best sample of its grading group).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import polars as pl
from pathlib import Path

# Imported inside the functions that use them, on purpose: matplotlib; importing deft stays fast.
from deft._native import assign_polarity
from deft.data import load_many
from deft.io import (
    atomic_path, begin_publication, check_publication, input_record, locked_output, output_lock, sha256_file,
    write_manifest,
)
from deft.score import load_reward_model, resolve_shard, score_frame

LEVELS = ("A", "B", "C")


@dataclass(frozen=True)
class Thresholds:
    """Polarity thresholds per level (``None``: the level has no such rule)."""

    a_pos: Optional[float] = 0.8
    a_neg: Optional[float] = None
    b_pos: Optional[float] = 0.9
    b_neg: Optional[float] = 0.1
    c_pos: Optional[float] = None
    c_neg: Optional[float] = 0.2

    def rule(self, level: str) -> Tuple[Optional[float], Optional[float]]:
        lv = level.lower()
        return getattr(self, f"{lv}_pos"), getattr(self, f"{lv}_neg")

    def as_dict(self) -> Dict[str, Optional[float]]:
        return asdict(self)

    def check(self) -> None:
        for k, v in self.as_dict().items():
            if v is not None and not (0.0 <= v <= 1.0):
                raise ValueError(f"threshold {k}={v} must be between 0 and 1 (normalised scores)")


def check_percentages(a: float, c: float) -> None:
    """Raise ValueError unless 0 < a < 100, 0 < c < 100 and a + c < 100."""
    for name, v in (("a", a), ("c", c)):
        if not (0.0 < v < 100.0) or math.isnan(v):
            raise ValueError(f"--{name} must be a percentage strictly between 0 and 100, got {v}")
    if a + c >= 100.0:
        raise ValueError(f"--a + --c must be below 100 (levels A and C would cover everything), got {a} + {c} = {a + c}")


def level_counts(n: int, a: float, c: float) -> Tuple[int, int]:
    """(n_A, n_C) for a group of ``n`` samples; see the module docstring."""
    if n <= 0:
        return 0, 0
    n_a = max(1, math.floor(round(n * a / 100.0, 9) + 0.5))  # round(): 100 * 0.145 is 14.4999...
    n_c = min(math.floor(round(n * c / 100.0, 9) + 0.5), n - n_a)
    return n_a, max(n_c, 0)


def _require_scores(frame: pl.DataFrame) -> None:
    missing = frame.filter(pl.col("scores").is_null())
    if missing.height:
        r = missing.row(0, named=True)
        raise ValueError(
            f"{r['source_file']}:{r['source_line']}: field 'scores': missing; {missing.height} of {frame.height} "
            "samples have no scores (score them with a reward model, or drop --use-input-scores)"
        )
    bad = frame.filter(pl.col("scores").list.len() != pl.col("responses").list.len())
    if bad.height:
        r = bad.row(0, named=True)
        raise ValueError(f"{r['source_file']}:{r['source_line']}: field 'scores': {len(r['scores'])} scores for {len(r['responses'])} responses")


def assign_levels(frame: pl.DataFrame, a: float, c: float, per_subset: bool) -> pl.DataFrame:
    """Add ``best_score``, ``level`` and ``level_rank`` (keeps row order)."""
    check_percentages(a, c)
    group = pl.col("subset") if per_subset else pl.lit("all")
    df = frame.with_row_index("_row").with_columns(
        pl.col("scores").list.max().alias("best_score"), group.alias("_group")
    )
    ranked = df.sort(["_group", "best_score", "id"], descending=[False, True, False]).with_columns(
        (pl.int_range(pl.len()).over("_group") + 1).alias("level_rank"),
        pl.len().over("_group").alias("_n"),
    )
    counts = {g: level_counts(n, a, c) for g, n in ranked.group_by("_group").agg(pl.len()).iter_rows()}
    n_a = pl.col("_group").replace_strict({g: v[0] for g, v in counts.items()}, return_dtype=pl.Int64)
    n_c = pl.col("_group").replace_strict({g: v[1] for g, v in counts.items()}, return_dtype=pl.Int64)
    ranked = ranked.with_columns(
        pl.when(pl.col("level_rank") <= n_a)
        .then(pl.lit("A"))
        .when(pl.col("level_rank") > pl.col("_n") - n_c)
        .then(pl.lit("C"))
        .otherwise(pl.lit("B"))
        .alias("level")
    )
    return ranked.sort("_row").drop("_row", "_group", "_n")


def polarity_reference(scores: Sequence[float], level: str, thresholds: Thresholds = Thresholds()) -> Tuple[List[int], List[float], List[int]]:
    """The plain-Python definition of one sample's assignment: (order, normalised, polarity), best-first."""
    if len(scores) < 2:
        raise ValueError(f"grading needs at least 2 scores, got {len(scores)}")
    if not all(math.isfinite(s) for s in scores):
        raise ValueError(f"scores must be finite, got {list(scores)}")
    order = sorted(range(len(scores)), key=lambda i: -scores[i])  # sorted() is stable
    hi, lo = scores[order[0]], scores[order[-1]]
    if hi == lo:
        return order, [0.5] * len(scores), [0] * len(scores)
    pos, neg = thresholds.rule(level)
    norm, pol = [], []
    # halve when max - min overflows (scores near +/-1.8e308), as the native path does
    scale = 1.0 if math.isfinite(hi - lo) else 0.5
    for k, i in enumerate(order):
        r = (scores[i] * scale - lo * scale) / (hi * scale - lo * scale)
        if k == 0 or (pos is not None and r > pos):
            p = 1
        elif k == len(order) - 1 or (neg is not None and r < neg):
            p = -1
        else:
            p = 0
        norm.append(r)
        pol.append(p)
    return order, norm, pol


def _polarity_native(frame: pl.DataFrame, th: Thresholds) -> pl.DataFrame:
    codes = frame.get_column("level").replace_strict({"A": 0, "B": 1, "C": 2}, return_dtype=pl.UInt8)
    order, norm, pol = assign_polarity(frame.get_column("scores"), codes, **th.as_dict())
    return pl.DataFrame(
        {
            "human_order": pl.from_arrow(order).cast(pl.List(pl.Int64)),
            "norm_scores": pl.from_arrow(norm).cast(pl.List(pl.Float64)),
            "polarity": pl.from_arrow(pol).cast(pl.List(pl.Int8)),
        }
    )


def _polarity_python(frame: pl.DataFrame, th: Thresholds) -> pl.DataFrame:
    out: Dict[str, List[Any]] = {"human_order": [], "norm_scores": [], "polarity": []}
    for scores, level in zip(frame.get_column("scores").to_list(), frame.get_column("level").to_list()):
        o, n, p = polarity_reference(scores, level, th)
        out["human_order"].append(o)
        out["norm_scores"].append(n)
        out["polarity"].append(p)
    return pl.DataFrame(
        out, schema={"human_order": pl.List(pl.Int64), "norm_scores": pl.List(pl.Float64), "polarity": pl.List(pl.Int8)}
    )


def grade(
    frame: pl.DataFrame,
    *,
    a: float = 3.73,
    c: float = 12.5,
    per_subset: Optional[bool] = None,
    thresholds: Thresholds = Thresholds(),
    native: bool = True,
) -> pl.DataFrame:
    """Grade a scored canonical frame; see the module docstring for the rules
    and the output columns. ``per_subset=None`` grades each subset separately
    when there are several (as the paper graded each HH subset)."""
    thresholds.check()
    check_percentages(a, c)
    if frame.height == 0:
        raise ValueError("nothing to grade: the input has no rows")
    _require_scores(frame)
    if per_subset is None:
        per_subset = frame.get_column("subset").n_unique() > 1
    leveled = assign_levels(frame, a, c, per_subset)
    pol = (_polarity_native if native else _polarity_python)(leveled, thresholds)
    out = pl.concat([leveled, pol], how="horizontal").with_columns(
        pl.col("responses").list.gather(pl.col("human_order")),
        pl.col("scores").list.gather(pl.col("human_order")),
    )
    return out


#: the columns every reader of ``graded.parquet`` needs
GRADED_COLUMNS = ("id", "subset", "context", "responses", "scores", "polarity", "level")


def read_graded(path: Any, columns: Sequence[str] = GRADED_COLUMNS) -> pl.DataFrame:
    """Read a ``graded.parquet`` written by `deft grade`, or raise a one-line
    error naming the file: missing, not Parquet, or without the columns
    `deft grade` writes."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(2, "graded file not found", str(p))
    if p.is_dir():
        hint = " (it holds graded.parquet)" if (p / "graded.parquet").exists() else ""
        raise ValueError(f"{p}: is a folder, expected the graded.parquet file `deft grade` writes{hint}")
    with open(p, "rb") as f:
        magic = f.read(4)
    if magic != b"PAR1":
        raise ValueError(f"{p}: not a Parquet file; pass the graded.parquet that `deft grade` writes "
                         "(grade a JSONL preference file first: deft grade --input FILE)")
    try:
        frame = pl.read_parquet(p)
    except Exception as e:  # polars raises several types for corrupt files
        raise ValueError(f"{p}: cannot read Parquet: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{p}: no column {', '.join(map(repr, missing))}; is it the output of `deft grade`?")
    return frame


def repeated_response_rows(frame: pl.DataFrame) -> pl.Series:
    """Boolean per row: the sample holds one response text more than once."""
    return frame.select(pl.col("responses").list.n_unique() < pl.col("responses").list.len()).to_series()


def grade_warnings(graded: pl.DataFrame) -> List[str]:
    """What a user should know about a graded frame before building Q_diff
    from it: samples whose scores are all equal (they carry no preference and
    give no Q+/Q- response) and samples where one text is in both Q+ and Q-
    (a response repeated with different scores)."""
    out: List[str] = []
    flat = graded.select(pl.col("polarity").list.eval(pl.element() != 0).list.any().alias("any")).to_series()
    n_equal = int((~flat).sum())
    if n_equal:
        out.append(f"{n_equal:,} of {graded.height:,} samples have all-equal scores: they carry no preference, "
                   "so none of their responses is in Q+ or Q-")
    rep = graded.filter(repeated_response_rows(graded))
    both = 0
    for resp, pol in zip(rep.get_column("responses").to_list(), rep.get_column("polarity").to_list()):
        pos = {t for t, p in zip(resp, pol) if p == 1}
        if any(p == -1 and t in pos for t, p in zip(resp, pol)):
            both += 1
    if rep.height:
        out.append(f"{rep.height:,} samples hold the same response text twice"
                   + (f"; in {both:,} of them one text is in both Q+ and Q-" if both else "")
                   + " (pass --drop-duplicates to drop such samples)")
    return out


def summary(graded: pl.DataFrame) -> pl.DataFrame:
    """Per subset and level: samples, Q+/Q- responses, best-score quantiles."""
    return (
        graded.group_by("subset", "level")
        .agg(
            pl.len().alias("samples"),
            (pl.col("polarity").list.eval(pl.element() == 1).list.sum()).sum().alias("q_pos"),
            (pl.col("polarity").list.eval(pl.element() == -1).list.sum()).sum().alias("q_neg"),
            pl.col("best_score").min().alias("best_min"),
            pl.col("best_score").median().alias("best_p50"),
            pl.col("best_score").max().alias("best_max"),
        )
        .sort("subset", "level")
    )


def plot_best_scores(graded: pl.DataFrame, path: Any) -> None:
    """PNG histogram of best-response scores per subset with the A and C cut-offs marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    subsets = sorted(graded.get_column("subset").unique().to_list())
    fig, axes = plt.subplots(len(subsets), 1, figsize=(8, 2.6 * len(subsets)), squeeze=False)
    for ax, s in zip(axes[:, 0], subsets):
        g = graded.filter(pl.col("subset") == s)
        ax.hist(g.get_column("best_score").to_numpy(), bins=60, color="#7a8ca3")
        a_cut = g.filter(pl.col("level") == "A").get_column("best_score").min()
        c_cut = g.filter(pl.col("level") == "C").get_column("best_score").max()
        if a_cut is not None:
            ax.axvline(a_cut, color="#2a9d4b", lw=2, label=f"A from {a_cut:.3g}")
        if c_cut is not None:
            ax.axvline(c_cut, color="#c0392b", lw=2, label=f"C up to {c_cut:.3g}")
        ax.set_title(f"{s}: best-response score ({g.height:,} samples)")
        ax.legend(loc="upper left")
    axes[-1, 0].set_xlabel("reward-model score of the best response")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------
# The stage: load -> score -> grade -> write (what `deft grade` runs)


@dataclass
class GradeRun:
    """What :func:`grade_files` produced. ``graded`` is None when this process
    scored one shard and other shards are still missing."""

    output_dir: Any
    graded: Optional[pl.DataFrame] = None
    graded_path: Any = None
    manifest_path: Any = None
    plot_path: Any = None
    n_rejected: int = 0
    message: str = ""
    #: samples dropped by ``drop_duplicates`` (one response text repeated)
    n_dropped_duplicates: int = 0
    #: see :func:`grade_warnings`
    warnings: List[str] = field(default_factory=list)


@dataclass(frozen=True)
class GradeOptions:
    """Everything :func:`grade_files` takes besides its inputs and output
    folder: built once (by ``deft grade`` from its flags, by the pipeline from
    its ``grade:`` section) and validated when built (thresholds, percentages).

    ``reward_model``/``template``/``max_length``/``batch_size``/``device``/
    ``trust_remote_code``: the scorer (:func:`deft.score.load_reward_model`);
    ``use_input_scores``: grade with the scores stored in the input instead;
    ``a``, ``c``, ``per_subset``, ``thresholds``: the grading
    (:func:`grade`); ``shard``: score only shard ``(k, n)``; ``plot``: write
    ``best_scores.png``; ``overwrite``: replace an existing result;
    ``on_error``/``rejects``: bad input rows (``raise``, or ``skip`` into the
    rejects file); ``drop_duplicates``: drop samples that hold one response
    text twice (before scoring); ``progress``: progress bars."""

    reward_model: str = "builtin"
    template: str = "auto"
    use_input_scores: bool = False
    a: float = 3.73
    c: float = 12.5
    per_subset: Optional[bool] = None
    thresholds: Thresholds = Thresholds()
    max_length: int = 1024
    batch_size: Optional[int] = None
    device: Optional[str] = None
    shard: Optional[Tuple[int, int]] = None
    plot: bool = False
    overwrite: bool = False
    on_error: str = "raise"
    rejects: Any = None
    trust_remote_code: bool = False
    progress: bool = True
    drop_duplicates: bool = False

    def __post_init__(self) -> None:
        self.thresholds.check()
        check_percentages(self.a, self.c)


def _options(a: Mapping[str, Any]) -> GradeOptions:
    """The options of a bound :func:`grade_files` call."""
    return replace(a["options"] or GradeOptions(), **a["overrides"])


def _unsharded(a: Mapping[str, Any]) -> bool:
    """Whether a grade_files call scores everything itself; sharded runs
    share the folder while scoring (each shard has its own lock in scores/),
    and the shard that merges takes the folder lock to grade and publish."""
    o = _options(a)
    if o.use_input_scores:
        return True

    return resolve_shard(o.shard)[1] == 1


@locked_output("grade", "output_dir", when=_unsharded)
def grade_files(inputs: Sequence[Any], output_dir: Any, options: Optional[GradeOptions] = None, **overrides: Any) -> GradeRun:
    """Load ``inputs``, score them (or use their scores), grade, and write
    ``graded.parquet``, ``manifest.json`` (and ``best_scores.png``) into
    ``output_dir``, as ``options`` say (:class:`GradeOptions`; keyword
    ``overrides`` replace its fields, e.g. ``grade_files(files, out,
    use_input_scores=True, a=5)``). Scoring is resumable: rerunning after an
    interruption continues from the part files in ``output_dir/scores``."""
    o = replace(options or GradeOptions(), **overrides)
    out = Path(output_dir)
    graded_path = out / "graded.parquet"
    check_publication(out / "manifest.json", [graded_path], o.overwrite)  # manifest.json: the commit record, written last
    loaded = load_many(list(inputs), on_error=o.on_error, rejects_path=o.rejects)  # files or dataset sources
    frame = loaded.frame
    run = GradeRun(output_dir=out, n_rejected=len(loaded.rejects))
    if o.drop_duplicates:
        rep = repeated_response_rows(frame)
        run.n_dropped_duplicates = int(rep.sum())
        frame = frame.filter(~rep)
        if frame.height == 0:
            raise ValueError(f"nothing to grade: all {rep.len():,} samples hold a repeated response (--drop-duplicates)")
    model_info: Dict[str, Any]
    if o.use_input_scores:
        _require_scores(frame)
        model_info = {"reward_model": "input scores", "template": None}
    else:
        model = load_reward_model(
            o.reward_model, template=o.template, max_length=o.max_length, device=o.device, trust_remote_code=o.trust_remote_code
        )
        model_info = {"reward_model": model.name, "template": model.template, "max_length": model.max_length}
        scored = score_frame(
            frame, model, work_dir=out / "scores", shard=o.shard, batch_size=o.batch_size, progress=o.progress,
            metrics=out / "metrics.jsonl", overwrite=o.overwrite,
        )
        if scored is None:
            run.message = f"scored this shard into {out / 'scores'}; rerun when every shard is done to merge and grade"
            return run
        frame = scored
    # The grade and publication of the merged scores hold the folder lock in a sharded run too (re-entrant when
    # unsharded: the decorator holds it already). A shard that only scores its part returned above without it,
    # so shards score concurrently; only the one that merges publishes, under the lock
    with output_lock(out, "grade"):
        per_subset = o.per_subset
        if per_subset is None:  # the default of grade(), resolved here so the manifest records it
            per_subset = frame.get_column("subset").n_unique() > 1
        graded = grade(frame, a=o.a, c=o.c, per_subset=per_subset, thresholds=o.thresholds)
        run.warnings = grade_warnings(graded)
        pub = begin_publication(out / "manifest.json", [graded_path, out / "best_scores.png" if o.plot else None, o.rejects],
                                overwrite=o.overwrite, refuse=[graded_path])  # rejects: written while loading; its stale temporaries go
        with atomic_path(graded_path) as tmp:
            graded.write_parquet(tmp)
        counts = {
            f"{r['subset']}/{r['level']}": {k: r[k] for k in ("samples", "q_pos", "q_neg")}
            for r in summary(graded).iter_rows(named=True)
        }
        run.graded, run.graded_path = graded, graded_path
        if o.plot:
            run.plot_path = out / "best_scores.png"
            plot_best_scores(graded, run.plot_path)
        run.manifest_path = write_manifest(
            out / "manifest.json",
            stage="grade",
            inputs=[input_record(p) for p in inputs],
            parameters={
                **model_info, "a": o.a, "c": o.c, "per_subset": per_subset, "thresholds": o.thresholds.as_dict(),
                "level_rounding": "n_A = max(1, floor(n*a/100 + 0.5)); n_C = min(floor(n*c/100 + 0.5), n - n_A); ties by id",
                "on_error": o.on_error, "drop_duplicates": o.drop_duplicates,
            },
            outputs={"graded": {"path": str(graded_path), "sha256": sha256_file(graded_path), "rows": graded.height},
                     "plot": str(run.plot_path) if run.plot_path else None},
            counts=counts,
            rejected=len(loaded.rejects),
            dropped_duplicates=run.n_dropped_duplicates,
            warnings=run.warnings,
        )
        pub.done()
        return run
