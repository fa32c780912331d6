"""The web console's access rules and the audit, over real HTTP on a real NS: operator accounts,
logins, the session cookie, CSRF on every action, expiry, logout, who the audit records, and the
API docs served from the NS's own assets."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import aiohttp
import pytest
from fastapi.routing import APIRoute
from sqlalchemy import update

from tests.ns.conftest import ADMIN, Ns
from tests.reliability import record
from tickle.ns.console import pages
from tickle.ns.console.sessions import LoginThrottle
from tickle.ns.models import ConsoleSession

FORM = {"Content-Type": "application/x-www-form-urlencoded"}


@dataclass
class Browser:
    """Plays a browser on the console: keeps the cookies it is given (set by hand: a client's
    cookie jar would not send a Secure cookie over the tests' plain HTTP), follows no redirect."""

    ns: Ns
    cookies: dict[str, str]

    async def request(
        self, method: str, path: str, form: dict[str, str] | None = None, **headers: str
    ) -> tuple[int, str, aiohttp.ClientResponse]:
        sent = {"Cookie": "; ".join(f"{k}={v}" for k, v in self.cookies.items()), **headers}
        if form is not None:
            sent |= FORM
        data = urlencode(form) if form is not None else None
        async with self.ns.http.request(
            method, self.ns.url + path, data=data, headers=sent, allow_redirects=False
        ) as r:
            for morsel in r.cookies.values():
                if morsel.value:
                    self.cookies[morsel.key] = morsel.value
                else:
                    self.cookies.pop(morsel.key, None)
            return r.status, await r.text(), r

    async def login(self, token: str) -> tuple[int, str, aiohttp.ClientResponse]:
        _, page, _ = await self.request("GET", "/console/login")
        return await self.request("POST", "/console/login", {"csrf": csrf_in(page), "token": token})

    async def csrf(self, path: str = "/console/settings") -> str:
        status, page, _ = await self.request("GET", path)
        assert status == 200, status
        return csrf_in(page)


def csrf_in(page: str) -> str:
    found = re.search(r'name="csrf" value="([^"]*)"', page)
    assert found, "no CSRF field in the page"
    return found.group(1)


@pytest.fixture
def browser(ns: Ns) -> Browser:
    return Browser(ns, {})


async def audit(ns: Ns) -> list[dict[str, Any]]:
    return list(await ns.ok("GET", "/api/audit"))


async def test_pages_without_a_session_go_to_the_login_page_and_actions_are_refused(
    browser: Browser, ns: Ns
) -> None:
    for page in ("/console/", "/console/fleet", "/console/runs", "/console/audit",
                 "/console/settings", "/console/runs/1/events"):  # fmt: skip
        status, _, r = await browser.request("GET", page)
        assert (status, r.headers["Location"]) == (303, "/console/login"), page
    status, _, r = await browser.request("GET", "/")
    assert (status, r.headers["Location"]) == (303, "/console/")
    before = await ns.ok("GET", "/api/settings")
    status, body, _ = await browser.request(
        "POST", "/console/settings", {"task_request_interval_s": "60", "poll_jitter_fraction": "0.1",
                                      "ts_check_interval_s": "60", "csrf": "x"}
    )  # fmt: skip
    assert status == 403
    assert "log in" in body
    assert await ns.ok("GET", "/api/settings") == before


async def test_login_sets_a_strict_secure_httponly_cookie_and_is_audited(
    browser: Browser, ns: Ns
) -> None:
    status, _, r = await browser.login(ADMIN)
    assert (status, r.headers["Location"]) == (303, "/console/")
    cookie = next(c for c in r.headers.getall("Set-Cookie") if c.startswith("tickle_session="))
    flags = {part.strip().lower() for part in cookie.split(";")[1:]}
    assert {"httponly", "secure", "samesite=strict", "path=/console"} <= flags
    assert any(f.startswith("max-age=") for f in flags)
    status, page, r = await browser.request("GET", "/console/fleet")
    assert status == 200
    assert ">admin<" in page
    assert "default-src 'self'" in r.headers["Content-Security-Policy"]
    assert r.headers["X-Frame-Options"] == "DENY"
    assert ADMIN not in page  # the token never comes back in a page
    login = (await audit(ns))[0]
    assert (login["who"], login["action"], login["target"]) == ("admin", "login", "console")


async def test_a_wrong_token_or_a_login_without_its_csrf_token_is_refused(
    browser: Browser, ns: Ns
) -> None:
    status, page, _ = await browser.login("not-the-token-at-all")
    assert status == 401
    assert "unknown token" in page
    assert "tickle_session" not in browser.cookies
    assert (await audit(ns))[0]["action"] == "login.refused"
    status, _, _ = await browser.request(
        "POST", "/console/login", {"csrf": "forged", "token": ADMIN}
    )
    assert status == 403
    assert "tickle_session" not in browser.cookies


async def test_an_action_with_a_wrong_or_missing_csrf_token_is_refused(
    browser: Browser, ns: Ns
) -> None:
    await browser.login(ADMIN)
    real = await browser.csrf()
    form = {"task_request_interval_s": "90", "poll_jitter_fraction": "0.1",
            "ts_check_interval_s": "60"}  # fmt: skip
    for csrf in ("wrong", "", real[:-1] + ("0" if real[-1] != "0" else "1")):
        status, body, _ = await browser.request("POST", "/console/settings", form | {"csrf": csrf})
        assert status == 403
        assert "CSRF" in body
    status, body, _ = await browser.request("POST", "/console/settings", form)
    assert status == 403
    assert (await ns.ok("GET", "/api/settings"))["task_request_interval_s"] == 1800

    status, _, r = await browser.request("POST", "/console/settings", form | {"csrf": real})
    assert (status, r.headers["Location"]) == (303, "/console/settings")
    assert (await ns.ok("GET", "/api/settings"))["task_request_interval_s"] == 90
    change = (await audit(ns))[0]
    assert (change["who"], change["action"]) == ("admin", "settings")
    assert change["detail"] == {"task_request_interval_s": [1800, 90]}


async def test_logout_ends_the_session_and_an_expired_session_is_refused(
    browser: Browser, ns: Ns
) -> None:
    await browser.login(ADMIN)
    session = browser.cookies["tickle_session"]
    status, _, _ = await browser.request("POST", "/console/logout", {"csrf": await browser.csrf()})
    assert status == 303
    replay = Browser(ns, {"tickle_session": session})  # the old cookie, kept by an attacker
    status, _, r = await replay.request("GET", "/console/fleet")
    assert (status, r.headers["Location"]) == (303, "/console/login")

    await browser.login(ADMIN)
    with ns.stores.database.writing() as s:
        s.execute(update(ConsoleSession).values(expires_at=time.time() - 1))
    status, _, r = await browser.request("GET", "/console/fleet")
    assert (status, r.headers["Location"]) == (303, "/console/login")
    actions = [e["action"] for e in await audit(ns)]
    assert actions[:3] == ["login", "logout", "login"]


async def test_operator_accounts_act_under_their_own_name_in_the_api_and_the_audit(
    ns: Ns, browser: Browser
) -> None:
    creds = await ns.ok("POST", "/api/operators", json={"name": "alice"})
    assert creds["name"] == "alice"
    assert len(creds["token"]) >= 32
    token = creds["token"]
    assert [o["name"] for o in await ns.ok("GET", "/api/operators")] == ["alice"]
    status, body = await ns.call("POST", "/api/operators", json={"name": "alice"})
    assert status == 409
    assert "exists" in body["detail"]
    status, body = await ns.call("POST", "/api/operators", json={"name": "admin"})
    assert status == 409

    task = await ns.ok("POST", "/api/tasks", token=token, json={"name": "t", "command": ["true"]})
    await ns.ok("PUT", "/api/settings", token=token, json={"task_request_interval_s": 120})
    status, _ = await ns.call("POST", "/api/operators", token=token, json={"name": "mallory"})
    assert status == 403  # only the admin token manages operator accounts
    status, _ = await ns.call("GET", "/api/audit", token=token)
    assert status == 403

    await browser.login(token)
    status, page, _ = await browser.request("GET", "/console/fleet")
    assert status == 200
    assert ">alice<" in page

    events = await audit(ns)
    assert [(e["who"], e["action"], e["target"]) for e in reversed(events)] == [
        ("admin", "operator.add", "operator alice"),
        ("alice", "task.define", f"task {task['id']} t"),
        ("alice", "settings", "settings version 2"),
        ("alice", "login", "console"),
    ]
    limited = await ns.ok("GET", "/api/audit?limit=1&who=alice")
    assert [e["action"] for e in limited] == ["login"]
    changes = await ns.ok("GET", "/api/audit?action=settings")
    assert [(e["who"], e["detail"]) for e in changes] == [
        ("alice", {"task_request_interval_s": [1800, 120]})
    ]
    status, body = await ns.call("GET", "/api/audit?limit=0")
    assert status == 422


async def test_run_now_through_the_api_is_audited_and_listed_newest_first(ns: Ns) -> None:
    ts = await ns.task_server()
    await ts.agent("c1")
    first = await ns.run_task(["c1"], name="one")
    second = await ns.ok(
        "POST", "/api/runs", json={"task_id": first["task_id"], "computers": ["c1"]}
    )
    runs = (await ns.ok("GET", "/api/runs"))["runs"]
    assert [r["id"] for r in runs] == [second["id"], first["id"]]
    assert runs[0]["label"] == "one"
    assert runs[0]["executions"] == 1
    assert runs[0]["statuses"] == {"pending": 1}
    run_rows = [e for e in await audit(ns) if e["action"] == "run"]
    task = first["task_id"]
    assert [e["target"] for e in run_rows] == [
        f"run {second['id']}: task {task}",
        f"run {first['id']}: task {task}",
    ]
    assert run_rows[0]["detail"] == {
        "computers": ["c1"],
        "groups": [],
        "all": False,
        "executions": 1,
        "expires_in_s": None,
    }


async def test_the_api_docs_pages_load_their_assets_from_the_ns_itself(ns: Ns) -> None:
    for page, asset in (("/docs", "/docs-static/swagger-ui-bundle.js"),
                        ("/redoc", "/docs-static/redoc.standalone.js")):  # fmt: skip
        async with ns.http.get(ns.url + page) as r:
            html = await r.text()
        assert r.status == 200
        assert asset in html
        assert not re.search(r"https?://", html.replace(ns.url, "")), "a page names another host"
        async with ns.http.get(ns.url + asset) as r:
            assert r.status == 200
            assert len(await r.read()) > 100_000


async def test_a_bad_form_value_is_one_line_naming_the_field(browser: Browser, ns: Ns) -> None:
    await browser.login(ADMIN)
    form = {"task_request_interval_s": "5", "poll_jitter_fraction": "0.1",
            "ts_check_interval_s": "60", "csrf": await browser.csrf()}  # fmt: skip
    status, page, _ = await browser.request("POST", "/console/settings", form)
    assert status == 400
    error = re.search(r'<p class="error" role="alert">([^<]*)</p>', page)
    assert error is not None
    assert error.group(1) == "task_request_interval_s: Input should be greater than or equal to 10"
    status, page, _ = await browser.request(
        "POST", "/console/run-now", {"what": "task", "task_id": "", "computers": "c1",
                                     "csrf": form["csrf"]}
    )  # fmt: skip
    assert status == 400
    assert "task: choose one" in page


async def test_tickle_operators_add_prints_the_token_once_and_it_works(ns: Ns) -> None:
    env = {**os.environ, "TICKLE_NS_URL": ns.url, "TICKLE_ADMIN_TOKEN": ADMIN}
    done = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "tickle", "operators", "add", "bob"],
        capture_output=True, text=True, env=env, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "operator 'bob' added; its token (shown only now):"
    token = lines[1]
    assert await ns.ok("GET", "/api/computers", token=token) == []
    listed = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "tickle", "operators", "list", "--json"],
        capture_output=True, text=True, env=env, timeout=60, check=False,
    )  # fmt: skip
    assert [o["name"] for o in json.loads(listed.stdout)] == ["bob"]
    assert token not in listed.stdout
    assert [(e["who"], e["action"]) for e in await audit(ns)] == [("admin", "operator.add")]


