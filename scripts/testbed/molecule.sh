#!/usr/bin/env bash
# Runs the Molecule scenarios (default: every scenario under molecule/), one after the other, each
# `molecule test` (destroy, create, converge, idempotence, verify, destroy) with molecule/base.yml
# as the shared base config. Builds what is missing first (images, controller venv, wheelhouse, and
# the previous release for a scenario that converges it: previous.sh; the wheelhouses are built
# while the images are), then runs the `default` scenario, the testbed check (hosts boot and resolve each other's names),
# and stops at once when it fails. Whatever happens, the scenarios' containers and networks are
# removed at the end (cleanup.sh) and the host's ip_forward restored; the exit code is non-zero
# when any scenario failed.
set -uo pipefail
# shellcheck source=scripts/testbed/lib.sh
. "$(dirname "$0")/lib.sh"
here=$(dirname "$0")
cd "$TESTBED_ROOT" || exit 2

if [ $# -eq 0 ]; then
  set -- $(for d in molecule/*/molecule.yml; do basename "$(dirname "$d")"; done)
fi
# The testbed check is not a scenario of the product: it runs first, on its own.
scenarios=()
for scenario in "$@"; do [ "$scenario" = default ] || scenarios+=("$scenario"); done
set -- "${scenarios[@]}"

declare -A pids  # builds running in the background, by name
cleanup() {
  local pid
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  "$here/cleanup.sh" --prefix tkl-mol- || true
}
trap cleanup EXIT
trap 'exit 130' INT TERM

"$here/deploy-venv.sh" || exit 2
for scenario in "$@"; do
  grep -qs 'tickle-debian13' "molecule/$scenario/molecule.yml" && need_trixie=1
  grep -qs 'tickle-debian12-services' "molecule/$scenario/molecule.yml" && need_services=1
  grep -qs 'build/previous/' "molecule/$scenario/molecule.yml" && need_previous=1
done
# The wheelhouses (pip) are built while the images are (debootstrap): neither needs the other, and
# on a fresh machine each takes minutes. Their output is shown once each is done.
mkdir -p "$TESTBED_BUILD"
background() {  # NAME COMMAND...: run in the background, output to $TESTBED_BUILD/NAME.log
  local name=$1
  shift
  "$@" >"$TESTBED_BUILD/$name.log" 2>&1 &
  pids[$name]=$!
}
background wheelhouse "$here/wheelhouse.sh"
# The previous release (its files and wheelhouse) for a scenario that upgrades from it.
if [ -n "${need_previous:-}" ]; then background previous "$here/previous.sh"; fi
"$here/build-image.sh" bookworm || exit 2
if [ -n "${need_trixie:-}" ]; then "$here/build-image.sh" trixie || exit 2; fi
if [ -n "${need_services:-}" ]; then "$here/build-image.sh" services || exit 2; fi
for name in wheelhouse previous; do
  [ -n "${pids[$name]:-}" ] || continue
  wait "${pids[$name]}"
  rc=$?
  cat "$TESTBED_BUILD/$name.log" >&2
  unset "pids[$name]"
  [ $rc -eq 0 ] || { log "error: $name failed (exit $rc, output above)"; exit 2; }
done
export PATH="$TESTBED_ROOT/.venv-deploy/bin:$PATH"
export ANSIBLE_ROLES_PATH="$TESTBED_ROOT/roles" ANSIBLE_COLLECTIONS_PATH="$TESTBED_ROOT/build/collections"
export ANSIBLE_FORCE_COLOR=false PY_COLORS=0 MOLECULE_NO_LOG=false

log "testbed check (scenario default): hosts boot and resolve each other's names"
start=$SECONDS
if ! molecule --base-config molecule/base.yml test --scenario-name default; then
  molecule --base-config molecule/base.yml destroy --scenario-name default >/dev/null 2>&1 || true
  die "the testbed check failed: no scenario was run (see above)"
fi
log "testbed check passed in $((SECONDS - start)) s"

declare -A took result
failed=0
total_start=$SECONDS
for scenario in "$@"; do
  log "scenario $scenario"
  start=$SECONDS
  if molecule --base-config molecule/base.yml test --scenario-name "$scenario"; then
    result[$scenario]=passed
  else
    result[$scenario]=FAILED
    failed=1
    # A failed step may leave the scenario's hosts behind: remove them now, not at the very end.
    molecule --base-config molecule/base.yml destroy --scenario-name "$scenario" >/dev/null 2>&1 || true
  fi
  took[$scenario]=$((SECONDS - start))
done

printf '\nMolecule scenarios\n'
for scenario in "$@"; do
  printf '  %-26s %-7s %4d s\n' "$scenario" "${result[$scenario]}" "${took[$scenario]}"
done
printf '  %-26s %-7s %4d s\n' total "$([ $failed -eq 0 ] && echo passed || echo FAILED)" $((SECONDS - total_start))
exit $failed
