# shellcheck shell=bash
# Shared settings of the testbed scripts: paths, image names, the podman configuration.
# Source it; it exports CONTAINERS_CONF so every podman call uses the generated containers.conf.

TESTBED_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
TESTBED_BUILD=${TESTBED_BUILD:-$TESTBED_ROOT/build/testbed}
TESTBED_IMAGE_PREFIX=${TESTBED_IMAGE_PREFIX:-localhost/tickle-debian}
export CONTAINERS_CONF=${CONTAINERS_CONF:-$TESTBED_BUILD/containers.conf}

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
