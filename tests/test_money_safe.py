"""The money-safe core, end to end with real processes: no window passes its allowance at the
edge whatever the text, every exit path gives the upstream key's slot back, settlement survives
the database going away, any OpenAI-style upstream is metered, no deadlocks under load, and an
access line for every request."""
from __future__ import annotations

import asyncio
import base64
import json
import random
import subprocess
import threading
import time
import uuid

import anthropic
import asyncpg
import httpx
import openai
import pytest

from .conftest import (CODEPLAN, Server, TcpProxy, base_env, free_port, new_plan, new_user, pg_log,
                       pg_socket, query, run, settled_query, start_bridge, wait_settled)


def _say(directive: str, text: str = "") -> list[dict]:
    return [{"role": "user", "content": f"[[sim {directive}]] {text} {uuid.uuid4().hex[:8]}"}]


def _rows(database: str, key: str):
    return run(query(database, "SELECT l.* FROM usage_ledger l JOIN api_keys k ON k.id = l.api_key_id"
                               " WHERE k.prefix = $1 ORDER BY l.created_at", key[:10]))


# ---- zero overshoot at the allowance's edge ----------------------------------------------------

def _hostile_texts(rng: random.Random) -> dict[str, str]:
    cjk = "".join(chr(rng.randint(0x4E00, 0x9FFF)) for _ in range(3000))
    emoji = "".join(chr(rng.randint(0x1F300, 0x1F64F)) for _ in range(800))
    b64 = base64.b64encode(rng.randbytes(4500)).decode()
    code = ";".join(f"var a{i}=function(b){{return b*{i}+{rng.randint(0, 9)}}}" for i in range(250))
    mixed = "ผลการทดสอบ résumé naïve Ελληνικά " * 60
    return {"cjk": cjk, "emoji": emoji, "base64": b64, "code": code, "mixed": mixed}


async def test_no_window_passes_its_allowance_at_the_edge_whatever_the_text(bridge, database):
    allowance = 250_000
    key = new_user(database, new_plan(database, window=allowance, weekly=allowance * 10))
    rng = random.Random(7)
    texts = _hostile_texts(rng)
    violations: list[tuple] = []
    watching, loading, done = threading.Event(), threading.Event(), threading.Event()
    polls_under_load = 0

    def watch() -> None:
        """Polls the windows on its own thread and loop, so the clients' load cannot starve it;
        as often as it can, since how long the load lasts depends on the machine."""
        async def poll() -> None:
            nonlocal polls_under_load
            conn = await asyncpg.connect(database)
            try:
                while True:
                    under_load = loading.is_set()
                    rows = await conn.fetch(
                        "SELECT w.kind, w.allowance, w.reserved, w.held, w.posted FROM quota_windows w"
                        " JOIN api_keys k ON k.prefix = $1 JOIN subscriptions s ON s.account_id = k.account_id"
                        " AND s.id = w.subscription_id", key[:10])
                    polls_under_load += under_load and bool(rows)  # no window yet proves nothing
                    for row in rows:
                        if (row["posted"] + row["reserved"] > row["allowance"]
                                or row["posted"] + row["held"] > row["allowance"]):
                            violations.append(tuple(row.values()))
                    watching.set()
                    if done.is_set():
                        return
                    await asyncio.sleep(0.001)
            finally:
                watching.set()
                await conn.close()
        asyncio.run(poll())

    limits = [-1000, 0, 1, 1, 1, 16, 200, 10**9, None]
    headers = {"authorization": f"Bearer {key}", "anthropic-version": "2023-06-01"}

    async def one(client: httpx.AsyncClient, i: int) -> tuple[str, int, dict | None]:
        kind = list(texts)[i % len(texts)]
        limit = limits[i % len(limits)]
        surface = "chat" if i % 2 else "messages"
        stream = i % 3 == 0
        content = f"[[sim tokens=40 reasoning=8]] {i} " + texts[kind]
        body: dict = {"model": "glm-4.6", "messages": [{"role": "user", "content": content}], "stream": stream}
        if limit is not None:
            body["max_tokens"] = limit
        elif surface == "messages":
            body["max_tokens"] = 10**9  # Anthropic's max_tokens is required: the huge case
        path = "/v1/chat/completions" if surface == "chat" else "/v1/messages"
        response = await client.post(bridge.url + path, json=body, headers=headers)
        if response.status_code != 200:
            return surface, response.status_code, response.json()
        if not stream:
            return surface, 200, response.json()
        return surface, 200, None  # the body was read: the stream ran to its end

    watcher = threading.Thread(target=watch)
    watcher.start()
    await asyncio.to_thread(watching.wait, 30)
    loading.set()
    async with httpx.AsyncClient(timeout=120) as client:
        results = await asyncio.gather(*(one(client, i) for i in range(100)))
    loading.clear()
    await asyncio.to_thread(wait_settled, database)
    done.set()
    watcher.join()

    statuses = [status for _, status, _ in results]
    assert polls_under_load >= 3 and violations == [], (polls_under_load, violations)
    assert statuses.count(200) >= 10, statuses
    assert 429 in statuses, "the edge was never reached: the test proves nothing"
    for surface, status, body in results:
        assert status in (200, 400, 429), (status, body)
        if status == 400:  # max_tokens below 1, in the caller's own shape
            message = body["error"]["message"]
            assert "at least 1" in message
            assert ("type" in body) == (surface == "messages")
    assert statuses.count(400) == sum(1 for i in range(100) if limits[i % len(limits)] in (-1000, 0))
    windows = run(query(database, "SELECT w.* FROM quota_windows w JOIN api_keys k ON k.prefix = $1"
                                  " JOIN subscriptions s ON s.account_id = k.account_id"
                                  " AND s.id = w.subscription_id", key[:10]))
    rows = _rows(database, key)
    for window in windows:
        assert window["posted"] <= window["allowance"]
        assert (window["reserved"], window["held"]) == (0, 0)
        assert window["posted"] == sum(r["billed_tokens"] for r in rows)
    assert all(r["state"] == "posted" and not r["estimated"] for r in rows)
    # the o200k estimate was low for some of these texts: without the proven bound, the
    # reservations alone would not have kept the window whole
    assert any(r["prompt_tokens"] > r["prompt_estimate"] for r in rows)
    assert all(r["prompt_tokens"] + r["completion_tokens"] <= r["held_tokens"] for r in rows)


