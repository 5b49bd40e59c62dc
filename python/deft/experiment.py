"""`deft experiment`: does DEFT beat the plain method on my data, with my
model, at what cost, and how sure are we?

An experiment config is a ``deft run`` config (the policy, ``inputs``,
``grade``, and every ``deft train`` key as the *base* of every arm) plus an
``experiment`` section (:data:`EXPERIMENT_SECTION`)::

    experiment:
      seeds: [0, 1, 2]
      baseline: dpo-A               # the arm every other arm is compared with
      arms:
        - {name: base, base: true}  # the untrained model
        - {name: dpo-A, set: {deft.enabled: false}}
        - {name: dpo-random, data: random, set: {deft.enabled: false}}
        - {name: deft-dpo, set: {deft.omega_share: 0.1}}

An arm is a ``name``, the training ``data`` (``A``: level A, the default;
``random``: a random subset of the same size, drawn per seed from all graded
samples; ``all``: every level, the paper's -D^A ablation) and ``set``:
overrides of the base config (``method.name``, ``deft.enabled``,
``deft.omega``, ``deft.omega_share``, ``method.sft_weight``, ``train.lr``, ...).
Every trained arm runs once per seed (``train.seed``).

Steps, each a folder of ``run_dir`` with a ``stage.json`` fingerprint (the
``deft run`` rules: skipped when done, continued when interrupted, redone when
anything it depends on changed):

1. ``split/``: the input rows split by prompt -- a SHA-256 of the rendered
   conversation and ``split_seed`` -- into ``train.parquet`` and
   ``eval.parquet`` (``eval_fraction`` of the prompts), before any grading:
   no evaluation prompt is graded, counted into Q_diff or trained on, and a
   prompt that occurs twice is on one side. With ``eval_files`` (a given test
   set) those files are the held-out rows and every input row with one of
   their prompts is dropped from training.
2. ``grade/``, ``distribution/``: ``deft grade`` and ``deft distribution`` of
   the training split, once.
3. ``subsets/NAME/graded.parquet``: the training rows of each data choice.
4. ``arms/ARM/seed-S/train/``: ``deft train`` (checkpoints, resume); the
   reference log-probs are cached once per subset in ``ref_cache/``.
5. ``arms/ARM/seed-S/eval/eval.json`` and ``arms/base/eval/eval.json``: the
   same evaluation for every model, on the held-out split (see
   :func:`evaluate_model`).
6. ``experiment.json``, ``experiment.md``, ``metrics.png``,
   ``training_curves.png``: every arm's metrics with 95% bootstrap intervals
   over prompts and seeds, the paired difference to the baseline arm and a
   verdict (:func:`summarise`).

The evaluation, per held-out prompt:

* ``accuracy`` / ``margin``: the implicit reward ``beta * log(pi / pi_ref)``
  of the human-preferred response minus that of the other one (``beta`` =
  ``method.beta`` of the base config; the reference is the base model), on the
  first ``eval_pairs`` held-out pairs in the order of their prompt hash (a
  uniform sample of every file and subset); every model in float32; accuracy counts a tie as 1/2, so the
  base model scores exactly 0.5 with margin 0;
* ``nll``: the per-token negative log-likelihood of the preferred response;
  ``logratio``: its per-token log-ratio to the base model (how far training
  drifted);
* ``reward``: ``100 * sigmoid(score)`` of the greedy generation for the first
  ``eval_prompts`` held-out prompts (in the same order) under ``reward_model`` (one that grading
  did not use: the builtin offline model when grading used stored scores),
  and ``win`` (+1 / 0 / -1) against the base model's generation with the tie
  margin of ``deft eval``;
* per run: training seconds (the optimizer steps), tokens, steps, and the
  measured R_dis gradient share at step 0.
"""

from __future__ import annotations

import copy
import gc
import hashlib
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import polars as pl

# Imported inside the functions that use them, on purpose: torch (with deft.train and deft.losses, which
# import it), matplotlib and tqdm; importing deft stays fast.
from deft import pipeline as pl_
from deft._util import md_table
from deft.config import ConfigError, Field, apply_override, read_config
from deft.config import SCHEMA as TRAIN_SCHEMA
from deft.config import validate as validate_train
from deft.data import load, save
from deft.errors import DeftError
from deft.eval_metrics import reward_100, score_responses
from deft.evaluate import load_policy
from deft.generation import generate
from deft.io import MetricsLog, atomic_path, locked_output, write_json_atomic, write_text_atomic
from deft.render import RM_TEMPLATES, prompt_lead_ids, render_hh, render_prompt, resolve_template
from deft.score import load_reward_model

__all__ = ["EXPERIMENT_SCHEMA", "load_experiment_config", "run_experiment", "summarise", "bootstrap_mean_ci",
           "paired_difference", "split_by_prompt", "prompt_key", "evaluate_model", "ExperimentResult"]

EXPERIMENT_SECTION: Dict[str, Any] = {
    "arms": Field([], "list", help="the arms: {name, data: A|random|all, set: {KEY: VALUE}} or {name, base: true} (required)"),
    "seeds": Field([0], "list", help="every trained arm runs once per seed (train.seed)"),
    "baseline": Field(None, "str", nullable=True, help="the arm the others are compared with (default: the first trained arm)"),
    "eval_fraction": Field(0.1, "float", help="share of the prompts held out for evaluation"),
    "eval_files": Field([], "list", help="evaluate on these files instead of a split of inputs.files (their prompts are removed from "
                                         "the training rows), e.g. PRO's HH test sets"),
    "split_seed": Field(0, "int", help="salt of the prompt hash that splits train/eval"),
    "eval_pairs": Field(128, "int", help="held-out pairs for accuracy, margin, NLL and log-ratio"),
    "eval_prompts": Field(16, "int", help="held-out prompts generated from and scored by the reward model (0: none)"),
    "reward_model": Field("builtin", "str", help="the evaluation reward model (builtin, a folder or a hub id); not the grading one"),
    "reward_template": Field("auto", "str", choices=RM_TEMPLATES),
    "batch_size": Field(8, "int", help="evaluation batch size (pairs and generations)"),
    "tie_margin": Field(1.0, "float", help="reward points (0-100) within which a generation ties with the base model's"),
    "bootstrap": Field(2000, "int", help="bootstrap resamples of the 95% intervals"),
    "device": Field(None, "str", nullable=True, help="evaluation device (default: CUDA when available)"),
    "keep_checkpoints": Field(False, "bool", help="keep each finished training unit's checkpoints (weights + optimizer state, "
                                                 "about 3x the model; only needed to resume it)"),
}

