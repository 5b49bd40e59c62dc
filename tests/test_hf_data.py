"""Hugging Face datasets in (`deft.data.load` of a Dataset, a DatasetDict split, a save_to_disk folder,
hf:NAME[:CONFIG][:SPLIT] from the local cache) and out (`deft export`), on the real HH and PRO files."""

from __future__ import annotations

import copy
import gzip
import json
import shutil
import sys

import numpy as np
import polars as pl
import pytest
from conftest import shared_file
from typer.testing import CliRunner

datasets = pytest.importorskip("datasets", reason="needs the datasets package (pip install \"deft[hf]\")")

import deft.data.fast as fast  # noqa: E402
from deft.cli import app  # noqa: E402
from deft.data import DataError, load  # noqa: E402
from deft.export import export_files, export_pairs  # noqa: E402
from deft.render import render_hh  # noqa: E402

runner = CliRunner()
HH = "data/hh-rlhf/harmless-base-test.jsonl.gz"
PRO = "data/pro-hh/test_harmless_base.jsonl.gz"
N = 40
SAME = ["context", "responses", "scores", "ranked", "meta"]  # what does not depend on where the rows came from


def _head(relative: str, n: int = N) -> list:
    with gzip.open(shared_file(relative), "rt", encoding="utf-8") as f:
        return [json.loads(next(f)) for _ in range(n)]


@pytest.fixture(scope="module")
def hh_rows() -> list:
    return _head(HH)


@pytest.fixture(scope="module")
def pro_rows() -> list:
    return _head(PRO)


@pytest.fixture(scope="module")
def files(tmp_path_factory, hh_rows, pro_rows) -> dict:
    """The same rows as JSON Lines files, loaded the ordinary way (the reference)."""
    d = tmp_path_factory.mktemp("files")
    out = {}
    for name, rows in (("harmless-base-test.jsonl", hh_rows), ("test_harmless_base.jsonl", pro_rows)):
        (d / name).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        out[name] = d / name
    return out


def _same_rows(a: pl.DataFrame, b: pl.DataFrame) -> None:
    assert a.select(SAME).equals(b.select(SAME))


@pytest.fixture()
def trace(monkeypatch):
    monkeypatch.setattr(fast, "_fast_trace", [])
    return fast._fast_trace


# --------------------------------------------------------------------------- Dataset objects


@pytest.mark.parametrize("loader", ["auto", "rows"])
def test_dataset_object_hh_and_pro(hh_rows, pro_rows, files, monkeypatch, trace, loader):
    monkeypatch.setenv("DEFT_LOADER", loader)
    for rows, name, fmt in ((hh_rows, "harmless-base-test.jsonl", "hh"), (pro_rows, "test_harmless_base.jsonl", "pro")):
        ref = load(files[name])
        res = load(datasets.Dataset.from_list(rows), subset="harmless_base")
        assert res.format == fmt and res.n_read == N
        _same_rows(res.frame, ref.frame)
        assert res.frame["id"].to_list() == [f"dataset:{i}" for i in range(1, N + 1)]
        assert res.frame["source_file"].unique().to_list() == ["dataset"]
        assert res.frame["source_line"].to_list() == list(range(1, N + 1))
        assert res.frame["subset"].unique().to_list() == ["harmless_base"]
        assert [(n.line, n.field) for n in res.notes] == [(n.line, n.field) for n in ref.notes]
    # the Arrow table went through the fast path unless DEFT_LOADER=rows
    assert [d for f, d in trace if f == "dataset"] == (["fast", "fast"] if loader == "auto" else [])


