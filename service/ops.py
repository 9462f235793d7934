"""Lifecycle: is the process alive, is it ready to serve, and how it stops.

- `GET /healthz`: the process answers (liveness; never touches the database).
- `GET /readyz`: the database answers and at least one upstream has a usable key (readiness:
  a load balancer sends traffic only here).
- SIGTERM: uvicorn stops accepting connections and lets open requests and streams finish, for
  at most CODEPLAN_SHUTDOWN_TIMEOUT seconds (then cuts them); the application's shutdown then
  settles every flight still live at what is known, waits for the settlement writes, and the
  process exits 0.
"""
from __future__ import annotations

import asyncio
import logging

import asyncpg
import msgspec
from litestar import MediaType, Request, Response, get

from .problems import problem

log = logging.getLogger("codeplan.ops")


@get("/healthz", media_type=MediaType.JSON, include_in_schema=False)
async def healthz() -> Response:
    return Response(b'{"status":"ok"}', media_type=MediaType.JSON)


class Readiness(msgspec.Struct):
    status: str
    database: str
    upstreams: list[str]


@get("/readyz", media_type=MediaType.JSON, include_in_schema=False)
async def readyz(request: Request) -> Response:
    state = request.app.state
    pool: asyncpg.Pool = state.pool
    try:
        async with asyncio.timeout(2):
            await pool.fetchval("SELECT 1")
    except (OSError, asyncpg.PostgresError, TimeoutError):
        return problem(503, "Not ready", "The database does not answer.")
    usable = [p.name for p in state.router.health() if p.usable]
    if not usable:
        return problem(503, "Not ready", "No upstream has a usable key (all disabled or cooling down).")
    return Response(msgspec.json.encode(Readiness(status="ready", database="ok", upstreams=usable)),
                    media_type=MediaType.JSON)


async def settle_everything(journey, timeout: float = 15.0) -> None:
    """After the open streams had their deadline: end every flight still live (settled at
    what is known now) and wait for every settlement to be written."""
    cut = journey.flights.end_all("server shutting down")
    if cut:
        log.warning("settled requests still open at shutdown", extra={"count": cut})
    await journey.flights.land(timeout)
