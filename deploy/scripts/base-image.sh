#!/bin/sh
# Build the compose images' base where no container registry is reachable: a Debian root file system made by
# debootstrap from the Debian mirror apt uses, imported as a local image (no `docker pull`).
# Usage: base-image.sh [IMAGE]   (default invcoss-base:bookworm; needs root, debootstrap and docker)
# The root file system is cached as a tarball under $INVCOSS_COMPOSE_CACHE (default ~/.cache/invcoss/compose), so
# a rerun on the same machine only re-imports it (seconds); an image already present is kept as it is.
set -eu
image="${1:-invcoss-base:bookworm}"
suite="${DEBIAN_SUITE:-bookworm}"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
cache="${INVCOSS_COMPOSE_CACHE:-$HOME/.cache/invcoss/compose}"
tarball="$cache/base-$suite.tar"

if docker image inspect "$image" >/dev/null 2>&1; then
  echo "base image $image already present"
  exit 0
fi
mkdir -p "$cache"
if [ ! -s "$tarball" ]; then
  if ! command -v debootstrap >/dev/null 2>&1; then
    echo "error: debootstrap not found; install it (Debian: apt-get install debootstrap) or pull a base image" >&2
    exit 2
  fi
  root=$(mktemp -d "$cache/.rootfs-XXXXXX")
  trap 'rm -rf "$root" "$tarball.partial"' EXIT
  echo "debootstrap $suite from $mirror (minbase + python3, a few minutes the first time)"
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates "$suite" "$root" "$mirror" \
    >"$cache/debootstrap.log" 2>&1 || {
    echo "error: debootstrap failed; see $cache/debootstrap.log" >&2
    exit 1
  }
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
  tar -C "$root" -cf "$tarball.partial" .
  mv "$tarball.partial" "$tarball"
fi
docker import --change 'CMD ["/bin/bash"]' --change 'ENV LANG=C.UTF-8' "$tarball" "$image" >/dev/null
echo "base image $image imported from $tarball"
