#!/usr/bin/env bash
# System packages the fault tests need (nft for dropping tickles, ip for namespaces).
# Idempotent: installs only what is missing; does nothing when every command is present.
set -euo pipefail

declare -A package_of=([nft]=nftables [ip]=iproute2)
missing=()
for cmd in "${!package_of[@]}"; do
    command -v "$cmd" >/dev/null 2>&1 || missing+=("${package_of[$cmd]}")
done
if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "sysdeps: missing ${missing[*]}; run as root: apt-get install -y ${missing[*]}" >&2
    exit 1
fi
echo "sysdeps: installing ${missing[*]}"
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
