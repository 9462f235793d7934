"""The Responses surface, sans I/O: requests as Codex and the openai SDK send them, GLM
transcripts (whole and split anywhere) turned into the event stream Codex parses, generated
upstream streams, errors, and the WebSocket session's frames and memory."""
from __future__ import annotations

import json
import re

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge import glm, sse, wire
from bridge.errors import BridgeError, Kind
from bridge.surfaces import responses, responses_socket
from bridge.surfaces.responses import ResponsesSurface

from .test_normalizer import _framed, _relay_bytes, upstream_streams
from .test_translators import glm_chunks, translate

TERMINAL = ("response.completed", "response.incomplete", "response.failed")
# what Codex reads a retry delay from (codex-rs sse/responses.rs, rate_limit_regex)
CODEX_RETRY = re.compile(r"(?i)try again in\s*(\d+(?:\.\d+)?)\s*(s|ms|seconds?)")

READ_FILE = {"type": "function", "name": "read_file", "description": "Read a file",
             "parameters": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}}
APPLY_PATCH = {"type": "custom", "name": "apply_patch", "description": "Edit files with a patch",
               "format": {"type": "grammar", "syntax": "lark", "definition": "start: begin_patch hunk+ end_patch"}}


def surface(body: dict) -> ResponsesSurface:
    s = ResponsesSurface()
    s.parse(json.dumps(body).encode())
    return s


def glm_request(body: dict) -> dict:
    parsed = ResponsesSurface().parse(json.dumps(body).encode())
    return json.loads(wire.encoder.encode(glm.prepare(parsed.request)))


def events_of(out: bytes) -> list[dict]:
    events = sse.SSEDecoder().feed(out)
    parsed = [json.loads(e.data) for e in events]
    assert all(e.event == p["type"] for e, p in zip(events, parsed))  # event lines match the data
    return parsed


def check_stream(events: list[dict]) -> dict:
    """The invariants Codex and the SDK rely on; returns the terminal response and what the
    deltas assembled, per output index."""
    assert [e["type"] for e in events[:2]] == ["response.created", "response.in_progress"]
    assert events[0]["response"]["status"] == "in_progress" and events[0]["response"]["output"] == []
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    terminals = [e for e in events if e["type"] in TERMINAL]
    assert len(terminals) == 1 and events[-1] is terminals[0]
    ids = {e["response"]["id"] for e in events if "response" in e}
    assert len(ids) == 1
    added: dict[int, dict] = {}
    done: dict[int, dict] = {}
    text: dict[int, str] = {}
    open_parts: set[tuple[int, int]] = set()
    for event in events[2:-1]:
        kind = event["type"]
        index = event.get("output_index")
        if kind == "response.output_item.added":
            assert index == len(added) and index not in done
            added[index] = event["item"]
            text[index] = ""
            continue
        assert index in added and index not in done, event  # every event is about an open item
        item_id = added[index]["id"]
        if "item_id" in event:
            assert event["item_id"] == item_id
        if kind == "response.output_item.done":
            assert event["item"]["id"] == item_id and event["item"]["type"] == added[index]["type"]
            assert not any(i == index for i, _ in open_parts)
            done[index] = event["item"]
        elif kind == "response.content_part.added":
            open_parts.add((index, event["content_index"]))
        elif kind == "response.content_part.done":
            open_parts.remove((index, event["content_index"]))
        elif kind in ("response.output_text.delta", "response.reasoning_text.delta",
                      "response.function_call_arguments.delta", "response.custom_tool_call_input.delta"):
            text[index] += event["delta"]
    final = events[-1]["response"]
    assert final["output"] == [done[i] for i in sorted(done)]  # the output is what was done
    for index, item in done.items():
        if item["type"] == "message":
            assert item["content"][0]["text"] == text[index]
        elif item["type"] == "reasoning":
            assert item["content"][0]["text"] == text[index]
        elif item["type"] == "function_call":
            assert item["arguments"] == text[index]
        elif item["type"] == "custom_tool_call":
            assert item["input"] == text[index]
    if events[-1]["type"] == "response.completed":
        assert final["status"] == "completed" and set(done) == set(added)
        assert final["usage"]["total_tokens"] == final["usage"]["input_tokens"] + final["usage"]["output_tokens"]
    elif events[-1]["type"] == "response.incomplete":
        assert final["status"] == "incomplete" and final["incomplete_details"]["reason"]
        # a call cut off is never reported done: Codex would run it
        assert all(item["type"] in ("message", "reasoning") for item in final["output"])
    else:
        assert final["status"] == "failed" and final["error"]["code"] and final["error"]["message"]
        assert all(item["type"] in ("message", "reasoning") for item in final["output"])
    return final


def stream_of(name: str, body: dict | None = None, seed: int | None = None) -> tuple[list[dict], dict]:
    s = surface(body or {"model": "glm-4.6", "input": "hi", "tools": [READ_FILE]})
    out, _ = translate(glm_chunks(name, seed), s.stream("glm-4.6", "r1", 10))
    events = events_of(out)
    return events, check_stream(events)


