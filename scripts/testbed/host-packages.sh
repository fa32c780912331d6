#!/usr/bin/env bash
# Installs the host tools the testbed needs, only those that are missing: podman with runc, and
# netavark + aardvark-dns (without them Debian 12's podman falls back to CNI networks with
# dns_enabled: false and containers cannot resolve each other's names), debootstrap, nftables,
# iptables. Idempotent: prints nothing and returns at once when all are there.
set -euo pipefail
# shellcheck source=scripts/testbed/lib.sh
. "$(dirname "$0")/lib.sh"

missing=()
for pkg in $TESTBED_HOST_PACKAGES; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
done
[ ${#missing[@]} -eq 0 ] && exit 0
[ "$(id -u)" -eq 0 ] || die "missing packages ${missing[*]}: run as root or install them"
log "installing ${missing[*]}"
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
