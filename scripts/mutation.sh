#!/usr/bin/env bash
# Mutation testing of deft's core: mutmut over the Python modules that compute
# results, cargo-mutants over the pure-Rust modules. Not part of CI (hours on
# 2 cores); the last run's numbers and its survivors are in benches/README.md.
#
#   bash scripts/mutation.sh                # Python (mutmut), then Rust (cargo-mutants)
#   bash scripts/mutation.sh python         # only mutmut
#   bash scripts/mutation.sh rust           # only cargo-mutants
#   bash scripts/mutation.sh report         # print the score of the last Python run again
#   MUTANTS='deft.losses.*' bash scripts/mutation.sh python   # a subset (fnmatch on mutant names)
#   DEFT_MUTATION_SAMPLE=0.2 bash scripts/mutation.sh python   # a fixed 20% sample, stratified by function
#
# Needs: the installed deft wheel (scripts/install.sh; its compiled
# deft/_native.abi3.so is copied into the staged package), ../shared, and
# `pip install mutmut==3.8.1` / `cargo install cargo-mutants --locked`
# (installed on first use).
#
# mutmut expects the package under ./, src/ or source/, so the Python run is
# staged in $DEFT_MUTATION_DIR (default /tmp/deft-mutation): src/deft (this
# checkout's python/deft plus the compiled extension), tests/, configs/ and a
# link to ../shared. A rerun resumes: mutmut keeps each mutant's verdict in
# $DEFT_MUTATION_DIR/mutants and re-tests the functions whose source, or whose
# tests, changed (DEFT_MUTATION_FRESH=1 starts over). Torch runs single-threaded
# (OMP_NUM_THREADS=1): mutmut forks one child per mutant, and a child forked
# from a process whose OpenMP pool is running can hang at exit, which mutmut
# would report as a timeout.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
WHAT=${1:-all}
STAGE=${DEFT_MUTATION_DIR:-/tmp/deft-mutation}
PY=${PYTHON:-python3}

# What is mutated (whole files; the run below selects the functions) and what
# is run against it. The slow end-to-end trainer and pipeline tests are left
# out: the trainer's loss assembly is pinned by test_train_oracle, and the
# per-mutant cost of a DeepSpeed run would make the run take days.
FILES=(losses ops grade distribution render train evaluate generation eval_metrics select)
TESTS=(test_losses test_ops test_paper_rules test_grade test_grade_warnings test_native test_train_units
       test_train_oracle test_evaluate test_select test_select_units test_distribution_units test_evaluate_units)
# The functions that compute results. Per module: everything in losses, ops,
# grade (but the plot) and distribution (but the plot and the tokenizer
# loading); in train the loss assembly and what feeds it; in evaluate the
# metrics; in select the pair selection.
DEFAULT_MUTANTS=(
  'deft.losses.*' 'deft.ops.*'
  'deft.grade.x_check_percentages__*' 'deft.grade.x_level_counts__*' 'deft.grade.x__require_scores__*'
  'deft.grade.x_assign_levels__*' 'deft.grade.x_polarity_reference__*' 'deft.grade.x__polarity_native__*'
  'deft.grade.x__polarity_python__*' 'deft.grade.x_grade__*' 'deft.grade.xǁThresholdsǁ*'
  'deft.grade.x_repeated_response_rows__*' 'deft.grade.x_grade_warnings__*' 'deft.grade.x_summary__*'
  'deft.render.x_response_prefix__*' 'deft.distribution.x_polarity_texts__*'
  'deft.distribution.x_build_distribution__*' 'deft.distribution.x_top_tokens__*'
  'deft.train.x_select_responses__*' 'deft.train.x_encode_examples__*' 'deft.train.x_labels_for__*'
  'deft.train.x_collate__*' 'deft.train.x_lr_lambda__*' 'deft.train.x_epoch_order__*' 'deft.train.x__seq_logps__*'
  'deft.train.x_to_slots__*' 'deft.train.x_loss_terms__*' 'deft.train.x_compute_loss__*' 'deft.train.x_share_metrics__*'
  'deft.generation.x_cut_generation__*' 'deft.eval_metrics.x__char_ngrams__*' 'deft.eval_metrics.x_pro_bleu__*'
  'deft.eval_metrics.x_sacre_bleu__*' 'deft.eval_metrics.x_win_tie_lose__*' 'deft.eval_metrics.xǁWinTieLoseǁ*'
  'deft.evaluate.x_reference_response__*' 'deft.eval_metrics.x_reward_100__*'
  'deft.select.x__check_*' 'deft.select.x__row_key__*' 'deft.select.x_kmeans2__*' 'deft.select.x_similarity_quantiles__*'
  'deft.select.x__flat_embeddings__*' 'deft.select.x__orient__*' 'deft.select.x__pick_pair__*'
  'deft.select.x_select_pairs__*' 'deft.select.x_fit_lengths__*'
)
if [[ -n "${MUTANTS:-}" ]]; then read -r -a SELECTED <<<"$MUTANTS"; else SELECTED=("${DEFAULT_MUTANTS[@]}"); fi

