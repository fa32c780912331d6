#!/usr/bin/env bash
# Builds the previous release (scripts/testbed/previous-release: its version and commit) the way
# an operator of that release had it, for the scenario that upgrades from it:
#   build/previous/tree/                 the release's files (git archive of its commit): its
#                                        playbooks and roles (playbooks/roles -> ../roles, so its
#                                        site.yml runs its own roles, not this checkout's)
#   build/previous/tree/build/wheelhouse.tar, .json
#                                        its wheelhouse, built by its own wheelhouse.sh, where its
#                                        roles look for it
# Skipped when build/previous/tree is that commit and its wheelhouse is there. Needs the commit in
# this clone (full history): a shallow clone is deepened, else the commit is fetched from origin.
set -euo pipefail
# shellcheck source=scripts/testbed/lib.sh
. "$(dirname "$0")/lib.sh"
cd "$TESTBED_ROOT"

release_file=${PREVIOUS_RELEASE_FILE:-scripts/testbed/previous-release}
version=$(sed -n 's/^version=//p' "$release_file")
commit=$(sed -n 's/^commit=//p' "$release_file")
[ -n "$version" ] && [ -n "$commit" ] || die "$release_file: needs version= and commit= lines"
out=$TESTBED_ROOT/build/previous/tree

if [ -f "$out/.commit" ] && [ "$(cat "$out/.commit")" = "$commit" ] \
  && grep -qs "\"version\": \"$version\"" "$out/build/wheelhouse.json"; then
  log "previous release $version ($commit) already built"
  exit 0
fi

if ! git cat-file -e "$commit^{commit}" 2>/dev/null; then
  if [ "$(git rev-parse --is-shallow-repository)" = true ]; then
    log "shallow clone: fetching the history for the previous release $version"
    git fetch -q --unshallow 2>/dev/null || true
  fi
  git cat-file -e "$commit^{commit}" 2>/dev/null || git fetch -q origin "$commit" 2>/dev/null || true
  git cat-file -e "$commit^{commit}" 2>/dev/null \
    || die "the previous release $version (commit $commit, $release_file) is not in this clone and could not be fetched: clone with full history"
fi

log "previous release $version: files of $commit"
rm -rf "$out"
mkdir -p "$out"
git archive "$commit" | tar -x -C "$out"
ln -s ../roles "$out/playbooks/roles"
# Its own wheelhouse script, on its own sources; with it, the venv and cache of this checkout.
TESTBED_BUILD=$out/build/testbed "$out/scripts/testbed/wheelhouse.sh"
grep -qs "\"version\": \"$version\"" "$out/build/wheelhouse.json" \
  || die "the wheelhouse built from $commit is not version $version: $(cat "$out/build/wheelhouse.json" 2>/dev/null)"
echo "$commit" >"$out/.commit"
log "previous release $version built in build/previous/tree"
