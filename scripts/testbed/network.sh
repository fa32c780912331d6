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

# aardvark-dns (the networks' name server) keeps a file per network it serves and runs while any is
# left. A run killed before its cleanup (or podman removed under it) leaves its network's file:
# aardvark-dns then outlives every network, and a network made again with the same name and
# bridge address got no answer to any name (every host of a Molecule scenario: "found: none").
aardvark_dir() {
  if [ "$(id -u)" -eq 0 ]; then echo /run/containers/networks/aardvark-dns
  else echo "${XDG_RUNTIME_DIR:-/run/user/$(id -u)}/containers/networks/aardvark-dns"; fi
}

# Before a network is made: forget aardvark-dns's files of networks that are gone, and stop an
# aardvark-dns left serving only those (it still held their addresses' port 53), so that the new
# network's first container starts a fresh one.
forget_stale_dns() {
  local dir file pid left=0
  dir=$(aardvark_dir)
  [ -d "$dir" ] || return 0
  for file in "$dir"/*; do
    [ -f "$file" ] && [ "$(basename "$file")" != aardvark.pid ] || continue
    if podman network exists "$(basename "$file")"; then
      left=$((left + 1))
    else
      rm -f "$file"
      log "forgot aardvark-dns's stale names of network $(basename "$file") (a run killed before its cleanup)"
    fi
  done
  [ "$left" -eq 0 ] || return 0
  pid=$(cat "$dir/aardvark.pid" 2>/dev/null || true)
  if [ -n "$pid" ] && grep -qs aardvark-dns "/proc/$pid/cmdline"; then
    kill "$pid"
    timeout 5 tail --pid="$pid" -f /dev/null \
      || die "aardvark-dns $pid (serving only networks that are gone) did not stop within 5 s"
    log "stopped aardvark-dns $pid (it served only networks that are gone)"
  fi
  rm -f "$dir/aardvark.pid"
}

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
  forget_stale_dns
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
