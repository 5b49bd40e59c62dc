"""deft: data-efficient preference alignment.

Stages (each an importable module with a plain core function and a thin CLI
command over it): ``deft.data`` (load any preference format into one canonical
Polars frame), ``deft.stats`` (corpus statistics), and the native core
``deft._native`` (parallel tokenisation and token counting in Rust).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("deft")
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
