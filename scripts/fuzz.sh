#!/usr/bin/env bash
# Fuzz deft._native (count_tokens, Tokenizer.encode/decode, assign_polarity)
# against pure-Python references: the Python `tokenizers` library and a
# plain-Python statement of the Q+/Q- rule (tests/fuzz_native.py).
#
#   scripts/fuzz.sh [CASES] [extra args]     CASES defaults to 1000000
#   e.g. scripts/fuzz.sh 1000000 --seed 3 --workers 2
#
# Prints the cases run per entry point and input kind; exits non-zero on any
# mismatch (each is reported with its seed and case index, replay it with
# `--seed S --start I --cases 1`). Needs the shared tokenizers
# (../shared/tokenizers/{gpt2,smollm2}/tokenizer.json) and the installed deft.
set -euo pipefail
cd "$(dirname "$0")/.."
cases="${1:-1000000}"
shift || true
exec "${PYTHON:-python3}" tests/fuzz_native.py --cases "$cases" "$@"
