"""Both surfaces end to end through a real bridge, with the official openai and anthropic SDKs."""
from __future__ import annotations

import json
import time
import uuid

import anthropic
import httpx
import openai
import pytest

from .conftest import new_user, query, run, start_bridge, wait_settled
from .test_skeleton import direct_usage

TOOLS = [
    {"type": "function", "function": {"name": "read_file", "description": "Read a file",
                                      "parameters": {"type": "object", "properties": {"path": {"type": "string"}},
                                                     "required": ["path"]}}},
    {"type": "function", "function": {"name": "get_time", "description": "The time",
                                      "parameters": {"type": "object", "properties": {}}}},
]
ANTHROPIC_TOOLS = [{"name": t["function"]["name"], "description": t["function"]["description"],
                    "input_schema": t["function"]["parameters"]} for t in TOOLS]


@pytest.fixture(scope="module")
def quick_bridge(database, simulator):
    """A bridge whose keep-alives come after 0.3 s of silence, so tests can see them."""
    server = start_bridge(database, simulator.url + "/api/coding/paas/v4", CODEPLAN_KEEPALIVE_INTERVAL="0.3",
                          CODEPLAN_HEADER_WAIT="0.3")
    yield server
    server.stop()


def say(directive: str, text: str = "go") -> list[dict]:
    return [{"role": "user", "content": f"[[sim {directive}]] {text} {uuid.uuid4().hex[:6]}"}]


def last_row(database: str, key: str):
    wait_settled(database)
    return run(query(database, "SELECT l.* FROM usage_ledger l JOIN api_keys k ON k.id = l.api_key_id"
                               " WHERE k.prefix = $1 ORDER BY l.created_at DESC LIMIT 1", key[:10]))[0]


def rows_of(database: str, key: str):
    wait_settled(database)
    return run(query(database, "SELECT l.* FROM usage_ledger l JOIN api_keys k ON k.id = l.api_key_id"
                               " WHERE k.prefix = $1", key[:10]))


# ---- Chat Completions with the openai SDK ---------------------------------------------------

