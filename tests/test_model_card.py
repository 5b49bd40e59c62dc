"""Model cards (python/deft/model_card.py): README.md in the final model
folders of `deft train`, updated by `deft eval`; on a tiny random Llama with the
real SmolLM2 tokenizer and PRO HH rows, and on a fixed manifest."""

from __future__ import annotations

import copy
import json
import shlex
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import tiny_train_assets, train_overrides

pytest.importorskip("torch")
pytest.importorskip("transformers")
hub = pytest.importorskip("huggingface_hub")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return tiny_train_assets(tmp_path_factory.mktemp("card_assets"))


@pytest.fixture(scope="module")
def dpo_run(assets, tmp_path_factory):
    """DEFT-DPO, 3 steps (so a mean is not a median), with an eval split (4 pairs) before and after training."""
    from deft.train import run

    out = tmp_path_factory.mktemp("card_dpo") / "run"
    run(None, train_overrides(assets, out, **{"train.max_steps": 3, "train.eval_data": str(assets["graded"]),
                                              "train.eval_max_samples": 4, "train.eval_batch_size": 2}))
    return out


@pytest.fixture(scope="module")
def lora_run(assets, tmp_path_factory):
    """DEFT-DPO with a LoRA adapter, 1 step, merged; the card names a hub base model, license and dataset."""
    pytest.importorskip("peft")
    from deft.train import run

    out = tmp_path_factory.mktemp("card_lora") / "run"
    run(None, train_overrides(assets, out, **{"train.max_steps": 1, "peft.enabled": True, "peft.r": 4, "peft.alpha": 8,
                                              "peft.merge": True, "card.base_model": "HuggingFaceTB/SmolLM2-135M-Instruct",
                                              "card.license": "apache-2.0", "card.datasets": "[Anthropic/hh-rlhf]"}))
    return out


def front_matter(path: Path) -> dict:
    """The YAML between the leading '---' lines, parsed independently of deft."""
    text = path.read_text(encoding="utf-8")
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("\n---\n", 1)[0][4:])


def hub_card(path: Path):
    """The card as huggingface_hub reads it (no network), with its metadata validated as ModelCardData."""
    card = hub.ModelCard.load(path)
    assert isinstance(card.data, hub.ModelCardData)
    hub.ModelCardData(**front_matter(path))  # raises on malformed model-index / eval results
    return card


def metric_rows(out: Path):
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if l.strip()]


# --------------------------------------------------------------------------- deft train writes the card


def test_train_writes_a_card_matching_the_run(assets, dpo_run):
    from deft.distribution import load_distribution, resolve_tokenizer, top_tokens
    from deft.io import sha256_file

    path = dpo_run / "model" / "README.md"
    man = json.loads((dpo_run / "manifest.json").read_text())
    assert man["outputs"]["card"] == str(path) and man["command"] == sys.argv and man["steps_per_epoch"] == 4
    meta = front_matter(path)
    card = hub_card(path)
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    assert {"deft", "dpo", "deft-dpo"} <= set(meta["tags"])
    # a local base model without a card of its own: no hub id and no license to claim
    assert "base_model" not in meta and "license" not in meta and "model-index" not in meta
    body = card.text
    assert "# DEFT-DPO fine-tune of tiny-llama" in body and f"Base model: `{assets['model']}`" in body
    assert "| omega | 0.5 |" in body and "| omega set by | deft.omega |" in body and "| beta | 0.1 |" in body
    assert f"{man['samples']} samples (prompts) of level A of `graded.parquet`, each trained on a (best, worst) pair" in body
    assert f"| graded file SHA-256 | `{sha256_file(assets['graded'])}` |" in body

    # Q_diff: the file's hash and its top tokens, decoded with the policy's tokenizer
    assert f"| SHA-256 | `{sha256_file(assets['dist'])}` |" in body and "| vocabulary | 49,152 |" in body
    top = top_tokens(load_distribution(assets["dist"]), resolve_tokenizer(str(assets["model"])), 10)
    assert len(top["positive"]) == len(top["negative"]) == 10
    for i, (p, m) in enumerate(zip(top["positive"], top["negative"]), 1):
        assert f"| {i} | `{p['text']!r}` | {p['q_diff']:+.3e} | `{m['text']!r}` | {m['q_diff']:+.3e} |" in body

    # training metrics: first, last and mean of the metrics.jsonl rows
    rows = metric_rows(dpo_run)
    train = [r for r in rows if "loss" in r]
    assert len(train) == 3 and "| optimizer steps | 3 of 3 |" in body and "| epochs | 0.75 (4 steps per epoch) |" in body
    for k in ("loss", "L_m", "R_dis", "rewards/accuracy", "rewards/margins", "rdis_grad_share"):
        v = [r[k] for r in train]
        assert f"| {k} | {v[0]:.4g} | {v[-1]:.4g} | {np.mean(v):.4g} |" in body, k
        assert k == "rewards/accuracy" or f"{np.mean(v):.4g}" != f"{np.median(v):.4g}", k  # the mean is checked, not a median
    ev = [r for r in rows if "eval/accuracy" in r]
    assert [r["step"] for r in ev] == [0, 3]
    assert f"| eval/accuracy | {ev[0]['eval/accuracy']:.4g} (0) | {ev[-1]['eval/accuracy']:.4g} (3) |" in body
    share = man["diagnostics"]["rdis_grad_share"]
    assert f"{share['step_0']:.4g} at step 0, median {share['median']:.4g}" in body

    # not evaluated yet; reproducibility
    assert "Not evaluated yet" in body
    assert f"| deft | {man['versions']['deft']} |" in body and shlex.join(sys.argv) in body
    assert (f"| git commit | `{man['git_commit']}` |" if man["git_commit"] else "| git commit | - |") in body
    assert "AutoModelForCausalLM.from_pretrained(path)" in body and "apply_chat_template" in body
    cfg_block = body.split("```yaml\n", 1)[1].split("```", 1)[0]
    assert yaml.safe_load(cfg_block) == man["config"]