EXPERIMENT_SCHEMA: Dict[str, Any] = {
    **copy.deepcopy(TRAIN_SCHEMA),
    "run_dir": Field("runs/experiment", "str", help="every step writes into a folder of this one"),
    "inputs": copy.deepcopy(pl_.PIPELINE_SCHEMA["inputs"]),
    "grade": copy.deepcopy(pl_.PIPELINE_SCHEMA["grade"]),
    "experiment": EXPERIMENT_SECTION,
}

DATA_CHOICES = ("A", "random", "all")

#: metric -> (label, higher is better: True / False / None = no direction)
METRICS: Dict[str, Tuple[str, Optional[bool]]] = {
    "accuracy": ("preference accuracy", True),
    "margin": ("implicit reward margin", True),
    "reward": ("RM reward (0-100)", True),
    "win": ("win - lose vs base", True),
    "nll": ("held-out NLL / token", False),
    "logratio": ("log-ratio to base / token", None),
}


class ExperimentError(DeftError, RuntimeError):
    """An experiment that cannot run as configured."""


def _log(msg: str) -> None:
    print(f"[deft experiment] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# config


@dataclass(frozen=True)
class Arm:
    name: str
    base: bool = False
    data: str = "A"
    set: Tuple[Tuple[str, Any], ...] = ()


def parse_arms(raw: Sequence[Any]) -> List[Arm]:
    """Check and normalise ``experiment.arms``."""
    arms: List[Arm] = []
    for i, a in enumerate(raw):
        where = f"experiment.arms[{i}]"
        if not isinstance(a, Mapping) or not isinstance(a.get("name"), str) or not a["name"]:
            raise ConfigError(f"{where}: expected a mapping with a name, e.g. {{name: dpo-A, set: {{deft.enabled: false}}}}")
        unknown = set(a) - {"name", "base", "data", "set"}
        if unknown:
            raise ConfigError(f"{where} ({a['name']}): unknown key(s) {', '.join(sorted(unknown))}; valid: name, base, data, set")
        name = a["name"]
        if not all(c.isalnum() or c in "-_." for c in name):
            raise ConfigError(f"{where}: name {name!r}: use letters, digits, '-', '_' and '.' (it names a folder)")
        base = bool(a.get("base", False))
        data = str(a.get("data", "A"))
        if data not in DATA_CHOICES:
            raise ConfigError(f"{where} ({name}): data {data!r} is not one of {', '.join(DATA_CHOICES)}")
        sets = a.get("set") or {}
        if not isinstance(sets, Mapping):
            raise ConfigError(f"{where} ({name}): set must be a mapping of config keys to values")
        if base and (sets or "data" in a):
            raise ConfigError(f"{where} ({name}): the base arm is the untrained model; it takes no data or set")
        arms.append(Arm(name, base, data, tuple((str(k), v) for k, v in sets.items())))
    names = [a.name for a in arms]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"experiment.arms: duplicate arm name(s) {', '.join(dup)}")
    return arms


def arm_train_config(cfg: Mapping[str, Any], arm: Arm, seed: int) -> Dict[str, Any]:
    """The base train config with the arm's overrides and the seed (paths not filled in)."""
    tcfg = {k: copy.deepcopy(cfg[k]) for k in TRAIN_SCHEMA}
    for k, v in arm.set:
        if k in ("data.graded", "deft.distribution", "train.output_dir", "train.seed", "data.levels"):
            raise ConfigError(f"experiment arm {arm.name}: {k} is set by the experiment (use the arm's data, or seeds)")
        try:
            apply_override(tcfg, f"{k}={json.dumps(v)}", TRAIN_SCHEMA)
        except ConfigError as e:
            raise ConfigError(f"experiment arm {arm.name}: {e}") from None
    tcfg["train"]["seed"] = int(seed)
    tcfg["data"]["levels"] = ["A", "B", "C"]  # the subset file holds exactly the arm's rows
    return tcfg


