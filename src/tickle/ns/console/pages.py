"""The console's pages and actions. Pages read through the services and stores (as the API's
routes do); actions go through `OperatorActions`, which records each in the audit."""

from __future__ import annotations

import asyncio
import hmac
import json
import shlex
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from pydantic import ValidationError

import tickle
from tickle import messages as m
from tickle.ns.console import sessions, views
from tickle.ns.console.sessions import LoginNeeded, Session, page_session
from tickle.ns.credentials import token_sha256
from tickle.ns.errors import Conflict, NotFound
from tickle.ns.services import Services
from tickle.ns.stores.operators import ADMIN

HERE = Path(__file__).parent
P = sessions.PREFIX
router = APIRouter(prefix=P, include_in_schema=False)
templates = Jinja2Templates(directory=HERE / "templates")
templates.env.globals.update(
    P=P, version=getattr(tickle, "__version__", ""), steps=m.TIMELINE_STEPS
)
templates.env.filters.update(
    when=views.when,
    ago=views.ago,
    ms=views.ms,
    status_bar=views.status_bar,
    offset=views.offset,
)
PageSession = Annotated[Session, Depends(page_session)]
ActionForm = Annotated[tuple[Session, dict[str, str]], Depends(sessions.action_form)]
DbId = Annotated[int, PathParam(ge=m.DB_INT_MIN, le=m.DB_INT_MAX)]
BeforeQuery = Annotated[int | None, Query(ge=m.DB_INT_MIN, le=m.DB_INT_MAX)]
PAGE_SIZE = 50  # runs, or a computer's executions, per page
# how often the live run grid looks for new events, and how long one stream lasts at most
LIVE_TICK_S = 0.5
LIVE_MAX_S = 3600.0
HEARTBEAT_S = 15.0
FLEET_TICK_S = 2.0


def mount_static(app: FastAPI) -> None:
    app.mount(f"{P}/static", StaticFiles(directory=HERE / "static"), name="console-static")
    app.add_exception_handler(LoginNeeded, _to_login)

    @app.get("/", include_in_schema=False)
    def root() -> RedirectResponse:
        return RedirectResponse(f"{P}/", status_code=303)


async def _to_login(request: Request, _: Exception) -> Response:
    return RedirectResponse(f"{P}/login", status_code=303)


def _services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


def _page(
    request: Request, name: str, session: Session | None, status_code: int = 200, **ctx: Any
) -> HTMLResponse:
    return templates.TemplateResponse(
        request,
        name,
        {"session": session, "csrf": session.csrf if session else "", **ctx},
        status_code=status_code,
    )


async def _act(
    request: Request,
    session: Session,
    act: Callable[[], Awaitable[str]],
    page: Callable[..., HTMLResponse],
    **ctx: Any,
) -> Response:
    """Do an action and go where it says; a refusal shows the form's page again with it (400)."""
    try:
        where = await act()
    except (ValidationError, ValueError, KeyError, NotFound, Conflict) as exc:
        return await run_in_threadpool(page, request, session, 400, error=_one_line(exc), **ctx)
    return RedirectResponse(where, status_code=303)


def _one_line(exc: Exception) -> str:
    """A refusal as one line naming what is wrong (no library internals)."""
    if isinstance(exc, KeyError):
        return f"{exc.args[0]}: missing"
    if isinstance(exc, ValidationError):
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "form"
        return f"{where}: {first['msg']}"
    return str(exc)


# --- login ------------------------------------------------------------------------------------


@router.get("/login")
def login_page(request: Request) -> HTMLResponse:
    token = sessions.new_login_csrf()
    page = _page(request, "login.html", None, login_csrf=token)
    sessions.set_login_csrf(page, token)
    return page


