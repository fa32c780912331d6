#!/usr/bin/env bash
# Runs the Molecule scenarios (default: every scenario under molecule/), MOLECULE_JOBS (default 2)
# at a time, each `molecule test` (destroy, create, converge, idempotence, verify, destroy) with
# molecule/base.yml as the shared base config. Builds what is missing first (build.sh: the images,
# the wheelhouse and the previous release for a scenario that converges it, all at once; and the
# controller venv), then runs the `default` scenario, the testbed check (hosts boot and resolve
# each other's names), and stops at once when it fails. Whatever happens, the scenarios'
# containers and networks are removed at the end (cleanup.sh) and the host's ip_forward restored;
# the exit code is non-zero when any scenario failed.
set -uo pipefail
# shellcheck source=scripts/testbed/lib.sh
. "$(dirname "$0")/lib.sh"
here=$(dirname "$0")
cd "$TESTBED_ROOT" || exit 2

# shellcheck disable=SC2046
[ $# -gt 0 ] || set -- $(molecule_scenarios)
# The testbed check is not a scenario of the product: it runs first, on its own.
scenarios=()
for scenario in "$@"; do [ "$scenario" = default ] || scenarios+=("$scenario"); done
set -- "${scenarios[@]}"

declare -A running=()  # scenarios running in the background: pid -> name
cleanup() {
  local pid
  for pid in "${!running[@]}"; do kill "$pid" 2>/dev/null || true; done
  "$here/cleanup.sh" --prefix tkl-mol- || true
}
trap cleanup EXIT
trap 'exit 130' INT TERM

"$here/deploy-venv.sh" || exit 2
"$here/build.sh" "$@" || exit 2
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

# Scenarios run side by side, MOLECULE_JOBS at a time (default 2), each on its own network with
# hosts of its own names: one scenario leaves part of the cores idle (waiting for hosts to restart,
# for polls, for tasks to time out, for one batch of a serial play), which another one's work fills.
# They start in the order given
# (the default order, tickle_delivery first, puts the longest first: it takes about as long as
# the other two one after the other). With more than one at a time, each one's output goes to
# build/testbed/molecule-NAME.log and is shown whole when it is done; MOLECULE_JOBS=1 runs them one
# after the other with their output as it comes.
jobs=${MOLECULE_JOBS:-2}
[[ $jobs =~ ^[1-9][0-9]*$ ]] || die "MOLECULE_JOBS must be a whole number of at least 1, not '$jobs'"
[ "$jobs" -le $# ] || jobs=$#  # one scenario alone: its output as it comes
run_scenario() {  # NAME: molecule test; on failure, remove the hosts a failed step left behind now
  molecule --base-config molecule/base.yml test --scenario-name "$1" && return 0
  molecule --base-config molecule/base.yml destroy --scenario-name "$1" >/dev/null 2>&1 || true
  return 1
}
declare -A took=() result=() started=()
failed=0
total_start=$SECONDS
finished() {  # NAME RC
  took[$1]=$((SECONDS - started[$1]))
  if [ "$2" -eq 0 ]; then result[$1]=passed; else result[$1]=FAILED; failed=1; fi
}
queue=("$@")
while [ ${#queue[@]} -gt 0 ] || [ ${#running[@]} -gt 0 ]; do
  while [ ${#queue[@]} -gt 0 ] && [ ${#running[@]} -lt "$jobs" ]; do
    scenario=${queue[0]}
    queue=("${queue[@]:1}")
    started[$scenario]=$SECONDS
    if [ "$jobs" -eq 1 ]; then
      log "scenario $scenario"
      run_scenario "$scenario"
      finished "$scenario" $?
    else
      log "scenario $scenario started (output: build/testbed/molecule-$scenario.log, shown when it is done)"
      run_scenario "$scenario" >"$TESTBED_BUILD/molecule-$scenario.log" 2>&1 &
      running[$!]=$scenario
    fi
  done
  [ ${#running[@]} -gt 0 ] || continue
  wait -n -p done_pid "${!running[@]}"
  rc=$?
  scenario=${running[$done_pid]}
  unset "running[$done_pid]"
  finished "$scenario" $rc
  log "scenario $scenario ${result[$scenario]} in ${took[$scenario]} s; its output:"
  cat "$TESTBED_BUILD/molecule-$scenario.log"
  log "end of the output of scenario $scenario (${result[$scenario]})"
done

printf '\nMolecule scenarios\n'
for scenario in "$@"; do
  printf '  %-26s %-7s %4d s\n' "$scenario" "${result[$scenario]}" "${took[$scenario]}"
done
printf '  %-26s %-7s %4d s\n' total "$([ $failed -eq 0 ] && echo passed || echo FAILED)" $((SECONDS - total_start))
exit $failed