def validate(cfg: Mapping[str, Any]) -> None:
    """Cross-field checks of an experiment config."""
    if not cfg.get("model"):
        raise ConfigError("model: required (the policy: a local folder, hub id or pkg:NAME)")
    if not cfg["inputs"]["files"]:
        raise ConfigError("inputs.files: required (the preference data to split, grade and evaluate on)")
    e = cfg["experiment"]
    arms = parse_arms(e["arms"])
    trained = [a for a in arms if not a.base]
    if not trained:
        raise ConfigError("experiment.arms: at least one trained arm is needed (an arm without base: true)")
    if not e["seeds"] or any(not isinstance(s, int) or isinstance(s, bool) for s in e["seeds"]) or len(set(e["seeds"])) != len(e["seeds"]):
        raise ConfigError(f"experiment.seeds: expected distinct integers, got {e['seeds']!r}")
    if e["baseline"] is not None and e["baseline"] not in [a.name for a in arms]:
        raise ConfigError(f"experiment.baseline: {e['baseline']!r} is not an arm ({', '.join(a.name for a in arms)})")
    if not 0 < e["eval_fraction"] < 1:
        raise ConfigError(f"experiment.eval_fraction: must be in (0, 1), got {e['eval_fraction']}")
    for k in ("eval_pairs", "batch_size", "bootstrap"):
        if e[k] < 1:
            raise ConfigError(f"experiment.{k}: must be >= 1, got {e[k]}")
    if e["eval_prompts"] < 0:
        raise ConfigError(f"experiment.eval_prompts: must be >= 0, got {e['eval_prompts']}")
    g = cfg["grade"]
    if not g["use_input_scores"] and g["reward_model"] == e["reward_model"]:
        raise ConfigError(f"experiment.reward_model: {e['reward_model']!r} is the reward model grading used; the evaluation needs "
                          f"another one (grading with stored scores: grade.use_input_scores; or any other model)")
    for a in trained:
        tcfg = arm_train_config(cfg, a, e["seeds"][0])
        tcfg["data"]["graded"] = "graded.parquet"
        tcfg["deft"]["distribution"] = "qdiff.safetensors" if tcfg["deft"]["enabled"] else None
        try:
            validate_train(tcfg)
        except ConfigError as err:
            raise ConfigError(f"experiment arm {a.name}: {err}") from None


def load_experiment_config(path: Optional[str], overrides: Sequence[str] = ()) -> Dict[str, Any]:
    """Defaults, the YAML file, then ``--set KEY=VALUE`` overrides; validated."""
    cfg = read_config(path, overrides, EXPERIMENT_SCHEMA)
    validate(cfg)
    return cfg


# ---------------------------------------------------------------------------
# the split


def prompt_key(context: Sequence[Mapping[str, str]], salt: int = 0) -> str:
    """SHA-256 of the conversation before the responses (rendered as HH text)
    and the salt: one key per prompt, whatever its responses."""

    return hashlib.sha256(f"{salt}\n".encode() + render_hh(list(context)).encode("utf-8")).hexdigest()


def split_by_prompt(frame: Any, eval_fraction: float, salt: int = 0) -> Tuple[Any, Any]:
    """``(train, eval)`` rows of a canonical frame: a row is held out when the
    first 15 hex digits of its :func:`prompt_key`, read as a fraction of
    16**15, are below ``eval_fraction``. Rows with the same prompt share a key
    and so a side."""
    keys = [prompt_key(c, salt) for c in frame["context"].to_list()]
    u = np.array([int(k[:15], 16) / float(16 ** 15) for k in keys])
    held = pl.Series("held", u < eval_fraction)
    return frame.filter(~held), frame.filter(held)


class _Split(pl_.Stage):
    name = "split"

    def params(self):
        e = self.cfg["experiment"]
        return {"inputs": [pl_.file_hash(p) for p in self.cfg["inputs"]["files"]], "eval_fraction": e["eval_fraction"],
                "split_seed": e["split_seed"], "on_error": self.cfg["inputs"]["on_error"],
                "eval_files": [pl_.file_hash(p) for p in e["eval_files"]], "order": "prompt-key"}

    def outputs(self):
        return {"train": self.folder / "train.parquet", "eval": self.folder / "eval.parquet", "split": self.folder / "split.json"}

    def commit_record(self):
        return None  # three files written atomically one by one; stage.json says when all are there

    def run(self, resume: bool) -> None:
        i = self.cfg["inputs"]
        e = self.cfg["experiment"]

        def read(files, tag):
            frames = [load(p, on_error=i["on_error"], rejects_path=self.folder / f"rejects-{tag}{k}.jsonl").frame
                      for k, p in enumerate(files)]
            return pl.concat(frames, how="vertical_relaxed") if len(frames) > 1 else frames[0]

        frame = read(i["files"], "")
        if e["eval_files"]:  # a given test set: its prompts leave the training rows
            held = read(e["eval_files"], "eval-")
            hk = {prompt_key(c, e["split_seed"]) for c in held["context"].to_list()}
            keep = pl.Series([prompt_key(c, e["split_seed"]) not in hk for c in frame["context"].to_list()], dtype=pl.Boolean)
            train = frame.filter(keep)
        else:
            train, held = split_by_prompt(frame, e["eval_fraction"], e["split_seed"])
        tk = {prompt_key(c, e["split_seed"]) for c in train["context"].to_list()}
        ek = {prompt_key(c, e["split_seed"]) for c in held["context"].to_list()}
        if tk & ek:  # cannot happen by construction; checked because everything downstream relies on it
            raise ExperimentError(f"split: {len(tk & ek)} prompts on both sides")
        if train.height == 0 or held.height == 0:
            raise ExperimentError(f"split: {train.height} training and {held.height} held-out rows; both must be non-empty "
                                  f"(change experiment.eval_fraction or eval_files)")
        unranked = held.filter(~pl.col("ranked"))
        if unranked.height:
            r = unranked.row(0, named=True)
            raise ExperimentError(f"{r['source_file']}:{r['source_line']}: held-out row {r['id']!r} does not say which response "
                                  f"is preferred (ranked false); the evaluation needs the preferred response first")
        # the held-out rows in the order of their prompt hash: the first N (eval_pairs, eval_prompts) are a
        # uniform sample of every file and subset, not the head of the first file
        held = held.with_columns(pl.Series("_key", [prompt_key(c, e["split_seed"]) for c in held["context"].to_list()]))
        held = held.sort("_key").drop("_key")
        self.folder.mkdir(parents=True, exist_ok=True)
        save(train, self.outputs()["train"])
        save(held, self.outputs()["eval"])
        write_json_atomic(self.outputs()["split"], {
            "rows": frame.height, "eval_files": list(e["eval_files"]), "train_rows": train.height, "eval_rows": held.height, "train_prompts": len(tk),
            "eval_prompts": len(ek), "eval_fraction": e["eval_fraction"], "split_seed": e["split_seed"],
            "key": "sha256(f'{split_seed}\\n' + render_hh(context)); held out when its first 15 hex digits / 16**15 < eval_fraction",
            "subsets": {"train": train["subset"].value_counts().sort("subset").to_dicts(),
                        "eval": held["subset"].value_counts().sort("subset").to_dicts()},
        })


