"""What the API's routes call, one service per domain: each runs its store's work off the event
loop and tells the tickle server and the metrics what happened."""

from __future__ import annotations

from dataclasses import dataclass

from tickle.metrics import ComponentMetrics
from tickle.ns.liveness import LivenessGauge, OfflineBound
from tickle.ns.services.actions import OperatorActions
from tickle.ns.services.cancel import CancelService
from tickle.ns.services.clocks import ClockMetrics, ClockService
from tickle.ns.services.delivery import DeliveryService
from tickle.ns.services.history import HistoryService
from tickle.ns.services.inventory import InventoryService
from tickle.ns.services.settings import SettingsService
from tickle.ns.settings import NsSettings
from tickle.ns.stores import Stores
from tickle.ns.stores.audit import AuditStore
from tickle.ns.stores.catalog import CatalogStore
from tickle.ns.stores.operators import OperatorStore
from tickle.ns.stores.output import OutputStore
from tickle.ns.stores.registrations import RegistrationStore
from tickle.ns.stores.run_list import RunListStore
from tickle.ns.tickle_server import TickleServer


@dataclass(frozen=True, slots=True)
class Services:
    """The services of one NS process (on `app.state.services`)."""

    inventory: InventoryService
    # defining tasks and jobs touches nothing but the database: the store serves the routes
    catalog: CatalogStore
    delivery: DeliveryService
    settings: SettingsService
    history: HistoryService
    metrics: ComponentMetrics
    # the operator's decisions on registrations touch nothing but the database, likewise
    registrations: RegistrationStore
    clocks: ClockService
    cancel: CancelService
    # reading output touches nothing but the database: the store serves the route
    output: OutputStore
    operators: OperatorStore
    audit: AuditStore
    run_list: RunListStore
    actions: OperatorActions  # what operators do, audited

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
            OfflineBound(settings.offline_intervals, settings.offline_slack_s),
            manual_approval=settings.registration_approval == "manual",
        )
        metrics.registry.register(ClockMetrics(stores.inventory))
        metrics.registry.register(LivenessGauge(inventory.liveness_counts))
        delivery = DeliveryService(
            stores.delivery,
            tickle_server,
            metrics,
            stores.cancel,
            settings.default_run_expiry_s,
        )
        central = SettingsService(stores.settings, tickle_server)
        cancel = CancelService(stores.cancel, tickle_server, metrics)
        history = HistoryService(stores.history, tickle_server)
        return cls(
            inventory=inventory,
            catalog=stores.catalog,
            delivery=delivery,
            cancel=cancel,
            output=stores.output,
            settings=central,
            history=history,
            metrics=metrics,
            registrations=stores.registrations,
            clocks=ClockService(stores.inventory),
            operators=stores.operators,
            audit=stores.audit,
            run_list=stores.run_list,
            actions=OperatorActions(
                stores.catalog,
                delivery,
                central,
                stores.operators,
                stores.audit,
                cancel,
                history,
                stores.registrations,
            ),
        )
