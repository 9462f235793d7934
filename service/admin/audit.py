"""The audit trail: every admin action, written in the transaction of the change it records."""
from __future__ import annotations

import asyncpg
import msgspec

_encoder = msgspec.json.Encoder(decimal_format="number")


async def record(conn: asyncpg.Connection, actor: str, action: str, target: str,
                 before: object, after: object) -> None:
    await conn.execute(
        "INSERT INTO admin_audit (actor, action, target, before, after)"
        " VALUES ($1, $2, $3, $4::jsonb, $5::jsonb)",
        actor, action, target,
        None if before is None else _encoder.encode(before).decode(),
        None if after is None else _encoder.encode(after).decode())


def row(record: asyncpg.Record | None) -> dict | None:
    """A database row as the audit keeps it."""
    if record is None:
        return None
    return {k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in record.items()}
