#!/bin/sh
# Create the federation CA and the SuperLink server certificate once (idempotent).
# Usage: make-certs.sh CERT_DIR [SAN ...]   — SANs: every name sites and the coordinator use for the SuperLink.
set -eu
dir="${1:?usage: make-certs.sh CERT_DIR [SAN ...]}"
shift
if [ -f "$dir/server.pem" ] && [ -f "$dir/ca.crt" ]; then
  echo "certificates already in $dir"
  exit 0
fi
args=""
for san in "$@"; do args="$args --san $san"; done
# shellcheck disable=SC2086
invcoss-server certs --dir "$dir" $args
