"""The sans-I/O translators, fed recorded GLM transcripts: no sockets, no servers."""
from __future__ import annotations

import json
import random
from pathlib import Path

import msgspec
import pytest

from bridge import glm, sse, wire
from bridge.errors import BridgeError, Kind
from bridge.metering import StreamMeter
from bridge.surfaces import chat, messages

FIXTURES = Path(__file__).parent / "fixtures"


def glm_chunks(name: str, split_seed: int | None = None) -> list[wire.Chunk]:
    """The transcript's chunks, fed to the SSE decoder in random pieces when a seed is given."""
    data = (FIXTURES / name).read_bytes()
    pieces = [data]
    if split_seed is not None:
        rng = random.Random(split_seed)
        cuts = sorted(rng.sample(range(1, len(data)), 25))
        pieces = [data[a:b] for a, b in zip([0] + cuts, cuts + [len(data)])]
    decoder = sse.SSEDecoder()
    events = [e for piece in pieces for e in decoder.feed(piece)]
    assert not decoder.pending()
    assert events[-1].data == b"[DONE]"
    return [wire.chunk_decoder.decode(e.data) for e in events[:-1]]


def translate(chunks: list[wire.Chunk], translator, *, done: bool = True) -> tuple[bytes, StreamMeter]:
    """What the journey does with an upstream stream: normalise, translate, end it."""
    meter = StreamMeter()
    normalizer = glm.StreamNormalizer("call_test_")
    out = translator.start()
    for chunk in chunks:
        meter.observe(chunk, delivered=True)
        out += translator.feed(normalizer.feed(chunk))
    if done:
        normalizer.done()
    tail, outcome = normalizer.close()
    out += translator.feed(tail)
    if outcome.complete:
        out += translator.finish(outcome.reason, meter.completed_usage() or wire.Usage())
    else:
        out += translator.fail(outcome.error)
    return out, meter


def relay(name: str, translator, split_seed: int | None = None) -> tuple[list[sse.Event], StreamMeter]:
    out, meter = translate(glm_chunks(name, split_seed), translator)
    return sse.SSEDecoder().feed(out), meter


def openai_chunks(events: list[sse.Event]) -> list[dict]:
    assert events[-1].data == b"[DONE]"
    return [json.loads(e.data) for e in events[:-1]]


# ---- SSE framing ----------------------------------------------------------------------------

def test_sse_decoder_handles_crlf_comments_multiline_and_split_feeds():
    raw = b": keep-alive\r\nevent: ping\r\ndata: {\"a\":\r\ndata: 1}\r\n\r\ndata: x\n\n"
    for cut in range(len(raw)):
        decoder = sse.SSEDecoder()
        events = decoder.feed(raw[:cut]) + decoder.feed(raw[cut:])
        assert events == [sse.Event(b'{"a":\n1}', "ping"), sse.Event(b"x", None)], cut
    decoder = sse.SSEDecoder()
    decoder.feed(b"data: cut off")
    assert decoder.pending()


# ---- Chat Completions -------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [None, 1, 2])
def test_chat_reasoning_then_text(seed):
    events, meter = relay("glm_reasoning_text.sse", chat.ChatStream("glm-4.6", "r1"), seed)
    chunks = openai_chunks(events)
    assert all(isinstance(c["choices"], list) for c in chunks)
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert deltas[0]["role"] == "assistant" and all("role" not in d for d in deltas[1:])
    assert "".join(d.get("reasoning_content", "") for d in deltas) == "The user wants a greeting."
    assert "".join(d.get("content", "") for d in deltas) == "Hello, world!"
    assert all("reasoning" not in d for d in deltas)  # only reasoning_content (clients.md §9)
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "stop"
    last = chunks[-1]
    assert last["choices"] == []
    assert last["usage"]["prompt_tokens"] == 21 and last["usage"]["completion_tokens"] == 9
    assert last["usage"]["prompt_tokens_details"] == {"cached_tokens": 16, "cache_write_tokens": 0}
    assert last["usage"]["cache_read_input_tokens"] == 16 and last["usage"]["cache_creation_input_tokens"] == 0
    assert last["usage"]["completion_tokens_details"]["reasoning_tokens"] == meter.reasoning_tokens() > 0
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == "chatcmpl-r1" for c in chunks)