def test_lora_adapter_and_merged_cards(lora_run):
    from deft.model_card import is_deft_card

    adapter, merged = lora_run / "model", lora_run / "merged"
    assert (adapter / "adapter_config.json").exists() and is_deft_card(adapter)  # peft's own README is replaced
    meta = front_matter(adapter / "README.md")
    card = hub_card(adapter / "README.md")
    assert card.data.library_name == "peft" and meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert meta["base_model_relation"] == "adapter" and meta["license"] == "apache-2.0" and meta["datasets"] == ["Anthropic/hh-rlhf"]
    assert {"deft", "dpo", "lora", "peft"} <= set(meta["tags"])
    assert "this folder holds a LoRA adapter" in card.text and "AutoPeftModelForCausalLM" in card.text
    assert "| LoRA | r 4, alpha 8" in card.text and "# DEFT-DPO fine-tune of HuggingFaceTB/SmolLM2-135M-Instruct" in card.text

    mmeta = front_matter(merged / "README.md")
    mcard = hub_card(merged / "README.md")
    assert mcard.data.library_name == "transformers" and mmeta["base_model_relation"] == "finetune"
    assert "lora" in mmeta["tags"] and "peft" not in mmeta["tags"] and "the LoRA adapter merged in" in mcard.text


# --------------------------------------------------------------------------- deft eval updates it


