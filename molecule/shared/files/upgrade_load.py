#!/usr/bin/env python3
"""Run-nows all through a rolling upgrade (molecule/shared/upgrade.yml, the side effect of the
tickle_delivery scenario; molecule/tests/upgrade_tickle_delivery.py checks what they left).

Runs on the NS host with the system Python (the tickle venv is replaced while it runs), against
the NS's own API on loopback with the admin token from its configuration. Defines one task, which
appends its execution id to a file on its agent and sleeps a second, then runs it now on the given
computers every `every_s` seconds until the stop file appears (then once more), `max_runs` runs
were created or `max_s` seconds passed. A refused or unanswered call (the NS restarting) is counted and tried again
at the next tick. Writes a JSON summary to `summary` when done; touches `started` after the first
run is created. One JSON argument: {"computers", "every_s", "max_runs", "max_s", "stop_file",
"started", "summary", "marker"}.
"""

import json
import os
import ssl
import sys
import time
import tomllib
import urllib.request

NS_CONFIG = "/etc/tickle/notification-server.toml"
CA = "/etc/tickle/tls/ca.crt"


def ns_api():
    with open(NS_CONFIG, "rb") as f:
        cfg = tomllib.load(f)
    if cfg.get("secrets_file"):
        with open(cfg["secrets_file"], "rb") as f:
            cfg.update(tomllib.load(f))
    host = cfg.get("api_host", "127.0.0.1")
    host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    scheme = "https" if cfg.get("tls_cert_file") else "http"
    context = ssl.create_default_context(cafile=CA) if scheme == "https" else None
    base = f"{scheme}://{host}:{cfg.get('api_port', 50120)}"
    headers = {"Content-Type": "application/json", "Authorization": "Bearer " + cfg["admin_token"]}

    def call(method, path, body):
        req = urllib.request.Request(
            base + path, method=method, data=json.dumps(body).encode(), headers=headers
        )
        with urllib.request.urlopen(req, timeout=10, context=context) as resp:
            return json.loads(resp.read().decode())

    return call


def main():
    spec = json.loads(sys.argv[1])
    call = ns_api()
    started = time.monotonic()
    deadline = started + float(spec["max_s"])
    script = f'echo "$TICKLE_EXECUTION_ID" >> {spec["marker"]}\nsleep 1\n'
    task_id = None
    runs, refused, errors = [], 0, []
    while time.monotonic() < deadline and len(runs) < int(spec["max_runs"]):
        stopping = os.path.exists(spec["stop_file"])  # one more run, after everything was upgraded
        tick = time.monotonic()
        try:
            if task_id is None:
                task = {"name": f"upgrade-load-{time.time_ns()}", "script": script, "timeout_s": 60}
                task_id = call("POST", "/api/tasks", task)["id"]
            run = call(
                "POST",
                "/api/runs",
                {"task_id": task_id, "computers": spec["computers"], "groups": []},
            )
            runs.append({"id": run["id"], "created_at": run["created_at"]})
            if len(runs) == 1:
                open(spec["started"], "w").close()
            if stopping:
                break
        except Exception as exc:  # the NS is restarting: try again at the next tick
            refused += 1
            errors.append(f"{type(exc).__name__}: {exc}"[:200])
        time.sleep(max(0.0, float(spec["every_s"]) - (time.monotonic() - tick)))
    summary = {
        "task_id": task_id,
        "runs": runs,
        "refused": refused,
        "errors": errors[-5:],
        "took_s": round(time.monotonic() - started, 1),
    }
    with open(spec["summary"], "w") as f:
        json.dump(summary, f)
    print(json.dumps(summary))
    return 0 if runs else 1


if __name__ == "__main__":
    sys.exit(main())
