"""The Responses surface end to end through a real bridge: the official openai SDK's
`responses.create` and `responses.stream`, raw SSE, and a `websockets` client speaking
Codex's WebSocket transport. Every request the simulator served is checked against the ledger:
one settled row each, at the simulator's own counts."""
from __future__ import annotations

import json
import time
import urllib.request
import uuid

import httpx
import openai
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import ClientConnection, connect

from bridge import sse
from bridge.tokens import count

from .conftest import new_plan, new_user, query, run, start_bridge, wait_settled
from .test_responses import CODEX_RETRY, check_stream

READ_FILE = {"type": "function", "name": "read_file", "description": "Read a file",
             "parameters": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}}
APPLY_PATCH = {"type": "custom", "name": "apply_patch", "description": "Edit files with a patch",
               "format": {"type": "grammar", "syntax": "lark", "definition": "start: /(.|\\n)+/"}}
BETA = {"openai-beta": "responses_websockets=2026-02-06"}


@pytest.fixture(scope="module")
def quick_bridge(database, simulator):
    """Keep-alives after 0.3 s of silence and headers after 0.3 s, so tests can see both."""
    server = start_bridge(database, simulator.url + "/api/coding/paas/v4", CODEPLAN_KEEPALIVE_INTERVAL="0.3",
                          CODEPLAN_HEADER_WAIT="0.3")
    yield server
    server.stop()


def say(directive: str, text: str = "go") -> list[dict]:
    return [{"role": "user", "content": f"[[sim {directive}]] {text} {uuid.uuid4().hex[:6]}"}]


def sim_stats(simulator) -> dict:
    with urllib.request.urlopen(simulator.url + "/_sim/stats") as response:
        return json.loads(response.read())


def rows_of(database: str, key: str):
    wait_settled(database)
    return run(query(database, "SELECT l.* FROM usage_ledger l JOIN api_keys k ON k.id = l.api_key_id"
                               " WHERE k.prefix = $1 ORDER BY l.created_at", key[:10]))


def check_metered(database: str, key: str, simulator, before: dict, usages: list[dict]) -> list:
    """One posted row per request the simulator served since `before`, at the counts it reported
    (which are what the client saw in `usage`), none estimated, nothing left reserved."""
    rows = rows_of(database, key)
    after = sim_stats(simulator)
    assert after["requests"] - before["requests"] == len(usages) == len(rows)
    assert [(r["state"], r["surface"], r["estimated"]) for r in rows] == [("posted", "responses", False)] * len(rows)
    assert [(r["prompt_tokens"], r["completion_tokens"], r["cached_tokens"]) for r in rows] == [
        (u["input_tokens"], u["output_tokens"], u["input_tokens_details"]["cached_tokens"]) for u in usages]
    assert after["prompt_tokens"] - before["prompt_tokens"] == sum(r["prompt_tokens"] for r in rows)
    assert after["completion_tokens"] - before["completion_tokens"] == sum(r["completion_tokens"] for r in rows)
    reserved = run(query(database, "SELECT sum(w.reserved) AS r FROM quota_windows w JOIN subscriptions s"
                                   " ON s.id = w.subscription_id JOIN api_keys k ON k.account_id = s.account_id"
                                   " WHERE k.prefix = $1", key[:10]))[0]["r"]
    assert reserved == 0
    return rows


def sse_events(response: httpx.Response) -> list[dict]:
    decoder = sse.SSEDecoder()
    return [json.loads(e.data) for chunk in response.iter_bytes() for e in decoder.feed(chunk)]


# ---- the openai SDK over HTTP ---------------------------------------------------------------

def test_sdk_create_function_call_round_trip(quick_bridge, database, simulator):
    key = new_user(database)
    client = openai.OpenAI(base_url=quick_bridge.url + "/v1", api_key=key, max_retries=0)
    before = sim_stats(simulator)
    history: list = say("reasoning=2", "read notes/a.txt")
    first = client.responses.create(model="glm-4.6", instructions="You are terse.", input=history,
                                    tools=[READ_FILE], reasoning={"effort": "high", "summary": "auto"},
                                    store=False, include=["reasoning.encrypted_content"],
                                    prompt_cache_key="t-1", metadata={"ticket": "7"})
    assert first.status == "completed" and first.object == "response"
    assert [o.type for o in first.output] == ["reasoning", "function_call"]
    call = first.output[1]
    assert call.name == "read_file" and json.loads(call.arguments) == {"path": "notes/a.txt"}
    assert first.output[0].encrypted_content.startswith("codeplan.")
    # the result goes back with the whole history, as Codex does over HTTP
    history += [o.model_dump(exclude_none=True) for o in first.output]
    history.append({"type": "function_call_output", "call_id": call.call_id, "output": "the answer is 7"})
    second = client.responses.create(model="glm-4.6", instructions="You are terse.", input=history,
                                     tools=[READ_FILE])
    assert second.status == "completed" and "the answer is 7" in second.output_text
    assert second.usage.input_tokens_details.cached_tokens > 0  # the shared prefix, as GLM caches it
    check_metered(database, key, simulator, before, [first.usage.model_dump(), second.usage.model_dump()])


