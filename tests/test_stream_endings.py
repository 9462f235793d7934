"""How answers end, end to end: a real bridge in front of a scripted OpenAI-style upstream
(tests/scripted_upstream.py), read with the official `openai` and `anthropic` SDKs, and the
ledger entry each request leaves.

Shapes of hosts the operator may forward to (glm-upstream.md §16) that GLM's own API does not
send: a mid-stream `{"error": ...}` chunk (vLLM, SGLang), parallel calls reusing `index` 0,
reasoning with no answer, usage counts no ledger column can hold."""
from __future__ import annotations

import json

import anthropic
import openai
import pytest

from .conftest import new_user, query, run, start_bridge, wait_settled
from .scripted_upstream import start_scripted

MAX_COUNT = 2**31 - 1


@pytest.fixture(scope="module")
def scripted_bridge(database):
    upstream, url = start_scripted()
    server = start_bridge(database, url, CODEPLAN_UPSTREAM_KEYS="k1")
    yield server
    server.stop()
    upstream.shutdown()


def _entry(database: str, key: str):
    wait_settled(database)
    return run(query(database, "SELECT l.* FROM usage_ledger l JOIN api_keys k ON k.id = l.api_key_id"
                               " WHERE k.prefix = $1 ORDER BY l.created_at DESC LIMIT 1", key[:10]))[0]


def _ask(script: str) -> list[dict]:
    return [{"role": "user", "content": f"[[script {script}]] explain"}]


def _chat(bridge, key: str):
    return openai.OpenAI(base_url=bridge.url + "/v1", api_key=key, max_retries=0)


def _messages(bridge, key: str):
    return anthropic.Anthropic(base_url=bridge.url, api_key=key, max_retries=0)


# ---- an upstream's mid-stream error chunk --------------------------------------------------

def test_chat_stream_with_upstream_error_chunk_raises_after_the_half_answer(scripted_bridge, database):
    key = new_user(database)
    text, finish = "", None
    with pytest.raises(openai.APIError) as raised:
        for chunk in _chat(scripted_bridge, key).chat.completions.create(
                model="glm-4.6", stream=True, messages=_ask("vllm_error")):
            for choice in chunk.choices:
                text += choice.delta.content or ""
                finish = choice.finish_reason or finish
    assert text == "Here is the first half of the ans" and finish is None
    assert "CUDA" not in str(raised.value)  # the upstream's internals stay with the operator
    # no usage came: the prompt estimate and what was delivered, marked estimated; once
    entry = _entry(database, key)
    assert (entry["state"], entry["estimated"]) == ("posted", True)
    assert entry["completion_tokens"] > 0 and entry["settle_reason"] == "upstream_error"


def test_messages_stream_with_upstream_error_chunk_is_an_error_not_end_turn(scripted_bridge, database):
    key = new_user(database)
    with pytest.raises(anthropic.APIError):
        with _messages(scripted_bridge, key).messages.stream(
                model="glm-4.6", max_tokens=200, messages=_ask("vllm_error")) as stream:
            stream.get_final_message()
    assert _entry(database, key)["state"] == "posted"


def test_responses_stream_with_upstream_error_chunk_fails(scripted_bridge, database):
    key = new_user(database)
    kinds = [e.type for e in _chat(scripted_bridge, key).responses.create(
        model="glm-4.6", stream=True, input="[[script vllm_error]] explain")]
    assert kinds[-1] == "response.failed" and "response.completed" not in kinds, kinds


def test_usage_sent_after_an_error_chunk_is_settled_as_the_upstreams(scripted_bridge, database):
    key = new_user(database)
    with pytest.raises(openai.APIError):
        for _ in _chat(scripted_bridge, key).chat.completions.create(
                model="glm-4.6", stream=True, messages=_ask("vllm_error_with_usage")):
            pass
    entry = _entry(database, key)
    assert (entry["state"], entry["estimated"], entry["prompt_tokens"], entry["completion_tokens"]) == \
        ("posted", False, 40, 9)


