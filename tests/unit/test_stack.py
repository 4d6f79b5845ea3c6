"""embedpipe.stack's health checks, without starting anything."""

from __future__ import annotations

import socket
import threading

from embedpipe import stack


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
