"""Routes for task servers: registration, the pull of work and settings, status events and what
they see of their clients. Task-server token (registration: the enrollment secret)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from tickle import messages as m
from tickle.ns.auth import TaskServerDep
from tickle.ns.dependencies import DeliveryDep, InventoryDep, SettingsDep
from tickle.serving import JsonRoute

router = APIRouter(tags=["task-server"], route_class=JsonRoute)
REGISTER = "/api/ts/register"
REGISTER_AGENT = "/api/ts/agents/register"
# registrations are small: their bodies are held to max_registration_body_bytes (tickle.serving)
REGISTRATIONS = (REGISTER, REGISTER_AGENT)
TsPullViaQuery = Annotated[
    m.TsPullVia,
    Query(
        description="what made the task server pull: tickle (an NS tickle; only this "
        "acknowledges it), check (its periodic check, or on its own, e.g. after an agent "
        "registered), start (at its start). Default tickle: a task server of an older version "
        "sends none and its pulls acknowledge as before."
    ),
]


@router.post(
    REGISTER,
    summary="Register a task server",
    description="Authenticated by the task servers' enrollment secret in the body. "
    "Re-registering a name rotates its token and tickle key; it must bring the identity the "
    "name registered with (another: 409, until an operator re-keys it). With "
    "registration_approval = manual a new name gets 403 until an operator approves it.",
)
async def register_task_server(
    body: m.TaskServerRegister, inventory: InventoryDep
) -> m.TaskServerCredentials:
    return await inventory.register_task_server(body)


@router.post(
    REGISTER_AGENT,
    summary="Register an agent with the calling task server",
    description="Moves the computer to the calling task server; re-registering rotates its "
    "credentials. It must bring the identity the computer registered with (another: 409, the "
    "computer keeps its agent, until an operator re-keys it). With registration_approval = "
    "manual a new name gets 403 until an operator approves it.",
)
async def register_agent(
    body: m.AgentRegistration, ts: TaskServerDep, inventory: InventoryDep
) -> m.AgentCredentials:
    return await inventory.register_agent(ts, body)


@router.get("/api/ts/clients", summary="The calling task server's clients")
def list_clients(ts: TaskServerDep, inventory: InventoryDep) -> list[m.ClientInfo]:
    return inventory.clients(ts)


@router.get(
    "/api/ts/work",
    summary="Pull work",
    description="Every unfinished execution of the calling task server's clients. "
    "A pull with via=tickle acknowledges the tasks tickle; any pull sets last_pull_at.",
)
async def pull_work(
    ts: TaskServerDep, delivery: DeliveryDep, via: TsPullViaQuery = "tickle"
) -> m.WorkOut:
    return await delivery.pull_work(ts, via)


@router.get(
    "/api/ts/settings",
    summary="Pull settings",
    description="A pull with via=tickle acknowledges the settings tickle.",
)
async def pull_settings(
    ts: TaskServerDep, settings: SettingsDep, via: TsPullViaQuery = "tickle"
) -> m.SettingsOut:
    return await settings.pull(ts, via)


@router.post(
    "/api/ts/events",
    summary="Report status events",
    description="Each event is recorded exactly once by event_id. `accepted` lists the ids "
    "recorded now or before (and ids of unknown executions, ignored); an event for another "
    "task server's client is not accepted.",
)
async def report_events(
    batch: m.EventBatch, ts: TaskServerDep, delivery: DeliveryDep
) -> m.EventAck:
    return await delivery.record_events(ts, batch.events)


@router.post(
    "/api/ts/computers/state",
    summary="Report what the task server sees of its clients",
    description="Last contact (the agents' polls, pulls and events, batched), the settings "
    "version each agent has, tickle reachability and observed address (NAT is detected when it "
    "differs from the address the agent reported). `forgotten` names computers the NS does not "
    "know (forgotten by the operator): the task server drops their credentials. A state of "
    "another task server's client is refused (403) after the others are applied.",
)
def report_computer_states(
    states: list[m.ComputerState], ts: TaskServerDep, inventory: InventoryDep
) -> m.ComputerStatesAck:
    forgotten = inventory.update_computer_states(ts, states)
    return m.ComputerStatesAck(updated=len(states) - len(forgotten), forgotten=forgotten)