def test_eval_puts_its_results_into_the_card(assets, dpo_run, tmp_path):
    from deft.evaluate import evaluate
    from deft.model_card import EVAL_BEGIN, EVAL_END

    model = tmp_path / "model"
    shutil.copytree(dpo_run / "model", model)
    other = tmp_path / "other"  # a model folder with a README that deft did not write: left alone
    shutil.copytree(assets["model"], other)
    (other / "README.md").write_text("---\nlicense: mit\n---\n# someone's card\n")
    before = (model / "README.md").read_text()
    data = tmp_path / "test_harmless_base.jsonl"
    data.write_text("".join(l + "\n" for l in (assets["root"] / "test_harmless_base.jsonl").read_text().splitlines()[:3]))

    rep = evaluate([str(model), str(other)], [data], tmp_path / "eval", model_names=["mine", "other"], baseline="other",
                   max_new_tokens=4, batch_size=3, progress=False, device="cpu")
    doc = json.loads(rep.eval_json.read_text())
    run = next(r for r in doc["runs"] if r["name"] == "mine")
    assert (other / "README.md").read_text() == "---\nlicense: mit\n---\n# someone's card\n"

    path = model / "README.md"
    meta = front_matter(path)
    card = hub_card(path)
    assert meta["model-index"][0]["name"] == "mine"
    got = {(e.dataset_type, e.metric_type): e.metric_value for e in card.data.eval_results}
    sub = run["subsets"]["harmless_base"]
    assert got[("harmless_base", "bleu")] == pytest.approx(sub["bleu"], abs=1e-4)
    assert got[("harmless_base", "reward")] == pytest.approx(sub["reward"], abs=1e-4)
    assert got[("harmless_base", "win_rate")] == pytest.approx(run["win_tie_lose"]["win_rate"], abs=1e-4)
    body = card.text
    assert f"| harmless_base | 3 | {sub['bleu']:.4g} | {sub['reward']:.4g} |" in body and str(rep.eval_json) in body
    w = run["win_tie_lose"]
    assert f"Against `other`" in body and f"win {w['win']}, tie {w['tie']}, lose {w['lose']} of 3 prompts" in body
    # everything outside the evaluation section is as training wrote it
    outside = lambda t: (t.split("\n---\n", 1)[1].split(EVAL_BEGIN)[0], t.split(EVAL_END)[1])
    assert outside(path.read_text()) == outside(before)
    assert {k: v for k, v in meta.items() if k != "model-index"} == front_matter_of_text(before)

    # a later evaluation replaces the earlier one
    rep2 = evaluate([str(model)], [data], tmp_path / "eval2", model_names=["again"], max_new_tokens=4, batch_size=3,
                    progress=False, device="cpu", limit=2)
    meta2 = front_matter(path)
    assert [m["name"] for m in meta2["model-index"]] == ["again"]
    text = path.read_text()
    assert text.count(EVAL_BEGIN) == 1 and str(rep2.eval_json) in text and str(rep.eval_json) not in text
    assert "| harmless_base | 2 |" in text and "win_rate" not in yaml.safe_dump(meta2)


def front_matter_of_text(text: str) -> dict:
    return yaml.safe_load(text.split("\n---\n", 1)[0][4:])


# --------------------------------------------------------------------------- rendering a fixed manifest


FIXED = {
    "stage": "train", "created": "2026-12-06T10:00:00Z", "command": ["/usr/local/bin/deft", "train", "--config", "c.yaml"],
    "config": {"model": "HuggingFaceTB/SmolLM2-135M-Instruct", "data": {"levels": ["A", "B"], "max_length": 512, "max_prompt_length": 384},
               "method": {"name": "pro", "sft_weight": 0.05}, "deft": {"omega": 2.5e-5, "responses": "all"},
               "train": {"lr": 5e-6, "scheduler": "linear", "warmup_ratio": 0.1, "warmup_steps": None, "micro_batch_size": 1,
                         "gradient_accumulation_steps": 8, "seed": 42, "deepspeed": "configs/deepspeed/zero2.json"},
               "card": {"base_model": None, "license": None, "datasets": [], "top_tokens": 10}},
    "method": "pro", "deft": True, "template": "chat", "samples": 5998, "data_hash": "d" * 64,
    "graded": {"path": "runs/hh/graded.parquet", "sha256": "a" * 64}, "distribution": {"path": "q.safetensors", "sha256": "b" * 64},
    "model": {"source": "HuggingFaceTB/SmolLM2-135M-Instruct", "gguf_file": None, "fingerprint": "f"},
    "peft": None, "loading": {"dtype": "bfloat16"},
    "omega": {"value": 3.1, "source": "calibrated", "omega_share": 0.1, "ratio_median": 0.0323},
    "diagnostics": {"rdis_grad_share": {"step_0": 0.1, "median": 0.09, "last": 0.08}},
    "world_size": 8, "global_step": 750, "total_steps": 750, "steps_per_epoch": 375,
    "versions": {"deft": "0.1.0", "torch": "2.5.0", "python": "3.11.7"}, "git_commit": "c" * 40,
}