# ---- the upstream key's slot comes back on every exit path -------------------------------------

@pytest.fixture(scope="module")
def one_slot(database, simulator):
    """A bridge with one upstream key that serves one request at a time: a slot never given
    back would make every later request wait forever."""
    key_name = f"slot-{uuid.uuid4().hex[:6]}"
    server = start_bridge(database, simulator.url + "/api/coding/paas/v4", CODEPLAN_UPSTREAM_KEYS=key_name,
                          CODEPLAN_UPSTREAM_CONCURRENCY="1", CODEPLAN_HEADER_WAIT="0.5")
    yield server, key_name
    server.stop()


def _stream_and_leave(url: str, key: str, directive: str, *, pieces: int, surface: str = "chat") -> None:
    path = "/v1/chat/completions" if surface == "chat" else "/v1/messages"
    marker = '"content"' if surface == "chat" else "text_delta"
    with httpx.stream("POST", url + path, timeout=30, headers={"authorization": f"Bearer {key}"},
                      json={"model": "glm-4.6", "stream": True, "max_tokens": 500,
                            "messages": _say(directive)}) as response:
        assert response.status_code == 200
        seen = 0
        if pieces:
            for line in response.iter_lines():
                if marker in line:
                    seen += 1
                    if seen >= pieces:
                        break
        else:
            time.sleep(0.8)  # headers only: leave while the upstream has not said anything


