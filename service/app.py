"""The Codeplan application: the bridge's surfaces and the service's own API in one Litestar app."""
from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from typing import AsyncIterator

import asyncpg
import msgspec
from litestar import Litestar, MediaType, Request, Response, get
from litestar.exceptions import HTTPException
from litestar.status_codes import HTTP_500_INTERNAL_SERVER_ERROR

from bridge import app as bridge_app
from bridge.journey import Journey
from bridge.upstream import Upstream

from . import db, usage
from .accounts import Authenticator
from .config import Config
from .ledger import Ledger
from .problems import problem
from .web import Web, error_page, wants_html

log = logging.getLogger("codeplan.app")


def _http_exception(request: Request, exc: HTTPException) -> Response:
    path = request.url.path
    if exc.status_code in (404, 405) and (path == "/v1" or path.startswith("/v1/")):
        # the coding tools' API: answered in OpenAI's error shape, naming what is served
        return bridge_app.not_served(request.method, path, exc.status_code)
    if wants_html(request):
        return error_page(request, exc.status_code)
    return problem(exc.status_code, exc.detail or "error")


def _unexpected(request: Request, exc: Exception) -> Response:
    # the detail stays in our log: exception text can carry secrets (URLs, keys)
    log.error("unhandled error", exc_info=exc, extra={"path": request.url.path})
    return problem(HTTP_500_INTERNAL_SERVER_ERROR, "Internal error",
                   "The service failed unexpectedly; the failure was logged.")


@get("/healthz", media_type=MediaType.JSON)
async def healthz(request: Request) -> Response:
    pool: asyncpg.Pool = request.app.state.pool
    try:
        async with asyncio.timeout(2):
            await pool.fetchval("SELECT 1")
    except (OSError, asyncpg.PostgresError, TimeoutError):
        return problem(503, "Database unreachable")
    return Response(b'{"status":"ok"}', media_type=MediaType.JSON)


async def _sweeper(ledger: Ledger, interval: float) -> None:
    """Expire what dead processes left pending. Survives anything but its cancellation: a
    failed sweep is logged and the next one tries again."""
    while True:
        try:
            while await ledger.expire_due() > 0:
                pass
        except Exception as exc:  # noqa: BLE001 - logged; the sweeper must not die
            log.warning("sweep failed", extra={"error": type(exc).__name__})
        await asyncio.sleep(interval)


def create_app(config: Config, database_url: str, upstream_url: str,
               upstream_keys: tuple[str, ...]) -> Litestar:
    web = Web(config)

    @contextlib.asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        pool = await db.create_pool(database_url, size=config.db_pool_size)
        upstream = Upstream(upstream_url, upstream_keys, timeout=config.upstream_timeout,
                            concurrency=config.upstream_concurrency,
                            stream_usage=config.upstream_stream_usage)
        await upstream.start()
        ledger = Ledger(pool, lease_seconds=config.reservation_lease)
        journey = Journey(settings=config.bridge_settings(),
                          auth=Authenticator(pool, config.auth_cache_ttl, on_use=web.recorder(pool).touch),
                          ledger=ledger, upstream=upstream)
        app.state.pool = pool
        app.state.ledger = ledger
        app.state.journey = journey
        app.state.calibration = journey.calibration
        app.state.config = config
        app.state.max_body = 64 * 1024 * 1024
        # billing's engine sets this when Stripe is configured; None: the page says billing is off
        app.state.billing = getattr(app.state, "billing", None)
        await web.start(app, pool, database_url)
        sweeper = asyncio.create_task(_sweeper(ledger, config.sweep_interval))
        # Everything built so far lives as long as the process. Freezing it keeps the cyclic
        # GC's full collections from walking it again: measured on this app, a full collection
        # walked ~67,000 start-up objects in 31-34 ms, a pause for every request in flight;
        # after the freeze it takes 0.0 ms (bench/PROFILE.md).
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            sweeper.cancel()
            await web.stop()
            await journey.flights.land()
            await upstream.close()
            await pool.close()

    return Litestar(
        route_handlers=[bridge_app.router, healthz, *usage.routes, *web.route_handlers],
        template_config=web.templates,
        lifespan=[lifespan],
        exception_handlers={HTTPException: _http_exception, Exception: _unexpected},
        request_max_body_size=64 * 1024 * 1024,
        openapi_config=None,
        logging_config=None,
        debug=False,
    )
