"""The input formats, one module each; importing one registers it
(:func:`deft.data.registry.register_format`).

==============  ==============================================================
module          format
==============  ==============================================================
``hh``          raw HH-RLHF transcripts (row parser and fast builder)
``pairs``       TRL preference pairs (row parser)
``pro``         PRO ranking data (row parser and fast builder)
``ranked``      a prompt or messages with ranked responses (row parser)
``canonical``   the canonical schema itself (row parser and fast builder)
==============  ==============================================================

A new format is a new module here that calls ``register_format`` (its name,
its fields, a detection rule, a row parser, optionally a
:class:`~deft.data.registry.FastReader`), plus its name in the imports below.
Their order is the order of :data:`FORMATS` (and of the formats an error
message lists); the order in which :func:`deft.data.detect_format` tries them
is each format's ``detect_order``.
"""

from __future__ import annotations

from typing import Tuple

from deft.data.formats import hh  # (in this order: the order of FORMATS)
from deft.data.formats import pairs
from deft.data.formats import pro
from deft.data.formats import ranked
from deft.data.formats import canonical
from deft.data.registry import format_names

__all__ = ["FORMATS", "hh", "pairs", "pro", "ranked", "canonical"]

#: Input formats understood by :func:`deft.data.load` (besides ``"auto"``).
FORMATS: Tuple[str, ...] = format_names()
