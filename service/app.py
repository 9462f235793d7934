"""The Codeplan application: the bridge's surfaces and the service's own API in one Litestar app."""
from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import gc
import logging
from typing import AsyncIterator

import asyncpg
import msgspec

from litestar import Litestar, Request, Response, Router
from litestar.exceptions import HTTPException
from litestar.status_codes import HTTP_500_INTERNAL_SERVER_ERROR

from bridge import app as bridge_app
from bridge import shapes
from bridge.journey import Journey
from bridge.metrics import BridgeMetrics
from bridge.upstreams import ProfileConfig, Router as UpstreamRouter

from . import admin, credits, db, memory, metrics, openapi, ops, usage
from .accounts import Authenticator
from .billing.engine import Billing, set_overage
from .billing import load_stripe, routes as billing_routes
from .config import Config, peak_window, read_model_catalog, upstream_profiles
from .ledger import Ledger
from .tick_baton import TickBaton
from .metrics import PrometheusMetrics
from .throttle import AuthThrottle, GuardedAuthenticator, Throttled
from .throttle_gate import refused as throttle_refused
from .throttle_gate import throttle_gate
from .upstream_store import PgKeyLeases, UpstreamStore
from .web import Web, error_page, wants_html
from .web.pages import FormRequest

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


def _database_away(request: Request, exc: Exception) -> Response:
    """The database is unreachable (restarting, a network blip): a retryable 503 in the caller's
    shape at once, never a 500 (the bridge's surfaces answer the same from the journey)."""
    log.warning("database unavailable", extra={"path": request.url.path, "error": type(exc).__name__})
    return _shaped(request, 503, "The service cannot reach its database right now; please retry in a "
                   "few seconds.", "unavailable", headers={"retry-after": "2"})


def _unstorable_text(request: Request, exc: Exception) -> Response:
    """Text PostgreSQL cannot hold (a NUL character) reached a query: only a caller sends that,
    so it is the request's fault, a 400, wherever the text came from (a field, a parameter)."""
    return _shaped(request, 400, "The request contains text the service cannot store "
                   "(a NUL character).", "invalid_text")


def _unencodable(request: Request, exc: Exception) -> Response:
    """A number past its column's type (an int32 or int64 column): asyncpg refuses it before the
    query leaves ("invalid input for query argument", an OverflowError underneath), and only a
    caller's value gets that far. Any other encoding failure (a str where an int goes) is our bug,
    and PostgreSQL's own data exceptions are subclasses: those stay unexpected."""
    if type(exc) is not asyncpg.exceptions.DataError or not isinstance(exc.__cause__, OverflowError):
        return _unexpected(request, exc)
    return _shaped(request, 400, "A value in the request is out of the range the service can store.",
                   "value_out_of_range")


def _unexpected(request: Request, exc: Exception) -> Response:
    # the detail stays in our log: exception text can carry secrets (URLs, keys)
    log.error("unhandled error", exc_info=exc, extra={"path": request.url.path})
    return _shaped(request, HTTP_500_INTERNAL_SERVER_ERROR,
                   "The service failed unexpectedly; the failure was logged.")


class _Watched:
    """An ASGI `send` that notes whether the response has started (an exception after that can
    no longer be answered). A plain callable, not a coroutine: no frame per message."""

    __slots__ = ("send", "started")

    def __init__(self, send) -> None:
        self.send = send
        self.started = False

    def __call__(self, message):
        if message["type"] == "http.response.start":
            self.started = True
        return self.send(message)


