"""embedpipe.local.stack's health checks and port choice against real sockets on 127.0.0.1, without starting
anything. (Start-up and clean-up with every process stubbed: tests/unit/test_stack.py.)"""

from __future__ import annotations

import socket
import threading

from embedpipe.local import stack


def test_a_health_check_answered_by_a_non_http_server_is_not_healthy_yet():
    """A start-up race CI met: a port answering a GET with bytes that are not HTTP/1 means "not up", never a crash."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]

    def answer():
        conn, _ = server.accept()
        conn.recv(1024)
        conn.sendall(b"\x00\x00\x12\x04\x00\x00\x00\x00\x00Unexpected HTTP/1.x request: GET /\n")
        conn.close()

    threading.Thread(target=answer, daemon=True).start()
    part = stack.Part(name="x", argv=[], port=port, health=f"http://127.0.0.1:{port}/")
    try:
        assert stack.healthy(part) is False
    finally:
        server.close()


class _Starts:
    """rng stub: yields the given block starts in turn."""

    def __init__(self, *starts):
        self.starts = list(starts)

    def randrange(self, lo, hi):
        return self.starts.pop(0)


def test_isolated_ports_skip_a_block_with_a_taken_port_and_stay_below_the_ephemeral_range():
    """A CI run failed with 'Address already in use' on functions_port + 1: one free port says nothing about the
    consecutive ones after it. Every port of the block must be bindable."""
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    port = taken.getsockname()[1]
    taken.listen(1)
    try:
        first = stack.isolated_ports(_Starts(port - 4, 21000))
    finally:
        taken.close()
    assert first == (21000, 21001, 21002, 21005, 21003, 21004)
    lo, hi = stack.ISOLATED_PORTS
    assert hi <= 32768  # Linux hands out 32768-60999 for outgoing connections