def test_sdk_stream_reasoning_text_and_usage(quick_bridge, database, simulator):
    key = new_user(database)
    client = openai.OpenAI(base_url=quick_bridge.url + "/v1", api_key=key, max_retries=0)
    before = sim_stats(simulator)
    with client.responses.stream(model="glm-4.6", input=say("reasoning=4 tokens=9"),
                                 reasoning={"summary": "auto"}) as stream:
        events = [e for e in stream]
        final = stream.get_final_response()
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    for kind in ("response.reasoning_summary_text.delta", "response.reasoning_text.delta",
                 "response.output_text.delta", "response.content_part.added", "response.output_item.done"):
        assert kind in kinds
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert final.output_text == deltas and len(deltas.split()) == 9
    assert final.usage.output_tokens_details.reasoning_tokens > 0
    check_metered(database, key, simulator, before, [final.usage.model_dump()])


def test_sdk_stream_custom_tool_round_trip(quick_bridge, database, simulator):
    key = new_user(database)
    client = openai.OpenAI(base_url=quick_bridge.url + "/v1", api_key=key, max_retries=0)
    before = sim_stats(simulator)
    history: list = say("reasoning=1 tool=apply_patch", "fix src/app.py")
    with client.responses.stream(model="glm-4.6", input=history, tools=[READ_FILE, APPLY_PATCH]) as stream:
        kinds = [e.type for e in stream]
        first = stream.get_final_response()
    call = first.output[-1]
    assert call.type == "custom_tool_call" and call.name == "apply_patch"
    # the free text came out of GLM's one string parameter, newlines and all
    assert call.input.startswith("*** Begin Patch\n*** Update File: src/app.py\n") and call.input.endswith("*** End Patch")
    assert "response.custom_tool_call_input.done" in kinds and "response.function_call_arguments.delta" not in kinds
    history += [o.model_dump(exclude_none=True) for o in first.output]
    history.append({"type": "custom_tool_call_output", "call_id": call.call_id, "output": "Success. Updated src/app.py"})
    with client.responses.stream(model="glm-4.6", input=history, tools=[READ_FILE, APPLY_PATCH]) as stream:
        second = stream.get_final_response()
    assert "Success. Updated src/app.py" in second.output_text
    check_metered(database, key, simulator, before, [first.usage.model_dump(), second.usage.model_dump()])


def test_sdk_errors_in_openai_shape(quick_bridge, database):
    key = new_user(database)
    client = openai.OpenAI(base_url=quick_bridge.url + "/v1", api_key=key, max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=quick_bridge.url + "/v1", api_key="bad", max_retries=0).responses.create(
            model="glm-4.6", input="x")
    with pytest.raises(openai.NotFoundError) as caught:
        client.responses.create(model="gpt-9", input="x")
    assert caught.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(model="glm-4.6", input="x", max_output_tokens=0)
    assert caught.value.body["param"] == "max_output_tokens"
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(model="glm-4.6", input="x", previous_response_id="resp_abc")
    assert caught.value.body["code"] == "previous_response_not_found" and "WebSocket" in caught.value.body["message"]
    with pytest.raises(openai.RateLimitError) as caught:
        client.responses.create(model="glm-4.6", input=say("fault=1302"), stream=True)
    assert caught.value.body["code"] == "rate_limit_exceeded" and CODEX_RETRY.search(caught.value.body["message"])
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(model="glm-4.5", input="lorem ipsum " * 70_000)
    assert caught.value.body["code"] == "context_length_exceeded"
    assert "maximum context length is 131072 tokens" in caught.value.body["message"]
    assert {r["state"] for r in rows_of(database, key)} <= {"voided"}


