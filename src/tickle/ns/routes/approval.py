"""Who may register (the operator's side, admin token): registrations awaiting approval, approve,
reject, and re-key a computer or task server so that a new identity may take its name."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query

from tickle import messages as m
from tickle.ns.auth import OperatorDep
from tickle.ns.dependencies import ActionsDep, RegistrationsDep
from tickle.serving import JsonRoute

router = APIRouter(tags=["approval"], route_class=JsonRoute)
NamePath = Annotated[m.Name, Path(description="The computer's or task server's name")]
# the two kinds as they appear in paths, as in the listing routes /api/computers, /api/task-servers
_KINDS: dict[str, m.RegistrationKind] = {"computers": "computer", "task-servers": "task_server"}


@router.get(
    "/api/registrations",
    summary="Registrations awaiting a decision",
    description="Registrations under new names that wait for an operator (pending), were "
    "approved but not repeated yet (approved), or were refused for good (rejected), oldest first.",
)
def list_registrations(
    _: OperatorDep,
    registrations: RegistrationsDep,
    kind: Annotated[m.RegistrationKind | None, Query(description="Only this kind")] = None,
) -> list[m.RegistrationOut]:
    return registrations.registrations(kind)


def _decide_route(plural: str, state: m.RegistrationState, summary: str) -> None:
    kind = _KINDS[plural]
    verb = "approve" if state == "approved" else "reject"

    @router.post(f"/api/{plural}/{{name}}/{verb}", summary=summary, name=f"{verb}_{kind}")
    async def decide(name: NamePath, who: OperatorDep, actions: ActionsDep) -> m.RegistrationOut:
        return await actions.decide_registration(who, kind, name, state)


def _rekey_route(plural: str, summary: str, description: str) -> None:
    kind = _KINDS[plural]

    @router.post(
        f"/api/{plural}/{{name}}/rekey",
        summary=summary,
        description=description,
        name=f"rekey_{kind}",
    )
    async def rekey(name: NamePath, who: OperatorDep, actions: ActionsDep) -> m.Rekeyed:
        return await actions.rekey(who, kind, name)


_decide_route(
    "computers", "approved", "Approve a new agent: its next registration gets credentials"
)
_decide_route("computers", "rejected", "Reject a new agent: it never gets credentials")
_decide_route(
    "task-servers", "approved", "Approve a new task server: its next registration gets credentials"
)
_decide_route("task-servers", "rejected", "Reject a new task server: it never gets credentials")
_rekey_route(
    "computers",
    "Re-key a computer",
    "The next registration under this name is accepted with its agent's identity, replacing "
    "the computer's credentials (a reinstalled or replaced agent); a request waiting under the "
    "name is forgotten.",
)
_rekey_route(
    "task-servers",
    "Re-key a task server",
    "The next registration under this name is accepted with its identity, replacing the task "
    "server's credentials; a request waiting under the name is forgotten.",
)
