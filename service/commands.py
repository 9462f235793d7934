"""The `codeplan` command's server-side commands: `run`, `worker`, `simulate`, `migrate`,
`sweep`, `rollup`, `users`, `keys`, `stripe` (service/cli.py parses the arguments and hands
them here)."""
from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import os
import signal
import socket
import sys

import asyncpg

from . import config as config_module
from . import db, logs, stacks
from .accounts import AccountError, create_key, create_user, revoke_key
from .web.identity import signup_plan_problem

log = logging.getLogger("codeplan")


def _database_url(config: config_module.Config) -> str:
    if config.database_url:
        return config.database_url
    from . import pgembed

    return pgembed.start(config.data_dir)


async def _with_conn(url: str, config: config_module.Config, action):
    conn = await db.connect(url, dead_after=config.db_dead_after)
    try:
        return await action(conn)
    finally:
        await conn.close()


def _bind(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.setblocking(False)
    return sock


@functools.cache
def _server_class():
    """uvicorn's Server, but a forced exit still settles what is open.

    uvicorn stops on SIGTERM or SIGINT: open streams get the graceful deadline, then the app's
    lifespan shutdown runs, which ends every open flight and settles it (service/ops.py
    settle_everything). A SIGINT during that drain (a second Ctrl-C, an impatient supervisor) is
    uvicorn's forced exit: it cuts the drain short, as asked, but it also skips the lifespan
    shutdown, so the streams' ledger rows were left pending: the allowance held until the
    sweeper, and the tokens delivered since the last heartbeat never billed. Here the second
    signal cuts the drain and the lifespan shutdown still runs (itself bounded: 15 s to settle,
    8 s for the live hub, 6 s for the pool). The way out of a shutdown that hangs even so is a
    third SIGINT: from the second on SIGINT has its default action, which ends the process at
    once without asking its (perhaps blocked) loop."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame) -> None:
            forced = self.force_exit
            super().handle_exit(sig, frame)
            if self.force_exit and not forced:
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                log.warning("forced exit: open streams are cut now and settled; another SIGINT kills "
                            "the process, leaving them to the sweeper")

        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            await super().shutdown(sockets=sockets)
            # uvicorn skipped the lifespan shutdown when the force came before its drain ended (its
            # `shutdown_event` is set once that shutdown ran, or the lifespan failed or is off)
            done = getattr(self.lifespan, "shutdown_event", None)
            if self.force_exit and done is not None and not done.is_set():
                await self.lifespan.shutdown()

    return Server


def _uvicorn(app, *, lifespan: bool, config: config_module.Config | None = None):
    """uvicorn with httptools; with `config`, the HTTP limits of service/http_limits.py and the
    graceful shutdown deadline (SIGTERM: open streams get CODEPLAN_SHUTDOWN_TIMEOUT seconds to
    finish, then they are cut and settled; a SIGINT after it cuts them at once, settled all the
    same: `_server_class`)."""
    import uvicorn

    http: object = "httptools"
    ws: object = "auto"
    keep_alive = 75.0
    shutdown_timeout: float | None = None
    if config is not None:
        from bridge.app import RESPONSES_PATHS

        from .http_limits import HttpLimits, protocol_class, websocket_protocol_class

        http = protocol_class(HttpLimits(
            max_header_bytes=config.max_header_bytes, header_timeout=config.header_timeout,
            max_body_bytes=config.max_body_bytes, body_timeout=config.body_timeout,
            max_connections=config.max_connections))
        # the body limit for the Responses socket's frames (a turn each) only; the live-usage
        # sockets' messages are held to 64 KiB (service/http_limits.py)
        ws = websocket_protocol_class(RESPONSES_PATHS)
        keep_alive = config.keepalive_timeout
        shutdown_timeout = config.shutdown_timeout
    return _server_class()(uvicorn.Config(
        app, loop="none", http=http, ws=ws, lifespan="on" if lifespan else "off", log_config=None,
        access_log=False, timeout_keep_alive=keep_alive, server_header=False,
        # the client's address (the throttles count per address) from X-Forwarded-For only when
        # it comes from a trusted proxy (CODEPLAN_FORWARDED_ALLOW_IPS, e.g. the load balancer):
        # otherwise every client behind it would share its address and its limits
        proxy_headers=bool(config and config.forwarded_allow_ips),
        forwarded_allow_ips=(config.forwarded_allow_ips if config and config.forwarded_allow_ips else None),
        timeout_graceful_shutdown=shutdown_timeout,
        # a Responses WebSocket frame carries a whole turn: as large as an HTTP body may be (on
        # its paths only, `ws` above)
        ws_max_size=config.max_body_bytes if config is not None else 64 * 1024 * 1024))


async def _start_simulator(config: config_module.Config):
    from bridge.simulator.engine import SimConfig
    from bridge.simulator.server import create_app as create_simulator

    sim_sock = _bind(config.simulator_host, config.simulator_port)
    host, port = sim_sock.getsockname()[:2]
    url = f"http://{host}:{port}/api/coding/paas/v4"
    simulator = _uvicorn(create_simulator(SimConfig()), lifespan=False)
    task = asyncio.create_task(simulator.serve(sockets=[sim_sock]))
    log.warning("NO UPSTREAM CONFIGURED: serving answers from the built-in GLM-4.6 SIMULATOR, "
                "not the real model. Set CODEPLAN_UPSTREAM_URL and CODEPLAN_UPSTREAM_KEYS, or "
                "CODEPLAN_UPSTREAMS_FILE, to forward to a real upstream.", extra={"simulator": url})
    return simulator, task, url


async def _serve(config: config_module.Config, url: str, sock: socket.socket, simulator_url: str,
                 tick_baton: int | None = None) -> None:
    from .app import create_app

    profiles = config_module.upstream_profiles(config, simulator_url)
    server = _uvicorn(create_app(config, url, profiles=profiles, tick_baton=tick_baton), lifespan=True,
                      config=config)
    await server.serve(sockets=[sock])


async def _run(config: config_module.Config, workers: int) -> None:
    stacks.install()
    url = _database_url(config)
    applied = await db.migrate(url, dead_after=config.db_dead_after)
    log.info("database ready", extra={"migrations_applied": len(applied)})
    if config.signup_plan:
        plans = await _with_conn(url, config, lambda c: c.fetch("SELECT id, retired_at FROM plans ORDER BY id"))
        problem = signup_plan_problem(config.signup_plan, plans)
        if problem:
            raise config_module.ConfigError(problem)

    main_sock = _bind(config.host, config.port)  # a busy port fails before anything starts
    simulator = sim_task = None
    simulator_url = ""
    if config.simulated:
        simulator, sim_task, simulator_url = await _start_simulator(config)
    log.info("codeplan listening", extra={"url": f"http://{config.host}:{config.port}", "workers": workers})
    try:
        if workers > 1:
            from .workers import supervise

            await supervise(config, url, main_sock, simulator_url, workers)
        else:
            await _serve(config, url, main_sock, simulator_url)
    finally:
        if simulator is not None and sim_task is not None:
            simulator.should_exit = True
            await sim_task


async def _worker(config: config_module.Config, fd: int, simulator_url: str, tick_baton: int | None) -> None:
    """One of `codeplan run --workers N`: serves the socket its supervisor bound."""
    stacks.install()
    sock = socket.socket(fileno=fd)
    sock.setblocking(False)
    await _serve(config, config.database_url, sock, simulator_url, tick_baton)


async def _simulate(args: argparse.Namespace) -> None:
    from bridge.simulator.engine import SimConfig
    from bridge.simulator.server import create_app as create_simulator

    sim = SimConfig(seed=args.seed, ttft_ms=args.ttft_ms, tokens_per_second=args.tps,
                    output_tokens=args.tokens, usage_mode=args.usage_mode, fault=args.fault)
    stacks.install()
    sock = _bind(args.host, args.port)
    host, port = sock.getsockname()[:2]
    log.info("GLM simulator listening", extra={"url": f"http://{host}:{port}/api/coding/paas/v4"})
    await _uvicorn(create_simulator(sim), lifespan=False).serve(sockets=[sock])


def _stripe_sync(config: config_module.Config) -> int:
    if not config.billing_enabled:
        print("codeplan: STRIPE_SECRET_KEY is required for `codeplan stripe sync`", file=sys.stderr)
        return 2
    import stripe

    from .billing.engine import Billing
    from .billing.catalog import CatalogError
    from .billing.stripe_api import describe

    async def sync(url: str):
        await db.migrate(url, dead_after=config.db_dead_after)
        pool = await db.create_pool(url, size=2, dead_after=config.db_dead_after)
        billing = await Billing.open(pool, config)
        try:
            return await billing.sync_catalog()
        finally:
            await billing.close()
            await pool.close()
    try:
        lines = asyncio.run(sync(_database_url(config)))
    except CatalogError as exc:
        print(f"codeplan: {exc}", file=sys.stderr)
        return 1
    except stripe.StripeError as exc:
        print(f"codeplan: Stripe refused the catalogue: {describe(exc)}", file=sys.stderr)
        return 1
    for line in lines:
        print(f"{line.what:<32} {line.stripe_id:<34} {line.action}")
    print(f"{sum(line.action != 'unchanged' for line in lines)} change(s) on Stripe")
    return 0


# a database that cannot be reached, does not answer, or will not let us in (a wrong password,
# no such database): what a command answers with one line (`main`)
_UNREACHABLE = (TimeoutError, ConnectionError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError,
                asyncpg.exceptions.OperatorInterventionError, asyncpg.exceptions.TooManyConnectionsError,
                asyncpg.exceptions.InvalidAuthorizationSpecificationError,
                asyncpg.exceptions.InvalidCatalogNameError)


def _from_dsn_parser(exc: BaseException) -> bool:
    """Whether `exc` was raised while asyncpg read the connection URL (its connect_utils)."""
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename.endswith(os.path.join("asyncpg", "connect_utils.py")):
            return True
        tb = tb.tb_next
    return False


def run(args: argparse.Namespace) -> int:
    """Every command but the client-side ones (service/cli.py answers those): configuration,
    then the server, a worker, the simulator or a one-shot command against the database."""
    try:
        config = config_module.load()
        from bridge.models import ModelResolver

        from . import credits

        credits.install(config_module.model_catalog(config))

        try:
            ModelResolver(config.model_aliases, claude=config.claude_model, claude_haiku=config.claude_haiku_model)
        except ValueError as exc:
            raise config_module.ConfigError(str(exc)) from None
    except config_module.ConfigError as exc:
        print(f"codeplan: configuration error: {exc}", file=sys.stderr)
        return 2
    logs.setup(config.log_level)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    try:
        if args.command == "run":
            workers = args.workers if args.workers is not None else config.workers
            if not 1 <= workers <= 64:
                print("codeplan: configuration error: --workers: expected an integer from 1 to 64",
                      file=sys.stderr)
                return 2
            asyncio.run(_run(config, workers))
        elif args.command == "worker":
            asyncio.run(_worker(config, args.fd, args.simulator_url, args.tick_baton))
        elif args.command == "simulate":
            asyncio.run(_simulate(args))
        elif args.command == "migrate":
            applied = asyncio.run(db.migrate(_database_url(config), dead_after=config.db_dead_after))
            print(f"applied {len(applied)} migration(s)" + (": " + ", ".join(applied) if applied else ""))
        elif args.command == "sweep":
            from .ledger import Ledger

            async def sweep(url: str) -> int:
                pool = await db.create_pool(url, size=2, dead_after=config.db_dead_after)
                try:
                    ledger = Ledger(pool, lease_seconds=config.reservation_lease)
                    expired = await ledger.expire_due()
                    await ledger.forget_void_marks()
                    return expired
                finally:
                    await pool.close()
            print(f"expired {asyncio.run(sweep(_database_url(config)))} reservation(s)")
        elif args.command == "rollup":
            import datetime as dt

            from .ledger import Ledger

            async def roll(url: str) -> int:
                pool = await db.create_pool(url, size=2, dead_after=config.db_dead_after)
                try:
                    # whole UTC days only: the cut is the midnight that starts the day N days
                    # ago, so no day is split between the ledger and usage_daily (ledger_rollup
                    # cuts there itself too, migrations/0054)
                    before = (dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=args.older_than_days)).replace(
                        hour=0, minute=0, second=0, microsecond=0)
                    return await Ledger(pool, lease_seconds=config.reservation_lease).rollup(before)
                finally:
                    await pool.close()
            print(f"rolled up {asyncio.run(roll(_database_url(config)))} ledger row(s)")
        elif args.command == "users" and args.action == "promote":
            from .web.identity import promote

            url = _database_url(config)
            asyncio.run(db.migrate(url, dead_after=config.db_dead_after))
            account = asyncio.run(_with_conn(url, config, lambda c: promote(c, args.email)))
            if account is None:
                raise AccountError(f"no account with email {args.email!r}")
            print(f"account {account} ({args.email}) is now an admin")
        elif args.command == "users":
            url = _database_url(config)
            asyncio.run(db.migrate(url, dead_after=config.db_dead_after))
            new = asyncio.run(_with_conn(url, config, lambda c: create_user(c, args.email, args.plan)))
            print(f"account {new.account_id} created on plan {args.plan}; its API key (shown once):")
            print(new.key)
        elif args.command == "stripe":
            return _stripe_sync(config)
        elif args.command == "keys" and args.action == "revoke":
            account = asyncio.run(_with_conn(_database_url(config), config, lambda c: revoke_key(c, args.prefix)))
            print(f"key {args.prefix}... of account {account} revoked")
        elif args.command == "keys":
            url = _database_url(config)
            new = asyncio.run(_with_conn(url, config, lambda c: create_key(c, args.email, args.name)))
            print(f"key {new.prefix}... added to account {new.account_id} (shown once):")
            print(new.key)
    except AccountError as exc:
        print(f"codeplan: {exc}", file=sys.stderr)
        return 1
    except _UNREACHABLE as exc:
        # the database unreachable, silent or refusing us: one line, not a traceback, and never
        # its URL (it may carry a password). Any other error keeps its traceback.
        reason = (f"the database did not answer in {config.db_dead_after:g} s (CODEPLAN_DB_DEAD_AFTER)"
                  if isinstance(exc, TimeoutError) else
                  f"cannot use the database: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}")
        print(f"codeplan: {reason}", file=sys.stderr)
        return 1
    except config_module.ConfigError as exc:
        print(f"codeplan: configuration error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, TypeError) as exc:
        # asyncpg's DSN parser raises plain ValueErrors (int() of a "port", parse_qs of a
        # "query") whose text quotes a piece of the URL, which may be the password: one line
        # with the type only. config.load refuses the URLs known to do it; this is for the rest.
        # Any other ValueError keeps its traceback.
        if not _from_dsn_parser(exc):
            raise
        print(f"codeplan: configuration error: CODEPLAN_DATABASE_URL: asyncpg cannot read it "
              f"({type(exc).__name__}; value not shown): check its host, port and query parameters, and "
              "percent-encode any of # / ? @ : in the user name or password", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except OSError as exc:
        print(f"codeplan: {exc}", file=sys.stderr)
        return 1
    return 0

