"""The central settings, as the operator sees and changes them."""

from __future__ import annotations

from fastapi import APIRouter

from tickle import messages as m
from tickle.ns.auth import OperatorDep
from tickle.ns.dependencies import ActionsDep, SettingsDep
from tickle.serving import JsonRoute

router = APIRouter(tags=["settings"], route_class=JsonRoute)


@router.get("/api/settings", summary="Central settings")
def get_settings(_: OperatorDep, settings: SettingsDep) -> m.SettingsOut:
    return settings.settings()


@router.put(
    "/api/settings",
    summary="Change central settings",
    description="Bumps the version and sends a settings tickle to every task server, when"
    " something changed; an update that changes nothing leaves the version as it is.",
)
async def put_settings(
    body: m.SettingsUpdate, who: OperatorDep, actions: ActionsDep
) -> m.SettingsOut:
    return await actions.update_settings(who, body)
