"""Loopback port helpers for tests that start real servers."""

from __future__ import annotations

import socket
import time


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on `host` that was free a moment ago (bind to port 0)."""
    # The kernel hands out ephemeral ports round-robin, so the port we release here is unlikely to be
    # handed to someone else before the server binds it; callers still retry on "address in use".
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def port_is_open(host: str, port: int, timeout: float = 0.2) -> bool:
    """Return True if something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_for_port(host: str, port: int, timeout: float = 10.0) -> None:
    """Block until host:port accepts TCP connections, or raise TimeoutError."""
    deadline = time.monotonic() + timeout
    while True:
        if port_is_open(host, port):
            return
        if time.monotonic() >= deadline:
            raise TimeoutError(f"nothing listening on {host}:{port} after {timeout:.1f}s")
        time.sleep(0.05)
