"""tests/procs.py port allocation: distinct ports outside the kernel's ephemeral range, bindable, and a
port in use is skipped."""

from __future__ import annotations

import socket

from procs import ephemeral_port_range, free_port, free_ports, port_is_free


def test_free_ports_are_distinct_bindable_and_outside_the_ephemeral_range() -> None:
    low, high = ephemeral_port_range()
    ports = free_ports(50)
    assert len(set(ports)) == 50
    assert all(not low <= p <= high for p in ports), (low, high, ports)
    assert all(not 21000 <= p <= 21255 for p in ports)  # the agent's sidecar port range
    for port in ports:
        for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
            with socket.socket(socket.AF_INET, kind) as sock:
                sock.bind(("127.0.0.1", port))


def test_successive_calls_do_not_repeat() -> None:
    first, second = free_ports(5), free_ports(5)
    assert not set(first) & set(second)


def test_a_port_in_use_is_not_free() -> None:
    port = free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: still seen as in use
        sock.bind(("127.0.0.1", port))
        sock.listen()
        assert not port_is_free(port)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", port))
        assert not port_is_free(port)
    assert port_is_free(port)
