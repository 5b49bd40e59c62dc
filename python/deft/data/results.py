"""What a load reports: :class:`DataError`, :class:`Reject`, :class:`Note`,
:class:`LoadResult`, and :class:`_RowError`, which the row parsers raise and
the loader turns into a located :class:`DataError`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import polars as pl

from deft.errors import DeftError


def _one_line(text: str) -> str:
    return text.replace("\r", "\\r").replace("\n", "\\n")


def _location(file: str, line: Optional[int], field: Optional[str], reason: str) -> str:
    where = file if line is None else f"{file}:{line}"
    if field is None:
        return f"{where}: {reason}"
    return f"{where}: field '{field}': {reason}"


class DataError(DeftError, ValueError):
    """A problem with input data, located as precisely as possible.

    ``str(err)`` is one line: ``"{file}:{line}: field '{field}': {reason}"``;
    the ``:{line}`` part is left out for file-level errors and the
    ``field '...'`` part when the problem is not about one field (invalid
    JSON, undecodable text, ...).
    """

    def __init__(
        self,
        file: str,
        line: Optional[int],
        field: Optional[str],
        reason: str,
    ) -> None:
        self.file = str(file)
        self.line = line
        self.field = field
        self.reason = _one_line(reason)
        super().__init__(_location(self.file, line, field, self.reason))


@dataclass(frozen=True)
class Reject:
    """A record skipped under ``on_error="skip"``; ``raw`` is its original
    text (JSONL line; JSON text of an array element or Parquet row), or None
    when the line could not be decoded."""

    file: str
    line: Optional[int]
    field: Optional[str]
    reason: str
    raw: Optional[str] = None

    def __str__(self) -> str:
        return _location(self.file, self.line, self.field, self.reason)

    def to_json(self) -> Dict[str, Any]:
        """The record written to a rejects file."""
        return {
            "source_file": self.file,
            "source_line": self.line,
            "field": self.field,
            "reason": self.reason,
            "raw": self.raw,
        }


@dataclass(frozen=True)
class Note:
    """A record that was loaded under a documented but notable interpretation
    (an HH pair split at an earlier shared marker, an empty response kept...)."""

    file: str
    line: Optional[int]
    field: Optional[str]
    reason: str

    def __str__(self) -> str:
        return _location(self.file, self.line, self.field, self.reason)


@dataclass
class LoadResult:
    """What :func:`load` / :func:`load_many` return.

    ``frame`` is canonical (see :data:`SCHEMA`); ``format`` the (detected)
    input format, or ``"mixed"`` for several files of different formats;
    ``n_read`` counts the records read, good and bad; ``rejects`` the skipped
    ones; ``rejects_path`` the rejects file written, if any; ``notes`` the rows
    loaded with a notable interpretation.
    """

    frame: pl.DataFrame
    format: str
    n_read: int
    rejects: List[Reject] = field(default_factory=list)
    rejects_path: Optional[Path] = None
    notes: List[Note] = field(default_factory=list)


class _RowError(Exception):
    """Raised by the row parsers; becomes a :class:`DataError` with the
    record's location."""

    def __init__(self, field: Optional[str], reason: str) -> None:
        super().__init__(reason)
        self.field = field
        self.reason = reason


def _duplicate_notes(responses: Sequence[str], fields: Sequence[Optional[str]]) -> List[Tuple[Optional[str], str]]:
    """A note for each response whose text repeats an earlier one of the same
    sample: kept, but a preference between two copies of one text says
    nothing, and with scores one text can land in both Q+ and Q-
    (`deft grade --drop-duplicates` drops such samples)."""
    first: Dict[str, int] = {}
    out: List[Tuple[Optional[str], str]] = []
    for i, text in enumerate(responses):
        j = first.setdefault(text, i)
        if j != i:
            out.append((fields[i], f"response {i} is the same text as response {j}; kept "
                                   "(`deft grade --drop-duplicates` drops such samples)"))
    return out
