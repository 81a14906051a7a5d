"""Small socket helpers shared by the tensor-parallel group and the local mesh tools."""

from __future__ import annotations

import os
import socket
from multiprocessing.connection import Connection


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` right now (another process may take it before it is bound)."""
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def sock_ip(conn: Connection) -> str:
    """The local address of a channel: the one the other end reaches this process at."""
    s = socket.socket(fileno=os.dup(conn.fileno()))
    try:
        ip: str = s.getsockname()[0]
        return ip
    finally:
        s.close()