def _pipeline_view(cfg: Mapping[str, Any], run_dir: Path) -> Dict[str, Any]:
    """The experiment as a `deft run` config over the training split (for its grade and distribution stages)."""
    p = {k: copy.deepcopy(cfg[k]) for k in pl_.PIPELINE_SCHEMA if k in cfg}
    p["inputs"] = {"files": [str(run_dir / "split" / "train.parquet")], "on_error": "raise"}
    p["select"] = {"enabled": False}
    p["run_dir"] = str(run_dir)
    return p


# ---------------------------------------------------------------------------
# subsets, training and evaluation units


class _Subset(pl_.Stage):
    """The graded training rows of one data choice (``A``, ``all``, ``random-SEED``)."""

    def __init__(self, cfg, run_dir, upstream, kind: str, seed: Optional[int]):
        self.kind, self.seed = kind, seed
        self.name = kind if kind != "random" else f"random-{seed}"
        super().__init__(cfg, run_dir, upstream)
        self.folder = run_dir / "subsets" / self.name

    def params(self):
        return {"kind": self.kind, "seed": self.seed}

    def outputs(self):
        return {"graded": self.folder / "graded.parquet"}

    def commit_record(self):
        return None

    def run(self, resume: bool) -> None:
        graded = pl.read_parquet(self.run_dir / "grade" / "graded.parquet")
        a = graded.filter(pl.col("level") == "A")
        if self.kind == "A":
            rows = a
        elif self.kind == "all":
            rows = graded
        else:  # as many rows as level A, drawn from every level
            rng = np.random.default_rng([int(self.seed), 0xDEF7])
            idx = np.sort(rng.choice(graded.height, size=a.height, replace=False))
            rows = graded[idx.tolist()]
        if rows.height == 0:
            raise ExperimentError(f"subset {self.name}: no rows (level A is empty; raise grade.a)")
        self.folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.outputs()["graded"]) as tmp:
            rows.write_parquet(tmp)


def _subset_name(arm: Arm, seed: int) -> str:
    return arm.data if arm.data != "random" else f"random-{seed}"


class _TrainUnit(pl_.Stage):
    name = "train"

    def __init__(self, cfg, run_dir, upstream, arm: Arm, seed: int):
        self.arm, self.seed = arm, seed
        super().__init__(cfg, run_dir, upstream)
        self.folder = run_dir / "arms" / arm.name / f"seed-{seed}" / "train"

    def train_config(self) -> Dict[str, Any]:
        tcfg = arm_train_config(self.cfg, self.arm, self.seed)
        tcfg["data"]["graded"] = str(self.run_dir / "subsets" / _subset_name(self.arm, self.seed) / "graded.parquet")
        tcfg["deft"]["distribution"] = str(self.run_dir / "distribution" / "qdiff.safetensors") if tcfg["deft"]["enabled"] else None
        tcfg["train"]["output_dir"] = str(self.folder)
        tcfg["train"]["ref_cache_dir"] = str(self.run_dir / "ref_cache")
        return tcfg

    def params(self):
        tcfg = pl_.train_fingerprint_config(self.train_config())
        tcfg["train"]["ref_cache_dir"] = None  # a cache: does not change the result
        return {"config": tcfg, "model": pl_.spec_hash(self.cfg["model"], gguf_file=self.cfg.get("gguf_file")),
                "tokenizer": pl_.spec_hash(self.cfg["tokenizer"], weights=False)}

    def outputs(self):
        return {"model": self.folder / "model", "metrics": self.folder / "metrics.jsonl", "manifest": self.folder / "manifest.json"}

    def complete_on_disk(self) -> bool:
        return all(p.exists() for p in self.outputs().values()) and not self.interrupted()

    def run(self, resume: bool) -> None:
        from deft.train import train

        train(self.train_config(), resume=resume)


class _EvalUnit(pl_.Stage):
    name = "eval"

    def __init__(self, cfg, run_dir, upstream, arm: Arm, seed: Optional[int]):
        self.arm, self.seed = arm, seed
        super().__init__(cfg, run_dir, upstream)
        self.folder = run_dir / "arms" / arm.name / ("eval" if arm.base else f"seed-{seed}/eval")

    def params(self):
        e = self.cfg["experiment"]
        p = {"experiment": {k: e[k] for k in ("eval_pairs", "eval_prompts", "reward_template", "batch_size", "device")},
             "reward_model": e["reward_model"] if e["reward_model"] == "builtin" else pl_.spec_hash(e["reward_model"]),
             "generation": self.cfg["generation"], "data": {k: self.cfg["data"][k] for k in ("template", "max_length", "max_prompt_length")},
             "tokenizer": pl_.spec_hash(self.cfg["tokenizer"], weights=False)}
        if self.arm.base:
            p["model"] = pl_.spec_hash(self.cfg["model"], gguf_file=self.cfg.get("gguf_file"))
        return p

    def outputs(self):
        return {"eval": self.folder / "eval.json"}

    def commit_record(self):
        return None

    def run(self, resume: bool) -> None:
        if self.arm.base:
            spec, gguf, tok = self.cfg["model"], self.cfg.get("gguf_file"), self.cfg["tokenizer"]
        else:
            spec, gguf, tok = str(self.folder.parent / "train" / "model"), None, None
        rec = evaluate_model(self.cfg, self.run_dir / "split" / "eval.parquet", spec, gguf_file=gguf, tokenizer=tok)
        self.folder.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.outputs()["eval"], rec)