def test_render_card_from_a_fixed_manifest():
    from deft.model_card import render_card

    text = render_card(FIXED, None, None)
    assert text == render_card(copy.deepcopy(FIXED), None, None)  # deterministic
    meta = front_matter_of_text(text)
    hub.ModelCardData(**meta)
    assert meta == {"base_model": "HuggingFaceTB/SmolLM2-135M-Instruct", "base_model_relation": "finetune",
                    "library_name": "transformers", "tags": ["deft", "pro", "deft-pro"], "pipeline_tag": "text-generation"}
    assert read_card_text(text) == meta
    for line in ("# DEFT-PRO fine-tune of HuggingFaceTB/SmolLM2-135M-Instruct", "`L_m` is the PRO loss",
                 "| omega | 3.1 |", "| omega set by | calibrated to an R_dis gradient share of 0.1 (median ratio ||grad R_dis|| / ||grad L_m|| 0.0323) |",
                 "| SFT weight (NLL of the best response) | 0.05 |",
                 "5,998 samples (prompts) of levels A, B of `graded.parquet`, each trained on its ranked responses.",
                 "| epochs | 2 (375 steps per epoch) |", "| batch | 8 x 1 x 8 (processes x micro-batch x accumulation) |",
                 "| learning rate | 5e-06 (linear, warmup ratio 0.1) |", "| precision / engine | bfloat16 / DeepSpeed `zero2.json` |",
                 "0.1 at step 0, median 0.09, last 0.08", "```bash\ndeft train --config c.yaml\n```", "| git commit | `" + "c" * 40 + "` |"):
        assert line.replace("||", "\\|\\|") in text or line in text, line
    assert "## Discrepancy distribution" not in text  # no Q_diff file given
    assert "beta" not in text.split("## Data")[0]  # PRO has no beta


def test_render_card_of_the_newer_methods(tmp_path):
    """KTO / SimPO / ORPO cards: their proper names, their own settings, the (best, worst) pair, their logged metrics."""
    from deft.model_card import render_card

    m = copy.deepcopy(FIXED)
    m["method"], m["config"]["method"] = "kto", {"name": "kto", "beta": 0.1, "sft_weight": 0.0, "desirable_weight": 1.0,
                                                  "undesirable_weight": 1.33, "label_smoothing": 0.0, "variant": "default"}
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("\n".join(json.dumps({"step": i, "loss": 0.5 - 0.1 * i, "L_m": 0.5 - 0.1 * i, "kl": 0.25 * i}) for i in (1, 2)) + "\n")
    text = render_card(m, metrics, None)
    for line in ("# DEFT-KTO fine-tune of", "`L_m` is the KTO loss", "| beta | 0.1 |", "| desirable weight | 1 |",
                 "| undesirable weight | 1.33 |", "each trained on a (best, worst) pair.", "| kl | 0.25 | 0.5 | 0.375 |"):
        assert line in text, line
    assert "| variant |" not in text and "label smoothing" not in text and "| gamma" not in text
    m["method"], m["config"]["method"] = "simpo", {"name": "simpo", "beta": 2.0, "gamma": 0.5, "label_smoothing": 0.1}
    text = render_card(m, None, None)
    for line in ("`L_m` is the SimPO loss", "| beta | 2 |", "| gamma (target reward margin) | 0.5 |", "| label smoothing | 0.1 |",
                 "each trained on a (best, worst) pair."):
        assert line in text, line
    m["method"], m["config"]["method"] = "orpo", {"name": "orpo", "beta": 0.1, "label_smoothing": 0.0}
    assert "| beta (ORPO's lambda) | 0.1 |" in render_card(m, None, None)
    m["method"], m["config"]["method"] = "pro", {"name": "pro", "sft_weight": 0.05, "variant": "official"}
    text = render_card(m, None, None)
    assert "| variant | official (the reference implementation's loss) |" in text and "its ranked responses" in text

def read_card_text(text: str) -> dict:
    import tempfile

    from deft.model_card import read_card

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "README.md"
        p.write_text(text)
        return read_card(p)[0]


def test_base_model_license_and_datasets(tmp_path):
    from deft.model_card import base_model_id, card_metadata, render_card

    m = copy.deepcopy(FIXED)
    local = tmp_path / "base"
    local.mkdir()
    m["model"]["source"] = m["config"]["model"] = str(local)
    assert base_model_id(m) is None and "license" not in card_metadata(m)
    (local / "README.md").write_text("---\nlicense: apache-2.0\nlibrary_name: transformers\n---\n# base\n")
    meta = card_metadata(m)
    assert "base_model" not in meta and meta["license"] == "apache-2.0"  # the base folder's own card's license
    cache = tmp_path / "hub" / "models--HuggingFaceTB--SmolLM2-360M" / "snapshots" / "abc"
    cache.mkdir(parents=True)
    m["model"]["source"] = str(cache)
    assert base_model_id(m) == "HuggingFaceTB/SmolLM2-360M"
    m["config"]["card"] = {"base_model": "org/name", "license": "mit", "datasets": ["Anthropic/hh-rlhf"], "top_tokens": 10}
    meta = card_metadata(m)
    assert (meta["base_model"], meta["license"], meta["datasets"]) == ("org/name", "mit", ["Anthropic/hh-rlhf"])
    hub.ModelCardData(**meta)
    # the plain baseline: no R_dis, no Q_diff
    m["deft"], m["method"], m["config"]["method"] = False, "dpo", {"name": "dpo", "beta": 0.1, "label_smoothing": 0.0}
    text = render_card(m, None, None)
    assert "# DPO fine-tune of org/name" in text and "Loss `L = L_m`, the plain DPO loss" in text and "| omega |" not in text
    assert "deft-dpo" not in front_matter_of_text(text)["tags"] and "| beta | 0.1 |" in text


