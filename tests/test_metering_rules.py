"""Each disconnect and fault rule, end to end through the bridge, with exact token counts."""
from __future__ import annotations

import asyncio
import concurrent.futures
import datetime as dt
import json
import time
import uuid

import httpx
import openai
import pytest

from bridge.tokens import count

from .conftest import new_plan, new_user, query, run, settled_query, start_bridge, wait_settled
from .test_skeleton import direct_usage


def body(directive: str, **extra) -> dict:
    prompt = f"[[sim {directive}]] task {uuid.uuid4().hex[:8]}"
    return {"model": "glm-4.6", "messages": [{"role": "user", "content": prompt}], **extra}


def settled_row(database: str, entry: str, timeout: float = 15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = run(query(database, "SELECT * FROM usage_ledger WHERE id = $1", uuid.UUID(entry)))
        if rows and rows[0]["state"] != "pending":
            return rows[0]
        time.sleep(0.05)
    raise AssertionError(f"ledger entry {entry} still pending after {timeout}s")


def windows(database: str, key: str) -> dict:
    rows = settled_query(database, """SELECT w.kind, w.allowance, w.reserved, w.posted FROM quota_windows w
        JOIN subscriptions s ON s.id = w.subscription_id JOIN api_keys k ON k.account_id = s.account_id
        WHERE k.prefix = $1""", key[:10])
    return {r["kind"]: r for r in rows}


def read_pieces(response: httpx.Response, n: int) -> list[str]:
    """Read a chat stream until `n` text pieces arrived; return them."""
    pieces: list[str] = []
    for line in response.iter_lines():
        if line.startswith("data: {"):
            chunk = json.loads(line[6:])
            for choice in chunk.get("choices", []):
                delta = choice["delta"]
                piece = delta.get("reasoning_content") or delta.get("content")
                if piece:
                    pieces.append(piece)
            if len(pieces) >= n:
                return pieces
    raise AssertionError(f"stream ended after {len(pieces)} pieces")


def stream(bridge, key: str, payload: dict):
    return httpx.stream("POST", bridge.url + "/v1/chat/completions", json={**payload, "stream": True},
                        headers={"authorization": f"Bearer {key}"}, timeout=30)


def test_client_leaves_before_first_token_pays_the_prompt(bridge, database, key):
    """The upstream accepted the request (200) and worked on it: its prompt is billed."""
    with stream(bridge, key, body("ttft=3000 tokens=10 reasoning=0")) as response:
        assert response.status_code == 200
        entry = response.headers["x-request-id"]
    row = settled_row(database, entry)
    assert (row["state"], row["settle_reason"], row["estimated"]) == (
        "posted", "client left before the first token", True)
    assert row["billed_tokens"] == row["prompt_tokens"] == row["prompt_estimate"] > 0
    assert row["completion_tokens"] == 0
    assert windows(database, key)["5h"]["reserved"] == 0


def test_client_leaves_mid_stream_bills_upstream_usage(bridge, database, simulator, key):
    payload = body("silence=1.5 fault=silence tokens=10 reasoning=0")
    with stream(bridge, key, payload) as response:
        entry = response.headers["x-request-id"]
        assert len(read_pieces(response, 5)) == 5
    row = settled_row(database, entry)
    expected = direct_usage(simulator, payload)
    assert row["state"] == "posted" and not row["estimated"]
    assert (row["prompt_tokens"], row["completion_tokens"]) == (expected["prompt_tokens"], expected["completion_tokens"])
    assert row["settle_reason"] == "client left; upstream read on for its usage"


def test_client_leaves_and_upstream_never_reports_usage_bills_delivered(bridge, database, key):
    with stream(bridge, key, body("silence=1 fault=silence,no_usage tokens=10 reasoning=0")) as response:
        entry = response.headers["x-request-id"]
        delivered = read_pieces(response, 5)
    row = settled_row(database, entry)
    assert row["state"] == "posted" and row["estimated"]
    assert row["settle_reason"] == "client left; upstream read on for its usage"
    assert row["completion_tokens"] == sum(count(p) for p in delivered)
    assert row["prompt_tokens"] == row["prompt_estimate"]


@pytest.mark.parametrize("fault,status,kind,code", [
    ("1302", 429, "rate_limit_error", "1302"),
    ("1113", 402, "insufficient_quota", "1113"),
    ("500", 502, "server_error", "500"),
    ("1301", 400, "invalid_request_error", "1301"),
])
def test_upstream_error_before_any_token_voids(bridge, database, key, fault, status, kind, code):
    before = settled_query(database, "SELECT count(*) AS n FROM usage_ledger WHERE state = 'voided'")[0]["n"]
    response = httpx.post(bridge.url + "/v1/chat/completions", json=body(f"fault={fault}", stream=True),
                          headers={"authorization": f"Bearer {key}"})
    assert response.status_code == status
    error = response.json()["error"]
    assert (error["type"], error["code"]) == (kind, code)
    if fault == "1302":
        assert response.headers["retry-after"] == "2" and response.headers["retry-after-ms"] == "2000"
        assert response.headers["x-should-retry"] == "true"
    if fault == "1113":
        assert response.headers["x-should-retry"] == "false" and "not retryable" in error["message"]
        assert "sim-key" not in error["message"]
    after = settled_query(database, "SELECT count(*) AS n FROM usage_ledger WHERE state = 'voided'")[0]["n"]
    assert after == before + 1
    assert windows(database, key)["5h"]["reserved"] == 0


@pytest.mark.parametrize("fault", ["500", "1302", "reset"])
def test_transient_upstream_failure_before_any_byte_is_retried(bridge, database, simulator, key, fault):
    before = json.loads(httpx.get(simulator.url + "/_sim/stats").content)["requests"]
    client = openai.OpenAI(base_url=bridge.url + "/v1", api_key=key, max_retries=0)
    response = client.chat.completions.create(**body(f"fault={fault} once=true tokens=4 reasoning=0"))
    assert response.choices[0].message.content
    assert json.loads(httpx.get(simulator.url + "/_sim/stats").content)["requests"] == before + 2
    row = settled_query(database, "SELECT * FROM usage_ledger ORDER BY created_at DESC LIMIT 1")[0]
    assert row["state"] == "posted" and row["completion_tokens"] == response.usage.completion_tokens


def test_upstream_dies_mid_stream_bills_delivered_and_tells_client(bridge, database, key):
    client = openai.OpenAI(base_url=bridge.url + "/v1", api_key=key, max_retries=0)
    received: list[str] = []
    with pytest.raises(openai.APIError, match="broke off"):
        for chunk in client.chat.completions.create(**body("fault=reset tokens=10 reasoning=0"), stream=True):
            if chunk.choices and chunk.choices[0].delta.content:
                received.append(chunk.choices[0].delta.content)
    assert len(received) == 5
    row = settled_query(database, "SELECT * FROM usage_ledger ORDER BY created_at DESC LIMIT 1")[0]
    assert row["state"] == "posted" and row["estimated"]
    assert row["completion_tokens"] == sum(count(p) for p in received)
    assert row["prompt_tokens"] == row["prompt_estimate"]
    assert row["settle_reason"] == "upstream died mid-stream"


def test_malformed_chunk_ends_the_stream_as_broken_and_usage_still_exact(bridge, database, simulator, key):
    """An event the bridge cannot read may have carried text: the answer is never told whole
    with a hole in it (it ends as broken), and what the upstream reported is still billed."""
    payload = body("fault=malformed tokens=10 reasoning=0")
    client = openai.OpenAI(base_url=bridge.url + "/v1", api_key=key, max_retries=0)
    with pytest.raises(openai.APIError, match="could not read"):
        for _ in client.chat.completions.create(**payload, stream=True):
            pass
    expected = direct_usage(simulator, payload)
    row = settled_query(database, "SELECT * FROM usage_ledger ORDER BY created_at DESC LIMIT 1")[0]
    assert (row["state"], row["estimated"], row["completion_tokens"]) == ("posted", False, expected["completion_tokens"])


def test_upstream_reported_zero_is_billed_as_zero_not_estimated(bridge, database, key):
    client = openai.OpenAI(base_url=bridge.url + "/v1", api_key=key, max_retries=0)
    # an empty answer is never passed off as a whole one: it ends in a retryable error
    with pytest.raises(openai.APIError, match="empty answer"):
        for _ in client.chat.completions.create(**body("tokens=0 reasoning=0"), stream=True):
            pass
    row = settled_query(database, "SELECT * FROM usage_ledger ORDER BY created_at DESC LIMIT 1")[0]
    assert (row["completion_tokens"], row["estimated"]) == (0, False) and row["prompt_tokens"] > 0


def test_sensitive_stop_is_surfaced_and_billed_at_upstream_usage(bridge, database, key):
    client = openai.OpenAI(base_url=bridge.url + "/v1", api_key=key)
    chunks = list(client.chat.completions.create(**body("fault=sensitive tokens=10 reasoning=0"), stream=True))
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["content_filter"]
    row = settled_query(database, "SELECT * FROM usage_ledger ORDER BY created_at DESC LIMIT 1")[0]
    assert row["completion_tokens"] == chunks[-1].usage.completion_tokens and not row["estimated"]


# ---- exhaustion ---------------------------------------------------------------------------

@pytest.fixture
def small_plan_key(database):
    return new_user(database, new_plan(database, window=2_000, weekly=50_000))


def fill_window(bridge, database, key: str, kind: str, leave: int) -> openai.OpenAI:
    """Open the key's windows with one request, then use up all of one but `leave` tokens."""
    client = openai.OpenAI(base_url=bridge.url + "/v1", api_key=key, max_retries=0)
    client.chat.completions.create(**body("tokens=5 reasoning=0"), max_tokens=100)
    wait_settled(database)
    column = "window_id" if kind == "5h" else "week_window_id"
    run(query(database, f"UPDATE quota_windows SET posted = allowance - {leave} WHERE kind = $2"
                        f" AND id IN (SELECT {column} FROM usage_ledger l JOIN api_keys k"
                        " ON k.id = l.api_key_id WHERE k.prefix = $1)", key[:10], kind))
    return client


def test_full_five_hour_window_refused_with_1308_before_upstream(bridge, database, small_plan_key):
    key = small_plan_key
    client = fill_window(bridge, database, key, "5h", leave=300)
    rows_before = run(query(database, "SELECT count(*) AS n FROM usage_ledger"))[0]["n"]
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(**body("tokens=5 reasoning=0"), max_tokens=400)
    response = caught.value.response
    error = response.json()["error"]
    assert error["code"] == "1308" and error["type"] == "rate_limit_error"
    reset = windows(database, key)["5h"]
    assert "5 hour window" in error["message"]
    resets_at = run(query(database, "SELECT ends_at FROM quota_windows WHERE kind = '5h' ORDER BY id DESC LIMIT 1"))[0]["ends_at"]
    # told at the whole second at or after the end, never before it
    shown = resets_at.astimezone(dt.timezone.utc).replace(microsecond=0) + dt.timedelta(seconds=resets_at.microsecond > 0)
    assert shown.strftime("%Y-%m-%dT%H:%M:%SZ") in error["message"]
    wait = int(response.headers["retry-after"])
    assert 4 * 3600 < wait <= 5 * 3600
    assert response.headers["x-should-retry"] == "false"
    # refused before reaching the upstream: no ledger row, nothing reserved
    assert run(query(database, "SELECT count(*) AS n FROM usage_ledger"))[0]["n"] == rows_before
    assert reset["reserved"] == 0
    # a small request still fits
    client.chat.completions.create(**body("tokens=5 reasoning=0"), max_tokens=60)


def test_full_weekly_window_refused_with_1310(bridge, database, small_plan_key):
    key = small_plan_key
    client = fill_window(bridge, database, key, "week", leave=10)
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(**body("tokens=5 reasoning=0"), max_tokens=100)
    error = caught.value.response.json()["error"]
    assert error["code"] == "1310" and "weekly window" in error["message"]


def test_request_bigger_than_a_whole_window_is_400(bridge, small_plan_key):
    client = openai.OpenAI(base_url=bridge.url + "/v1", api_key=small_plan_key, max_retries=0)
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(**body("tokens=5"), max_tokens=5_000)
    error = caught.value.response.json()["error"]
    assert error["param"] == "max_tokens" and "whole 5 hour window" in error["message"]


def test_context_overflow_is_400_with_the_words_clients_detect(bridge, key):
    client = openai.OpenAI(base_url=bridge.url + "/v1", api_key=key, max_retries=0)
    huge = "lorem ipsum " * 70_000  # ~140k tokens: over glm-4.5's 131,072
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="glm-4.5", messages=[{"role": "user", "content": huge}])
    error = caught.value.response.json()["error"]
    assert error["code"] == "context_length_exceeded"
    assert "maximum context length is 131072 tokens" in error["message"]