def evaluate_model(cfg: Mapping[str, Any], eval_split: Path, spec: str, *, gguf_file: Optional[str] = None,
                   tokenizer: Optional[str] = None) -> Dict[str, Any]:
    """The per-prompt evaluation of one model on the held-out split:
    summed log-probs and token counts of both responses of the first
    ``eval_pairs`` rows, and the greedy generation of the first
    ``eval_prompts`` rows with its evaluation-RM score (raw and 0-100).
    Prompts are rendered with the policy tokenizer's template, as in training."""
    import torch

    from deft.losses import response_logprobs
    from deft.train import collate, frame_examples, policy_tokenizers, to_slots

    e = cfg["experiment"]
    t0 = time.perf_counter()
    held = pl.read_parquet(eval_split)
    tcfg = {k: copy.deepcopy(cfg[k]) for k in TRAIN_SCHEMA}
    hf_tok, ptok = policy_tokenizers(tcfg)
    template = resolve_template(cfg["data"]["template"], ptok)
    # float32 on every device: the margins compare log-probs of two models, which bf16 rounding would swamp
    model, gen_tok = load_policy(spec, gguf_file=gguf_file, tokenizer=tokenizer or cfg["tokenizer"], device=e["device"],
                                 dtype="float32", trust_remote_code=cfg["trust_remote_code"], allow_pickle=cfg["allow_pickle"])
    device = next(model.parameters()).device
    pad = hf_tok.pad_token_id if hf_tok.pad_token_id is not None else hf_tok.eos_token_id
    pairs = held.head(e["eval_pairs"])
    examples = frame_examples(tcfg, pairs, template, hf_tok, ptok, method="dpo")  # (human-preferred, other)
    logp = np.zeros((len(examples), 2))
    ntok = np.zeros((len(examples), 2), dtype=np.int64)
    with torch.no_grad():
        for i in range(0, len(examples), e["batch_size"]):
            chunk = examples[i:i + e["batch_size"]]
            batch = collate(chunk, pad)
            out = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device), use_cache=False)
            lp, n = response_logprobs(out.logits.float(), batch["labels"].to(device))
            logp[i:i + len(chunk)] = to_slots(lp.double(), batch).cpu().numpy()
            ntok[i:i + len(chunk)] = to_slots(n, batch, 0).cpu().numpy()
    t_pairs = time.perf_counter() - t0
    gens: Dict[str, Any] = {"ids": [], "text": [], "score": [], "reward": []}
    if e["eval_prompts"] > 0:
        rows = held.head(e["eval_prompts"])
        prompts = [render_prompt(c, template, hf_tok) for c in rows["context"].to_list()]
        texts = generate(model, gen_tok, prompts, max_new_tokens=cfg["generation"]["max_new_tokens"],
                         max_prompt_length=cfg["data"]["max_prompt_length"], batch_size=e["batch_size"],
                         lead_ids=prompt_lead_ids(template, hf_tok))
        del model

        rm = load_reward_model(e["reward_model"], template=e["reward_template"], device=e["device"],
                               trust_remote_code=cfg["trust_remote_code"])
        score = score_responses(rm, rows["context"].to_list(), texts)
        gens = {"ids": rows["id"].to_list(), "text": texts, "score": score.tolist(), "reward": reward_100(score).tolist(),
                "reward_model": str(getattr(rm, "name", e["reward_model"]))}
    return {"model": spec, "gguf_file": gguf_file, "template": template, "device": device.type, "dtype": "float32",
            "pairs": {"ids": pairs["id"].to_list(), "logp_chosen": logp[:, 0].tolist(), "logp_rejected": logp[:, 1].tolist(),
                      "n_chosen": ntok[:, 0].tolist(), "n_rejected": ntok[:, 1].tolist()},
            "generations": gens, "seconds": {"pairs": round(t_pairs, 3), "total": round(time.perf_counter() - t0, 3)}}


# ---------------------------------------------------------------------------
# statistics


def bootstrap_mean_ci(values: Any, *, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> Dict[str, float]:
    """Mean of a ``(seeds, items)`` array with a percentile bootstrap interval
    that resamples seeds and items (both with replacement, independently; a
    single seed resamples items only): ``{"mean", "lo", "hi"}``. The
    resampling is seeded, so the interval is reproducible."""
    v = np.asarray(values, dtype=np.float64)
    if v.ndim == 1:
        v = v[None, :]
    S, N = v.shape
    if N == 0:
        return {"mean": float("nan"), "lo": float("nan"), "hi": float("nan")}
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    for b in range(n_boot):
        s = rng.integers(0, S, size=S) if S > 1 else np.zeros(1, dtype=np.int64)
        i = rng.integers(0, N, size=N)
        means[b] = v[np.ix_(s, i)].mean()
    a = (1.0 - level) / 2.0
    lo, hi = np.quantile(means, [a, 1.0 - a])
    return {"mean": float(v.mean()), "lo": float(lo), "hi": float(hi)}


def verdict(ci: Mapping[str, float], higher_is_better: Optional[bool]) -> str:
    """``better`` / ``worse`` when the interval of a difference excludes 0
    (``higher`` / ``lower`` for a metric without a direction), else ``no
    measurable difference``."""
    if ci["lo"] > 0:
        return "higher" if higher_is_better is None else ("better" if higher_is_better else "worse")
    if ci["hi"] < 0:
        return "lower" if higher_is_better is None else ("worse" if higher_is_better else "better")
    return "no measurable difference"


def paired_difference(a: Any, b: Any, higher_is_better: Optional[bool], *, n_boot: int = 2000, seed: int = 0) -> Dict[str, Any]:
    """The bootstrap interval of ``mean(a - b)`` over the same ``(seeds, items)``, and its :func:`verdict`."""
    ci = bootstrap_mean_ci(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64), n_boot=n_boot, seed=seed)
    return {**ci, "verdict": verdict(ci, higher_is_better)}


