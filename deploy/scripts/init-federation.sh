#!/bin/sh
# One-shot init job of docker-compose.yml (simulated sites on one host):
#   1. certificates for the SuperLink (SANs: coordinator, fleet-gateway, localhost, 127.0.0.1 and the
#      federation.toml's bind and dial addresses: Flower's SuperExec dials the SuperLink at its bind address),
#   2. a key pair per site (in that site's key volume — on real sites each runs site-keygen.sh itself),
#   3. enrollment of every site's public key with the coordinator,
#   4. real sample images (`invcoss samples fetch`) copied into each site's own data volume.
set -eu
if [ -f /certs/server.pem ] && [ -f /certs/ca.crt ]; then
  echo "certificates already in /certs"
else
  invcoss-server certs --config /etc/invcoss/federation.toml --dir /certs --san coordinator --san fleet-gateway
fi
for site in A B C; do
  lower=$(echo "$site" | tr 'A-Z' 'a-z')
  /opt/invcoss/scripts/site-keygen.sh "$site" "/keys/$lower"
  invcoss-server enroll --config /etc/invcoss/federation.toml --site "$site" --public-key "/keys/$lower/$site.pub"
done
invcoss samples fetch --dest /samples
for pair in a:ct b:mri c:pathology; do
  site=${pair%%:*}; modality=${pair#*:}
  if [ -z "$(ls -A "/data/$site" 2>/dev/null)" ]; then
    cp -r "/samples/$modality/." "/data/$site/"
  fi
done
echo "federation initialised"
