"""The asyncpg pool and the migration runner."""
from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path

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


async def create_pool(url: str, *, size: int = 10, statement_cache: int = 256) -> asyncpg.Pool:
    return await asyncpg.create_pool(
        url, min_size=min(2, size), max_size=size,
        # The ledger's statements are few and fixed: let asyncpg keep them prepared. Behind
        # PgBouncer in transaction mode a prepared statement may meet another server
        # connection: CODEPLAN_DB_STATEMENT_CACHE=0 turns the cache off there.
        statement_cache_size=statement_cache,
        server_settings={"application_name": "codeplan"},
        reset=_keep_session,
    )


def migration_files(directory: Path = MIGRATIONS_DIR) -> list[Path]:
    files = []
    for path in sorted(directory.glob("*.sql")):
        if not _NAME.match(path.name):
            raise RuntimeError(f"migration file {path.name!r} is not named NNNN_description.sql")
        files.append(path)
    return files


async def migrate(url: str, directory: Path = MIGRATIONS_DIR) -> list[str]:
    """Apply the migrations not applied yet, in order, each in its own transaction.

    An advisory lock makes concurrent runners wait for each other; a migration file
    changed after it was applied is refused, since the database no longer matches it.
    """
    applied: list[str] = []
    conn = await asyncpg.connect(url)
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
                async with conn.transaction():
                    await conn.execute(sql)
                    await conn.execute(
                        "INSERT INTO schema_migrations (version, checksum) VALUES ($1, $2)",
                        version, checksum)
                log.info("migration applied", extra={"migration": path.name})
                applied.append(version)
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", _MIGRATION_LOCK)
    finally:
        await conn.close()
    return applied
