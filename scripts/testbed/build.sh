#!/usr/bin/env bash
# Builds what the given Molecule scenarios need and is missing (default: every scenario): the
# images they name (build-image.sh), the wheelhouse (wheelhouse.sh) and, for a scenario that
# converges it, the previous release (previous.sh). Everything runs at once: the images'
# debootstraps and the wheelhouses' pip runs mostly wait on downloads and disk, and on a fresh
# machine each takes a minute or more. Each one's output is shown when it is done; the exit code is
# non-zero when any failed. What exists and is current is reused, so a second run returns at once.
# molecule.sh runs it first; `make test` runs it (niced) while pytest runs.
set -uo pipefail
# shellcheck source=scripts/testbed/lib.sh
. "$(dirname "$0")/lib.sh"
here=$(dirname "$0")
cd "$TESTBED_ROOT" || exit 2

# shellcheck disable=SC2046
[ $# -gt 0 ] || set -- $(molecule_scenarios)
images=(bookworm)
for scenario in "$@"; do
  grep -qs 'tickle-debian13' "molecule/$scenario/molecule.yml" && need_trixie=1
  grep -qs 'tickle-debian12-services' "molecule/$scenario/molecule.yml" && need_services=1
  grep -qs 'build/previous/' "molecule/$scenario/molecule.yml" && need_previous=1
done
[ -n "${need_trixie:-}" ] && images+=(trixie)
[ -n "${need_services:-}" ] && images+=(services)

# Once, before the builds run side by side: the host packages (one apt run, not one per image)
# and the containers.conf they share.
"$here/host-packages.sh" || exit 2
"$here/containers-conf.sh" >/dev/null || exit 2

mkdir -p "$TESTBED_BUILD"
declare -A pids=()  # builds running in the background, by name
stop() {
  local pid
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
}
trap stop EXIT
trap 'exit 130' INT TERM
background() {  # NAME COMMAND...: run in the background, output to $TESTBED_BUILD/build-NAME.log
  local name=$1
  shift
  "$@" >"$TESTBED_BUILD/build-$name.log" 2>&1 &
  pids[$name]=$!
}
order=()
for image in "${images[@]}"; do
  background "image-$image" "$here/build-image.sh" "$image"
  order+=("image-$image")
done
background wheelhouse "$here/wheelhouse.sh"
order+=(wheelhouse)
if [ -n "${need_previous:-}" ]; then
  background previous "$here/previous.sh"
  order+=(previous)
fi

failed=()
for name in "${order[@]}"; do
  wait "${pids[$name]}"
  rc=$?
  unset "pids[$name]"
  cat "$TESTBED_BUILD/build-$name.log" >&2
  [ $rc -eq 0 ] || { log "error: $name failed (exit $rc, output above)"; failed+=("$name"); }
done
[ ${#failed[@]} -eq 0 ] || die "not built: ${failed[*]}"
