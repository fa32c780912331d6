"""`make bench`'s S4 (bench/run.py): the NS's event ingest is measured with the events a site
sends."""

from __future__ import annotations

import sys
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

# bench/run.py: a script beside its longpoll.py, not a package
import run as bench


def test_the_ingest_bench_sends_event_ids_as_the_agents_make_them() -> None:
    # version 7, in time order, as `new_event_id` makes them (random version 4 ids cost the NS's
    # event-id index a page write per event: S4 measured what no site sends)
    events = bench.ingest_events(["pc1", "pc2"], {"pc1": 1, "pc2": 2})
    ids = [uuid.UUID(e.event_id) for e in events]
    assert [u.version for u in ids] == [7] * 8
    millis = [u.int >> 80 for u in ids]  # their time, to the millisecond: in the order made
    assert millis == sorted(millis)
    assert [(e.computer, e.kind) for e in events[:4]] == [
        ("pc1", kind) for kind in ("agent_tickled", "agent_pulled", "started", "finished")
    ]
