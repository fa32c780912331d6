#!/usr/bin/env bash
# Builds the systemd host image of the testbed from Debian packages alone (no registry):
#   debootstrap minbase -> tar -> podman import as localhost/tickle-debian12 (or ...13 for trixie).
# `services` is Debian 12 plus PostgreSQL: the site-services host of a scenario (the database an
# NS can point at, and the package index hosts can install from), localhost/tickle-debian12-services.
# Usage: build-image.sh [bookworm|trixie|services]. Skips when the image exists with the current recipe.
set -euo pipefail
# shellcheck source=scripts/testbed/lib.sh
. "$(dirname "$0")/lib.sh"

variant=${1:-bookworm}
image=$(image_for "$variant")
release=$variant
extra=
if [ "$variant" = services ]; then
  release=bookworm
  # Its cluster is configured by the scenario's prepare step (molecule/shared/prepare.yml).
  extra=,postgresql,locales
fi
# Bump when the package list or the tweaks below change: an older image is then rebuilt.
recipe=3
packages=python3,python3-venv,python3-apt,nftables,iptables,iproute2,procps,systemd,systemd-sysv,dbus,sudo,ca-certificates

"$(dirname "$0")/host-packages.sh"
"$(dirname "$0")/containers-conf.sh" >/dev/null

current() {
  local have
  have=$(podman image inspect --format '{{index .Config.Labels "tickle.testbed.recipe"}}' "$image" 2>/dev/null || true)
  [ "$have" = "$recipe" ]
}
if current; then
  log "$image exists (recipe $recipe): reusing it"
  exit 0
fi

mkdir -p "$TESTBED_BUILD"
# One debootstrap at a time (any image): they share the package cache below, and two at once make
# twice the requests to the mirror (debootstrap does not retry a download that failed: one lost
# request ends it, "Couldn't download packages").
exec 9>"$TESTBED_BUILD/debootstrap.lock"
flock 9
# Another build may have finished while this one waited for the lock.
if current; then
  log "$image built meanwhile (recipe $recipe): reusing it"
  exit 0
fi
rootfs=$(mktemp -d "$TESTBED_BUILD/rootfs-$variant.XXXX")
trap 'rm -rf "$rootfs"' EXIT

mirror=$(debian_mirror)
# The packages are kept in build/testbed/debs (by name, version and architecture): the services
# image downloads only what it adds to Debian 12's, and a retry only what is still missing. wget
# (debootstrap's downloader) retries what a busy mirror or proxy refuses for a moment.
cache=$TESTBED_BUILD/debs
mkdir -p "$cache/partial"
printf '%s\n' 'tries = 5' 'waitretry = 5' 'retry_connrefused = on' \
  'retry_on_http_error = 408,429,500,502,503,504' >"$TESTBED_BUILD/wgetrc"
log "debootstrap $release (minbase) into $rootfs"
start=$SECONDS
for try in 1 2 3; do
  WGETRC=$TESTBED_BUILD/wgetrc debootstrap --variant=minbase --include="$packages$extra" \
    --cache-dir="$cache" "$release" "$rootfs" "$mirror" >"$TESTBED_BUILD/debootstrap-$variant.log" 2>&1 \
    && break
  tail -20 "$TESTBED_BUILD/debootstrap-$variant.log" >&2
  grep -q "Couldn't download" "$TESTBED_BUILD/debootstrap-$variant.log" && [ $try -lt 3 ] \
    || die "debootstrap $release failed"
  log "debootstrap $release: a download failed; again (try $((try + 1)) of 3), the packages it has kept"
  rm -rf "$rootfs"
  mkdir "$rootfs"
done

# Container tweaks: no getty or udev work inside a container, no mirror host baked into the image
# (hosts get no index on the test network anyway), a small image.
for unit in getty@tty1.service console-getty.service systemd-udevd.service \
  systemd-udev-trigger.service systemd-firstboot.service systemd-remount-fs.service; do
  ln -sf /dev/null "$rootfs/etc/systemd/system/$unit"
done
: >"$rootfs/etc/apt/sources.list"
: >"$rootfs/etc/machine-id"
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
  "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/*

log "importing $image"
tar -C "$rootfs" -c . | podman import \
  --change 'CMD ["/sbin/init"]' \
  --change 'STOPSIGNAL SIGRTMIN+3' \
  --change "LABEL tickle.testbed.recipe=$recipe" \
  --quiet - "$image" >/dev/null
log "$image built in $((SECONDS - start)) s"
