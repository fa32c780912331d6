#!/usr/bin/env bash
# Prints the newest usable Python (>= 3.12 preferred for the Ansible controller, 3.11 at least).
set -euo pipefail
root=$(pyenv root 2>/dev/null || true)
for v in 3.13 3.12; do
  if [ -n "$root" ]; then
    for d in "$root"/versions/"$v".*; do
      [ -x "$d/bin/python3" ] && { echo "$d/bin/python3"; exit 0; }
    done
  fi
  command -v "python$v" >/dev/null 2>&1 && "python$v" -c '' 2>/dev/null && { command -v "python$v"; exit 0; }
done
command -v python3