def test_full_window_is_usage_limit_reached_with_its_reset_time(quick_bridge, database):
    key = new_user(database, new_plan(database, window=2_000, weekly=50_000))
    client = openai.OpenAI(base_url=quick_bridge.url + "/v1", api_key=key, max_retries=0)
    client.responses.create(model="glm-4.6", input=say("tokens=3 reasoning=0"), max_output_tokens=50)
    wait_settled(database)
    run(query(database, "UPDATE quota_windows SET posted = allowance - 100 WHERE kind = '5h' AND id IN"
                        " (SELECT window_id FROM usage_ledger l JOIN api_keys k ON k.id = l.api_key_id"
                        " WHERE k.prefix = $1)", key[:10]))
    with pytest.raises(openai.RateLimitError) as caught:
        client.responses.create(model="glm-4.6", input=say("tokens=3"), max_output_tokens=500, stream=True)
    error = caught.value.body
    # the shape Codex shows as "usage limit reached, try again at ..." without retrying
    assert error["type"] == "usage_limit_reached" and error["code"] == "1308"
    assert 4 * 3600 < error["resets_at"] - time.time() <= 5 * 3600 + 1  # rounded up to the whole second
    assert caught.value.response.headers["x-should-retry"] == "false"


# ---- raw streams: how they end --------------------------------------------------------------

def post_stream(bridge, key: str, body: dict) -> tuple[httpx.Response, list[dict]]:
    with httpx.stream("POST", bridge.url + "/v1/responses", headers={"authorization": f"Bearer {key}"},
                      json={"model": "glm-4.6", "stream": True, **body}, timeout=30) as response:
        return response, sse_events(response)


def test_upstream_dying_mid_stream_ends_in_response_failed(quick_bridge, database):
    key = new_user(database)
    response, events = post_stream(quick_bridge, key, {"input": say("fault=reset tokens=10 reasoning=0")})
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    final = check_stream(events)
    assert events[-1]["type"] == "response.failed" and final["error"]["code"] == "server_error"
    assert "broke off" in final["error"]["message"]
    delivered = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    [row] = rows_of(database, key)
    # billed what was delivered, as on every surface
    assert (row["state"], row["estimated"], row["settle_reason"]) == ("posted", True, "upstream died mid-stream")
    assert row["completion_tokens"] == count(delivered)


def test_late_refusal_is_response_failed_with_the_retry_delay_codex_reads(quick_bridge, database):
    key = new_user(database)
    started = time.monotonic()
    response, events = post_stream(quick_bridge, key, {"input": say("header_delay=1 fault=1302")})
    assert response.status_code == 200 and time.monotonic() - started < 10
    final = check_stream(events)
    assert final["error"]["code"] == "rate_limit_exceeded"
    assert float(CODEX_RETRY.search(final["error"]["message"]).group(1)) == 2
    [row] = rows_of(database, key)
    assert row["state"] == "voided"


def test_max_output_tokens_ends_in_response_incomplete(quick_bridge, database, simulator):
    key = new_user(database)
    before = sim_stats(simulator)
    _, events = post_stream(quick_bridge, key, {"input": say("tokens=40 reasoning=0"), "max_output_tokens": 5})
    final = check_stream(events)
    assert events[-1]["type"] == "response.incomplete"
    assert final["incomplete_details"] == {"reason": "max_output_tokens"} and final["max_output_tokens"] == 5
    assert final["usage"]["output_tokens"] == 5
    check_metered(database, key, simulator, before, [final["usage"]])


def test_keepalives_while_the_upstream_thinks(quick_bridge, database):
    key = new_user(database)
    raw = b""
    with httpx.stream("POST", quick_bridge.url + "/responses", headers={"authorization": f"Bearer {key}"},
                      json={"model": "glm-4.6", "stream": True, "input": say("ttft=1200 tokens=2 reasoning=0")},
                      timeout=30) as response:
        for part in response.iter_bytes():
            raw += part
    # response.created goes out before the upstream's first token, then keep-alive comments
    assert raw.startswith(b"event: response.created") and raw.count(b": keep-alive") >= 2
    assert raw.rstrip().endswith(b"}") and b"event: response.completed" in raw


# ---- paths ---------------------------------------------------------------------------------------

