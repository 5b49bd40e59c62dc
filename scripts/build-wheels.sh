#!/usr/bin/env bash
# Build the release artefacts into dist/: one abi3 wheel (any CPython >= 3.9) and the sdist.
#
# On Linux the wheel is linked with zig against glibc 2.17, so it is tagged manylinux2014
# (manylinux_2_17) and installs on any Linux distribution of the last decade, not only on ones as
# new as the build machine; `auditwheel show` then confirms the tag, and the script fails if the
# wheel needs anything newer. On macOS and Windows it builds the platform's own wheel (the release
# workflow, .github/workflows/release.yml, builds those for every platform).
#
# Needs a Rust toolchain (cargo) and Python >= 3.9 with pip; installs maturin, ziglang and
# auditwheel from PyPI into that Python. scripts/install.sh builds through this script.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
command -v cargo >/dev/null || { echo "error: cargo not found; install Rust (https://rustup.rs) first" >&2; exit 1; }
pip_install() { "$PY" -m pip install --quiet --disable-pip-version-check "$@"; }

start=$SECONDS
rm -rf dist
if [[ "$(uname -s)" == Linux ]]; then
    # ziglang: the zig toolchain as a Python package. maturin finds zig through cargo-zigbuild,
    # which runs `$CARGO_ZIGBUILD_PYTHON_PATH -m ziglang` (default: the python3 on PATH), so point
    # it at the Python that ziglang is installed into here.
    pip_install "maturin>=1.7,<2" "ziglang>=0.17,<0.18" "auditwheel>=6.8"
    CARGO_ZIGBUILD_PYTHON_PATH="$("$PY" -c 'import sys; print(sys.executable)')"
    export CARGO_ZIGBUILD_PYTHON_PATH
    "$PY" -m maturin build --release --zig --compatibility manylinux2014 --out dist
else
    pip_install "maturin>=1.7,<2"
    "$PY" -m maturin build --release --out dist
fi
"$PY" -m maturin sdist --out dist

shopt -s nullglob
wheels=(dist/deft-*.whl)
sdists=(dist/deft-*.tar.gz)
if (( ${#wheels[@]} != 1 || ${#sdists[@]} != 1 )); then
    echo "error: expected one wheel and one sdist in dist/, found: ${wheels[*]:-no wheel} ${sdists[*]:-no sdist}" >&2
    exit 1
fi
wheel="${wheels[0]}"
sdist="${sdists[0]}"

if [[ "$(uname -s)" == Linux ]]; then
    # The platform tag in the name is what maturin claims; auditwheel reads the extension's ELF
    # symbol versions and says which manylinux policy the wheel actually satisfies.
    "$PY" -m auditwheel show "$wheel"
    "$PY" -m auditwheel show --json "$wheel" | "$PY" -c '
import json, re, sys
wheel = sys.argv[1]
report = json.load(sys.stdin)
tag = report.get("overall_tag") or ""
m = re.fullmatch(r"manylinux_(\d+)_(\d+)_(\w+)", tag)
if m is None or (int(m.group(1)), int(m.group(2))) > (2, 17):
    found = repr(tag) if tag else "no manylinux tag"
    sys.exit(f"error: auditwheel show: {wheel} is consistent with {found}, not with manylinux2014 "
             "(manylinux_2_17): it needs a newer glibc or a library outside the manylinux policy")
name_tags = wheel.rsplit("-", 1)[-1][: -len(".whl")].split(".")
if f"manylinux_2_17_{m.group(3)}" not in name_tags or "-abi3-" not in wheel:
    sys.exit(f"error: {wheel}: expected an abi3 wheel tagged manylinux_2_17_{m.group(3)} in its name")
print(f"auditwheel: {wheel} satisfies {tag} (manylinux2014)")
' "$wheel"
fi

echo "built in $((SECONDS - start)) s:"
ls -l "$wheel" "$sdist"
echo "install with: pip install $wheel"
