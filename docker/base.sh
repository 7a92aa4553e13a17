#!/usr/bin/env bash
# Makes the runtime's base image without a container registry: a minimal
# Debian bookworm (the release tailor's binary is built on) from Debian's
# archive with debootstrap, imported into Docker. Skips the work when the
# image exists. Needs root and debootstrap (`apt-get install debootstrap`).
#   docker/base.sh [IMAGE]        default: tailor-base:bookworm
set -euo pipefail
IMAGE="${1:-tailor-base:bookworm}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"

if docker image inspect "$IMAGE" >/dev/null 2>&1; then
  echo "base image $IMAGE: present"
  exit 0
fi
root="$(mktemp -d)"
trap 'rm -rf "$root"' EXIT
echo "base image $IMAGE: debootstrap --variant=minbase bookworm from $MIRROR"
debootstrap --variant=minbase bookworm "$root" "$MIRROR" >"$root.log" 2>&1 || {
  tail -20 "$root.log"
  exit 1
}
rm -f "$root.log"
# What a server image does not need: package caches, docs, man pages, locales.
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* \
  "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/* \
  "$root"/usr/share/locale/*
tar -C "$root" -c . | docker import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'CMD ["/bin/bash"]' - "$IMAGE" >/dev/null
echo "base image $IMAGE: imported ($(docker image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.0f MB", $1/1e6}'))"
