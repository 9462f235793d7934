"""The `codeplan` command: its arguments, and who answers each.

`usage` and `statusline` are a client's commands: Claude Code runs its status line after every
update, so they are answered by service/statusline.py (standard library only) before anything
of the server is imported: ~0.1 s a call where importing the server first took ~0.7 s.
`stripe outbox retry` is answered here, by service/billing/outbox.py. Every other command is
service/commands.py's.
"""
from __future__ import annotations

import argparse
import signal
import sys


# `rollup --older-than-days N`: at least 8 (rows of the last 7 days and 5 hours may belong to a
# 5-hour or weekly window still open, whose token counts are read from them), at most a century
# (a cut-off before year 1 is no date: an OverflowError, not a rollup). Checked here, before any
# configuration or database is touched.
ROLLUP_MIN_DAYS = 8
ROLLUP_MAX_DAYS = 36_500


def _terminate(signum: int, frame: object) -> None:
    # uvicorn shuts down gracefully on SIGTERM (open streams finish, everything is settled),
    # then re-raises it to the handler it found: with the default one the process would die
    # before atexit stops the embedded PostgreSQL. A requested, graceful stop exits 0.
    raise SystemExit(0)


def _row_id(value: str) -> int:
    """A meter_outbox id: a positive bigint (anything else is refused before the database is)."""
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a row id, a positive integer (got {value!r})") from None
    if not 1 <= number < 2**63:
        raise argparse.ArgumentTypeError(f"expected a row id, a positive integer (got {value!r})")
    return number


def _stripe_outbox_retry(args: argparse.Namespace) -> int:
    """`codeplan stripe outbox retry [--id N]`: set-aside meter events sent again where that cannot
    count them twice (service/billing/outbox.py `redrive` decides and says why not). Exit status 1
    when a row asked for is left failed, or --id names no failed row."""
    import asyncio

    from . import commands
    from . import config as config_module
    from . import db, logs
    from .billing.outbox import redrive, redrive_lines

    try:
        config = config_module.load()
    except config_module.ConfigError as exc:
        print(f"codeplan: configuration error: {exc}", file=sys.stderr)
        return 2
    logs.setup(config.log_level)

    async def retry(url: str):
        await db.migrate(url, dead_after=config.db_dead_after)
        conn = await db.connect(url, dead_after=config.db_dead_after)
        try:
            return await redrive(conn, args.id)
        finally:
            await conn.close()
    try:
        done = asyncio.run(retry(commands._database_url(config)))
    except commands._UNREACHABLE as exc:  # one line, never the URL (it may carry a password)
        reason = (f"the database did not answer in {config.db_dead_after:g} s (CODEPLAN_DB_DEAD_AFTER)"
                  if isinstance(exc, TimeoutError) else
                  f"cannot use the database: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}")
        print(f"codeplan: {reason}", file=sys.stderr)
        return 1
    if args.id is not None and not done:
        print(f"codeplan: no failed meter_outbox row with id {args.id}", file=sys.stderr)
        return 1
    for line in redrive_lines(done):
        print(line)
    return 0 if all(row.outcome == "resent" for row in done) else 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="codeplan", description="Codeplan: a GLM-4.6 coding plan.")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="migrate, then serve the bridge and the service")
    run.add_argument("--workers", type=int, default=None,
                     help="processes sharing the port (default CODEPLAN_WORKERS, 1)")
    worker = commands.add_parser("worker", help=argparse.SUPPRESS)
    worker.add_argument("--fd", type=int, required=True)
    worker.add_argument("--simulator-url", default="")
    worker.add_argument("--tick-baton", type=int, default=None)  # the supervisor's key (service/tick_baton.py)
    commands.add_parser("migrate", help="apply the database migrations")
    commands.add_parser("sweep", help="expire reservations whose process died, once")
    rollup = commands.add_parser("rollup", help="move settled ledger rows into per-day totals")
    rollup.add_argument("--older-than-days", type=int, default=35,
                        help=f"from {ROLLUP_MIN_DAYS} to {ROLLUP_MAX_DAYS} (default 35)")

    users = commands.add_parser("users", help="manage accounts").add_subparsers(dest="action", required=True)
    create = users.add_parser("create", help="create an account with an active subscription and a key")
    create.add_argument("--email", required=True)
    create.add_argument("--plan", default="pro")
    promote = users.add_parser("promote", help="make an account an admin")
    promote.add_argument("--email", required=True)

    keys = commands.add_parser("keys", help="manage API keys").add_subparsers(dest="action", required=True)
    key_create = keys.add_parser("create", help="add an API key to an account")
    key_create.add_argument("--email", required=True)
    key_create.add_argument("--name", default="")
    key_revoke = keys.add_parser("revoke", help="revoke a key, named by the prefix shown when it was made")
    key_revoke.add_argument("--prefix", required=True)

    stripe = commands.add_parser("stripe", help="Stripe billing").add_subparsers(dest="action", required=True)
    stripe.add_parser("sync", help="create or update the Stripe Products, Prices and overage meter "
                                   "from the plans table (idempotent)")
    outbox = stripe.add_parser("outbox", help="the overage meter events' outbox").add_subparsers(
        dest="outbox_action", required=True)
    retry = outbox.add_parser("retry", help="send set-aside (failed) meter events again, with the same "
                                            "identifiers, where that cannot count them twice")
    retry.add_argument("--id", type=_row_id, default=None, help="only this row of meter_outbox")
    commands.add_parser("usage", help="print this key's windows in one line (CODEPLAN_API_KEY, CODEPLAN_BASE_URL)")
    commands.add_parser("statusline", help="Claude Code's status line: reads its JSON on stdin, prints one line")

    sim = commands.add_parser("simulate", help="run the GLM-4.6 simulator alone")
    sim.add_argument("--host", default="127.0.0.1")
    sim.add_argument("--port", type=int, default=8090)
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument("--ttft-ms", type=float, default=0.0)
    sim.add_argument("--tps", type=float, default=0.0, help="tokens per second; 0 is unpaced")
    sim.add_argument("--tokens", type=int, default=48, help="completion tokens per answer")
    sim.add_argument("--usage-mode", default="always",
                     choices=["always", "when_asked", "never", "reject_field"],
                     help="stream usage: always (GLM), when_asked (OpenAI-style servers), never, "
                          "reject_field (a 400 naming stream_options)")
    sim.add_argument("--fault", default="", help="a fault for every request, e.g. 1302 or 500 "
                     "(a request's own [[sim fault=...]] wins)")
    return parser



def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _terminate)
    # until a server's loop answers it (service/stacks.py), a stack dump asked for too early is
    # ignored, not the default's death
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    args = _parser().parse_args(argv)
    if args.command == "rollup" and not ROLLUP_MIN_DAYS <= args.older_than_days <= ROLLUP_MAX_DAYS:
        print(f"codeplan: rollup: --older-than-days must be from {ROLLUP_MIN_DAYS} to {ROLLUP_MAX_DAYS}"
              f" (got {args.older_than_days}): rows of the last 7 days and 5 hours may belong to a 5-hour"
              " or weekly window still open, whose token counts are read from them", file=sys.stderr)
        return 2
    # client-side commands: no server configuration, no database, just the HTTP API
    if args.command in ("usage", "statusline"):
        from . import statusline

        return statusline.usage_main() if args.command == "usage" else statusline.statusline_main()
    if args.command == "stripe" and args.action == "outbox":
        # answered here: service/commands.py's `stripe` is `stripe sync`
        return _stripe_outbox_retry(args)
    from .commands import run

    return run(args)


if __name__ == "__main__":
    sys.exit(main())