def test_dataset_trl_conversational_pairs_and_scores():
    rows = [
        {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}],
         "chosen": [{"role": "assistant", "content": "Hello."}], "rejected": [{"role": "assistant", "content": "Go away."}],
         "score_chosen": 2.0, "score_rejected": -1.0},
        {"prompt": [{"role": "user", "content": "2+2?"}], "chosen": [{"role": "assistant", "content": "4"}],
         "rejected": [{"role": "assistant", "content": "5"}], "score_chosen": 1.5, "score_rejected": 0.5},
    ]
    res = load(datasets.Dataset.from_list(rows))
    assert res.format == "pairs"
    f = res.frame
    assert f["context"].to_list()[0] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]
    assert f["responses"].to_list() == [["Hello.", "Go away."], ["4", "5"]]
    assert f["scores"].to_list() == [[2.0, -1.0], [1.5, 0.5]]


def test_bad_row_names_the_dataset_and_row():
    rows = [{"prompt": "q", "chosen": "a", "rejected": "b"}] * 2 + [{"prompt": "q", "chosen": "a", "rejected": "  "}]
    ds = datasets.Dataset.from_list(rows)
    with pytest.raises(DataError) as err:
        load(ds)
    assert (err.value.file, err.value.line, err.value.field) == ("dataset", 3, "rejected")
    assert str(err.value) == "dataset:3: field 'rejected': response 1 is empty or whitespace-only"
    res = load(ds, on_error="skip")
    assert res.frame.height == 2 and [(r.file, r.line, r.field) for r in res.rejects] == [("dataset", 3, "rejected")]
    assert json.loads(res.rejects[0].raw) == rows[2]


def test_several_unnamed_objects_get_distinct_ids(hh_rows, files):
    """Objects without a dataset name are all ``dataset``: in one load_many the second and later are numbered
    by their position, so their default ids differ; the same object twice still gives duplicate ids."""
    from deft.data import load_many

    a, b = datasets.Dataset.from_list(hh_rows[:5]), datasets.Dataset.from_list(hh_rows[5:8])
    c = datasets.DatasetDict({"test": datasets.Dataset.from_list(hh_rows[8:10])})
    res = load_many([files["harmless-base-test.jsonl"], a, b, c])
    ids = res.frame["id"].to_list()
    assert ids[N:] == [f"dataset:{i}" for i in range(1, 6)] + [f"dataset#3:{i}" for i in (1, 2, 3)] + ["dataset#4[test]:1", "dataset#4[test]:2"]
    assert res.frame["source_file"].to_list()[N + 5] == "dataset#3"
    assert load(b).frame["id"][0] == "dataset:1"  # alone: not numbered
    for twice, first in (([a, a], "dataset"), ([a, b, a], "dataset"), ([b, a, a], "dataset#2")):
        with pytest.raises(DataError, match=rf"duplicate id '{first}:1': already used by {first}:1\b"):
            load_many(twice)


def test_dataset_dict_split_and_errors(hh_rows):
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(hh_rows[:10]), "test": datasets.Dataset.from_list(hh_rows[10:])})
    res = load(dd["test"])
    assert res.frame.height == N - 10 and res.frame["id"][0] == "dataset:1"  # (from_list: no name, no split)
    with pytest.raises(DataError, match=r"a DatasetDict with the splits train, test: pass one of them"):
        load(dd)
    one = load(datasets.DatasetDict({"test": dd["test"]}))  # one split: taken, and named
    assert one.frame["id"][0] == "dataset[test]:1" and one.frame.select(SAME).equals(res.frame.select(SAME))
    with pytest.raises(DataError, match="streaming"):
        load(dd["test"].to_iterable_dataset())
    with pytest.raises(DataError, match="dataset is empty"):
        load(dd["test"].select([]))


def test_missing_datasets_package_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(DataError, match=r"needs the 'datasets' package: pip install \"deft\[hf\]\""):
        load("hf:Anthropic/hh-rlhf")


# --------------------------------------------------------------------------- save_to_disk folders


