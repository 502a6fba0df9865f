#!/bin/sh
# Create a site's key pair once (idempotent). Run it on the site; send only SITE.pub to the coordinator.
# Usage: site-keygen.sh SITE KEY_DIR
set -eu
site="${1:?usage: site-keygen.sh SITE KEY_DIR}"
dir="${2:?usage: site-keygen.sh SITE KEY_DIR}"
if [ -f "$dir/$site.key" ]; then
  echo "key of site $site already in $dir"
  exit 0
fi
invcoss-client keygen --site "$site" --out "$dir"