class CodeplanApp(Litestar):
    """Litestar, with the coding tools' hot HTTP paths (`bridge.app.HOT_ROUTES`, matched exactly)
    dispatched before its router: those handlers are raw ASGI and use nothing of Litestar's, so
    they skip its per-request objects and layers (scope state, routing, two exception layers,
    the middleware stack): ~9-10% of the bridge's busy samples in py-spy (bench/PROFILE.md).
    What those layers did for them is done here: the throttle gate first, then the handler, and an
    exception answered by the same exception handlers as any route's. Every other request (a
    trailing slash, WebSocket upgrades, the web page, the APIs) goes through Litestar as before."""

    def hot_routes(self, routes: dict, gated: frozenset[str], throttle, handlers: dict) -> None:
        self._hot = routes
        self._gated = gated
        self._throttle = throttle
        self._handlers = handlers

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            handler = self._hot.get(scope["path"])
            if handler is not None:
                scope["app"] = scope["litestar_app"] = self
                if await throttle_refused(scope, send, self._gated, self._throttle):
                    return
                watched = _Watched(send)
                try:
                    await handler(scope, receive, watched)
                except Exception as exc:
                    if watched.started:
                        raise
                    await self._answer(scope, receive, send, exc)
                return
        await super().__call__(scope, receive, send)

    async def _answer(self, scope, receive, send, exc: Exception) -> None:
        """An exception from a hot handler, answered by the handler Litestar would pick (the
        closest class in the exception's MRO)."""
        scope.setdefault("state", {})
        request = self.request_class(scope=scope, receive=receive, send=send)
        on_error = next(self._handlers[kind] for kind in type(exc).__mro__ if kind in self._handlers)
        response = on_error(request, exc)
        await response.to_asgi_response(app=None, request=request)(scope, receive, send)


async def _sweeper(ledger: Ledger, interval: float, bridge_metrics: BridgeMetrics) -> None:
    """Expire what dead processes left pending, and forget old void marks. Survives anything
    but its cancellation: a failed sweep is logged and the next one tries again. What an expiry
    bills is counted like a settlement the bridge writes (`codeplan_credits_total`,
    `codeplan_tokens_total`): the same metrics object, so the metrics add up to the ledger."""
    while True:
        try:
            while expired := await ledger.expire_due_entries():
                for entry in expired:
                    bridge_metrics.usage(entry.model, entry.prompt_tokens, 0, entry.completion_tokens, entry.billed)
            await ledger.forget_void_marks()
        except Exception as exc:  # noqa: BLE001 - logged; the sweeper must not die
            log.warning("sweep failed", extra={"error": type(exc).__name__})
        await asyncio.sleep(interval)


# A request still authenticating, reading its body or waiting for its admission this long after
# it came, and a ledger tick unanswered this long, are logged (each of those takes a database
# round trip or two at most); the watch looks every `_STALL_CHECK` seconds.
_STALL_SECONDS = 30.0
_STALL_CHECK = 10.0
# the event loop held by one call this long: every thread's stack goes to stderr
_HELD_DUMP = 30.0


async def _watch_stalls(journey: Journey, ledger: Ledger, *, overdue: float,
                        after: float = _STALL_SECONDS) -> None:
    """Log requests stuck before their admission, a ledger tick left unanswered, and the event
    loop itself held up (this watch waking late; held `_HELD_DUMP` seconds, with every
    thread's stack while it still is): a hang says where it is. And answer requests
    waiting `overdue` seconds for their admission with a 503 (`Journey.answer_overdue`)."""
    loop = asyncio.get_running_loop()
    # an admission waits at most `overdue` and one interval more: a third of it, within [0.5, 10] s
    every = max(0.5, min(_STALL_CHECK, overdue / 3))
    try:
        while True:
            due = loop.time() + every
            # should this watch not wake `_HELD_DUMP` seconds after it is due, the loop is held
            # (by one call, or starved): faulthandler's own thread then writes every thread's
            # stack to stderr (re-armed each time, so it fires only for a loop held that long,
            # once; one such timer per process, and this watch is its only user)
            faulthandler.dump_traceback_later(every + _HELD_DUMP)
            await asyncio.sleep(every)
            late = loop.time() - due
            if late > 5.0:
                log.warning("event loop held up", extra={"seconds": round(late, 1)})
            for check in (lambda: journey.warn_stalled(after), lambda: ledger.warn_stalled(after),
                          lambda: journey.answer_overdue(overdue)):
                try:
                    check()
                except Exception:  # noqa: BLE001 - a watcher never takes the process down
                    log.exception("stall watch failed")
    finally:
        faulthandler.cancel_dump_traceback_later()


