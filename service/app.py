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
from bridge import shapes
from bridge.journey import Journey
from bridge.upstream import Upstream

from . import db, usage
from .accounts import Authenticator
from .config import Config
from .ledger import Ledger
from .problems import problem
from .throttle import AuthThrottle, GuardedAuthenticator, Throttled
from .throttle_gate import throttle_gate
from .web import Web, error_page, wants_html

log = logging.getLogger("codeplan.app")


def _shaped(request: Request, status: int, message: str, code: str | None = None,
            headers: dict[str, str] | None = None) -> Response:
    """An error in the protocol of the request's path (bridge/shapes.py)."""
    answer = shapes.render(request.url.path, status, message, code)
    return Response(answer.body, status_code=answer.status, media_type=answer.content_type,
                    headers=headers)


def _http_exception(request: Request, exc: HTTPException) -> Response:
    path = request.url.path
    if exc.status_code in (404, 405) and (path == "/v1" or path.startswith("/v1/")) \
            and shapes.family(path) is shapes.Family.openai:
        # the coding tools' API: OpenAI's error shape, naming the path and what is served
        return bridge_app.not_served(request.method, path, exc.status_code)
    if wants_html(request):
        return error_page(request, exc.status_code)
    # Litestar's own refusals (unknown path, wrong method, its body limit) in the caller's shape
    return _shaped(request, exc.status_code, exc.detail or "error", headers=exc.headers)


def _throttled(request: Request, exc: Throttled) -> Response:
    return _shaped(request, 429, "Too many requests with unknown API keys from your address; "
                   f"retry in {exc.retry_after_header} s.", "rate_limit_exceeded",
                   headers={"retry-after": exc.retry_after_header})


def _unexpected(request: Request, exc: Exception) -> Response:
    # the detail stays in our log: exception text can carry secrets (URLs, keys)
    log.error("unhandled error", exc_info=exc, extra={"path": request.url.path})
    return _shaped(request, HTTP_500_INTERNAL_SERVER_ERROR,
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
        # unknown keys cached briefly for every caller; failures counted per client address,
        # refused (429) by the throttle gate and the quota API (service/throttle.py)
        auth = GuardedAuthenticator(
            Authenticator(pool, config.auth_cache_ttl, on_use=web.recorder(pool).touch),
            AuthThrottle(limit=config.auth_failure_limit, window=config.auth_failure_window,
                         unknown_ttl=config.auth_unknown_ttl))
        journey = Journey(settings=config.bridge_settings(), auth=auth, ledger=ledger, upstream=upstream)
        app.state.auth = auth
        app.state.pool = pool
        app.state.ledger = ledger
        app.state.journey = journey
        app.state.calibration = journey.calibration
        app.state.config = config
        # the HTTP server refuses bodies over this first (service/http_limits.py)
        app.state.max_body = config.max_body_bytes
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

    # the paths that take big bodies from coding tools: a throttled address is refused there
    # before anything else happens (service/throttle_gate.py)
    gated = [*bridge_app.CHAT_PATHS, *bridge_app.MESSAGES_PATHS,
             *(p + "/count_tokens" for p in bridge_app.MESSAGES_PATHS)]
    return Litestar(
        route_handlers=[bridge_app.router, healthz, *usage.routes, *web.route_handlers],
        template_config=web.templates,
        lifespan=[lifespan],
        middleware=[throttle_gate(gated, lambda scope: scope["app"].state.auth.throttle)],
        exception_handlers={HTTPException: _http_exception, Throttled: _throttled,
                            Exception: _unexpected},
        # the HTTP server refuses bodies over CODEPLAN_MAX_BODY_BYTES first; this is the last line
        request_max_body_size=config.max_body_bytes + 1024,
        openapi_config=None,
        logging_config=None,
        debug=False,
    )
