#!/usr/bin/env bash
# Sets up the Ansible controller: .venv-deploy (Python >= 3.12, which ansible-core 2.20 and later
# need) from requirements-deploy.txt under the pins of constraints-deploy.txt, and the collections
# the roles and Molecule need, installed offline from the `ansible` wheel of the pinned version
# (Galaxy is not reachable) into build/collections.
# Idempotent and cached: a second run downloads nothing and returns in well under a second.
set -euo pipefail
# shellcheck source=scripts/testbed/lib.sh
. "$(dirname "$0")/lib.sh"

venv=${DEPLOY_VENV:-$TESTBED_ROOT/.venv-deploy}
collections=${DEPLOY_COLLECTIONS:-$TESTBED_ROOT/build/collections}
cache=$TESTBED_ROOT/build/deploy-cache
wanted=(containers/podman ansible/posix community/crypto)
requirements=$TESTBED_ROOT/requirements-deploy.txt
constraints=$TESTBED_ROOT/constraints-deploy.txt
controller_min=3.12

# 1. The venv, rebuilt when requirements-deploy.txt or constraints-deploy.txt change, and made anew
#    when it was built on a Python older than the controller needs.
if [ -x "$venv/bin/python" ] && ! "$venv/bin/python" -c 'import sys; sys.exit(sys.version_info < (3, 12))'; then
  log "$venv runs Python $("$venv/bin/python" -c 'import platform; print(platform.python_version())'), older than $controller_min: making it anew"
  rm -rf "$venv"
fi
digest=$(cat "$requirements" "$constraints" | sha256sum | cut -c1-16)
if [ "$(cat "$venv/.stamp" 2>/dev/null)" != "$digest" ]; then
  if [ ! -x "$venv/bin/python" ]; then
    python=$("$TESTBED_ROOT/scripts/find-python.sh" "$controller_min") ||
      die "the Ansible controller needs Python >= $controller_min (ansible-core 2.20 and later): see the message above"
    "$python" -m venv "$venv"
  fi
  log "installing the controller tools into $venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
  "$venv/bin/python" -m pip install -q -r "$requirements" -c "$constraints"
  echo "$digest" >"$venv/.stamp"
fi

# 2. The collections, taken from the pinned ansible wheel (downloaded once into build/deploy-cache);
#    installed again when the pin changes.
ansible_version=$(sed -n 's/^ansible==//p' "$constraints")
[ -n "$ansible_version" ] || die "constraints-deploy.txt pins no ansible version (ansible==X.Y.Z)"
missing=()
if [ "$(cat "$collections/.ansible-version" 2>/dev/null)" != "$ansible_version" ]; then
  missing=("${wanted[@]}")
else
  for c in "${wanted[@]}"; do
    [ -f "$collections/ansible_collections/$c/MANIFEST.json" ] || missing+=("$c")
  done
fi
[ ${#missing[@]} -eq 0 ] && exit 0
mkdir -p "$cache"
wheel=$cache/ansible-$ansible_version-py3-none-any.whl
if [ ! -f "$wheel" ]; then
  log "downloading the ansible $ansible_version wheel (collections only are used)"
  "$venv/bin/python" -m pip download -q --no-deps -d "$cache" "ansible==$ansible_version" 2>&1 | grep -v '^WARNING' >&2 || true
  [ -f "$wheel" ] || die "could not download the ansible $ansible_version wheel"
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
echo "$ansible_version" >"$collections/.ansible-version"
