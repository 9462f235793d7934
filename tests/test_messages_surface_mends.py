"""The Anthropic Messages surface as the official `anthropic` SDK uses it (its ThinkingConfigParam,
OutputConfigParam, ToolUnionParam, image sources), end to end through a real bridge in front of
a scripted upstream (what GLM was asked, what the client got) and the GLM simulator: a thinking
type the SDK allows is served; a JSON schema asked in `output_config` reaches the model (other
formats are refused); Anthropic's client tools (bash, the text editor, memory) are offered with
their schemas and come back as tool_use blocks of their name, server tools and nameless toolsets
are dropped, other versioned types refused; a streamed tool input is always a JSON object; an
image the model cannot be shown leaves a note."""
from __future__ import annotations

import json
import time
import uuid

import anthropic
import httpx
import pytest

from bridge import glm, wire
from bridge.surfaces import messages
from bridge.surfaces.messages import MessagesSurface, MessagesStream

from . import scripted_upstream
from .conftest import new_user, start_bridge
from .scripted_upstream import DONE, call, chunk, start_scripted, usage


@pytest.fixture(scope="module")
def scripted(database):
    upstream, url = start_scripted()
    server = start_bridge(database, url, CODEPLAN_UPSTREAM_KEYS="k1")
    yield server
    server.stop()
    upstream.shutdown()


@pytest.fixture(scope="module")
def simulated(database, simulator):
    server = start_bridge(database, simulator.url + "/api/coding/paas/v4")
    yield server
    server.stop()


def _client(bridge, database) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=bridge.url, api_key=new_user(database), max_retries=0)


def _sent(body: dict) -> dict:
    """The GLM request a Messages body becomes, as the upstream reads it."""
    parsed = MessagesSurface().parse(json.dumps({"model": "glm-4.6", "max_tokens": 1000, **body}).encode())
    return json.loads(wire.encoder.encode(glm.prepare(parsed.request)))


def _asked(client: anthropic.Anthropic, stream: bool = True, **kwargs) -> tuple[anthropic.types.Message, dict]:
    """The SDK's answer to one request, and the body the upstream was sent for it (the scripted
    upstream answers in a stream: unstreamed, the bridge would ask it for a body)."""
    before = len(scripted_upstream.REQUESTS)
    kwargs = {"model": "glm-4.6", "max_tokens": 300, **kwargs}
    if stream:
        with client.messages.stream(**kwargs) as s:
            reply = s.get_final_message()
    else:
        reply = client.messages.create(**kwargs)
    [body] = scripted_upstream.REQUESTS[before:]
    return reply, body


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": f"{text} {uuid.uuid4().hex[:6]}"}]


# ---- thinking {"type": "between_tools"} ----------------------------------------------------

def test_thinking_between_tools_is_served_as_thinking_on(scripted, database):
    """The SDK's ThinkingConfigBetweenToolsParam was a 400 ('Invalid enum value') on every
    request; it is thinking asked, as enabled and adaptive are."""
    reply, body = _asked(_client(scripted, database), messages=_user("hi"), thinking={"type": "between_tools"})
    assert reply.stop_reason == "end_turn" and body["thinking"] == {"type": "enabled"}


def test_thinking_between_tools_through_the_simulator(simulated, database):
    client = _client(simulated, database)
    reply = client.messages.create(model="glm-4.6", max_tokens=200, thinking={"type": "between_tools"},
                                   messages=_user("[[sim tokens=3 reasoning=2]] go"))
    assert reply.type == "message" and reply.stop_reason == "end_turn"


# ---- output_config.format: a JSON schema -----------------------------------------------------

SCHEMA = {"type": "object", "properties": {"city_name_field": {"type": "string"}},
          "required": ["city_name_field"], "additionalProperties": False}