def test_paths_prefixes_and_what_is_not_served(quick_bridge, database):
    key = new_user(database)
    headers = {"authorization": f"Bearer {key}"}
    for path in ("/v1/responses", "/responses", "/api/coding/paas/v4/responses", "/api/paas/v4/responses"):
        body = httpx.post(quick_bridge.url + path, headers=headers, timeout=30,
                          json={"model": "glm-4.6", "input": say("tokens=2 reasoning=0")}).json()
        assert body["status"] == "completed" and body["output"][-1]["type"] == "message", path
    stored = httpx.get(quick_bridge.url + "/v1/responses/resp_123", headers=headers)
    assert stored.status_code == 404
    assert stored.json()["error"]["code"] == "response_not_found" and "does not store" in stored.json()["error"]["message"]
    for method, path, status in (("GET", "/v1/assistants", 404), ("POST", "/v1/completions", 404),
                                 ("POST", "/v1/responses/r/cancel", 404), ("GET", "/v1", 404),
                                 ("DELETE", "/v1/files/f1", 404), ("GET", "/v1/models/x/y", 404),
                                 ("GET", "/v1/chat/completions", 405), ("PUT", "/v1/responses", 405),
                                 ("POST", "/v1/models", 405)):
        answer = httpx.request(method, quick_bridge.url + path, headers=headers)
        error = answer.json()["error"]
        assert answer.status_code == status and error["type"] == "invalid_request_error", path
        if status == 405:  # a served path, another method
            assert "send a POST" in error["message"] or f"{method} is not served on {path}" in error["message"]
            continue
        assert f"{method} {path}" in error["message"]
        assert "POST /v1/responses" in error["message"] and "POST /v1/chat/completions" in error["message"]
    # outside /v1 the service's own problem shape stays
    assert httpx.get(quick_bridge.url + "/nowhere").json()["status"] == 404


# ---- the WebSocket transport ---------------------------------------------------------------

def ws_url(bridge, path: str = "/v1/responses") -> str:
    return bridge.url.replace("http://", "ws://") + path


def ws_turn(socket: ClientConnection, frame: dict) -> list[dict]:
    socket.send(json.dumps({"type": "response.create", "model": "glm-4.6", **frame}))
    events = []
    while True:
        event = json.loads(socket.recv(timeout=30))
        events.append(event)
        if event["type"] in ("response.completed", "response.incomplete", "response.failed", "error"):
            return events


def test_websocket_turns_continue_with_previous_response_id(quick_bridge, database, simulator):
    key = new_user(database)
    before = sim_stats(simulator)
    headers = {"authorization": f"Bearer {key}", **BETA}
    with connect(ws_url(quick_bridge), additional_headers=headers) as socket:
        # a warm-up, as Codex prewarms a socket with its instructions: no model call, nothing billed
        warm = ws_turn(socket, {"input": [{"role": "developer", "content": "You are terse."}],
                                "tools": [READ_FILE], "generate": False})
        assert [e["type"] for e in warm] == ["response.created", "response.in_progress", "response.completed"]
        assert sim_stats(simulator)["requests"] == before["requests"]
        first = ws_turn(socket, {"previous_response_id": warm[-1]["response"]["id"],
                                 "input": say("reasoning=1", "read notes/b.txt"), "tools": [READ_FILE],
                                 "stream": True})
        final = check_stream(first)
        call = final["output"][-1]
        assert call["type"] == "function_call" and json.loads(call["arguments"]) == {"path": "notes/b.txt"}
        # the next turn sends only what came after the response it names
        second = ws_turn(socket, {"previous_response_id": final["id"], "tools": [READ_FILE], "input": [
            {"type": "function_call_output", "call_id": call["call_id"], "output": "b = 2"}]})
        final2 = check_stream(second)
        assert final2["status"] == "completed" and "From the tool result: b = 2" in final2["output"][-1]["content"][0]["text"]
        check_metered(database, key, simulator, before, [final["usage"], final2["usage"]])
        # a response the socket does not hold: an error event with the status it stands for
        [error] = ws_turn(socket, {"previous_response_id": "resp_elsewhere", "input": []})
        assert (error["status"], error["error"]["code"]) == (400, "previous_response_not_found")
        [error] = ws_turn(socket, {"input": say("fault=1302")})
        assert error["status"] == 429 and CODEX_RETRY.search(error["error"]["message"])
        socket.send("this is not JSON")
        assert json.loads(socket.recv(timeout=30))["status"] == 400
        # the socket still serves after refusals
        assert ws_turn(socket, {"input": say("tokens=2 reasoning=0")})[-1]["type"] == "response.completed"
    assert [r["state"] for r in rows_of(database, key)] == ["posted", "posted", "voided", "posted"]


