"""Datagrams against the real listeners of a running task server and agent.

Forged, altered, replayed, stale, truncated, oversized, wrong-version, unknown-kind and
unknown-sender tickles are each rejected and counted by reason in /metrics and never cause a pull;
then a bounded fuzz run of mutated datagrams over real UDP: all rejected, the counters add up to
what was sent, no pull, and the listener still answers a valid tickle. A tickle captured before
a receiver crashed is rejected as replayed after its restart, while restarted senders' tickles
still get through; and a flood of forged datagrams is counted in full but logged in a few lines.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import random
import re
import signal
import socket
import struct
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.attacks.conftest import call, read_sqlite_one, start_fleet, stop_fleet
from tests.integration.conftest import eventually, run_command, wait_run
from tests.reliability import record
from tickle import wire
from tickle.agent.control import control_call
from tickle.testing.localfleet import AGENT_TICKLE_PORT, TS_TICKLE_PORT, AgentSpec, LocalFleet
from tickle.wire import Kind, RejectReason

pytestmark = [pytest.mark.attacks, pytest.mark.integration]

FUZZ_PER_LISTENER = 10_000  # x 2 listeners
BATCH = 100  # datagrams in flight at once: well inside a socket's receive buffer
QUIET_S = 0.5  # after the last bad datagram: time a wrongly caused pull would have to show
FLOOD = 10_000  # forged datagrams at one listener
FLOOD_LOG_LINES = 5  # what the flood may add to the receiver's log while it lasts


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
    proc: str  # its process in the fleet

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
        out["tickle_pulls"] = pulled.get((self.pulls_metric, "tickle"), 0.0)
        out["start_pulls"] = pulled.get((self.pulls_metric, "start"), 0.0)
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
        "tickle_pulls_total", ts_last_pull, "ts1",
    )  # fmt: skip
    agent = Target(
        "agent", (fleet.agent_hosts["a1"], AGENT_TICKLE_PORT), ts_name,
        base64.b64decode(agent_key), f"http://127.0.0.1:{metrics_port}", fleet.ts_url("ts1"),
        "tickle_pulls_total", agent_last_pull, "a1",
    )  # fmt: skip
    return Lab(fleet, ts, agent)


@pytest.fixture(params=["ts", "agent"])
def t(lab: Lab, request: pytest.FixtureRequest) -> Target:
    """Each listener in turn: the task server's, the agent's."""
    target: Target = getattr(lab, request.param)
    return target


@pytest.fixture
def sender(t: Target) -> Iterator[Sender]:
    """A UDP socket that sends to the listener `t`."""
    s = Sender(t.addr)
    yield s
    s.close()


async def restart(lab: Lab, t: Target, sig: signal.Signals = signal.SIGKILL) -> None:
    """Stop the target's process with `sig` (SIGKILL: a crash), start it again on its state dir,
    and wait until it serves and made the pull it makes at start."""
    fleet = lab.fleet
    popen = fleet.procs[t.proc].popen
    assert popen is not None
    before = await t.counters()
    fleet.signal(t.proc, sig)
    assert await asyncio.to_thread(popen.wait, 15) is not None
    fleet.spawn(t.proc)
    if t is lab.ts:
        await fleet.wait_healthy(fleet.ts_url(t.proc), t.proc, 30)

        async def pulled_at_start() -> bool:
            return (await t.counters())["start_pulls"] > before["start_pulls"]

        await eventually(pulled_at_start, 15, "the restarted task server's pull at start")
    else:
        await fleet.wait_first_pull([t.proc], 30)


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


async def deliver_valid(t: Target, sender: Sender) -> tuple[bytes, dict[str, float]]:
    """Send a valid tickle and wait for its pull; return it and the counters after the pull."""
    before = await t.counters()
    datagram = valid(t)
    sender.send(datagram)

    async def pulled() -> dict[str, float] | None:
        now = await t.counters()
        return (
            now if now["pulls"] > before["pulls"] and now["received"] > before["received"] else None
        )

    return datagram, await eventually(pulled, 15, f"the {t.name} to pull after a valid tickle")


def assert_caused_nothing(base: dict[str, float], after: dict[str, float]) -> None:
    """Nothing sent between the two readings was received as a tickle or caused a pull."""
    assert after["received"] == base["received"]
    assert after["pulls"] == base["pulls"]
    assert after["own_pulls"] == base["own_pulls"]


@pytest.mark.timeout(120)
async def test_each_bad_datagram_is_rejected_by_reason_and_causes_no_pull(
    t: Target, sender: Sender
) -> None:
    first, base = await deliver_valid(t, sender)
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
    _, served = await deliver_valid(t, sender)
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
    assert_caused_nothing(base, after)
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


async def send_rejected(
    t: Target, sender: Sender, datagrams: list[bytes], base: dict[str, float]
) -> int:
    """Send `datagrams` in batches, each batch counted as rejected before the next is sent."""
    sent = 0
    for start in range(0, len(datagrams), BATCH):
        for datagram in datagrams[start : start + BATCH]:
            sender.send(datagram)
            sent += 1

        async def caught_up(target: int = sent) -> bool:
            now = await t.counters()
            got = sum(now[k] - base[k] for k in now if k.startswith("rejected:"))
            return got >= target

        await eventually(caught_up, 10, f"{sent} rejections counted", every_s=0.005)
    return sent


def predicted_reason(t: Target, datagram: bytes) -> RejectReason | None:
    try:
        wire.TickleGuard({t.sender: t.key}).check(datagram)
    except wire.TickleRejected as exc:
        return exc.reason
    return None


@pytest.mark.timeout(300)
async def test_fuzzed_datagrams_are_all_rejected_counted_and_never_pull(
    t: Target, sender: Sender
) -> None:
    rng = random.Random(f"fuzz-{t.proc}")  # reproducible
    stream = mutants(t, rng)
    expected: Counter[RejectReason] = Counter()
    damage: Counter[str] = Counter()
    started = time.monotonic()
    base = await t.counters()
    base_last_pull = await t.last_pull()  # type: ignore[operator]
    datagrams = []
    while len(datagrams) < FUZZ_PER_LISTENER:
        label, datagram = next(stream)
        reason = predicted_reason(t, datagram)
        assert reason is not None, f"a mutant ({label}) is a valid tickle: {datagram!r}"
        datagrams.append(datagram)
        expected[reason] += 1
        damage[label] += 1
    sent = await send_rejected(t, sender, datagrams, base)
    await asyncio.sleep(QUIET_S)
    after = await t.counters()
    last_pull = await t.last_pull()  # type: ignore[operator]
    fuzz_s = time.monotonic() - started
    _, served = await deliver_valid(t, sender)
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
    assert_caused_nothing(base, after)
    assert last_pull == base_last_pull
    assert served["pulls"] == after["pulls"] + 1


@pytest.mark.timeout(120)
async def test_tickle_replayed_after_the_receiver_restarts_is_rejected_and_causes_no_pull(
    lab: Lab, t: Target, sender: Sender
) -> None:
    captured_at = time.monotonic()
    captured, _ = await deliver_valid(t, sender)
    await restart(lab, t)  # SIGKILLed right after the pull: a crash
    base = await t.counters()
    sender.send(captured)
    replayed_after_s = time.monotonic() - captured_at

    async def rejected() -> bool:
        return (await t.counters())["rejected:replayed"] > base["rejected:replayed"]

    with contextlib.suppress(pytest.fail.Exception):  # the outcome is recorded either way
        await eventually(rejected, 5, "the replay to be counted as replayed")
    await asyncio.sleep(QUIET_S)  # a pull the replay caused would show by now
    after = await t.counters()
    # a tickle sent after the restart still gets through
    _, served = await deliver_valid(t, sender)
    replays_rejected = int(after["rejected:replayed"] - base["rejected:replayed"])
    pulls_caused = int(after["pulls"] - base["pulls"])
    record(
        case=f"Replay after the {t.name} restarts",
        done="valid tickle captured and delivered (one pull); the receiver SIGKILLed right after"
        " the pull and restarted on its state dir; the captured bytes sent again over real UDP",
        outcome="rejected as replayed, no pull, new tickles still served"
        if (replays_rejected, pulls_caused) == (1, 0)
        else "the replay was accepted",
        sent=1,
        tried=1,
        rejected=replays_rejected,
        pulls_caused=pulls_caused,
        replayed_after_s=round(replayed_after_s, 2),
    )
    assert replayed_after_s < wire.DEFAULT_FRESHNESS_S  # still fresh: only the mark can stop it
    assert replays_rejected == 1
    assert_caused_nothing(base, after)
    assert served["tickle_pulls"] == after["tickle_pulls"] + 1


@pytest.mark.timeout(120)
async def test_tickles_of_restarted_senders_are_still_accepted(lab: Lab) -> None:
    fleet = lab.fleet
    first = await run_command(fleet, ["a1"], ["true"])  # both links have a mark now
    await wait_run(fleet, first.id, 15)
    fleet.kill("ns")
    fleet.spawn("ns")
    await fleet.wait_healthy(fleet.ns_url, "ns", 30)
    await restart(lab, lab.ts)
    ts_before, agent_before = await lab.ts.counters(), await lab.agent.counters()

    run = await run_command(fleet, ["a1"], ["true"])
    done = await wait_run(fleet, run.id, 15)  # no poll or check for a day: only tickles are fast
    ts_after, agent_after = await lab.ts.counters(), await lab.agent.counters()
    replays = sum(
        int(after["rejected:replayed"] - before["rejected:replayed"])
        for before, after in ((ts_before, ts_after), (agent_before, agent_after))
    )
    (execution,) = done.executions
    record(
        case="Restarted senders",
        done="NS and task server SIGKILLed and restarted on their state dirs (the receivers keep"
        " their marks); one run-now after",
        outcome="delivered by tickle on both links, no tickle rejected as replayed"
        if execution.via == "tickle" and replays == 0
        else "a restarted sender's tickle was rejected",
        sent=1,
        recorded=1 if execution.status == "succeeded" else 0,
        rejected_as_replayed=replays,
        agent_pulled_via=str(execution.via),
    )
    assert execution.status == "succeeded"
    assert execution.via == "tickle"  # task server -> agent
    assert ts_after["tickle_pulls"] == ts_before["tickle_pulls"] + 1  # NS -> task server
    assert replays == 0


@pytest.mark.timeout(180)
async def test_flood_of_forged_datagrams_is_counted_in_full_but_logged_in_a_few_lines(
    lab: Lab, t: Target, sender: Sender
) -> None:
    log = lab.fleet.procs[t.proc].log
    await restart(lab, t, signal.SIGTERM)  # a fresh process: every line after this is the flood's
    start = len(log.read_text().splitlines())
    forged = [wire.encode(Kind.TASKS, t.sender, next(_seq), b"f" * 32) for _ in range(FLOOD)]
    base = await t.counters()
    sent = await send_rejected(t, sender, forged, base)
    await asyncio.sleep(QUIET_S)
    after = await t.counters()
    during = log.read_text().splitlines()[start:]
    # what is still only counted is written when the receiver stops
    await restart(lab, t, signal.SIGTERM)
    written = log.read_text().splitlines()[start:]
    logged_at_once = sum(1 for line in written if "rejected: bad_mac:" in line)
    summed_up = sum(
        int(m.group(1)) for m in map(re.compile(r"(\d+) more tickles rejected as bad_mac").search,
                                     written) if m
    )  # fmt: skip
    counted = int(after["rejected:bad_mac"] - base["rejected:bad_mac"])
    record(
        case=f"Log flood at the {t.name}",
        done=f"{sent} datagrams signed with a wrong key over real UDP in batches, then the receiver"
        " stopped",
        outcome=f"all counted; {len(during)} log line(s) during the flood, the rest summed up"
        if counted == sent and len(during) <= FLOOD_LOG_LINES
        else f"{len(during)} log lines for {sent} datagrams",
        sent=sent,
        tried=sent,
        rejected=counted,
        log_lines=len(during),
        logged_at_once=logged_at_once,
        summed_up=summed_up,
    )
    assert counted == sent
    assert_caused_nothing(base, after)
    assert len(during) <= FLOOD_LOG_LINES, "\n".join(during[:10])
    assert logged_at_once + summed_up == sent
