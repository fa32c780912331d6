"""Who is calling: bearer tokens for operators (the admin token, or a named operator account's) and
task servers, as FastAPI dependencies.

Servers keep only the SHA-256 of a token. A missing or unknown token gets 401; a valid token used
where its holder may not go (a task server on the admin API, the admin on the task-server API, an
agent token anywhere on the NS) gets 403.
"""

from __future__ import annotations

import asyncio
import hmac
from typing import Annotated

from fastapi import Depends, FastAPI, HTTPException, Request, status
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.types import Scope

from tickle import clock
from tickle.ns.credentials import Caller, token_sha256
from tickle.ns.dependencies import InventoryDep, OperatorsDep
from tickle.ns.services.clocks import ClockService
from tickle.ns.services.inventory import InventoryService
from tickle.ns.stores.operators import ADMIN, OperatorStore
from tickle.serving import arrived_at

# one scheme per kind of token, so the OpenAPI document says which token each route takes
_admin_bearer = HTTPBearer(
    auto_error=False,
    scheme_name="AdminToken",
    description="The admin token (setting admin_token, or {state_dir}/admin-token), or an "
    "operator account's token (`tickle operators add NAME`)",
)
_task_server_bearer = HTTPBearer(
    auto_error=False,
    scheme_name="TaskServerToken",
    description="A task server's token, issued by POST /api/ts/register",
)
AdminBearer = Annotated[HTTPAuthorizationCredentials | None, Depends(_admin_bearer)]
TaskServerBearer = Annotated[HTTPAuthorizationCredentials | None, Depends(_task_server_bearer)]

# request state: (token SHA-256, Caller) of a task server the body limit already looked up
_KNOWN_CALLER = "tickle_known_task_server"


def _token_hash(creds: HTTPAuthorizationCredentials | None) -> str:
    if creds is None or not creds.credentials:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "missing bearer token",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return token_sha256(creds.credentials)


def _is_admin(request: Request, sha: str) -> bool:
    admin_sha: str = request.app.state.admin_token_sha256
    return hmac.compare_digest(sha, admin_sha)


def _unknown() -> HTTPException:
    return HTTPException(
        status.HTTP_401_UNAUTHORIZED, "unknown bearer token", headers={"WWW-Authenticate": "Bearer"}
    )


async def require_operator(
    request: Request, creds: AdminBearer, inventory: InventoryDep, operators: OperatorsDep
) -> str:
    """Allow the admin token or an operator account's; returns who ("admin" or the operator's
    name), which the audit records. Async: the admin's token needs no query (an operator's is
    looked up from a thread)."""
    sha = _token_hash(creds)
    if _is_admin(request, sha):
        return ADMIN
    return await run_in_threadpool(_operator, sha, inventory, operators)


def _operator(sha: str, inventory: InventoryService, operators: OperatorStore) -> str:
    """The operator account whose token hashes to `sha` (blocking: database queries)."""
    name = operators.name_for(sha)
    if name is not None:
        return name
    caller = inventory.caller_for(sha)
    if caller is None:
        raise _unknown()
    raise HTTPException(
        status.HTTP_403_FORBIDDEN, f"{_role(caller.role)} token cannot use the admin API"
    )


async def require_admin(who: Annotated[str, Depends(require_operator)]) -> str:
    """Allow the admin token only (adding operator accounts)."""
    if who != ADMIN:
        raise HTTPException(
            status.HTTP_403_FORBIDDEN, "only the admin token can manage operator accounts"
        )
    return who


async def require_task_server(
    request: Request, creds: TaskServerBearer, inventory: InventoryDep
) -> Caller:
    """Allow a registered task server's token; returns who it is.

    The time the task server sent along (`X-Tickle-Time`) is a sample of its clock's offset.
    Async: a task server seen lately costs no query, and the threadpool's hand-off cost more
    than the rest of this check (the database is asked from a thread when it must be).
    """
    sha = _token_hash(creds)
    known = getattr(request.state, _KNOWN_CALLER, None)  # looked up by the body limit already
    caller = known[1] if known is not None and known[0] == sha else inventory.cached_caller(sha)
    if caller is None:
        caller = await run_in_threadpool(inventory.caller_for, sha)
    if caller is not None and caller.role == "task_server":
        await _measure_clock(request, caller)
        return caller
    if caller is not None or _is_admin(request, sha):
        who = _role(caller.role) if caller is not None else "the admin"
        raise HTTPException(
            status.HTTP_403_FORBIDDEN, f"{who} token cannot use the task-server API"
        )
    raise _unknown()


async def is_known_token(app: FastAPI, token: str, scope: Scope) -> bool:
    """Whether `token` is the admin's, an operator's or a task server's (checked before a large
    body is read).

    A task server found here is kept in the request's state, so `require_task_server` does not
    query the database for it a second time (large bodies are event batches: the hot path).
    """
    sha = token_sha256(token)
    admin_sha: str = app.state.admin_token_sha256
    if hmac.compare_digest(sha, admin_sha):
        return True
    inventory: InventoryService = app.state.services.inventory
    caller = inventory.cached_caller(sha)  # a task server seen lately: no database query
    if caller is None:
        operators: OperatorStore = app.state.services.operators
        if await asyncio.to_thread(operators.name_for, sha) is not None:
            return True
        caller = await asyncio.to_thread(inventory.caller_for, sha)  # a database query
    if caller is None or caller.role != "task_server":
        return False
    scope.setdefault("state", {})[_KNOWN_CALLER] = (sha, caller)
    return True


async def _measure_clock(request: Request, caller: Caller) -> None:
    await measure_clock(
        request.app.state.services.clocks,
        caller,
        request.headers.get(clock.TIME_HEADER),
        arrived_at(request.state),
    )


async def measure_clock(
    clocks: ClockService, caller: Caller, header: str | None, arrived: float
) -> None:
    """The time a task server sent along (`header`) is a sample of its clock's offset."""
    theirs = clock.parse_header(header, arrived)
    if theirs is not None:
        save = clocks.note(caller, theirs, arrived)
        if save is not None:  # the estimate moved: written from a thread
            await run_in_threadpool(clocks.save, caller, *save)


def _role(role: str) -> str:
    return "a task server" if role == "task_server" else "an agent"


# who calls: "admin" or an operator account's name (what the audit records)
OperatorDep = Annotated[str, Depends(require_operator)]
AdminDep = Annotated[str, Depends(require_admin)]
TaskServerDep = Annotated[Caller, Depends(require_task_server)]