def _tool_calls(chunks: list[dict]) -> dict[int, dict]:
    calls: dict[int, dict] = {}
    for c in chunks:
        for choice in c["choices"]:
            for call in choice["delta"].get("tool_calls", []):
                index = call["index"]
                if index not in calls:
                    # the first delta of a call carries id, type and name (Cline, Roo)
                    assert call["id"] and call["type"] == "function" and call["function"]["name"]
                    calls[index] = {"id": call["id"], "name": call["function"]["name"], "arguments": ""}
                else:
                    assert "id" not in call and "name" not in call["function"]
                calls[index]["arguments"] += call["function"].get("arguments", "")
    return calls


def test_chat_parallel_tool_calls():
    chunks = openai_chunks(relay("glm_parallel_tools.sse", chat.ChatStream("glm-4.6", "r2"))[0])
    calls = _tool_calls(chunks)
    assert [(c["id"], c["name"], json.loads(c["arguments"])) for c in calls.values()] == [
        ("call_a1", "read_file", {"path": "a.py"}), ("call_b2", "read_file", {"path": "b.py"})]
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "tool_calls"


def test_chat_tool_without_arguments_gets_empty_object():
    chunks = openai_chunks(relay("glm_tool_empty_args.sse", chat.ChatStream("glm-4.6", "r3"))[0])
    assert _tool_calls(chunks)[0]["arguments"] == "{}"


def test_chat_tool_call_missing_id_gets_one_and_finish_becomes_tool_calls():
    chunks = openai_chunks(relay("glm_tool_id_late.sse", chat.ChatStream("glm-4.6", "r4"))[0])
    call = _tool_calls(chunks)[0]
    assert call["id"].startswith("call_") and json.loads(call["arguments"]) == {"dir": "."}
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "tool_calls"


def test_chat_sensitive_stop_is_surfaced():
    chunks = openai_chunks(relay("glm_sensitive.sse", chat.ChatStream("glm-4.6", "r5"))[0])
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "content_filter"
    assert chunks[-1]["usage"]["completion_tokens"] == 3


def test_chat_usage_in_a_trailing_chunk():
    chunks = openai_chunks(relay("glm_usage_only_last.sse", chat.ChatStream("glm-4.6", "r6"))[0])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] == 14
    assert sum(1 for c in chunks if c.get("usage")) == 1


def test_chat_network_error_finish_is_an_error_not_a_clean_end():
    out, _ = translate([wire.Chunk(choices=[wire.ChunkChoice(delta=wire.Delta(content="par"))]),
                        wire.Chunk(choices=[wire.ChunkChoice(finish_reason="network_error")])],
                       chat.ChatStream("glm-4.6", "r8"))
    events = sse.SSEDecoder().feed(out)
    assert events[-1].data != b"[DONE]"
    assert json.loads(events[-1].data)["error"]["code"] == "network_error"


def test_chat_failure_mid_stream_is_an_openai_error_without_done():
    stream = chat.ChatStream("glm-4.6", "r7")
    events = sse.SSEDecoder().feed(stream.fail(BridgeError(Kind.upstream_error, "broke off", code="network_error")))
    assert [json.loads(e.data) for e in events] == [{"error": {
        "message": "broke off", "type": "server_error", "param": None, "code": "network_error"}}]


