"""What the API's routes call, one service per domain: each runs its store's work off the event
loop and tells the tickle server and the metrics what happened."""

from __future__ import annotations

from dataclasses import dataclass

from tickle.metrics import ComponentMetrics
from tickle.ns.services.cancel import CancelService
from tickle.ns.services.delivery import DeliveryService
from tickle.ns.services.inventory import InventoryService
from tickle.ns.services.settings import SettingsService
from tickle.ns.settings import NsSettings
from tickle.ns.stores import Stores
from tickle.ns.stores.catalog import CatalogStore
from tickle.ns.stores.output import OutputStore
from tickle.ns.tickle_server import TickleServer


@dataclass(frozen=True, slots=True)
class Services:
    """The services of one NS process (on `app.state.services`)."""

    inventory: InventoryService
    # defining tasks and jobs touches nothing but the database: the store serves the routes
    catalog: CatalogStore
    delivery: DeliveryService
    settings: SettingsService
    metrics: ComponentMetrics
    cancel: CancelService
    # reading output touches nothing but the database: the store serves the route
    output: OutputStore

    @classmethod
    def build(
        cls,
        settings: NsSettings,
        stores: Stores,
        tickle_server: TickleServer,
        metrics: ComponentMetrics,
    ) -> Services:
        """The services over open stores and the tickle server (`settings` with its secrets)."""
        inventory = InventoryService(
            stores.inventory,
            stores.database,
            tickle_server,
            settings.enrollment_secret or "",
            settings.ns_id,
        )
        return cls(
            inventory=inventory,
            catalog=stores.catalog,
            delivery=DeliveryService(
                stores.delivery,
                tickle_server,
                metrics,
                stores.cancel,
                settings.default_run_expiry_s,
            ),
            cancel=CancelService(stores.cancel, tickle_server, metrics),
            output=stores.output,
            settings=SettingsService(stores.settings, tickle_server),
            metrics=metrics,
        )
