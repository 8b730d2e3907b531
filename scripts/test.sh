#!/usr/bin/env bash
# The whole test suite: unit, integration (real Ray, MLflow, Serve) and e2e (real kube-apiserver + etcd).
# Extra arguments go to pytest (e.g. `scripts/test.sh -m "not e2e"`).
set -euo pipefail
cd "$(dirname "$0")/.."
export ANNEAL_HOME=${ANNEAL_HOME:-$(mktemp -d -t anneal-test-XXXX)}
export TOKENIZERS_PARALLELISM=false RAY_USAGE_STATS_ENABLED=0 HF_HUB_OFFLINE=1 MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=false
# A crash while tests run prints every thread's stack (tests/conftest.py says why).
export PYTHONFAULTHANDLER=1
.venv/bin/anneal crds --check
.venv/bin/anneal validate --quiet deploy/examples/*.yaml
# Build the local control plane first (cached outside the repo; minutes only on a fresh machine).
.venv/bin/python deploy/local/cluster.py build
# The 30 slowest tests are printed at the end: where the suite's time goes.
exec .venv/bin/python -m pytest -p no:cacheprovider --timeout=900 --durations=30 "$@"
