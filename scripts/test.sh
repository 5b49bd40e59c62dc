#!/usr/bin/env bash
# The test suite: Rust unit tests, then the Python tests against the installed wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --quiet
"${PYTHON:-python3}" -m pytest -q "$@"