def test_chat_request_adapted_to_what_glm_accepts():
    body = {
        "model": "GLM-4.6", "stream": True, "stream_options": {"include_usage": False},
        "max_completion_tokens": 500, "reasoning_effort": "high", "parallel_tool_calls": False,
        "tool_choice": {"type": "function", "function": {"name": "read"}}, "stop": ["END"],
        "prompt_cache_key": "abc", "chat_template_args": {"x": 1}, "seed": 7, "n": 1, "user": "u",
        "messages": [
            {"role": "developer", "content": [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}]},
            {"role": "user", "content": [{"type": "text", "text": "Read a.py"}]},
            {"role": "assistant", "content": "", "reasoning_content": "I will read it.",
             "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "read", "arguments": ""}}]},
            {"role": "tool", "tool_call_id": "c1", "content": [{"type": "text", "text": "print(1)"}]},
        ],
        "tools": [{"type": "function", "function": {"name": "read", "strict": True, "parameters": {
            "type": "object", "properties": {"path": {"type": ["string", "null"]}}, "required": ["path"],
            "additionalProperties": False}}}],
    }
    parsed = chat.parse_request(json.dumps(body).encode())
    assert chat.requested_max_tokens(parsed) == 500
    upstream = glm.prepare(chat.to_upstream(parsed))
    upstream.max_tokens = 500
    sent = json.loads(wire.encoder.encode(upstream))
    assert sent["model"] == "GLM-4.6" and sent["max_tokens"] == 500 and sent["stream"] is True
    assert sent["thinking"] == {"type": "enabled"} and sent["tool_choice"] == "auto"
    assert sent["stop"] == ["END"] and sent["tool_stream"] is True
    for dropped in ("parallel_tool_calls", "stream_options", "prompt_cache_key", "seed", "n",
                    "max_completion_tokens", "reasoning_effort", "chat_template_args"):
        assert dropped not in sent
    roles = [m["role"] for m in sent["messages"]]
    assert roles == ["system", "user", "assistant", "tool"]
    assert sent["messages"][0]["content"] == "Be brief."
    assistant = sent["messages"][2]
    assert assistant["reasoning_content"] == "I will read it." and assistant["content"] is None
    assert assistant["tool_calls"][0]["function"]["arguments"] == "{}"
    assert sent["messages"][3] == {"role": "tool", "content": "print(1)", "tool_call_id": "c1"}
    assert sent["tools"][0]["function"]["parameters"]["properties"]["path"]["type"] == ["string", "null"]
    assert "strict" not in sent["tools"][0]["function"]


@pytest.mark.parametrize("knobs,expected", [
    ({"thinking": {"type": "disabled"}}, {"type": "disabled"}),
    ({"thinking": {"type": "enabled", "clear_thinking": False}}, {"type": "enabled"}),
    ({"reasoning_effort": "none"}, {"type": "disabled"}),
    ({"reasoning": {"enabled": False}}, {"type": "disabled"}),
    ({"reasoning": {"effort": "medium"}}, {"type": "enabled"}),
    ({"reasoning": {"exclude": True}}, None),
    ({}, None),
])
def test_chat_thinking_from_any_reasoning_knob(knobs, expected):
    parsed = chat.parse_request(json.dumps({"model": "glm-4.6", "messages": [{"role": "user", "content": "x"}],
                                            **knobs}).encode())
    sent = json.loads(wire.encoder.encode(glm.prepare(chat.to_upstream(parsed))))
    assert sent.get("thinking") == expected


def test_chat_tool_choice_none_sends_no_tools():
    parsed = chat.parse_request(json.dumps({
        "model": "glm-4.6", "messages": [{"role": "user", "content": "x"}], "tool_choice": "none",
        "tools": [{"type": "function", "function": {"name": "t"}}]}).encode())
    assert "tools" not in json.loads(wire.encoder.encode(glm.prepare(chat.to_upstream(parsed))))


# ---- Anthropic Messages -----------------------------------------------------------------------

def anthropic_events(name: str, seed: int | None = None) -> list[tuple[str, dict]]:
    events, _ = relay(name, messages.MessagesStream("glm-4.6", "m1", prompt_estimate=20), seed)
    parsed = [(e.event, json.loads(e.data)) for e in events]
    assert all(name == body["type"] for name, body in parsed)  # every event line matches its data
    return parsed


def _check_block_structure(events: list[tuple[str, dict]]) -> list[dict]:
    """message_start first; blocks with increasing index, each started, delta'd, stopped; then
    message_delta and message_stop. Returns the assembled blocks."""
    assert events[0][0] == "message_start" and events[-1][0] == "message_stop"
    assert events[-2][0] == "message_delta"
    blocks: list[dict] = []
    open_index = None
    for name, body in events[1:-2]:
        if name == "content_block_start":
            assert open_index is None and body["index"] == len(blocks)
            open_index = body["index"]
            blocks.append(dict(body["content_block"], partial_json=""))
        elif name == "content_block_delta":
            assert body["index"] == open_index
            delta = body["delta"]
            block = blocks[open_index]
            if delta["type"] == "text_delta":
                block["text"] += delta["text"]
            elif delta["type"] == "thinking_delta":
                block["thinking"] += delta["thinking"]
            elif delta["type"] == "signature_delta":
                block["signature"] = delta["signature"]
            elif delta["type"] == "input_json_delta":
                block["partial_json"] += delta["partial_json"]
        elif name == "content_block_stop":
            assert body["index"] == open_index
            open_index = None
    assert open_index is None
    return blocks


