"""``deft.pipeline.write_report``: every section's content, not only its
heading, from stage artifacts written by hand here (the pipeline test checks
the same report end to end on a real run)."""

from __future__ import annotations

import json
from pathlib import Path

from deft.pipeline import StageResult, write_report

CFG = {"model": "HuggingFaceTB/SmolLM2-135M-Instruct", "gguf_file": "smollm2.Q4_1.gguf", "method": {"name": "dpo"},
       "deft": {"enabled": True, "omega": 2.5e-6}, "data": {"levels": ["A", "B"]}}


def _write(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj), encoding="utf-8")


def _run_dir(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    _write(run / "grade" / "manifest.json", {
        "parameters": {"reward_model": "builtin", "a": 3.73, "c": 12.5, "per_subset": False},
        "counts": {"harmless_base/A": {"samples": 2, "q_pos": 3, "q_neg": 2},
                   "harmless_base/B": {"samples": 40, "q_pos": 41, "q_neg": 7},
                   "helpful_base/C": {"samples": 6, "q_pos": 6, "q_neg": 5}}})
    _write(run / "distribution" / "top_tokens.json", {
        "positive": [{"text": " sorry", "q_diff": 0.0123}, {"text": "|", "q_diff": 0.004}],
        "negative": [{"text": " kill", "q_diff": -0.0201}]})
    rows = [{"step": 1, "loss": 0.6931, "L_m": 0.6931, "R_dis": -0.1142, "rewards/margins": 0.0, "rewards/accuracy": 0.0, "lr": 1e-6},
            {"step": 2, "loss": 0.5, "L_m": 0.5, "R_dis": -0.1, "rewards/margins": 0.25, "rewards/accuracy": 0.5, "lr": 1e-6},
            {"step": 3, "loss": 0.41234, "L_m": 0.41233, "R_dis": -0.0987, "rewards/margins": 0.5678, "rewards/accuracy": 1.0, "lr": 1e-6}]
    _write(run / "train" / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    _write(run / "eval" / "eval.md", "# deft eval\n\n## Reward\n\n| model | harmless |\n|:---|---:|\n| base | 1.25 |\n")
    return run


def _results(run: Path):
    return [StageResult("select", "disabled", run / "select", "f0"),
            StageResult("grade", "ran", run / "grade", "f1", seconds=12.34),
            StageResult("distribution", "skipped", run / "distribution", "f2"),
            StageResult("train", "resumed", run / "train", "f3", seconds=100.0),
            StageResult("eval", "ran", run / "eval", "f4", seconds=7.06)]


def test_report_sections_carry_the_artifacts_values(tmp_path):
    run = _run_dir(tmp_path)
    text = write_report(run, CFG, _results(run)).read_text(encoding="utf-8")
    lines = text.splitlines()
    assert lines[0] == f"# deft run: {run}"
    assert ("Policy `HuggingFaceTB/SmolLM2-135M-Instruct` (smollm2.Q4_1.gguf), method DEFT-DPO (omega 2.5e-06), "
            "trained on levels A, B.") in lines
    # stage table: every stage, its action, seconds to one decimal, folder
    i = lines.index("| stage | action | seconds | folder |")
    assert lines[i + 1] == "|:---|:---|---:|---:|"
    assert lines[i + 2:i + 7] == [f"| select | disabled | 0.0 | `{run / 'select'}` |",
                                  f"| grade | ran | 12.3 | `{run / 'grade'}` |",
                                  f"| distribution | skipped | 0.0 | `{run / 'distribution'}` |",
                                  f"| train | resumed | 100.0 | `{run / 'train'}` |",
                                  f"| eval | ran | 7.1 | `{run / 'eval'}` |"]
    # grading: the parameters and one row per subset/level, sorted
    assert "Reward model `builtin`, a = 3.73%, c = 12.5%, all subsets graded together." in lines
    i = lines.index("| subset | level | samples | Q+ responses | Q- responses |")
    assert lines[i + 2:i + 5] == ["| harmless_base | A | 2 | 3 | 2 |", "| harmless_base | B | 40 | 41 | 7 |",
                                  "| helpful_base | C | 6 | 6 | 5 |"]
    assert "![best scores]" not in text  # no plot on disk, no link
    # Q_diff tokens: repr'd text (so whitespace shows), signed, a '|' escaped; an empty cell where a side runs out
    i = lines.index("| most positive (Q+ side) | most negative (Q- side) |")
    assert lines[i + 2:i + 4] == ["| `' sorry'` +1.23e-02 | `' kill'` -2.01e-02 |", "| `'\\|'` +4.00e-03 |  |"]
    # training: first and last step, 4 significant digits, and the curves
    i = lines.index("|  | loss | L_m | R_dis | rewards/margins | rewards/accuracy |")
    assert lines[i + 2:i + 4] == ["| step 1 | 0.6931 | 0.6931 | -0.1142 | 0 | 0 |",
                                  "| step 3 | 0.4123 | 0.4123 | -0.0987 | 0.5678 | 1 |"]
    assert "![training curves](train_curves.png)" in lines and (run / "train_curves.png").stat().st_size > 1000
    # evaluation: eval.md without its title, its headings one level down
    i = lines.index("## Evaluation")
    assert lines[i + 1:i + 7] == ["", "### Reward", "", "| model | harmless |", "|:---|---:|", "| base | 1.25 |"]
    assert "# deft eval" not in lines
    assert [l for l in lines if l.startswith("## ")] == ["## Grading", "## Discrepancy distribution: top Q_diff tokens",
                                                        "## Training", "## Evaluation"]


def test_report_plain_method_per_subset_and_disabled_eval(tmp_path):
    run = _run_dir(tmp_path)
    (run / "eval" / "eval.md").unlink()
    man = json.loads((run / "grade" / "manifest.json").read_text())
    man["parameters"]["per_subset"] = True
    _write(run / "grade" / "manifest.json", man)
    _write(run / "grade" / "best_scores.png", "png")
    cfg = {**CFG, "gguf_file": None, "deft": {"enabled": False, "omega": 2.5e-6}, "method": {"name": "pro"}}
    results = _results(run)
    results[-1] = StageResult("eval", "disabled", run / "eval", "f4")
    lines = write_report(run, cfg, results).read_text(encoding="utf-8").splitlines()
    assert "Policy `HuggingFaceTB/SmolLM2-135M-Instruct`, method PRO, trained on levels A, B." in lines
    assert "Reward model `builtin`, a = 3.73%, c = 12.5%, each subset graded on its own." in lines
    assert "![best scores](grade/best_scores.png)" in lines
    i = lines.index("## Evaluation")
    assert lines[i + 2] == "Disabled (eval.enabled: false)."


def test_report_with_only_the_stage_table(tmp_path):
    run = tmp_path / "empty"
    run.mkdir()
    text = write_report(run, CFG, []).read_text(encoding="utf-8")
    assert "## " not in text and "| stage | action | seconds | folder |" in text
    assert not (run / "train_curves.png").exists()


def test_report_states_omega_and_the_rdis_gradient_share(tmp_path):
    """The train manifest's omega and measured R_dis gradient share appear under Training, with the
    plain warning when the share at step 0 is below 1e-3; a calibrated omega says so."""
    run = _run_dir(tmp_path)
    _write(run / "train" / "manifest.json", {
        "omega": {"value": 2.5e-6, "source": "deft.omega"},
        "diagnostics": {"measured_steps": [0, 2], "rdis_grad_share": {"step_0": 1.1e-7, "median": 1.2e-7, "last": 1.3e-7},
                        "rdis_grad_cosine": {"step_0": 0.02, "median": 0.01, "last": 0.0}}})
    lines = write_report(run, CFG, _results(run)).read_text(encoding="utf-8").splitlines()
    i = lines.index("![training curves](train_curves.png)")
    assert lines[i + 2] == ("omega 2.5e-06 (as configured). R_dis gradient share ||grad(omega R_dis)|| / ||grad L_m||: at step 0 "
                            "1.1e-07 (cosine with the L_m gradient +0.020), median 1.2e-07 over 2 measured step(s). "
                            "**At this omega the distribution reward is 1.1e-07 of the gradient: it cannot change the model "
                            "(raise deft.omega or set deft.omega_share).**")
    _write(run / "train" / "manifest.json", {
        "omega": {"value": 3.38, "source": "calibrated", "omega_share": 0.1},
        "diagnostics": {"measured_steps": [0], "rdis_grad_share": {"step_0": 0.098, "median": 0.098, "last": 0.098},
                        "rdis_grad_cosine": {"step_0": -0.11, "median": -0.11, "last": -0.11}}})
    text = write_report(run, CFG, _results(run)).read_text(encoding="utf-8")
    assert "omega 3.38 (calibrated to a gradient share of 0.1). R_dis gradient share" in text
    assert "at step 0 0.098 (cosine with the L_m gradient -0.110)" in text and "cannot change the model" not in text
