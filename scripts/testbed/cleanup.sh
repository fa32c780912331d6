#!/usr/bin/env bash
# Removes what testbed runs left behind: the containers on testbed networks (label tickle.testbed),
# those networks, and the host's ip_forward change. Safe to run at any time; `make molecule` calls
# it for its own networks when it ends (even on failure), `make fleet-down` for the fleet's.
# Usage: cleanup.sh                    every testbed network
#        cleanup.sh --prefix PREFIX    the testbed networks whose names start with PREFIX
#        cleanup.sh NETWORK...         those networks
set -euo pipefail
# shellcheck source=scripts/testbed/lib.sh
. "$(dirname "$0")/lib.sh"

command -v podman >/dev/null || exit 0
"$(dirname "$0")/containers-conf.sh" >/dev/null
prefix=
if [ "${1:-}" = --prefix ]; then
  [ -n "${2:-}" ] || die "usage: $0 [--prefix PREFIX | NETWORK...]"
  prefix=$2
  shift 2
fi
if [ $# -eq 0 ]; then
  mapfile -t nets < <(podman network ls --filter label=tickle.testbed --format '{{.Name}}' | awk -v p="$prefix" 'index($0, p) == 1')
  set -- "${nets[@]}"
fi
for net in "$@"; do
  "$(dirname "$0")/network.sh" remove "$net"
done
# Restores ip_forward even when no network was left to remove.
"$(dirname "$0")/network.sh" remove tickle-testbed-none
