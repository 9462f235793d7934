"""Live usage: one PostgreSQL LISTEN per process, fanned out to the sockets that watch.

The ledger runs `pg_notify('codeplan_usage', <subscription id>)` in every transaction that
settles or expires a row. This process keeps one connection listening on that channel; a
notification for a subscription somebody watches triggers one read of its figures, pushed to
every socket of that subscription. Reads are coalesced: a burst of settlements while a read is
in flight costs one more read, not one per settlement. Nothing polls.

Figures also change with no settlement, when time passes: a window ends (its use goes, its reset
is the next one's or none) and `today` starts again at 00:00 UTC. Nothing notifies those, so the
hub reads a watched subscription again at the moment its last figures sent say the next such
change comes (`next_change`): one timer per watched subscription, one read for all its sockets.
A window days away costs a timer re-armed hourly; today's rollover is spread over
MIDNIGHT_SPREAD seconds by subscription, so the watched subscriptions are not all read at once.

A socket follows its account, not one subscription: a notification for a subscription nobody
watches, of an account somebody watches (a new subscription after a cancel), tells that
account's sockets to look up the account's current subscription again (`Watcher.next` gives
None). Which account a subscription belongs to never changes: it is looked up once per process
(coalesced, only while some socket watches an account) and kept.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import time
from typing import Awaitable, Callable

import asyncpg
import msgspec

from bridge.journey import iso_utc

from .. import db, usage
from . import dashboard

log = logging.getLogger("codeplan.live")

CHANNEL = "codeplan_usage"
UTC = dt.timezone.utc
STOP_TIMEOUT = 4.0  # seconds `UsageHub.stop` may take, whatever the database does
ACCOUNT_CACHE = 65_536  # subscriptions whose account is kept (a few MB at most)
# A subscription is read again this long after its figures' next change: `resets_at` is to the
# second, and the database's clock says when a window ended. It is also the least wait between
# two such reads of a subscription, should the clocks disagree (a figure whose change is past).
CHANGE_SLACK = 1.0
# today's rollover: each subscription read within this many seconds after 00:00 UTC, at its
# own offset, rather than every watched subscription in the same instant
MIDNIGHT_SPREAD = 30.0
# a timer further away than this is re-armed then: the wall clock says when a moment came (a
# host that slept, a clock set), not the event loop's monotonic one
LONGEST_NAP = 3600.0


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


async def snapshot(pool: asyncpg.Pool, subscription_id: int, account_id: int | None = None) -> LiveUsage:
    """The subscription's windows, and today's requests over all its account's subscriptions,
    as the dashboard counts them (one query: `dashboard.today_totals`)."""
    plan, states = await usage.current_windows(pool, subscription_id)
    if account_id is None:
        account_id = await pool.fetchval("SELECT account_id FROM subscriptions WHERE id = $1", subscription_id)
    now = dt.datetime.now(UTC)
    day = now.replace(hour=0, minute=0, second=0, microsecond=0)
    requests, tokens = await dashboard.today_totals(pool, account_id, day)
    return LiveUsage(
        subscription_id=subscription_id, plan=plan["id"], plan_name=plan["name"],
        windows=[LiveWindow(kind=w.kind, allowance=w.allowance, used=w.used, reserved=w.reserved,
                            remaining=w.remaining, resets_at=iso_utc(w.ends_at) if w.ends_at else None)
                 for w in states],
        today=LiveToday(requests=requests, billed_tokens=tokens),
        at=iso_utc(now))


def _parse_utc(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC)


def next_change(value: LiveUsage, spread: float = MIDNIGHT_SPREAD) -> dt.datetime | None:
    """When these figures change with no settlement: the earliest end of a window they show,
    or the next 00:00 UTC after they were read when `today` counts anything (plus the
    subscription's offset within `spread` seconds). None: only a settlement changes them."""
    moments = [_parse_utc(w.resets_at) for w in value.windows if w.resets_at]
    if value.today.requests or value.today.billed_tokens:
        # `at` is rounded up to the second (iso_utc): figures read in the last second of a day
        # say 00:00:00 and still count that day, so the day is the one a second before
        read_at = _parse_utc(value.at) - dt.timedelta(seconds=1)
        midnight = read_at.replace(hour=0, minute=0, second=0, microsecond=0) + dt.timedelta(days=1)
        moments.append(midnight + dt.timedelta(seconds=spread * (value.subscription_id % 1000) / 1000))
    return min(moments, default=None)


class Watcher:
    """One socket's view of its account's subscription: holds only the newest snapshot not yet
    sent, and whether the account's current subscription should be looked up again."""

    def __init__(self, subscription_id: int, account_id: int | None = None) -> None:
        self.subscription_id = subscription_id
        self.account_id = account_id
        self._value: LiveUsage | None = None
        self._recheck = False
        self._wake = asyncio.Event()

    def offer(self, value: LiveUsage) -> None:
        self._value = value  # a slow socket skips figures that are already stale
        self._wake.set()

    def recheck(self) -> None:
        self._recheck = True
        self._wake.set()

    async def next(self) -> LiveUsage | None:
        """The newest figures not yet sent; or None: another subscription of the account moved,
        look up which one is the account's now (`UsageHub.move`)."""
        while True:
            await self._wake.wait()
            if self._recheck:
                self._recheck = False
                if self._value is None:
                    self._wake.clear()
                return None
            value, self._value = self._value, None
            self._wake.clear()
            if value is not None:
                return value


class UsageHub:
    def __init__(self, pool: asyncpg.Pool, dsn: str,
                 read: Callable[[asyncpg.Pool, int], Awaitable[LiveUsage]] | None = None, *,
                 dead_after: float = db.DEAD_AFTER, slack: float = CHANGE_SLACK,
                 spread: float = MIDNIGHT_SPREAD) -> None:
        self._pool = pool
        self._dsn = dsn
        # the listening connection is quiet between notifications: without keepalive probes a
        # vanished host would leave it listening to nothing, for ever (service/db.py)
        self._dead_after = dead_after
        self._read = read or self._snapshot
        self._watchers: dict[int, set[Watcher]] = {}
        self._accounts: dict[int, set[Watcher]] = {}  # the watchers that follow an account
        self._account_of: dict[int, int | None] = {}  # subscription -> account, never changes
        self._unknown: set[int] = set()  # subscriptions whose account is to be looked up
        self._resolving: asyncio.Task | None = None
        self._dirty: set[int] = set()
        self._reading: dict[int, asyncio.Task] = {}
        # subscription -> (when, wall clock seconds, it is read again for its figures' next
        # change; the timer), only while somebody watches it
        self._due: dict[int, tuple[float, asyncio.TimerHandle]] = {}
        self._slack = slack
        self._spread = spread
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
            # notifications sent while we were not listening are lost: re-read what is watched,
            # and look up each watched account's subscription again (one may have begun)
            for subscription_id in list(self._watchers):
                self._changed(subscription_id)
            for group in list(self._accounts.values()):
                for watcher in list(group):
                    watcher.recheck()
            await lost.wait()
            self._conn = None
            if not self._closing:
                log.warning("live usage: listening connection lost; reconnecting")

    async def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Close the listening connection and end the tasks, in `timeout` seconds at most
        whatever the database does: a server that stopped answering does not answer a close
        either (its connection is then dropped), and a task stuck in the pool's release is left
        to the pool's own end (service/app.py)."""
        self._closing = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        conn = self._conn
        if conn is not None:
            try:
                await conn.close(timeout=max(0.1, timeout / 2))
            except Exception:  # noqa: BLE001 - timed out or broken: dropped either way
                conn.terminate()
        for _, timer in self._due.values():
            timer.cancel()
        self._due.clear()
        tasks = [t for t in (self._keeper, self._resolving, *self._reading.values()) if t is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=max(0.0, deadline - loop.time()))

    async def _snapshot(self, pool: asyncpg.Pool, subscription_id: int) -> LiveUsage:
        """`snapshot`, with the subscription's account as this hub knows it (no query for it)."""
        return await snapshot(pool, subscription_id, self._account_of.get(subscription_id))

    def _on_notify(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        try:
            subscription_id = int(payload)
        except ValueError:
            log.warning("live usage: notification payload is not a subscription id")
            return
        if subscription_id in self._watchers:
            self._changed(subscription_id)
            # the account's sockets still on an older subscription (a tab opened before it
            # re-subscribed) follow it too, though another socket already watches the new one
            account_id = self._account_of.get(subscription_id)
            for watcher in list(self._accounts.get(account_id, ())) if account_id is not None else ():
                if watcher.subscription_id != subscription_id:
                    watcher.recheck()
        elif self._accounts:
            # maybe a new subscription of an account somebody watches
            if subscription_id in self._account_of:
                self._recheck_account(self._account_of[subscription_id])
            else:
                self._unknown.add(subscription_id)
                if self._resolving is None:
                    self._resolving = asyncio.get_running_loop().create_task(self._resolve())

    def _recheck_account(self, account_id: int | None) -> None:
        for watcher in list(self._accounts.get(account_id, ())) if account_id is not None else ():
            watcher.recheck()

    def _remember(self, subscription_id: int, account_id: int | None) -> None:
        self._account_of[subscription_id] = account_id
        while len(self._account_of) > ACCOUNT_CACHE:
            del self._account_of[next(iter(self._account_of))]  # the oldest

    async def _resolve(self) -> None:
        """Look up the accounts of the subscriptions notified that nobody watches, a batch at a
        time, and tell the watchers of those accounts."""
        try:
            while self._unknown and self._accounts:
                batch, self._unknown = list(self._unknown), set()
                try:
                    rows = await self._pool.fetch(
                        "SELECT id, account_id FROM subscriptions WHERE id = ANY($1::bigint[])", batch)
                except (*db.UNAVAILABLE, asyncpg.PostgresError) as exc:
                    log.warning("live usage: account look-up failed", extra={"error": type(exc).__name__})
                    return
                found = {r["id"]: r["account_id"] for r in rows}
                for subscription_id in batch:
                    self._remember(subscription_id, found.get(subscription_id))
                    self._recheck_account(found.get(subscription_id))
        finally:
            self._unknown.clear()
            self._resolving = None

    # ---- fan-out -----------------------------------------------------------------------

    def watch(self, subscription_id: int, account_id: int | None = None) -> Watcher:
        """A watcher of `subscription_id`; with `account_id`, one that is also told when another
        subscription of that account is notified (`Watcher.next` gives None)."""
        watcher = Watcher(subscription_id, account_id)
        self._watchers.setdefault(subscription_id, set()).add(watcher)
        if account_id is not None:
            self._accounts.setdefault(account_id, set()).add(watcher)
            self._remember(subscription_id, account_id)
        return watcher

    def move(self, watcher: Watcher, subscription_id: int) -> None:
        """The watcher now watches `subscription_id` (its account's current one)."""
        self._drop(watcher)
        watcher.subscription_id = subscription_id
        self._watchers.setdefault(subscription_id, set()).add(watcher)
        if watcher.account_id is not None:
            self._remember(subscription_id, watcher.account_id)

    def unwatch(self, watcher: Watcher) -> None:
        self._drop(watcher)
        if watcher.account_id is not None:
            group = self._accounts.get(watcher.account_id)
            if group is not None:
                group.discard(watcher)
                if not group:
                    del self._accounts[watcher.account_id]

    def _drop(self, watcher: Watcher) -> None:
        group = self._watchers.get(watcher.subscription_id)
        if group is not None:
            group.discard(watcher)
            if not group:
                del self._watchers[watcher.subscription_id]
                armed = self._due.pop(watcher.subscription_id, None)
                if armed is not None:
                    armed[1].cancel()

    # ---- figures that change with time -------------------------------------------------

    def shown(self, value: LiveUsage) -> None:
        """A socket was sent `value`: its subscription is read again (once, for all the sockets
        that watch it) when those figures change by themselves (`next_change`). For every socket but
        the first that is sent the same figures, the read is armed already: two times parsed and
        a comparison, nothing more."""
        subscription_id = value.subscription_id
        if self._closing or subscription_id not in self._watchers:
            return
        moment = next_change(value, self._spread)
        if moment is None:
            return
        when = moment.timestamp() + self._slack
        armed = self._due.get(subscription_id)
        if armed is not None:
            if armed[0] <= when:
                return  # an earlier read is armed: its figures arm the one after
            armed[1].cancel()
        self._arm(subscription_id, when)

    def _arm(self, subscription_id: int, when: float) -> None:
        # never sooner than `slack` from now: figures whose change is already past (clocks that
        # disagree, figures read just before the moment) are read again once a `slack`, no more
        delay = min(max(when - time.time(), self._slack), LONGEST_NAP)
        timer = asyncio.get_running_loop().call_later(delay, self._due_now, subscription_id)
        self._due[subscription_id] = (when, timer)

    def _due_now(self, subscription_id: int) -> None:
        armed = self._due.pop(subscription_id, None)
        if armed is None or subscription_id not in self._watchers:
            return
        if time.time() < armed[0]:  # the end of a long nap, not the moment yet
            self._arm(subscription_id, armed[0])
            return
        self._changed(subscription_id)

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