@router.post("/login")
async def login(request: Request) -> Response:
    form = await sessions.form_of(request)
    sessions.check_login_csrf(request, form)
    token = form.get("token", "").strip()
    services = _services(request)
    client = request.client.host if request.client else "?"
    throttle: sessions.LoginThrottle = request.app.state.console_login_throttle
    if throttle.blocked(client, time.monotonic()):
        raise HTTPException(429, "too many refused logins from this address; try again later")
    who = _who_for(request, token) if token else None
    if who is None:
        throttle.refused(client, time.monotonic())
        await services.actions.record("unknown", "login.refused", "console", {"from": client})
        csrf = form.get(sessions.CSRF_FIELD, "")
        return _page(request, "login.html", None, 401, login_csrf=csrf, error="unknown token")
    lifetime = float(request.app.state.console_session_s)
    session_token = await run_in_threadpool(services.operators.open_session, who, lifetime)
    await services.actions.record(who, "login", "console", {"from": client})
    response = RedirectResponse(f"{P}/", status_code=303)
    sessions.set_session_cookie(response, session_token, lifetime)
    response.delete_cookie(sessions.LOGIN_CSRF_COOKIE, path=P, secure=True, httponly=True,
                           samesite="strict")  # fmt: skip
    return response


def _who_for(request: Request, token: str) -> str | None:
    sha = token_sha256(token)
    if hmac.compare_digest(sha, request.app.state.admin_token_sha256):
        return ADMIN
    return _services(request).operators.name_for(sha)


@router.post("/logout")
async def logout(request: Request, action: ActionForm) -> Response:
    session, _ = action
    services = _services(request)
    await run_in_threadpool(services.operators.close_session, session.token)
    await services.actions.record(session.who, "logout", "console")
    response = RedirectResponse(f"{P}/login", status_code=303)
    response.delete_cookie(sessions.COOKIE, path=P, secure=True, httponly=True, samesite="strict")
    return response


# --- fleet ------------------------------------------------------------------------------------


@router.get("/")
def home(_: PageSession) -> RedirectResponse:
    return RedirectResponse(f"{P}/fleet", status_code=303)


def _fleet_page(
    request: Request,
    session: Session,
    status_code: int = 200,
    state: str | None = None,
    task_server: str | None = None,
    group: str | None = None,
    **ctx: Any,
) -> HTMLResponse:
    services = _services(request)
    task_servers = services.inventory.task_servers()
    computers = services.inventory.computers()
    counts = views.state_counts(computers)
    shown = views.filter_computers(computers, state, task_server, group)
    waiting = [r for r in services.registrations.registrations() if r.state == "pending"]
    return _page(
        request, "fleet.html", session, status_code, task_servers=task_servers, computers=shown,
        total=len(computers), counts=counts, state=state or "", task_server=task_server or "",
        group=group or "", groups=views.all_groups(computers), registrations=waiting,
        settings_version=services.settings.settings().version, **ctx,
    )  # fmt: skip


@router.get("/fleet")
def fleet(
    request: Request,
    session: PageSession,
    state: str | None = None,
    task_server: str | None = None,
    group: str | None = None,
) -> HTMLResponse:
    return _fleet_page(request, session, 200, state, task_server, group)


@router.post("/task-servers/{name}/delete")
async def delete_task_server(request: Request, action: ActionForm, name: str) -> Response:
    session, form = action

    async def act() -> str:
        force = bool(form.get("force"))
        await _services(request).actions.delete_task_server(session.who, name, force)
        return f"{P}/fleet"

    return await _act(request, session, act, _fleet_page)


@router.post("/registrations/{kind}/{name}/{verb}")
async def decide_registration(
    request: Request, action: ActionForm, kind: str, name: str, verb: str
) -> Response:
    session, _ = action
    kinds: dict[str, m.RegistrationKind] = {"computer": "computer", "task_server": "task_server"}
    verbs: dict[str, m.RegistrationState] = {"approve": "approved", "reject": "rejected"}
    if kind not in kinds or verb not in verbs:
        raise HTTPException(404, "no such decision")

    async def act() -> str:
        actions = _services(request).actions
        await actions.decide_registration(session.who, kinds[kind], name, verbs[verb])
        return f"{P}/fleet"

    return await _act(request, session, act, _fleet_page)