def _item_metrics(rec: Mapping[str, Any], base: Mapping[str, Any], beta: float, tie_margin: float) -> Dict[str, np.ndarray]:
    p, bp = rec["pairs"], base["pairs"]
    if (rec.get("device"), rec.get("dtype")) != (base.get("device"), base.get("dtype")):
        raise ExperimentError(f"{rec['model']} was evaluated on {rec.get('device')}/{rec.get('dtype')} but the base model on "
                              f"{base.get('device')}/{base.get('dtype')}: log-probs are not comparable; set experiment.device")
    if p["ids"] != bp["ids"]:
        raise ExperimentError("evaluation records hold different held-out pairs; rerun the experiment")
    lc, lr = np.asarray(p["logp_chosen"]), np.asarray(p["logp_rejected"])
    rc, rr = np.asarray(bp["logp_chosen"]), np.asarray(bp["logp_rejected"])
    nc = np.maximum(np.asarray(p["n_chosen"], dtype=np.float64), 1.0)
    margin = beta * ((lc - rc) - (lr - rr))
    out = {"accuracy": np.where(margin > 0, 1.0, np.where(margin < 0, 0.0, 0.5)), "margin": margin,
           "nll": -lc / nc, "logratio": (lc - rc) / nc}
    g, bg = rec["generations"], base["generations"]
    if g["ids"]:
        if g["ids"] != bg["ids"]:
            raise ExperimentError("evaluation records hold different held-out prompts; rerun the experiment")
        r, br = np.asarray(g["reward"]), np.asarray(bg["reward"])
        same = np.array([x == y for x, y in zip(g["text"], bg["text"])])
        d = r - br
        out["reward"] = r
        out["win"] = np.where(same | (np.abs(d) <= tie_margin), 0.0, np.sign(d))
    return out


