#!/usr/bin/env bash
# The whole test suite: unit, integration (real Ray, MLflow, Serve) and e2e (real kube-apiserver + etcd).
# Extra arguments go to pytest (e.g. `scripts/test.sh -m "not e2e"`).
set -euo pipefail
cd "$(dirname "$0")/.."
export ANNEAL_HOME=${ANNEAL_HOME:-$(mktemp -d -t anneal-test-XXXX)}
mkdir -p "$ANNEAL_HOME"
export TOKENIZERS_PARALLELISM=false RAY_USAGE_STATS_ENABLED=0 HF_HUB_OFFLINE=1 MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=false
# A crash while tests run prints every thread's stack (tests/conftest.py says why).
export PYTHONFAULTHANDLER=1
.venv/bin/anneal crds --check
.venv/bin/anneal validate --quiet deploy/examples/*.yaml
# The local control plane's Go builds (cached outside the repo; ~16 min of 2 cores on a fresh
# machine, nothing when cached) run at the lowest CPU priority while the unit and integration
# tiers run, on the cycles those leave idle. The e2e fixtures wait for the build (a lock file);
# should it have failed, they build again and fail with the build log's tail.
nice -n 19 .venv/bin/python deploy/local/cluster.py build > "$ANNEAL_HOME/k8s-build.log" 2>&1 &
# Without arguments: the fast tiers first, e2e (which needs the build) last.
if [ $# -eq 0 ]; then set -- tests/unit tests/integration tests/e2e; fi
# The 30 slowest tests are printed at the end: where the suite's time goes.
exec .venv/bin/python -m pytest -p no:cacheprovider --timeout=900 --durations=30 "$@"
