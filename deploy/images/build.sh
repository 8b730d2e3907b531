#!/usr/bin/env bash
# Build Anneal's two images from the repository root with whichever builder this machine has
# (docker, podman or buildah):
#   <registry>/anneal:<version>      the operator (deploy/images/operator.Containerfile)
#   <registry>/anneal-ray:<version>  the Ray image of per-resource clusters (ray.Containerfile)
# Usage: deploy/images/build.sh [--push]   (REGISTRY, VERSION override the defaults)
set -euo pipefail
cd "$(dirname "$0")/../.."
REGISTRY=${REGISTRY:-ghcr.io/anneal-dev}
VERSION=${VERSION:-$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -1)}
builder=""
for b in docker podman buildah; do
  if command -v "$b" >/dev/null 2>&1; then builder=$b; break; fi
done
if [ -z "$builder" ]; then
  echo "no container builder (docker, podman or buildah) on this machine; nothing built" >&2
  exit 3
fi
build() {  # <Containerfile> <image>
  if [ "$builder" = buildah ]; then
    buildah bud -f "$1" -t "$2" .
  else
    "$builder" build -f "$1" -t "$2" .
  fi
}
build deploy/images/operator.Containerfile "$REGISTRY/anneal:$VERSION"
build deploy/images/ray.Containerfile "$REGISTRY/anneal-ray:$VERSION"
if [ "${1:-}" = "--push" ]; then
  for image in "$REGISTRY/anneal:$VERSION" "$REGISTRY/anneal-ray:$VERSION"; do
    "$builder" push "$image"
  done
fi
echo "built $REGISTRY/anneal:$VERSION and $REGISTRY/anneal-ray:$VERSION with $builder"
