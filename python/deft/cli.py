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

app = typer.Typer(
    name="deft",
    help="Data-efficient preference alignment: grade data with a reward model, "
    "build the discrepancy distribution, fine-tune with DEFT, evaluate.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err_console = Console(stderr=True)
console = Console()

F = TypeVar("F", bound=Callable[..., Any])


def _friendly_errors(fn: F) -> F:
    """Report expected errors as one line and exit 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from deft.data import DataError

        try:
            return fn(*args, **kwargs)
        except (DataError, FileNotFoundError, FileExistsError, ValueError, TypeError) as e:
            msg = str(e) if not isinstance(e, FileNotFoundError) or not e.filename else f"no such file: {e.filename}"
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
    input: List[Path] = typer.Option(..., "--input", "-i", help="Preference file(s): .jsonl, .jsonl.gz, .json or .parquet, any supported format."),
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


@app.command()
def version() -> None:
    """Print the versions of deft and its native core."""
    import deft
    from deft import _native

    typer.echo(f"deft {deft.__version__} (native core {_native.__version__})")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
