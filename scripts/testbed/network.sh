#!/usr/bin/env bash
# The testbed's container networks: always --internal (containers reach each other, nothing else),
# labelled tickle.testbed so cleanup finds them.
#   network.sh create NAME   create it (no-op when it exists); remembers the host's ip_forward
#   network.sh remove NAME   remove every container on it, then it; restores ip_forward when the
#                            last testbed network is gone. No-op when it does not exist.
set -euo pipefail
# shellcheck source=scripts/testbed/lib.sh
. "$(dirname "$0")/lib.sh"

state=$TESTBED_BUILD/host-state
label=tickle.testbed

testbed_networks() { podman network ls --filter "label=$label" --format '{{.Name}}'; }

create() {
  local name=$1
  "$(dirname "$0")/containers-conf.sh" >/dev/null
  require_netavark
  mkdir -p "$state"
  # netavark turns on net.ipv4.ip_forward: note the value from before the first testbed network.
  if [ -z "$(testbed_networks)" ] || [ ! -f "$state/ip_forward" ]; then
    sysctl -n net.ipv4.ip_forward >"$state/ip_forward"
  fi
  podman network exists "$name" && return 0
  podman network create --internal --label "$label=1" "$name" >/dev/null
  log "network $name created (internal)"
}

remove() {
  local name=$1 ids
  if podman network exists "$name"; then
    ids=$(podman ps -a --filter "network=$name" --format '{{.ID}}')
    if [ -n "$ids" ]; then
      # shellcheck disable=SC2086
      podman rm --force --time 0 $ids >/dev/null
      log "removed containers on $name: $(echo $ids | wc -w)"
    fi
    podman network rm --force "$name" >/dev/null
    log "network $name removed"
  fi
  if [ -z "$(testbed_networks)" ] && [ -f "$state/ip_forward" ]; then
    sysctl -qw "net.ipv4.ip_forward=$(cat "$state/ip_forward")"
    rm -f "$state/ip_forward"
  fi
}

case "${1:-}" in
  create | remove) [ -n "${2:-}" ] || die "usage: $0 create|remove NAME"; "$1" "$2" ;;
  *) die "usage: $0 create|remove NAME" ;;
esac
