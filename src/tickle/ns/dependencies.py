"""The API's dependencies on the services, one typed alias each; `create_app` puts the services on
`app.state`, and tests may override a getter.

The getters are coroutines only so that FastAPI calls them on the event loop: a plain function
would cost each request a trip through the threadpool per getter.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from tickle.metrics import ComponentMetrics
from tickle.ns.services import Services
from tickle.ns.services.actions import OperatorActions
from tickle.ns.services.delivery import DeliveryService
from tickle.ns.services.history import HistoryService
from tickle.ns.services.inventory import InventoryService
from tickle.ns.services.settings import SettingsService
from tickle.ns.stores.audit import AuditStore
from tickle.ns.stores.catalog import CatalogStore
from tickle.ns.stores.operators import OperatorStore
from tickle.ns.stores.registrations import RegistrationStore


async def get_services(request: Request) -> Services:
    """The services the app was built with."""
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]


async def get_inventory(services: ServicesDep) -> InventoryService:
    return services.inventory


async def get_catalog(services: ServicesDep) -> CatalogStore:
    return services.catalog


async def get_delivery(services: ServicesDep) -> DeliveryService:
    return services.delivery


async def get_settings(services: ServicesDep) -> SettingsService:
    return services.settings


async def get_history(services: ServicesDep) -> HistoryService:
    return services.history


async def get_metrics(services: ServicesDep) -> ComponentMetrics:
    return services.metrics


async def get_registrations(services: ServicesDep) -> RegistrationStore:
    return services.registrations


async def get_actions(services: ServicesDep) -> OperatorActions:
    return services.actions


async def get_audit(services: ServicesDep) -> AuditStore:
    return services.audit


async def get_operators(services: ServicesDep) -> OperatorStore:
    return services.operators


InventoryDep = Annotated[InventoryService, Depends(get_inventory)]
CatalogDep = Annotated[CatalogStore, Depends(get_catalog)]
DeliveryDep = Annotated[DeliveryService, Depends(get_delivery)]
SettingsDep = Annotated[SettingsService, Depends(get_settings)]
HistoryDep = Annotated[HistoryService, Depends(get_history)]
MetricsDep = Annotated[ComponentMetrics, Depends(get_metrics)]
RegistrationsDep = Annotated[RegistrationStore, Depends(get_registrations)]
ActionsDep = Annotated[OperatorActions, Depends(get_actions)]
AuditDep = Annotated[AuditStore, Depends(get_audit)]
OperatorsDep = Annotated[OperatorStore, Depends(get_operators)]
