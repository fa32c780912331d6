#!/usr/bin/env bash
# Sets up the Ansible controller: .venv-deploy (Python >= 3.12 when present) from
# requirements-deploy.txt, and the collections the roles and Molecule need, installed offline
# from the `ansible` wheel (Galaxy is not reachable) into build/collections.
# Idempotent and cached: a second run downloads nothing and returns in well under a second.
set -euo pipefail
# shellcheck source=scripts/testbed/lib.sh
. "$(dirname "$0")/lib.sh"

venv=${DEPLOY_VENV:-$TESTBED_ROOT/.venv-deploy}
collections=${DEPLOY_COLLECTIONS:-$TESTBED_ROOT/build/collections}
cache=$TESTBED_ROOT/build/deploy-cache
wanted=(containers/podman ansible/posix community/crypto)
requirements=$TESTBED_ROOT/requirements-deploy.txt

# 1. The venv, rebuilt when requirements-deploy.txt changes.
digest=$(sha256sum "$requirements" | cut -c1-16)
if [ "$(cat "$venv/.stamp" 2>/dev/null)" != "$digest" ]; then
  [ -x "$venv/bin/python" ] || "$("$TESTBED_ROOT/scripts/find-python.sh")" -m venv "$venv"
  log "installing the controller tools into $venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
  "$venv/bin/python" -m pip install -q -r "$requirements"
  echo "$digest" >"$venv/.stamp"
fi

# 2. The collections, taken from the ansible wheel (downloaded once into build/deploy-cache).
missing=()
for c in "${wanted[@]}"; do
  [ -f "$collections/ansible_collections/$c/MANIFEST.json" ] || missing+=("$c")
done
[ ${#missing[@]} -eq 0 ] && exit 0
mkdir -p "$cache"
wheel=$(ls "$cache"/ansible-[0-9]*.whl 2>/dev/null | sort -V | tail -1 || true)
if [ -z "$wheel" ]; then
  log "downloading the ansible wheel (collections only are used)"
  "$venv/bin/python" -m pip download -q --no-deps -d "$cache" 'ansible>=11' 2>&1 | grep -v '^WARNING' >&2 || true
  wheel=$(ls "$cache"/ansible-[0-9]*.whl 2>/dev/null | sort -V | tail -1 || true)
  [ -n "$wheel" ] || die "could not download the ansible wheel"
fi
unpack=$(mktemp -d)
trap 'rm -rf "$unpack"' EXIT
"$venv/bin/python" - "$wheel" "$unpack" "${missing[@]}" <<'PY'
import sys, zipfile
wheel, dest, *wanted = sys.argv[1:]
prefixes = tuple(f"ansible_collections/{c}/" for c in wanted)
with zipfile.ZipFile(wheel) as z:
    z.extractall(dest, [n for n in z.namelist() if n.startswith(prefixes)])
PY
paths=()
for c in "${missing[@]}"; do paths+=("$unpack/ansible_collections/$c"); done
"$venv/bin/ansible-galaxy" collection install --offline --force -p "$collections" "${paths[@]}" >/dev/null
log "collections installed into $collections: ${missing[*]}"
