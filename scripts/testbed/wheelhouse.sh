#!/usr/bin/env bash
# Builds the wheelhouse the roles copy to managed hosts, so hosts install the `tickle` package and
# its dependencies with `pip install --no-index --find-links` (no package index on the hosts).
# One wheel set per host Python (Debian 12: 3.11, Debian 13: 3.13; WHEELHOUSE_PYTHONS), from
# pyenv's interpreters, falling back to python3. Output:
#   build/wheelhouse/            the wheels
#   build/wheelhouse.tar         the same, packed reproducibly (what the roles copy)
#   build/wheelhouse.json        {"version": ..., "digest": ...} (what the roles read)
set -euo pipefail
# shellcheck source=scripts/testbed/lib.sh
. "$(dirname "$0")/lib.sh"

out=${WHEELHOUSE_DIR:-$TESTBED_ROOT/build/wheelhouse}
pythons=${WHEELHOUSE_PYTHONS:-3.11 3.13}
extras=${WHEELHOUSE_EXTRAS:-server,postgres}
root=$(pyenv root 2>/dev/null || true)

find_python() {
  local v=$1 d
  if [ -n "$root" ]; then
    for d in "$root"/versions/"$v".*; do [ -x "$d/bin/python3" ] && { echo "$d/bin/python3"; return; }; done
  fi
  command -v "python$v" >/dev/null 2>&1 && "python$v" -c '' 2>/dev/null && { command -v "python$v"; return; }
  if python3 -c "import sys; sys.exit(f'{sys.version_info[0]}.{sys.version_info[1]}' != '$v')"; then
    command -v python3
  fi
}

# Skip when the sources and the wanted Pythons are what the existing wheelhouse was built from.
sources=$(cd "$TESTBED_ROOT" && { find src -type f ! -path '*/__pycache__/*' ! -name '*.pyc' | LC_ALL=C sort \
  | xargs sha256sum; sha256sum pyproject.toml README.md; echo "$pythons $extras"; } | sha256sum | cut -c1-16)
if [ "${WHEELHOUSE_FORCE:-0}" != 1 ] && [ -f "$out.tar" ] && grep -q "\"sources\": \"$sources\"" "$out.json" 2>/dev/null; then
  log "wheelhouse up to date (sources $sources)"
  exit 0
fi
rm -rf "$out"
mkdir -p "$out" "$TESTBED_BUILD"
built=()
for v in $pythons; do
  py=$(find_python "$v")
  if [ -z "$py" ]; then log "no Python $v here: hosts with Python $v cannot use this wheelhouse"; continue; fi
  log "wheels for Python $v ($py)"
  "$py" -m pip wheel -q --disable-pip-version-check -w "$out" "$TESTBED_ROOT[$extras]" 2>&1 \
    | grep -v '^WARNING: Location' >&2 || true
  built+=("$v")
done
[ ${#built[@]} -gt 0 ] || die "no host Python found (wanted: $pythons)"
# pip itself, run from its wheel on the hosts: venvs are created without pip (much faster).
"$py" -m pip download -q --disable-pip-version-check --no-deps -d "$out" pip 2>&1 | grep -v '^WARNING: Location' >&2 || true
pip_wheel=$(basename "$(ls "$out"/pip-*.whl | sort -V | tail -1)")
ls "$out"/tickle-*.whl >/dev/null 2>&1 || die "the tickle wheel was not built"

version=$(basename "$(ls "$out"/tickle-*.whl | head -1)" | cut -d- -f2)
# Packed reproducibly; the COMPLETE marker is the last member, so a host that has it has it all.
echo "tickle $version" >"$TESTBED_BUILD/COMPLETE"
tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -C "$out" -cf "$out.tar" .
tar --mtime=@0 --owner=0 --group=0 --numeric-owner -C "$TESTBED_BUILD" -rf "$out.tar" COMPLETE
digest=$(sha256sum "$out.tar" | cut -c1-16)
printf '{"version": "%s", "digest": "%s", "pythons": "%s", "pip_wheel": "%s", "sources": "%s"}\n' \
  "$version" "$digest" "${built[*]}" "$pip_wheel" "$sources" \
  >"$out.json"
log "wheelhouse: tickle $version, $(ls "$out" | wc -l) wheels, digest $digest, Pythons ${built[*]}"