def test_chat_parallel_tool_calls_and_round_trip(quick_bridge, database):
    key = new_user(database)
    client = openai.OpenAI(base_url=quick_bridge.url + "/v1", api_key=key)
    messages = say("tools=2 reasoning=3", "read a.py")
    calls: dict[int, dict] = {}
    finish = None
    for chunk in client.chat.completions.create(model="glm-4.6", messages=messages, tools=TOOLS, stream=True,
                                                parallel_tool_calls=True):
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for call in choice.delta.tool_calls or []:
                entry = calls.setdefault(call.index, {"id": call.id, "name": call.function.name, "arguments": ""})
                entry["arguments"] += call.function.arguments or ""
    assert finish == "tool_calls" and [c["name"] for c in calls.values()] == ["read_file", "get_time"]
    assert json.loads(calls[0]["arguments"]) == {"path": "a.py"} and json.loads(calls[1]["arguments"]) == {}
    # send the results back: the model answers from them
    messages += [{"role": "assistant", "content": None, "tool_calls": [
        {"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
        for c in calls.values()]}]
    messages += [{"role": "tool", "tool_call_id": calls[0]["id"], "content": "x = 42"},
                 {"role": "tool", "tool_call_id": calls[1]["id"], "content": "noon"}]
    answer = client.chat.completions.create(model="glm-4.6", messages=messages, tools=TOOLS)
    assert answer.choices[0].finish_reason == "stop" and "x = 42 noon" in answer.choices[0].message.content
    assert [r["state"] for r in rows_of(database, key)] == ["posted", "posted"]


def test_chat_empty_arguments_become_empty_object(quick_bridge, database):
    key = new_user(database)
    client = openai.OpenAI(base_url=quick_bridge.url + "/v1", api_key=key)
    chunks = list(client.chat.completions.create(model="glm-4.6", messages=say("empty_args=true tool=get_time"),
                                                 tools=TOOLS, stream=True))
    arguments = "".join(call.function.arguments or "" for c in chunks for ch in c.choices
                        for call in ch.delta.tool_calls or [])
    assert arguments == "{}"
    response = client.chat.completions.create(model="glm-4.6", messages=say("empty_args=true tool=get_time"),
                                              tools=TOOLS)
    assert response.choices[0].message.tool_calls[0].function.arguments == "{}"
    assert response.choices[0].finish_reason == "tool_calls"


def test_chat_usage_apart_and_reasoning_field(quick_bridge, database, simulator):
    key = new_user(database)
    client = openai.OpenAI(base_url=quick_bridge.url + "/v1", api_key=key)
    messages = say("fault=usage_apart reasoning=4 tokens=6")
    chunks = list(client.chat.completions.create(model="glm-4.6", messages=messages, stream=True))
    expected = direct_usage(simulator, {"model": "glm-4.6", "messages": messages})
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == expected["completion_tokens"]
    assert sum(1 for c in chunks if c.usage) == 1
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert sum(1 for d in deltas if (d.model_extra or {}).get("reasoning_content")) == 4
    assert not any("reasoning" in (d.model_extra or {}) for d in deltas)
    assert last_row(database, key)["completion_tokens"] == expected["completion_tokens"]


def test_chat_keepalive_comments_during_silence_not_after_death(quick_bridge, database):
    key = new_user(database)
    raw = b""
    with httpx.stream("POST", quick_bridge.url + "/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
                      json={"model": "glm-4.6", "stream": True,
                            "messages": say("fault=silence silence=1.2 tokens=6 reasoning=0")}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        for part in response.iter_bytes():
            raw += part
    assert raw.count(b": keep-alive") >= 2 and raw.endswith(b"data: [DONE]\n\n")
    # an upstream that dies stops the stream at once: no pings into the void
    started = time.monotonic()
    with httpx.stream("POST", quick_bridge.url + "/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
                      json={"model": "glm-4.6", "stream": True,
                            "messages": say("fault=reset tokens=6 reasoning=0")}) as response:
        body = b"".join(response.iter_bytes())
    assert b"keep-alive" not in body and b'"error"' in body and time.monotonic() - started < 2


def test_chat_headers_go_out_while_a_slow_upstream_queues(quick_bridge, database):
    key = new_user(database)
    started = time.monotonic()
    with httpx.stream("POST", quick_bridge.url + "/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
                      json={"model": "glm-4.6", "stream": True,
                            "messages": say("header_delay=1.5 tokens=4 reasoning=0")}) as response:
        headers_after = time.monotonic() - started
        body = b"".join(response.iter_bytes())
    assert response.status_code == 200 and headers_after < 1.0
    assert body.startswith(b": keep-alive") and body.endswith(b"data: [DONE]\n\n")
    assert last_row(database, key)["state"] == "posted"


def test_chat_late_refusal_becomes_an_error_in_the_stream(quick_bridge, database):
    key = new_user(database)
    client = openai.OpenAI(base_url=quick_bridge.url + "/v1", api_key=key, max_retries=0)
    with pytest.raises(openai.APIError) as caught:
        for _ in client.chat.completions.create(model="glm-4.6", stream=True,
                                                messages=say("header_delay=1 fault=1302")):
            pass
    # GLM's meaning in our words; the upstream's own ("High concurrency usage of this API") stays in our log
    assert "concurrency" in str(caught.value).lower() and "high concurrency usage" not in str(caught.value).lower()
    assert last_row(database, key)["state"] == "voided"
    # a quick refusal still comes with its own status
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="glm-4.6", stream=True, messages=say("fault=1302"))


def test_chat_streams_without_buffering(quick_bridge, database):
    key = new_user(database)
    arrivals = []
    with httpx.stream("POST", quick_bridge.url + "/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
                      json={"model": "glm-4.6", "stream": True,
                            "messages": say("tps=10 tokens=5 reasoning=0")}) as response:
        for line in response.iter_lines():
            if '"content"' in line:
                arrivals.append(time.monotonic())
    assert len(arrivals) == 5
    # pieces 0.1 s apart upstream arrive spread out, not in one burst
    assert arrivals[-1] - arrivals[0] > 0.3


def test_models_list_and_aliases(quick_bridge, database):
    key = new_user(database)
    for path in ("/v1/models", "/models"):
        listed = httpx.get(quick_bridge.url + path, headers={"authorization": f"Bearer {key}"},
                           follow_redirects=False)
        assert listed.status_code == 200
        body = listed.json()
        assert body["object"] == "list"
        glm46 = next(m for m in body["data"] if m["id"] == "glm-4.6")
        assert glm46["context_window"] == 204800 and glm46["max_output_tokens"] == 131072
        assert glm46["display_name"] == "GLM-4.6" and glm46["object"] == "model"
    ids = [m.id for m in openai.OpenAI(base_url=quick_bridge.url + "/v1", api_key=key).models.list()]
    assert ids == ["glm-4.6", "glm-4.5", "glm-4.5-air"]
    assert httpx.get(quick_bridge.url + "/v1/models", headers={"authorization": "Bearer nope"}).status_code == 401
    assert httpx.head(quick_bridge.url + "/").status_code == 200
    assert httpx.head(quick_bridge.url + "/api/hello").status_code == 200


def test_unknown_model_is_404_in_openai_shape(quick_bridge, database):
    client = openai.OpenAI(base_url=quick_bridge.url + "/v1", api_key=new_user(database), max_retries=0)
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "x"}])
    assert caught.value.response.json()["error"]["code"] == "model_not_found"


