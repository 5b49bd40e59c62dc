"""The `deft` command line: thin Typer commands over the stage modules.

Every command turns expected failures (bad input, missing files, invalid
options) into one line on stderr, ``error: <what was wrong and where>``, and exit
status 2; tracebacks are reserved for bugs.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Any, Callable, List, Optional, TypeVar

import typer
from rich.console import Console
from rich.table import Table

# Imported inside the functions that use them, on purpose: every stage module (so that `deft --help` and
# argument errors answer without torch); importing deft stays fast.
from deft.io import locked_output

app = typer.Typer(
    name="deft",
    help="Data-efficient preference alignment: grade data with a reward model, "
    "build the discrepancy distribution, fine-tune with DEFT, evaluate.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _hide_flag_types() -> None:
    """Newer typer versions print ``<bool>`` after on/off flags in ``--help``
    (``--json <bool>``), as if they took a value, which invites ``--json true``
    (an error). Flags take no value: show no type for them."""
    try:
        from typer.core import TyperOption
    except ImportError:  # pragma: no cover
        return
    orig = getattr(TyperOption, "display_type_rich", None)
    if orig is None or getattr(orig, "_deft_flags", False):
        return

    def display_type_rich(self: Any, ctx: Any) -> Any:
        return None if getattr(self, "is_flag", False) else orig(self, ctx)

    display_type_rich._deft_flags = True  # type: ignore[attr-defined]
    TyperOption.display_type_rich = display_type_rich  # type: ignore[method-assign]


_hide_flag_types()
# Piped or captured output gets a fixed, wide layout (tables are not cut at 80 columns).
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)
console = Console(width=None if sys.stdout.isatty() else 160)

F = TypeVar("F", bound=Callable[..., Any])


def _friendly_errors(fn: F) -> F:
    """Report expected errors as one line and exit 2: every :class:`deft.errors.DeftError`
    (data, config, pipeline, scoring work dir, checkpoint, unsafe weights) and the
    argument/file errors below; anything else is a bug and keeps its traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from deft.errors import DeftError

        try:
            return fn(*args, **kwargs)
        except (DeftError, FileNotFoundError, FileExistsError, ValueError, TypeError) as e:
            msg = str(e) if not isinstance(e, FileNotFoundError) or not e.filename else f"no such file: {e.filename}"
            msg = "; ".join(l.strip() for l in msg.splitlines() if l.strip()) or type(e).__name__  # one line
            err_console.print(f"[bold red]error:[/] {msg}", highlight=False, markup=True, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


OnError = typer.Option("raise", "--on-error", help="raise: stop at the first bad row; skip: skip bad rows and write them to a rejects file.")


def load_inputs(inputs: List[Path], fmt: str, subset: Optional[str], on_error: str, rejects: Optional[Path]):
    """Load the CLI's --input files into one canonical frame, reporting skipped rows and notes."""
    from deft.data import load_many

    if on_error not in ("raise", "skip"):
        raise ValueError(f"--on-error must be 'raise' or 'skip', got {on_error!r}")
    if on_error == "skip" and rejects is None:
        rejects = Path(inputs[0].name + ".rejects.jsonl")
    res = load_many(inputs, format=fmt, subset=subset, on_error=on_error, rejects_path=rejects if on_error == "skip" else None)
    if res.notes:
        err_console.print(f"[dim]{len(res.notes)} rows loaded under a documented special case (e.g. {res.notes[0]})[/]", highlight=False)
    if res.rejects:
        err_console.print(f"[yellow]skipped {len(res.rejects)} of {res.n_read} rows[/]; rows and reasons in {res.rejects_path}", highlight=False)
    return res.frame


@app.command()
@_friendly_errors
def stats(
    input: List[Path] = typer.Option(..., "--input", "-i", help="Preference file(s): .jsonl, .jsonl.gz, .json or .parquet, any supported format; or a datasets save_to_disk folder, or hf:NAME[:CONFIG][:SPLIT] from the local Hugging Face datasets cache."),
    tokenizer: Path = typer.Option(..., "--tokenizer", "-t", help="tokenizer.json, or a folder holding one."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
    top: int = typer.Option(20, "--top", help="How many of the most frequent response tokens to list."),
    fmt: str = typer.Option("auto", "--format", help="Input format: auto, hh, pairs, pro, ranked, canonical."),
    subset: Optional[str] = typer.Option(None, "--subset", help="Subset name for rows that carry none (default: from the file name)."),
    on_error: str = OnError,
    rejects: Optional[Path] = typer.Option(None, "--rejects", help="Where skipped rows go with --on-error skip (default: <first input name>.rejects.jsonl in the current folder)."),
    num_threads: Optional[int] = typer.Option(None, "--threads", help="Tokeniser threads (default: all cores)."),
) -> None:
    """Samples per subset, responses per sample, token-length quantiles and the most frequent response tokens."""
    from deft.stats import compute_stats

    frame = load_inputs(input, fmt, subset, on_error, rejects)
    s = compute_stats(frame, tokenizer, top_k=top, num_threads=num_threads)
    if as_json:
        sys.stdout.write(json.dumps(s, ensure_ascii=False, indent=2) + "\n")
        return
    t = Table(title=f"{s['samples']:,} samples", title_justify="left")
    t.add_column("subset")
    t.add_column("samples", justify="right")
    for name, n in s["subsets"].items():
        t.add_row(name, f"{n:,}")
    console.print(t)
    console.print(
        "responses per sample: "
        + ", ".join(f"{k}: {v:,}" for k, v in s["responses_per_sample"].items())
        + f"; samples with scores: {s['samples_with_scores']:,}"
    )
    q = Table(title=f"token lengths ({s['tokenizer']['source']}, vocab {s['tokenizer']['vocab_size']:,})", title_justify="left")
    q.add_column("")
    keys = list(s["response_tokens"].keys())
    for k in keys:
        q.add_column(k, justify="right")
    for name in ("context_tokens", "response_tokens"):
        q.add_row(name.replace("_tokens", ""), *[f"{s[name].get(k, 0):.1f}" if k == "mean" else f"{s[name].get(k, 0):.0f}" for k in keys])
    console.print(q)
    tt = Table(title=f"top response tokens (of {s['response_tokens_total']:,})", title_justify="left")
    for c in ("id", "token", "text", "count", "share"):
        tt.add_column(c, justify="right" if c in ("id", "count", "share") else "left")
    for r in s["top_response_tokens"]:
        tt.add_row(str(r["id"]), repr(r["token"]), repr(r["text"]), f"{r['count']:,}", f"{r['share']:.2%}")
    console.print(tt)


def _load_config(ctx: typer.Context, param: Any, value: Optional[Path]) -> Optional[Path]:
    """Eager --config: a YAML mapping of this command's option names to values,
    used as defaults; options given on the command line win."""
    if value is None:
        return value
    import yaml

    if not value.exists():
        raise typer.BadParameter(f"config file not found: {value}")
    try:
        data = yaml.safe_load(value.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise typer.BadParameter(f"{value}: invalid YAML: {e}") from None
    if not isinstance(data, dict):
        raise typer.BadParameter(f"{value}: expected a mapping of option names to values")
    valid = {p.name for p in ctx.command.params if p.name and p.name != "config"}
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - valid)
    if unknown:
        raise typer.BadParameter(f"{value}: unknown option(s) {', '.join(unknown)}; valid: {', '.join(sorted(valid))}")
    ctx.default_map = {**(ctx.default_map or {}), **data}
    return value


ConfigOption = typer.Option(
    None, "--config", help="YAML file of option values (keys = option names, e.g. reward_model: builtin); command-line options win.",
    is_eager=True, callback=_load_config, exists=False,
)


def _threshold(v: Optional[float]) -> Optional[float]:
    return None if v is None or v < 0 else v


@app.command()
@_friendly_errors
def grade(
    input: List[Path] = typer.Option(..., "--input", "-i", help="Preference file(s) in any supported format, a datasets save_to_disk folder, or hf:NAME[:CONFIG][:SPLIT] read from the local Hugging Face datasets cache."),
    output_dir: Path = typer.Option(Path("runs/grade"), "--output-dir", "-o", help="Folder for graded.parquet, manifest.json, scores/ and the plot."),
    reward_model: str = typer.Option("builtin", "--reward-model", "-m", help="builtin (offline MiniLM-based stand-in), or a Hugging Face sequence-classification reward model: hub name or local path."),
    template: str = typer.Option("auto", "--template", help="How (context, response) is shown to a Hugging Face reward model: auto, oasst, chat, plain (the builtin reward model has its own fixed input and ignores it)."),
    use_input_scores: bool = typer.Option(False, "--use-input-scores", help="Grade with the scores stored in the input (PRO reward, scores field) instead of running a model."),
    a: float = typer.Option(3.73, "--a", help="Percent of samples (by best-response score) in level A."),
    c: float = typer.Option(12.5, "--c", help="Percent of samples in level C."),
    per_subset: Optional[bool] = typer.Option(None, "--per-subset/--no-per-subset", help="Grade each subset separately (default: yes when there are several)."),
    a_pos: float = typer.Option(0.8, "--a-pos", help="Level A: normalised score above which a response joins Q+ (negative: no rule)."),
    b_pos: float = typer.Option(0.9, "--b-pos", help="Level B: Q+ threshold."),
    b_neg: float = typer.Option(0.1, "--b-neg", help="Level B: normalised score below which a response joins Q-."),
    c_neg: float = typer.Option(0.2, "--c-neg", help="Level C: Q- threshold."),
    max_length: int = typer.Option(1024, "--max-length", help="Reward-model input tokens (left-truncated: the response survives)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Pairs per batch (default: chosen from a token budget)."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)."),
    shard: Optional[str] = typer.Option(None, "--shard", help="K/N: score only shard K of N (also from RANK/WORLD_SIZE); the last shard to finish merges."),
    plot: bool = typer.Option(False, "--plot", help="Write best_scores.png: histogram of best-response scores with the A/C cut-offs."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing graded.parquet (and stale score parts)."),
    on_error: str = OnError,
    rejects: Optional[Path] = typer.Option(None, "--rejects", help="Where skipped rows go with --on-error skip (default: OUTPUT_DIR/rejects.jsonl)."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow the reward model's own Python code (off by default)."),
    drop_duplicates: bool = typer.Option(False, "--drop-duplicates", help="Drop samples that hold one response text twice (with scores, one text could land in both Q+ and Q-)."),
    config: Optional[Path] = ConfigOption,
) -> None:
    """Score every response with a reward model, grade samples into levels A/B/C and assign Q+/Q- polarity."""
    from deft.grade import GradeOptions, Thresholds, grade_files, summary

    if on_error not in ("raise", "skip"):
        raise ValueError(f"--on-error must be 'raise' or 'skip', got {on_error!r}")
    shard_kn = None
    if shard is not None:
        from deft.score import parse_shard

        shard_kn = parse_shard(shard)
    th = Thresholds(a_pos=_threshold(a_pos), a_neg=None, b_pos=_threshold(b_pos), b_neg=_threshold(b_neg), c_pos=None, c_neg=_threshold(c_neg))
    options = GradeOptions(
        reward_model=reward_model, template=template, use_input_scores=use_input_scores, a=a, c=c, per_subset=per_subset,
        thresholds=th, max_length=max_length, batch_size=batch_size, device=device, shard=shard_kn, plot=plot, overwrite=overwrite,
        on_error=on_error, rejects=(rejects or output_dir / "rejects.jsonl") if on_error == "skip" else None,
        trust_remote_code=trust_remote_code, drop_duplicates=drop_duplicates,
    )
    run = grade_files(input, output_dir, options)
    if run.n_dropped_duplicates:
        err_console.print(f"[yellow]dropped {run.n_dropped_duplicates:,} samples[/] that hold one response text twice (--drop-duplicates)", highlight=False)
    for w in run.warnings:
        err_console.print(f"[yellow]warning:[/] {w}", highlight=False)
    if run.n_rejected:
        err_console.print(f"[yellow]skipped {run.n_rejected} bad rows[/]; see {rejects or output_dir / 'rejects.jsonl'}", highlight=False)
    if run.graded is None:
        console.print(run.message)
        return
    t = Table(title=f"graded {run.graded.height:,} samples -> {run.graded_path}", title_justify="left")
    cols = ["subset", "level", "samples", "q_pos", "q_neg", "best_min", "best_p50", "best_max"]
    for col in cols:
        t.add_column(col, justify="left" if col in ("subset", "level") else "right")
    for r in summary(run.graded).iter_rows(named=True):
        t.add_row(*[f"{r[k]:.3f}" if isinstance(r[k], float) else (f"{r[k]:,}" if isinstance(r[k], int) else str(r[k])) for k in cols])
    console.print(t)
    console.print(f"manifest: {run.manifest_path}" + (f"; plot: {run.plot_path}" if run.plot_path else ""))


distribution_app = typer.Typer(help="Build (default) or inspect the discrepancy distribution Q_diff.", no_args_is_help=False)
app.add_typer(distribution_app, name="distribution")


def _print_top(top: dict, title: str) -> None:
    for name in ("positive", "negative"):
        t = Table(title=f"{title}: most {name} tokens", title_justify="left")
        for col in ("id", "token", "text", "q_diff", "Q+", "Q-"):
            t.add_column(col, justify="right" if col in ("id", "q_diff", "Q+", "Q-") else "left")
        for r in top[name]:
            t.add_row(str(r["id"]), repr(r["token"]), repr(r["text"]), f"{r['q_diff']:+.2e}", f"{r['q_pos']:,}", f"{r['q_neg']:,}")
        console.print(t)


@distribution_app.callback(invoke_without_command=True)
@_friendly_errors
@locked_output("distribution", "output", beside=True)
def distribution(
    ctx: typer.Context,
    graded: Optional[Path] = typer.Option(None, "--graded", "-g", help="graded.parquet from `deft grade`."),
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer", "-t", help="The policy's tokenizer: tokenizer.json, its folder, or a model folder / hub name."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Where to write the .safetensors file."),
    template: str = typer.Option("auto", "--template", help="The trainer's prompt template, which fixes how responses are tokenised: auto (chat if the tokenizer has a chat template), chat, plain."),
    top: int = typer.Option(15, "--top", help="How many top tokens to print."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Also draw the top tokens to this PNG."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output file."),
    num_threads: Optional[int] = typer.Option(None, "--threads", help="Tokeniser threads (default: all cores)."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code"),
    config: Optional[Path] = ConfigOption,
) -> None:
    """deft distribution --graded graded.parquet --tokenizer PATH --output qdiff.safetensors"""
    if ctx.invoked_subcommand is not None:
        return
    missing = [n for n, v in (("--graded", graded), ("--tokenizer", tokenizer), ("--output", output)) if v is None]
    if missing:
        raise ValueError(f"missing {', '.join(missing)} (usage: deft distribution --graded graded.parquet --tokenizer PATH --output qdiff.safetensors)")
    from deft.distribution import distribution_files

    assert graded is not None and tokenizer is not None and output is not None
    run = distribution_files(graded, tokenizer, output, template=template, num_threads=num_threads, top=top, plot=plot,
                             overwrite=overwrite, trust_remote_code=trust_remote_code)
    dist, tt = run.distribution, run.top
    m = dist.metadata
    console.print(
        f"Q+: {int(m['pos_tokens']):,} tokens from {int(m['pos_responses']):,} responses; "
        f"Q-: {int(m['neg_tokens']):,} tokens from {int(m['neg_responses']):,} responses; "
        f"vocabulary {dist.vocab_size:,}; template {m['template']} -> {output}"
    )
    _print_top(tt, str(output))
    if plot:
        console.print(f"plot: {plot}")


@distribution_app.command("show")
@_friendly_errors
def distribution_show(
    file: Path = typer.Argument(..., help="A .safetensors file written by `deft distribution`."),
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer", "-t", help="Tokenizer to decode with (default: the one recorded in the file); its vocabulary must match."),
    top: int = typer.Option(20, "--top"),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Draw the top tokens to this PNG."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Print the most positive and most negative tokens of a distribution file, decoded."""
    from deft.distribution import load_distribution, plot_top_tokens, resolve_tokenizer, top_tokens

    dist = load_distribution(file)
    tok = resolve_tokenizer(tokenizer or dist.metadata["tokenizer_source"])
    dist = load_distribution(file, tokenizer=tok)
    tt = top_tokens(dist, tok, top)
    if as_json:
        sys.stdout.write(json.dumps({"metadata": dist.metadata, **tt}, ensure_ascii=False, indent=2) + "\n")
    else:
        console.print(", ".join(f"{k}={v}" for k, v in dist.metadata.items() if k in ("template", "pos_tokens", "neg_tokens", "vocab_size", "tokenizer_source")))
        _print_top(tt, str(file))
    if plot:
        plot_top_tokens(tt, plot)


@app.command()
def version() -> None:
    """Print the versions of deft and its native core."""
    import deft
    from deft import _native

    typer.echo(f"deft {deft.__version__} (native core {_native.__version__})")


@app.command()
@_friendly_errors
def train(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="Training YAML, e.g. configs/deft-dpo.yaml (keys: python/deft/config.py)."),
    set_: List[str] = typer.Option([], "--set", help="Override a config key, KEY=VALUE with VALUE parsed as YAML, e.g. --set train.lr=1e-6 --set deft.enabled=false; repeatable."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in train.output_dir from its newest checkpoint (same data order and RNG state)."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Load a policy whose weights are only pickles (pytorch_model.bin), which can run code when loaded; only for files you trust (same as --set allow_pickle=true)."),
    local_rank: Optional[int] = typer.Option(None, "--local_rank", "--local-rank", hidden=True, help="Set by the deepspeed launcher."),
) -> None:
    """Fine-tune a causal LM on level-A samples with L = L_m - omega * R_dis (DEFT) or the plain baseline."""
    import os

    from deft.train import run

    if local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(local_rank))
    res = run(str(config) if config is not None else None, [*set_, "allow_pickle=true"] if allow_pickle else set_, resume=resume)
    if int(os.environ.get("RANK", "0")) == 0:
        m = res.last_metrics
        console.print(
            f"trained {res.global_step}/{res.total_steps} steps"
            + (f" (resumed from step {res.resumed_from})" if res.resumed_from else "")
            + (f"; last loss {m['loss']:.4f}" if "loss" in m else "")
            + f" -> {res.model_dir}; metrics {res.output_dir / 'metrics.jsonl'}"
        )


@app.command()
@_friendly_errors
def select(
    input: List[Path] = typer.Option(..., "--input", "-i", help="Preference file(s) in any supported format, a datasets save_to_disk folder, or hf:NAME[:CONFIG][:SPLIT] read from the local Hugging Face datasets cache."),
    output: Path = typer.Option(..., "--output", "-o", help="Selected pairs (canonical): .parquet, .jsonl or .jsonl.gz. NAME.selection.parquet, NAME.manifest.json and NAME.similarity.png go beside it."),
    strategy: str = typer.Option(..., "--strategy", "-s", help="easy (least similar pairs), hard (most similar), random, centroid (per prompt: the responses nearest the two k-means centroids)."),
    fraction: float = typer.Option(0.5, "--fraction", help="Share of the prompts kept, in (0, 1]; 1 keeps one pair for every prompt."),
    seed: int = typer.Option(0, "--seed", help="Seed of random and centroid."),
    orient: str = typer.Option("rank", "--orient", help="Which response of a chosen pair goes first: rank (the human order, else the higher score) or score (the higher score, else the human order)."),
    embedder: str = typer.Option("builtin", "--embedder", "-e", help="builtin (all-MiniLM-L6-v2, offline), or a Hugging Face model folder / hub name: an encoder or a causal LM (its base model)."),
    context: bool = typer.Option(True, "--context/--no-context", help="Feed the conversation before the response to the embedder (REAL); only response tokens are pooled either way."),
    template: str = typer.Option("auto", "--template", help="Causal-LM embedders: prompt rendering as deft train does it: auto, chat, plain."),
    max_length: Optional[int] = typer.Option(None, "--max-length", help="Input tokens per response (default: 256 for builtin, else min(512, the model's positions)); the context is cut from the left."),
    batch_size: int = typer.Option(64, "--batch-size", help="Responses per forward pass (length-sorted)."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)."),
    plot: bool = typer.Option(False, "--plot", help="Write NAME.similarity.png: histogram of the chosen pairs' similarity, all prompts and kept ones."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing outputs."),
    fmt: str = typer.Option("auto", "--format", help="Input format: auto, hh, pairs, pro, ranked, canonical."),
    subset: Optional[str] = typer.Option(None, "--subset", help="Subset name for rows that carry none (default: from the file name)."),
    on_error: str = OnError,
    rejects: Optional[Path] = typer.Option(None, "--rejects", help="Where skipped rows go with --on-error skip (default: NAME.rejects.jsonl beside the output)."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow the embedder's own Python code (off by default)."),
    config: Optional[Path] = ConfigOption,
) -> None:
    """Select training pairs by response-embedding similarity (REAL): one pair per prompt, then a fraction of the prompts."""
    from deft.select import select_files

    res = select_files(
        input, output, strategy=strategy, fraction=fraction, seed=seed, orient=orient, embedder=embedder,
        with_context=context, template=template, batch_size=batch_size, max_length=max_length, device=device,
        plot=plot, overwrite=overwrite, format=fmt, subset=subset, on_error=on_error, rejects=rejects,
        trust_remote_code=trust_remote_code, progress=sys.stderr.isatty(),
    )
    if res.n_rejected:
        err_console.print(f"[yellow]skipped {res.n_rejected} bad rows[/]; see {res.rejects_path}", highlight=False)
    t = Table(title=f"{strategy}: kept {res.n_kept:,} of {res.n_candidates:,} prompts -> {res.output_path}", title_justify="left")
    cols = ["count", "mean", "min", "p10", "p25", "p50", "p75", "p90", "max"]
    t.add_column("cosine similarity")
    for col in cols:
        t.add_column(col, justify="right")
    for name, label in (("all_pairs", "all pairs"), ("candidates", "chosen pair per prompt"), ("kept", "kept")):
        q = res.similarity[name]
        t.add_row(label, *[(f"{q[c]:,}" if c == "count" else f"{q[c]:.3f}") if c in q else "-" for c in cols])
    console.print(t)
    if res.n_no_pair:
        console.print(f"{res.n_no_pair:,} prompts had no pair of distinct responses and were dropped")
    emb = res.embedding or {}
    if emb:
        console.print(f"embedded {emb['responses']:,} responses in {emb['seconds']:.1f} s ({emb['responses_per_s']:,.1f}/s, {res.embedder['name']})")
    console.print(f"selection: {res.selection_path}; manifest: {res.manifest_path}" + (f"; plot: {res.plot_path}" if res.plot_path else ""))


@app.command("export")
@_friendly_errors
def export_cmd(
    input: Path = typer.Option(..., "--input", "-i", help="A graded.parquet of `deft grade`, the output of `deft select`, or any preference file or dataset source deft reads (a save_to_disk folder, hf:NAME[:CONFIG][:SPLIT])."),
    output: Path = typer.Option(..., "--output", "-o", help="pairs.parquet (trl), pairs.jsonl / .jsonl.gz (jsonl) or a folder name (hf); NAME.manifest.json goes beside it."),
    fmt: Optional[str] = typer.Option(None, "--format", "-f", help="trl: a Parquet file of TRL prompt/chosen/rejected records; jsonl: the same as JSON Lines; hf: the same as a datasets save_to_disk folder (default: from the output name)."),
    levels: List[str] = typer.Option([], "--levels", "-l", help="Levels of a graded.parquet to export: --levels A, --levels A,B (default: every sample)."),
    pairs: str = typer.Option("best-worst", "--pairs", help="best-worst: one pair per sample, its best response against its worst (what deft train trains DPO on); all: every strictly preferred pair of a sample."),
    style: str = typer.Option("conversational", "--style", help="conversational: prompt as chat messages, chosen/rejected one assistant message each (TRL applies the chat template); standard: plain HH text, prompt ending in 'Assistant:' and ' response'."),
    on_error: str = OnError,
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output and its manifest."),
    config: Optional[Path] = ConfigOption,
) -> None:
    """Write a graded or selected set (e.g. level A) as TRL-ready prompt/chosen/rejected pairs: Parquet, JSON Lines or a save_to_disk folder."""
    from deft.export import export_files

    res = export_files(input, output, format=fmt, levels=levels or None, pairs=pairs, style=style, on_error=on_error,
                       overwrite=overwrite)
    c = res.counts
    if c.get("rejected"):
        err_console.print(f"[yellow]skipped {c['rejected']} bad rows[/] (--on-error skip)", highlight=False)
    console.print(f"exported {c['pairs']:,} pairs from {c['samples']:,} samples"
                  + (f" ({c['no_preference']:,} without a preference left out)" if c["no_preference"] else "")
                  + f" -> {res.output_path}; manifest: {res.manifest_path}")


@app.command("eval")
@_friendly_errors
def eval_(
    model: List[str] = typer.Option([], "--model", help="Policy to evaluate: a local Hugging Face model folder (e.g. runs/x/train/model) or a hub id; repeat for several (one table row each)."),
    data: List[Path] = typer.Option([], "--data", "-d", help="Test file(s): any format `deft.data.load` reads (e.g. ../shared/data/pro-hh/test_harmless_base.jsonl.gz), or an MT-Bench question.jsonl."),
    output_dir: Path = typer.Option(Path("runs/eval"), "--output-dir", "-o", help="Folder for eval.json, eval.md, manifest.json, metrics.jsonl and one folder per model."),
    reward_model: str = typer.Option("builtin", "--reward-model", help="builtin (offline), or a Hugging Face sequence-classification reward model: hub name or local path (as in deft grade)."),
    reward_template: str = typer.Option("auto", "--reward-template", help="How (context, response) is shown to a Hugging Face reward model: auto, oasst, chat, plain (the builtin reward model has its own fixed input and ignores it)."),
    template: str = typer.Option("auto", "--template", help="Prompt template: auto (the one `deft train` recorded for the model, else chat if the tokenizer has a chat template, else plain), chat, plain."),
    baseline: Optional[str] = typer.Option(None, "--baseline", help="Win/tie/lose against: the --name of another evaluated model, another eval output folder (or a run folder in it), or a generations/samples file."),
    name: List[str] = typer.Option([], "--name", help="Run name for each --model, in order (default: the model folder's name; `x` for runs/x/train/model)."),
    gguf_file: Optional[str] = typer.Option(None, "--gguf-file", help="GGUF file inside the model folder / repo to load (dequantised by transformers), e.g. for SmolLM2 GGUF releases."),
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer", help="Tokenizer folder or hub id when it is not the model's own."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", help="New tokens per generation (greedy)."),
    max_prompt_length: int = typer.Option(384, "--max-prompt-length", help="Prompt tokens kept (left-truncated), as in training."),
    batch_size: int = typer.Option(8, "--batch-size", help="Prompts per generation batch (left-padded)."),
    reward_batch_size: Optional[int] = typer.Option(None, "--reward-batch-size", help="Pairs per reward-model batch (default: from a token budget)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Evaluate only the first N rows of each subset (and the first N MT-Bench questions)."),
    tie_margin: float = typer.Option(1.0, "--tie-margin", help="Win/tie/lose: reward difference (points on the 0-100 scale) up to which a prompt is a tie."),
    mt_bench_max_new_tokens: int = typer.Option(1024, "--mt-bench-max-new-tokens", help="New tokens per MT-Bench turn (FastChat's default 1024)."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float32, bfloat16, float16 (default: bfloat16 on CUDA, float32 on CPU)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Discard generations stored in OUTPUT_DIR instead of resuming from them."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bars on stderr."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow the models' own Python code (off by default)."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Load policies whose weights are only pickles (pytorch_model.bin), which can run code when loaded; only for files you trust (refused by default; safetensors and GGUF need no flag)."),
    config: Optional[Path] = ConfigOption,
) -> None:
    """Generate greedily on test prompts and report BLEU and reward per subset (the PRO/DEFT Table 2), win/tie/lose against a baseline, and MT-Bench answers."""
    from deft.evaluate import evaluate

    report = evaluate(
        model, data, output_dir, reward_model=reward_model, reward_template=reward_template, template=template,
        baseline=baseline, max_new_tokens=max_new_tokens, max_prompt_length=max_prompt_length, batch_size=batch_size,
        reward_batch_size=reward_batch_size, limit=limit, tie_margin=tie_margin, device=device, dtype=dtype,
        gguf_file=gguf_file, tokenizer=tokenizer, model_names=name or None, trust_remote_code=trust_remote_code,
        allow_pickle=allow_pickle, mt_bench_max_new_tokens=mt_bench_max_new_tokens, overwrite=overwrite, progress=progress,
    )
    if report.subsets:
        header, rows = report.table()
        t = Table(title=f"BLEU (PRO-compatible, x100) and reward (100*sigmoid) -> {report.eval_md}", title_justify="left")
        for i, h in enumerate(header):
            t.add_column(h, justify="left" if i == 0 else "right")
        for row in rows:
            t.add_row(*row)
        console.print(t)
    for r in report.runs:
        w = r.win_tie_lose
        if w is not None:
            console.print(f"{r.name} vs {w.baseline}: win {w.win} ({w.win_rate:.1%}), tie {w.tie} ({w.tie_rate:.1%}), "
                          f"lose {w.lose} ({w.lose_rate:.1%}) on {w.n} prompts (tie margin {w.tie_margin:g})")
        if r.mt_bench_path is not None:
            console.print(f"{r.name}: MT-Bench answers for {r.mt_bench_questions} questions -> {r.mt_bench_path}")
    for note in report.notes:
        err_console.print(f"[yellow]note:[/] {note}", highlight=False)
    console.print(f"eval.json: {report.eval_json}; manifest: {report.manifest}; metrics: {report.metrics}")


@app.command("run")
@_friendly_errors
def run_cmd(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="Pipeline YAML, e.g. configs/pipeline/hh-deft-dpo.yaml (keys: python/deft/pipeline.py and python/deft/config.py)."),
    set_: List[str] = typer.Option([], "--set", help="Override a config key, KEY=VALUE (VALUE parsed as YAML), e.g. --set model=PATH --set deft.omega=0; repeatable."),
    from_stage: Optional[str] = typer.Option(None, "--from", help="Rerun this stage and every later one even if up to date: select, grade, distribution, train, eval."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Only print what each stage would do (skip, resume, run) and why."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Train and evaluate a policy whose weights are only pickles (pytorch_model.bin), which can run code when loaded; only for files you trust (same as --set allow_pickle=true)."),
) -> None:
    """Run the whole workflow (select -> grade -> distribution -> train -> eval -> report.md) from one config; rerunning resumes."""
    from deft.pipeline import load_pipeline_config, run_pipeline

    if allow_pickle:
        set_ = [*set_, "allow_pickle=true"]
    cfg = load_pipeline_config(str(config) if config is not None else None, set_)
    if dry_run:
        from deft.pipeline import plan_pipeline

        for p in plan_pipeline(cfg, from_stage=from_stage):
            console.print(f"{p['stage']:<13} {p['action']:<9} {p['reason']}")
        return
    res = run_pipeline(cfg, from_stage=from_stage, config_path=str(config) if config else None, overrides=set_,
                       on_stage=lambda r: console.print(f"[bold]{r.name}[/bold]: {r.action} ({r.seconds:.1f} s) -> {r.folder}"))
    t = Table(title=f"deft run: {res.run_dir}", title_justify="left")
    for col in ("stage", "action", "seconds", "folder"):
        t.add_column(col, justify="right" if col == "seconds" else "left")
    for r in res.stages:
        t.add_row(r.name, r.action, f"{r.seconds:.1f}", str(r.folder))
    console.print(t)
    console.print(f"report: {res.report}")


@app.command("experiment")
@_friendly_errors
def experiment_cmd(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="Experiment YAML, e.g. configs/experiments/hh-mini-cpu.yaml (keys: python/deft/experiment.py)."),
    set_: List[str] = typer.Option([], "--set", help="Override a config key, KEY=VALUE (VALUE parsed as YAML), e.g. --set experiment.seeds=[0]; repeatable."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show the progress bar over the whole experiment."),
) -> None:
    """Compare arms (base model, plain method, DEFT, ablations) over seeds on a held-out split: experiment.md with 95% intervals and verdicts; rerunning resumes."""
    from deft.experiment import load_experiment_config, run_experiment

    cfg = load_experiment_config(str(config) if config is not None else None, set_)
    res = run_experiment(cfg, config_path=str(config) if config else None, overrides=set_, progress=progress)
    console.print(res.markdown.read_text(encoding="utf-8"), markup=False, highlight=False)
    console.print(f"experiment: {res.markdown} ({res.json})")


def _take_local_rank(argv: List[str]) -> List[str]:
    """Remove ``--local_rank=N`` / ``--local-rank N`` (which the ``deepspeed``
    launcher puts before the subcommand: ``python -m deft --local_rank=0 train
    ...``) and export it as ``LOCAL_RANK``."""
    import os

    out: List[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a.startswith(("--local_rank=", "--local-rank=")):
            os.environ.setdefault("LOCAL_RANK", a.split("=", 1)[1])
        elif a in ("--local_rank", "--local-rank") and i + 1 < len(argv):
            os.environ.setdefault("LOCAL_RANK", argv[i + 1])
            i += 1
        else:
            out.append(a)
        i += 1
    return out


def main() -> None:
    sys.argv[1:] = _take_local_rank(sys.argv[1:])
    app()


if __name__ == "__main__":
    main()
