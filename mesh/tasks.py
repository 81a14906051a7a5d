"""The background tasks of one peer, so that stopping it cancels every one."""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable


class TaskSet:
    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        t = asyncio.ensure_future(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)
        return t

    def cancel_all(self) -> None:
        for t in list(self._tasks):
            t.cancel()

    def __len__(self) -> int:
        return len(self._tasks)
