"""Live usage: one PostgreSQL LISTEN per process, fanned out to the sockets that watch.

The ledger runs `pg_notify('codeplan_usage', <subscription id>)` in every transaction that
settles or expires a row. This process keeps one connection listening on that channel; a
notification for a subscription somebody watches triggers one read of its figures, pushed to
every socket of that subscription. Reads are coalesced: a burst of settlements while a read is
in flight costs one more read, not one per settlement. Nothing polls.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
from typing import Awaitable, Callable

import asyncpg
import msgspec

from bridge.journey import iso_utc

from .. import db, usage

log = logging.getLogger("codeplan.live")

CHANNEL = "codeplan_usage"
UTC = dt.timezone.utc


class LiveWindow(msgspec.Struct):
    kind: str  # "5h" | "week"
    allowance: int
    used: int
    reserved: int
    remaining: int
    resets_at: str | None  # UTC ISO 8601; null when no 5-hour window is open


class LiveToday(msgspec.Struct):
    requests: int
    billed_tokens: int


class LiveUsage(msgspec.Struct, tag="usage", tag_field="type"):
    """What a live socket receives, at once and after every change."""
    subscription_id: int
    plan: str
    plan_name: str
    windows: list[LiveWindow]
    today: LiveToday
    at: str


class LiveError(msgspec.Struct, tag="error", tag_field="type"):
    code: str
    message: str


async def snapshot(pool: asyncpg.Pool, subscription_id: int) -> LiveUsage:
    plan, states = await usage.current_windows(pool, subscription_id)
    now = dt.datetime.now(UTC)
    day = now.replace(hour=0, minute=0, second=0, microsecond=0)
    today = await usage.totals(pool, subscription_id, day, day + dt.timedelta(days=1))
    return LiveUsage(
        subscription_id=subscription_id, plan=plan["id"], plan_name=plan["name"],
        windows=[LiveWindow(kind=w.kind, allowance=w.allowance, used=w.used, reserved=w.reserved,
                            remaining=w.remaining, resets_at=iso_utc(w.ends_at) if w.ends_at else None)
                 for w in states],
        today=LiveToday(requests=sum(t.requests for t in today.values()),
                        billed_tokens=sum(t.billed_tokens for t in today.values())),
        at=iso_utc(now))


class Watcher:
    """One socket's view of one subscription: holds only the newest snapshot not yet sent."""

    def __init__(self, subscription_id: int) -> None:
        self.subscription_id = subscription_id
        self._slot: asyncio.Queue[LiveUsage] = asyncio.Queue(maxsize=1)

    def offer(self, value: LiveUsage) -> None:
        if self._slot.full():
            self._slot.get_nowait()  # a slow socket skips figures that are already stale
        self._slot.put_nowait(value)

    async def next(self) -> LiveUsage:
        return await self._slot.get()


class UsageHub:
    def __init__(self, pool: asyncpg.Pool, dsn: str,
                 read: Callable[[asyncpg.Pool, int], Awaitable[LiveUsage]] = snapshot, *,
                 dead_after: float = db.DEAD_AFTER) -> None:
        self._pool = pool
        self._dsn = dsn
        # the listening connection is quiet between notifications: without keepalive probes a
        # vanished host would leave it listening to nothing, for ever (service/db.py)
        self._dead_after = dead_after
        self._read = read
        self._watchers: dict[int, set[Watcher]] = {}
        self._dirty: set[int] = set()
        self._reading: dict[int, asyncio.Task] = {}
        self._conn: asyncpg.Connection | None = None
        self._keeper: asyncio.Task | None = None
        self._closing = False
        self._connected = asyncio.Event()

    # ---- the listening connection ------------------------------------------------------

    async def start(self) -> None:
        self._keeper = asyncio.create_task(self._keep_listening())
        try:
            await asyncio.wait_for(self._connected.wait(), timeout=10)
        except TimeoutError:
            log.warning("live usage: not listening yet; retrying in the background")

    async def _keep_listening(self) -> None:
        delay = 0.5
        while not self._closing:
            lost = asyncio.Event()
            try:
                conn = await db.connect(self._dsn, dead_after=self._dead_after, server_settings={
                    "application_name": f"codeplan-live-{os.getpid()}"})
                conn.add_termination_listener(lambda _conn, lost=lost: lost.set())
                await conn.add_listener(CHANNEL, self._on_notify)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("live usage: cannot listen", extra={"error": type(exc).__name__, "retry_s": delay})
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
                continue
            self._conn, delay = conn, 0.5
            self._connected.set()
            # notifications sent while we were not listening are lost: re-read what is watched
            for subscription_id in list(self._watchers):
                self._changed(subscription_id)
            await lost.wait()
            self._conn = None
            if not self._closing:
                log.warning("live usage: listening connection lost; reconnecting")

    async def stop(self) -> None:
        self._closing = True
        if self._conn is not None:
            await self._conn.close()
        if self._keeper is not None:
            self._keeper.cancel()
            await asyncio.gather(self._keeper, return_exceptions=True)
        for task in list(self._reading.values()):
            task.cancel()

    def _on_notify(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        try:
            subscription_id = int(payload)
        except ValueError:
            log.warning("live usage: notification payload is not a subscription id")
            return
        if subscription_id in self._watchers:
            self._changed(subscription_id)

    # ---- fan-out -----------------------------------------------------------------------

    def watch(self, subscription_id: int) -> Watcher:
        watcher = Watcher(subscription_id)
        self._watchers.setdefault(subscription_id, set()).add(watcher)
        return watcher

    def unwatch(self, watcher: Watcher) -> None:
        group = self._watchers.get(watcher.subscription_id)
        if group is not None:
            group.discard(watcher)
            if not group:
                del self._watchers[watcher.subscription_id]

    @property
    def watching(self) -> int:
        return sum(len(group) for group in self._watchers.values())

    def _changed(self, subscription_id: int) -> None:
        self._dirty.add(subscription_id)
        if subscription_id not in self._reading:
            task = asyncio.get_running_loop().create_task(self._refresh(subscription_id))
            self._reading[subscription_id] = task

    async def _refresh(self, subscription_id: int) -> None:
        try:
            while subscription_id in self._dirty and subscription_id in self._watchers:
                self._dirty.discard(subscription_id)
                try:
                    value = await self._read(self._pool, subscription_id)
                except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                    log.warning("live usage: read failed", extra={"error": type(exc).__name__})
                    return
                for watcher in list(self._watchers.get(subscription_id, ())):
                    watcher.offer(value)
        finally:
            self._dirty.discard(subscription_id)
            self._reading.pop(subscription_id, None)