def test_output_config_json_schema_is_asked_of_the_model(scripted, database):
    """As on Chat and Responses: json_object asked of GLM, the schema told in a system message
    after the client's own (the SDK's `output_config={"format": {"type": "json_schema", ...}}`
    reached GLM as nothing); `effort` is accepted and ignored."""
    reply, body = _asked(_client(scripted, database), system="You are terse.", messages=_user("Where?"),
                         output_config={"effort": "high", "format": {"type": "json_schema", "schema": SCHEMA}})
    assert reply.type == "message"
    assert body["response_format"] == {"type": "json_object"}
    roles = [m["role"] for m in body["messages"]]
    assert roles == ["system", "system", "user"] and body["messages"][0]["content"] == "You are terse."
    told = body["messages"][1]["content"]
    assert told.startswith("Answer with one JSON object matching this JSON Schema") and json.loads(
        told.split(": ", 1)[1]) == SCHEMA
    # effort alone asks nothing of the answer (GLM has no switch for it): served as before
    _reply, body = _asked(_client(scripted, database), messages=_user("hi"), output_config={"effort": "low"})
    assert "response_format" not in body and [m["role"] for m in body["messages"]] == ["user"]


@pytest.mark.parametrize(("fmt", "field"), [
    ({"type": "json_object"}, "output_config.format.type"),
    ({"type": "regex", "schema": {}}, "output_config.format.type"),
    ({"type": "json_schema"}, "output_config.format.schema"),
])
def test_another_output_format_is_refused_naming_the_field(scripted, database, fmt, field):
    client = _client(scripted, database)
    with pytest.raises(anthropic.BadRequestError) as refused:
        client.messages.create(model="glm-4.6", max_tokens=100, messages=_user("hi"), output_config={"format": fmt})
    assert refused.value.body["error"]["type"] == "invalid_request_error"
    assert refused.value.body["error"]["message"].startswith(field + ":")


def test_count_tokens_counts_the_told_schema(scripted, database):
    """count_tokens takes output_config too (the SDK's MessageCountTokensParams): the schema the
    model is told is prompt, so it counts."""
    client = _client(scripted, database)
    question = _user("Where?")
    bare = client.messages.count_tokens(model="glm-4.6", messages=question)
    asked = client.messages.count_tokens(model="glm-4.6", messages=question,
                                         output_config={"format": {"type": "json_schema", "schema": SCHEMA}})
    assert asked.input_tokens > bare.input_tokens + 10


# ---- Anthropic-defined client tools ----------------------------------------------------------

scripted_upstream.SCRIPTS["mends_bash"] = [
    chunk({"role": "assistant", **call(0, "call_b", "bash", '{"command": ')}),
    chunk(call(0, "call_b", "bash", '"ls -la"}')),
    chunk({}, "tool_calls", usage(40, 12)),
    DONE,
]


def _offered(body: dict) -> dict[str, dict]:
    return {t["function"]["name"]: t["function"] for t in body.get("tools", [])}


def test_bash_is_offered_and_called_by_its_name(scripted, database):
    """`bash_20250124` was dropped (the model never offered it) and tool_choice naming it a 400
    "not among the request's tools": it is offered with its input schema, named in tool_choice
    it is the one tool offered, and the model's call comes back a tool_use named bash."""
    reply, body = _asked(_client(scripted, database), tools=[
        {"type": "bash_20250124", "name": "bash"},
        {"name": "read_file", "input_schema": {"type": "object", "properties": {"path": {"type": "string"}}}}],
        tool_choice={"type": "tool", "name": "bash"}, messages=_user("[[script mends_bash]] list the files"))
    offered = _offered(body)
    assert list(offered) == ["bash"] and offered["bash"]["description"]
    assert offered["bash"]["parameters"]["properties"] == {
        "command": {"type": "string",
                    "description": "The bash command to run. Required unless the tool is being restarted."},
        "restart": {"type": "boolean", "description": "true restarts the session; otherwise leave it out."}}
    [use] = [b for b in reply.content if b.type == "tool_use"]
    assert (use.name, use.input, reply.stop_reason) == ("bash", {"command": "ls -la"}, "tool_use")


def test_tool_choice_naming_bash_unstreamed_through_the_simulator(simulated, database):
    client = _client(simulated, database)
    reply = client.messages.create(model="glm-4.6", max_tokens=300, messages=_user("[[sim reasoning=0]] list files"),
                                   tools=[{"type": "bash_20250124", "name": "bash"}],
                                   tool_choice={"type": "tool", "name": "bash"})
    [use] = [b for b in reply.content if b.type == "tool_use"]
    assert use.name == "bash" and isinstance(use.input["command"], str) and reply.stop_reason == "tool_use"