def _console_routes() -> list[tuple[str, str]]:
    """Every (method, path) of the console, with path parameters filled in."""
    found = []
    for route in pages.router.routes:
        assert isinstance(route, APIRoute)
        path = re.sub(r"\{[a-z_]*_id\}", "1", route.path).replace("{name}", "pc1")
        found += [(method, path) for method in sorted(route.methods)]
    return found


@pytest.mark.attacks
async def test_every_console_route_refuses_no_session_a_forged_one_and_a_wrong_csrf_token(
    browser: Browser, ns: Ns
) -> None:
    routes = _console_routes()
    open_routes = {("GET", "/console/login"), ("POST", "/console/login")}
    wrong: list[str] = []
    tried = 0
    for cookies in ({}, {"tickle_session": "forged-session-value"}):
        intruder = Browser(ns, dict(cookies))
        for method, path in routes:
            if (method, path) in open_routes:
                continue
            tried += 1
            form = {"csrf": "x"} if method == "POST" else None
            status, _, r = await intruder.request(method, path, form)
            refused = (status == 303 and r.headers["Location"] == "/console/login") if (
                method == "GET") else status == 403  # fmt: skip
            if not refused:
                wrong.append(f"{method} {path} {cookies}: {status}")
    await browser.login(ADMIN)
    real = await browser.csrf()
    for method, path in routes:
        if method != "POST" or (method, path) in open_routes:
            continue
        tried += 2
        for csrf in ("forged", real.upper()):
            status, _, _ = await browser.request("POST", path, {"csrf": csrf, "name": "x"})
            if status != 403:
                wrong.append(f"POST {path} csrf={csrf[:6]}: {status}")
    actions = [e["action"] for e in await audit(ns)]
    record(
        case="Console: every route without a session or with a wrong CSRF token",
        done=f"{len(routes)} console routes x no cookie / forged session cookie; every action "
        "of a real session with a forged or altered CSRF token",
        outcome="all refused (pages: the login page, actions: 403), nothing done"
        if not wrong and actions == ["login"]
        else f"{len(wrong)} let in; audit {actions}",
        tried=tried,
    )
    assert wrong == []
    assert actions == ["login"]  # nothing was done


