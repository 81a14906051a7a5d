"""What this peer's host offers the mesh: free memory and open files (its speed: backends/measure.py)."""

from __future__ import annotations

import os


def open_fds() -> int:
    """Open file descriptors of this process (Status reports them: a leak shows)."""
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        import psutil

        return psutil.Process().num_fds()


def free_memory() -> int:
    """Memory this peer offers for layers: most of what the host has available now."""
    import psutil

    return int(psutil.virtual_memory().available * 0.8)