def test_websocket_client_leaving_mid_answer_is_settled_at_upstream_usage(quick_bridge, database, simulator):
    key = new_user(database)
    frame = {"type": "response.create", "model": "glm-4.6", "input": say("tps=20 tokens=30 reasoning=0")}
    with connect(ws_url(quick_bridge), additional_headers={"authorization": f"Bearer {key}"}) as socket:
        socket.send(json.dumps(frame))
        while json.loads(socket.recv(timeout=30))["type"] != "response.output_text.delta":
            pass
    # the bridge reads on for the upstream's usage, as for an HTTP client that leaves
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        rows = rows_of(database, key)
        if rows and rows[0]["settle_reason"] != "client left before the first token":
            break
        time.sleep(0.2)
    [row] = rows_of(database, key)
    assert (row["state"], row["estimated"]) == ("posted", False)
    assert row["settle_reason"] == "client left; upstream read on for its usage"
    assert row["completion_tokens"] == 30


def test_websocket_client_leaving_while_the_upstream_thinks_ends_the_turn_at_once(quick_bridge, database):
    key = new_user(database)
    frame = {"type": "response.create", "model": "glm-4.6", "input": say("ttft=60000 tokens=3 reasoning=0")}
    with connect(ws_url(quick_bridge), additional_headers={"authorization": f"Bearer {key}"}) as socket:
        socket.send(json.dumps(frame))
        assert json.loads(socket.recv(timeout=30))["type"] == "response.created"
    # settled long before the minute the upstream would think: the close cancelled the turn
    wait_settled(database, timeout=20)
    [row] = rows_of(database, key)
    assert (row["state"], row["settle_reason"]) == ("posted", "client left before the first token")
    assert row["completion_tokens"] == 0 and row["prompt_tokens"] == row["prompt_estimate"]


def test_websocket_handshake_refusals(quick_bridge, database):
    with pytest.raises(InvalidStatus) as caught:
        connect(ws_url(quick_bridge), additional_headers={"authorization": "Bearer nope", **BETA})
    assert caught.value.response.status_code == 401
    assert json.loads(caught.value.response.body)["error"]["code"] == "invalid_api_key"
    key = new_user(database)
    with pytest.raises(InvalidStatus) as caught:
        connect(ws_url(quick_bridge), additional_headers={
            "authorization": f"Bearer {key}", "openai-beta": "responses_websockets=2099-01-01"})
    # 426: Codex falls back to HTTP at once instead of retrying the socket
    assert caught.value.response.status_code == 426
    with connect(ws_url(quick_bridge, "/api/coding/paas/v4/responses"),
                 additional_headers={"authorization": f"Bearer {key}"}) as socket:
        assert ws_turn(socket, {"input": say("tokens=2 reasoning=0")})[-1]["type"] == "response.completed"


def test_websocket_turned_off_or_full_sends_codex_to_http(database, simulator):
    key = new_user(database)
    headers = {"authorization": f"Bearer {key}", **BETA}
    server = start_bridge(database, simulator.url + "/api/coding/paas/v4", CODEPLAN_MAX_WEBSOCKETS="1",
                          CODEPLAN_LOG_LEVEL="debug")
    try:
        with connect(ws_url(server), additional_headers=headers) as socket:
            with pytest.raises(InvalidStatus) as caught:
                connect(ws_url(server), additional_headers=headers)
            assert caught.value.response.status_code == 426
            assert json.loads(caught.value.response.body)["error"]["code"] == "websocket_connection_limit_reached"
            assert ws_turn(socket, {"input": say("tokens=2 reasoning=0")})[-1]["type"] == "response.completed"
        deadline = time.monotonic() + 10
        while True:  # the socket's place is given back when it closes
            try:
                with connect(ws_url(server), additional_headers=headers):
                    break
            except InvalidStatus:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        # the WebSocket library logs handshake headers at debug level: never the key
        output = server.output()
        assert "authorization: [redacted]" in output.lower() and key not in output
        closed = [json.loads(line) for line in output.splitlines() if '"response socket closed"' in line]
        assert {"turns": 1, "continued": 0, "warmups": 0, "refused": 0}.items() <= closed[0].items()
    finally:
        server.stop()
    server = start_bridge(database, simulator.url + "/api/coding/paas/v4", CODEPLAN_RESPONSES_WEBSOCKETS="false")
    try:
        with pytest.raises(InvalidStatus) as caught:
            connect(ws_url(server), additional_headers=headers)
        assert caught.value.response.status_code == 426
        assert json.loads(caught.value.response.body)["error"]["code"] == "websocket_disabled"
    finally:
        server.stop()


