"""Real things only: one embedded PostgreSQL per session (a fresh database per module, cloned
from a migrated template), the GLM simulator and the bridge as real servers on 127.0.0.1."""
from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import asyncpg
import httpx
import pytest

from service import accounts, db, pgembed

from .log_scan import scan, secrets_in_env

ROOT = Path(__file__).resolve().parent.parent
CODEPLAN = [sys.executable, "-m", "service.cli"]
TEMPLATE = "codeplan_template"
# Every server this run starts logs here (the run's own folder, never shared with another run),
# so that the session's end can scan all of them for secrets (pytest_sessionfinish below). CODEPLAN_TEST_LOG_DIR keeps
# them somewhere chosen (CI's artifacts).
LOG_DIR = Path(os.environ.get("CODEPLAN_TEST_LOG_DIR") or tempfile.mkdtemp(prefix="codeplan-test-logs-"))
LOG_DIR.mkdir(parents=True, exist_ok=True)
# secret value -> what it is: every secret handed to a server this run, which no log may hold
KNOWN_SECRETS: dict[str, str] = {}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def with_database(url: str, name: str) -> str:
    base, _, query = url.partition("?")
    return base.rsplit("/", 1)[0] + "/" + name + ("?" + query if query else "")


def run(coro):
    """Run a coroutine to completion, also from inside an async test (on a helper thread)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


async def query(url: str, sql: str, *args):
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetch(sql, *args)
    finally:
        await conn.close()


async def database_before(pg_url: str, tmp_path: Path, migration: str) -> str:
    """A new database migrated up to, not including, `migration` (e.g. "0050"): the state an
    upgrade by that migration starts from."""
    import shutil

    name = "t_" + uuid.uuid4().hex[:12]
    await query(pg_url, f"CREATE DATABASE {name}")
    url = with_database(pg_url, name)
    before = tmp_path / f"migrations_before_{migration}"
    before.mkdir()
    for path in db.migration_files():
        if path.name < migration:
            shutil.copy(path, before / path.name)
    await db.migrate(url, before)
    return url


def wait_settled(database: str, timeout: float = 15.0) -> None:
    """Settlement follows the response by a moment: wait until nothing is pending."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if run(query(database, "SELECT count(*) AS n FROM usage_ledger WHERE state = 'pending'"))[0]["n"] == 0:
            return
        time.sleep(0.02)
    raise AssertionError(f"ledger entries still pending after {timeout}s")


def settled_query(database: str, sql: str, *args):
    wait_settled(database)
    return run(query(database, sql, *args))


