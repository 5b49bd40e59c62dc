"""`deft run`: the DEFT workflow from one config, stage by stage, resumable.

Stages run in this order, each into its own folder of ``run_dir``:

=================  =========================================  ==========================================
stage              does                                       leaves
=================  =========================================  ==========================================
``select``         REAL pair selection (only when             ``select/selected.parquet`` (+ sidecar,
                   ``select.enabled``)                        manifest, similarity plot)
``grade``          ``deft grade``: score, levels, Q+/Q-       ``grade/graded.parquet``, ``manifest.json``
``distribution``   ``deft distribution`` for the policy's     ``distribution/qdiff.safetensors``
                   tokenizer and the trainer's template
``train``          ``deft train`` on the graded data          ``train/model/``, ``metrics.jsonl``, ...
``eval``           ``deft eval`` of the trained model (and    ``eval/eval.json``, ``eval.md``, ...
                   the base model as the baseline)
=================  =========================================  ==========================================

and then ``report.md`` (grading summary, top Q_diff tokens, training curves
``train_curves.png``, evaluation table) in ``run_dir``.

A pipeline config is a ``deft train`` config (every key of
:data:`deft.config.SCHEMA`: ``model``, ``data.*``, ``method.*``, ``deft.*``,
``train.*``, ``generation.*``) plus the sections of :data:`PIPELINE_SCHEMA`
(``run_dir``, ``inputs``, ``select``, ``grade``, ``eval``). The pipeline fills
in ``data.graded``, ``deft.distribution`` and ``train.output_dir`` itself.

Resuming: every stage folder holds ``stage.json`` with the stage's
*fingerprint* -- a SHA-256 over its parameters, the SHA-256 of its input files
and the fingerprints of the stages it reads from -- and its status
(``running`` or ``done``). A stage whose ``stage.json`` says ``done`` with the
same fingerprint, and whose outputs exist, is skipped. One that says
``running`` with the same fingerprint was interrupted and is continued (the
trainer from its last checkpoint, scoring from its part files, evaluation from
its generations file). A stage whose fingerprint changed (a parameter, an input
or an upstream stage changed), or any stage at or after ``--from STAGE``, is
cleared and run again. The stages run in the ``deft run`` process, except that
with ``launcher`` (e.g. ``torchrun --nproc_per_node 8``) the train stage runs in
the processes that command starts (it writes ``train/train_config.yaml`` and
runs ``deft train`` under the launcher).
"""

from __future__ import annotations

import copy
import hashlib
import json
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import yaml

# Imported inside the functions that use them, on purpose: deft.train (it imports torch) and matplotlib;
# importing deft stays fast.
from deft._util import md_table
from deft.config import ConfigError, Field, method_fingerprint, read_config
from deft.config import SCHEMA as TRAIN_SCHEMA
from deft.config import validate as validate_train
from deft.distribution import distribution_files
from deft.errors import DeftError
from deft.evaluate import evaluate
from deft.grade import GradeOptions, grade_files
from deft.io import (
    SHA256_MEMO, MetricsLog, atomic_path, interrupted_publication, locked_output, sha256_file_cached,
    write_json_atomic, write_text_atomic,
)
from deft.render import RM_TEMPLATES
from deft.select import select_files

__all__ = ["STAGES", "PIPELINE_SCHEMA", "load_pipeline_config", "plan_pipeline", "run_pipeline", "PipelineResult", "StageResult", "write_report"]

STAGES = ("select", "grade", "distribution", "train", "eval")
STAGE_FILE = "stage.json"