# ---- quota API ------------------------------------------------------------------------------

def test_usage_api_and_zai_monitor_endpoints(bridge, database):
    key = new_user(database, new_plan(database, window=100_000, weekly=400_000))
    client = openai.OpenAI(base_url=bridge.url + "/v1", api_key=key)
    reported = []
    for model in ("glm-4.6", "glm-4.6", "glm-4.5-air"):
        reported.append((model, client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": f"hi {uuid.uuid4().hex}"}], max_tokens=200).usage))
    total = sum(u.total_tokens for _, u in reported)
    wait_settled(database)
    usage = httpx.get(bridge.url + "/v1/usage", headers={"authorization": f"Bearer {key}"}).json()
    five, week = usage["windows"]
    assert (five["kind"], five["allowance"], five["used"], five["reserved"], five["remaining"]) == (
        "5h", 100_000, total, 0, 100_000 - total)
    assert week["kind"] == "week" and week["used"] == total and week["allowance"] == 400_000
    resets = dt.datetime.strptime(five["resets_at"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.timezone.utc)
    assert dt.timedelta(hours=4, minutes=59) < resets - dt.datetime.now(dt.timezone.utc) <= dt.timedelta(hours=5, seconds=1)
    assert usage["today"]["glm-4.6"]["requests"] == 2 and usage["today"]["glm-4.5-air"]["requests"] == 1
    assert usage["today"]["glm-4.6"]["completion_tokens"] == sum(
        u.completion_tokens for m, u in reported if m == "glm-4.6")
    assert usage["week"] == usage["today"] or dt.datetime.now(dt.timezone.utc).weekday() > 0
    assert usage["estimates"]["glm-4.6/ascii"]["samples"] >= 2
    assert httpx.get(bridge.url + "/v1/usage").status_code == 401

    # Z.ai's HUD plugins send the raw key, without Bearer
    quota = httpx.get(bridge.url + "/api/monitor/usage/quota/limit", headers={"authorization": key}).json()
    assert quota["success"] is True and quota["code"] == 200 and quota["data"]["level"].startswith("p_")
    # credits as Z.ai reports them since 2026 (a credit is a token at the default coefficients),
    # then the older TOKENS_LIMIT entries for HUDs written before credits
    tokens_5h, tokens_week, legacy_5h, legacy_week = quota["data"]["limits"]
    assert (tokens_5h["type"], tokens_5h["unit"], tokens_5h["number"]) == ("CREDIT_LIMIT", 3, 5)
    assert (tokens_week["unit"], tokens_week["number"]) == (6, 1)
    assert tokens_5h["currentValue"] == total and tokens_5h["percentage"] == round(100 * total / 100_000)
    assert tokens_5h["tokens"] == total and tokens_5h["usage"] == 100_000
    assert abs(tokens_5h["nextResetTime"] / 1000 - resets.timestamp()) < 1
    assert (legacy_5h["type"], legacy_5h["percentage"], legacy_5h["currentValue"]) == (
        "TOKENS_LIMIT", tokens_5h["percentage"], total)
    assert legacy_week["type"] == "TOKENS_LIMIT"
    model_usage = httpx.get(bridge.url + "/api/monitor/usage/model-usage", headers={"authorization": key}).json()
    summary = model_usage["data"]["totalUsage"]
    assert summary["totalModelCallCount"] == 3 and summary["totalTokensUsage"] == total
    assert sum(model_usage["data"]["tokensUsage"]) == total
    assert len(model_usage["data"]["x_time"]) == len(model_usage["data"]["modelCallCount"])
    bad = httpx.get(bridge.url + "/api/monitor/usage/quota/limit", headers={"authorization": "nope"}).json()
    assert (bad["success"], bad["code"]) == (False, 401)


def test_upstream_concurrency_per_key_is_queued_not_refused(database, simulator):
    tag = uuid.uuid4().hex[:6]
    keys = [f"cap-{tag}-a", f"cap-{tag}-b"]
    from .conftest import start_bridge
    server = start_bridge(database, simulator.url + "/api/coding/paas/v4",
                          CODEPLAN_UPSTREAM_KEYS=",".join(keys), CODEPLAN_UPSTREAM_CONCURRENCY="1")
    try:
        key = new_user(database)
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)

        def one(i: int) -> int:
            chunks = list(client.chat.completions.create(
                model="glm-4.6", stream=True,
                messages=[{"role": "user", "content": f"[[sim tps=25 tokens=8 reasoning=0]] job {i}"}]))
            return chunks[-1].usage.completion_tokens

        started = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            served = list(pool.map(one, range(6)))
        elapsed = time.monotonic() - started
        stats = json.loads(httpx.get(simulator.url + "/_sim/stats").content)
        assert len(served) == 6 and all(served)
        # two keys, one request each at a time: three rounds of ~0.3 s, never two at once on a key
        assert [stats["max_in_flight"][k] for k in keys] == [1, 1]
        assert elapsed > 0.8
        rows = settled_query(database, "SELECT l.state FROM usage_ledger l JOIN api_keys k ON k.id = l.api_key_id"
                                       " WHERE k.prefix = $1", key[:10])
        assert [r["state"] for r in rows] == ["posted"] * 6
    finally:
        server.stop()


def test_drains_are_capped_when_many_clients_leave_at_once(database, simulator, key):
    """CODEPLAN_MAX_DRAINS holds even when every client leaves in the same instant: a drain is
    counted when it is granted, not when it starts running (it holds an upstream connection,
    and its memory, for up to CODEPLAN_DRAIN_TIMEOUT)."""
    bridge = start_bridge(database, simulator.url + "/api/coding/paas/v4", CODEPLAN_MAX_DRAINS="2")
    host, port = bridge.url.removeprefix("http://").split(":")
    payload = json.dumps({**body("fault=silence silence=60 tokens=10 reasoning=0"), "stream": True}).encode()
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nhost: {host}\r\nauthorization: Bearer {key}\r\n"
            f"content-type: application/json\r\ncontent-length: {len(payload)}\r\n\r\n").encode()

    async def leave_together(n: int) -> list[str]:
        async def begin():
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(head + payload)
            data = b""
            while b'"content":"' not in data and b'"reasoning_content":"' not in data:
                chunk = await reader.read(65536)
                assert chunk, data
                data += chunk
            entry = data.split(b"x-request-id: ", 1)[1].split(b"\r\n", 1)[0].decode()
            return entry, writer
        opened = await asyncio.gather(*(begin() for _ in range(n)))
        for _, writer in opened:  # every client leaves in one pass, mid-answer
            writer.transport.abort()
        return [entry for entry, _ in opened]
    try:
        entries = asyncio.run(leave_together(12))
        # the ten without a drain settle at once; the two drained wait for the upstream's usage
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            rows = run(query(database, "SELECT state, settle_reason FROM usage_ledger WHERE id = ANY($1)",
                             [uuid.UUID(e) for e in entries]))
            if sum(r["state"] != "pending" for r in rows) >= 10:
                break
            time.sleep(0.1)
        time.sleep(1.0)  # a third drain, were one granted, would show as a pending row here
        rows = run(query(database, "SELECT state, settle_reason FROM usage_ledger WHERE id = ANY($1)",
                         [uuid.UUID(e) for e in entries]))
        assert sorted((r["state"], r["settle_reason"]) for r in rows) == (
            [("pending", None)] * 2 + [("posted", "client left")] * 10)
    finally:
        bridge.stop()


def test_an_accounts_own_settlements_decide_its_estimate_not_another_accounts():
    """The ratio is per kind of text, and kinds are coarse: Tamil and Chinese are both "wide".
    Once an account has a few settlements of its own, its ratio is its own; before that, the
    shared median (of which one account holds at most 16 samples)."""
    from bridge.metering import Calibration
    calibration = Calibration()
    for _ in range(4):  # the victim's Chinese: the upstream counts 1.4x o200k
        calibration.observe("glm-4.6", "wide", 1, 1000, 1400)
    for _ in range(16):  # another account's Tamil: 4x
        calibration.observe("glm-4.6", "wide", 2, 1000, 4000)
    assert calibration.correct("glm-4.6", "wide", 1000, 1) == 1400
    assert calibration.correct("glm-4.6", "wide", 1000, 2) == 3000  # its own, within [0.5, 3]
    assert calibration.correct("glm-4.6", "wide", 1000, 3) == 3000  # a newcomer: the shared median
    calibration.observe("glm-4.6", "wide", 3, 1000, 1000)
    calibration.observe("glm-4.6", "wide", 3, 1000, 1000)
    assert calibration.correct("glm-4.6", "wide", 1000, 3) == 3000  # two of its own: not yet
    calibration.observe("glm-4.6", "wide", 3, 1000, 1000)
    assert calibration.correct("glm-4.6", "wide", 1000, 3) == 1000


ZH = ["我们今天在这里讨论代码的结构和测试。", "这个函数返回一个新的列表，其中包含所有元素。",
      "请检查数据库连接是否正常，然后重新启动服务。", "用户的请求在五小时的窗口内被计算。"]
TAMIL = "வணக்கம் உலகம் இது ஒரு சோதனை "


def test_another_accounts_text_neither_refuses_a_prompt_that_fits_nor_moves_its_count(bridge, database):
    """Proven by a hunt: 16 requests of Tamil (the simulator counts ~4x o200k) from one account
    took every account's "wide" ratio to 3, so another's Chinese prompt of ~107K upstream tokens
    was refused as past the 204,800 window and its count_tokens doubled."""
    import random

    from bridge import tokens
    rng = random.Random(5)
    victim, other = new_user(database), new_user(database)

    def chat(key: str, text: str) -> httpx.Response:
        return httpx.post(bridge.url + "/v1/chat/completions", headers={"authorization": "Bearer " + key},
                          json={"model": "glm-4.6", "max_tokens": 16, "messages": [
                              {"role": "user", "content": f"[[sim tokens=3]] {text} {uuid.uuid4().hex[:8]}"}]},
                          timeout=120)

    def counted(text: str) -> int:
        r = httpx.post(bridge.url + "/v1/messages/count_tokens", headers={
            "x-api-key": victim, "anthropic-version": "2023-06-01"}, timeout=60,
            json={"model": "glm-4.6", "messages": [{"role": "user", "content": text}]})
        assert r.status_code == 200, r.text
        return r.json()["input_tokens"]

    def chinese(sentences: int) -> str:
        return "".join(rng.choice(ZH) for _ in range(sentences))

    for _ in range(4):
        assert chat(victim, chinese(120)).status_code == 200
    probe = chinese(120)
    before = counted(probe)
    for _ in range(16):
        assert chat(other, TAMIL * 100).status_code == 200
    assert counted(probe) <= before * 1.1
    big = chinese(6_700)  # ~75K o200k tokens, ~107K as the simulator counts them
    upstream = len(tokens.offline_encoding("cl100k_base").encode_ordinary(big))
    assert upstream < 204_800 * 0.6
    answer = chat(victim, big)
    assert answer.status_code == 200, answer.text[:300]