def test_the_text_editors_and_memory_are_offered_with_their_schemas(scripted, database):
    _reply, body = _asked(_client(scripted, database), messages=_user("edit"), tools=[
        {"type": "text_editor_20250728", "name": "str_replace_based_edit_tool", "max_characters": 10000},
        {"type": "memory_20250818", "name": "memory"}])
    offered = _offered(body)
    assert list(offered) == ["str_replace_based_edit_tool", "memory"]
    editor = offered["str_replace_based_edit_tool"]["parameters"]
    assert editor["properties"]["command"]["enum"] == ["view", "create", "str_replace", "insert"]
    assert set(editor["properties"]) == {"command", "path", "file_text", "old_str", "new_str", "insert_line",
                                         "insert_text", "view_range"} and editor["required"] == ["command", "path"]
    memory = offered["memory"]["parameters"]
    assert memory["properties"]["command"]["enum"] == ["view", "create", "str_replace", "insert", "delete", "rename"]
    assert {"old_path", "new_path", "insert_text"} <= set(memory["properties"])


@pytest.mark.parametrize(("tool", "commands", "insert"), [
    ({"type": "text_editor_20250124", "name": "str_replace_editor"},
     ["view", "create", "str_replace", "insert", "undo_edit"], "new_str"),
    ({"type": "text_editor_20241022", "name": "str_replace_editor"},
     ["view", "create", "str_replace", "insert", "undo_edit"], "new_str"),
    ({"type": "text_editor_20250429", "name": "str_replace_based_edit_tool"},
     ["view", "create", "str_replace", "insert"], "insert_text"),
    ({"type": "bash_20241022", "name": "bash"}, None, None),
])
def test_each_client_tool_version_has_its_own_schema(tool, commands, insert):
    """undo_edit only where the version has it; the inserted text where the version takes it."""
    [offered] = _sent({"messages": [{"role": "user", "content": "go"}], "tools": [tool]})["tools"]
    schema = offered["function"]["parameters"]
    assert offered["function"]["name"] == tool["name"]
    if commands is None:
        assert set(schema["properties"]) == {"command", "restart"}
    else:
        assert schema["properties"]["command"]["enum"] == commands
        assert "new_str" in schema["properties"]  # str_replace's, in every version
        assert ("insert_text" in schema["properties"]) == (insert == "insert_text")


@pytest.mark.parametrize("tool", [
    {"type": "web_search_20250305", "name": "web_search"}, {"type": "web_fetch_20260318", "name": "web_fetch"},
    {"type": "code_execution_20250825", "name": "code_execution"}, {"type": "advisor_20260301", "name": "advisor"},
    {"type": "tool_search_tool_regex_20251119", "name": "tool_search_tool_regex"},
    {"type": "web_search_20991231", "name": "web_search"},  # a server tool's later version
    {"type": "computer_toolset_20260801"}, {"type": "browser_toolset_20260801", "configs": {}},
    {"type": "mcp_toolset", "mcp_server_name": "github"},
])
def test_server_tools_and_nameless_toolsets_are_dropped(tool):
    """A toolset carries no `name` (the SDK's ComputerToolset20260801Param...): the whole request
    was a 400 'Object missing required field `name`'; it is dropped like the server tools, which
    stay dropped (any version) beside the client tools now offered."""
    sent = _sent({"messages": [{"role": "user", "content": "hi"}],
                  "tools": [tool, {"name": "read_file", "input_schema": {"type": "object"}},
                            {"type": "bash_20250124", "name": "bash"}]})
    assert [t["function"]["name"] for t in sent["tools"]] == ["read_file", "bash"]


def test_a_nameless_toolset_is_served_end_to_end(scripted, database):
    reply, body = _asked(_client(scripted, database), messages=_user("hi"),
                         tools=[{"type": "computer_toolset_20260801"}, {"type": "browser_toolset_20260801"}])
    assert reply.type == "message" and "tools" not in body