def test_chat_done_without_a_finish_reason_is_not_a_whole_answer(scripted_bridge, database):
    key = new_user(database)
    with pytest.raises(openai.APIError) as raised:
        for _ in _chat(scripted_bridge, key).chat.completions.create(
                model="glm-4.6", stream=True, messages=_ask("done_without_finish")):
            pass
    assert raised.value.code == "stream_unfinished"
    assert _entry(database, key)["state"] == "posted"


# ---- reasoning and nothing else ------------------------------------------------------------

def test_chat_reasoning_only_answer_is_a_retryable_error_not_an_empty_turn(scripted_bridge, database):
    key = new_user(database)
    content, reasoning = "", ""
    with pytest.raises(openai.APIError) as raised:
        for chunk in _chat(scripted_bridge, key).chat.completions.create(
                model="glm-4.6", stream=True, messages=_ask("reasoning_only")):
            for choice in chunk.choices:
                content += choice.delta.content or ""
                reasoning += getattr(choice.delta, "reasoning_content", None) or ""
    assert content == "" and reasoning  # the thinking went out as it came
    assert raised.value.code == "empty_response"
    # the upstream reported usage: the work it did is billed at its word
    entry = _entry(database, key)
    assert (entry["state"], entry["estimated"], entry["completion_tokens"]) == ("posted", False, 12)


def test_messages_reasoning_only_answer_is_an_error_not_end_turn(scripted_bridge, database):
    key = new_user(database)
    with pytest.raises(anthropic.APIError):
        with _messages(scripted_bridge, key).messages.stream(
                model="glm-4.6", max_tokens=200, messages=_ask("reasoning_only")) as stream:
            stream.get_final_message()


# ---- parallel calls reusing index 0 --------------------------------------------------------

_TOOLS = [{"type": "function", "function": {"name": "read_file", "parameters": {
    "type": "object", "properties": {"path": {"type": "string"}}}}}]


def test_chat_parallel_calls_reusing_index_zero_arrive_as_two_whole_calls(scripted_bridge, database):
    key = new_user(database)
    calls: dict[int, dict] = {}
    finish = None
    for chunk in _chat(scripted_bridge, key).chat.completions.create(
            model="glm-4.6", stream=True, messages=_ask("parallel_index_zero"), tools=_TOOLS):
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for call in choice.delta.tool_calls or ():
                slot = calls.setdefault(call.index, {"id": None, "name": "", "arguments": ""})
                slot["id"] = call.id or slot["id"]
                slot["name"] += call.function.name or ""
                slot["arguments"] += call.function.arguments or ""
    assert finish == "tool_calls"
    assert [(c["id"], c["name"], json.loads(c["arguments"])) for c in calls.values()] == [
        ("call_A", "read_file", {"path": "a.py"}), ("call_B", "read_file", {"path": "b.py"})]


def test_messages_parallel_calls_reusing_index_zero_are_two_tool_uses(scripted_bridge, database):
    key = new_user(database)
    with _messages(scripted_bridge, key).messages.stream(
            model="glm-4.6", max_tokens=200, messages=_ask("parallel_index_zero"),
            tools=[{"name": "read_file", "input_schema": _TOOLS[0]["function"]["parameters"]}]) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use"
    assert [(b.id, b.input) for b in final.content if b.type == "tool_use"] == [
        ("call_A", {"path": "a.py"}), ("call_B", {"path": "b.py"})]


# ---- usage counts out of any ledger's range -----------------------------------------------

def test_upstream_counts_out_of_range_are_clamped_once_and_settle(scripted_bridge, database):
    key = new_user(database)
    shown = None
    for chunk in _chat(scripted_bridge, key).chat.completions.create(
            model="glm-4.6", stream=True, messages=_ask("wild_usage"),
            stream_options={"include_usage": True}):
        shown = chunk.usage or shown
    assert (shown.prompt_tokens, shown.completion_tokens) == (MAX_COUNT, 0)
    entry = _entry(database, key)  # waits until nothing is pending: a settlement that fails hangs here
    assert (entry["state"], entry["prompt_tokens"], entry["completion_tokens"], entry["cached_tokens"]) == \
        ("posted", MAX_COUNT, 0, MAX_COUNT)