def test_command_line_as_typed():
    from deft.model_card import _command

    assert _command(["/usr/bin/deft", "run", "--config", "my config.yaml"]) == "deft run --config 'my config.yaml'"
    assert _command(["/x/python/deft/__main__.py", "train", "--set", "train.lr=1e-6"]) == "python -m deft train --set train.lr=1e-6"
    assert _command([]) is None and _command(None) is None


EVAL_DOC = {
    "format": "deft-eval-v1", "created": "2026-12-06T11:00:00Z", "subsets": ["harmless_base", "helpful_base"],
    "reward_model": {"name": "OpenAssistant/reward-model-deberta-v3-large-v2"},
    "settings": {"data": ["a/test_harmless_base.jsonl.gz", "a/test_helpful_base.jsonl.gz"], "limit": None, "max_new_tokens": 128},
    "runs": [{"name": "deft-pro", "model": "runs/x/train/model", "template": "chat",
              "subsets": {"harmless_base": {"samples": 10, "bleu": 12.5, "reward": 60.25, "sacrebleu": 3.0},
                          "helpful_base": {"samples": 30, "bleu": 20.0, "reward": 70.0, "sacrebleu": float("nan")}},
              "total": {"samples": 40, "bleu": 18.125, "reward": 67.5625, "sacrebleu": 4.0},
              "win_tie_lose": {"baseline": "base", "n": 40, "win": 20, "tie": 10, "lose": 10, "win_rate": 0.5, "tie_margin": 1.0},
              "mt_bench_questions": 0}],
}


def test_update_card_eval_unit(tmp_path):
    from deft.model_card import render_card, update_card_eval

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "README.md").write_text(render_card(FIXED, None, None))
    assert update_card_eval(folder, EVAL_DOC, "deft-pro", tmp_path / "eval.json") == folder / "README.md"
    meta = front_matter(folder / "README.md")
    hub.ModelCardData(**meta)
    (entry,) = meta["model-index"]
    assert entry["name"] == "deft-pro"
    by = {r["dataset"]["type"]: {m["type"]: m["value"] for m in r["metrics"]} for r in entry["results"]}
    assert by == {"harmless_base": {"bleu": 12.5, "reward": 60.25, "sacrebleu": 3.0},
                  "helpful_base": {"bleu": 20.0, "reward": 70.0},  # NaN left out
                  "all": {"bleu": 18.125, "reward": 67.5625, "sacrebleu": 4.0, "win_rate": 0.5}}
    text = (folder / "README.md").read_text()
    assert "| Total | 40 | 18.12 | 67.56 | 4 |" in text and "| helpful_base | 30 | 20 | 70 | - |" in text
    assert "win 20, tie 10, lose 10 of 40 prompts (win rate 50.0%)" in text
    with pytest.raises(ValueError, match=r"eval.json: no run named 'nope' \(runs: \['deft-pro'\]\)"):
        update_card_eval(folder, EVAL_DOC, "nope", tmp_path / "eval.json")
    # not a deft card: untouched
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "README.md").write_text("# hello\n")
    assert update_card_eval(tmp_path / "foreign", EVAL_DOC, "deft-pro") is None
    assert (tmp_path / "foreign" / "README.md").read_text() == "# hello\n"
    assert update_card_eval(tmp_path, EVAL_DOC, "deft-pro") is None  # no README at all


