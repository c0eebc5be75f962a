#!/usr/bin/env bash
# Create .venv and install the project with its dev extras. Idempotent: a second run installs
# nothing when pyproject.toml has not changed since the last successful install.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
TORCH_SPEC=${HYBRIDDIT_TORCH_SPEC:-torch==2.13.0}
# Before the stamp check: a venv that is up to date still gets the system packages it lacks.
bash scripts/system_packages.sh
stamp=.venv/.installed
want=$(cat pyproject.toml scripts/bootstrap.sh | sha256sum | cut -d' ' -f1)-$TORCH_SPEC
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
# Some machines' pip configs list local indexes that lack most packages; pip warns once per package.
# The venv keeps the pip its Python bundled: no "new release of pip" notice for users to mistake for a problem.
quiet_pip() {
  PIP_DISABLE_PIP_VERSION_CHECK=1 .venv/bin/python -m pip "$@" 2> >(grep -v "^WARNING: Location '.*' is ignored" >&2)
}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# torch first, before the project: any resolver that sees an unpinned torch pulls a multi-GB CUDA build.
# numpy (at the project's pin) comes in the same call: torch imported without it warns "Failed to initialize NumPy".
numpy_spec=$(grep -o '"numpy==[^"]*"' pyproject.toml | tr -d '"') ||
  { echo "bootstrap: pyproject.toml pins no numpy==VERSION" >&2; exit 1; }
quiet_pip install -q "$TORCH_SPEC" "$numpy_spec"
installed_torch=$(.venv/bin/python -c 'import torch; print(torch.__version__.split("+")[0])')
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
echo "torch==$installed_torch" >"$constraints"
PIP_CONSTRAINT="$constraints" quiet_pip install -q -e ".[dev]"
echo "$want" >"$stamp"
echo "bootstrap: .venv ready (torch $installed_torch)"