PIPELINE_SCHEMA: Dict[str, Any] = {
    **copy.deepcopy(TRAIN_SCHEMA),
    "run_dir": Field("runs/pipeline", "str", help="every stage writes into a folder of this one"),
    "launcher": Field(None, "str", nullable=True, help="run the train stage in processes started by this command, e.g. "
                                                        "'torchrun --nproc_per_node 8' or 'deepspeed --num_gpus 8'; null: in this process"),
    "inputs": {
        "files": Field([], "list", help="the preference data to grade (any format deft reads)"),
        "on_error": Field("raise", "str", choices=("raise", "skip"), help="skip: bad rows go to grade/rejects.jsonl"),
    },
    "select": {
        "enabled": Field(False, "bool", help="run REAL pair selection before grading"),
        "strategy": Field("easy", "str", choices=("easy", "hard", "random", "centroid")),
        "fraction": Field(0.5, "float"),
        "seed": Field(0, "int"),
        "embedder": Field("builtin", "str", help="builtin (all-MiniLM-L6-v2) or a model folder"),
        "batch_size": Field(64, "int"),
    },
    "grade": {
        "reward_model": Field("builtin", "str", help="builtin, a hub id or a local folder"),
        "template": Field("auto", "str", choices=RM_TEMPLATES),
        "use_input_scores": Field(False, "bool", help="grade with the scores the input carries (PRO reward)"),
        "a": Field(3.73, "float", help="percent of samples in level A"),
        "c": Field(12.5, "float", help="percent of samples in level C"),
        "per_subset": Field(None, "bool", nullable=True, help="grade each subset separately (default: when there are several)"),
        "max_length": Field(1024, "int"),
        "batch_size": Field(None, "int", nullable=True),
        "device": Field(None, "str", nullable=True),
    },
    "eval": {
        "enabled": Field(True, "bool"),
        "files": Field([], "list", help="test data (any format deft reads; MT-Bench question.jsonl too)"),
        "reward_model": Field("builtin", "str"),
        "template": Field("auto", "str", choices=RM_TEMPLATES, help="the reward model's template"),
        "baseline": Field("base", "str", nullable=True, help="base: also evaluate the untrained model and judge against it; "
                                                            "another `deft run` folder (its trained model), an eval folder or generations file; null: none"),
        "max_prompt_length": Field(384, "int"),
        "batch_size": Field(8, "int"),
        "limit": Field(None, "int", nullable=True, help="evaluate the first N prompts of each file"),
        "tie_margin": Field(None, "float", nullable=True, help="reward difference counted as a tie (default: deft eval's)"),
        "device": Field(None, "str", nullable=True),
    },
}

# keys of the train config the pipeline owns
_FILLED = ("data.graded", "deft.distribution", "train.output_dir")


class PipelineError(DeftError, RuntimeError):
    """A stage cannot run as configured."""


def validate(cfg: Mapping[str, Any]) -> None:
    """Cross-field checks of a pipeline config."""
    if not cfg.get("model"):
        raise ConfigError("model: required (the policy to train: a local folder or a hub id)")
    if not cfg["inputs"]["files"]:
        raise ConfigError("inputs.files: required (the preference data to grade)")
    if cfg["eval"]["enabled"] and not cfg["eval"]["files"]:
        raise ConfigError("eval.files: required when eval.enabled is true (or --set eval.enabled=false)")
    if not 0 < cfg["select"]["fraction"] <= 1:
        raise ConfigError(f"select.fraction: must be in (0, 1], got {cfg['select']['fraction']}")
    try:  # the grade stage's options, checked before any stage runs
        GradeOptions(a=cfg["grade"]["a"], c=cfg["grade"]["c"])
    except ValueError as e:
        raise ConfigError(f"grade: {e}") from None
    validate_train(_train_config(cfg, Path(cfg["run_dir"])))


def load_pipeline_config(path: Optional[str], overrides: Sequence[str] = ()) -> Dict[str, Any]:
    """Defaults, the YAML file, then ``--set KEY=VALUE`` overrides; validated."""
    cfg = read_config(path, overrides, PIPELINE_SCHEMA)
    validate(cfg)
    return cfg


# ---------------------------------------------------------------------------
# fingerprints and stage records


