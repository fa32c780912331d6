"""Operator accounts (each with its own token, so the audit says who) and the audit itself."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from tickle import messages as m
from tickle.ns.auth import AdminDep
from tickle.ns.dependencies import ActionsDep, AuditDep, OperatorsDep
from tickle.serving import JsonRoute

router = APIRouter(tags=["operators"], route_class=JsonRoute)


@router.post(
    "/api/operators",
    status_code=201,
    summary="Add an operator account",
    description="Answers the account's token once (the NS keeps only its SHA-256). Admin token.",
)
async def add_operator(
    body: m.OperatorCreate, who: AdminDep, actions: ActionsDep
) -> m.OperatorCredentials:
    return await actions.add_operator(who, body)


@router.get("/api/operators", summary="List operator accounts")
def list_operators(_: AdminDep, operators: OperatorsDep) -> list[m.OperatorOut]:
    return operators.operators()


@router.get(
    "/api/audit",
    summary="Operator actions, newest first",
    description="Who (an operator's name, or admin), when, what and on what: runs, settings "
    "changes, definitions, operator accounts, console logins and logouts. Admin token.",
)
def list_audit(
    _: AdminDep,
    audit: AuditDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 200,
    who: Annotated[str | None, Query(max_length=64)] = None,
    action: Annotated[str | None, Query(max_length=32)] = None,
) -> list[m.AuditEventOut]:
    return audit.events(limit, who, action)