stage() {
  local so
  so=$("$PY" -c "import deft, os; print(os.path.join(os.path.dirname(deft.__file__), '_native.abi3.so'))")
  [[ -f "$so" ]] || { echo "error: $so not found: install deft first (bash scripts/install.sh)" >&2; exit 1; }
  [[ -d "$REPO/../shared" ]] || { echo "error: $REPO/../shared not found (the real data the tests use)" >&2; exit 1; }
  if [[ "${DEFT_MUTATION_FRESH:-0}" == 1 ]]; then rm -rf "$STAGE"; fi
  mkdir -p "$STAGE"
  rm -rf "$STAGE/src" "$STAGE/tests" "$STAGE/configs"
  mkdir -p "$STAGE/src"
  cp -r python/deft "$STAGE/src/deft"
  find "$STAGE/src" -name __pycache__ -prune -exec rm -rf {} +
  cp "$so" "$STAGE/src/deft/_native.abi3.so"
  cp -r tests "$STAGE/tests"
  cp -r configs "$STAGE/configs"
  ln -sfn "$(cd "$REPO/.." && pwd)/shared" "$STAGE/shared"  # tests look for ../shared beside mutants/
  {
    echo '[tool.mutmut]'
    echo 'source_paths = ["src"]'
    printf 'only_mutate = [%s]\n' "$(printf '"src/deft/%s.py", ' "${FILES[@]}" | sed 's/, $//')"
    printf 'pytest_add_cli_args_test_selection = [%s]\n' "$(printf '"tests/%s.py", ' "${TESTS[@]}" | sed 's/, $//')"
    # (the 4e9-id test spends a minute allocating in a child process and touches no mutated function)
    echo 'pytest_add_cli_args = ["-p", "no:cacheprovider", "-q", "-x", "-W", "ignore", "--deselect", "tests/test_native.py::test_a_huge_token_id_is_a_clear_error_not_an_abort"]'
    # raise statements and log/warning calls are not mutated: a changed message is not a wrong
    # result, and the messages are pinned by the error tests (test_cli_errors and each module's own)
    echo 'do_not_mutate_patterns = ["^\\s*raise ", "\\blog\\.(debug|info|warning|error)\\(", "\\b_log\\(", "warnings\\.warn\\("]'
    echo 'also_copy = ["configs"]'
    echo 'use_git_change_detection = false'
    echo 'process_isolation = "forkserver"'
  } >"$STAGE/pyproject.toml"
}

report() {
  (cd "$STAGE" && "$PY" - "${SELECTED[@]}" <<'EOF'
import fnmatch, json, sys
from collections import Counter, defaultdict
from pathlib import Path

pats = sys.argv[1:]
verdict = {1: "killed", 0: "survived", -24: "timeout", 24: "timeout", 36: "timeout", 33: "no tests", 34: "skipped",
           None: "not run", 5: "no tests", 2: "error", -11: "crashed", 139: "crashed"}
by_mod = defaultdict(Counter)
survivors = []
for meta in sorted(Path("mutants").rglob("*.meta")):
    for key, code in json.loads(meta.read_text())["exit_code_by_key"].items():
        if not any(fnmatch.fnmatch(key, p) for p in pats):
            continue
        v = verdict.get(code, f"exit {code}")
        by_mod[key.split(".")[1]][v] += 1
        if v in ("survived", "no tests"):
            survivors.append((key, v))
total = Counter()
print(f"{'module':14s} {'mutants':>8s} {'killed':>7s} {'timeout':>8s} {'survived':>9s} {'no tests':>9s} {'not run':>8s} {'score':>7s}")
for mod, c in sorted(by_mod.items()):
    total += c
    n = sum(c.values())
    done = n - c["not run"]
    score = (c["killed"] + c["timeout"]) / done if done else float("nan")
    print(f"{mod:14s} {n:8d} {c['killed']:7d} {c['timeout']:8d} {c['survived']:9d} {c['no tests']:9d} {c['not run']:8d} {score:7.1%}")
n = sum(total.values())
done = n - total["not run"]
print(f"{'all':14s} {n:8d} {total['killed']:7d} {total['timeout']:8d} {total['survived']:9d} {total['no tests']:9d} "
      f"{total['not run']:8d} {(total['killed'] + total['timeout']) / max(done, 1):7.1%}")
if done and total["not run"]:
    import math
    k, z = total["killed"] + total["timeout"], 1.96
    p = k / done
    centre, half = (p + z * z / (2 * done)) / (1 + z * z / done), z * math.sqrt(p * (1 - p) / done + z * z / (4 * done * done)) / (1 + z * z / done)
    print(f"(a sample: {done} of {n} mutants tested; 95% Wilson interval of the score {centre - half:.1%} .. {centre + half:.1%})")
Path("survivors.txt").write_text("".join(f"{k}\t{v}\n" for k, v in survivors))
print(f"\n{len(survivors)} survivors (and mutants no test reaches) listed in {Path.cwd() / 'survivors.txt'}; "
      f"see one with: cd {Path.cwd()} && mutmut show NAME")
EOF
  )
}

