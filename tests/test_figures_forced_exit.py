"""A forced exit (SIGTERM, then SIGINT: a second Ctrl-C, an impatient supervisor) cuts the open
streams at once and still settles them before the process exits; a third SIGINT ends a shutdown
that hangs (service/commands.py `_server_class`). Real server processes."""
from __future__ import annotations

import signal
import time

from .conftest import TcpProxy, new_user, pg_socket, query, run, start_bridge, stream_started

SLOW = "[[sim tps=5 tokens=200 reasoning=0]]"  # a 40-second answer


def test_a_forced_exit_cuts_the_open_streams_and_settles_them(fresh_database, simulator):
    """Was: uvicorn's forced exit skips the app's lifespan shutdown, where the open streams are
    ended and settled: their ledger rows were left pending, the allowance held until the sweeper
    and the tokens delivered since the last heartbeat never billed."""
    server = start_bridge(fresh_database, simulator.url + "/api/coding/paas/v4", CODEPLAN_DRAIN_TIMEOUT="60",
                          CODEPLAN_SHUTDOWN_TIMEOUT="60")
    try:
        key = new_user(fresh_database)
        reader, received = stream_started(server, key, SLOW)
        time.sleep(2)
        assert server.process is not None
        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        started = time.monotonic()
        server.process.send_signal(signal.SIGINT)
        assert server.process.wait(30) == 0
        assert time.monotonic() - started < 15  # cut at once, not after the 60-second deadline
        reader.join(10)
        delivered = sum(1 for line in received if '"content"' in line)
        [row] = run(query(fresh_database, "SELECT state, estimated, completion_tokens FROM usage_ledger"))
        # settled before the exit, at what was delivered (one token a chunk here)
        assert (row["state"], row["estimated"]) == ("posted", True), dict(row)
        assert row["completion_tokens"] >= delivered > 0, (dict(row), delivered)
        assert "forced exit: open streams are cut now and settled" in server.output()
    finally:
        server.stop()


def test_a_third_sigint_ends_a_shutdown_that_hangs(fresh_database, simulator):
    """The settling after a forced exit waits for the database (here one that stopped answering):
    a third SIGINT ends the process at once, as the default action of the signal, whatever its
    loop is doing."""
    proxy = TcpProxy(pg_socket(fresh_database))
    server = start_bridge(proxy.url(fresh_database), simulator.url + "/api/coding/paas/v4",
                          CODEPLAN_DRAIN_TIMEOUT="60", CODEPLAN_SHUTDOWN_TIMEOUT="60")
    try:
        key = new_user(fresh_database)
        stream_started(server, key, SLOW)
        assert server.process is not None
        proxy.freeze()
        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        server.process.send_signal(signal.SIGINT)
        time.sleep(2)
        assert server.process.poll() is None  # settling, against a database that does not answer
        started = time.monotonic()
        server.process.send_signal(signal.SIGINT)
        assert server.process.wait(5) == -signal.SIGINT
        assert time.monotonic() - started < 3
    finally:
        server.kill()
        proxy.close()
