#!/usr/bin/env bash
# Builds tailor's runtime image with no container registry: the base from
# Debian's archive (docker/base.sh), a tailor binary built on this host, the
# default model, and the shipped templates, adapters and presets, through
# docker/Dockerfile.runtime (the same runtime stage as docker/Dockerfile).
#   docker/build.sh [--binary PATH] [--tag IMAGE]
# Without --binary it runs `cargo build --release` and takes that binary.
set -euo pipefail
cd "$(dirname "$0")/.."
TAG=tailor:local
BINARY=""
while [ $# -gt 0 ]; do
  case "$1" in
    --binary) BINARY="$2"; shift 2 ;;
    --tag) TAG="$2"; shift 2 ;;
    *) echo "usage: docker/build.sh [--binary PATH] [--tag IMAGE]" >&2; exit 2 ;;
  esac
done

docker/base.sh tailor-base:bookworm
if [ -z "$BINARY" ]; then
  cargo build --release --locked --bin tailor
  BINARY="${CARGO_TARGET_DIR:-target}/release/tailor"
fi
scripts/fetch-model.sh >/dev/null
MODEL="${TAILOR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/tailor}/models/SmolLM2-135M-Instruct.Q4_1.gguf"

context="$(mktemp -d)"
trap 'rm -rf "$context"' EXIT
mkdir -p "$context/cache/models"
cp "$BINARY" "$context/tailor"
strip --strip-debug "$context/tailor" 2>/dev/null || true
cp "$MODEL" "$context/cache/models/"
cp -r templates adapters presets "$context/"
cp docker/entrypoint.sh "$context/entrypoint.sh"
docker build --quiet -f docker/Dockerfile.runtime -t "$TAG" "$context" >/dev/null
size="$(docker image inspect -f '{{.Size}}' "$TAG" | awk '{printf "%.0f MB", $1/1e6}')"
echo "image $TAG: built from docker/Dockerfile.runtime on tailor-base:bookworm ($size)"
echo "  binary: $BINARY ($(du -h "$context/tailor" | cut -f1) stripped of debug info)"
echo "  model:  $(basename "$MODEL"); templates, adapters, presets from this checkout"
