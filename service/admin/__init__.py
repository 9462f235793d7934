"""The admin API (JSON, under /admin; documented in the service's OpenAPI schema at
/schema/openapi.json, service/openapi.py).

Every route is behind `auth.admin_only`; every change writes an `admin_audit` row (who, what,
before, after) in its own transaction. Domains: plans.py, users.py, upstreams.py, reports.py.
"""
from __future__ import annotations

import msgspec
from litestar import Request, Router, get
from litestar.params import FromQuery

from ..strict_input import strict_input
from . import plans, reports, upstreams, users
from .auth import admin_only, errors


class AuditEntry(msgspec.Struct):
    id: int
    at: str
    actor: str
    action: str
    target: str
    before: object
    after: object


@get("/audit", responses=errors(400))
async def audit_log(request: Request, limit: FromQuery[int] = 100) -> list[AuditEntry]:
    rows = await request.app.state.pool.fetch(
        "SELECT * FROM admin_audit ORDER BY id DESC LIMIT $1", max(1, min(limit, 1000)))
    return [AuditEntry(id=r["id"], at=r["at"].isoformat(), actor=r["actor"], action=r["action"],
                       target=r["target"],
                       before=msgspec.json.decode(r["before"]) if r["before"] else None,
                       after=msgspec.json.decode(r["after"]) if r["after"] else None) for r in rows]


router = Router(path="/admin", guards=[admin_only], before_request=strict_input, route_handlers=[
    *plans.routes, *users.routes, *upstreams.routes, *reports.routes, audit_log])
