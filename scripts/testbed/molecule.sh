#!/usr/bin/env bash
# Runs the Molecule scenarios (default: every scenario under molecule/), each `molecule test`
# (destroy, create, converge, idempotence, verify, destroy) with molecule/base.yml as the shared
# base config. Builds what is missing first (images, controller venv, wheelhouse, and the previous
# release for a scenario that converges it: previous.sh; the wheelhouses are built while the images
# are), then runs the `default` scenario, the testbed check (hosts boot and resolve each other's
# names), and stops at once when it fails. MOLECULE_JOBS (default 1) scenarios run at once: each has
# its own containers and network, and a scenario run beside others writes its output to
# build/testbed/molecule-NAME.log, shown whole when it ends. Whatever happens, the scenarios'
# containers and networks are removed at the end (cleanup.sh) and the host's ip_forward restored;
# the exit code is non-zero when any scenario failed.
# Usage: molecule.sh [--build-only] [SCENARIO...]; --build-only builds what the scenarios need
# (images one after the other, wheelhouses beside them) and runs none (`make test` builds them
# while pytest runs).
set -uo pipefail
# shellcheck source=scripts/testbed/lib.sh
. "$(dirname "$0")/lib.sh"
here=$(dirname "$0")
cd "$TESTBED_ROOT" || exit 2

build_only=
if [ "${1:-}" = --build-only ]; then
  build_only=1
  shift
fi
jobs=${MOLECULE_JOBS:-1}
[[ "$jobs" =~ ^[1-9][0-9]*$ ]] || die "MOLECULE_JOBS must be a whole number of at least 1, not '$jobs'"

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
  [ -n "$build_only" ] || "$here/cleanup.sh" --prefix tkl-mol- || true
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
[ -z "$build_only" ] || exit 0
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

declare -A took result started
failed=0
total_start=$SECONDS
scenario_test() {  # SCENARIO: molecule test; a failed step may leave hosts behind: removed at once
  molecule --base-config molecule/base.yml test --scenario-name "$1" && return 0
  molecule --base-config molecule/base.yml destroy --scenario-name "$1" >/dev/null 2>&1 || true
  return 1
}
finished() {  # SCENARIO RC
  took[$1]=$((SECONDS - started[$1]))
  if [ "$2" -eq 0 ]; then result[$1]=passed; else result[$1]=FAILED; failed=1; fi
}
if [ "$jobs" -eq 1 ]; then
  for scenario in "$@"; do
    log "scenario $scenario"
    started[$scenario]=$SECONDS
    scenario_test "$scenario"
    finished "$scenario" $?
  done
else
  declare -A running=()  # pid -> scenario
  pending=("$@")
  while [ ${#pending[@]} -gt 0 ] || [ ${#running[@]} -gt 0 ]; do
    while [ ${#pending[@]} -gt 0 ] && [ ${#running[@]} -lt "$jobs" ]; do
      scenario=${pending[0]}
      pending=("${pending[@]:1}")
      log "scenario $scenario started (output: build/testbed/molecule-$scenario.log)"
      started[$scenario]=$SECONDS
      scenario_test "$scenario" >"$TESTBED_BUILD/molecule-$scenario.log" 2>&1 &
      running[$!]=$scenario
      pids[molecule-$scenario]=$!
    done
    wait -n -p done_pid "${!running[@]}"
    rc=$?
    scenario=${running[$done_pid]}
    unset "running[$done_pid]" "pids[molecule-$scenario]"
    finished "$scenario" $rc
    log "scenario $scenario ${result[$scenario]} in ${took[$scenario]} s; its output:"
    cat "$TESTBED_BUILD/molecule-$scenario.log"
  done
fi

printf '\nMolecule scenarios\n'
for scenario in "$@"; do
  printf '  %-26s %-7s %4d s\n' "$scenario" "${result[$scenario]}" "${took[$scenario]}"
done
printf '  %-26s %-7s %4d s\n' total "$([ $failed -eq 0 ] && echo passed || echo FAILED)" $((SECONDS - total_start))
exit $failed
