"""Canonical preference data: reading, validating and saving.

Every preference dataset deft works with is turned into one Polars frame with
the *canonical schema* below, whatever the source format. Readers never drop a
record silently: a bad record either raises :class:`DataError` (``on_error=
"raise"``, the default) or is skipped and reported as a :class:`Reject`
(``on_error="skip"``), optionally written to a rejects file. Records that load
under a documented, non-obvious interpretation are reported as :class:`Note`.

Canonical schema
================
One row per prompt, columns in this order (see :data:`SCHEMA`):

``id`` (Utf8)
    The record's own ``id`` field (a string or an integer, converted to str)
    when present and not null, else ``"{file name}:{line}"`` (basename of the
    file, 1-based record number). Unique within one load (also across the files
    of :func:`load_many`); a duplicated id is a row error on field ``id``.
``subset`` (Utf8)
    The record's ``subset`` field, else the ``subset=`` argument, else derived
    from the file name by :func:`derive_subset` (``harmless-base-test.jsonl.gz``,
    ``test_harmless_base.jsonl.gz`` and ``harmless-base/train.jsonl.gz`` all
    give ``harmless_base``).
``context`` (List(Struct{role: Utf8, content: Utf8}))
    The conversation before the responses. Roles are ``system``, ``user`` and
    ``assistant`` (HH ``Human``/``Assistant``, OpenAssistant/PRO
    ``<|prompter|>``/``<|assistant|>``/``<|system|>``, chat messages
    ``user``/``assistant``/``system``). The last turn is normally a user turn;
    no empty assistant turn is appended (the PRO generation slot is dropped).
``responses`` (List(Utf8))
    At least two responses, stored as given (except that the single space after
    HH's ``Assistant:`` marker is removed). A response must be non-empty after
    ``strip()`` -- except that the HH and PRO sources encode an assistant reply
    that says nothing as an empty final turn (4 rows in each of the real HH/PRO
    test files), so for the ``hh``, ``pro`` and ``canonical`` formats empty
    responses are kept and reported as a :class:`Note`; see
    ``allow_empty_responses`` of :func:`load`.
``scores`` (List(Float64), nullable)
    One finite score per response, or null for the whole row when the source
    has no scores. Never used to reorder responses here.
``ranked`` (Boolean)
    True when the responses are in preference order, best first: HH and
    TRL chosen/rejected, PRO suffixes, ranked lists (unless the record says
    ``"ranked": false``).
``source_file`` (Utf8), ``source_line`` (Int64)
    Where the row came from: the path as given, and the 1-based line (JSONL),
    element index (JSON array) or row (Parquet).
``meta`` (Utf8, nullable)
    JSON text of the source fields that were not used (e.g. PRO's ``meta`` and
    ``sft_index``), or null when there are none.

Input formats
=============
Detected from the fields of the first record (``format="auto"``) or forced:

``hh``
    Raw HH-RLHF transcripts ``{"chosen": str, "rejected": str}``; see
    :func:`deft.data.formats.hh._split_hh` for how they are split into context and responses.
``pairs``
    TRL preference pairs ``{"prompt", "chosen", "rejected"}``; each value is a
    string or a list of ``{"role", "content"}`` messages. Without ``prompt``
    ("implicit prompt"), ``chosen``/``rejected`` are whole conversations split
    at their final assistant message; their contexts must match. Optional
    ``score_chosen``/``score_rejected`` become ``scores``.
``pro``
    PRO ranking data ``{"prefix": [[turn, ...], ...], "suffix": [r1, r2, ...],
    "reward": [...], ...}`` with ``<|prompter|>``/``<|assistant|>`` tagged turns.
``ranked``
    ``{"prompt": str | [messages]}`` or ``{"messages": [messages]}`` with
    ``"responses": [str, ...]``, optional ``"scores"`` and ``"ranked"``.
``canonical``
    A file already in the canonical schema (``context`` and ``responses``);
    ``id``, ``subset``, ``scores``, ``meta``, ``source_file``/``source_line``
    may be omitted (defaults as above).

Containers: ``.jsonl``, ``.jsonl.gz``, ``.json`` / ``.json.gz`` (a top-level
array of objects; a ``.json`` file whose first character is ``{`` is read as
JSON Lines, as written by Hugging Face ``datasets``) and ``.parquet``; and
Hugging Face datasets (:mod:`deft.data.hf`): a ``datasets.Dataset`` or
one-split ``DatasetDict``, a ``save_to_disk`` folder, and
``hf:NAME[:CONFIG][:SPLIT]`` read from the local datasets cache, row by row
like a Parquet file's (the 1-based row is the line). Text is
decoded as UTF-8 line by line (a UTF-8 BOM is accepted), so an undecodable
line is reported with its number and can be skipped; blank lines are ignored.

Large ``pro``, ``hh`` and ``canonical`` files are read by a vectorised fast
path (pyarrow's JSON reader, Polars expressions) that gives exactly what the
record-by-record reader gives and hands anything unusual -- an error, a skipped
record, an odd shape -- to it; set ``DEFT_LOADER=rows`` to always read record
by record.

Prompt rendering (:func:`render_hh`, :func:`render_oasst`, :func:`render_chat`)
lives in :mod:`deft.render` and is re-exported here.

Modules
=======
Everything above is importable from ``deft.data``; the package's modules own:

``schema``
    :data:`SCHEMA`, :data:`ROLES`, the Arrow form of the schema, canonical
    frames from Python columns, :func:`validate_frame`.
``results``
    :class:`DataError`, :class:`Reject`, :class:`Note`, :class:`LoadResult`,
    and the row parsers' ``_RowError``.
``fields``
    the checks of one record's fields that the row parsers share (types,
    required fields, scores, chat messages).
``containers``
    file extensions, :func:`derive_subset`, reading ``.jsonl``/``.json``/
    ``.parquet`` files (plain or gzip) into records.
``registry``
    the registry of input formats (``register_format``), what a format
    provides (row parser, detection rule, optional fast reader),
    :func:`detect_format`.
``formats``
    one module per input format (``hh``, ``pairs``, ``pro``, ``ranked``,
    ``canonical``), each registering itself; :data:`FORMATS`.
``fast``
    the vectorised fast path: reading and decoding the lines, the unused
    fields (``meta``), assembling the frame and its notes; ``DEFT_LOADER``.
``hf``
    Hugging Face dataset sources: :func:`is_dataset_source`, opening a
    Dataset, a ``save_to_disk`` folder or ``hf:...`` from the local cache
    (:func:`hf_cache_dir`), their manifest records.
``loader``
    :func:`load`, :func:`load_many`, :func:`load_frame` (fast path first,
    else record by record), the rejects file, :func:`save`.
"""

from __future__ import annotations

from deft.data.containers import derive_subset
from deft.data.formats import FORMATS
from deft.data.hf import hf_cache_dir, is_dataset_source
from deft.data.loader import load, load_frame, load_many, save
from deft.data.registry import detect_format
from deft.data.results import DataError, LoadResult, Note, Reject
from deft.data.schema import ROLES, SCHEMA, validate_frame
from deft.render import render_chat, render_hh, render_oasst

__all__ = [
    "SCHEMA",
    "FORMATS",
    "ROLES",
    "DataError",
    "Reject",
    "Note",
    "LoadResult",
    "load",
    "load_frame",
    "load_many",
    "save",
    "validate_frame",
    "detect_format",
    "derive_subset",
    "is_dataset_source",
    "hf_cache_dir",
    # re-exported from deft.render
    "render_hh",
    "render_oasst",
    "render_chat",
]
