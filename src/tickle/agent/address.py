"""The address the agent can be tickled at, and the local address its HTTP client binds.

The agent reports the address it believes it has; the task server compares it with the peer
address it sees, which is how NAT between them is detected. So the reported address comes from
the routing table (the source address the kernel would pick toward the task server), and when the
listener binds a specific address the HTTP client binds it too (a loopback fleet of 127.0.0.N
agents would otherwise all appear as 127.0.0.1: a false NAT).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from urllib.parse import urlsplit

from tickle.agent.settings import AgentSettings

log = logging.getLogger(__name__)

_ANY = frozenset({"0.0.0.0", "::", ""})


async def tickle_address(settings: AgentSettings, task_server_url: str) -> str | None:
    """The address to report: advertise_host, else a specific tickle_host, else the route source."""
    if settings.advertise_host:
        return settings.advertise_host
    if settings.tickle_host not in _ANY:
        return settings.tickle_host
    host = urlsplit(task_server_url).hostname
    if host is None:
        return None
    return await route_source(host)


def client_local_addr(settings: AgentSettings) -> tuple[str, int] | None:
    """The (host, 0) the HTTP client binds, when the listener binds a specific address."""
    if settings.tickle_host in _ANY:
        return None
    return (settings.tickle_host, 0)


async def route_source(host: str) -> str | None:
    """The source address the routing table picks toward `host`.

    Connecting a UDP socket sends nothing, but makes the kernel look the route up and choose the
    source address, as `ip route get` would (netlink through pyroute2 did this before, for 8 MB
    of the agent's memory at rest: S7 of issue 10).
    """
    dst = await _resolve(host)
    if dst is None:
        return None
    family = socket.AF_INET6 if ":" in dst else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.connect((dst, 9))
            return str(sock.getsockname()[0])
    except OSError as exc:
        log.warning("cannot find a source address toward %s: %s", dst, exc)
        return None


async def _resolve(host: str) -> str | None:
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        pass
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, None, type=socket.SOCK_DGRAM)
    except OSError as exc:
        log.warning("cannot resolve task server host %s: %s", host, exc)
        return None
    return str(infos[0][4][0]) if infos else None