@router.get("/fleet/events")
async def fleet_events(request: Request, session: PageSession) -> StreamingResponse:
    """Server-sent events: the fleet's counts per state whenever they change (looked at every
    FLEET_TICK_S), until the session ends."""
    services = _services(request)

    async def stream() -> AsyncIterator[str]:
        sent: dict[str, int] | None = None
        started = last = time.monotonic()
        while time.monotonic() - started < LIVE_MAX_S and not await request.is_disconnected():
            if await run_in_threadpool(services.operators.session_who, session.token) is None:
                yield "event: ended\ndata: {}\n\n"
                return
            computers = await run_in_threadpool(services.inventory.computers)
            counts = views.state_counts(computers) | {"all": len(computers)}
            if counts != sent:
                yield f"data: {json.dumps({'counts': counts})}\n\n"
                sent, last = counts, time.monotonic()
            elif time.monotonic() - last > HEARTBEAT_S:
                yield ": still here\n\n"
                last = time.monotonic()
            await asyncio.sleep(FLEET_TICK_S)

    return StreamingResponse(
        stream(), media_type="text/event-stream", headers={"x-accel-buffering": "no"}
    )


def _computer_page(
    request: Request,
    session: Session,
    status_code: int = 200,
    name: str = "",
    before: int | None = None,
    **ctx: Any,
) -> HTMLResponse:
    services = _services(request)
    found = [c for c in services.inventory.computers() if c.name == name]
    page = services.history.computer_executions(name, PAGE_SIZE, before, None)
    if not found and not page.executions:
        raise HTTPException(404, f"computer {name!r} does not exist")
    return _page(
        request, "computer.html", session, status_code, computer_name=name,
        computer=found[0] if found else None, history=page, **ctx,
    )  # fmt: skip


@router.get("/computers/{name}")
def computer(
    request: Request, session: PageSession, name: str, before: BeforeQuery = None
) -> HTMLResponse:
    return _computer_page(request, session, 200, name, before)


@router.post("/computers/{name}/forget")
async def forget_computer(request: Request, action: ActionForm, name: str) -> Response:
    session, _ = action

    async def act() -> str:
        await _services(request).actions.forget_computer(session.who, name)
        return f"{P}/fleet"

    return await _act(request, session, act, _computer_page, name=name)


# --- runs -------------------------------------------------------------------------------------


@router.get("/runs")
def runs(
    request: Request,
    session: PageSession,
    status: str = "",
    task_id: str = "",
    job_id: str = "",
    computer: str = "",
    since: str = "",
    until: str = "",
    before: BeforeQuery = None,
) -> HTMLResponse:
    filters = {"status": status, "task_id": task_id, "job_id": job_id, "computer": computer,
               "since": since, "until": until}  # fmt: skip
    try:
        where = views.run_filter(filters)
    except ValueError as exc:
        page, error = m.RunsPage(runs=[], next_before=None), str(exc)
    else:
        page, error = _services(request).history.runs(where, PAGE_SIZE, before), ""
    shown = {k: v for k, v in filters.items() if v}
    return _page(
        request, "runs.html", session, 400 if error else 200, page=page, bars=views.STATUS_ORDER,
        filters=filters, more=urlencode(shown | {"before": page.next_before}), error=error,
    )  # fmt: skip


def _run_page(
    request: Request, session: Session, status_code: int = 200, run_id: int = 0, **ctx: Any
) -> HTMLResponse:
    services = _services(request)
    run = _found(lambda: services.delivery.run(run_id))
    rows = views.grid_rows(services.run_list.grid(run_id))
    failed = sum(1 for r in rows if r["status"] in m.RERUN_STATUSES)
    return _page(
        request, "run.html", session, status_code, run=run, rows=rows, failed=failed,
        unfinished=sum(1 for r in rows if not r["final"]), **ctx,
    )  # fmt: skip


@router.get("/runs/{run_id}")
def run_page(request: Request, session: PageSession, run_id: DbId) -> HTMLResponse:
    return _run_page(request, session, 200, run_id)


@router.post("/runs/{run_id}/cancel")
async def cancel_run(request: Request, action: ActionForm, run_id: DbId) -> Response:
    session, form = action

    async def act() -> str:
        one = form.get("execution_id")
        execution_id = int(one) if one else None
        await _services(request).actions.cancel(session.who, run_id, execution_id)
        return f"{P}/executions/{execution_id}" if execution_id else f"{P}/runs/{run_id}"

    return await _act(request, session, act, _run_page, run_id=run_id)