EXITS = {
    "before the upstream answered": lambda url, key: _stream_and_leave(url, key, "header_delay=2 tokens=4 reasoning=0", pieces=0),
    "after 200, before the first token": lambda url, key: _stream_and_leave(url, key, "ttft=2000 tokens=4 reasoning=0", pieces=0),
    "mid-stream": lambda url, key: _stream_and_leave(url, key, "tps=20 tokens=40 reasoning=0", pieces=5),
    "mid-stream, anthropic": lambda url, key: _stream_and_leave(url, key, "tps=20 tokens=40 reasoning=0", pieces=5, surface="messages"),
    "between the usage and the end of the stream": lambda url, key: _stream_and_leave(url, key, "tail_delay=3 tokens=5 reasoning=0", pieces=5),
    "non-stream, client gives up": lambda url, key: _non_stream(url, key, "ttft=2000 tokens=4 reasoning=0", timeout=0.5),
    "upstream refuses": lambda url, key: _non_stream(url, key, "fault=1113"),
    "upstream dies mid-stream": lambda url, key: _non_stream(url, key, "fault=reset tokens=8 reasoning=0", stream=True),
    "whole answer": lambda url, key: _non_stream(url, key, "tokens=4 reasoning=0", stream=True),
}


def _non_stream(url: str, key: str, directive: str, *, timeout: float = 30, stream: bool = False) -> None:
    try:
        httpx.post(url + "/v1/chat/completions", timeout=timeout, headers={"authorization": f"Bearer {key}"},
                   json={"model": "glm-4.6", "stream": stream, "messages": _say(directive)})
    except httpx.TimeoutException:
        pass


@pytest.mark.parametrize("exit_path", list(EXITS))
def test_every_exit_path_gives_the_upstream_slot_back(one_slot, database, simulator, exit_path):
    server, upstream_key = one_slot
    key = new_user(database)
    EXITS[exit_path](server.url, key)
    # the next request is served: with one slot, a leaked one would keep it waiting forever
    response = httpx.post(server.url + "/v1/chat/completions", timeout=15, headers={"authorization": f"Bearer {key}"},
                          json={"model": "glm-4.6", "messages": _say("tokens=3 reasoning=0")})
    assert response.status_code == 200, response.text
    wait_settled(database)
    deadline = time.monotonic() + 10
    while json.loads(httpx.get(simulator.url + "/_sim/stats").content)["in_flight"].get(upstream_key):
        assert time.monotonic() < deadline, "the upstream still serves a request nobody reads"
        time.sleep(0.1)
    assert {r["state"] for r in _rows(database, key)} <= {"posted", "voided"}


# ---- settlement survives the database going away ----------------------------------------------

def test_settlement_completes_after_the_database_is_unreachable_for_2s(database, simulator):
    proxy = TcpProxy(pg_socket(database))
    server = start_bridge(proxy.url(database), simulator.url + "/api/coding/paas/v4", CODEPLAN_DB_POOL_SIZE="4")
    try:
        key = new_user(database)
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)
        stream = client.chat.completions.create(model="glm-4.6", stream=True,
                                                messages=_say("tps=10 tokens=20 reasoning=0"))
        cut = threading.Timer(1.0, proxy.cut, args=(2.0,))
        cut.start()
        refusal: dict = {}

        def meanwhile() -> None:
            """A new request while the database is away: refused at once, retryably, in the
            protocol's own shape."""
            time.sleep(1.4)
            started = time.monotonic()
            try:
                client.chat.completions.create(model="glm-4.6", messages=_say("tokens=2"))
            except openai.APIStatusError as exc:
                refusal.update(status=exc.status_code, seconds=time.monotonic() - started,
                               retry=exc.response.headers.get("x-should-retry"), body=exc.body)
        other = threading.Thread(target=meanwhile)
        other.start()
        chunks = list(stream)  # the answer goes out whatever the database does
        usage = chunks[-1].usage
        other.join()
        assert refusal["status"] == 503 and refusal["seconds"] < 1.0, refusal
        assert refusal["retry"] == "true" and refusal["body"]["type"] == "server_error"
        cut.join()
        wait_settled(database, timeout=30)
        [row] = [r for r in _rows(database, key) if r["state"] != "voided"]
        # the upstream's own numbers, not an estimate, not an expiry
        assert (row["state"], row["estimated"]) == ("posted", False)
        assert (row["prompt_tokens"], row["completion_tokens"]) == (usage.prompt_tokens, usage.completion_tokens)
        assert "settlement failed; retrying" in server.output()
    finally:
        server.stop()