def test_operator_aliases(database, simulator):
    server = start_bridge(database, simulator.url + "/api/coding/paas/v4",
                          CODEPLAN_MODEL_ALIASES="gpt-4o=glm-4.5-air,fast=glm-4.5")
    try:
        key = new_user(database)
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=key)
        response = client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
        assert response.model == "gpt-4o"
        assert last_row(database, key)["model"] == "glm-4.5-air"
    finally:
        server.stop()


# ---- Anthropic Messages with the anthropic SDK ------------------------------------------------

def test_messages_stream_thinking_and_text(quick_bridge, database, simulator):
    key = new_user(database)
    client = anthropic.Anthropic(base_url=quick_bridge.url, api_key=key)
    messages = say("reasoning=5 tokens=7")
    with client.messages.stream(model="claude-sonnet-4-6", max_tokens=1024, messages=messages,
                                thinking={"type": "enabled", "budget_tokens": 512}) as stream:
        events = [e.type for e in stream]
        final = stream.get_final_message()
    assert events[0] == "message_start" and events[-1] == "message_stop"
    assert [b.type for b in final.content] == ["thinking", "text"]
    assert final.content[0].signature and final.stop_reason == "end_turn"
    expected = direct_usage(simulator, {"model": "glm-4.6", "messages": messages})
    assert final.usage.output_tokens == expected["completion_tokens"]
    assert final.usage.input_tokens + final.usage.cache_read_input_tokens == expected["prompt_tokens"]
    row = last_row(database, key)
    assert (row["state"], row["surface"], row["model"]) == ("posted", "messages", "glm-4.6")
    assert row["completion_tokens"] == expected["completion_tokens"] and not row["estimated"]


def test_messages_tool_use_round_trip_non_stream(quick_bridge, database):
    key = new_user(database)
    client = anthropic.Anthropic(base_url=quick_bridge.url, api_key=key)
    messages = say("reasoning=0", "read notes/a.txt")
    first = client.messages.create(model="claude-opus-4-1", max_tokens=1024, messages=messages,
                                   tools=ANTHROPIC_TOOLS)
    assert first.stop_reason == "tool_use"
    use = next(b for b in first.content if b.type == "tool_use")
    assert use.name == "read_file" and use.input == {"path": "notes/a.txt"}
    messages += [{"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
                 {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,
                                               "content": "the answer is 7"}]}]
    second = client.messages.create(model="claude-opus-4-1", max_tokens=1024, messages=messages,
                                    tools=ANTHROPIC_TOOLS)
    assert second.stop_reason == "end_turn" and "the answer is 7" in second.content[-1].text
    assert [r["state"] for r in rows_of(database, key)] == ["posted", "posted"]


def test_messages_haiku_maps_to_air_and_thinking_disabled(quick_bridge, database):
    key = new_user(database)
    client = anthropic.Anthropic(base_url=quick_bridge.url, api_key=key)
    reply = client.messages.create(model="claude-3-5-haiku-latest", max_tokens=200, messages=say("tokens=3"),
                                   thinking={"type": "disabled"})
    assert [b.type for b in reply.content] == ["text"]
    assert last_row(database, key)["model"] == "glm-4.5-air"


def test_messages_tool_stream_input_json(quick_bridge, database):
    key = new_user(database)
    client = anthropic.Anthropic(base_url=quick_bridge.url, api_key=key)
    with client.messages.stream(model="glm-4.6", max_tokens=500, messages=say("reasoning=0 tools=2"),
                                tools=ANTHROPIC_TOOLS) as stream:
        final = stream.get_final_message()
    uses = [b for b in final.content if b.type == "tool_use"]
    assert [(u.name, u.input) for u in uses] == [("read_file", {"path": "README.md"}), ("get_time", {})]
    assert final.stop_reason == "tool_use"


def test_messages_on_zai_path_with_beta_query_and_unknown_fields(quick_bridge, database):
    key = new_user(database)
    response = httpx.post(quick_bridge.url + "/api/anthropic/v1/messages?beta=true",
                          headers={"authorization": f"Bearer {key}", "anthropic-version": "2023-06-01",
                                   "anthropic-beta": "context-management-2025-06-27,future-thing"},
                          json={"model": "glm-4.6", "max_tokens": 100, "messages": say("tokens=2"),
                                "context_management": {"edits": [{"type": "clear_tool_uses_20250919"}]},
                                "output_config": {"effort": "high"}, "brand_new_field": [1, 2]})
    assert response.status_code == 200, response.text
    assert response.json()["type"] == "message"