run_python() {
  "$PY" -c "import mutmut" 2>/dev/null || "$PY" -m pip install -q "mutmut==3.8.1"
  stage
  # mutmut re-tests every mutant named on its command line, finished or not: on a
  # rerun, name only the matching mutants that have no verdict yet
  # (DEFT_MUTATION_RERUN=1: all of them again).
  local names=("${SELECTED[@]}")
  if [[ "${DEFT_MUTATION_SAMPLE:-1}" != 1 ]] && ! compgen -G "$STAGE/mutants/src/deft/*.meta" >/dev/null; then
    # a sample is drawn from the generated mutants: generate them (and the test stats) first,
    # with a filter that matches nothing, which makes mutmut stop right after
    echo "== mutmut: generating the mutants and the test stats (a few minutes)" >&2
    (cd "$STAGE" && OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false \
       mutmut run "deft.no-such-mutant" >"$STAGE/mutmut-generate.log" 2>&1) || true
  fi
  if [[ "${DEFT_MUTATION_RERUN:-0}" != 1 ]] && compgen -G "$STAGE/mutants/src/deft/*.meta" >/dev/null; then
    mapfile -t names < <(cd "$STAGE" && DEFT_MUTATION_SAMPLE="${DEFT_MUTATION_SAMPLE:-1}" "$PY" - "${SELECTED[@]}" <<'EOF'
import fnmatch, hashlib, json, os, sys
from collections import defaultdict
from pathlib import Path

# DEFT_MUTATION_SAMPLE=f: a fixed, stratified sample: the mutants whose name hashes below f,
# plus the lowest-hashing mutant of every function, so every function is tried
frac = float(os.environ["DEFT_MUTATION_SAMPLE"])
h = lambda k: int(hashlib.sha256(k.encode()).hexdigest()[:8], 16) / 16**8
by_fn = defaultdict(list)
for meta in sorted(Path("mutants").rglob("*.meta")):
    for key, code in json.loads(meta.read_text())["exit_code_by_key"].items():
        if any(fnmatch.fnmatch(key, p) for p in sys.argv[1:]):
            by_fn[key.rsplit("__mutmut_", 1)[0]].append((key, code))
for fn, ms in by_fn.items():
    first = min(ms, key=lambda m: h(m[0]))[0]
    for key, code in ms:
        if code is None and (h(key) < frac or key == first):
            print(key)
EOF
    )
    if [[ ${#names[@]} -eq 0 ]]; then echo "== mutmut: every selected mutant has a verdict" >&2; report; return; fi
  fi
  echo "== mutmut: ${#names[@]} mutant names/patterns over ${FILES[*]} (staged in $STAGE)" >&2
  (cd "$STAGE" && OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false \
     mutmut run --max-children "${DEFT_MUTATION_JOBS:-2}" "${names[@]}" >"$STAGE/mutmut-run.log" 2>&1) || true
  tail -c 2000 "$STAGE/mutmut-run.log" | tr '\r' '\n' | tail -5 >&2
  report
}

run_rust() {
  command -v cargo-mutants >/dev/null || cargo install -q cargo-mutants --locked
  # the PyO3/Arrow glue (rust/lib.rs, tokenizer.rs, polarity_binding.rs, input.rs, errors.rs): `cargo test` cannot call it (it is
  # exercised from Python by tests/test_native.py and the fuzz harness), so
  # its mutants would all "survive" the Rust tests. The algorithmic modules are
  # mutated; .cargo/mutants.toml says the same.
  echo "== cargo-mutants over rust/counting.rs, rust/polarity.rs, rust/texts.rs" >&2
  # the tests run in a copy of the tree, so point them at ../shared and make a missing one fail
  DEFT_SHARED_DIR="$(cd "$REPO/.." && pwd)/shared" DEFT_NO_SKIPS=1 cargo mutants --no-shuffle -j "${DEFT_MUTATION_JOBS:-1}" -o "${DEFT_MUTATION_DIR:-/tmp/deft-mutation}" "$@" || true
  local out="${DEFT_MUTATION_DIR:-/tmp/deft-mutation}/mutants.out"
  for f in caught missed timeout unviable; do
    printf '%-9s %5d\n' "$f" "$(wc -l <"$out/$f.txt" 2>/dev/null || echo 0)"
  done
  echo "missed mutants: $out/missed.txt" >&2
}

case "$WHAT" in
  python) run_python ;;
  rust) shift; run_rust "$@" ;;
  report) report ;;
  all) run_python; run_rust ;;
  *) echo "usage: $0 [all|python|rust|report]" >&2; exit 2 ;;
esac
