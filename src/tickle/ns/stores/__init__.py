"""The NS's stores, one per domain (after the API's tags), over one database: what the API's
services, the tickle server and tests read and write through. Synchronous: call them off the
event loop."""

from __future__ import annotations

from dataclasses import dataclass

from tickle.ns.database import Database
from tickle.ns.stores.audit import AuditStore
from tickle.ns.stores.cancel import CancelStore
from tickle.ns.stores.catalog import CatalogStore
from tickle.ns.stores.delivery import DeliveryStore
from tickle.ns.stores.history import HistoryStore
from tickle.ns.stores.inventory import InventoryStore
from tickle.ns.stores.operators import OperatorStore
from tickle.ns.stores.output import OutputStore
from tickle.ns.stores.registrations import RegistrationStore
from tickle.ns.stores.run_list import RunListStore
from tickle.ns.stores.settings import SettingsStore


@dataclass(frozen=True, slots=True)
class Stores:
    """The database and a store per domain over it."""

    database: Database
    inventory: InventoryStore  # task servers, computers, credentials
    catalog: CatalogStore  # tasks and jobs
    delivery: DeliveryStore  # runs, executions, pulls, status events
    settings: SettingsStore  # the central settings
    registrations: RegistrationStore  # registrations awaiting an operator, re-keyed names
    history: HistoryStore  # run history, deletions, the settings' reach
    cancel: CancelStore  # cancel, expiry and loss of executions
    output: OutputStore  # the steps' output
    operators: OperatorStore  # operator accounts, web console sessions
    audit: AuditStore  # every operator action
    run_list: RunListStore  # a run's grid, as the console shows it live

    @classmethod
    def open(cls, url: str) -> Stores:
        """Stores over the database at `url` (migrate it with `database.migrate()`)."""
        database = Database(url)
        inventory = InventoryStore(database)
        return cls(
            database,
            inventory,
            CatalogStore(database),
            DeliveryStore(database),
            SettingsStore(database),
            RegistrationStore(database),
            HistoryStore(database, inventory.callers),
            CancelStore(database),
            OutputStore(database),
            OperatorStore(database),
            AuditStore(database),
            RunListStore(database),
        )

    def close(self) -> None:
        self.database.close()