def test_an_admission_the_database_does_not_answer_is_a_503_in_time_and_voided_later(database, simulator):
    """A database that says nothing (the proxy frozen, not cut: connections stay open, no byte
    passes, the admission's statement held on its way): the client gets a retryable 503 in its
    protocol's shape after CODEPLAN_ADMISSION_TIMEOUT, not a hang as long as its own timeout (a
    key's lookup too); when the statement reaches the database at last and admits the request,
    nobody waits for it, and its entry is voided, not left for the sweeper to bill. (A commit
    whose reply is lost: tests/test_ledger_state_machine.py.)"""
    proxy = TcpProxy(pg_socket(database))
    server = start_bridge(proxy.url(database), simulator.url + "/api/coding/paas/v4",
                          CODEPLAN_DB_POOL_SIZE="4", CODEPLAN_ADMISSION_TIMEOUT="1",
                          CODEPLAN_AUTH_CACHE_TTL="300")
    try:
        key = new_user(database)
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=60)
        client.chat.completions.create(model="glm-4.6", messages=_say("tokens=2"))  # the key is known now
        wait_settled(database)
        proxy.freeze()
        started = time.monotonic()
        with pytest.raises(openai.APIStatusError) as refused:
            client.chat.completions.create(model="glm-4.6", messages=_say("tokens=2"))
        seconds = time.monotonic() - started
        assert refused.value.status_code == 503 and 1.0 <= seconds < 10, seconds
        assert refused.value.response.headers.get("x-should-retry") == "true"
        assert refused.value.body["type"] == "server_error"
        assert [r["state"] for r in _rows(database, key)] == ["posted"]  # the tick is still held
        # a key not looked up yet: its lookup is bounded the same way
        stranger = openai.OpenAI(base_url=server.url + "/v1", api_key=new_user(database), max_retries=0, timeout=60)
        started = time.monotonic()
        with pytest.raises(openai.APIStatusError) as refused:
            stranger.chat.completions.create(model="glm-4.6", messages=_say("tokens=2"))
        seconds = time.monotonic() - started
        assert refused.value.status_code == 503 and 1.0 <= seconds < 10, seconds
        proxy.thaw()
        deadline = time.monotonic() + 30
        while sorted(r["state"] for r in _rows(database, key)) != ["posted", "voided"]:
            assert time.monotonic() < deadline, [dict(r) for r in _rows(database, key)]
            time.sleep(0.1)
        voided = [r for r in _rows(database, key) if r["state"] == "voided"][0]
        assert (voided["billed_tokens"], voided["settle_reason"]) == (0, "admission abandoned")
        assert "admissions overdue; answered 503" in server.output()
        # and the process serves on
        assert client.chat.completions.create(model="glm-4.6", messages=_say("tokens=2")).usage.completion_tokens > 0
    finally:
        server.stop()
        proxy.close()


# ---- any OpenAI-style upstream --------------------------------------------------------------

@pytest.fixture(scope="module")
def strict_simulators():
    """Simulators that report stream usage only when asked, never, or refuse the field."""
    servers = {}
    for mode in ("when_asked", "never", "reject_field"):
        port = free_port()
        servers[mode] = Server(CODEPLAN + ["simulate", "--port", str(port), "--usage-mode", mode],
                               base_env(), port, "/_sim/stats").start()
    yield servers
    for server in servers.values():
        server.stop()


def _upstream(sim: Server) -> str:
    return sim.url + "/api/paas/v4"


def _sim_requests(sim: Server) -> int:
    return json.loads(httpx.get(sim.url + "/_sim/stats").content)["requests"]


def test_an_upstream_that_reports_usage_only_when_asked_is_asked(database, strict_simulators):
    server = start_bridge(database, _upstream(strict_simulators["when_asked"]))
    try:
        key = new_user(database)
        chunks = list(openai.OpenAI(base_url=server.url + "/v1", api_key=key).chat.completions.create(
            model="glm-4.6", stream=True, messages=_say("tokens=6 reasoning=0")))
        assert chunks[-1].usage.completion_tokens > 0
        with anthropic.Anthropic(base_url=server.url, api_key=key).messages.stream(
                model="glm-4.6", max_tokens=100, messages=_say("tokens=5 reasoning=0")) as stream:
            final = stream.get_final_message()
        assert final.stop_reason == "end_turn" and final.usage.output_tokens > 0
        rows = settled_query(database, "SELECT l.* FROM usage_ledger l JOIN api_keys k ON k.id = l.api_key_id"
                                       " WHERE k.prefix = $1", key[:10])
        assert len(rows) == 2 and not any(r["estimated"] for r in rows)
    finally:
        server.stop()


