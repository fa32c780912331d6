#!/usr/bin/env python3
"""Wait until a systemd unit's health check answers; stop at once when the unit has failed.

Run on the managed host by roles/tickle_service/tasks/run.yml with one JSON argument:
{"unit": ..., "timeout_s": ..., "url": ... | "command": [...], "ca": ..., "expect": {...}}.
Exit 0 with the health JSON when it has every expected key and value; 3 when systemd says the unit
failed or is waiting to restart after a crash (its journal says why); 4 when the time is up.
"""

import json
import ssl
import subprocess
import sys
import time
import urllib.request


def unit_failed(unit):
    out = subprocess.run(
        ["systemctl", "show", "-p", "ActiveState", "-p", "SubState", "-p", "Result", unit],
        capture_output=True, text=True, check=False,
    ).stdout
    state = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    if state.get("ActiveState") == "failed" or state.get("SubState") == "auto-restart":
        return f"{unit} failed ({state.get('ActiveState')}/{state.get('SubState')}, result {state.get('Result')})"
    return None


def probe(spec):
    if spec.get("url"):
        context = ssl.create_default_context(cafile=spec.get("ca") or None)
        with urllib.request.urlopen(spec["url"], timeout=3, context=context) as resp:
            return json.loads(resp.read().decode())
    out = subprocess.run(spec["command"], capture_output=True, text=True, timeout=10, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"exit {out.returncode}: {(out.stderr or out.stdout).strip()[-200:]}")
    return json.loads(out.stdout)


def main():
    spec = json.loads(sys.argv[1])
    deadline = time.monotonic() + float(spec["timeout_s"])
    last = "no answer yet"
    while True:
        failed = unit_failed(spec["unit"])
        if failed:
            print(failed)
            return 3
        try:
            health = probe(spec)
            if isinstance(health, dict) and all(health.get(k) == v for k, v in spec["expect"].items()):
                print(json.dumps(health))
                return 0
            last = f"answered {json.dumps(health)[:300]}"
        except Exception as exc:  # not up yet: connection refused, TLS not ready, bad JSON
            last = f"{type(exc).__name__}: {exc}"
        if time.monotonic() >= deadline:
            print(f"{spec['unit']} did not answer within {spec['timeout_s']} s: {last}")
            return 4
        time.sleep(0.5)


if __name__ == "__main__":
    sys.exit(main())
