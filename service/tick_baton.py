"""One ledger tick in flight at a time across the worker processes of one `codeplan run --workers N`.

Why: what a tick costs PostgreSQL is mostly fixed (its transaction and commit, its statements'
start-up, `ledger_admit_batch`'s PL/pgSQL set up once per transaction: bench/PROFILE.md), so a
request costs less the more requests share its tick. One process sends its next tick when the
last is answered, with everything that arrived meanwhile. N processes ticking on their own send
about N times as many ticks with 1/N of the batch each (measured with two workers at c=32 on one
key: PostgreSQL's CPU per request 0.24-0.28 ms against 0.16-0.17 with one), and on one
subscription they wait for each other in PostgreSQL anyway (its flight row). A worker that holds
the baton while its tick is in flight, and cuts its batch only once it has the baton, gives N
workers about the batches of one.

The baton is a PostgreSQL advisory lock, taken in a transaction of its own on a connection of
its own and given back by committing it (so PgBouncer's transaction mode keeps it with its
holder, where a session's lock would stay with a server connection someone else gets next).
PostgreSQL grants it in the order it was asked for (a worker that gives it back and asks again
queues behind the one waiting) and lets go of it when its holder's connection ends, so a worker
that dies holding it stalls nobody. Its key is the supervisor's (one per `codeplan run`, so the
hosts of a multi-host layout each have their own lane), in the two-integer key space, which
never meets the one-integer key of the migrations' lock (service/db.py).

It is an optimisation, never a rule of the ledger, which is exact without it (every transition
one guarded transaction). So nothing here waits without a bound or raises into the ticker: a
baton not had within `patience` (its holder's tick stuck behind a row lock, say) means this tick
goes without, and the next ones for `rest` seconds; so does a connection that fails or is still
being opened (in the background, never on a tick's path); a holder idle for `_HOLD_LIMIT` (frozen,
cut off) loses its session and with it the baton.

Cost: one round trip before each tick (the lock), and one after it, sent without waiting (the
commit), in the processes of a multi-worker run only; one connection per worker beyond its pool.
"""
from __future__ import annotations

import asyncio
import logging

import asyncpg

log = logging.getLogger("codeplan.ledger")

# the first of the lock's two keys: 'tick' in ASCII; the second is the supervisor's
_CLASS = 0x7469636B
# a holder idle in its baton's transaction this long (frozen, cut off) has its session ended by
# PostgreSQL; well above a tick, even one retried element by element. A tick whose connection's
# host vanished can outlast it (two of CODEPLAN_DB_DEAD_AFTER: service/ledger.py `_after`): its
# baton's session ends meanwhile, which costs the ticks a rest, nothing else
_HOLD_LIMIT = "30s"
# the most a connection attempt may take (it runs in the background)
_CONNECT_TIMEOUT = 5.0
# beyond `patience`, how long a take may wait for its answer (a PgBouncer queue, a lost server)
_ANSWER_SLACK = 0.5


class TickBaton:
    """`take()` before cutting a tick's batch, `give()` once its answer is in; `open()` at
    start-up, `close()` at shutdown."""

    def __init__(self, database_url: str, key: int, *, patience: float = 0.2, rest: float = 1.0) -> None:
        self._url = database_url
        # (statement_timeout off: a role's or database's own below the patience would turn every
        # wait into a failure)
        self._take = (f"BEGIN; SET LOCAL lock_timeout = '{max(1, round(patience * 1000))}ms';"
                      " SET LOCAL statement_timeout = 0;"
                      f" SET LOCAL idle_in_transaction_session_timeout = '{_HOLD_LIMIT}';"
                      f" SELECT pg_advisory_xact_lock({_CLASS}, {int(key)})")
        self._patience = patience
        self._answer_within = patience + _ANSWER_SLACK
        self._rest = rest
        self._connection: asyncpg.Connection | None = None
        self._connecting: asyncio.Task | None = None
        self._held: asyncpg.Connection | None = None  # the connection whose transaction holds it
        self._giving: asyncio.Task | None = None  # the commit (or rollback) sent after the last take
        self._rest_until = 0.0
        self._closed = False

    async def open(self) -> None:
        """Connect now, so the first ticks have the baton (a failure is logged; later ticks
        go without until a background attempt succeeds)."""
        self._ready()
        if self._connecting is not None:
            await asyncio.shield(self._connecting)

    async def take(self) -> bool:
        """Wait for the baton, in line; True when this process holds it, False when this tick
        goes without it."""
        if self._giving is not None:  # the last commit goes first on this connection
            await asyncio.shield(self._giving)  # (a take cancelled here leaves it running, and kept)
            self._giving = None
        connection = self._ready()
        if connection is None:
            return False
        try:
            await connection.execute(self._take, timeout=self._answer_within)
            self._held = connection
            return True
        except asyncpg.LockNotAvailableError:  # lock_timeout: the holder's tick is slow
            self._resting()
            log.warning("tick baton not had in time; ticks go without it for a moment",
                        extra={"patience_s": self._patience, "rest_s": self._rest})
            # the aborted transaction ends off this tick's path; the next take waits for it
            self._giving = asyncio.get_running_loop().create_task(self._end(connection, "ROLLBACK"))
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
        connection, self._held = self._held, None
        if connection is not None:
            self._giving = asyncio.get_running_loop().create_task(self._end(connection, "COMMIT"))

    async def close(self) -> None:
        self._closed = True
        if self._connecting is not None:
            self._connecting.cancel()
            await asyncio.wait({self._connecting})  # ended either way, and its connection with it
        giving, self._giving = self._giving, None
        if giving is not None:
            await giving
        connection, self._connection = self._connection, None
        if connection is not None:
            try:
                await asyncio.wait_for(connection.close(), 2.0)
            except Exception:  # noqa: BLE001 - it goes either way
                connection.terminate()

    def _ready(self) -> asyncpg.Connection | None:
        """The connection, when it is open and not resting; otherwise None, with a connection
        being opened in the background if there is none."""
        loop = asyncio.get_running_loop()
        if self._closed or loop.time() < self._rest_until:
            return None
        connection = self._connection
        if connection is not None and not connection.is_closed():
            return connection
        self._connection = None
        if self._connecting is None:
            self._connecting = loop.create_task(self._connect())
        return None

    async def _connect(self) -> None:
        try:
            connection = await asyncpg.connect(self._url, timeout=_CONNECT_TIMEOUT,
                                               server_settings={"application_name": "codeplan tick baton"})
        except Exception as exc:  # noqa: BLE001 - ticks go without meanwhile
            self._resting()
            log.warning("tick baton unavailable; ticks go without it", extra={"error": type(exc).__name__})
            return
        finally:
            self._connecting = None
        if self._closed:
            connection.terminate()
        else:
            self._connection = connection

    async def _end(self, connection: asyncpg.Connection, how: str) -> None:
        """COMMIT (the baton given back) or ROLLBACK (a take that timed out)."""
        try:
            await connection.execute(how, timeout=self._answer_within)
        except Exception as exc:  # noqa: BLE001 - its session ends, and with it the lock
            self._failed(connection, exc)

    def _failed(self, connection: asyncpg.Connection, exc: BaseException) -> None:
        if not self._closed:
            log.warning("tick baton connection failed; ticks go without it for a moment",
                        extra={"error": type(exc).__name__})
        self._resting()
        self._drop(connection)

    def _resting(self) -> None:
        self._rest_until = asyncio.get_running_loop().time() + self._rest

    def _drop(self, connection: asyncpg.Connection) -> None:
        connection.terminate()
        if self._connection is connection:
            self._connection = None
