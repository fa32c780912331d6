#!/usr/bin/env bash
# Removes what testbed runs left behind: every container on a testbed network (label
# tickle.testbed), those networks, and the host's ip_forward change. Safe to run at any time;
# `make molecule` and `make fleet-down` call it so a failed run still ends clean.
# Usage: cleanup.sh [NETWORK...]   (no argument: every testbed network)
set -euo pipefail
# shellcheck source=scripts/testbed/lib.sh
. "$(dirname "$0")/lib.sh"

command -v podman >/dev/null || exit 0
"$(dirname "$0")/containers-conf.sh" >/dev/null
if [ $# -eq 0 ]; then
  mapfile -t nets < <(podman network ls --filter label=tickle.testbed --format '{{.Name}}')
  set -- "${nets[@]}"
fi
for net in "$@"; do
  "$(dirname "$0")/network.sh" remove "$net"
done
# Restores ip_forward even when no network was left to remove.
"$(dirname "$0")/network.sh" remove tickle-testbed-none
