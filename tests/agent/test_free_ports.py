"""The tests' free-port helper never hands the same port out twice in one process.

Sixteen agents in one test each take a tickle port before any of them binds it; drawn from the
kernel's ephemeral range alone, two of them shared a port in a CI run (EADDRINUSE).
"""

from __future__ import annotations

from .conftest import free_udp_port

# 3,000 draws from ~28,000 ephemeral ports: about 160 repeats expected were the helper to let them
DRAWS = 3000


def test_free_udp_port_never_repeats_a_port_it_handed_out() -> None:
    ports = [free_udp_port() for _ in range(DRAWS)]
    assert len(set(ports)) == DRAWS
