#!/usr/bin/env bash
# Set up (or refresh) the project virtualenv in .venv with the pinned dependencies.
# Idempotent: a second run with unchanged pins takes a second.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Anneal needs Python >= 3.11")'
stamp=.venv/.anneal-setup
want=$(cat requirements.lock pyproject.toml | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x .venv/bin/anneal ]; then
  exit 0
fi
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# uv resolves and installs the ~700 pinned packages far faster than pip.
.venv/bin/python -m pip install --quiet --disable-pip-version-check "uv==0.13.9"
.venv/bin/python -m uv pip install --python .venv/bin/python --quiet -r requirements.lock
.venv/bin/python -m uv pip install --python .venv/bin/python --quiet --no-deps -e .
echo "$want" > "$stamp"
echo "anneal installed in .venv ($(.venv/bin/python -c 'import anneal; print(anneal.__version__)'))" >&2
