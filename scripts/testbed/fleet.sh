#!/usr/bin/env bash
# The testbed fleet of `make fleet`: one systemd container per host of inventory/testbed, on the
# internal network tickle-fleet.
#   fleet.sh up     create the network and the containers (those that exist are kept)
#   fleet.sh down   remove the containers, the network, the fleet's generated secrets
set -euo pipefail
# shellcheck source=scripts/testbed/lib.sh
. "$(dirname "$0")/lib.sh"

network=${FLEET_NETWORK:-tickle-fleet}
inventory=${FLEET_INVENTORY:-$TESTBED_ROOT/inventory/testbed}
venv=${DEPLOY_VENV:-$TESTBED_ROOT/.venv-deploy}

hosts() {
  "$venv/bin/ansible-inventory" -i "$inventory" --list 2>/dev/null | "$venv/bin/python" -c '
import json, sys
inv = json.load(sys.stdin)
for name, hv in sorted(inv["_meta"]["hostvars"].items()):
    print(name, hv.get("testbed_image", "localhost/tickle-debian12"))'
}

up() {
  "$(dirname "$0")/network.sh" create "$network"
  local name image started=0
  while read -r name image; do
    podman container exists "$name" && continue
    podman run -d --name "$name" --hostname "$name" --network "$network" \
      --systemd=always --cap-add NET_ADMIN --cap-add SYS_ADMIN \
      --label tickle.testbed=fleet "$image" /sbin/init >/dev/null
    started=$((started + 1))
  done < <(hosts)
  log "fleet up on $network: $started containers started"
  check_names
}

# Every host of the fleet resolves every other host's name (netavark + aardvark-dns).
check_names() {
  local names name others
  mapfile -t names < <(hosts | cut -d' ' -f1)
  for name in "${names[@]}"; do
    timeout 120 podman exec "$name" systemctl is-system-running --wait >/dev/null || true
    others=()
    for other in "${names[@]}"; do [ "$other" = "$name" ] || others+=("$other"); done
    [ ${#others[@]} -eq 0 ] && continue
    podman exec "$name" getent hosts "${others[@]}" >/dev/null \
      || die "$name cannot resolve the other hosts' names (${others[*]}): podman's networks need netavark and aardvark-dns (scripts/testbed/host-packages.sh)"
  done
  log "every host resolves the others' names"
}

down() {
  "$(dirname "$0")/cleanup.sh" "$network"
  rm -rf "$inventory/.secrets"
}

case "${1:-}" in
  up | down) "$1" ;;
  *) die "usage: $0 up|down" ;;
esac