@pytest.mark.parametrize("seed", [None, 3])
def test_messages_thinking_then_text(seed):
    events = anthropic_events("glm_reasoning_text.sse", seed)
    start = events[0][1]["message"]
    assert start["usage"]["input_tokens"] == 20 and start["role"] == "assistant" and start["content"] == []
    blocks = _check_block_structure(events)
    assert [b["type"] for b in blocks] == ["thinking", "text"]
    assert blocks[0]["thinking"] == "The user wants a greeting." and blocks[0]["signature"]
    assert blocks[1]["text"] == "Hello, world!"
    delta = events[-2][1]
    assert delta["delta"]["stop_reason"] == "end_turn"
    # Anthropic's input_tokens excludes cache reads
    assert delta["usage"] == {"input_tokens": 5, "output_tokens": 9, "cache_creation_input_tokens": 0,
                              "cache_read_input_tokens": 16}


def test_messages_parallel_tool_use_blocks_have_valid_json():
    blocks = _check_block_structure(anthropic_events("glm_parallel_tools.sse"))
    assert [b["type"] for b in blocks] == ["thinking", "tool_use", "tool_use"]
    assert [(b["id"], b["name"], json.loads(b["partial_json"])) for b in blocks[1:]] == [
        ("call_a1", "read_file", {"path": "a.py"}), ("call_b2", "read_file", {"path": "b.py"})]


def test_messages_tool_without_arguments_and_stop_reason():
    events = anthropic_events("glm_tool_empty_args.sse")
    blocks = _check_block_structure(events)
    assert json.loads(blocks[0]["partial_json"]) == {}
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"
    late = anthropic_events("glm_tool_id_late.sse")
    assert _check_block_structure(late)[0]["id"].startswith("call_")
    assert late[-2][1]["delta"]["stop_reason"] == "tool_use"


def test_messages_sensitive_is_a_refusal():
    events = anthropic_events("glm_sensitive.sse")
    assert events[-2][1]["delta"]["stop_reason"] == "refusal"


def test_messages_network_error_finish_is_an_error_event():
    out, _ = translate([wire.Chunk(choices=[wire.ChunkChoice(delta=wire.Delta(content="partial"))]),
                        wire.Chunk(choices=[wire.ChunkChoice(finish_reason="network_error")],
                                   usage=wire.Usage(prompt_tokens=5, completion_tokens=1, total_tokens=6))],
                       messages.MessagesStream("glm-4.6", "m3", 1))
    names = [e.event for e in sse.SSEDecoder().feed(out)]
    assert names[-2:] == ["content_block_stop", "error"] and "message_stop" not in names


def test_messages_error_and_ping_events():
    stream = messages.MessagesStream("glm-4.6", "m2", 1)
    [event] = sse.SSEDecoder().feed(stream.fail(BridgeError(Kind.upstream_overloaded, "busy")))
    assert event.event == "error"
    assert json.loads(event.data) == {"type": "error", "error": {"type": "overloaded_error", "message": "busy"}}
    [ping] = sse.SSEDecoder().feed(stream.keepalive)
    assert (ping.event, json.loads(ping.data)) == ("ping", {"type": "ping"})