def test_messages_ping_during_silence(quick_bridge, database):
    key = new_user(database)
    raw = b""
    with httpx.stream("POST", quick_bridge.url + "/v1/messages", headers={"x-api-key": key},
                      json={"model": "glm-4.6", "max_tokens": 100, "stream": True,
                            "messages": say("ttft=1000 tokens=2 reasoning=0")}) as response:
        parts = response.iter_bytes()
        first = next(parts)
        raw = first + b"".join(parts)
    # message_start goes out before the upstream's first token
    assert first.startswith(b"event: message_start")
    assert raw.count(b"event: ping") >= 2 and raw.rstrip().endswith(b'{"type":"message_stop"}')


def test_messages_slow_upstream_gets_message_start_at_once(quick_bridge, database):
    key = new_user(database)
    client = anthropic.Anthropic(base_url=quick_bridge.url, api_key=key)
    started = time.monotonic()
    with client.messages.stream(model="glm-4.6", max_tokens=100,
                                messages=say("header_delay=1.5 tokens=3 reasoning=0")) as stream:
        first = next(iter(stream))
        first_after = time.monotonic() - started
        final = stream.get_final_message()
    assert first.type == "message_start" and first_after < 1.0
    assert final.stop_reason == "end_turn" and final.content[0].text
    with pytest.raises(anthropic.APIStatusError, match="(?i)limiting the service's concurrency"):
        with client.messages.stream(model="glm-4.6", max_tokens=100, messages=say("header_delay=1 fault=1302")) as s:
            for _ in s:
                pass


def test_client_leaves_while_upstream_queues_voids(quick_bridge, database):
    key = new_user(database)
    with httpx.stream("POST", quick_bridge.url + "/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
                      json={"model": "glm-4.6", "stream": True,
                            "messages": say("header_delay=1 tokens=4 reasoning=0")}) as response:
        assert response.status_code == 200
    time.sleep(1.5)
    row = last_row(database, key)
    assert (row["state"], row["settle_reason"]) == ("voided", "client left before the upstream answered")


def test_count_tokens_matches_the_ledgers_estimate(quick_bridge, database):
    key = new_user(database)
    client = anthropic.Anthropic(base_url=quick_bridge.url, api_key=key)
    messages = [{"role": "user", "content": "Count me, please: " + "token " * 300}]
    counted = client.messages.count_tokens(model="claude-sonnet-4-6", messages=messages, system="Be brief.")
    assert 250 < counted.input_tokens < 400  # ~300 o200k tokens, corrected by the measured ratio
    client.messages.create(model="claude-sonnet-4-6", max_tokens=50, messages=messages, system="Be brief.")
    # same estimator, same correction: the reservation's prompt part is what count_tokens said
    assert last_row(database, key)["prompt_estimate"] == pytest.approx(counted.input_tokens, rel=0.05)
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=quick_bridge.url, api_key="nope").messages.count_tokens(
            model="glm-4.6", messages=messages)


def test_messages_errors_in_anthropic_shape(quick_bridge, database):
    key = new_user(database)
    client = anthropic.Anthropic(base_url=quick_bridge.url, api_key=key, max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as caught:
        anthropic.Anthropic(base_url=quick_bridge.url, api_key="bad", max_retries=0).messages.create(
            model="glm-4.6", max_tokens=10, messages=say("x"))
    assert caught.value.body["type"] == "error" and caught.value.body["error"]["type"] == "authentication_error"
    with pytest.raises(anthropic.RateLimitError) as caught:
        client.messages.create(model="glm-4.6", max_tokens=10, messages=say("fault=1302"))
    assert caught.value.response.headers["retry-after"] == "2"
    assert caught.value.response.headers["x-should-retry"] == "true"
    with pytest.raises(anthropic.APIStatusError) as caught:
        client.messages.create(model="glm-4.6", max_tokens=10, messages=say("fault=1305"))
    assert caught.value.status_code == 529 and caught.value.body["error"]["type"] == "overloaded_error"
    with pytest.raises(anthropic.BadRequestError) as caught:
        client.messages.create(model="glm-4.5", max_tokens=10,
                               messages=[{"role": "user", "content": "lorem ipsum " * 70_000}])
    assert caught.value.body["error"]["message"].startswith("prompt is too long: ")
    # the most a prompt may be leaves room for the answer asked (glm-4.5's 131,072 less 10)
    assert caught.value.body["error"]["message"].endswith(" > 131062 maximum")
    # mid-stream failure arrives as an error event
    with pytest.raises(anthropic.APIStatusError, match="broke off"):
        with client.messages.stream(model="glm-4.6", max_tokens=100, messages=say("fault=reset tokens=6")) as s:
            for _ in s:
                pass
    assert {r["state"] for r in rows_of(database, key)} == {"posted", "voided"}
