"""Datagrams against the real listeners of a running task server and agent.

Forged, altered, replayed, stale, truncated, oversized, wrong-version, unknown-kind and
unknown-sender tickles are each rejected and counted by reason in /metrics and never cause a pull;
then a bounded fuzz run of mutated datagrams over real UDP: all rejected, the counters add up to
what was sent, no pull, and the listener still answers a valid tickle.
"""

from __future__ import annotations

import asyncio
import base64
import json
import random
import socket
import struct
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.attacks.conftest import call, read_sqlite_one, start_fleet, stop_fleet
from tests.integration.conftest import eventually
from tests.reliability import record
from tickle import wire
from tickle.agent.control import control_call
from tickle.testing.localfleet import AGENT_TICKLE_PORT, TS_TICKLE_PORT, AgentSpec, LocalFleet
from tickle.wire import Kind, RejectReason

FUZZ_PER_LISTENER = 10_000  # x 2 listeners
BATCH = 100  # datagrams in flight at once: well inside a socket's receive buffer
QUIET_S = 0.5  # after the last bad datagram: time a wrongly caused pull would have to show


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Target:
    """One listener: where it is, the link's sender id and key, and how to read its counters."""

    name: str
    addr: tuple[str, int]
    sender: str
    key: bytes
    metrics_url: str  # the listener's own /metrics
    pulls_url: str  # /metrics of the side that is pulled from (counts pulls)
    pulls_metric: str
    last_pull: object  # async () -> float | None

    async def counters(self) -> dict[str, float]:
        mine = await _samples(self.metrics_url)
        pulled = await _samples(self.pulls_url)
        out = {
            f"rejected:{r.value}": mine.get(("tickle_tickles_rejected_total", r.value), 0.0)
            for r in RejectReason
        }
        out["received"] = sum(
            v for (n, _), v in mine.items() if n == "tickle_tickles_received_total"
        )
        out["pulls"] = sum(v for (n, _), v in pulled.items() if n == self.pulls_metric)
        out["own_pulls"] = sum(v for (n, _), v in mine.items() if n == "tickle_pulls_total")
        return out


async def _samples(url: str) -> dict[tuple[str, str], float]:
    status, text = await call("GET", url + "/metrics")
    assert status == 200
    out: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            label = s.labels.get("reason") or s.labels.get("via") or s.labels.get("kind") or ""
            out[(s.name, label)] = out.get((s.name, label), 0.0) + s.value
    return out


@dataclass
class Lab:
    fleet: LocalFleet
    ts: Target
    agent: Target


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    metrics_port = _free_port()
    fleet = start_fleet(
        tmp_path_factory.mktemp("udp-fleet"),
        ["ts1"],
        [AgentSpec("a1", ["ts1"], extra=["--metrics-host", "127.0.0.1",
                                          "--metrics-port", str(metrics_port)])],
    )  # fmt: skip
    try:
        yield asyncio.run(_lab(fleet, metrics_port))
    finally:
        stop_fleet(fleet)


async def _lab(fleet: LocalFleet, metrics_port: int) -> Lab:
    # no periodic work check or poll during the tests: every pull seen is one a datagram caused
    status, settings = await call("PUT", fleet.ns_url + "/api/settings", fleet.admin_token,
                                  {"ts_check_interval_s": 86400,
                                   "task_request_interval_s": 86400})  # fmt: skip
    assert status == 200, settings
    sock = fleet.root / "a1" / "agent.sock"

    async def agent_has_policy() -> bool:
        status = await control_call(sock, "GET", "/status")
        return bool(status["policy"]["settings_version"] == settings["version"])

    await eventually(agent_has_policy, 20, "the agent to take the quiet settings")
    ts_creds = json.loads(
        read_sqlite_one(fleet.root / "ts1" / "task-server.db", "SELECT body FROM credentials")[0]
    )
    ts_name, agent_key = read_sqlite_one(
        fleet.root / "a1" / "agent.db",
        "SELECT ts_name, tickle_key FROM credentials ORDER BY registered_at DESC",
    )

    async def ts_last_pull() -> float | None:
        _, servers = await call("GET", fleet.ns_url + "/api/task-servers", fleet.admin_token)
        return next(s["last_pull_at"] for s in servers if s["name"] == "ts1")

    async def agent_last_pull() -> float | None:
        status = await control_call(sock, "GET", "/status")
        return status["last_pull_at"]  # type: ignore[no-any-return]

    ts = Target(
        "task server", (fleet.ts_hosts["ts1"], TS_TICKLE_PORT), ts_creds["ns_id"],
        base64.b64decode(ts_creds["tickle_key"]), fleet.ts_url("ts1"), fleet.ns_url,
        "tickle_pulls_total", ts_last_pull,
    )  # fmt: skip
    agent = Target(
        "agent", (fleet.agent_hosts["a1"], AGENT_TICKLE_PORT), ts_name,
        base64.b64decode(agent_key), f"http://127.0.0.1:{metrics_port}", fleet.ts_url("ts1"),
        "tickle_pulls_total", agent_last_pull,
    )  # fmt: skip
    return Lab(fleet, ts, agent)