def wait_http(url: str, timeout: float = 30.0, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status < 500:
                    return
        except OSError as exc:
            if getattr(exc, "code", None) and exc.code < 500:  # an HTTPError answer: it is up
                return
        time.sleep(0.05)
    raise RuntimeError(f"{url} not ready after {timeout}s")


PG_FOLDER: list[Path] = []


def pg_log() -> Path:
    """The embedded PostgreSQL's server log (deadlocks, lock timeouts are reported there)."""
    return PG_FOLDER[0] / "pgdata" / "log"


def pg_socket(url: str) -> str:
    """The unix socket of a database URL of the embedded server."""
    host = url.partition("host=")[2].partition("&")[0]
    [socket_path] = [p for p in Path(host).glob(".s.PGSQL.*") if not p.name.endswith(".lock")]
    return str(socket_path)


@pytest.fixture(scope="session")
def pg_url():
    folder = tempfile.mkdtemp(prefix="codeplan-test-pg-")
    PG_FOLDER.append(Path(folder))
    url = pgembed.start(folder, delete_on_exit=True)

    async def prepare():
        conn = await asyncpg.connect(url)
        try:
            # the tests create and drop many databases; durability is not what they test
            await conn.execute("ALTER SYSTEM SET fsync = off")
            await conn.execute("ALTER SYSTEM SET synchronous_commit = off")
            await conn.execute("ALTER SYSTEM SET max_connections = 300")
            await conn.execute("SELECT pg_reload_conf()")
            await conn.execute(f"DROP DATABASE IF EXISTS {TEMPLATE}")
            await conn.execute(f"CREATE DATABASE {TEMPLATE}")
        finally:
            await conn.close()
        await db.migrate(with_database(url, TEMPLATE))
    run(prepare())
    return url


def _fresh_database(pg_url: str) -> str:
    name = "t_" + uuid.uuid4().hex[:12]
    run(query(pg_url, f"CREATE DATABASE {name} TEMPLATE {TEMPLATE}"))
    return with_database(pg_url, name)


@pytest.fixture(scope="module")
def database(pg_url) -> str:
    return _fresh_database(pg_url)


@pytest.fixture
def fresh_database(pg_url) -> str:
    return _fresh_database(pg_url)


class Server:
    def __init__(self, args: list[str], env: dict[str, str], port: int, ready_path: str) -> None:
        self.args, self.env, self.port, self.ready_path = args, env, port, ready_path
        self.process: subprocess.Popen | None = None
        kind = (args[len(CODEPLAN)] if args[:len(CODEPLAN)] == CODEPLAN and len(args) > len(CODEPLAN)
                else args[2].rpartition(".")[2] if args[1:2] == ["-m"] else "server")
        KNOWN_SECRETS.update(secrets_in_env(env))
        self.log = tempfile.NamedTemporaryFile(prefix=f"{kind}-", suffix=".log", dir=LOG_DIR, delete=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "Server":
        self.process = subprocess.Popen(self.args, env=self.env, cwd=ROOT, stdout=self.log,
                                        stderr=subprocess.STDOUT)
        wait_http(self.url + self.ready_path, process=self.process)
        return self

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                # a server that does not stop is stuck somewhere: its stacks go to the test's
                # output (shown when it fails) before it is killed
                try:
                    print(f"{Path(self.log.name).name} did not stop on SIGTERM in 10 s; its stacks:\n"
                          f"{self.stacks()}", file=sys.stderr)
                finally:
                    self.kill()

    def output(self) -> str:
        return Path(self.log.name).read_text()

    def stacks(self, wait: float = 3.0) -> str:
        """What the server is doing now (service/stacks.py, SIGUSR1): its threads' stacks, and
        its asyncio tasks' once its event loop is free (at most `wait` seconds)."""
        if self.process is None or self.process.poll() is not None:
            return "(not running)"
        start = Path(self.log.name).stat().st_size
        self.process.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + wait
        text = ""
        while time.monotonic() < deadline:
            time.sleep(0.1)
            with open(self.log.name, "rb") as log:
                log.seek(start)
                text = log.read().decode(errors="replace")
            listed = [entry["msg"] for entry in stack_lines(text)]
            heads = [entry for entry in stack_lines(text) if entry["msg"] == "http connections"]
            # the tasks' lines, then the connections' (service/stacks.py): all of them are in
            if heads and listed.count("http connection") >= heads[0]["count"]:
                return text
        return text + f"\n(no task list in {wait} s: its event loop is held)"


def stack_lines(text: str) -> list[dict]:
    """The JSON lines of service/stacks.py in a server's log text, whole lines only. (The
    threads' dump is written in small pieces: another process's line in the same log may follow
    a piece of it on one line.)"""
    found = []
    for line in text.split("\n")[:-1]:
        start = line.find('{"ts":')
        if start >= 0 and '"logger":"codeplan.stacks"' in line:
            found.append(json.loads(line[start:]))
    return found


def hang_report(servers: list[Server]) -> str:
    """For a request that hung: every server's stacks, and this test process's own tasks (the
    client side), as text."""
    from service.stacks import await_chain

    parts = [f"== {Path(s.log.name).name} (port {s.port})\n{s.stacks()}" for s in servers]
    try:
        tasks = asyncio.all_tasks()
    except RuntimeError:  # called outside an event loop
        tasks = set()
    parts.append("== this test process's tasks\n" + "\n".join(
        f"{t.get_name()}: {' > '.join(chain)} awaiting {awaits}"
        for t in tasks for chain, awaits in [await_chain(t)]))
    return "\n".join(parts)


def client_pools(clients: list) -> str:
    """The connection pools of `openai` clients (httpx2 under them), as text: each pool's
    requests and connections, and each connection's state, for a request that hung."""
    lines = []
    for number, client in enumerate(clients):
        pool = client._client._transport._pool
        lines.append(f"== client {number}: {pool!r}")
        lines += [f"   {connection.info()}" for connection in pool.connections]
    return "\n".join(lines)


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CODEPLAN_", "STRIPE_"))}
    env.update(CODEPLAN_LOG_LEVEL="warning", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


@pytest.fixture(scope="session")
def simulator():
    port = free_port()
    server = Server(CODEPLAN + ["simulate", "--port", str(port)], base_env(), port, "/")
    server.start()
    yield server
    server.stop()


def start_bridge(database: str, upstream: str, **env: str) -> Server:
    port = free_port()
    env.setdefault("CODEPLAN_UPSTREAM_KEYS", "sim-key-1,sim-key-2")
    server = Server(CODEPLAN + ["run"], base_env(
        CODEPLAN_DATABASE_URL=database, CODEPLAN_PORT=str(port), CODEPLAN_UPSTREAM_URL=upstream, **env),
        port, "/healthz")
    return server.start()


def stream_started(server: Server, key: str, content: str) -> tuple[threading.Thread, list[str]]:
    """A chat stream read line by line on a thread of its own (a server cut mid-stream ends it
    quietly), once its first content has arrived: the thread and the lines so far, and to come."""
    received: list[str] = []

    def read() -> None:
        try:
            with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=60,
                              headers={"authorization": f"Bearer {key}"},
                              json={"model": "glm-4.6", "stream": True,
                                    "messages": [{"role": "user", "content": content}]}) as response:
                for line in response.iter_lines():
                    received.append(line)
        except httpx.HTTPError:
            pass
    reader = threading.Thread(target=read)
    reader.start()
    deadline = time.monotonic() + 10
    while not any('"content"' in line for line in received):
        assert time.monotonic() < deadline, received
        time.sleep(0.05)
    return reader, received


def start_workers(database: str, upstream: str, count: int, **env: str) -> Server:
    """`codeplan run --workers count`, ready once a worker answers /readyz."""
    port = free_port()
    return Server(CODEPLAN + ["run", "--workers", str(count)], base_env(
        CODEPLAN_DATABASE_URL=database, CODEPLAN_PORT=str(port), CODEPLAN_UPSTREAM_URL=upstream,
        CODEPLAN_UPSTREAM_KEYS="w-key", **env), port, "/readyz").start()


def children(pid: int) -> list[int]:
    """The processes `pid` started, still running or not yet reaped (Linux: /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


@pytest.fixture(scope="module")
def bridge(database, simulator):
    server = start_bridge(database, simulator.url + "/api/coding/paas/v4")
    yield server
    server.stop()


def new_user(database: str, plan: str = "pro") -> str:
    async def create():
        conn = await asyncpg.connect(database)
        try:
            return (await accounts.create_user(conn, f"{uuid.uuid4().hex[:10]}@example.com", plan)).key
        finally:
            await conn.close()
    return run(create())


def new_plan(database: str, window: int, weekly: int | None = None, **columns) -> str:
    plan = "p_" + uuid.uuid4().hex[:8]
    extra = {"max_concurrent": None, "cached_weight": 0.2, **columns}
    run(query(database,
              "INSERT INTO plans (id, name, window_tokens, weekly_tokens, max_concurrent, cached_weight,"
              " monthly_price_cents, models) VALUES ($1, $1, $2, $3, $4, $5, 0,"
              " ARRAY['glm-4.6', 'glm-4.5', 'glm-4.5-air'])",
              plan, window, weekly or window * 5, extra["max_concurrent"], extra["cached_weight"]))
    return plan


@pytest.fixture
def key(database) -> str:
    return new_user(database)


class TcpProxy:
    """A TCP proxy in front of the embedded PostgreSQL's unix socket, on its own thread and loop,
    that can be cut: while cut, open connections are closed and new ones refused. A database that
    vanishes and comes back, for real, without disturbing the other tests' server. Or frozen:
    connections stay open (new ones are accepted) and no byte passes either way until thawed, a
    server that never answers. `close()` ends it (its connections, its thread)."""

    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path
        self.port = free_port()
        self._cut_until = 0.0
        self._writers: set[asyncio.StreamWriter] = set()
        self._flowing = asyncio.Event()  # bound to the proxy's loop when first waited on
        self._flowing.set()
        self._loop = asyncio.new_event_loop()
        self._serving: asyncio.Task | None = None
        self._ready = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self._ready.result(10)

    def url(self, database_url: str) -> str:
        name = database_url.partition("?")[0].rsplit("/", 1)[1]
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def serve() -> None:
            server = await asyncio.start_server(self._client, "127.0.0.1", self.port)
            self._ready.set_result(None)
            async with server:
                await server.serve_forever()
        self._serving = self._loop.create_task(serve())
        try:
            self._loop.run_until_complete(self._serving)
        except asyncio.CancelledError:
            pass
        finally:
            # connections still being made (a frozen proxy's, let go by `close`) are ended on
            # this loop, as asyncio.run ends its leftovers: destroyed after it closed, each
            # raised "Event loop is closed" from a finaliser (pytest's unraisable warning)
            leftovers = asyncio.all_tasks(self._loop)
            for task in leftovers:
                task.cancel()
            self._loop.run_until_complete(asyncio.gather(*leftovers, return_exceptions=True))
            self._loop.close()

    def _cut(self) -> bool:
        return time.monotonic() < self._cut_until

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)  # so that a cut while frozen drops it too
        up_writer = None
        try:
            if not self._cut():
                await self._flowing.wait()
            if not self._cut():
                up_reader, up_writer = await asyncio.open_unix_connection(self.socket_path)
        except OSError:
            pass
        if up_writer is None:
            self._writers.discard(writer)
            writer.close()
            return
        self._writers.add(up_writer)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    await self._flowing.wait()
                    dst.write(data)
                    await dst.drain()
            except (OSError, asyncio.CancelledError):
                pass
            finally:
                dst.close()
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._writers.difference_update((writer, up_writer))

    def freeze(self) -> None:
        """From now on no byte passes, and no new connection reaches the server, until `thaw`."""
        self._call(self._flowing.clear)

    def thaw(self) -> None:
        self._call(self._flowing.set)

    def _call(self, action) -> None:
        """`action` on the proxy's loop, done (or its exception raised here) when this returns."""
        done = concurrent.futures.Future()

        def run() -> None:
            try:
                action()
            except BaseException as exc:  # noqa: BLE001 - handed to the test's thread
                done.set_exception(exc)
            else:
                done.set_result(None)
        self._loop.call_soon_threadsafe(run)
        done.result(5)

    def cut(self, seconds: float) -> None:
        """Drop every open connection now and refuse new ones for `seconds`."""
        def drop() -> None:
            self._cut_until = time.monotonic() + seconds
            for writer in list(self._writers):
                writer.transport.abort()
        self._call(drop)

    def close(self) -> None:
        """Every connection dropped, the listener closed, the thread ended."""
        if not self._thread.is_alive():
            return

        def stop() -> None:
            self._flowing.set()
            for writer in list(self._writers):
                writer.transport.abort()
            assert self._serving is not None
            self._serving.cancel()
        self._call(stop)
        self._thread.join(10)


def pytest_sessionfinish(session, exitstatus):
    """Fail the run if any server log it produced holds a secret, naming the file and the kind."""
    try:
        from .web_support import PASSWORD
        KNOWN_SECRETS[PASSWORD] = "a test account's password"
    except ImportError:
        pass
    paths = sorted(LOG_DIR.glob("*.log")) + ([pg_log()] if PG_FOLDER else [])
    findings = scan(paths, KNOWN_SECRETS)
    if not findings:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    lines = [f"{len(findings)} secret(s) in the server logs of this run:"] + [f"  {f}" for f in findings[:50]]
    if reporter:
        reporter.ensure_newline()
        reporter.write_sep("=", "log scan", red=True, bold=True)
        for line in lines:
            reporter.write_line(line)
    else:
        print("\n".join(lines))
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
