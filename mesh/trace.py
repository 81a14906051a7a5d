"""Frame traces: with TOGETHER_TRACE=<folder>, each peer process appends one line per event of a frame's
way through it (`<monotonic ns> <event> <frame id>`) to `<folder>/<pid>.log`; unset, nothing is done
beyond one test of a module constant. The clock is CLOCK_MONOTONIC, one for every process of a host, so
the files of the peers of one machine line up: perf/trace_ring.py reads them into where a frame's time
goes between two stages (thread hand-offs, building and sending messages, the wire, the scheduler).

Events: the API peer's scheduler `launch`es a frame and gets it `back`; a stage `submit`s a frame's
compute (as it takes the frame off its stream), its compute thread runs it (`cstart`, `cend`), the event
loop `resume`s with the output and has `sent` it on (a Frame to the next stage or a Result to the
origin); the origin has it `deliver`ed.
"""

from __future__ import annotations

import os
import time

FOLDER = os.environ.get("TOGETHER_TRACE", "")
ON = bool(FOLDER)  # callers test this first: a trace point costs nothing when tracing is off
_fd: int | None = None


def mark(event: str, frame_id: int) -> None:
    """Append `event` of frame `frame_id` at this instant (any thread: one write of one line)."""
    global _fd
    if _fd is None:
        os.makedirs(FOLDER, exist_ok=True)
        _fd = os.open(os.path.join(FOLDER, f"{os.getpid()}.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.write(_fd, f"{time.monotonic_ns()} {event} {frame_id}\n".encode())