def test_save_to_disk_folders(hh_rows, files, tmp_path):
    ref = load(files["harmless-base-test.jsonl"]).frame
    ds = datasets.Dataset.from_list(hh_rows)
    ds.save_to_disk(str(tmp_path / "harmless-base-test"))
    res = load(tmp_path / "harmless-base-test")
    _same_rows(res.frame, ref)
    assert res.frame["id"][0] == "harmless-base-test:1" and res.frame["subset"][0] == "harmless_base"
    assert res.frame["source_file"][0] == str(tmp_path / "harmless-base-test")
    # a DatasetDict folder: its split folder, or the folder itself when it holds one split
    datasets.DatasetDict({"train": ds.select(range(5)), "test": ds}).save_to_disk(str(tmp_path / "hh"))
    split = load(tmp_path / "hh" / "test")
    _same_rows(split.frame, ref)
    assert split.frame["id"][0] == "hh/test:1" and split.frame["subset"][0] == "hh"
    with pytest.raises(DataError, match=r"splits train, test: pass one split's folder, e\.g\. .*hh/test"):
        load(tmp_path / "hh")
    # any other folder is still refused as before
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError, match="not a regular file but a folder"):
        load(tmp_path / "plain")


# --------------------------------------------------------------------------- hf: from the local cache


@pytest.fixture()
def hf_cache(tmp_path, hh_rows, monkeypatch):
    """A local datasets cache holding `deft-test/hh-rlhf` (splits train and test) as a hub download leaves
    it: `datasets.load_dataset` of a data-files folder writes NAME/default/0.0.0/HASH/NAME-SPLIT.arrow; a hub
    dataset lives under NAMESPACE___NAME instead, so the folder is moved there."""
    repo = tmp_path / "repo" / "hh-rlhf"
    repo.mkdir(parents=True)
    (repo / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in hh_rows), encoding="utf-8")
    (repo / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in hh_rows[:7]), encoding="utf-8")
    cache = tmp_path / "cache"
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    datasets.load_dataset(str(repo), cache_dir=str(cache))
    shutil.move(str(cache / "hh-rlhf"), str(cache / "deft-test___hh-rlhf"))
    return cache


def test_hf_from_local_cache(hf_cache, files, hh_rows, monkeypatch):
    ref = load(files["harmless-base-test.jsonl"]).frame
    for spec in ("hf:deft-test/hh-rlhf:default:test", "hf:deft-test/hh-rlhf:test", "hf:deft-test/hh-rlhf::test"):
        res = load(spec)
        _same_rows(res.frame, ref)
        assert res.frame["source_file"][0] == "hf:deft-test/hh-rlhf:default:test"
        assert res.frame["id"][1] == "hf:deft-test/hh-rlhf:default:test:2" and res.frame["subset"][0] == "hh_rlhf"
    assert load("hf:deft-test/hh-rlhf:default:train").frame.height == 7
    # datasets itself, offline, resolves the same cache entry to the same rows
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    own = datasets.load_dataset("deft-test/hh-rlhf", split="test", cache_dir=str(hf_cache))
    assert own.to_list() == hh_rows


def test_hf_errors(hf_cache):
    cases = {
        "hf:deft-test/hh-rlhf": "has the splits train, test: name one, hf:deft-test/hh-rlhf:default:SPLIT",
        "hf:deft-test/hh-rlhf:valid": "'valid' is neither a cached configuration of deft-test/hh-rlhf (default) nor a split",
        "hf:deft-test/hh-rlhf:default:valid": "has no split 'valid' in the cache (cached splits of default: train, test)",
        "hf:deft-test/hh-rlhf:other:test": "configuration 'other' of deft-test/hh-rlhf (cached: default) is not in the local",
        "hf:deft-test/hh": f"deft-test/hh is not in the local Hugging Face datasets cache {hf_cache}",
        "hf:../etc": "expected hf:NAME[:CONFIG][:SPLIT]",
        "hf:a:b:c:d": "expected hf:NAME[:CONFIG][:SPLIT]",
    }
    for spec, reason in cases.items():
        with pytest.raises(DataError) as err:
            load(spec)
        assert err.value.file == spec and reason in err.value.reason, str(err.value)
    with pytest.raises(DataError) as err:
        load("hf:deft-test/hh")
    assert "never downloads" in str(err.value) and "datasets.load_dataset('deft-test/hh')" in str(err.value)
    assert "save_to_disk(DIR) and pass DIR" in str(err.value)


