#!/usr/bin/env bash
# System packages the tests need: nft for dropping tickles, ip for namespaces, promtool (Debian's
# prometheus package) to check and unit-test the alert rules in monitoring/, a PostgreSQL server
# (initdb, pg_ctl) for the NS's PostgreSQL tests, which start a private server of their own, and
# Debian's Chromium with its driver for the web console's browser tests (tests/console).
# Idempotent: installs only what is missing; does nothing when everything is present.
set -euo pipefail

declare -A package_of=([nft]=nftables [ip]=iproute2 [promtool]=prometheus [chromium]=chromium [chromedriver]=chromium-driver)
missing=()
for cmd in "${!package_of[@]}"; do
    command -v "$cmd" >/dev/null 2>&1 || missing+=("${package_of[$cmd]}")
done
# Debian keeps the server binaries off PATH, under /usr/lib/postgresql/<version>/bin
if ! compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; then
    missing+=(postgresql)
fi
if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "sysdeps: missing ${missing[*]}; run as root: apt-get install -y ${missing[*]}" >&2
    exit 1
fi
echo "sysdeps: installing ${missing[*]}"
apt-get update -qq
# no init system to start services here: policy-rc.d 101 keeps the package from starting its own
# cluster (the tests run a private server); removed again whatever happens
policy=/usr/sbin/policy-rc.d
own_policy=false
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod 0755 "$policy"
    own_policy=true
fi
trap '$own_policy && rm -f "$policy"' EXIT
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
