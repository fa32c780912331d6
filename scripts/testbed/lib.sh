# shellcheck shell=bash
# Shared settings of the testbed scripts: paths, image names, the podman configuration.
# Source it; it exports CONTAINERS_CONF so every podman call uses the generated containers.conf.

TESTBED_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
TESTBED_BUILD=${TESTBED_BUILD:-$TESTBED_ROOT/build/testbed}
TESTBED_IMAGE_PREFIX=${TESTBED_IMAGE_PREFIX:-localhost/tickle-debian}
export CONTAINERS_CONF=${CONTAINERS_CONF:-$TESTBED_BUILD/containers.conf}
# Debian packages the testbed host needs (scripts/testbed/host-packages.sh installs the missing).
TESTBED_HOST_PACKAGES="podman runc netavark aardvark-dns debootstrap nftables iptables"

log() { printf '[testbed] %s\n' "$*" >&2; }
die() { printf '[testbed] error: %s\n' "$*" >&2; exit 1; }

# Debian release name (or `services`) -> image name (bookworm -> localhost/tickle-debian12).
image_for() {
  case "$1" in
    bookworm | 12) echo "${TESTBED_IMAGE_PREFIX}12" ;;
    trixie | 13) echo "${TESTBED_IMAGE_PREFIX}13" ;;
    services) echo "${TESTBED_IMAGE_PREFIX}12-services" ;;
    *) die "unknown image '$1' (bookworm, trixie or services)" ;;
  esac
}

# The Debian mirror of this machine, read at run time (never written into the repo).
debian_mirror() {
  local uri
  uri=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
  [ -n "$uri" ] || uri=$(awk '/^deb / {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
  [ -n "$uri" ] || die "no Debian mirror found in /etc/apt/sources.list.d/debian.sources"
  echo "$uri"
}

# Fails at once, saying what to install, when podman would not use netavark with aardvark-dns (CNI
# networks have no DNS: the hosts of a scenario could not resolve each other's names).
require_netavark() {
  local backend pkg missing=()
  for pkg in netavark aardvark-dns; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] \
    || die "podman needs ${missing[*]} for container name resolution: apt-get install ${missing[*]} (or run scripts/testbed/host-packages.sh as root)"
  backend=$(podman info --format '{{.Host.NetworkBackend}}' 2>&1) \
    || die "podman cannot start with $CONTAINERS_CONF: $backend"
  [ "$backend" = netavark ] || die "podman uses the '$backend' network backend, not netavark: install netavark and aardvark-dns"
}
