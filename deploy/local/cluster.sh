#!/usr/bin/env sh
# Thin wrapper: deploy/local/cluster.sh {build|up|down|env|status|crds} [options]
# e.g.  deploy/local/cluster.sh up --build --crds charts/anneal/crds && eval "$(deploy/local/cluster.sh env)"
exec "${PYTHON:-python3}" "$(dirname "$0")/cluster.py" "$@"