@pytest.mark.parametrize("mode,setting", [("never", "auto"), ("when_asked", "never")])
def test_a_whole_stream_without_usage_is_a_whole_answer_billed_from_the_estimate(database, strict_simulators, mode, setting):
    sim = strict_simulators[mode]
    server = start_bridge(database, _upstream(sim), CODEPLAN_UPSTREAM_STREAM_USAGE=setting)
    try:
        key = new_user(database)
        chunks = list(openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0).chat.completions.create(
            model="glm-4.6", stream=True, messages=_say("tokens=6 reasoning=0")))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text and chunks[-2].choices[0].finish_reason == "stop"  # whole, not an error
        with anthropic.Anthropic(base_url=server.url, api_key=key, max_retries=0).messages.stream(
                model="glm-4.6", max_tokens=100, messages=_say("tokens=5 reasoning=0")) as stream:
            assert stream.get_final_message().stop_reason == "end_turn"
        rows = settled_query(database, "SELECT l.* FROM usage_ledger l JOIN api_keys k ON k.id = l.api_key_id"
                                       " WHERE k.prefix = $1", key[:10])
        assert len(rows) == 2 and all(r["estimated"] and r["state"] == "posted" for r in rows)
        assert all(r["completion_tokens"] > 0 and r["prompt_tokens"] == r["prompt_estimate"] for r in rows)
        warnings = [json.loads(line) for line in server.output().splitlines()
                    if "without usage" in line]
        assert warnings and warnings[0]["upstream"] == sim.url.removeprefix("http://")
    finally:
        server.stop()


def test_an_upstream_that_refuses_stream_options_is_remembered(database, strict_simulators):
    sim = strict_simulators["reject_field"]
    server = start_bridge(database, _upstream(sim))
    try:
        key = new_user(database)
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)
        before = _sim_requests(sim)
        first = list(client.chat.completions.create(model="glm-4.6", stream=True, messages=_say("tokens=4 reasoning=0")))
        assert first[-1].usage.completion_tokens > 0
        assert _sim_requests(sim) == before + 2  # refused once, resent without the field
        list(client.chat.completions.create(model="glm-4.6", stream=True, messages=_say("tokens=4 reasoning=0")))
        assert _sim_requests(sim) == before + 3  # remembered: asked no more
        assert server.output().count("refuses stream_options") == 1
        rows = settled_query(database, "SELECT l.* FROM usage_ledger l JOIN api_keys k ON k.id = l.api_key_id"
                                       " WHERE k.prefix = $1", key[:10])
        assert len(rows) == 2 and not any(r["estimated"] for r in rows)
    finally:
        server.stop()


# ---- no deadlocks under load ------------------------------------------------------------------

async def test_256_concurrent_requests_on_one_key_leave_no_deadlock(bridge, database):
    key = new_user(database, new_plan(database, window=10**9, weekly=10**10))
    # counted from here: other tests cause lock timeouts on purpose (tests/test_tick_baton.py)
    log_before = pg_log().read_text(errors="replace")
    deadlocks_before = log_before.count("deadlock detected")
    lock_timeouts_before = log_before.count("lock timeout")
    client = openai.AsyncOpenAI(base_url=bridge.url + "/v1", api_key=key, max_retries=0, timeout=120)

    async def one(i: int) -> int:
        response = await client.chat.completions.create(
            model="glm-4.6", max_tokens=50, stream=i % 2 == 0,
            messages=[{"role": "user", "content": f"[[sim tokens=5 reasoning=0]] job {i}"}])
        if i % 2 == 0:
            async for chunk in response:
                pass
        return 200

    for _ in range(3):
        assert await asyncio.gather(*(one(i) for i in range(256))) == [200] * 256
    await asyncio.to_thread(wait_settled, database)
    log = pg_log().read_text(errors="replace")
    assert log.count("deadlock detected") == deadlocks_before
    assert log.count("lock timeout") == lock_timeouts_before
    rows = _rows(database, key)
    assert len(rows) == 768 and {r["state"] for r in rows} == {"posted"}