@pytest.mark.parametrize("kind", ["computer_20250124", "bash_20991231", "text_editor_20991231"])
def test_an_unknown_versioned_tool_is_refused_naming_it(scripted, database, kind):
    """A client tool this bridge has no schema for: dropped, the model would answer without a
    tool the client meant it to have."""
    client = _client(scripted, database)
    response = httpx.post(scripted.url + "/v1/messages", timeout=30, headers={"x-api-key": client.api_key},
                          json={"model": "glm-4.6", "max_tokens": 100, "messages": _user("hi"),
                                "tools": [{"name": "read_file", "input_schema": {"type": "object"}},
                                          {"type": kind, "name": "x", "display_width_px": 1024}]})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"].startswith(f"tools.1.type: {kind!r}")


def test_a_custom_tool_without_its_name_is_refused():
    with pytest.raises(Exception) as refused:
        _sent({"messages": [{"role": "user", "content": "hi"}], "tools": [{"input_schema": {"type": "object"}}]})
    assert str(refused.value) == "tools.0.name: a custom tool needs its name"


def test_tool_choice_naming_a_server_tool_says_so(scripted, database):
    client = _client(scripted, database)
    with pytest.raises(anthropic.BadRequestError) as refused:
        client.messages.create(model="glm-4.6", max_tokens=100, messages=_user("hi"),
                               tools=[{"type": "web_search_20250305", "name": "web_search"}],
                               tool_choice={"type": "tool", "name": "web_search"})
    assert refused.value.body["error"]["message"] == ("tool_choice.name: 'web_search' is a server tool "
                                                      "(web_search_20250305) this service does not run")
    with pytest.raises(anthropic.BadRequestError) as absent:
        client.messages.create(model="glm-4.6", max_tokens=100, messages=_user("hi"),
                               tools=[{"type": "bash_20250124", "name": "bash"}],
                               tool_choice={"type": "tool", "name": "python"})
    assert "'python' is not among the request's tools" in absent.value.body["error"]["message"]


# ---- a streamed tool input is always a JSON object -------------------------------------------

scripted_upstream.SCRIPTS["mends_bad_args"] = [
    chunk({"role": "assistant", **call(0, "call_1", "read_file", '{"path": "a.py"')}),
    chunk(call(0, "call_1", "read_file", ', path: b.py}')),
    chunk({}, "tool_calls", usage(40, 12)),
    DONE,
]
scripted_upstream.SCRIPTS["mends_array_args"] = [
    chunk({"role": "assistant", **call(0, "call_1", "read_file", '["a.py"')}),
    chunk(call(0, "call_1", "read_file", ', "b.py"]')),
    chunk({}, "tool_calls", usage(40, 12)),
    DONE,
]
scripted_upstream.SCRIPTS["mends_good_args"] = [
    chunk({"role": "assistant", **call(0, "call_1", "read_file", '{"path": ')}),
    chunk(call(0, "call_1", "read_file", '"src/ü.py", "lines": [1, 2]}')),
    chunk({}, "tool_calls", usage(40, 12)),
    DONE,
]
TOOLS = [{"name": "read_file", "input_schema": {"type": "object", "properties": {"path": {"type": "string"}}}}]


def _input_json(bridge, key: str, script: str) -> tuple[str, list[str]]:
    """The tool_use block's input as the stream gave it (its input_json_delta texts joined),
    and the stream's event names."""
    body = {"model": "glm-4.6", "max_tokens": 300, "stream": True, "tools": TOOLS,
            "messages": [{"role": "user", "content": f"[[script {script}]] read"}]}
    with httpx.stream("POST", bridge.url + "/v1/messages", json=body, timeout=30, headers={"x-api-key": key}) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    return "".join(e["delta"]["partial_json"] for e in events if e["type"] == "content_block_delta"
                   and e["delta"]["type"] == "input_json_delta"), [e["type"] for e in events]


@pytest.mark.parametrize("script", ["mends_bad_args", "mends_array_args"])
def test_streamed_unreadable_tool_input_becomes_an_empty_object(scripted, database, script):
    """Arguments that are no JSON object were relayed as input_json_delta as they came, and
    `client.messages.stream(...)` raised 'Unable to parse tool parameter JSON from model'; the
    client gets exactly `{}`, as the same answer unstreamed gives (completion_body)."""
    client = _client(scripted, database)
    with client.messages.stream(model="glm-4.6", max_tokens=300, tools=TOOLS,
                                messages=[{"role": "user", "content": f"[[script {script}]] read"}]) as s:
        final = s.get_final_message()
    [use] = [b for b in final.content if b.type == "tool_use"]
    assert use.input == {} and final.stop_reason == "tool_use"
    assert _input_json(scripted, client.api_key, script)[0] == "{}"