def _rss_mb(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) // 1024
    return 0


def test_a_socket_is_bounded_and_needs_a_key_that_can_spend(database, simulator):
    """A chain of warm-ups (which never reach the model's context check) cannot grow a socket
    past CODEPLAN_MAX_BODY_BYTES, and a key whose account cannot spend holds no socket at all."""
    # the authentication cache's lifetime shortened (5 s by default): waited out below
    server = start_bridge(database, simulator.url + "/api/coding/paas/v4", CODEPLAN_MAX_BODY_BYTES="2000000",
                          CODEPLAN_AUTH_CACHE_TTL="1")
    try:
        key = new_user(database)
        blob = "x" * 400_000
        before = _rss_mb(server.process.pid)
        with connect(ws_url(server), additional_headers={"authorization": f"Bearer {key}", **BETA},
                     max_size=None) as socket:
            previous, refused = None, None
            for i in range(20):
                frame = {"type": "response.create", "model": "glm-4.6", "generate": False,
                         "input": [{"type": "message", "role": "user",
                                    "content": [{"type": "input_text", "text": blob + str(i)}]}]}
                if previous:
                    frame["previous_response_id"] = previous
                socket.send(json.dumps(frame))
                event = json.loads(socket.recv(timeout=30))
                while event["type"] not in ("response.completed", "error"):
                    event = json.loads(socket.recv(timeout=30))
                if event["type"] == "error":
                    refused = (i, event)
                    break
                previous = event["response"]["id"]
        assert refused is not None, "20 warm-ups of 400 KB went past a 2 MB bound"
        assert refused[0] <= 6 and refused[1]["status"] == 413
        assert _rss_mb(server.process.pid) - before < 60
        # an account that cannot spend: refused at the handshake, told why
        run(query(database, "UPDATE subscriptions SET status = 'canceled' WHERE account_id ="
                            " (SELECT account_id FROM api_keys WHERE prefix = $1)", key[:10]))
        time.sleep(1.5)  # the authentication cache's lifetime (1 s here)
        with pytest.raises(InvalidStatus) as caught:
            connect(ws_url(server), additional_headers={"authorization": f"Bearer {key}", **BETA})
        assert caught.value.response.status_code == 402
        assert json.loads(caught.value.response.body)["error"]["code"] == "no_subscription"
    finally:
        server.stop()


# ---- what Codex reads at a conversation's limits ------------------------------------------------

PAD = "-" * 700_000  # ~11k tokens, 700 KB


def _turn(socket, **frame) -> list[dict]:
    socket.send(json.dumps({"type": "response.create", "model": "glm-4.6", **frame}))
    events = []
    while True:
        events.append(json.loads(socket.recv(timeout=60)))
        if events[-1]["type"] in ("response.completed", "response.failed", "response.incomplete", "error"):
            return events


def test_no_frame_follows_a_completed_turn_on_a_socket(database, simulator):
    """A conversation grown past what a socket keeps was refused with a 413 error frame sent
    after the turn's `response.completed`: Codex stops reading a turn there, so it took that
    frame for the answer to its next request, a turn that never ran. Now the conversation is
    forgotten, silently (a later previous_response_id is not found, and Codex resends it)."""
    server = start_bridge(database, simulator.url + "/api/coding/paas/v4", CODEPLAN_MAX_BODY_BYTES="2000000")
    try:
        key = new_user(database)
        with connect(server.url.replace("http://", "ws://") + "/v1/responses", max_size=None,
                     additional_headers={"authorization": f"Bearer {key}",
                                         "openai-beta": "responses_websockets=2026-02-06"}) as socket:
            previous = None
            for i in range(3):
                frame = {"input": [{"role": "user", "content": f"{PAD} [[sim tokens=2 reasoning=0]] {i}"}]}
                if previous:
                    frame["previous_response_id"] = previous
                events = _turn(socket, **frame)
                assert events[-1]["type"] == "response.completed", events[-1]
                previous = events[-1]["response"]["id"]
            # Codex's next turn, a fresh one: its first frame must be its own response.created
            nxt = _turn(socket, input=[{"role": "user", "content": "[[sim tokens=2 reasoning=0]] next"}])
            assert nxt[0]["type"] == "response.created", nxt[0]
    finally:
        server.stop()