def test_bad_inputs_name_the_file(tmp_path):
    from deft.model_card import read_card, training_summary

    p = tmp_path / "README.md"
    p.write_text("---\nlicense: mit\n# never closed\n")
    with pytest.raises(ValueError, match=f"{p}: the front matter opened by '---' on line 1 is never closed"):
        read_card(p)
    p.write_text("---\n- a list\n---\nbody\n")
    with pytest.raises(ValueError, match="front matter is not a mapping"):
        read_card(p)
    m = tmp_path / "metrics.jsonl"
    m.write_text('{"step": 1, "loss": 1.0}\n{not json\n')
    with pytest.raises(ValueError, match=f"{m}:2: not valid JSON"):
        training_summary(m)
    assert training_summary(tmp_path / "absent.jsonl") == {"steps": 0, "train": {}, "eval": {}}


def test_card_config_keys(assets, tmp_path):
    from deft.config import ConfigError, load_config
    from deft.pipeline import train_fingerprint_config

    base = train_overrides(assets, tmp_path / "x")
    with pytest.raises(ConfigError, match="card.top_tokens: must be >= 0, got -1"):
        load_config(None, base + ["card.top_tokens=-1"])
    with pytest.raises(ConfigError, match="card.datasets"):
        load_config(None, base + ["card.datasets=[1]"])
    a = load_config(None, base)
    b = load_config(None, base + ["card.base_model=org/name", "card.license=mit"])
    assert train_fingerprint_config(a) == train_fingerprint_config(b)  # the card does not change what is trained


def test_qdiff_section_top_tokens_and_a_changed_file(assets):
    from deft.distribution import load_distribution, resolve_tokenizer, top_tokens
    from deft.io import sha256_file
    from deft.model_card import render_card

    tok = resolve_tokenizer(str(assets["model"]))
    text = render_card(FIXED, None, assets["dist"], tokenizer=tok, top=3)
    top = top_tokens(load_distribution(assets["dist"]), tok, 3)
    assert "Top 3 tokens each way" in text and "| 4 |" not in text.split("## Training")[0].split("Top 3")[1]
    assert f"| 3 | `{top['positive'][2]['text']!r}` |" in text
    # FIXED recorded another SHA-256 for its distribution: the card says the file changed since training
    assert f"the file changed since training (trained with SHA-256 `{'b' * 64}`)" in text and sha256_file(assets["dist"]) in text
    no_top = render_card(FIXED, None, assets["dist"], tokenizer=tok, top=0)
    assert "## Discrepancy distribution" in no_top and "tokens each way" not in no_top
    assert "tokens each way" not in render_card(FIXED, None, assets["dist"])  # no tokenizer: no decoded tokens


def test_a_card_failure_is_a_warning_not_a_failed_run(assets, tmp_path, monkeypatch, capsys):
    import deft.train as train_mod

    def broken(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(train_mod, "write_card", broken)
    res = train_mod.run(None, train_overrides(assets, tmp_path / "run", **{"train.max_steps": 1, "train.gradient_accumulation_steps": 1}))
    assert res.global_step == 1 and (tmp_path / "run" / "model" / "model.safetensors").exists()
    assert not (tmp_path / "run" / "model" / "README.md").exists() and (tmp_path / "run" / "manifest.json").exists()
    outputs = json.loads((tmp_path / "run" / "manifest.json").read_text())["outputs"]
    assert "card" not in outputs and outputs["model"] == str(tmp_path / "run" / "model")  # only what was written
    assert f"warning: model card {tmp_path / 'run' / 'model' / 'README.md'} not written: RuntimeError: boom" in capsys.readouterr().err


def test_data_section_names_the_grading_from_its_manifest(tmp_path):
    from deft.model_card import render_card

    m = copy.deepcopy(FIXED)
    m["graded"]["path"] = str(tmp_path / "graded.parquet")
    assert "graded by" not in render_card(m, None, None)  # no grading manifest beside the file
    (tmp_path / "manifest.json").write_text(json.dumps({
        "stage": "grade", "inputs": [{"path": "../shared/data/pro-hh/test_harmless_base.jsonl.gz", "sha256": "e" * 64}],
        "parameters": {"reward_model": "OpenAssistant/oasst-rm-2.1-pythia-1.4b-epoch-2.5", "a": 3.73, "c": 12.5}}))
    text = render_card(m, None, None)
    assert "| graded by | `OpenAssistant/oasst-rm-2.1-pythia-1.4b-epoch-2.5` (a = 3.73, c = 12.5) |" in text
    assert "| graded from | `test_harmless_base.jsonl.gz` |" in text