class Sender:
    """A UDP socket on loopback that sends datagrams to one target."""

    def __init__(self, addr: tuple[str, int]) -> None:
        self.addr = addr
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)

    def send(self, datagram: bytes) -> None:
        self.sock.sendto(datagram, self.addr)

    def close(self) -> None:
        self.sock.close()


_seq = iter(range(time.time_ns() + 10**12, 2**64))


def valid(t: Target, kind: Kind = Kind.TASKS, at_ms: int | None = None) -> bytes:
    return wire.encode(kind, t.sender, next(_seq), t.key, sent_at_ms=at_ms)


def bad_datagrams(t: Target, replay_of: bytes) -> list[tuple[str, bytes, RejectReason]]:
    """One datagram per attack, with the reason the listener must give."""
    altered = bytearray(valid(t))
    altered[-wire.MAC_LEN - 9] ^= 0x01  # a bit of the sequence number
    wrong_version = bytearray(valid(t))
    wrong_version[3] = 2
    unknown_kind = bytearray(valid(t))
    unknown_kind[4] = 7
    now_ms = time.time_ns() // 1_000_000
    return [
        ("forged (wrong key)", wire.encode(Kind.TASKS, t.sender, next(_seq), b"k" * 32),
         RejectReason.BAD_MAC),
        ("altered", bytes(altered), RejectReason.BAD_MAC),
        ("replayed", replay_of, RejectReason.REPLAYED),
        ("stale", valid(t, at_ms=now_ms - 120_000), RejectReason.STALE),
        ("from the future", valid(t, at_ms=now_ms + 120_000), RejectReason.STALE),
        ("truncated", valid(t)[:-5], RejectReason.MALFORMED),
        ("oversized", valid(t) + b"\x00" * 600, RejectReason.MALFORMED),
        ("empty", b"", RejectReason.MALFORMED),
        ("wrong version", bytes(wrong_version), RejectReason.VERSION),
        ("unknown kind", bytes(unknown_kind), RejectReason.UNKNOWN_KIND),
        ("unknown sender", wire.encode(Kind.TASKS, "mallory", next(_seq), t.key),
         RejectReason.UNKNOWN_SENDER),
        ("settings, forged", wire.encode(Kind.SETTINGS, t.sender, next(_seq), b"x" * 32),
         RejectReason.BAD_MAC),
    ]  # fmt: skip


async def _tickle_and_wait_for_pull(t: Target, sender: Sender) -> dict[str, float]:
    before = await t.counters()
    datagram = valid(t)
    sender.send(datagram)

    async def pulled() -> dict[str, float] | None:
        now = await t.counters()
        return (
            now if now["pulls"] > before["pulls"] and now["received"] > before["received"] else None
        )

    return await eventually(pulled, 15, f"the {t.name} to pull after a valid tickle")


@pytest.mark.attacks
@pytest.mark.integration
@pytest.mark.timeout(120)
@pytest.mark.parametrize("which", ["ts", "agent"])
async def test_each_bad_datagram_is_rejected_by_reason_and_causes_no_pull(
    lab: Lab, which: str
) -> None:
    t: Target = getattr(lab, which)
    sender = Sender(t.addr)
    try:
        first = valid(t)
        before_first = await t.counters()
        sender.send(first)

        async def first_pulled() -> dict[str, float] | None:
            now = await t.counters()
            return now if now["pulls"] > before_first["pulls"] else None

        base = await eventually(first_pulled, 15, f"the {t.name} to pull after a valid tickle")
        base_last_pull = await t.last_pull()  # type: ignore[operator]
        outcomes = []
        for label, datagram, reason in bad_datagrams(t, replay_of=first):
            key = f"rejected:{reason.value}"
            before = await t.counters()
            sender.send(datagram)

            async def counted(before: dict[str, float] = before, key: str = key) -> bool:
                return (await t.counters())[key] == before[key] + 1

            await eventually(counted, 5, f"{label} to be counted as {reason.value}")
            outcomes.append(label)
        await asyncio.sleep(QUIET_S)  # a pull a bad datagram caused would show by now
        after = await t.counters()
        last_pull = await t.last_pull()  # type: ignore[operator]
        rejected = sum(after[k] - base[k] for k in after if k.startswith("rejected:"))
        # and the listener still works
        served = await _tickle_and_wait_for_pull(t, sender)
    finally:
        sender.close()
    record(
        case=f"Bad tickles at the {t.name}",
        done="forged, altered, replayed, stale, future, truncated, oversized, empty, wrong "
        "version, unknown kind, unknown sender, forged settings tickle over real UDP",
        outcome="each rejected with its reason, no pull, valid tickle still served"
        if (after["pulls"], after["received"]) == (base["pulls"], base["received"])
        else "a bad datagram caused a pull",
        sent=len(outcomes),
        tried=len(outcomes),
        rejected=int(rejected),
        pulls_caused=int(after["pulls"] - base["pulls"]),
    )
    assert rejected == len(outcomes)
    assert after["received"] == base["received"]
    assert after["pulls"] == base["pulls"]
    assert after["own_pulls"] == base["own_pulls"]
    assert last_pull == base_last_pull
    assert served["pulls"] == after["pulls"] + 1


