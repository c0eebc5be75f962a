"""Ports picked for servers started on ports of their own must never coincide."""

from __future__ import annotations

import socket

from infra.local.processes import free_ports


def test_free_ports_are_distinct_and_bindable_all_at_once():
    ports = list(free_ports(*(f"server-{index}" for index in range(64))).values())  # held probes never repeat
    assert len(set(ports)) == len(ports) == 64
    listeners = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in ports]
    try:
        for listener, port in zip(listeners, ports, strict=True):
            listener.bind(("127.0.0.1", port))
    finally:
        for listener in listeners:
            listener.close()