# ---- an access line per request ----------------------------------------------------------------

def test_every_request_leaves_an_access_line_without_secrets(database, simulator):
    server = start_bridge(database, simulator.url + "/api/coding/paas/v4", CODEPLAN_LOG_LEVEL="info")
    try:
        key = new_user(database)
        secret_prompt = f"my secret prompt {uuid.uuid4().hex}"
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)
        client.chat.completions.create(model="glm-4.6", messages=[{"role": "user", "content": secret_prompt}])
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=server.url + "/v1", api_key="cp_wrong", max_retries=0).chat.completions.create(
                model="glm-4.6", messages=[{"role": "user", "content": "x"}])
        wait_settled(database)
        deadline = time.monotonic() + 5
        while True:
            lines = [json.loads(line) for line in server.output().splitlines()
                     if line.startswith("{") and '"codeplan.access"' in line]
            if len(lines) >= 2 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        served = next(line for line in lines if line["status"] == 200)
        for field in ("request_id", "surface", "model", "status", "account_id", "prompt_tokens",
                      "completion_tokens", "billed", "overhead_ms", "upstream_ms", "outcome"):
            assert field in served
        assert served["outcome"] == "settled" and served["billed"] > 0 and served["surface"] == "chat"
        refused = next(line for line in lines if line["status"] == 401)
        assert refused["outcome"] == "refused: authentication"
        output = server.output()
        assert key not in output and secret_prompt not in output and "cp_wrong" not in output
    finally:
        server.stop()


def test_a_request_forwarded_before_admission_is_stopped_when_admission_refuses(one_slot, database, simulator):
    """Where the window has room, the upstream starts while admission commits; when admission
    refuses after all (the room was used meanwhile), the upstream request is stopped, its slot
    given back, nothing billed, and the client told in its protocol."""
    server, upstream_key = one_slot
    key = new_user(database, new_plan(database, window=100_000, weekly=1_000_000))
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)
    client.chat.completions.create(model="glm-4.6", max_tokens=100, messages=_say("tokens=3 reasoning=0"))
    wait_settled(database)
    # another process used the room: this bridge still believes there is plenty
    run(query(database, "UPDATE quota_windows SET posted = allowance - 50 WHERE subscription_id ="
                        " (SELECT s.id FROM subscriptions s JOIN api_keys k ON k.account_id = s.account_id"
                        " WHERE k.prefix = $1)", key[:10]))
    before = _sim_requests(simulator)
    with pytest.raises(openai.RateLimitError) as refused:
        client.chat.completions.create(model="glm-4.6", max_tokens=100,
                                       messages=_say("ttft=300 tokens=3 reasoning=0"))
    assert refused.value.response.json()["error"]["code"] in ("1308", "1310")
    # it had been forwarded early; with a per-key cap (this bridge's one slot) it first takes its
    # key's lease in PostgreSQL, which may still be under way when admission refuses: then it
    # never reaches the upstream at all, and the lease it got is given back
    assert _sim_requests(simulator) in (before, before + 1)
    assert len(_rows(database, key)) == 1  # and left no ledger row
    deadline = time.monotonic() + 10
    while run(query(database, "SELECT count(*) AS n FROM upstream_key_leases WHERE holder IS NOT NULL"))[0]["n"]:
        assert time.monotonic() < deadline, "a lease taken for a refused request was never given back"
        time.sleep(0.05)
    run(query(database, "UPDATE quota_windows SET posted = 0 WHERE subscription_id ="
                        " (SELECT s.id FROM subscriptions s JOIN api_keys k ON k.account_id = s.account_id"
                        " WHERE k.prefix = $1)", key[:10]))
    # the slot is free: with one slot, a leaked one would keep this waiting forever
    client.chat.completions.create(model="glm-4.6", max_tokens=100, messages=_say("tokens=3 reasoning=0"),
                                   timeout=15)
    deadline = time.monotonic() + 10
    while json.loads(httpx.get(simulator.url + "/_sim/stats").content)["in_flight"].get(upstream_key):
        assert time.monotonic() < deadline
        time.sleep(0.1)
