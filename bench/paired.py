"""Paired, interleaved CPU per request of two (or more) checkouts of the bridge, on a shared,
noisy machine: `python -m bench.paired before=/path/to/checkout after=.`

One embedded PostgreSQL, one simulator (on the load core), one bridge per checkout (each on the
server core, idle while another is measured). Each round runs wrk (c=32, one key,
non-streaming) against every bridge in turn, the order alternating, and prints each bridge's
CPU ms per request (utime+stime from /proc over the round's requests) and PostgreSQL's. Compare
the pairs, round by round: a busy neighbour inflates both of a round's figures.
A checkout for "before": `git archive <commit> | tar -x -C /tmp/before`.
Env: ROUNDS (5), SECONDS (5), CONNS (32), PROFILE=<label> (py-spy raw on that bridge, 10 s,
after the rounds; PROFILE_OUT names the file).
"""
from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import urllib.error
import urllib.request

import asyncpg

from service import accounts, db, pgembed

from .__main__ import (BODY, LOAD_CPU, ROOT, SERVER_CPU, cpu_seconds, free_port, pg_cpu_seconds,
                       raise_fd_limit, wrk)

PY = sys.executable


def start(args, env, cpu, port, ready, cwd):
    log = tempfile.NamedTemporaryFile("w", prefix="codeplan-paired-", suffix=".log", delete=False)
    proc = subprocess.Popen(["taskset", "-c", str(cpu)] + args, env=env, cwd=cwd, stdout=log,
                            stderr=subprocess.STDOUT, preexec_fn=raise_fd_limit)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}{ready}", timeout=1)
            return proc
        except urllib.error.HTTPError:
            return proc
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(Path(log.name).read_text()[-2000:])
            time.sleep(0.1)
    raise RuntimeError("not ready")


def main():
    bridges = {label: str(Path(path).resolve()) for label, path in (a.split("=", 1) for a in sys.argv[1:])}
    rounds, seconds = int(os.environ.get("ROUNDS", "5")), int(os.environ.get("SECONDS", "5"))
    conns = int(os.environ.get("CONNS", "32"))
    raise_fd_limit()
    os.sched_setaffinity(0, {LOAD_CPU})
    work = Path(tempfile.mkdtemp(prefix="codeplan-paired-"))
    pg = pgembed.start(work, delete_on_exit=True)
    pgdata = work / "pgdata"
    base, _, query = pg.partition("?")
    url = base.rsplit("/", 1)[0] + "/bench" + ("?" + query if query else "")

    async def prepare():
        conn = await asyncpg.connect(pg)
        await conn.execute("DROP DATABASE IF EXISTS bench")
        await conn.execute("CREATE DATABASE bench")
        await conn.close()
        await db.migrate(url)
        conn = await asyncpg.connect(url)
        try:
            await conn.execute(
                "INSERT INTO plans (id, name, window_tokens, weekly_tokens, monthly_price_cents, models)"
                " VALUES ('bench', 'Bench', 1e15, 1e16, 0, ARRAY['glm-4.6'])")
            user = await accounts.create_user(conn, "bench0@example.com", "bench")
            return user.key
        finally:
            await conn.close()
    key = asyncio.run(prepare())
    env = {k: v for k, v in os.environ.items() if not k.startswith("CODEPLAN_")}
    env.update(CODEPLAN_LOG_LEVEL="warning", PYTHONUNBUFFERED="1")
    sim_port = free_port()
    procs = []
    try:
        sim = start([PY, "-m", "service.cli", "simulate", "--port", str(sim_port)], env, LOAD_CPU, sim_port, "/",
                    ROOT)
        procs.append(sim)
        ports = {}
        for label, cwd in bridges.items():
            port = free_port()
            p = start([PY, "-m", "service.cli", "run"], {
                **env, "CODEPLAN_DATABASE_URL": url, "CODEPLAN_PORT": str(port),
                "CODEPLAN_UPSTREAM_URL": f"http://127.0.0.1:{sim_port}/api/coding/paas/v4",
                "CODEPLAN_UPSTREAM_KEYS": "bench"}, SERVER_CPU, port, "/healthz", cwd)
            procs.append(p)
            ports[label] = (port, p)
            wrk(port, "/v1/chat/completions", key, BODY, 16, 2)  # warm-up
        results = {label: [] for label in bridges}
        labels = list(bridges)
        for r in range(rounds):
            order = labels if r % 2 == 0 else labels[::-1]
            for label in order:
                port, p = ports[label]
                c0, pg0 = cpu_seconds(p.pid), pg_cpu_seconds(pgdata)
                d = wrk(port, "/v1/chat/completions", key, BODY, conns, seconds)
                n = max(1, d["requests"])
                b = 1000 * (cpu_seconds(p.pid) - c0) / n
                g = 1000 * (pg_cpu_seconds(pgdata) - pg0) / n
                results[label].append((b, g, d["rps"], d["errors"]))
                print(f"round {r} {label:>8}: bridge {b:.3f} ms/req  pg {g:.3f}  rps {d['rps']:.0f}  "
                      f"p50 {d['p50_us']/1000:.1f} ms  err {d['errors']}", flush=True)
        print("\nmedian bridge ms/req, pg ms/req, rps:")
        for label, rows in results.items():
            rows_b = sorted(x[0] for x in rows)
            rows_g = sorted(x[1] for x in rows)
            rows_r = sorted(x[2] for x in rows)
            m = len(rows) // 2
            print(f"{label:>8}: bridge {rows_b[m]:.3f} (min {rows_b[0]:.3f})  pg {rows_g[m]:.3f}  rps {rows_r[m]:.0f}")
        if len(labels) == 2:
            first, second = labels
            ratios = sorted(b[0] / a[0] for a, b in zip(results[first], results[second]))
            print(f"{second} / {first}, bridge CPU per request, round by round: median "
                  f"{ratios[len(ratios) // 2]:.3f} (from {ratios[0]:.3f} to {ratios[-1]:.3f})")
        prof = os.environ.get("PROFILE")
        if prof:
            port, p = ports[prof]
            out = os.environ.get("PROFILE_OUT") or str(work / "profile.raw")
            spy = subprocess.Popen([shutil.which("py-spy") or str(Path(PY).parent / "py-spy"), "record", "-p", str(p.pid), "-d", "10",
                                    "-r", "250", "-f", "raw", "-o", out, "--nonblocking"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(0.5)
            wrk(port, "/v1/chat/completions", key, BODY, conns, 11)
            spy.wait(60)
            print("profile:", out)
    finally:
        for p in procs:
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


if __name__ == "__main__":
    main()