@router.post("/runs/{run_id}/rerun")
async def rerun(request: Request, action: ActionForm, run_id: DbId) -> Response:
    session, form = action

    async def act() -> str:
        failed = bool(form.get("failed"))
        run = await _services(request).actions.rerun(session.who, run_id, failed)
        return f"{P}/runs/{run.id}"

    return await _act(request, session, act, _run_page, run_id=run_id)


@router.get("/runs/{run_id}/events")
async def run_events(request: Request, session: PageSession, run_id: DbId) -> StreamingResponse:
    """Server-sent events: the run's grid rows that changed since the last message, one message
    per tick however many executions moved (a run on 1,000 computers stays one message a tick).
    The stream ends when the run is done, or its session has ended (logout, expiry)."""
    services = _services(request)
    await run_in_threadpool(_found, lambda: services.delivery.run(run_id))

    async def stream() -> AsyncIterator[str]:
        sent: dict[int, dict[str, Any]] = {}
        started = last = time.monotonic()
        while time.monotonic() - started < LIVE_MAX_S and not await request.is_disconnected():
            if await run_in_threadpool(services.operators.session_who, session.token) is None:
                yield "event: ended\ndata: {}\n\n"
                return
            rows = views.grid_rows(await run_in_threadpool(services.run_list.grid, run_id))
            changed = [r for r in rows if sent.get(r["id"]) != r]
            done = all(r["final"] for r in rows)
            if changed or done:
                sent.update((r["id"], r) for r in changed)
                body = {"rows": changed, "counts": views.status_counts(rows), "done": done}
                yield f"data: {json.dumps(body)}\n\n"
                last = time.monotonic()
            elif time.monotonic() - last > HEARTBEAT_S:
                yield ": still here\n\n"
                last = time.monotonic()
            if done:
                return
            await asyncio.sleep(LIVE_TICK_S)

    return StreamingResponse(
        stream(), media_type="text/event-stream", headers={"x-accel-buffering": "no"}
    )


@router.get("/executions/{execution_id}")
def execution(request: Request, session: PageSession, execution_id: DbId) -> HTMLResponse:
    services = _services(request)
    ex = _found(lambda: services.delivery.execution(execution_id))
    output = services.output.output(execution_id)
    return _page(
        request, "execution.html", session, ex=ex, waterfall=views.waterfall(ex),
        output=output.steps, final=ex.status in m.FINAL_STATUSES,
    )  # fmt: skip


def _found(read: Any) -> Any:
    try:
        return read()
    except NotFound as exc:
        raise HTTPException(404, str(exc)) from None


# --- run now ----------------------------------------------------------------------------------


def _run_now_page(
    request: Request, session: Session, status_code: int = 200, **ctx: Any
) -> HTMLResponse:
    services = _services(request)
    return _page(
        request, "run_now.html", session, status_code, tasks=services.catalog.tasks(),
        jobs=services.catalog.jobs(), computers=services.inventory.computers(), **ctx,
    )  # fmt: skip


@router.get("/run-now")
def run_now_page(request: Request, session: PageSession) -> HTMLResponse:
    return _run_now_page(request, session, form={})


@router.post("/run-now")
async def run_now(request: Request, action: ActionForm) -> Response:
    session, form = action
    services = _services(request)

    async def act() -> str:
        create = _run_create(form)
        run = await services.actions.run_now(session.who, create)
        return f"{P}/runs/{run.id}"

    return await _act(request, session, act, _run_now_page, form=form)


def _run_create(form: dict[str, str]) -> m.RunCreate:
    what = form.get("what", "task")
    every = bool(form.get("all"))
    computers = [n for n in form.get("computers", "").replace(",", " ").split() if n]
    groups = [g for g in form.get("groups", "").replace(",", " ").split() if g]
    expiry = form.get("expires_in_min", "").strip()
    target: dict[str, Any] = {
        "computers": [] if every else computers,
        "groups": [] if every else groups,
        "all_computers": every,
        "expires_in_s": None if not expiry else _number(expiry, "expiry") * 60,
    }
    if what == "command":  # an ad-hoc command: kept with the run only, as `tickle run --command`
        argv = shlex.split(form.get("command", ""))
        spec = m.TaskSpec(name="adhoc", command=argv or None,
                          timeout_s=float(form.get("timeout") or 300))  # fmt: skip
        return m.RunCreate(task=spec, **target)
    if what == "job":
        return m.RunCreate(job_id=_int(form.get("job_id"), "job"), **target)
    return m.RunCreate(task_id=_int(form.get("task_id"), "task"), **target)


