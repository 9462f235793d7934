"""One ledger tick in flight at a time across `codeplan run --workers N`'s processes.

Why: what a tick costs PostgreSQL is mostly fixed (its transaction and commit, its statements'
start-up, `ledger_admit_batch`'s PL/pgSQL set up once per call: bench/PROFILE.md), so a request
costs less the more requests share its tick. One process sends its next tick when the last is
answered, with everything that arrived meanwhile. N processes ticking on their own send about N
times as many ticks with 1/N of the batch each (measured with two workers at c=32 on one key:
PostgreSQL's CPU per request 0.24-0.28 ms against 0.16-0.17 with one), and on one subscription
they wait for each other in PostgreSQL anyway (its flight row). A worker that holds the baton
while its tick is in flight, and cuts its batch only once it has the baton, gives N workers
about the batches of one.

The baton is a PostgreSQL advisory lock, taken in a transaction of its own on a connection of
its own and given back by committing it (so it works behind PgBouncer in transaction mode too,
where a session's lock would stay with a server connection someone else gets): PostgreSQL
grants it in the order it was asked for (a worker that gives it back and asks again queues
behind the one waiting), and lets go of it when its holder's connection ends, so a worker that
dies holding it stalls nobody. It is an optimisation, never a rule of the ledger, which is exact
without it (every transition one guarded transaction): a baton not had within `patience` (its
holder's tick stuck behind a row lock, say) or not had at all (the connection failed) means a
tick without it, as before.

Cost: one round trip before each tick (the lock), and one after it, sent without waiting (the
commit), in processes of a multi-worker run only; one connection per worker beyond its pool.
One lane for the whole host also caps the ledger's ticks at one at a time: a tick of 128
admissions takes a few milliseconds, thousands of requests a second, beyond what one
subscription's flight row allowed anyway.
"""
from __future__ import annotations

import asyncio
import logging

import asyncpg

log = logging.getLogger("codeplan.ledger")

# the advisory lock's key: any constant no other lock in this database uses ('codeplan' in ASCII)
_KEY = 0x636F6465706C616E
_TAKE = "BEGIN; SET LOCAL lock_timeout = '{patience_ms}ms'; SELECT pg_advisory_xact_lock(" + str(_KEY) + ")"
_GIVE = "COMMIT"

# a connection that failed is not tried again for this long (ticks go without meanwhile)
_RECONNECT_AFTER = 1.0


class TickBaton:
    """`take()` before cutting a tick's batch, `give()` once its answer is in."""

    def __init__(self, database_url: str, *, patience: float = 0.05) -> None:
        self._url = database_url
        self._take = _TAKE.format(patience_ms=max(1, round(patience * 1000)))
        self._connection: asyncpg.Connection | None = None
        self._giving: asyncio.Task | None = None  # the unlock sent after the last tick
        self._retry_at = 0.0

    async def take(self) -> bool:
        """Wait for the baton, in line; True when this process holds it, False when this tick
        goes without (after `patience`, or with no connection)."""
        giving, self._giving = self._giving, None
        if giving is not None:  # the last unlock goes first on this connection
            await giving
        connection = await self._connect()
        if connection is None:
            return False
        try:
            await connection.execute(self._take)
            return True
        except asyncpg.LockNotAvailableError:  # lock_timeout: the holder's tick is slow
            try:
                await connection.execute("ROLLBACK")
            except Exception as exc:  # noqa: BLE001 - whatever it was, this tick goes without
                self._failed(connection, exc)
            return False
        except asyncio.CancelledError:
            # the lock may be granted after we stop waiting: only ending the session is sure
            self._drop(connection)
            raise
        except Exception as exc:  # noqa: BLE001 - whatever it was, this tick goes without
            self._failed(connection, exc)
            return False

    def give(self) -> None:
        """Let the next worker's tick go; sent now, answered whenever (the next take waits)."""
        connection = self._connection
        if connection is not None:
            self._giving = asyncio.get_running_loop().create_task(self._give(connection))

    async def close(self) -> None:
        giving, self._giving = self._giving, None
        if giving is not None:
            await giving
        if self._connection is not None:
            connection, self._connection = self._connection, None
            try:
                await asyncio.wait_for(connection.close(), 2.0)
            except (OSError, asyncio.TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
                connection.terminate()

    async def _give(self, connection: asyncpg.Connection) -> None:
        try:
            await connection.execute(_GIVE)
        except Exception as exc:  # noqa: BLE001 - its session ends, and with it the lock
            self._failed(connection, exc)

    async def _connect(self) -> asyncpg.Connection | None:
        if self._connection is not None and not self._connection.is_closed():
            return self._connection
        loop = asyncio.get_running_loop()
        if loop.time() < self._retry_at:
            return None
        try:
            self._connection = await asyncpg.connect(self._url, server_settings={
                "application_name": "codeplan tick baton"})
        except (OSError, asyncio.TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            self._retry_at = loop.time() + _RECONNECT_AFTER
            log.warning("tick baton unavailable; ticks go without it",
                        extra={"error": type(exc).__name__})
            return None
        return self._connection

    def _failed(self, connection: asyncpg.Connection, exc: BaseException) -> None:
        log.warning("tick baton connection failed; ticks go without it for a moment",
                    extra={"error": type(exc).__name__})
        self._retry_at = asyncio.get_running_loop().time() + _RECONNECT_AFTER
        self._drop(connection)

    def _drop(self, connection: asyncpg.Connection) -> None:
        connection.terminate()
        if self._connection is connection:
            self._connection = None
