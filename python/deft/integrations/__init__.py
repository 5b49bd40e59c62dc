"""deft inside other trainers.

``deft.integrations.trl``: :class:`DeftDPOTrainer`, TRL's ``DPOTrainer`` with
``-omega * R_dis`` added to its loss (needs TRL: ``pip install "deft[trl]"``).

Importing this package imports no trainer library; ``from deft.integrations
import DeftDPOTrainer`` imports TRL then, and without it raises an ImportError
that says what to install.
"""

from __future__ import annotations

from typing import Any

__all__ = ["DeftDPOTrainer"]


def __getattr__(name: str) -> Any:
    if name == "DeftDPOTrainer":
        from deft.integrations.trl import DeftDPOTrainer

        return DeftDPOTrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
