"""The `codeplan` command: its arguments, and who answers each.

`usage` and `statusline` are a client's commands: Claude Code runs its status line after every
update, so they are answered by service/statusline.py (standard library only) before anything
of the server is imported: ~0.1 s a call where importing the server first took ~0.7 s. Every
other command is service/commands.py's.
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
    from .commands import run

    return run(args)


if __name__ == "__main__":
    sys.exit(main())
