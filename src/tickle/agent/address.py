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
from typing import Any
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
    """The preferred source address the routing table picks toward `host`."""
    dst = await _resolve(host)
    if dst is None:
        return None
    try:
        found = await _route_prefsrc(dst)
        if found:
            return found
    except Exception as exc:  # no netlink (containers without it, other OSes): fall back
        log.debug("routing table lookup toward %s failed: %s", dst, exc)
    return _udp_source(dst)


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


async def _route_prefsrc(dst: str) -> str | None:
    from pyroute2 import AsyncIPRoute  # imported late: netlink only where it is used

    async with AsyncIPRoute() as ipr:
        answer: Any = await ipr.route("get", dst=dst)
        routes = [r async for r in answer] if hasattr(answer, "__aiter__") else list(answer)
    for route in routes:
        src = route.get_attr("RTA_PREFSRC")
        if src:
            return str(src)
    return None


def _udp_source(dst: str) -> str | None:
    """Connecting a UDP socket sends nothing but makes the kernel choose a source address."""
    family = socket.AF_INET6 if ":" in dst else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.connect((dst, 9))
            return str(sock.getsockname()[0])
    except OSError as exc:
        log.warning("cannot find a source address toward %s: %s", dst, exc)
        return None
