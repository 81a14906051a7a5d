"""Small socket helpers shared by the tensor-parallel group and the local mesh tools."""

from __future__ import annotations

import os
import socket
import threading
from multiprocessing.connection import Connection


_handed_out: set[int] = set()
_lock = threading.Lock()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` right now (another process may take it before it is bound), and never one
    this process handed out before: the kernel can give a port just freed again, and peers started at one
    instant with the same port would collide."""
    for _ in range(64):
        with socket.socket() as s:
            s.bind((host, 0))
            port: int = s.getsockname()[1]
        with _lock:
            if port not in _handed_out:
                _handed_out.add(port)
                return port
    raise OSError(f"no fresh free port on {host}")


def sock_ip(conn: Connection) -> str:
    """The local address of a channel: the one the other end reaches this process at."""
    s = socket.socket(fileno=os.dup(conn.fileno()))
    try:
        ip: str = s.getsockname()[0]
        return ip
    finally:
        s.close()
