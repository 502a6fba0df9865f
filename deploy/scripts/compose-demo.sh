#!/bin/sh
# The compose federation from build to report: `make compose-demo` runs `compose-demo.sh all`.
# Usage: compose-demo.sh [all | build | up | wait | report | down | clean]
#   build   the images (offline: first deploy/scripts/offline-prep.sh: local base image, wheels, compose file)
#   up      start init, coordinator, gateway, three sites and Prometheus in the background
#   wait    until the coordinator's run is done or failed (one line per stage change; INVCOSS_COMPOSE_TIMEOUT s)
#   report  the run's status, the sites' audits; final model, report and audits copied to $COMPOSE_OUT
#   down    stop and remove the containers (volumes stay: a later `up` resumes the run)
#   clean   also remove the volumes, the run's state with them
# INVCOSS_COMPOSE_OFFLINE=1 builds and runs without any registry (host networking on 127.0.28.x loopback
# addresses, deploy/offline/); =0 uses docker-compose.yml as it is; unset: offline when the default base image
# can be neither found nor pulled. Every compose command this script runs is printed before it runs.
set -eu
cd "$(dirname "$0")/../.."
out="${COMPOSE_OUT:-compose-out}"
timeout_s="${INVCOSS_COMPOSE_TIMEOUT:-3600}"
offline_file=deploy/offline/compose.generated.yml

if docker compose version >/dev/null 2>&1; then compose_bin="docker compose"; else compose_bin="docker-compose"; fi
offline="${INVCOSS_COMPOSE_OFFLINE:-}"
if [ -z "$offline" ]; then
  offline=1
  if docker image inspect python:3.11-slim >/dev/null 2>&1 || timeout 60 docker pull -q python:3.11-slim >/dev/null 2>&1; then
    offline=0
  fi
fi
if [ "$offline" = 1 ]; then files="-f $offline_file"; else files=""; fi

compose() {
  echo "+ $compose_bin -p invcoss $files $*" >&2
  # shellcheck disable=SC2086
  $compose_bin -p invcoss $files "$@"
}

in_coordinator() { compose exec -T coordinator "$@"; }

run_status() {
  in_coordinator invcoss-server status --config /etc/invcoss/federation.toml --json 2>/dev/null \
    | python3 -c 'import json,sys; s=json.load(sys.stdin); print(s["status"], *(t["site"] + ":" + t["status"] for t in s["stages"]))' \
    2>/dev/null || echo "starting"
}

step_build() {
  if [ "$offline" = 1 ]; then
    deploy/scripts/offline-prep.sh
  fi
  compose build
}

step_up() { compose up -d; }

step_wait() {
  start=$(date +%s)
  last=""
  while :; do
    now=$(run_status)
    if [ "$now" != "$last" ]; then
      echo "$(date +%H:%M:%S) run: $now"
      last="$now"
    fi
    case "$now" in
      done*) return 0 ;;
      failed*) echo "error: the run failed; see \`$compose_bin -p invcoss $files logs coordinator\`" >&2; return 1 ;;
    esac
    if [ $(($(date +%s) - start)) -gt "$timeout_s" ]; then
      echo "error: the run did not end within $timeout_s s (INVCOSS_COMPOSE_TIMEOUT)" >&2
      return 1
    fi
    sleep 10
  done
}

step_report() {
  in_coordinator invcoss-server status --config /etc/invcoss/federation.toml
  rm -rf "$out"
  mkdir -p "$out"
  coordinator=$(compose ps -q coordinator)
  docker cp "$coordinator:/var/lib/invcoss/state/final" "$out/final"
  docker cp "$coordinator:/var/lib/invcoss/state/report.json" "$out/report.json"
  leaks=0
  for site in a b c; do
    upper=$(echo "$site" | tr 'a-z' 'A-Z')
    if compose exec -T "site-$site" invcoss-client audit --site "$upper" --config "/etc/invcoss/site-$site.toml" \
      --json >"$out/audit-$upper.json"; then :; else leaks=1; fi
    python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print("site %(site)s: %(outbound_messages)s outbound messages, %(digests_out)s digests out; real image tensors out: %(real_image_tensors_out)s" % r)' "$out/audit-$upper.json"
  done
  echo "final model: $out/final/model (card: $out/final/model_card.json); report: $out/report.json"
  echo "inside the stack: volume coordinator-state, /var/lib/invcoss/state/final and report.json"
  if [ "$leaks" != 0 ]; then
    echo "error: a site's audit found real image data in its outbound messages" >&2
    return 1
  fi
  echo "audit: no real image tensor left any site"
}

step_down() { compose down; }

step_clean() { compose down -v; }

case "${1:-all}" in
  build) step_build ;;
  up) step_up ;;
  wait) step_wait ;;
  report) step_report ;;
  down) step_down ;;
  clean) step_clean ;;
  all)
    started=$(date +%s)
    step_build
    echo "build: $(($(date +%s) - started)) s"
    step_up
    if step_wait && step_report; then status=0; else
      status=1
      compose logs --tail 40 || true
    fi
    step_down
    echo "compose demo: $(($(date +%s) - started)) s, exit $status"
    exit "$status"
    ;;
  *) echo "usage: $0 [all|build|up|wait|report|down|clean]" >&2; exit 2 ;;
esac