def mutants(t: Target, rng: random.Random) -> Iterator[tuple[str, bytes]]:
    """Endless mutated datagrams, each of one kind of damage."""
    while True:
        original = valid(t, kind=rng.choice(list(Kind)))
        how = rng.randrange(6)
        if how == 0:  # bit flips
            d = bytearray(original)
            for _ in range(rng.randint(1, 8)):
                d[rng.randrange(len(d))] ^= 1 << rng.randrange(8)
            if bytes(d) != original:
                yield "bit flips", bytes(d)
        elif how == 1:
            yield "truncated", original[: rng.randrange(len(original))]
        elif how == 2:
            yield "extended", original + rng.randbytes(rng.randint(1, 600))
        elif how == 3:
            yield "random bytes", rng.randbytes(rng.randint(0, 600))
        elif how == 4:  # a valid-looking header with random fields and a random MAC
            sender = t.sender if rng.random() < 0.5 else rng.choice(["ns", "ts1", "x" * 64, "é"])
            sender_b = sender.encode()
            head = struct.pack("!3sBBB", b"TKL", rng.choice([1, 1, 1, 0, 2, 255]),
                               rng.randint(0, 255), len(sender_b))  # fmt: skip
            tail = struct.pack("!QQ", rng.getrandbits(64), rng.getrandbits(64))
            yield "random header fields", head + sender_b + tail + rng.randbytes(32)
        else:  # right shape, signed with a wrong key
            yield "wrong key", wire.encode(Kind.TASKS, t.sender, next(_seq), rng.randbytes(32))


def predicted_reason(t: Target, datagram: bytes) -> RejectReason | None:
    try:
        wire.TickleGuard({t.sender: t.key}).check(datagram)
    except wire.TickleRejected as exc:
        return exc.reason
    return None


@pytest.mark.attacks
@pytest.mark.integration
@pytest.mark.timeout(300)
@pytest.mark.parametrize("which", ["ts", "agent"])
async def test_fuzzed_datagrams_are_all_rejected_counted_and_never_pull(
    lab: Lab, which: str
) -> None:
    t: Target = getattr(lab, which)
    rng = random.Random(f"fuzz-{which}")  # reproducible
    stream = mutants(t, rng)
    sender = Sender(t.addr)
    expected: Counter[RejectReason] = Counter()
    damage: Counter[str] = Counter()
    started = time.monotonic()
    try:
        base = await t.counters()
        base_last_pull = await t.last_pull()  # type: ignore[operator]
        sent = 0
        while sent < FUZZ_PER_LISTENER:
            batch = []
            while len(batch) < min(BATCH, FUZZ_PER_LISTENER - sent):
                label, datagram = next(stream)
                reason = predicted_reason(t, datagram)
                assert reason is not None, f"a mutant ({label}) is a valid tickle: {datagram!r}"
                batch.append(datagram)
                expected[reason] += 1
                damage[label] += 1
            for datagram in batch:
                sender.send(datagram)
            sent += len(batch)

            async def caught_up(target: int = sent) -> bool:
                now = await t.counters()
                got = sum(now[k] - base[k] for k in now if k.startswith("rejected:"))
                return got >= target

            await eventually(caught_up, 10, f"{sent} rejections counted", every_s=0.005)
        await asyncio.sleep(QUIET_S)
        after = await t.counters()
        last_pull = await t.last_pull()  # type: ignore[operator]
        fuzz_s = time.monotonic() - started
        served = await _tickle_and_wait_for_pull(t, sender)
    finally:
        sender.close()
    counted = {
        r: int(after[f"rejected:{r.value}"] - base[f"rejected:{r.value}"]) for r in RejectReason
    }
    predicted = {r: expected[r] for r in RejectReason}
    record(
        case=f"UDP fuzz at the {t.name}",
        done=f"{sent} mutated datagrams ({', '.join(f'{k} {v}' for k, v in sorted(damage.items()))})"
        " over real UDP in batches",
        outcome="all rejected, counted by reason as predicted, no pull, valid tickle served"
        if counted == predicted and after["pulls"] == base["pulls"]
        else "mismatch",
        sent=sent,
        tried=sent,
        rejected=sum(counted.values()),
        pulls_caused=int(after["pulls"] - base["pulls"]),
        wall_s=round(fuzz_s, 1),
        **{f"reason_{r.value}": n for r, n in counted.items()},
    )
    assert counted == predicted
    assert sum(counted.values()) == sent
    assert after["received"] == base["received"]
    assert after["pulls"] == base["pulls"]
    assert after["own_pulls"] == base["own_pulls"]
    assert last_pull == base_last_pull
    assert served["pulls"] == after["pulls"] + 1