@pytest.mark.attacks
async def test_a_session_cookie_replayed_after_logout_or_expiry_is_refused(
    browser: Browser, ns: Ns
) -> None:
    await browser.login(ADMIN)
    stolen = browser.cookies["tickle_session"]
    await browser.request("POST", "/console/logout", {"csrf": await browser.csrf()})
    after_logout, _, _ = await Browser(ns, {"tickle_session": stolen}).request(
        "GET", "/console/audit"
    )
    await browser.login(ADMIN)
    stolen = browser.cookies["tickle_session"]
    with ns.stores.database.writing() as s:
        s.execute(update(ConsoleSession).values(expires_at=time.time() - 1))
    after_expiry, _, _ = await Browser(ns, {"tickle_session": stolen}).request(
        "GET", "/console/audit"
    )
    refused = after_logout == after_expiry == 303
    record(
        case="Console: a session cookie replayed after logout / expiry",
        done="a copied session cookie sent again after its session logged out, and after it expired",
        outcome="refused (the login page)"
        if refused
        else f"answered {after_logout}/{after_expiry}",
        tried=2,
    )
    assert (after_logout, after_expiry) == (303, 303)


@pytest.mark.attacks
async def test_guessing_tokens_is_throttled_per_address_without_filling_the_audit(
    browser: Browser, ns: Ns
) -> None:
    guesses = 50
    answers = [(await browser.login(f"guess-{i:04d}-xxxxxxxx"))[0] for i in range(guesses)]
    refused_logins = [e for e in await audit(ns) if e["action"] == "login.refused"]
    throttled_right_token, _, _ = await browser.login(ADMIN)  # the same address, for a while
    ok = answers == [401] * 10 + [429] * (guesses - 10) and len(refused_logins) == 10
    record(
        case="Console: guessing login tokens",
        done=f"{guesses} wrong tokens from one address within a minute, then the right one",
        outcome="10 refused (401, audited), the rest 429 without a check or an audit row"
        if ok and throttled_right_token == 429
        else f"answers {sorted(set(answers))}, {len(refused_logins)} audit rows",
        tried=guesses + 1,
    )
    assert answers == [401] * 10 + [429] * (guesses - 10)
    assert len(refused_logins) == 10
    assert throttled_right_token == 429


