"""`codeplan run --workers N`: N processes serving one port on one host.

The supervisor binds the port, migrates, starts the simulator when there is no upstream, and
starts N workers (`codeplan worker`), each inheriting the listening socket and serving it with
its own event loop, pool and bridge. What they share of the business lives in PostgreSQL:
allowances are exact because the ledger is (one transaction per transition), a per-key upstream
cap holds because its slots are leases there, and the workers' ledger ticks take turns through
an advisory lock there, on a key this supervisor picks (service/tick_baton.py). Prometheus
samples are shared through prometheus_client's multi-process files, so any worker's /metrics
reports them all.

On SIGTERM (or SIGINT) the supervisor passes SIGTERM to every worker, which finish their
streams (CODEPLAN_SHUTDOWN_TIMEOUT), settle and exit 0; then it exits 0. A worker that dies
otherwise is started again after a second. SIGUSR1 (service/stacks.py) is passed on to every
worker that catches it (one still starting would die of it), after the supervisor's own stacks.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import shutil
import signal
import socket
import sys
import tempfile

from . import stacks
from .config import Config

log = logging.getLogger("codeplan.workers")


async def supervise(config: Config, database_url: str, sock: socket.socket, simulator_url: str,
                    count: int) -> None:
    metrics_dir = tempfile.mkdtemp(prefix="codeplan-metrics-")
    env = {**os.environ, "CODEPLAN_DATABASE_URL": database_url, "PROMETHEUS_MULTIPROC_DIR": metrics_dir}
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    fd = sock.fileno()
    # this run's own key for its workers' tick baton: the workers of another run (another host
    # on the same database) take turns among themselves, not with these
    baton = secrets.randbits(31)
    args = [sys.executable, "-m", "service.cli", "worker", "--fd", str(fd), "--simulator-url", simulator_url,
            "--tick-baton", str(baton)]

    async def start() -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(*args, env=env, pass_fds=(fd,))

    running: dict[int, asyncio.subprocess.Process] = {}

    async def keep(index: int) -> None:
        from prometheus_client import multiprocess

        while True:
            process = running[index] = await start()
            log.info("worker started", extra={"worker": index, "pid": process.pid})
            code = await process.wait()
            # its live gauges (open streams, pool) leave the sums
            multiprocess.mark_process_dead(process.pid, metrics_dir)
            if stopping.is_set():
                return
            log.error("worker exited; starting another", extra={"worker": index, "code": code})
            await asyncio.sleep(1.0)
            if stopping.is_set():  # the stop came during the pause: no worker it would not reach
                return

    def pass_on_dump() -> None:  # SIGUSR1 (service/stacks.py): the workers' stacks too
        for process in running.values():
            # not to one still starting: until it catches the signal, its default action ends it
            if process.returncode is None and stacks.catches(process.pid):
                with contextlib.suppress(ProcessLookupError):  # (it ended meanwhile)
                    process.send_signal(signal.SIGUSR1)
    stacks.also.append(pass_on_dump)
    keepers = [asyncio.create_task(keep(i)) for i in range(count)]
    try:
        await stopping.wait()
        log.info("stopping workers")
        # the workers own the socket now; ours must not hold connections in its queue
        sock.close()
        for process in running.values():
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
        # after its drain a worker settles what is left (15 s at most), stops the live hub and
        # housekeeping (8 s) and closes its pool (6 s) whatever the database does: 29 s, plus
        # room for a loaded host, before the supervisor stops waiting for it
        await asyncio.wait(keepers, timeout=config.shutdown_timeout + config.worker_stop_grace)
        # one still running is hung (a blocked loop, a stopped process): killed, not left behind
        # as an orphan holding the listening socket while the supervisor reports a clean stop
        hung = [p for p in running.values() if p.returncode is None]
        for process in hung:
            log.error("worker did not stop in time; killed", extra={"pid": process.pid})
            with contextlib.suppress(ProcessLookupError):
                process.kill()
        if hung:
            await asyncio.wait([asyncio.ensure_future(p.wait()) for p in hung], timeout=10)
    finally:
        stacks.also.remove(pass_on_dump)
        for task in keepers:
            task.cancel()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        shutil.rmtree(metrics_dir, ignore_errors=True)
    if hung:
        raise SystemExit(1)  # its open requests were not settled by it: the sweeper's now