def test_a_streamed_tool_input_goes_as_the_model_gave_it(scripted, database):
    key = new_user(database)
    given, kinds = _input_json(scripted, key, "mends_good_args")
    assert given == '{"path": "src/ü.py", "lines": [1, 2]}'
    assert kinds.count("content_block_delta") == 1  # whole, in one delta (the model sent two pieces)
    assert kinds[:2] == ["message_start", "content_block_start"] and kinds[-2:] == ["message_delta", "message_stop"]


def test_tool_input_is_given_whole_at_the_calls_end():
    """Unit: the block's start goes out with the call's first event, its input at the call's
    end; no fragment of the arguments before."""
    stream = MessagesStream("glm-4.6", "r1", 10)
    started = stream.feed([glm.ToolStart(0, "call_1", "read_file"), glm.ToolArgs(0, '{"path": "a.py"')])
    assert b"content_block_start" in started and b"input_json_delta" not in started
    assert stream.feed([glm.ToolArgs(0, ", path: b}")]) == b""
    ended = stream.feed([glm.ToolEnd(0, "call_1", "read_file", '{"path": "a.py", path: b}')])
    assert b'"partial_json":"{}"' in ended and ended.rstrip().endswith(b'{"type":"content_block_stop","index":0}')


def test_the_input_check_costs_little():
    """What the mend adds to the stream: one check of a call's whole arguments at its end, none
    per fragment. Measured: a 64 KiB input checked in well under a millisecond."""
    arguments = json.dumps({"path": "a.py", "content": "x = 1\n" * 11_000})
    assert messages.tool_input(arguments) == arguments
    started = time.perf_counter()
    for _ in range(100):
        messages.tool_input(arguments)
    assert (time.perf_counter() - started) / 100 < 0.002


# ---- an image the model cannot be shown leaves a note ----------------------------------------

def test_an_image_given_by_file_id_leaves_a_note(scripted, database):
    """An image given by its Files API id vanished (`_image_part` None): GLM got the question
    alone and answered as if it had seen it. A note stands in its place, worded as the
    Responses surface's for the same image."""
    _reply, body = _asked(_client(scripted, database), messages=[{"role": "user", "content": [
        {"type": "image", "source": {"type": "file", "file_id": "file_011"}},
        {"type": "text", "text": "What is in this picture?"}]}])
    assert body["messages"][-1]["content"] == ("[image 'file_011' omitted: this model cannot read it]\n"
                                               "What is in this picture?")


def test_an_image_shown_beside_one_not_shown():
    sent = _sent({"messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
        {"type": "image", "source": {"type": "file", "file_id": "file_2"}}]}]})
    assert sent["messages"][-1]["content"] == [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
        {"type": "text", "text": "[image 'file_2' omitted: this model cannot read it]"}]


def test_unstreamed_tool_input_takes_the_same_rule():
    """The answer unstreamed (completion_body): the model's object as it gave it, `{}` for
    anything else, as streamed."""
    answer = glm.Answer([glm.ToolStart(0, "c1", "read_file"),
                         glm.ToolEnd(0, "c1", "read_file", '{"path": "a.py", "n": [1]}'),
                         glm.ToolStart(1, "c2", "read_file"), glm.ToolEnd(1, "c2", "read_file", '["a.py"]'),
                         glm.ToolStart(2, "c3", "read_file"), glm.ToolEnd(2, "c3", "read_file", '{"path": "a.py"')])
    body = json.loads(messages.completion_body(answer, glm.TOOL_CALLS, "glm-4.6", "r1", wire.Usage(
        prompt_tokens=10, completion_tokens=5, total_tokens=15)))
    assert [b["input"] for b in body["content"]] == [{"path": "a.py", "n": [1]}, {}, {}]
