#!/usr/bin/env bash
# Installs torch alone from the given wheel index, then the project's dependencies with torch pinned
# to that build: a resolver that sees an unpinned torch replaces the CPU build with a multi-GB CUDA one.
# Usage: install-python-deps.sh TORCH_INDEX_URL TORCH_VERSION PYPROJECT
set -euo pipefail
torch_index=$1
torch_version=$2
pyproject=$3

python -m pip install --no-cache-dir --index-url "$torch_index" "torch==$torch_version"
constraints=$(mktemp)
requirements=$(mktemp)
trap 'rm -f "$constraints" "$requirements"' EXIT
echo "torch==$torch_version" >"$constraints"
# Dependencies only, read from pyproject.toml, so this layer stays cached while the source changes.
python -c 'import sys, tomllib; print("\n".join(tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]))' \
  "$pyproject" >"$requirements"
PIP_CONSTRAINT="$constraints" python -m pip install --no-cache-dir -r "$requirements"