def _h(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


#: The file-hash memo (deft.io.SHA256_MEMO) is persisted in RUN_DIR/.hashes.json so that a rerun
#: does not read every weight file again (like make, it trusts size and modification time).
HASH_CACHE = ".hashes.json"


def load_hash_cache(run_dir: Path) -> None:
    try:
        data = json.loads((run_dir / HASH_CACHE).read_text(encoding="utf-8"))
        if isinstance(data, dict):
            SHA256_MEMO.update({str(k): str(v) for k, v in data.items()})
    except (OSError, ValueError):
        pass  # no cache (or a torn one): hash again


def save_hash_cache(run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run_dir / HASH_CACHE, SHA256_MEMO)


def file_hash(path: Any) -> Dict[str, Any]:
    from deft.data.hf import is_dataset_source, source_record

    if is_dataset_source(path):  # a save_to_disk folder, hf:NAME...: its Arrow files' hash
        rec = source_record(path)
        return {"path": rec["path"], "sha256": rec.get("sha256") or rec["fingerprint"]}
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(2, "input file not found", str(p))
    return {"path": str(p), "sha256": sha256_file_cached(p)}


_WEIGHTS = (".safetensors", ".bin", ".gguf", ".pt", ".pth")
_TOKENIZER_FILES = (".json", ".model", ".txt", ".jinja", ".tiktoken")


def spec_hash(spec: Optional[str], *, weights: bool = True, gguf_file: Optional[str] = None) -> Any:
    """A model/tokenizer spec: file hashes when it is a local file or folder
    (config, tokenizer files and, with ``weights``, the weight files), else the
    name (a hub id)."""
    if spec is None:
        return None
    p = Path(spec)
    if p.is_file():
        return file_hash(p)["sha256"]
    if p.is_dir():
        suffixes = _TOKENIZER_FILES + (_WEIGHTS if weights else ())
        names = sorted(f for f in p.iterdir() if f.is_file() and f.suffix in suffixes
                       and (f.suffix != ".gguf" or gguf_file is None or f.name == gguf_file))
        return {f.name: file_hash(f)["sha256"] for f in names}
    return spec if gguf_file is None else f"{spec}:{gguf_file}"


@dataclass
class StageResult:
    name: str
    action: str  # "skipped" | "ran" | "resumed" | "disabled"
    folder: Path
    fingerprint: str
    seconds: float = 0.0
    outputs: Dict[str, str] = field(default_factory=dict)


@dataclass
class PipelineResult:
    run_dir: Path
    stages: List[StageResult]
    report: Optional[Path]


def _read_stage(folder: Path) -> Optional[Dict[str, Any]]:
    p = folder / STAGE_FILE
    if not p.exists():
        return None
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # a torn or foreign file: the stage is redone


def _write_stage(folder: Path, rec: Mapping[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(folder / STAGE_FILE, dict(rec))


def _log(msg: str) -> None:
    print(f"[deft run] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# the stages


def _train_config(cfg: Mapping[str, Any], run_dir: Path) -> Dict[str, Any]:
    """The `deft train` config inside a pipeline config, with the paths the pipeline owns."""
    tcfg = {k: copy.deepcopy(cfg[k]) for k in TRAIN_SCHEMA}
    tcfg["data"]["graded"] = str(run_dir / "grade" / "graded.parquet")
    tcfg["deft"]["distribution"] = str(run_dir / "distribution" / "qdiff.safetensors") if tcfg["deft"]["enabled"] else None
    tcfg["train"]["output_dir"] = str(run_dir / "train")
    return tcfg


def train_fingerprint_config(tcfg: Mapping[str, Any]) -> Dict[str, Any]:
    """A `deft train` config as a training fingerprint sees it: only what can
    change the trained model. The paths the pipeline fills in, progress bars,
    TensorBoard and the other ``train.report_to`` backends, the eval split
    (``train.eval_*``; ``eval_holdout`` only while 0), ``allow_pickle``, ``deft.diagnose_every`` (a measurement)
    and the model card's ``card.*`` are left out; ``method.sft_weight`` is the effective weight; the
    ``omega_share`` keys, and the ``method`` keys of SimPO and KTO, are left
    out while unused and ``method.variant`` while default, so that runs from before they existed keep their
    fingerprints."""
    t = copy.deepcopy(dict(tcfg))
    for key in _FILLED:
        sec, k = key.split(".")
        t[sec][k] = None
    t["train"]["progress"] = t["train"]["tensorboard"] = None
    # measurements: where metrics are reported, the eval split and how often it is evaluated (not in the fingerprint,
    # so runs from before these keys existed keep theirs); a held-out fraction changes the training data and stays
    for k in ("report_to", "eval_data", "eval_max_samples", "eval_steps", "eval_batch_size"):
        t["train"].pop(k, None)
    if not t["train"].get("eval_holdout"):
        t["train"].pop("eval_holdout", None)
    t.pop("allow_pickle", None)
    t.pop("card", None)  # what the model card says, not what is trained
    t["deft"].pop("diagnose_every", None)
    if t["deft"].get("omega_share") is None:
        t["deft"].pop("omega_share", None)
        t["deft"].pop("calibration_batches", None)
    t["method"] = method_fingerprint(t["method"])  # effective sft_weight; unused method keys and a default variant left out
    return t


def _tokenizer_spec(cfg: Mapping[str, Any]) -> str:
    return cfg["tokenizer"] or cfg["model"]


class Stage:
    """One stage: its folder, fingerprint parameters, outputs and how to run it."""

    name: str = ""

    def __init__(self, cfg: Mapping[str, Any], run_dir: Path, upstream: Mapping[str, str]):
        self.cfg, self.run_dir, self.upstream = cfg, run_dir, upstream
        self.folder = run_dir / self.name

    def enabled(self) -> bool:
        return True

    def params(self) -> Dict[str, Any]:
        raise NotImplementedError

    def outputs(self) -> Dict[str, Path]:
        raise NotImplementedError

    def run(self, resume: bool) -> None:
        raise NotImplementedError

    def complete_on_disk(self) -> bool:
        """Whether a run that died after writing everything (but before marking
        stage.json done) left complete outputs (never while :meth:`interrupted`)."""
        return False

    def commit_record(self) -> Optional[Path]:
        """The commit record of the stage's publication (see deft.io), if any."""
        return self.folder / "manifest.json"

    def interrupted(self) -> bool:
        """Whether the folder holds an interrupted publication (its marker is
        there): the outputs are not a complete set, whatever exists."""
        c = self.commit_record()
        return c is not None and interrupted_publication(c)

    def fingerprint(self) -> str:
        return _h({"stage": self.name, "params": self.params(), "upstream": dict(self.upstream)})


class SelectStage(Stage):
    name = "select"

    def enabled(self) -> bool:
        return bool(self.cfg["select"]["enabled"])

    def params(self):
        return {"inputs": [file_hash(p) for p in self.cfg["inputs"]["files"]], "select": self.cfg["select"],
                "embedder": spec_hash(self.cfg["select"]["embedder"]) if self.cfg["select"]["embedder"] != "builtin" else "builtin",
                "on_error": self.cfg["inputs"]["on_error"]}

    def outputs(self):
        return {"selected": self.folder / "selected.parquet"}

    def commit_record(self):
        return self.folder / "selected.manifest.json"

    def run(self, resume: bool) -> None:
        s, i = self.cfg["select"], self.cfg["inputs"]
        select_files(i["files"], self.outputs()["selected"], strategy=s["strategy"], fraction=s["fraction"], seed=s["seed"],
                     embedder=s["embedder"], batch_size=s["batch_size"], plot=True, overwrite=True,
                     on_error=i["on_error"], rejects=self.folder / "rejects.jsonl",
                     trust_remote_code=self.cfg["trust_remote_code"])


class GradeStage(Stage):
    name = "grade"

    def _inputs(self) -> List[str]:
        if self.cfg["select"]["enabled"]:
            return [str(self.run_dir / "select" / "selected.parquet")]
        return list(self.cfg["inputs"]["files"])

    def params(self):
        p = {"grade": self.cfg["grade"], "on_error": self.cfg["inputs"]["on_error"]}
        if not self.cfg["select"]["enabled"]:  # after select, the select fingerprint stands for the inputs
            p["inputs"] = [file_hash(f) for f in self._inputs()]
        if self.cfg["grade"]["reward_model"] != "builtin":
            p["reward_model"] = spec_hash(self.cfg["grade"]["reward_model"])
        return p

    def outputs(self):
        return {"graded": self.folder / "graded.parquet", "manifest": self.folder / "manifest.json"}

    def complete_on_disk(self) -> bool:
        return False  # regrading from the stored scores is cheap

    def run(self, resume: bool) -> None:
        graded = self.outputs()["graded"]
        if resume and graded.exists():
            graded.unlink()  # written, but the stage was not marked done: grade again from the stored scores
        grade_files(self._inputs(), self.folder, self.options())

    def options(self) -> GradeOptions:
        """The grade stage's options from the pipeline config (its ``grade:`` section)."""
        g = self.cfg["grade"]
        return GradeOptions(reward_model=g["reward_model"], template=g["template"], use_input_scores=g["use_input_scores"],
                            a=g["a"], c=g["c"], per_subset=g["per_subset"], max_length=g["max_length"], batch_size=g["batch_size"],
                            device=g["device"], plot=True, on_error=self.cfg["inputs"]["on_error"],
                            rejects=self.folder / "rejects.jsonl", trust_remote_code=self.cfg["trust_remote_code"])


class DistributionStage(Stage):
    name = "distribution"

    def params(self):
        return {"tokenizer": spec_hash(_tokenizer_spec(self.cfg), weights=False), "template": self.cfg["data"]["template"]}

    def outputs(self):
        return {"qdiff": self.folder / "qdiff.safetensors", "top_tokens": self.folder / "top_tokens.json"}

    def commit_record(self):
        # None: stage.json alone says whether the stage finished (distribution_files removes its own marker
        # when done; a kill leaves the stage "running", which reruns it)
        return None

    def run(self, resume: bool) -> None:
        distribution_files(self.run_dir / "grade" / "graded.parquet", _tokenizer_spec(self.cfg), self.outputs()["qdiff"],
                           template=self.cfg["data"]["template"], top=20, plot=self.folder / "top_tokens.png",
                           top_json=self.outputs()["top_tokens"], overwrite=True, trust_remote_code=self.cfg["trust_remote_code"])


class TrainStage(Stage):
    name = "train"

    def params(self):
        tcfg = train_fingerprint_config(_train_config(self.cfg, self.run_dir))
        return {"config": tcfg, "model": spec_hash(self.cfg["model"], gguf_file=self.cfg.get("gguf_file")),
                "tokenizer": spec_hash(self.cfg["tokenizer"], weights=False)}

    def outputs(self):
        return {"model": self.folder / "model", "metrics": self.folder / "metrics.jsonl", "manifest": self.folder / "manifest.json"}

    def complete_on_disk(self) -> bool:
        # a kill between manifest.json and the end of the publication leaves every output and the marker: train
        # again (it completes the publication) rather than mark the stage done with the marker left behind
        return all(p.exists() for p in self.outputs().values()) and not self.interrupted()

    def run(self, resume: bool) -> None:
        tcfg = _train_config(self.cfg, self.run_dir)
        if self.cfg["launcher"]:
            _launch_train(self.cfg["launcher"], tcfg, self.folder, resume)
            return
        from deft.train import train

        train(tcfg, resume=resume)


def launch_command(launcher: str, config_file: Path, resume: bool) -> List[str]:
    """The command that runs `deft train` under ``launcher`` (torchrun and
    ``python -m torch.distributed.run`` take ``-m deft``, the deepspeed launcher
    ``--module deft``)."""
    cmd = shlex.split(launcher)
    if not cmd:
        raise ConfigError("launcher: empty command")
    module_flag = "--module" if Path(cmd[0]).name == "deepspeed" or "deepspeed.launcher.runner" in cmd else "-m"
    return cmd + [module_flag, "deft", "train", "--config", str(config_file)] + (["--resume"] if resume else [])


def _launch_train(launcher: str, tcfg: Mapping[str, Any], folder: Path, resume: bool) -> None:
    config_file = folder / "train_config.yaml"
    write_text_atomic(config_file, yaml.safe_dump(dict(tcfg), sort_keys=False))
    cmd = launch_command(launcher, config_file, resume)
    _log(f"train: {' '.join(cmd)}")
    r = subprocess.run(cmd)
    if r.returncode != 0:
        raise PipelineError(f"the train stage under {launcher!r} exited with status {r.returncode}; rerun `deft run` to resume it")


class EvalStage(Stage):
    name = "eval"

    def enabled(self) -> bool:
        return bool(self.cfg["eval"]["enabled"])

    def params(self):
        e = self.cfg["eval"]
        p = {"eval": e, "generation": self.cfg["generation"], "files": [file_hash(f) for f in e["files"]],
             "template": self.cfg["data"]["template"]}
        if e["baseline"] == "base":
            p["base"] = spec_hash(self.cfg["model"], gguf_file=self.cfg.get("gguf_file"))
        elif e["baseline"]:
            p["baseline"] = spec_hash(e["baseline"])
        if e["reward_model"] != "builtin":
            p["reward_model"] = spec_hash(e["reward_model"])
        return p

    def outputs(self):
        return {"json": self.folder / "eval.json", "markdown": self.folder / "eval.md"}

    def run(self, resume: bool) -> None:
        _run_eval(self.cfg, self.run_dir, self.folder)


def _run_eval(cfg: Mapping[str, Any], run_dir: Path, folder: Path) -> None:
    """Evaluate the trained model (and the base model when eval.baseline is
    ``base``, as the baseline of win/tie/lose) with :func:`deft.evaluate.evaluate`."""
    e = cfg["eval"]
    name = f"{'deft-' if cfg['deft']['enabled'] else ''}{cfg['method']['name']}"
    models, names = [str(run_dir / "train" / "model")], [name]
    gguf: List[Optional[str]] = [None]  # the trained model is saved as safetensors with its tokenizer
    toks: List[Optional[str]] = [None]
    baseline = e["baseline"]
    if baseline == "base":
        models.append(cfg["model"])
        names.append("base")
        gguf.append(cfg.get("gguf_file"))
        toks.append(cfg["tokenizer"])
    kw: Dict[str, Any] = {}
    if e["tie_margin"] is not None:
        kw["tie_margin"] = e["tie_margin"]
    evaluate(models, e["files"], folder, reward_model=e["reward_model"], reward_template=e["template"], baseline=baseline,
             model_names=names, gguf_file=gguf, tokenizer=toks, template=cfg["data"]["template"],
             max_new_tokens=cfg["generation"]["max_new_tokens"], max_prompt_length=e["max_prompt_length"],
             batch_size=e["batch_size"], limit=e["limit"], device=e["device"], trust_remote_code=cfg["trust_remote_code"],
             allow_pickle=cfg["allow_pickle"], progress=cfg["train"]["progress"], **kw)


_STAGE_CLASSES = {"select": SelectStage, "grade": GradeStage, "distribution": DistributionStage, "train": TrainStage, "eval": EvalStage}


# ---------------------------------------------------------------------------
# driver


def _decide(stage: Stage, fp: str, forced: bool) -> str:
    """"skip", "resume" or "run" for a stage with fingerprint ``fp``."""
    rec = _read_stage(stage.folder)
    same = rec is not None and rec.get("fingerprint") == fp and not forced
    if same and rec.get("status") == "done" and all(p.exists() for p in stage.outputs().values()) and not stage.interrupted():
        return "skip"
    if same and (rec.get("status") == "running" or (rec.get("status") == "done" and stage.interrupted())):
        return "resume"  # (done, but an interrupted publication is there: the stage completes it)
    return "run"


def plan_pipeline(cfg: Mapping[str, Any], *, from_stage: Optional[str] = None) -> List[Dict[str, str]]:
    """What :func:`run_pipeline` would do, stage by stage, without doing it:
    ``[{"stage", "action" (skip | resume | run | disabled), "reason"}]``. After
    the first stage that runs, later stages are reported as ``run`` (their
    inputs will be new)."""
    _check_from(from_stage)
    run_dir = Path(cfg["run_dir"])
    load_hash_cache(run_dir)
    upstream: Dict[str, str] = {}
    out: List[Dict[str, str]] = []
    forced = dirty = False
    for name in STAGES:
        stage = _STAGE_CLASSES[name](cfg, run_dir, dict(upstream))
        forced = forced or name == from_stage
        if not stage.enabled():
            out.append({"stage": name, "action": "disabled", "reason": ""})
            continue
        fp = stage.fingerprint()
        action = "run" if dirty else _decide(stage, fp, forced)
        rec = _read_stage(stage.folder)
        reason = ("--from" if forced else "an earlier stage runs" if dirty else
                  "up to date" if action == "skip" else "interrupted" if action == "resume" else
                  "new" if rec is None else "inputs or parameters changed" if rec.get("fingerprint") != fp else "incomplete")
        out.append({"stage": name, "action": action, "reason": reason})
        dirty = dirty or action != "skip"
        upstream[name] = fp
    return out


def _check_from(from_stage: Optional[str]) -> None:
    if from_stage is not None and from_stage not in STAGES:
        raise ConfigError(f"--from {from_stage!r}: not a stage; stages: {', '.join(STAGES)}")


def execute_stage(stage: "Stage", fp: str, forced: bool, upstream: Mapping[str, str],
                  log: Optional[Callable[[str], None]] = None) -> str:
    """Skip, resume or run one stage with fingerprint ``fp`` (see the module
    docstring), keeping its ``stage.json``; returns ``skipped``, ``resumed`` or ``ran``."""
    log = log or _log
    name = stage.name
    outs = stage.outputs()
    decision = _decide(stage, fp, forced)
    t0 = time.perf_counter()
    if decision == "skip":
        log(f"{name}: up to date ({stage.folder})")
        return "skipped"
    resume = decision == "resume"
    if not resume and stage.folder.exists():
        rec = _read_stage(stage.folder)
        why = "--from" if forced else ("its inputs or parameters changed" if rec is not None else "no record of a finished run")
        log(f"{name}: clearing {stage.folder} ({why})")
        shutil.rmtree(stage.folder)
    _write_stage(stage.folder, {"stage": name, "fingerprint": fp, "status": "running", "upstream": dict(upstream),
                                "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    if resume and stage.complete_on_disk():
        log(f"{name}: outputs complete from the interrupted run")
    else:
        log(f"{name}: {'resuming' if resume else 'running'} -> {stage.folder}")
        stage.run(resume)
    missing = [str(p) for p in outs.values() if not p.exists()]
    if missing:
        raise PipelineError(f"stage {name} finished without writing {', '.join(missing)}")
    _write_stage(stage.folder, {"stage": name, "fingerprint": fp, "status": "done", "upstream": dict(upstream),
                                "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                "seconds": round(time.perf_counter() - t0, 3),
                                "outputs": {k: str(p) for k, p in outs.items()}})
    return "resumed" if resume else "ran"


@locked_output("run", lambda a: a["cfg"]["run_dir"])  # RUN_DIR/.deft.lock; each stage locks its own folder
def run_pipeline(cfg: Mapping[str, Any], *, from_stage: Optional[str] = None, config_path: Optional[str] = None,
                 overrides: Sequence[str] = (), on_stage: Optional[Callable[[StageResult], None]] = None) -> PipelineResult:
    """Run (or resume) every stage of a validated pipeline config; write
    report.md. Each stage's action and time is appended to run_dir/pipeline.jsonl."""
    _check_from(from_stage)
    run_dir = Path(cfg["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    load_hash_cache(run_dir)
    metrics = MetricsLog(run_dir / "pipeline.jsonl")
    write_json_atomic(run_dir / "config.json", {"config": dict(cfg), "config_file": config_path, "overrides": list(overrides)})
    upstream: Dict[str, str] = {}
    results: List[StageResult] = []
    forced = False
    for name in STAGES:
        stage = _STAGE_CLASSES[name](cfg, run_dir, dict(upstream))
        forced = forced or name == from_stage
        if not stage.enabled():
            results.append(StageResult(name, "disabled", stage.folder, ""))
            continue
        fp = stage.fingerprint()
        save_hash_cache(run_dir)
        outs = stage.outputs()
        t0 = time.perf_counter()
        action = execute_stage(stage, fp, forced, upstream)
        res = StageResult(name, action, stage.folder, fp, time.perf_counter() - t0, {k: str(p) for k, p in outs.items()})
        results.append(res)
        metrics.log(stage=name, action=action, seconds=round(res.seconds, 3), fingerprint=fp)
        if on_stage is not None:
            on_stage(res)
        upstream[name] = fp
    report = write_report(run_dir, cfg, results)
    return PipelineResult(run_dir, results, report)


# ---------------------------------------------------------------------------
# report


def plot_training_curves(metrics_path: Path, out: Path) -> Optional[Path]:
    """loss, L_m, R_dis, reward margin, accuracy and lr against the step."""
    rows = [json.loads(l) for l in metrics_path.read_text(encoding="utf-8").splitlines() if l.strip()]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in ("loss", "L_m", "R_dis", "rewards/margins", "rewards/accuracy", "lr") if any(k in r for r in rows)]
    cols = 3
    nrows = (len(keys) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3 * nrows), squeeze=False)
    steps = [r["step"] for r in rows]
    for ax, k in zip(axes.flat, keys):
        ax.plot(steps, [r.get(k, float("nan")) for r in rows], marker="." if len(rows) < 50 else None)
        ax.set_title(k)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()

    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return out


def _share_lines(manifest: Path) -> List[str]:
    """The omega used and the measured R_dis gradient share, from a train manifest."""
    if not manifest.exists():
        return []
    m = json.loads(manifest.read_text(encoding="utf-8"))
    om, diag = m.get("omega"), m.get("diagnostics")
    out: List[str] = []
    if om:
        how = (f"calibrated to a gradient share of {om['omega_share']:g}" if om.get("omega_share") is not None else "as configured")
        out.append(f"omega {om['value']:.4g} ({how}).")
    if diag:
        sh, co = diag["rdis_grad_share"], diag["rdis_grad_cosine"]
        s0 = sh.get("step_0")
        first = f"at step 0 {s0:.3g} (cosine with the L_m gradient {co['step_0']:+.3f}), " if s0 is not None else ""
        out.append(f"R_dis gradient share ||grad(omega R_dis)|| / ||grad L_m||: {first}median {sh['median']:.3g} over "
                   f"{len(diag['measured_steps'])} measured step(s).")
        if s0 is not None and s0 < 1e-3:
            out.append(f"**At this omega the distribution reward is {s0:.1e} of the gradient: it cannot change the model "
                       f"(raise deft.omega or set deft.omega_share).**")
    return [" ".join(out), ""] if out else []


def write_report(run_dir: Path, cfg: Mapping[str, Any], results: Sequence[StageResult]) -> Path:
    """run_dir/report.md from what the stages left on disk."""
    by = {r.name: r for r in results}
    parts = [f"# deft run: {run_dir}", ""]
    method = cfg["method"]["name"]
    parts.append(f"Policy `{cfg['model']}`{' (' + cfg['gguf_file'] + ')' if cfg.get('gguf_file') else ''}, method "
                 f"{'DEFT-' if cfg['deft']['enabled'] else ''}{method.upper()}"
                 f"{' (omega ' + format(cfg['deft']['omega'], 'g') + ')' if cfg['deft']['enabled'] else ''}, "
                 f"trained on levels {', '.join(cfg['data']['levels'])}.")
    parts += [""] + md_table(["stage", "action", "seconds", "folder"],
                             [[r.name, r.action, f"{r.seconds:.1f}", f"`{r.folder}`"] for r in results], left=2) + [""]

    gman = run_dir / "grade" / "manifest.json"
    if gman.exists():
        m = json.loads(gman.read_text(encoding="utf-8"))
        p = m.get("parameters", {})
        parts += ["## Grading", "",
                  f"Reward model `{p.get('reward_model')}`, a = {p.get('a')}%, c = {p.get('c')}%, "
                  f"{'each subset graded on its own' if p.get('per_subset') else 'all subsets graded together'}.", ""]
        rows = [[k.split("/")[0], k.split("/")[1], v["samples"], v["q_pos"], v["q_neg"]] for k, v in sorted(m.get("counts", {}).items())]
        parts += md_table(["subset", "level", "samples", "Q+ responses", "Q- responses"], rows, left=2) + [""]
        if (run_dir / "grade" / "best_scores.png").exists():
            parts += ["![best scores](grade/best_scores.png)", ""]

    top_path = run_dir / "distribution" / "top_tokens.json"
    if top_path.exists():
        top = json.loads(top_path.read_text(encoding="utf-8"))
        parts += ["## Discrepancy distribution: top Q_diff tokens", ""]
        n = max(len(top.get("positive", [])), len(top.get("negative", [])), 0)
        n = min(n, 15)
        rows = []
        for i in range(n):
            pos = top["positive"][i] if i < len(top["positive"]) else None
            neg = top["negative"][i] if i < len(top["negative"]) else None
            rows.append([f"`{pos['text']!r}` {pos['q_diff']:+.2e}" if pos else "", f"`{neg['text']!r}` {neg['q_diff']:+.2e}" if neg else ""])
        parts += md_table(["most positive (Q+ side)", "most negative (Q- side)"], rows, left=2) + [""]

    metrics = run_dir / "train" / "metrics.jsonl"
    if metrics.exists():
        png = plot_training_curves(metrics, run_dir / "train_curves.png")
        rows = [json.loads(l) for l in metrics.read_text(encoding="utf-8").splitlines() if l.strip()]
        parts += ["## Training", ""]
        if rows:
            first, last = rows[0], rows[-1]
            keys = [k for k in ("loss", "L_m", "R_dis", "rewards/margins", "rewards/accuracy") if k in last]
            parts += md_table(["", *keys], [["step " + str(first["step"]), *[f"{first[k]:.4g}" for k in keys]],
                                            ["step " + str(last["step"]), *[f"{last[k]:.4g}" for k in keys]]]) + [""]
        if png is not None:
            parts += ["![training curves](train_curves.png)", ""]
        parts += _share_lines(run_dir / "train" / "manifest.json")

    emd = run_dir / "eval" / "eval.md"
    if emd.exists():
        lines = emd.read_text(encoding="utf-8").strip().splitlines()
        if lines and lines[0].startswith("# "):
            lines = lines[1:]  # eval.md's own title
        while lines and not lines[0].strip():
            lines = lines[1:]
        parts += ["## Evaluation", ""] + [("#" + l if l.startswith("#") else l) for l in lines] + [""]
    elif "eval" in by and by["eval"].action == "disabled":
        parts += ["## Evaluation", "", "Disabled (eval.enabled: false).", ""]
    return write_text_atomic(run_dir / "report.md", "\n".join(parts) + "\n")
