#!/usr/bin/env bash
# Prints the newest usable Python: 3.13 or 3.12 when present (pyenv or PATH), else python3.
# Usage: find-python.sh [MIN]  — MIN (default 3.11, the package's floor; the Ansible controller
# asks for 3.12): fails with a one-line message naming what was found when nothing reaches it.
set -euo pipefail
min=${1:-3.11}
found=""
root=$(pyenv root 2>/dev/null || true)
for v in 3.13 3.12; do
  if [ -n "$root" ]; then
    for d in "$root"/versions/"$v".*; do
      [ -x "$d/bin/python3" ] && { found="$d/bin/python3"; break 2; }
    done
  fi
  command -v "python$v" >/dev/null 2>&1 && "python$v" -c '' 2>/dev/null && { found=$(command -v "python$v"); break; }
done
[ -n "$found" ] || found=$(command -v python3 || true)
if [ -z "$found" ]; then
  echo "find-python: no python3 on PATH; Python >= $min is needed" >&2
  exit 1
fi
if ! "$found" -c "import sys; sys.exit(sys.version_info[:2] < tuple(map(int, '$min'.split('.'))))"; then
  version=$("$found" -c 'import platform; print(platform.python_version())')
  echo "find-python: Python >= $min is needed, found only $version ($found); install python$min or newer (pyenv or the distribution)" >&2
  exit 1
fi
echo "$found"
