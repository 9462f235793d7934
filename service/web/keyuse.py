"""`api_keys.last_used_at`, kept without slowing the request path.

Authentication calls `touch(key_id)`: a dictionary look-up. A key not written in the last minute
joins a batch that a timer writes a second later in one UPDATE, in the background. So each
process writes each key at most once a minute, and no request waits for the write.
"""
from __future__ import annotations

import asyncio
import logging
import time

import asyncpg

log = logging.getLogger("codeplan.keyuse")

INTERVAL = 60.0   # seconds between two writes of one key by one process
DELAY = 1.0       # a batch gathers this long before it is written


class KeyUseRecorder:
    def __init__(self, pool: asyncpg.Pool, interval: float = INTERVAL, delay: float = DELAY) -> None:
        self._pool = pool
        self._interval = interval
        self._delay = delay
        self._written: dict[int, float] = {}
        self._due: set[int] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task] = set()

    def touch(self, key_id: int) -> None:
        now = time.monotonic()
        if now - self._written.get(key_id, -self._interval) < self._interval:
            return
        self._written[key_id] = now
        self._due.add(key_id)
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._delay, self._flush)

    def _flush(self) -> None:
        self._timer = None
        due, self._due = self._due, set()
        if len(self._written) > 50_000:  # forget keys not seen for a while
            horizon = time.monotonic() - self._interval
            self._written = {k: t for k, t in self._written.items() if t > horizon}
        task = asyncio.get_running_loop().create_task(self._write(sorted(due)))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _write(self, key_ids: list[int]) -> None:
        try:
            await self._pool.execute(
                "UPDATE api_keys SET last_used_at = now() WHERE id = ANY($1::bigint[])", key_ids)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            # a lost "last used" time is harmless; the next use within a minute writes it again
            for key_id in key_ids:
                self._written.pop(key_id, None)
            log.warning("last-used update failed", extra={"keys": len(key_ids), "error": type(exc).__name__})

    async def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._flush()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