def call_chunks(name: str, arguments: str, pieces: int = 3, finish: str | None = "tool_calls",
                call_id: str = "call_x") -> list[wire.Chunk]:
    step = max(1, len(arguments) // pieces)
    parts = [arguments[i:i + step] for i in range(0, len(arguments), step)]
    chunks = [wire.Chunk(choices=[wire.ChunkChoice(delta=wire.Delta(tool_calls=[wire.ToolCallDelta(
        index=0, id=call_id, type="function", function=wire.FunctionDelta(name=name, arguments=""))]))])]
    chunks += [wire.Chunk(choices=[wire.ChunkChoice(delta=wire.Delta(tool_calls=[wire.ToolCallDelta(
        index=0, function=wire.FunctionDelta(arguments=p))]))]) for p in parts]
    if finish:
        chunks.append(wire.Chunk(choices=[wire.ChunkChoice(finish_reason=finish)],
                                 usage=wire.Usage(prompt_tokens=50, completion_tokens=20, total_tokens=70)))
    return chunks


# ---- requests -------------------------------------------------------------------------------

CODEX_BODY = {
    "model": "glm-4.6", "stream": True, "tool_choice": "auto", "parallel_tool_calls": True,
    "reasoning": {"effort": "high", "summary": "auto"}, "store": False,
    "include": ["reasoning.encrypted_content"], "prompt_cache_key": "thread-1",
    "text": {"verbosity": "low"}, "service_tier": "auto", "metadata": {"a": "b"},
    "client_metadata": {"thread_id": "t"}, "some_future_field": [1, 2],
    "input": [
        {"type": "message", "id": "msg_1", "role": "developer",
         "content": [{"type": "input_text", "text": "You are Codex."}]},
        {"type": "message", "role": "user", "content": [
            {"type": "input_text", "text": "<environment_context/>"}]},
        {"type": "message", "role": "user", "content": [
            {"type": "input_text", "text": "Fix it."},
            {"type": "input_image", "image_url": "data:image/png;base64,iVBORw0KGgo=", "detail": "auto"}]},
        {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": "sum"}],
         "encrypted_content": responses.seal_reasoning("I should read it.")},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Reading."}]},
        {"type": "function_call", "call_id": "c1", "name": "exec_command", "arguments": "{\"cmd\":\"cat a\"}"},
        {"type": "function_call", "call_id": "c2", "name": "spawn", "namespace": "agents", "arguments": ""},
        {"type": "function_call_output", "call_id": "c1", "output": "a = 1"},
        {"type": "function_call_output", "call_id": "c2", "output": [
            {"type": "input_text", "text": "spawned"}, {"type": "input_image", "image_url": "data:,"}]},
        {"type": "reasoning", "id": "rs_2", "summary": [], "encrypted_content": "gAAAA-someone-elses"},
        {"type": "custom_tool_call", "call_id": "c3", "name": "apply_patch", "input": "*** Begin Patch\n*** End Patch"},
        {"type": "custom_tool_call_output", "call_id": "c3", "output": "Done!"},
        {"type": "local_shell_call", "id": "lsh_1", "call_id": "c4", "status": "completed",
         "action": {"type": "exec", "command": ["ls", "-a"], "env": {}, "timeout_ms": 1000}},
        {"type": "local_shell_call_output", "id": "c4", "output": "a\nb"},
        {"type": "item_reference", "id": "x"},
        {"type": "web_search_call", "status": "completed", "action": {"type": "search", "query": "q"}},
    ],
    "tools": [
        {"type": "function", "name": "exec_command", "strict": False, "parameters": {
            "type": "object", "properties": {"cmd": {"type": "string"}}, "required": ["cmd"]}},
        {"type": "namespace", "name": "agents", "description": "Sub-agents", "tools": [
            {"type": "function", "name": "spawn", "parameters": {"type": "object", "properties": {}}}]},
        APPLY_PATCH, {"type": "local_shell"}, {"type": "web_search", "external_web_access": False},
        {"type": "file_search", "vector_store_ids": ["v"]},
    ],
}


def test_codex_request_becomes_one_glm_request():
    sent = glm_request(CODEX_BODY)
    roles = [m["role"] for m in sent["messages"]]
    assert roles == ["system", "user", "user", "assistant", "tool", "tool", "user", "assistant", "tool",
                     "assistant", "tool"]
    assert sent["messages"][0] == {"role": "system", "content": "You are Codex."}
    image_turn = sent["messages"][2]["content"]
    assert image_turn[0] == {"type": "text", "text": "Fix it."}
    assert image_turn[1] == {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
    # the text and the calls after it are one assistant turn, with its replayed reasoning
    turn = sent["messages"][3]
    assert turn["content"] == "Reading." and turn["reasoning_content"] == "I should read it."
    assert [(c["id"], c["function"]["name"], c["function"]["arguments"]) for c in turn["tool_calls"]] == [
        ("c1", "exec_command", "{\"cmd\":\"cat a\"}"), ("c2", "agents__spawn", "{}")]
    assert sent["messages"][4] == {"role": "tool", "content": "a = 1", "tool_call_id": "c1"}
    # a tool's image: marked in its text, shown in a user message after the turn's tool messages
    assert sent["messages"][5] == {"role": "tool", "content": "spawned\n[image: shown in the message after "
                                   "the tool results]", "tool_call_id": "c2"}
    assert sent["messages"][6] == {"role": "user", "content": [
        {"type": "text", "text": "The image output by tool call c2:"},
        {"type": "image_url", "image_url": {"url": "data:,"}}]}
    # someone else's encrypted reasoning is dropped; a custom call carries its text as `input`
    custom = sent["messages"][7]
    assert custom["content"] is None and "reasoning_content" not in custom
    assert json.loads(custom["tool_calls"][0]["function"]["arguments"]) == {"input": "*** Begin Patch\n*** End Patch"}
    shell = sent["messages"][9]["tool_calls"][0]
    assert (shell["id"], shell["function"]["name"]) == ("c4", "local_shell")
    assert json.loads(shell["function"]["arguments"]) == {"command": ["ls", "-a"], "timeout_ms": 1000}
    assert sent["messages"][10] == {"role": "tool", "content": "a\nb", "tool_call_id": "c4"}
    # tools: hosted ones dropped, the rest as GLM functions
    tools = {t["function"]["name"]: t["function"] for t in sent["tools"]}
    assert list(tools) == ["exec_command", "agents__spawn", "apply_patch", "local_shell"]
    patch = tools["apply_patch"]["parameters"]
    assert patch["required"] == ["input"] and patch["properties"]["input"]["type"] == "string"
    assert "start: begin_patch" in patch["properties"]["input"]["description"]
    assert tools["local_shell"]["parameters"]["required"] == ["command"]
    assert "strict" not in tools["exec_command"]
    assert sent["thinking"] == {"type": "enabled"} and sent["tool_choice"] == "auto"
    assert sent["stream"] is True and sent["tool_stream"] is True
    for dropped in ("include", "store", "prompt_cache_key", "metadata", "service_tier", "text",
                    "client_metadata", "some_future_field", "parallel_tool_calls", "reasoning"):
        assert dropped not in sent


def test_string_input_instructions_and_knobs():
    sent = glm_request({"model": "glm-4.6", "instructions": "Be brief.", "input": "Hello",
                        "temperature": 3, "top_p": 0.5, "reasoning": {"effort": "minimal"},
                        "text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "object"}}},
                        "safety_identifier": "user-12345", "tools": [READ_FILE], "tool_choice": "none"})
    # the schema asked of GLM in a system message after the client's own (GLM knows json_object only)
    assert sent["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "system", "content": 'Answer with one JSON object matching this JSON Schema (x): {"type": "object"}'},
        {"role": "user", "content": "Hello"}]
    assert sent["temperature"] == 1.0 and sent["top_p"] == 0.5  # clamped to GLM's range
    assert sent["thinking"] == {"type": "disabled"} and sent["response_format"] == {"type": "json_object"}
    assert sent["user_id"] == "user-12345" and "tools" not in sent and "stream" not in sent  # false: left out
    assert "thinking" not in glm_request({"model": "glm-4.6", "input": "x", "reasoning": {"summary": "auto"}})
    required = glm_request({"model": "glm-4.6", "input": "x", "tools": [READ_FILE], "tool_choice": "required"})
    assert required["tool_choice"] == "auto"  # all GLM supports


@pytest.mark.parametrize("body,param", [
    ({"model": "glm-4.6", "input": "x", "max_output_tokens": 0}, "max_output_tokens"),
    ({"model": "glm-4.6", "input": []}, "input"),
    ({"model": "glm-4.6", "instructions": "only this", "input": ""}, "input"),
    ({"model": "glm-4.6", "input": "x", "previous_response_id": "resp_1"}, "previous_response_id"),
])
def test_request_faults_are_400s_naming_the_field(body, param):
    with pytest.raises(BridgeError) as raised:
        ResponsesSurface().parse(json.dumps(body).encode())
    assert raised.value.status == 400 and raised.value.param == param
    status, _, payload = ResponsesSurface().error(raised.value)
    assert status == 400 and json.loads(payload)["error"]["param"] == param


@pytest.mark.parametrize("raw", [b"{not json", b'{"model": 5}', b'{"model": "glm-4.6", "input": 7}'])
def test_malformed_bodies_are_400s(raw):
    with pytest.raises(BridgeError) as raised:
        ResponsesSurface().parse(raw)
    assert raised.value.kind is Kind.invalid_request


def test_max_output_tokens_is_the_clients_cap():
    parsed = ResponsesSurface().parse(b'{"model": "glm-4.6", "input": "x", "max_output_tokens": 77}')
    assert parsed.max_tokens == 77


def test_reasoning_seal_round_trip():
    sealed = responses.seal_reasoning("think \u2713")
    assert responses.open_reasoning(sealed) == "think \u2713"
    assert responses.open_reasoning("gAAAAB-openai") is None
    assert responses.open_reasoning(sealed[:-3] + "!!!") is None


# ---- streams from transcripts ---------------------------------------------------------------

@pytest.mark.parametrize("seed", [None, 1, 2])
@pytest.mark.parametrize("summary", [True, False])
def test_reasoning_then_text(seed, summary):
    body = {"model": "glm-4.6", "input": "hi", "include": ["reasoning.encrypted_content"]}
    if summary:
        body["reasoning"] = {"summary": "auto"}
    events, final = stream_of("glm_reasoning_text.sse", body, seed)
    reasoning, message = final["output"]
    assert reasoning["type"] == "reasoning" and reasoning["content"][0]["text"] == "The user wants a greeting."
    assert responses.open_reasoning(reasoning["encrypted_content"]) == "The user wants a greeting."
    assert message["content"][0]["text"] == "Hello, world!" and message["role"] == "assistant"
    summaries = "".join(e["delta"] for e in events if e["type"] == "response.reasoning_summary_text.delta")
    assert summaries == ("The user wants a greeting." if summary else "")
    assert all(e["summary_index"] == 0 for e in events if "summary_index" in e)
    assert all(e["content_index"] == 0 for e in events if "content_index" in e)
    assert final["usage"] == {"input_tokens": 21, "input_tokens_details": {"cached_tokens": 16, "cache_write_tokens": 0},
                              "output_tokens": 9, "output_tokens_details": {"reasoning_tokens": final["usage"][
                                  "output_tokens_details"]["reasoning_tokens"]}, "total_tokens": 30}
    assert final["usage"]["output_tokens_details"]["reasoning_tokens"] > 0


@pytest.mark.parametrize("seed", [None, 3, 4])
def test_parallel_tool_calls_whole_and_in_order(seed):
    events, final = stream_of("glm_parallel_tools.sse", seed=seed)
    calls = [o for o in final["output"] if o["type"] == "function_call"]
    assert [(c["call_id"], c["name"], json.loads(c["arguments"])) for c in calls] == [
        ("call_a1", "read_file", {"path": "a.py"}), ("call_b2", "read_file", {"path": "b.py"})]
    assert all(c["status"] == "completed" and c["id"].startswith("fc_") for c in calls)
    names = [e["type"] for e in events]
    # calls are reported done only with the whole answer, right before it ends
    assert names[-5:] == ["response.function_call_arguments.done", "response.output_item.done",
                          "response.function_call_arguments.done", "response.output_item.done",
                          "response.completed"]


@pytest.mark.parametrize("fixture", ["glm_interleaved_tools.sse", "glm_tool_id_late.sse"])
def test_interleaved_and_late_id_calls(fixture):
    _, final = stream_of(fixture, seed=5)
    calls = [o for o in final["output"] if o["type"] == "function_call"]
    assert calls and all(c["call_id"] and json.loads(c["arguments"]) for c in calls)


def test_tool_without_arguments_gets_empty_object():
    _, final = stream_of("glm_tool_empty_args.sse")
    assert [o["arguments"] for o in final["output"] if o["type"] == "function_call"] == ["{}"]


def test_sensitive_stop_is_a_failure_codex_does_not_retry():
    """Codex reads `response.incomplete` as a broken stream and sends the same turn again (each
    retry billed, each filtered alike); `invalid_prompt` it shows and does not retry (codex-rs
    codex-api/src/sse/responses.rs)."""
    events, final = stream_of("glm_sensitive.sse")
    assert events[-1]["type"] == "response.failed" and final["incomplete_details"] is None
    assert final["error"]["code"] == "invalid_prompt" and "content filter" in final["error"]["message"]
    assert final["usage"]["output_tokens"] == 3


CONTEXT_FULL = [wire.Chunk(choices=[wire.ChunkChoice(delta=wire.Delta(content="Let me read."))])] + [
    *call_chunks("read_file", '{"path": "a.py"}', finish=None),
    wire.Chunk(choices=[wire.ChunkChoice(delta=wire.Delta(), finish_reason="model_context_window_exceeded")],
               usage=wire.Usage(prompt_tokens=204000, completion_tokens=800, total_tokens=204800))]


def test_context_window_full_is_context_length_exceeded_codex_compacts_on():
    """GLM's `model_context_window_exceeded` finish: Codex compacts only on a response.failed
    with `context_length_exceeded`; as `response.incomplete` it would retry the same
    overflowing turn. What was whole (the text) is kept, the call is never reported done."""
    s = surface({"model": "glm-4.6", "input": "go", "tools": [READ_FILE]})
    out, _ = translate(CONTEXT_FULL, s.stream("glm-4.6", "w1", 1))
    events = events_of(out)
    final = check_stream(events)
    assert events[-1]["type"] == "response.failed" and final["error"]["code"] == "context_length_exceeded"
    assert "context window" in final["error"]["message"] and final["incomplete_details"] is None
    assert [o["type"] for o in final["output"]] == ["message"] and final["usage"]["input_tokens"] == 204000
    assert s.finished() is None  # a socket does not keep it for a next turn


@pytest.mark.parametrize("reason,code", [(glm.CONTEXT_WINDOW, "context_length_exceeded"),
                                         (glm.CONTENT_FILTER, "invalid_prompt")])
def test_non_streamed_answers_end_the_same_way(reason, code):
    events, _ = glm.completion_events(wire.completion_decoder.decode(json.dumps({
        "id": "x", "choices": [{"finish_reason": "stop", "message": {
            "role": "assistant", "content": "Part", "tool_calls": [{"id": "c1", "type": "function", "function": {
                "name": "read_file", "arguments": "{}"}}]}}]}).encode()), "call_n_")
    body = json.loads(surface({"model": "glm-4.6", "input": "x", "tools": [READ_FILE]}).complete(
        glm.Answer(events), reason, "glm-4.6", "w2", wire.Usage(prompt_tokens=9, completion_tokens=1, total_tokens=10)))
    assert (body["status"], body["error"]["code"], body["incomplete_details"]) == ("failed", code, None)
    assert [o["type"] for o in body["output"]] == ["message"]


def test_usage_in_a_trailing_chunk():
    _, final = stream_of("glm_usage_only_last.sse")
    assert final["usage"]["total_tokens"] == 14


def test_custom_tool_input_comes_back_as_free_text():
    patch = "*** Begin Patch\n*** Update File: a.py\n@@\n-x = \"1\"\n+x = \"2\"\n*** End Patch"
    s = surface({"model": "glm-4.6", "input": "edit", "tools": [READ_FILE, APPLY_PATCH]})
    out, _ = translate(call_chunks("apply_patch", json.dumps({"input": patch}), pieces=7), s.stream("glm-4.6", "c1", 1))
    events = events_of(out)
    final = check_stream(events)
    [call] = final["output"]
    assert (call["type"], call["name"], call["input"], call["call_id"]) == ("custom_tool_call", "apply_patch", patch, "call_x")
    assert call["id"].startswith("ctc_")
    assert not any(e["type"].startswith("response.function_call_arguments") for e in events)
    done = next(e for e in events if e["type"] == "response.custom_tool_call_input.done")
    assert done["input"] == patch and done["call_id"] == "call_x"


@pytest.mark.parametrize("arguments,expected", [
    ('{"input": "plain"}', "plain"), ('{"patch": "under another name"}', "under another name"),
    ('"a JSON string"', "a JSON string"), ("not json at all", "not json at all"),
    ('{"a": 1, "b": 2}', '{"a": 1, "b": 2}')])
def test_custom_input_is_recovered_from_what_the_model_wrote(arguments, expected):
    assert responses.custom_input(arguments) == expected


def test_namespaced_and_local_shell_calls_come_back_as_the_client_named_them():
    body = {"model": "glm-4.6", "input": "go", "tools": [
        {"type": "namespace", "name": "agents", "tools": [{"type": "function", "name": "spawn"}]},
        {"type": "local_shell"}]}
    s = surface(body)
    out, _ = translate(call_chunks("agents__spawn", '{"task": "x"}'), s.stream("glm-4.6", "n1", 1))
    [call] = check_stream(events_of(out))["output"]
    assert (call["name"], call["namespace"], call["arguments"]) == ("spawn", "agents", '{"task": "x"}')
    s = surface(body)
    out, _ = translate(call_chunks("local_shell", '{"command": ["ls", "-l"], "workdir": "/w"}'),
                       s.stream("glm-4.6", "n2", 1))
    [call] = check_stream(events_of(out))["output"]
    assert call["type"] == "local_shell_call" and call["id"].startswith("lsh_")
    assert call["action"] == {"type": "exec", "command": ["ls", "-l"], "timeout_ms": None,
                              "working_directory": "/w", "env": {}, "user": None}
    assert responses.shell_action('{"command": "ls -l"}').command == ["bash", "-lc", "ls -l"]


# ---- how streams end --------------------------------------------------------------------------

def test_a_broken_stream_fails_without_reporting_its_cut_call_done():
    s = surface({"model": "glm-4.6", "input": "go", "tools": [READ_FILE]})
    chunks = call_chunks("read_file", '{"path": "a.py"}', finish=None)[:-1]
    chunks.append(wire.Chunk(choices=[wire.ChunkChoice(finish_reason="network_error")]))
    out, _ = translate(chunks, s.stream("glm-4.6", "b1", 1))
    events = events_of(out)
    final = check_stream(events)
    assert events[-1]["type"] == "response.failed" and final["error"]["code"] == "server_error"
    assert "network_error" in final["error"]["message"] or "retry" in final["error"]["message"]
    assert not any(e["type"] == "response.output_item.done" and e["item"]["type"] == "function_call" for e in events)
    assert s.finished() is None


def test_a_stream_cut_off_fails():
    s = surface({"model": "glm-4.6", "input": "go"})
    out, _ = translate([wire.Chunk(choices=[wire.ChunkChoice(delta=wire.Delta(content="Hel"))])],
                       s.stream("glm-4.6", "b2", 1), done=False)
    events = events_of(out)
    final = check_stream(events)
    assert events[-1]["type"] == "response.failed" and final["output"] == []


def test_max_tokens_is_incomplete_and_keeps_no_cut_call():
    s = surface({"model": "glm-4.6", "input": "go", "tools": [READ_FILE]})
    chunks = [wire.Chunk(choices=[wire.ChunkChoice(delta=wire.Delta(content="Let me read."))])]
    chunks += call_chunks("read_file", '{"path": "a.p', finish="length")
    out, _ = translate(chunks, s.stream("glm-4.6", "l1", 1))
    events = events_of(out)
    final = check_stream(events)
    assert events[-1]["type"] == "response.incomplete"
    assert final["incomplete_details"] == {"reason": "max_output_tokens"}
    assert [o["type"] for o in final["output"]] == ["message"] and final["usage"]["output_tokens"] == 20


@pytest.mark.parametrize("finish,kept", [("tool_calls", ["function_call", "message", "function_call"]),
                                         ("length", ["message"])])
def test_items_are_done_in_output_order_when_text_follows_a_call(finish, kept):
    """GLM writes a call, then text, then another call. Codex adds items to its history in the
    order of their `output_item.done` and replays that order next turn: the text must not be
    done before the call ahead of it (which is done only once the answer is whole)."""
    s = surface({"model": "glm-4.6", "input": "go", "tools": [READ_FILE]})
    chunks = call_chunks("read_file", '{"path": "a.py"}', finish=None, call_id="call_a")
    chunks.append(wire.Chunk(choices=[wire.ChunkChoice(delta=wire.Delta(content="And then"))]))
    chunks.append(wire.Chunk(choices=[wire.ChunkChoice(delta=wire.Delta(content=" the other."))]))
    second = call_chunks("read_file", '{"path": "b.py"}', finish=finish, call_id="call_b")
    for chunk in second:
        for call in chunk.choices[0].delta.tool_calls or ():
            call.index = 1
    out, _ = translate(chunks + second, s.stream("glm-4.6", "o1", 1))
    events = events_of(out)
    final = check_stream(events)
    done = [e["output_index"] for e in events if e["type"] == "response.output_item.done"]
    assert done == sorted(done) and [o["type"] for o in final["output"]] == kept
    assert final["output"][kept.index("message")]["content"][0]["text"] == "And then the other."


def test_an_empty_answer_is_a_failure_codex_retries():
    s = surface({"model": "glm-4.6", "input": "go"})
    out, _ = translate([wire.Chunk(choices=[wire.ChunkChoice(delta=wire.Delta(content=""), finish_reason="stop")])],
                       s.stream("glm-4.6", "e1", 1))
    final = check_stream(events_of(out))
    assert final["error"]["code"] == "server_error"


@pytest.mark.parametrize("error,code,delay", [
    (BridgeError(Kind.context_length, "too long"), "context_length_exceeded", None),
    (BridgeError(Kind.upstream_billing, "no money"), "insufficient_quota", None),
    (BridgeError(Kind.payment_required, "pay"), "insufficient_quota", None),
    (BridgeError(Kind.upstream_rate_limited, "slow down", retry_after=2), "rate_limit_exceeded", 2.0),
    (BridgeError(Kind.concurrency, "too many", retry_after=0.3), "rate_limit_exceeded", 1.0),
    (BridgeError(Kind.quota_exhausted, "window full", retry_after=30), "rate_limit_exceeded", 30.0),
    (BridgeError(Kind.quota_exhausted, "window full", retry_after=9000), "insufficient_quota", None),
    (BridgeError(Kind.upstream_overloaded, "busy", retry_after=5), "server_error", None),
    (BridgeError(Kind.upstream_error, "broke"), "server_error", None),
    (BridgeError(Kind.content_policy, "unsafe"), "invalid_prompt", None),
])
def test_failures_read_as_codex_reads_them(error, code, delay):
    stream = responses.ResponsesStream(surface({"model": "glm-4.6", "input": "x"}).context, "glm-4.6", "resp_f")
    [event] = events_of(stream.fail(error))
    failed = event["response"]["error"]
    assert event["type"] == "response.failed" and failed["code"] == code and failed["message"].startswith(error.message)
    found = CODEX_RETRY.search(failed["message"]) if code == "rate_limit_exceeded" else None
    assert (float(found.group(1)) if found else None) == delay


def test_errors_before_the_stream_in_openai_shape():
    status, headers, body = responses.error_response(BridgeError(
        Kind.quota_exhausted, "Usage limit reached for the 5 hour window.", code="1308", retry_after=3600))
    error = json.loads(body)["error"]
    assert status == 429 and error["type"] == "usage_limit_reached" and error["code"] == "1308"
    assert headers["x-should-retry"] == "false"
    import time
    assert abs(error["resets_at"] - (time.time() + 3600)) < 5  # Codex shows when to come back
    status, headers, body = responses.error_response(BridgeError(Kind.concurrency, "Too many.", retry_after=1))
    error = json.loads(body)["error"]
    assert (status, error["code"], headers["retry-after"]) == (429, "rate_limit_exceeded", "1")
    assert CODEX_RETRY.search(error["message"])
    status, _, body = responses.error_response(BridgeError(Kind.context_length, "maximum context length is 5 tokens"))
    assert status == 400 and json.loads(body)["error"]["code"] == "context_length_exceeded"
    status, _, body = responses.error_response(BridgeError(Kind.authentication, "Invalid API key."))
    assert (status, json.loads(body)["error"]["code"]) == (401, "invalid_api_key")
    assert "resets_at" not in json.loads(body)["error"]


def test_non_streamed_body_has_the_whole_output_and_usage():
    completion = wire.completion_decoder.decode(json.dumps({
        "id": "x", "choices": [{"finish_reason": "tool_calls", "message": {
            "role": "assistant", "content": "Patching.", "reasoning_content": "think",
            "tool_calls": [{"id": "c9", "type": "function", "function": {
                "name": "apply_patch", "arguments": json.dumps({"input": "*** Begin Patch"})}}]}}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}}).encode())
    events, outcome = glm.completion_events(completion, "call_n_")
    s = surface({"model": "glm-4.6", "input": "x", "tools": [APPLY_PATCH], "reasoning": {"summary": "detailed"}})
    body = json.loads(s.complete(glm.Answer(events), outcome.reason, "glm-4.6", "abc", completion.usage))
    assert body["object"] == "response" and body["status"] == "completed" and body["id"] == "resp_abc"
    assert [o["type"] for o in body["output"]] == ["reasoning", "message", "custom_tool_call"]
    assert body["output"][0]["summary"] == [{"type": "summary_text", "text": "think"}]
    assert body["output"][2]["input"] == "*** Begin Patch" and body["output"][2]["call_id"] == "c9"
    assert body["usage"]["input_tokens"] == 5 and body["usage"]["output_tokens"] == 2
    assert body["tools"][0]["name"] == "apply_patch" and body["tool_choice"] == "auto"
    cut = json.loads(surface({"model": "glm-4.6", "input": "x", "tools": [APPLY_PATCH]}).complete(
        glm.Answer(events), glm.LENGTH, "glm-4.6", "abd", completion.usage))
    assert cut["status"] == "incomplete" and [o["type"] for o in cut["output"]] == ["reasoning", "message"]


# ---- generated streams ----------------------------------------------------------------------

@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(upstream_streams(), st.integers(0, 1000), st.booleans())
def test_any_upstream_stream_becomes_a_valid_responses_stream(stream, seed, summary):
    chunks, calls, done, finished = stream
    body = {"model": "glm-4.6", "input": "x",
            "tools": [{"type": "function", "name": name} for name in calls] or [READ_FILE]}
    if summary:
        body["reasoning"] = {"summary": "concise"}
    out = _relay_bytes(_framed(chunks, done, seed), surface(body).stream("glm-4.6", "g1", 1))
    events = events_of(out)
    final = check_stream(events)
    got = {o["name"]: o["arguments"] for o in final["output"] if o["type"] == "function_call"}
    assert all(calls[name] == arguments for name, arguments in got.items())  # whole, as sent upstream
    if events[-1]["type"] == "response.completed" and finished:
        assert len(got) == len(calls)


# ---- the WebSocket session --------------------------------------------------------------------

def turn_body(**fields) -> bytes:
    return json.dumps({"type": "response.create", "model": "glm-4.6", **fields}).encode()


def test_socket_frames():
    session = responses_socket.SocketSession()
    assert session.read(turn_body(input="x")).kind == "create"
    assert session.read(turn_body(input="x", generate=False)).kind == "warmup"
    assert session.read(b'{"type": "response.processed", "response_id": "r"}').kind == "ignore"
    deep = b'{"type": "response.create", "model": "glm-4.6", "generate": false, "input": "x", "metadata": ' \
        + b"[" * 5000 + b"]" * 5000 + b"}"
    for bad in (b"nope", b"[1]", b'{"type": "session.update"}', b'{"type": "response.append", "input": []}', deep):
        with pytest.raises(BridgeError) as raised:
            session.read(bad)
        assert raised.value.status == 400
    frame = json.loads(responses_socket.error_frame(BridgeError(Kind.upstream_rate_limited, "slow", retry_after=2)))
    # Codex reads a socket's error event as the HTTP answer it stands for
    assert frame["type"] == "error" and frame["status"] == 429
    assert frame["error"]["code"] == "rate_limit_exceeded" and frame["headers"]["retry-after"] == "2"


def test_socket_warmup_then_turns_continue_the_conversation():
    session = responses_socket.SocketSession()
    first = ResponsesSurface(session.memory, socket=True)
    # Codex's prewarm: its developer instructions alone, generate: false
    frames = [json.loads(f) for f in session.warmup(first, turn_body(
        input=[{"role": "developer", "content": "You are Codex."}], tools=[READ_FILE], generate=False), "resp_w")]
    assert [f["type"] for f in frames] == ["response.created", "response.in_progress", "response.completed"]
    assert frames[-1]["response"]["id"] == "resp_w" and frames[-1]["response"]["output"] == []
    assert session.counts.warmups == 1
    # the turn after it names it and sends only what is new
    second = ResponsesSurface(session.memory, socket=True)
    parsed = second.parse(turn_body(previous_response_id="resp_w", input=[{"role": "user", "content": "read a.py"}],
                                    tools=[READ_FILE], stream=False))
    assert parsed.request.stream is True  # a socket always streams
    assert [m.content for m in parsed.request.messages] == ["You are Codex.", "read a.py"]
    out, _ = translate(call_chunks("read_file", '{"path": "a.py"}'), second.stream("glm-4.6", "t2", 1))
    session.finished(second)
    third = ResponsesSurface(session.memory, socket=True)
    parsed = third.parse(turn_body(previous_response_id="resp_t2", input=[
        {"type": "function_call_output", "call_id": "call_x", "output": "x = 1"}]))
    assert [m.role for m in parsed.request.messages] == ["system", "user", "assistant", "tool"]
    assert parsed.request.messages[2].tool_calls[0].function.arguments == '{"path": "a.py"}'
    # response.append (older Codex) continues the last response with the last request's fields
    body = session.read(b'{"type": "response.append", "input": [{"role": "user", "content": "more"}]}').body
    fourth = ResponsesSurface(session.memory, socket=True)
    parsed = fourth.parse(body)
    assert fourth.request.previous_response_id == "resp_t2" and fourth.request.tools[0].name == "read_file"
    assert [m.role for m in parsed.request.messages] == ["system", "user", "assistant", "user"]
    assert (session.counts.turns, session.counts.continued) == (1, 1)


def test_socket_memory_is_bounded_and_failed_turns_are_not_kept():
    session = responses_socket.SocketSession(keep=2)
    for n in range(4):
        session.memory.remember(f"resp_{n}", [responses.Item(role="user", content=str(n))])
    assert len(session.memory) == 2 and session.memory.recall("resp_0") is None
    assert session.memory.recall("resp_3").items[0].content == "3"
    failed = ResponsesSurface(session.memory, socket=True)
    failed.parse(turn_body(input="x"))
    stream = failed.stream("glm-4.6", "bad", 1)
    stream.start()
    stream.fail(BridgeError(Kind.upstream_error, "broke"))
    session.finished(failed)
    assert session.memory.recall("resp_bad") is None
    with pytest.raises(BridgeError) as raised:
        ResponsesSurface(session.memory, socket=True).parse(turn_body(previous_response_id="resp_0", input="x"))
    assert raised.value.code == "previous_response_not_found"


@pytest.mark.parametrize("beta,enabled,open_sockets,limit,status", [
    ("responses_websockets=2026-02-06", True, 0, 10, None),
    (None, True, 0, 10, None),
    ("other=1, responses_websockets=2026-02-06", True, 9, 10, None),
    ("responses_websockets=2025-08-01", True, 0, 10, 426),
    ("responses_websockets=2026-02-06", False, 0, 10, 426),
    ("responses_websockets=2026-02-06", True, 10, 10, 426),
    ("responses_websockets=2026-02-06", True, 10_000, 0, None),
])
def test_socket_handshake(beta, enabled, open_sockets, limit, status):
    refusal = responses_socket.handshake(beta, enabled=enabled, open_sockets=open_sockets, limit=limit)
    assert (refusal.status if refusal else None) == status
    if refusal:
        assert "use HTTP" in msgspec.json.decode(refusal.body)["error"]["message"]


@pytest.mark.parametrize("kind", list(Kind))
def test_every_kind_of_error_has_a_responses_shape(kind):
    error = BridgeError(kind, "why", retry_after=3)
    status, _, body = responses.error_response(error)
    assert status == error.status and json.loads(body)["error"]["type"]
    code, message = responses.failure(error)
    assert code and message.startswith("why")
