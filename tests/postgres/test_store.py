"""The NS store on PostgreSQL with several processes' stores on one database (in one test process,
each Store with its own engine and connections, as separate NS processes have)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tickle.ns.store import Store

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


@pytest.fixture
def stores(pg_url: str) -> Iterator[tuple[Store, Store]]:
    """Two stores (two NS processes' worth of connections) on one migrated database."""
    a, b = Store(pg_url), Store(pg_url)
    try:
        a.migrate()
        b.migrate()  # a second migration at start is a no-op
        yield a, b
    finally:
        a.close()
        b.close()


def test_released_dispatcher_lock_is_free_for_another_process_at_once(
    stores: tuple[Store, Store],
) -> None:
    a, b = stores
    lock_a, lock_b = a.dispatcher_lock(), b.dispatcher_lock()
    try:
        assert lock_a.try_acquire()
        assert not lock_b.try_acquire()
        lock_a.release()  # a's process goes on (its engine and pool stay): the lock must be free
        assert lock_b.try_acquire()
        assert not lock_a.try_acquire()
    finally:
        lock_a.release()
        lock_b.release()
