"""The asyncpg pool and the migration runner."""
from __future__ import annotations

import functools
import hashlib
import logging
import re
import socket
from pathlib import Path
from typing import Any

import asyncpg

log = logging.getLogger("codeplan.db")

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"
_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")
# The database cannot be reached right now (down, restarting, a network blip): what a caller
# answers with a retryable 503, never a 500.
UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError, TimeoutError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError,
    asyncpg.exceptions.OperatorInterventionError, asyncpg.exceptions.TooManyConnectionsError)

# Any constant works; it only has to be the same in every process that migrates.
_MIGRATION_LOCK = 0x636F6465706C616E  # "codeplan"


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Pool connections carry no session state (no SET, LISTEN, advisory lock or cursor), so
    the default reset query (`RESET ALL; UNLISTEN *; ...`), one more round trip on every
    release, buys nothing. asyncpg still rolls back any transaction left open."""


# Seconds a connection may go without a sign of life from the database's host before it is
# given up (CODEPLAN_DB_DEAD_AFTER), and the most a new connection may take to open.
DEAD_AFTER = 30.0
_KEEPALIVE_PROBES = 3


@functools.cache
def _warn_once(message: str, option: str = "", error: str = "") -> None:
    log.warning(message, extra={"option": option, "error": error} if option else None)


def hear_from_server(conn: asyncpg.Connection, dead_after: float) -> bool:
    """Make a TCP connection fail once the database's host has been silent for about
    `dead_after` seconds, as libpq's keepalives_* and tcp_user_timeout do, which asyncpg has no
    option for (MagicStack/asyncpg#606). Without them a host that vanishes without a reset (a
    partition, a failover behind a virtual address, a NAT dropping the flow) holds a query for
    as long as the kernel retransmits (~15 minutes with tcp_retries2 = 15) and a quiet
    connection (LISTEN, an idle pooled one) for ever: the ledger's tick, and every admission
    behind it, would wait that long. Only silence of the host counts, never a slow statement:
    the server's kernel acknowledges the probes while PostgreSQL waits on a lock or a flush.
    Keepalive probes cover a connection waiting for an answer to what was acknowledged;
    TCP_USER_TIMEOUT one whose sent bytes are not acknowledged. A unix socket has no host to
    lose: False, unchanged."""
    # asyncpg keeps its transport private; its socket is what its maintainers point to (#606)
    transport = getattr(conn, "_transport", None)
    if transport is None:
        _warn_once("this asyncpg has no connection._transport: database connections keep the "
                   "kernel's keepalive defaults (CODEPLAN_DB_DEAD_AFTER bounds only opening one)")
        return False
    sock = transport.get_extra_info("socket")
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return False
    interval = max(1, round(dead_after / (2 * _KEEPALIVE_PROBES)))
    idle = max(1, round(dead_after) - _KEEPALIVE_PROBES * interval)
    # (Linux names; a system without one of them, or refusing it, keeps its own default for it)
    for level, name, value in (
            (socket.SOL_SOCKET, "SO_KEEPALIVE", 1), (socket.IPPROTO_TCP, "TCP_KEEPIDLE", idle),
            (socket.IPPROTO_TCP, "TCP_KEEPINTVL", interval),
            (socket.IPPROTO_TCP, "TCP_KEEPCNT", _KEEPALIVE_PROBES),
            (socket.IPPROTO_TCP, "TCP_USER_TIMEOUT", max(1000, round(dead_after * 1000)))):
        option = getattr(socket, name, None)
        try:
            if option is None:
                raise OSError(f"no {name} here")
            sock.setsockopt(level, option, value)
        except OSError as exc:
            _warn_once("a database connection keeps the system's default for a socket option",
                       name, str(exc))
    return True


async def connect(url: str, *, dead_after: float = DEAD_AFTER, **kwargs: Any) -> asyncpg.Connection:
    """A connection of its own (not the pool's), given up as `hear_from_server` says; opening it
    takes at most `dead_after` seconds."""
    conn = await asyncpg.connect(url, timeout=dead_after, **kwargs)
    try:
        hear_from_server(conn, dead_after)
    except BaseException:
        conn.terminate()
        raise
    return conn


async def create_pool(url: str, *, size: int = 10, statement_cache: int = 256,
                      dead_after: float = DEAD_AFTER) -> asyncpg.Pool:
    async def init(conn: asyncpg.Connection) -> None:
        hear_from_server(conn, dead_after)

    return await asyncpg.create_pool(
        url, min_size=min(2, size), max_size=size,
        # The ledger's statements are few and fixed: let asyncpg keep them prepared. Behind
        # PgBouncer in transaction mode a prepared statement may meet another server
        # connection: CODEPLAN_DB_STATEMENT_CACHE=0 turns the cache off there.
        statement_cache_size=statement_cache,
        # Sessions in UTC whatever the server's TimeZone: the SQL names its zones (AT TIME ZONE
        # 'UTC', date_trunc(..., 'UTC'), weeks in seconds, migrations/0050), and this keeps any
        # calendar arithmetic (an `interval '1 day'`) and any text rendering of a timestamptz
        # the same in every process and on every host. PgBouncer passes TimeZone through.
        server_settings={"application_name": "codeplan", "timezone": "UTC"},
        reset=_keep_session, init=init,
        timeout=dead_after,  # opening a connection (asyncpg's default: 60 s)
    )


def migration_files(directory: Path = MIGRATIONS_DIR) -> list[Path]:
    files = []
    for path in sorted(directory.glob("*.sql")):
        if not _NAME.match(path.name):
            raise RuntimeError(f"migration file {path.name!r} is not named NNNN_description.sql")
        files.append(path)
    return files


async def migrate(url: str, directory: Path = MIGRATIONS_DIR, *, dead_after: float = DEAD_AFTER) -> list[str]:
    """Apply the migrations not applied yet, in order, each in its own transaction.

    An advisory lock makes concurrent runners wait for each other; a migration file
    changed after it was applied is refused, since the database no longer matches it.
    `dead_after`: CODEPLAN_DB_DEAD_AFTER (`connect`).
    """
    applied: list[str] = []
    conn = await connect(url, dead_after=dead_after)
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", _MIGRATION_LOCK)
        try:
            await conn.execute(
                """CREATE TABLE IF NOT EXISTS schema_migrations (
                       version text PRIMARY KEY,
                       checksum text NOT NULL,
                       applied_at timestamptz NOT NULL DEFAULT now())""")
            done = {r["version"]: r["checksum"]
                    for r in await conn.fetch("SELECT version, checksum FROM schema_migrations")}
            for path in migration_files(directory):
                sql = path.read_text()
                checksum = hashlib.sha256(sql.encode()).hexdigest()
                version = path.stem
                if version in done:
                    if done[version] != checksum:
                        raise RuntimeError(
                            f"migration {path.name} was changed after it was applied; "
                            "add a new migration instead")
                    continue
                try:
                    async with conn.transaction():
                        await conn.execute(sql)
                        await conn.execute(
                            "INSERT INTO schema_migrations (version, checksum) VALUES ($1, $2)",
                            version, checksum)
                except asyncpg.PostgresError as exc:
                    exc.add_note(f"in migration {path.name}")  # shown with its traceback
                    raise
                log.info("migration applied", extra={"migration": path.name})
                applied.append(version)
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", _MIGRATION_LOCK)
    finally:
        await conn.close()
    return applied
