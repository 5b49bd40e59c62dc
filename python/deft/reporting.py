"""Where `deft train` reports its metrics besides ``metrics.jsonl``:
TensorBoard, Weights & Biases and MLflow (``train.report_to``), and the
training-curve plot (``OUTPUT_DIR/curves.png``).

Every backend gets the same names, :func:`metric_name` of the
``metrics.jsonl`` keys: a key with a slash as it is (``rewards/margins``,
``eval/accuracy``), any other under ``train/`` (``loss`` -> ``train/loss``),
at the row's ``step`` (the optimizer step; the evaluation before training is
step 0). The backends are imported only when requested; a requested backend
that is not installed is a :class:`deft.config.ConfigError` when the config is
validated (:func:`check_installed`).

Resuming (``--resume`` from a checkpoint at step S): TensorBoard purges the
events after S and logs them again; the W&B run and the MLflow run of
``OUTPUT_DIR/reporting.json`` are continued, and steps the interrupted
process had already sent them (up to the last step of its ``metrics.jsonl``)
are not sent twice. A run that starts over gets new runs.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

__all__ = ["BACKENDS", "metric_name", "requested_backends", "check_installed", "Reporter", "plot_curves", "read_metrics"]

BACKENDS = ("tensorboard", "wandb", "mlflow")
#: The module each backend imports, and how to install it.
PACKAGES = {"tensorboard": ("tensorboard", "pip install tensorboard"), "wandb": ("wandb", "pip install wandb"),
            "mlflow": ("mlflow", "pip install mlflow (or mlflow-skinny)")}
STATE_FILE = "reporting.json"
#: Row fields that are not metrics.
NOT_METRICS = ("step", "time")


def metric_name(key: str) -> str:
    """The name every backend reports ``metrics.jsonl`` key ``key`` under."""
    return key if "/" in key else f"train/{key}"


def requested_backends(train_cfg: Mapping[str, Any]) -> List[str]:
    """``train.report_to``, with ``tensorboard`` added for the deprecated
    ``train.tensorboard: true``; in order, each once."""
    out: List[str] = []
    for b in list(train_cfg.get("report_to") or []) + (["tensorboard"] if train_cfg.get("tensorboard") else []):
        if b not in out:
            out.append(b)
    return out


def check_installed(backends: Sequence[str]) -> None:
    """Raise a one-line ConfigError for an unknown or missing backend."""
    from deft.config import ConfigError

    for b in backends:
        if b not in PACKAGES:
            raise ConfigError(f"train.report_to: {b!r} is not one of {', '.join(BACKENDS)}")
        mod, pip = PACKAGES[b]
        if importlib.util.find_spec(mod) is None:
            raise ConfigError(f"train.report_to: {b} needs the {mod} package, which is not installed ({pip})")


def _metrics(row: Mapping[str, Any]) -> Dict[str, float]:
    out = {}
    for k, v in row.items():
        if k in NOT_METRICS or v is None or isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        out[metric_name(k)] = float(v)
    return out


def _flatten(d: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


class Reporter:
    """Fans each metrics row out to the requested backends (rank 0 only:
    the others pass ``backends=()``). ``resume_from`` is the checkpoint step
    the run continues from (None: a new run); ``sent_through`` the last step
    the earlier process logged (W&B and MLflow skip rows up to it)."""

    def __init__(self, backends: Sequence[str], out_dir: Path, cfg: Mapping[str, Any], *, resume_from: Optional[int] = None,
                 sent_through: int = 0):
        self.backends = list(backends)
        self.out_dir = Path(out_dir)
        self.skip_through = sent_through if resume_from else -1
        self.tb = self.wandb_run = None
        self.mlflow: Optional[Dict[str, Any]] = None
        self.record: Dict[str, Any] = {}
        if not self.backends:
            return
        prev: Dict[str, Any] = {}
        sf = self.out_dir / STATE_FILE
        if resume_from and sf.exists():
            try:
                prev = json.loads(sf.read_text(encoding="utf-8"))
            except ValueError:
                prev = {}
        try:
            if "tensorboard" in self.backends:
                self._open_tensorboard(resume_from or 0)
            if "wandb" in self.backends:
                self._open_wandb(cfg, (prev.get("wandb") or {}).get("id"))
            if "mlflow" in self.backends:
                self._open_mlflow(cfg, prev.get("mlflow") or {})
        except BaseException:
            self.close(failed=True)
            raise
        from deft.io import write_json_atomic

        write_json_atomic(sf, self.record)

    # ----- backends

    def _open_tensorboard(self, start: int) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ImportError(f"train.report_to tensorboard needs the tensorboard package (pip install tensorboard): {e}") from None
        # events an interrupted run logged after the step this one starts from are purged
        self.tb = SummaryWriter(log_dir=str(self.out_dir / "tensorboard"), purge_step=start + 1)
        self.record["tensorboard"] = {"log_dir": str(self.out_dir / "tensorboard")}

    def _open_wandb(self, cfg: Mapping[str, Any], run_id: Optional[str]) -> None:
        import wandb

        wdir = Path(os.environ.get("WANDB_DIR") or self.out_dir)
        wdir.mkdir(parents=True, exist_ok=True)
        kw: Dict[str, Any] = {"id": run_id, "resume": "allow"} if run_id else {}
        self.wandb_run = wandb.init(project=os.environ.get("WANDB_PROJECT") or "deft", name=self.out_dir.name, dir=str(wdir),
                                    config=dict(cfg), **kw)
        self.record["wandb"] = {"id": self.wandb_run.id, "project": self.wandb_run.project, "dir": str(wdir),
                                "mode": os.environ.get("WANDB_MODE") or "online"}

    def _open_mlflow(self, cfg: Mapping[str, Any], prev: Mapping[str, Any]) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            uri = (self.out_dir / "mlruns").resolve().as_uri()
            # MLflow >= 3.8 refuses the file store (in maintenance) unless this opts in; it stays a local folder of files
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        client = MlflowClient(tracking_uri=uri)
        run_id = prev.get("run_id") if prev.get("tracking_uri") == uri else None
        if run_id is not None:
            client.update_run(run_id, status="RUNNING")
        else:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "deft"
            exp = client.get_experiment_by_name(name)
            exp_id = exp.experiment_id if exp is not None else client.create_experiment(name)
            run_id = client.create_run(exp_id, run_name=self.out_dir.name).info.run_id
            params = [Param(k, json.dumps(v) if not isinstance(v, str) else v)
                      for k, v in sorted(_flatten(cfg).items())]
            params = [Param(p.key, p.value[:500]) for p in params]
            for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
                client.log_batch(run_id, params=params[i:i + 100])
            client.log_dict(run_id, json.loads(json.dumps(dict(cfg), default=str)), "config.json")
        self.mlflow = {"client": client, "run_id": run_id}
        self.record["mlflow"] = {"tracking_uri": uri, "run_id": run_id}

    # ----- logging

    def log(self, row: Mapping[str, Any]) -> None:
        """Report one ``metrics.jsonl`` row (its ``step`` is the x axis)."""
        if not self.backends:
            return
        step = int(row["step"])
        mets = _metrics(row)
        if self.tb is not None:
            for k, v in mets.items():
                self.tb.add_scalar(k, v, step)
            self.tb.flush()
        if step <= self.skip_through:  # the interrupted process sent this step already
            return
        if self.wandb_run is not None:
            self.wandb_run.log(mets, step=step)
        if self.mlflow is not None:
            from mlflow.entities import Metric

            ts = int(time.time() * 1000)
            ms = [Metric(k, v, ts, step) for k, v in mets.items() if math.isfinite(v)]
            for i in range(0, len(ms), 1000):
                self.mlflow["client"].log_batch(self.mlflow["run_id"], metrics=ms[i:i + 1000])

    def close(self, failed: bool = False) -> None:
        """Flush and close every backend (``failed``: the run raised)."""
        tb, run, ml = self.tb, self.wandb_run, self.mlflow
        self.tb = self.wandb_run = self.mlflow = None
        if tb is not None:
            tb.close()
        if run is not None:
            run.finish(exit_code=1 if failed else 0)
        if ml is not None:
            ml["client"].set_terminated(ml["run_id"], status="FAILED" if failed else "FINISHED")

    def __enter__(self) -> "Reporter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(failed=exc_type is not None)


# ---------------------------------------------------------------------------
# the training curves


def read_metrics(path: Path) -> List[Dict[str, Any]]:
    """The rows of a ``metrics.jsonl`` (lines a kill cut short are skipped)."""
    rows = []
    p = Path(path)
    if not p.exists():
        return rows
    for line in p.read_text(encoding="utf-8").splitlines():
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if isinstance(r, dict) and "step" in r:
            rows.append(r)
    return rows


def plot_curves(metrics_path: Path, out_path: Path) -> Path:
    """``out_path`` (PNG): the training loss, and -- when the run evaluated an
    eval split -- its preference accuracy and implicit-reward margin, against
    the optimizer step, from a run's ``metrics.jsonl``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from deft.io import atomic_path

    rows = read_metrics(metrics_path)
    train = [r for r in rows if r.get("loss") is not None]
    ev = [r for r in rows if r.get("eval/accuracy") is not None]
    panels = [("loss", train, "training loss")]
    if ev:
        panels += [("eval/accuracy", ev, "eval preference accuracy"), ("eval/margin", ev, "eval implicit-reward margin")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (key, rs, title) in zip(axes[0], panels):
        ax.plot([r["step"] for r in rs], [r[key] for r in rs], marker="o" if len(rs) < 30 else None, ms=3)
        if key == "eval/accuracy":
            ax.axhline(0.5, color="grey", lw=0.8, ls="--")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out_path = Path(out_path)
    with atomic_path(out_path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return out_path
