"""Paired, interleaved CPU per request of two (or more) checkouts of the bridge, on a shared,
noisy machine: `python -m bench.paired before=/path/to/checkout after=.`

One embedded PostgreSQL, one upstream (`bench.instant`, on the load core), one bridge per
checkout (each on the server core, idle while another is measured). Each round runs wrk (c=32,
one key, non-streaming) against every bridge in turn, the order alternating, and prints each
bridge's CPU ms per request (utime+stime from /proc over the round's requests) and PostgreSQL's. Compare
the pairs, round by round: a busy neighbour inflates both of a round's figures.
A checkout for "before": `git archive <commit> | tar -x -C /tmp/before`. One checkout under two
environments: `python -m bench.paired pymalloc=. "malloc=.;PYTHONMALLOC=malloc"`.
Env: ROUNDS (5), SECONDS (5), CONNS (32), PROFILE=<label> (py-spy raw on that bridge, 10 s,
after the rounds; PROFILE_OUT names the file).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .__main__ import (BODY, LOAD_CPU, SERVER_CPU, Process, base_env, cpu_seconds, free_port, pg_cpu_seconds,
                       raise_fd_limit, server_env, start_database, upstream, wrk)

PY = sys.executable


def main():
    # label=path, or label=path;NAME=value;... for a bridge with its own environment
    bridges: dict[str, str] = {}
    extra_env: dict[str, dict[str, str]] = {}
    for arg in sys.argv[1:]:
        label, spec = arg.split("=", 1)
        path, *settings = spec.split(";")
        bridges[label] = str(Path(path).resolve())
        extra_env[label] = dict(setting.split("=", 1) for setting in settings)
    rounds, seconds = int(os.environ.get("ROUNDS", "5")), int(os.environ.get("SECONDS", "5"))
    conns = int(os.environ.get("CONNS", "32"))
    raise_fd_limit()
    os.sched_setaffinity(0, {LOAD_CPU})
    work = Path(tempfile.mkdtemp(prefix="codeplan-paired-"))
    url, pgdata, (key,) = start_database(work, 1)
    env = base_env()
    sim_port = free_port()
    procs = []
    try:
        procs.append(upstream(env, LOAD_CPU, sim_port))
        ports = {}
        for label, cwd in bridges.items():
            port = free_port()
            p = Process([PY, "-m", "service.cli", "run"], {**server_env(env, url, port, sim_port), **extra_env[label]},
                        SERVER_CPU, port, "/healthz", Path(cwd))
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
                      f"p50 {d['p50_us']/1000:.1f} ms  p99 {d['p99_us']/1000:.1f} ms  err {d['errors']}", flush=True)
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
            p.stop()


if __name__ == "__main__":
    main()
