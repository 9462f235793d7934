"""The web page: accounts, dashboard, keys, plans, tool set-up, and live usage.

`Web` composes it for the application: the routes (behind CSRF protection), the templates, the
static files, and what runs beside them (the LISTEN hub, the last-used recorder, housekeeping).
"""
from __future__ import annotations

import asyncio
import errno
import hashlib
import logging
import secrets
from pathlib import Path
from typing import Any, Coroutine

import asyncpg
import jinja2
from litestar import Request, Response, Router
from litestar.config.csrf import CSRFConfig
from litestar.datastructures import CacheControlHeader
from litestar.file_system import BaseLocalFileSystem
from litestar.exceptions import HTTPException
from litestar.middleware import DefineMiddleware
from litestar.middleware.csrf import CSRFMiddleware
from litestar.plugins.jinja import JinjaTemplateEngine
from litestar.response import Redirect, Template
from litestar.static_files import create_static_files_router
from litestar.template.config import TemplateConfig

from ..config import Config
from . import chart, i18n, identity, live, pages, sockets
from .keyuse import KeyUseRecorder
from .live import UsageHub
from .mail import Mailer

log = logging.getLogger("codeplan.web")

HERE = Path(__file__).resolve().parent
STATIC = HERE / "static"
HOUSEKEEPING_SECONDS = 3600.0
STOP_SECONDS = 8.0  # the most `Web.stop` takes, whatever the database does
MAX_BACKGROUND = 64  # jobs a page left running after its answer (reset mails); more are dropped


def _asset_version() -> str:
    digest = hashlib.sha256()
    for path in sorted(STATIC.iterdir()):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:10]


def _templates() -> TemplateConfig:
    environment = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True,
                                     trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined)
    environment.filters["tokens"] = lambda n: f"{int(n):,}"
    environment.filters["compact"] = chart.compact
    environment.filters["money"] = lambda cents: f"${cents / 100:,.2f}".replace(".00", "")
    return TemplateConfig(instance=JinjaTemplateEngine.from_environment(environment))


FORM_MAX_BYTES = 64 * 1024


def wants_html(request: Request) -> bool:
    """A browser asking for a page (not a tool calling the API): errors become pages too."""
    path = request.url.path
    # the APIs answer in their own shapes whoever asks (an admin browsing the admin API reads
    # its problem details, not a page about an expired form)
    if path.startswith(("/v1/", "/api/", "/stripe/", "/admin/", "/schema", "/healthz", "/readyz", "/metrics")):
        return False
    return "text/html" in (request.headers.get("accept") or "")


def error_page(request: Request, status: int) -> Response:
    lang = i18n.choose(request.cookies.get(i18n.COOKIE), request.headers.get("accept-language"))
    _ = i18n.translator(lang)
    if status == 404:
        title, text = "Page not found", "This page does not exist."
    elif status == 403:
        title, text = "Not allowed", "The form expired or came from another site. Go back, reload the page and try again."
    elif status >= 500:
        title, text = "Something went wrong", "The server failed unexpectedly; the failure was logged."
    else:
        title, text = "Something went wrong", "The request was not understood."
    web: Web | None = getattr(request.app.state, "web", None)
    return Template(template_name="error.html", status_code=status, headers=pages.PAGE_HEADERS,
                    context={"_": _, "lang": lang, "viewer": None, "here": "/", "title": title, "text": text,
                             "asset_version": web.asset_version if web else "", "notice": None, "error": None,
                             "status": status})


def _http_error(request: Request, exc: HTTPException) -> Response:
    return error_page(request, exc.status_code)


def _redirect(request: Request, exc: pages.GoTo) -> Response:
    return Redirect(exc.location, status_code=303)


def _unexpected(request: Request, exc: Exception) -> Response:
    log.error("unhandled error on a page", exc_info=exc, extra={"path": request.url.path})
    return error_page(request, 500)


class _StaticFiles(BaseLocalFileSystem):
    """Litestar's local files, where a path the system refuses (a NUL, a name too long, a file
    taken for a folder) is a file that is not there: a 404, where Litestar answered 500. Any other
    failure (permissions, I/O) stays a server's."""

    async def info(self, path, **kwargs):
        try:
            return await super().info(path, **kwargs)
        except ValueError:
            raise FileNotFoundError(path) from None
        except OSError as exc:
            if exc.errno in (errno.ENOTDIR, errno.ENAMETOOLONG):
                raise FileNotFoundError(path) from None
            raise