def _training_summary(train_dir: Path) -> Dict[str, Any]:
    rows = [json.loads(l) for l in (train_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines() if l.strip()]
    rows = [r for r in rows if "loss" in r]  # the optimizer steps, not the eval rows (train.eval_steps)
    man = json.loads((train_dir / "manifest.json").read_text(encoding="utf-8"))
    diag = man.get("diagnostics") or {}
    share = (diag.get("rdis_grad_share") or {}).get("step_0")
    cos = (diag.get("rdis_grad_cosine") or {}).get("step_0")
    return {"steps": len(rows), "seconds": float(sum(r.get("step_seconds", 0.0) for r in rows)),
            "tokens": int(round(sum(r.get("tokens_per_s", 0.0) * r.get("step_seconds", 0.0) for r in rows))),
            "samples": man.get("samples"), "omega": (man.get("omega") or {}).get("value"),
            "rdis_grad_share": share, "rdis_grad_cosine": cos,
            "curve": [{"step": r["step"], "loss": r.get("loss"), "L_m": r.get("L_m"), "margin": r.get("rewards/margins")} for r in rows]}


def summarise(cfg: Mapping[str, Any], run_dir: Path) -> Dict[str, Any]:
    """``experiment.json``'s content from the units' records: per arm and
    metric the mean with its bootstrap interval, the paired difference to the
    baseline arm with a verdict, win/tie/lose counts and the training cost."""
    e = cfg["experiment"]
    arms = parse_arms(e["arms"])
    seeds = list(e["seeds"])
    base_arm = next((a for a in arms if a.base), None)
    base_dir = run_dir / "arms" / (base_arm.name if base_arm else "_base") / "eval"
    base = json.loads((base_dir / "eval.json").read_text(encoding="utf-8"))
    beta = float(cfg["method"]["beta"])
    per_arm: Dict[str, Dict[str, np.ndarray]] = {}
    cost: Dict[str, List[Dict[str, Any]]] = {}
    for a in arms:
        recs = [base] * len(seeds) if a.base else [
            json.loads((run_dir / "arms" / a.name / f"seed-{s}" / "eval" / "eval.json").read_text(encoding="utf-8")) for s in seeds]
        items = [_item_metrics(r, base, beta, e["tie_margin"]) for r in recs]
        per_arm[a.name] = {k: np.stack([it[k] for it in items]) for k in items[0]}
        if not a.base:
            cost[a.name] = [_training_summary(run_dir / "arms" / a.name / f"seed-{s}" / "train") for s in seeds]
    baseline = e["baseline"] or next(a.name for a in arms if not a.base)
    nb = e["bootstrap"]
    out_arms = []
    for k, a in enumerate(arms):
        vals = per_arm[a.name]
        row: Dict[str, Any] = {"name": a.name, "base": a.base, "data": None if a.base else a.data, "set": dict(a.set), "metrics": {},
                               "vs_baseline": {}}
        row["vs_base"] = {}
        for m, v in vals.items():
            row["metrics"][m] = bootstrap_mean_ci(v, n_boot=nb, seed=1000 + k)
            if a.name != baseline:
                row["vs_baseline"][m] = paired_difference(v, per_arm[baseline][m], METRICS[m][1], n_boot=nb, seed=2000 + k)
            if base_arm is not None and not a.base and baseline != base_arm.name and m not in ("win",):
                row["vs_base"][m] = paired_difference(v, per_arm[base_arm.name][m], METRICS[m][1], n_boot=nb, seed=3000 + k)
        if "win" in vals:
            w = vals["win"]
            row["win_tie_lose"] = {"win": int((w > 0).sum()), "tie": int((w == 0).sum()), "lose": int((w < 0).sum())}
        if a.name in cost:
            c = cost[a.name]
            shares = [x["rdis_grad_share"] for x in c if x["rdis_grad_share"] is not None]
            row["training"] = {
                "steps": float(np.mean([x["steps"] for x in c])), "samples": c[0]["samples"],
                "seconds": float(np.mean([x["seconds"] for x in c])), "tokens": float(np.mean([x["tokens"] for x in c])),
                "omega": [x["omega"] for x in c], "rdis_grad_share": float(np.median(shares)) if shares else None,
                "rdis_grad_cosine": [x["rdis_grad_cosine"] for x in c], "per_seed": [{k2: v2 for k2, v2 in x.items() if k2 != "curve"} for x in c],
            }
        out_arms.append(row)
    split = json.loads((run_dir / "split" / "split.json").read_text(encoding="utf-8"))

    held = pl.read_parquet(run_dir / "split" / "eval.parquet", columns=["id", "subset"])
    sub = dict(zip(held["id"].to_list(), held["subset"].to_list()))

    def by_subset(ids):
        out: Dict[str, int] = {}
        for i in ids:
            out[sub[i]] = out.get(sub[i], 0) + 1
        return dict(sorted(out.items()))

    return {"format": "deft-experiment-v1", "run_dir": str(run_dir), "seeds": seeds, "baseline": baseline,
            "eval": {"pairs": len(base["pairs"]["ids"]), "prompts": len(base["generations"]["ids"]), "beta": beta,
                     "pairs_by_subset": by_subset(base["pairs"]["ids"]), "prompts_by_subset": by_subset(base["generations"]["ids"]),
                     "device": base.get("device"), "dtype": base.get("dtype"),
                     "reward_model": base["generations"].get("reward_model"), "tie_margin": e["tie_margin"], "bootstrap": nb},
            "split": {k: split[k] for k in ("train_rows", "eval_rows", "eval_fraction", "split_seed")},
            "metrics": {m: {"label": lab, "higher_is_better": hib} for m, (lab, hib) in METRICS.items()},
            "arms": out_arms}


def _counts(d: Mapping[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in d.items())


def _ci(c: Mapping[str, float], digits: int = 3) -> str:
    return f"{c['mean']:.{digits}f} [{c['lo']:.{digits}f}, {c['hi']:.{digits}f}]"


def write_markdown(summary: Mapping[str, Any], path: Path, *, command: Optional[str] = None) -> Path:
    ms = [m for m in METRICS if any(m in a["metrics"] for a in summary["arms"])]
    ev = summary["eval"]
    lines = ["# deft experiment", ""]
    if command:
        lines += [f"Command: `{command}`", ""]
    lines += [f"{len(summary['seeds'])} seed(s) {summary['seeds']}; held-out split: {summary['split']['eval_rows']} rows "
              f"({summary['split']['eval_fraction']:g} of the prompts, by prompt hash), of which {ev['pairs']} pairs "
              f"({_counts(ev['pairs_by_subset'])}) and {ev['prompts']} generation prompts ({_counts(ev['prompts_by_subset'])}) "
              f"are evaluated; implicit-reward beta {ev['beta']:g}; generations scored by "
              f"{ev['reward_model'] or 'no reward model'}. Each cell: mean [95% bootstrap interval over prompts and seeds].", ""]
    header = ["arm", "data"] + [METRICS[m][0] for m in ms] + ["W/T/L vs base (prompts x seeds)"]
    rows = []
    for a in summary["arms"]:
        wtl = a.get("win_tie_lose")
        rows.append([a["name"], "base model" if a["base"] else a["data"]] + [_ci(a["metrics"][m]) if m in a["metrics"] else ""
                                                                            for m in ms]
                    + [f"{wtl['win']}/{wtl['tie']}/{wtl['lose']}" if wtl and not a["base"] else ""])
    lines += md_table(header, rows, left=2) + [""]
    lines += [f"## Paired differences to `{summary['baseline']}` (same prompts and seeds)", ""]
    header = ["arm"] + [METRICS[m][0] for m in ms]
    rows = []
    for a in summary["arms"]:
        if not a["vs_baseline"]:
            continue
        rows.append([a["name"]] + [f"{_ci(a['vs_baseline'][m])}: **{a['vs_baseline'][m]['verdict']}**" if m in a["vs_baseline"] else ""
                                   for m in ms])
    lines += md_table(header, rows) + [""]
    if any(a.get("vs_base") for a in summary["arms"]):
        lines += ["## Paired differences to the base model (did training change it?)", ""]
        mb = [m for m in ms if m != "win"]
        rows = [[a["name"]] + [f"{_ci(a['vs_base'][m])}: **{a['vs_base'][m]['verdict']}**" if m in a["vs_base"] else "" for m in mb]
                for a in summary["arms"] if a.get("vs_base")]
        lines += md_table(["arm"] + [METRICS[m][0] for m in mb], rows) + [""]
    lines += ["## Training cost", ""]
    header = ["arm", "samples", "steps", "train seconds", "tokens", "omega", "R_dis gradient share at step 0 (median)"]
    rows = []
    for a in summary["arms"]:
        t = a.get("training")
        if not t:
            continue
        om = sorted({o for o in t["omega"] if o is not None})
        share = t["rdis_grad_share"]
        rows.append([a["name"], t["samples"], f"{t['steps']:.0f}", f"{t['seconds']:.0f}", f"{t['tokens']:.0f}",
                     ", ".join(f"{o:.3g}" for o in om) if om else "off",
                     f"{share:.2e}" if share is not None else ("R_dis off" if not om or om == [0.0] else "not measured")])
    lines += md_table(header, rows) + [""]
    lines += ["Verdicts: **better** / **worse** when the 95% interval of the paired difference excludes 0 (for the NLL lower "
              "is better; the log-ratio has no direction: higher / lower), else **no measurable difference**. "
              "Plots: `metrics.png` (each metric per arm with its interval), `training_curves.png`.", ""]
    return write_text_atomic(path, "\n".join(lines))


def plot_summary(summary: Mapping[str, Any], run_dir: Path) -> List[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = []
    ms = [m for m in METRICS if any(m in a["metrics"] for a in summary["arms"])]
    fig, axes = plt.subplots(1, len(ms), figsize=(3.2 * len(ms), 3.6))
    axes = np.atleast_1d(axes)
    names = [a["name"] for a in summary["arms"]]
    for ax, m in zip(axes, ms):
        c = [a["metrics"].get(m) for a in summary["arms"]]
        mean = [x["mean"] if x else np.nan for x in c]
        err = np.array([[x["mean"] - x["lo"], x["hi"] - x["mean"]] if x else [0, 0] for x in c]).T
        ax.errorbar(range(len(names)), mean, yerr=err, fmt="o", capsize=3)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
        ax.set_title(METRICS[m][0], fontsize=9)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    p = run_dir / "metrics.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    out.append(p)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for a in summary["arms"]:
        if a["base"]:
            continue
        curves = [_training_summary(run_dir / "arms" / a["name"] / f"seed-{s}" / "train")["curve"] for s in summary["seeds"]]
        n = min(len(c) for c in curves)
        steps = [c["step"] for c in curves[0][:n]]
        for ax, key in zip(axes, ("loss", "margin")):
            v = np.array([[r[key] if r[key] is not None else np.nan for r in c[:n]] for c in curves], dtype=float)
            ax.plot(steps, np.nanmean(v, axis=0), label=a["name"])
    axes[0].set_title("training loss (mean over seeds)", fontsize=9)
    axes[1].set_title("training implicit-reward margin", fontsize=9)
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    p = run_dir / "training_curves.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    out.append(p)
    return out


# ---------------------------------------------------------------------------
# driver


@dataclass
class ExperimentResult:
    run_dir: Path
    json: Path
    markdown: Path
    summary: Dict[str, Any]
    actions: List[Tuple[str, str]]


@locked_output("experiment", lambda a: a["cfg"]["run_dir"])
def run_experiment(cfg: Mapping[str, Any], *, config_path: Optional[str] = None, overrides: Sequence[str] = (),
                   progress: bool = True) -> ExperimentResult:
    """Run (or resume) every step of a validated experiment config and write
    ``experiment.json``, ``experiment.md`` and the plots into ``run_dir``."""
    run_dir = Path(cfg["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    pl_.load_hash_cache(run_dir)
    write_json_atomic(run_dir / "config.json", {"config": dict(cfg), "config_file": config_path, "overrides": list(overrides)})
    log = MetricsLog(run_dir / "experiment.jsonl")
    e = cfg["experiment"]
    arms = parse_arms(e["arms"])
    trained = [a for a in arms if not a.base]
    seeds = list(e["seeds"])
    subsets = sorted({(a.data, s if a.data == "random" else None) for a in trained for s in seeds},
                     key=lambda x: (x[0], -1 if x[1] is None else x[1]))
    total = 3 + len(subsets) + 1 + 2 * len(trained) * len(seeds)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="experiment", unit="step", dynamic_ncols=True, position=0)
    actions: List[Tuple[str, str]] = []

    def step(stage: pl_.Stage, label: str, upstream: Mapping[str, str]) -> str:
        fp = stage.fingerprint()
        pl_.save_hash_cache(run_dir)
        t0 = time.perf_counter()
        action = pl_.execute_stage(stage, fp, False, upstream, log=lambda m: _log(f"{label}: {m.split(': ', 1)[-1]}"))
        log.log(step=label, action=action, seconds=round(time.perf_counter() - t0, 3), fingerprint=fp)
        actions.append((label, action))
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(label)
        return fp

    pview = _pipeline_view(cfg, run_dir)
    try:
        up: Dict[str, str] = {}
        up["split"] = step(_Split(cfg, run_dir, {}), "split", {})
        up["grade"] = step(pl_.GradeStage(pview, run_dir, {"split": up["split"]}), "grade", {"split": up["split"]})
        up["distribution"] = step(pl_.DistributionStage(pview, run_dir, {"grade": up["grade"]}), "distribution", {"grade": up["grade"]})
        sub_fp: Dict[str, str] = {}
        for kind, seed in subsets:
            st = _Subset(cfg, run_dir, {"grade": up["grade"]}, kind, seed)
            sub_fp[st.name] = step(st, f"subset {st.name}", {"grade": up["grade"]})
        base_arm = next((a for a in arms if a.base), Arm("_base", base=True))
        step(_EvalUnit(cfg, run_dir, {"split": up["split"]}, base_arm, None), f"{base_arm.name}/eval", {"split": up["split"]})
        for s in seeds:  # seed-major: an interrupted experiment has whole seeds of every arm
            for a in trained:
                tu = {"subset": sub_fp[_subset_name(a, s)], "distribution": up["distribution"]}
                unit = _TrainUnit(cfg, run_dir, tu, a, s)
                tfp = step(unit, f"{a.name}/seed-{s}/train", tu)
                if not e["keep_checkpoints"]:  # the unit is done: its checkpoints only served a resume
                    shutil.rmtree(unit.folder / "checkpoints", ignore_errors=True)
                eu = {"train": tfp, "split": up["split"]}
                step(_EvalUnit(cfg, run_dir, eu, a, s), f"{a.name}/seed-{s}/eval", eu)
                gc.collect()
    finally:
        if bar is not None:
            bar.close()
    summary = summarise(cfg, run_dir)
    jpath = write_json_atomic(run_dir / "experiment.json", summary)
    cmd = "deft experiment" + (f" --config {config_path}" if config_path else "") + "".join(f" --set {o}" for o in overrides)
    mpath = write_markdown(summary, run_dir / "experiment.md", command=cmd)
    plot_summary(summary, run_dir)
    return ExperimentResult(run_dir, Path(jpath), Path(mpath), summary, actions)
