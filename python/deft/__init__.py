"""deft: data-efficient preference alignment.

Stages (each an importable module with a plain core function and a thin CLI
command over it): ``deft.data`` (load any preference format into one canonical
Polars frame), ``deft.stats`` (corpus statistics), ``deft.score`` and
``deft.grade`` (reward-model scores, levels A/B/C, Q+/Q-), ``deft.distribution``
(Q_diff), ``deft.train`` (the losses of ``deft.losses`` with R_dis from
``deft.ops``), ``deft.evaluate`` (with ``deft.generation`` and
``deft.eval_metrics``), ``deft.select`` (REAL pair selection), ``deft.pipeline``
(``deft run``) and ``deft.experiment`` (``deft experiment``). Shared homes:
``deft.render`` (every prompt/response template), ``deft._hf`` (model
handling), ``deft.io`` (atomic outputs, manifests), ``deft.config``. The native
core ``deft._native`` does parallel tokenisation, token counting and Q+/Q-
assignment in Rust. The README's "Layout" maps every module to what it owns.
"""

import logging
import sys
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("deft")
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0+unknown"



def _quiet_deepspeed_cpu_notice() -> None:
    """transformers imports DeepSpeed whenever it and accelerate are installed,
    even for runs that never use it (``train.deepspeed: null``, eval, scoring),
    and DeepSpeed then warns "Setting accelerator to CPU. If you have GPU ...
    we were unable to detect it." When torch itself sees no CUDA device the
    CPU is the right answer and the warning is noise: drop exactly that record
    (the filter sits on DeepSpeed's logger before DeepSpeed creates it)."""
    def keep(record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith("Setting accelerator to CPU"):
            return True
        torch = sys.modules.get("torch")
        try:
            return bool(torch is not None and torch.cuda.is_available())
        except Exception:  # pragma: no cover
            return True

    logging.getLogger("DeepSpeed").addFilter(keep)


_quiet_deepspeed_cpu_notice()

__all__ = ["__version__"]