def test_messages_request_translation():
    body = {
        "model": "claude-sonnet-4-5-20250929", "max_tokens": 32000, "stream": True,
        "system": [{"type": "text", "text": "You are Claude Code."},
                   {"type": "text", "text": "Be careful.", "cache_control": {"type": "ephemeral"}}],
        "thinking": {"type": "adaptive"}, "output_config": {"effort": "high"},
        "context_management": {"edits": []}, "metadata": {"user_id": "{\"session\": 1}"},
        "stop_sequences": ["</done>"], "tool_choice": {"type": "any"},
        "some_future_field": {"x": 1},
        "tools": [{"name": "Read", "description": "Read a file", "input_schema": {
            "type": "object", "properties": {"file_path": {"type": "string"}}, "required": ["file_path"]}},
            {"type": "web_search_20250305", "name": "web_search", "max_uses": 5}],
        "messages": [
            {"role": "user", "content": "Read a.py"},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "Need the file.", "signature": "sig"},
                {"type": "text", "text": "Reading."},
                {"type": "tool_use", "id": "toolu_1", "name": "Read", "input": {"file_path": "a.py"}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "cache_control": {"type": "ephemeral"},
                 "content": [{"type": "text", "text": "print(1)"}]},
                {"type": "text", "text": "<system-reminder>be brief</system-reminder>"}]},
            {"role": "system", "content": "A mid-conversation system note."},
            {"role": "user", "content": [{"type": "image", "source": {
                "type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
                {"type": "text", "text": "And this?"}]},
        ],
    }
    request = messages.parse_request(json.dumps(body).encode())
    sent = json.loads(wire.encoder.encode(glm.prepare(messages.to_upstream(request))))
    assert sent["thinking"] == {"type": "enabled"} and sent["tool_choice"] == "auto"
    assert sent["stop"] == ["</done>"]
    assert [t["function"]["name"] for t in sent["tools"]] == ["Read"]  # server tools dropped
    roles = [m["role"] for m in sent["messages"]]
    assert roles == ["system", "user", "assistant", "tool", "user", "system", "user"]
    assert sent["messages"][0]["content"] == "You are Claude Code.\nBe careful."
    assistant = sent["messages"][2]
    assert assistant["reasoning_content"] == "Need the file." and assistant["content"] == "Reading."
    assert json.loads(assistant["tool_calls"][0]["function"]["arguments"]) == {"file_path": "a.py"}
    assert sent["messages"][3] == {"role": "tool", "content": "print(1)", "tool_call_id": "toolu_1"}
    image_turn = sent["messages"][6]["content"]
    assert image_turn[0]["type"] == "image_url"
    assert image_turn[0]["image_url"]["url"].startswith("data:image/png;base64,")
    for dropped in ("output_config", "context_management", "metadata", "some_future_field"):
        assert dropped not in sent
    long_id = json.dumps({"device_id": "d" * 64, "account_uuid": "a" * 36, "session_id": "s" * 36})
    assert sent["user_id"] == "{\"session\": 1}"  # 14 characters: GLM takes it as it is
    assert glm.user_id(long_id).startswith("u-") and len(glm.user_id(long_id)) == 42
    assert glm.user_id("abc") == glm.user_id("abc") != "abc"
    disabled = messages.parse_request(json.dumps({**body, "thinking": {"type": "disabled"},
                                                  "tool_choice": {"type": "none"}}).encode())
    sent = json.loads(wire.encoder.encode(glm.prepare(messages.to_upstream(disabled))))
    assert sent["thinking"] == {"type": "disabled"} and "tools" not in sent


def test_messages_errors_in_anthropic_shape():
    status, headers, body = messages.error_response(BridgeError(
        Kind.context_length, "x", limit=204800, requested=250000))
    assert status == 400 and json.loads(body) == {"type": "error", "error": {
        "type": "invalid_request_error", "message": "prompt is too long: 250000 tokens > 204800 maximum"}}
    status, headers, body = messages.error_response(BridgeError(Kind.quota_exhausted, "reset at ...", retry_after=9000))
    assert status == 429 and headers["retry-after"] == "60" and headers["x-should-retry"] == "false"
    status, headers, _ = messages.error_response(BridgeError(Kind.upstream_rate_limited, "slow", retry_after=2))
    assert (status, headers["retry-after"], headers["x-should-retry"]) == (429, "2", "true")
    assert messages.error_response(BridgeError(Kind.upstream_overloaded, "busy"))[0] == 529
    assert json.loads(messages.error_response(BridgeError(Kind.upstream_billing, "no"))[2])["error"]["type"] == "billing_error"