def _number(value: str, what: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"{what}: {value!r} is not a number") from None


def _int(value: str | None, what: str) -> int:
    try:
        return int(value or "")
    except ValueError:
        raise ValueError(f"{what}: choose one") from None


# --- tasks and jobs ---------------------------------------------------------------------------


def _tasks_page(
    request: Request, session: Session, status_code: int = 200, **ctx: Any
) -> HTMLResponse:
    catalog = _services(request).catalog
    tasks = catalog.tasks()
    return _page(
        request, "tasks.html", session, status_code, tasks=tasks, jobs=catalog.jobs(),
        task_names={t.id: t.name for t in tasks}, **ctx,
    )  # fmt: skip


@router.get("/tasks")
def tasks_page(request: Request, session: PageSession) -> HTMLResponse:
    return _tasks_page(request, session)


@router.post("/tasks")
async def define_task(request: Request, action: ActionForm) -> Response:
    session, form = action

    async def act() -> str:
        argv = shlex.split(form.get("command", ""))
        body = m.TaskCreate(name=form.get("name", ""), command=argv or None,
                            timeout_s=float(form.get("timeout") or 300))  # fmt: skip
        await _services(request).actions.define_task(session.who, body)
        return f"{P}/tasks"

    return await _act(request, session, act, _tasks_page)


@router.post("/jobs")
async def define_job(request: Request, action: ActionForm) -> Response:
    session, form = action

    async def act() -> str:
        ids = [int(i) for i in form.get("task_ids", "").replace(",", " ").split()]
        body = m.JobCreate(name=form.get("name", ""), task_ids=ids)
        await _services(request).actions.define_job(session.who, body)
        return f"{P}/tasks"

    return await _act(request, session, act, _tasks_page)


@router.post("/{kind}/{ident}/delete")
async def delete_task_or_job(
    request: Request, action: ActionForm, kind: str, ident: DbId
) -> Response:
    session, _ = action
    actions = _services(request).actions
    deletes = {"tasks": actions.delete_task, "jobs": actions.delete_job}
    if kind not in deletes:
        raise HTTPException(404, "nothing of that kind to delete")

    async def act() -> str:
        await deletes[kind](session.who, ident)
        return f"{P}/tasks"

    return await _act(request, session, act, _tasks_page)


# --- settings and audit -----------------------------------------------------------------------


def _settings_page(
    request: Request, session: Session, status_code: int = 200, **ctx: Any
) -> HTMLResponse:
    services = _services(request)
    current = services.settings.settings()
    history = services.audit.events(50, action="settings")
    reach = services.history.settings_reach()
    return _page(
        request, "settings.html", session, status_code, settings=current, history=history,
        reach=reach, **ctx,
    )  # fmt: skip


@router.get("/settings")
def settings_page(request: Request, session: PageSession) -> HTMLResponse:
    return _settings_page(request, session)


@router.post("/settings")
async def change_settings(request: Request, action: ActionForm) -> Response:
    session, form = action

    async def act() -> str:
        body = m.SettingsUpdate(
            task_request_interval_s=int(form["task_request_interval_s"]),
            poll_jitter_fraction=float(form["poll_jitter_fraction"]),
            ts_check_interval_s=int(form["ts_check_interval_s"]),
            # a checkbox: absent when unticked; the timeout kept when the form has none
            long_poll=form.get("long_poll") == "on",
            long_poll_timeout_s=int(form["long_poll_timeout_s"])
            if form.get("long_poll_timeout_s")
            else None,
        )
        await _services(request).actions.update_settings(session.who, body)
        return f"{P}/settings"

    return await _act(request, session, act, _settings_page)


@router.get("/audit")
def audit_page(request: Request, session: PageSession) -> HTMLResponse:
    return _page(request, "audit.html", session, events=_services(request).audit.events(500))