async def _billing(pool: asyncpg.Pool, config: Config) -> Billing | None:
    """Billing's engine and worker, or None (said once) when no Stripe key is configured."""
    if not config.billing_enabled:
        # nothing could bill it: no plan goes beyond its windows
        await set_overage(pool, plans=(), cap=0)
        log.warning("billing is off: STRIPE_SECRET_KEY is not set; plans are assigned with "
                    "`codeplan users create`" + (
                        "; webhook events are verified and recorded, and applied once a key is set"
                        if config.stripe_webhook_secrets else ""))
        return None
    billing = await Billing.open(pool, config, retry_base=config.billing_retry_seconds)
    billing.start()
    log.info("billing on", extra={"stripe_api": config.stripe_api_base,
                                  "webhooks": "verified" if config.stripe_webhook_secrets else "not configured"})
    return billing


def create_app(config: Config, database_url: str, upstream_url: str = "",
               upstream_keys: tuple[str, ...] = (), *,
               profiles: list[ProfileConfig] | None = None, tick_baton: int | None = None) -> Litestar:
    """The application, forwarding to `profiles` (config.upstream_profiles: the configured
    upstreams, or the simulator) plus what admins add at run time. Given a URL and keys
    instead, they are the single upstream, as CODEPLAN_UPSTREAM_URL / _KEYS would be.
    `tick_baton`: a worker's supervisor's key for the workers' tick baton."""
    if profiles is None:
        profiles = upstream_profiles(msgspec.structs.replace(
            config, upstream_url=upstream_url or config.upstream_url,
            upstream_keys=upstream_keys or config.upstream_keys))
    catalog = read_model_catalog(config)
    models = catalog.models
    credits.install(models)
    web = Web(config)

    @contextlib.asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        pool = await db.create_pool(database_url, size=config.db_pool_size,
                                    statement_cache=config.db_statement_cache, dead_after=config.db_dead_after)
        # a model the models file names is the configuration's word, even one that says what the
        # built-in default says (a surcharge taken off again)
        await credits.sync(pool, models, configured=catalog.from_file,
                           peak=peak_window(config.peak_hours) if config.peak_hours else None,
                           zone=config.peak_zone)
        bridge_metrics = PrometheusMetrics()
        leases = PgKeyLeases(pool, config.upstream_lease)
        router = UpstreamRouter(profiles, timeout=config.upstream_timeout, attempts=config.upstream_attempts,
                        cooldown=config.upstream_cooldown, leases=leases, metrics=bridge_metrics,
                        on_health=_health_log)
        await router.start()
        store = UpstreamStore(pool, router, profiles)
        await store.refresh()
        # a worker of `codeplan run --workers N`: its ledger ticks take turns with the other
        # workers', so each carries what one process's would (service/tick_baton.py)
        baton = TickBaton(database_url, tick_baton) if tick_baton is not None else None
        if baton is not None:
            await baton.open()
        ledger = Ledger(pool, lease_seconds=config.reservation_lease, baton=baton)
        # unknown keys cached briefly for every caller; failures counted per client address,
        # refused (429) by the throttle gate and the quota API (service/throttle.py)
        auth = GuardedAuthenticator(
            Authenticator(pool, config.auth_cache_ttl, on_use=web.recorder(pool).touch,
                          timeout=config.admission_timeout),
            AuthThrottle(limit=config.auth_failure_limit, window=config.auth_failure_window,
                         unknown_ttl=config.auth_unknown_ttl))
        journey = Journey(settings=config.bridge_settings(), auth=auth, ledger=ledger, upstream=router,
                          metrics=bridge_metrics)
        app.state.auth = auth
        app.state.pool = pool
        app.state.ledger = ledger
        app.state.journey = journey
        app.state.calibration = journey.calibration
        app.state.config = config
        app.state.router = router
        app.state.upstream_store = store
        # the HTTP server refuses bodies over this first (service/http_limits.py)
        app.state.max_body = config.max_body_bytes
        # billing's engine when Stripe is configured; None: the page says billing is off. One set
        # before start-up (a test's stand-in) is kept.
        injected = getattr(app.state, "billing", None)
        if config.billing_enabled or config.stripe_webhook_secrets or injected is not None:
            load_stripe()  # now, on the loop's thread, not in the first request or webhook that needs it
        billing = None if injected is not None else await _billing(pool, config)
        app.state.billing = injected if injected is not None else billing
        await web.start(app, pool, database_url)
        sweeper = asyncio.create_task(_sweeper(ledger, config.sweep_interval, bridge_metrics))
        background = [asyncio.create_task(store.run(config.upstream_refresh)),
                      asyncio.create_task(metrics.pool_watcher(pool)),
                      asyncio.create_task(memory.trim_after_bursts(lambda: journey.flights.in_flight)),
                      asyncio.create_task(_watch_stalls(journey, ledger, overdue=config.admission_timeout))]
        # Everything built so far lives as long as the process. Freezing it keeps the cyclic
        # GC's full collections from walking it again: measured on this app, a full collection
        # walked ~67,000 start-up objects in 31-34 ms, a pause for every request in flight;
        # after the freeze it takes 0.0 ms (bench/PROFILE.md).
        gc.collect()
        gc.freeze()
        # And the youngest generation is collected after 10,000 net allocations, not 700. A
        # request's objects are freed by their reference counts when it ends, but while 32 are
        # in flight the count of live objects swings by more than 700, so the default ran a
        # collection every ~17 requests (~100 a second at 32 connections), each walking the live
        # requests' objects and finding no garbage; at 10,000 it runs about once in five
        # seconds. Bridge CPU per request at 32 connections: -6% and -15% (medians of paired
        # runs, bench/PROFILE.md). Cyclic garbage is found later in proportion (the older
        # generations follow the youngest), which the RSS figure of `make bench` watches.
        gc.set_threshold(10_000, 10, 10)
        try:
            yield
        finally:
            for task in background:
                task.cancel()
            await ops.settle_everything(journey)
            sweeper.cancel()
            if baton is not None:
                await baton.close()
            await web.stop()
            if billing is not None:
                await billing.close()
            await leases.close()
            await router.close()
            # A database that stopped answering answers no close either, and a task cancelled in
            # a query holds its connection until the server acknowledges the cancel: the pool
            # gets a few seconds, then its connections are dropped, so the process exits on time
            # whatever the database does (everything worth writing was written above).
            closing = asyncio.ensure_future(pool.close())
            if (await asyncio.wait({closing}, timeout=5.0))[1]:
                log.warning("database pool not closed in 5 s; its connections are dropped")
                pool.terminate()
                await asyncio.wait({closing}, timeout=1.0)

    # the paths that take big bodies from coding tools: a throttled address is refused there
    # before anything else happens (service/throttle_gate.py)
    gated = [*bridge_app.CHAT_PATHS, *bridge_app.MESSAGES_PATHS,
             *(p + "/count_tokens" for p in bridge_app.MESSAGES_PATHS), *bridge_app.RESPONSES_PATHS,
             *bridge_app.MODELS_PATHS]
    handlers = {HTTPException: _http_exception, Throttled: _throttled,
                **{kind: _database_away for kind in db.UNAVAILABLE},
                asyncpg.exceptions.CharacterNotInRepertoireError: _unstorable_text,
                # a NUL inside text bound for jsonb (a top-up's reason, an upstream's base_url):
                # 22P05, not 22021, and the same caller's fault
                asyncpg.exceptions.UntranslatableCharacterError: _unstorable_text,
                asyncpg.exceptions.DataError: _unencodable,
                Exception: _unexpected}
    throttle = lambda scope: scope["app"].state.auth.throttle  # noqa: E731
    app = CodeplanApp(
        # the OpenAPI schema documents the service's own JSON API; the coding tools' protocols
        # and the web page are not part of it (service/openapi.py)
        route_handlers=[Router(path="/", route_handlers=[bridge_app.router, *web.route_handlers],
                               include_in_schema=False),
                        *usage.routes, *billing_routes.routes, admin.router, openapi.former_admin_schema,
                        ops.healthz, ops.readyz, metrics.metrics],
        template_config=web.templates,
        request_class=FormRequest,
        lifespan=[lifespan],
        middleware=[throttle_gate(gated, throttle)],
        exception_handlers=handlers,
        # the HTTP server refuses bodies over CODEPLAN_MAX_BODY_BYTES first; this is the last line
        request_max_body_size=config.max_body_bytes + 1024,
        openapi_config=openapi.CONFIG,
        logging_config=None,
        debug=False,
    )
    app.hot_routes(bridge_app.HOT_ROUTES, frozenset(gated), throttle, handlers)
    return app


def _health_log(profile: str, key: str, healthy: bool, error: str | None) -> None:
    log.warning("upstream key " + ("healthy again" if healthy else "unhealthy"),
                extra={"upstream": profile, "key": key, "error": error})
