"""Loopback ports for services that tests and benchmarks start."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A free loopback port below the kernel's ephemeral range (ip_local_port_range), where nothing takes ports
    by itself: Ray starts many processes that bind ephemeral ports (bind to 0, outgoing connections), and one
    could take a port picked from that range before the service binds it. Ray's worker ports (10002-19999)
    stay below the range picked from."""
    import random

    try:
        low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    for port in random.sample(range(20000, max(20001, low)), k=min(200, max(1, low - 20000))):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