class Web:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.mailer = Mailer(config.smtp_url, config.mail_from)
        self.asset_version = _asset_version()
        # The secret is read in `start` (from the settings or the database) before the first
        # request; the middleware reads it from this object on every request.
        self.csrf = CSRFConfig(secret=config.secret_key or secrets.token_hex(32), cookie_name="codeplan_csrf",
                               cookie_httponly=True, cookie_samesite="lax",
                               cookie_secure=config.base_url.startswith("https://"))
        self.templates = _templates()
        self.hub: UsageHub | None = None
        self.key_use: KeyUseRecorder | None = None
        self._housekeeping: asyncio.Task | None = None
        self._background: set[asyncio.Task] = set()

    @property
    def route_handlers(self) -> list:
        pages_router = Router(
            path="/", route_handlers=pages.routes,
            # the largest form is a password (1,024 characters): the CSRF middleware reads a whole
            # form before it checks the token, so a stranger's body is bounded before it is read
            request_max_body_size=FORM_MAX_BYTES,
            middleware=[DefineMiddleware(CSRFMiddleware, config=self.csrf)],
            exception_handlers={pages.GoTo: _redirect, HTTPException: _http_error, Exception: _unexpected})
        static = create_static_files_router(
            path="/static", directories=[STATIC], include_in_schema=False, file_system=_StaticFiles(),
            cache_control=CacheControlHeader(max_age=86400, public=True))
        return [pages.home, pages_router, static, *sockets.routes]

    async def start(self, app, pool: asyncpg.Pool, database_url: str) -> None:
        if not self.config.secret_key:
            self.csrf.secret = await _shared_secret(pool, "csrf")
        if self.config.signup_plan:
            problem = identity.signup_plan_problem(
                self.config.signup_plan, await pool.fetch("SELECT id, retired_at FROM plans ORDER BY id"))
            if problem:
                raise RuntimeError(problem)
        if not self.mailer.enabled:
            log.warning("mail is off (no CODEPLAN_SMTP_URL): verification and reset links go to this log")
        self.hub = UsageHub(pool, database_url, dead_after=self.config.db_dead_after)
        await self.hub.start()
        app.state.web = self
        app.state.usage_hub = self.hub
        self._housekeeping = asyncio.create_task(self._keep_tidy(pool))

    def in_background(self, job: Coroutine[Any, Any, None], what: str) -> None:
        """Run `job` after the page has answered (so the answer cannot wait on it, nor tell by its
        time what the job found). Bounded: past MAX_BACKGROUND running jobs, this one is dropped
        and logged. A failure is logged by its type, never its text (it could quote a link)."""
        if len(self._background) >= MAX_BACKGROUND:
            job.close()
            log.error("background job dropped: too many running", extra={"job": what})
            return
        task = asyncio.create_task(job)
        self._background.add(task)

        def done(finished: asyncio.Task) -> None:
            self._background.discard(finished)
            if not finished.cancelled() and finished.exception() is not None:
                log.error("background job failed", extra={"job": what, "error": type(finished.exception()).__name__})
        task.add_done_callback(done)

    def recorder(self, pool: asyncpg.Pool) -> KeyUseRecorder:
        self.key_use = KeyUseRecorder(pool)
        return self.key_use

    async def _keep_tidy(self, pool: asyncpg.Pool) -> None:
        while True:
            try:
                # unconfirmed accounts expire only where an address can be confirmed: without
                # mail nobody's is, and none is required
                await identity.housekeeping(pool, self.config.signup_window,
                                            self.config.unverified_days if self.mailer.enabled else 0)
            except (OSError, asyncpg.PostgresError) as exc:
                log.warning("web housekeeping failed", extra={"error": type(exc).__name__})
            await asyncio.sleep(HOUSEKEEPING_SECONDS)

    async def stop(self, timeout: float = STOP_SECONDS) -> None:
        """End what runs beside the pages in `timeout` seconds at most, whatever the database
        does: a task cancelled inside a query waits for the pool to take its connection back,
        which a database that stopped answering never lets happen (the pool's own bounded close
        ends those, service/app.py). What is not done in time is left cancelled, not awaited."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout

        async def within(tasks: list[asyncio.Future], what: str) -> None:
            if not tasks:
                return
            _, pending = await asyncio.wait(tasks, timeout=max(0.0, deadline - loop.time()))
            if pending:
                for task in pending:
                    task.cancel()
                log.warning("web shutdown: not done in time; left behind", extra={"what": what})

        tasks: list[asyncio.Future] = [*self._background]
        if self._housekeeping is not None:
            tasks.append(self._housekeeping)
        for task in tasks:
            task.cancel()
        await within(tasks, "housekeeping and background jobs")
        self.mailer.close()
        if self.hub is not None:
            await self.hub.stop(timeout=min(live.STOP_TIMEOUT, max(0.0, deadline - loop.time())))
        if self.key_use is not None:
            await within([asyncio.ensure_future(self.key_use.close())], "last-used writes")


async def _shared_secret(pool: asyncpg.Pool, name: str) -> str:
    """One secret for every process on this database, made by whichever asks first."""
    await pool.execute("INSERT INTO web_secrets (name, value) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
                       name, secrets.token_hex(32))
    return await pool.fetchval("SELECT value FROM web_secrets WHERE name = $1", name)