def test_the_login_throttle_forgets_old_refusals_and_old_addresses() -> None:
    throttle = LoginThrottle(limit=2, window_s=60, max_addresses=2)
    for at in (0.0, 1.0):
        throttle.refused("10.0.0.1", at)
    assert throttle.blocked("10.0.0.1", 2.0)
    assert not throttle.blocked("10.0.0.1", 61.0)  # the first refusal left the window
    throttle.refused("10.0.0.1", 62.0)
    throttle.refused("10.0.0.2", 62.0)
    throttle.refused("10.0.0.3", 62.0)  # a third address: the one refused longest ago goes
    throttle.refused("10.0.0.3", 62.0)
    assert throttle.blocked("10.0.0.3", 63.0)
    assert not throttle.blocked("10.0.0.1", 63.0)


async def test_the_settings_form_turns_long_poll_on_and_off(browser: Browser, ns: Ns) -> None:
    await browser.login(ADMIN)
    form = {"task_request_interval_s": "1800", "poll_jitter_fraction": "0.1",
            "ts_check_interval_s": "60", "long_poll_timeout_s": "40"}  # fmt: skip
    status, _, _ = await browser.request(
        "POST", "/console/settings", form | {"long_poll": "on", "csrf": await browser.csrf()}
    )
    assert status == 303
    settings = await ns.ok("GET", "/api/settings")
    assert (settings["long_poll"], settings["long_poll_timeout_s"]) == (True, 40)
    # an unticked checkbox is absent from the form: off
    status, _, _ = await browser.request(
        "POST", "/console/settings", form | {"csrf": await browser.csrf()}
    )
    assert status == 303
    assert (await ns.ok("GET", "/api/settings"))["long_poll"] is False