# --------------------------------------------------------------------------- deft grade / select on these sources


def test_cli_grade_on_save_to_disk_folder(pro_rows, files, tmp_path):
    folder = tmp_path / "test_harmless_base"
    datasets.Dataset.from_list(pro_rows).save_to_disk(str(folder))
    out = tmp_path / "g"
    r = runner.invoke(app, ["grade", "--input", str(folder), "--use-input-scores", "--a", "10", "--output-dir", str(out)])
    assert r.exit_code == 0, r.output
    graded = pl.read_parquet(out / "graded.parquet")
    ref = runner.invoke(app, ["grade", "--input", str(files["test_harmless_base.jsonl"]), "--use-input-scores", "--a", "10",
                              "--output-dir", str(tmp_path / "ref")])
    assert ref.exit_code == 0, ref.output
    want = pl.read_parquet(tmp_path / "ref" / "graded.parquet")
    cols = ["context", "responses", "scores", "polarity", "level", "subset"]
    assert graded.select(cols).equals(want.select(cols))
    man = json.loads((out / "manifest.json").read_text())
    rec = man["inputs"][0]
    assert rec["path"] == str(folder) and rec["kind"] == "save_to_disk" and rec["rows"] == N
    assert len(rec["sha256"]) == 64 and rec["bytes"] > 0
    # a bad folder is one error line, exit status 2
    bad = runner.invoke(app, ["grade", "--input", str(tmp_path), "--use-input-scores", "--output-dir", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "not a regular file but a folder" in bad.output


def test_pipeline_input_hash_of_a_folder(hh_rows, tmp_path):
    """`deft run` decides whether grading is up to date from its inputs' hashes: a folder's follows its rows."""
    from deft.pipeline import file_hash

    datasets.Dataset.from_list(hh_rows).save_to_disk(str(tmp_path / "a"))
    datasets.Dataset.from_list(hh_rows).save_to_disk(str(tmp_path / "b"))
    datasets.Dataset.from_list(hh_rows[:-1]).save_to_disk(str(tmp_path / "c"))
    a, b, c = (file_hash(tmp_path / n) for n in "abc")
    assert a["path"] == str(tmp_path / "a") and len(a["sha256"]) == 64
    assert a["sha256"] == b["sha256"] != c["sha256"]


def test_select_on_hf_source(hf_cache, tmp_path):
    from deft.select import select_files

    emb = np.random.default_rng(0).normal(size=(2 * N, 8))
    out = tmp_path / "sel.parquet"
    res = select_files(["hf:deft-test/hh-rlhf:test"], out, strategy="easy", fraction=0.5, embeddings=emb, progress=False)
    assert res.n_kept == N // 2 and load(out).frame.height == N // 2
    man = json.loads((tmp_path / "sel.manifest.json").read_text())
    assert man["inputs"][0]["path"] == "hf:deft-test/hh-rlhf:default:test" and man["inputs"][0]["kind"] == "hf"


# --------------------------------------------------------------------------- deft export


@pytest.fixture(scope="module")
def graded(tmp_path_factory, files):
    from deft.grade import grade_files

    out = tmp_path_factory.mktemp("graded")
    grade_files([files["test_harmless_base.jsonl"]], out, use_input_scores=True, a=20, progress=False)
    return out / "graded.parquet"


def test_export_round_trip(graded, tmp_path):
    g = pl.read_parquet(graded).filter(pl.col("level") == "A")
    assert g.height == 8
    for name in ("a.parquet", "b.jsonl", "c.jsonl.gz", "d-hf"):
        res = export_files(graded, tmp_path / name, levels=["A"])
        assert res.counts == {"samples": 8, "pairs": 8, "no_preference": 0, "rejected": 0}
        back = load(tmp_path / name)
        assert back.format == "pairs"
        f = back.frame
        assert f["id"].to_list() == g["id"].to_list() and f["subset"].to_list() == g["subset"].to_list()
        assert f["context"].to_list() == g["context"].to_list()
        assert f["responses"].to_list() == [[r[0], r[-1]] for r in g["responses"].to_list()]
        assert f["scores"].to_list() == [[s[0], s[-1]] for s in g["scores"].to_list()]
        assert all(json.loads(m) == {"level": "A"} for m in f["meta"].to_list())
        man = json.loads(res.manifest_path.read_text())
        assert man["stage"] == "export" and man["counts"]["pairs"] == 8 and man["parameters"]["levels"] == ["A"]
    ds = datasets.load_from_disk(str(tmp_path / "d-hf"))
    assert ds.num_rows == 8 and ds.column_names == ["id", "subset", "prompt", "chosen", "rejected", "score_chosen",
                                                    "score_rejected", "level"]
    assert ds[0]["chosen"] == [{"role": "assistant", "content": g["responses"][0][0]}]
    assert ds.to_list() == pl.read_parquet(tmp_path / "a.parquet").to_dicts()
    assert not list(tmp_path.glob(".*partial")) and not list(tmp_path.glob(".*.tmp"))


def test_export_standard_style_all_pairs_and_order_rules(graded, tmp_path):
    g = pl.read_parquet(graded).filter(pl.col("level") == "A")
    res = export_pairs(g, style="standard")
    row = res.records.row(0, named=True)
    assert row["prompt"] == render_hh(g["context"][0].to_list()) and row["prompt"].endswith("\n\nAssistant:")
    assert row["chosen"] == " " + g["responses"][0][0] and row["rejected"] == " " + g["responses"][0][-1]
    # canonical input: ranked rows keep their order, unranked ones go by score, neither: no pair
    canon = pl.DataFrame({
        "id": ["r", "s", "n", "t"], "subset": ["x"] * 4,
        "context": [[{"role": "user", "content": "q"}]] * 4,
        "responses": [["a", "b", "c"], ["lo", "hi"], ["u", "v"], ["same", "same2"]],
        "scores": [None, [0.0, 1.0], None, [1.0, 1.0]], "ranked": [True, False, False, False],
    })
    res = export_pairs(canon, pairs="all")
    assert [(r["id"], r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in res.records.iter_rows(named=True)] == [
        ("r#0-1", "a", "b"), ("r#0-2", "a", "c"), ("r#1-2", "b", "c"), ("s#1-0", "hi", "lo")]
    assert res.counts == {"samples": 4, "pairs": 4, "no_preference": 2}
    twice = canon.with_columns(pl.Series("responses", [["a", "a", "c"], ["lo", "hi"], ["u", "v"], ["x", "y"]]))
    ids = export_pairs(twice, pairs="all").records["id"].to_list()
    assert ids == ["r#0-2", "r#1-2", "s#1-0"]  # a against a is no preference
    with pytest.raises(ValueError, match="levels need a graded.parquet"):
        export_pairs(canon, levels=["A"])
    mid = canon.head(1).with_columns(pl.Series("context", [[{"role": "user", "content": "q"}, {"role": "system", "content": "s"}]]))
    with pytest.raises(ValueError, match="sample r: context turn 1: HH transcripts have no system role.*style conversational"):
        export_pairs(mid, style="standard")


def test_export_standard_style_gives_back_the_hh_transcripts(hh_rows, tmp_path):
    folder = tmp_path / "harmless-base-test"
    datasets.Dataset.from_list(hh_rows).save_to_disk(str(folder))
    res = export_files(folder, tmp_path / "hh.jsonl", style="standard")
    assert res.counts == {"samples": N, "pairs": N, "no_preference": 0, "rejected": 0}
    out = [json.loads(line) for line in (tmp_path / "hh.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [(r["prompt"] + r["chosen"], r["prompt"] + r["rejected"]) for r in out] == [(r["chosen"], r["rejected"]) for r in hh_rows]
    man = json.loads(res.manifest_path.read_text())
    assert man["inputs"][0]["kind"] == "save_to_disk" and man["parameters"]["style"] == "standard"


def test_export_errors(graded, tmp_path):
    export_files(graded, tmp_path / "p.parquet", levels=["A"])
    with pytest.raises(FileExistsError, match="already exists"):
        export_files(graded, tmp_path / "p.parquet", levels=["A"])
    export_files(graded, tmp_path / "p.parquet", levels=["B"], overwrite=True)
    assert pl.read_parquet(tmp_path / "p.parquet")["level"].unique().to_list() == ["B"]
    with pytest.raises(ValueError, match="--format hf writes a folder name"):
        export_files(graded, tmp_path / "q.parquet", format="hf")
    with pytest.raises(ValueError, match="unsupported output extension"):
        export_files(graded, tmp_path / "q.json")
    with pytest.raises(ValueError, match="unknown level 'D'"):
        export_files(graded, tmp_path / "q.parquet", levels=["A,D"])
    flat = tmp_path / "flat.jsonl"
    flat.write_text(json.dumps({"prompt": "q", "responses": ["a", "b"], "scores": [1.0, 1.0], "ranked": False}) + "\n")
    with pytest.raises(ValueError, match="no pairs to export from .*flat.jsonl: 1 samples, 1 of them without a preference"):
        export_files(flat, tmp_path / "none.jsonl")


def test_cli_export(graded, tmp_path):
    r = runner.invoke(app, ["export", "-i", str(graded), "-o", str(tmp_path / "pairs"), "--levels", "A,B", "--format", "hf"])
    assert r.exit_code == 0, r.output
    assert "exported" in r.output and datasets.load_from_disk(str(tmp_path / "pairs")).num_rows == 8 + 27  # A + B of 40
    again = runner.invoke(app, ["export", "-i", str(graded), "-o", str(tmp_path / "pairs")])
    assert again.exit_code == 2 and "already exists" in again.output
    bad = runner.invoke(app, ["export", "-i", str(graded), "-o", str(tmp_path / "x.parquet"), "--style", "chatty"])
    assert bad.exit_code == 2 and "style must be one of conversational, standard" in bad.output


def test_export_feeds_trl_dpo_trainer(graded, tmp_path):
    """TRL's DPOTrainer takes the hf folder as it is and tokenises it exactly as the same pairs written by hand."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from trl import DPOConfig, DPOTrainer

    res = export_files(graded, tmp_path / "pairs", levels=["A"])
    ds = datasets.load_from_disk(str(res.output_path)).select(range(3))
    tok = AutoTokenizer.from_pretrained(str(shared_file("tokenizers/smollm2")))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=2048)
    model = LlamaForCausalLM(cfg)

    def tokenised(train):
        args = DPOConfig(output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True, bf16=False, max_length=None,
                         dataset_num_proc=None, disable_tqdm=True)
        t = DPOTrainer(model=model, ref_model=copy.deepcopy(model), args=args, train_dataset=train, processing_class=tok)
        return [{k: list(t.train_dataset[i][k]) for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for i in range(3)]

    g = pl.read_parquet(graded).filter(pl.col("level") == "A").head(3)
    by_hand = datasets.Dataset.from_list([
        {"prompt": [dict(m) for m in c], "chosen": [{"role": "assistant", "content": r[0]}],
         "rejected": [{"role": "assistant", "content": r[-1]}]}
        for c, r in zip(g["context"].to_list(), g["responses"].to_list())])
    assert tokenised(ds) == tokenised(by_hand)
