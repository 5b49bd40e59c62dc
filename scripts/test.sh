#!/usr/bin/env bash
# The test suite: Rust unit tests, then the Python tests against the installed wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
echo "== cargo test: building the Rust unit tests (a few minutes on 2 cores the first time; cargo prints its progress)" >&2
cargo test --no-run
cargo test --quiet
echo "== pytest: the Python tests against the installed deft wheel (about 20-25 minutes on 2 cores)" >&2
"${PYTHON:-python3}" -m pytest -q "$@"
