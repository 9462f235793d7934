"""`tool_choice` of type `allowed_tools` (OpenAI's ChatCompletionAllowedToolChoice and the Responses
ToolChoiceAllowed): the model is offered the allowed tools alone, as with a named tool choice, so it
cannot call one the client has said must not be called now. Mode `required` is served as
`tool_choice: "required"` is (GLM's choice is `auto` alone, glm.prepare); an allowed name not among
the request's tools, an empty list, a mode other than auto or required: a 400 in the caller's shape,
naming what is wrong. Through the translators directly, and end to end with the openai SDK through a
real bridge and the GLM simulator (which calls read_file whenever it is offered one)."""
from __future__ import annotations

import json
import uuid

import openai
import pytest

from bridge import glm, wire
from bridge.errors import BridgeError
from bridge.surfaces.chat import ChatSurface
from bridge.surfaces.responses import ResponsesSurface

from .conftest import new_user, start_bridge

TOOLS = [
    {"type": "function", "function": {"name": "read_file", "description": "Read a file",
                                      "parameters": {"type": "object", "properties": {"path": {"type": "string"}},
                                                     "required": ["path"]}}},
    {"type": "function", "function": {"name": "get_time", "description": "The time",
                                      "parameters": {"type": "object", "properties": {}}}},
    {"type": "function", "function": {"name": "exec_command", "description": "Run a command",
                                      "parameters": {"type": "object", "properties": {"cmd": {"type": "string"}}}}},
]
RESPONSES_TOOLS = [{"type": "function", "name": t["function"]["name"], "description": t["function"]["description"],
                    "parameters": t["function"]["parameters"]} for t in TOOLS]
APPLY_PATCH = {"type": "custom", "name": "apply_patch", "description": "Edit files",
               "format": {"type": "grammar", "syntax": "lark", "definition": "start: patch"}}
SPAWN = {"type": "namespace", "name": "agents", "description": "Sub-agents", "tools": [
    {"type": "function", "name": "spawn", "parameters": {"type": "object", "properties": {}}}]}


def chat_allowed(*names: str, mode: str = "auto") -> dict:
    return {"type": "allowed_tools", "allowed_tools": {
        "mode": mode, "tools": [{"type": "function", "function": {"name": n}} for n in names]}}


def responses_allowed(*names: str, mode: str = "auto") -> dict:
    return {"type": "allowed_tools", "mode": mode, "tools": [{"type": "function", "name": n} for n in names]}


def chat_body(tool_choice, **extra) -> dict:
    return {"messages": [{"role": "user", "content": "x"}], "tools": TOOLS, "tool_choice": tool_choice, **extra}


def responses_body(tool_choice, tools=None, **extra) -> dict:
    return {"input": "x", "tools": RESPONSES_TOOLS if tools is None else tools, "tool_choice": tool_choice, **extra}


def _sent(surface, body: dict) -> dict:
    """The GLM request body a client body becomes, as the upstream reads it."""
    parsed = surface.parse(json.dumps({"model": "glm-4.6", **body}).encode())
    return json.loads(wire.encoder.encode(glm.prepare(parsed.request)))


def _offered(sent: dict) -> list[str]:
    return [t["function"]["name"] for t in sent.get("tools", [])]


def _refused(surface, body: dict) -> tuple[BridgeError, dict]:
    """The refusal, and its body in the caller's protocol (both surfaces: OpenAI's error object)."""
    with pytest.raises(BridgeError) as refused:
        surface.parse(json.dumps({"model": "glm-4.6", **body}).encode())
    status, _, encoded = surface.error(refused.value)
    assert status == 400
    return refused.value, json.loads(encoded)


# ---- the allowed tools are the only ones offered ---------------------------------------------------

@pytest.mark.parametrize("mode", ["auto", "required"])
def test_chat_allowed_tools_are_the_only_ones_offered(mode):
    sent = _sent(ChatSurface(), chat_body(chat_allowed("get_time", "exec_command", mode=mode), stream=True))
    # in the request's order, not the list's; GLM's choice stays auto (all it supports), as for "required"
    assert _offered(sent) == ["get_time", "exec_command"]
    assert sent["tool_choice"] == "auto" and sent["tool_stream"] is True


@pytest.mark.parametrize("mode", ["auto", "required"])
def test_responses_allowed_tools_are_the_only_ones_offered(mode):
    sent = _sent(ResponsesSurface(), responses_body(responses_allowed("exec_command", "get_time", mode=mode)))
    assert _offered(sent) == ["get_time", "exec_command"] and sent["tool_choice"] == "auto"


def test_responses_allowed_custom_namespaced_and_local_shell_tools():
    """Codex's kinds of tools: a custom tool by its name (and type), a namespaced function by its
    own name or its flattened one, the local shell by its type; a hosted tool allows nothing GLM
    runs (hosted tools are never offered)."""
    tools = [*RESPONSES_TOOLS, APPLY_PATCH, SPAWN, {"type": "local_shell"}, {"type": "web_search"}]
    choice = {"type": "allowed_tools", "mode": "auto", "tools": [
        {"type": "custom", "name": "apply_patch"}, {"type": "function", "name": "spawn"},
        {"type": "local_shell"}, {"type": "web_search"}]}
    assert _offered(_sent(ResponsesSurface(), responses_body(choice, tools))) == [
        "apply_patch", "agents__spawn", "local_shell"]
    flat = responses_allowed("agents__spawn")
    assert _offered(_sent(ResponsesSurface(), responses_body(flat, tools))) == ["agents__spawn"]
    hosted_only = {"type": "allowed_tools", "mode": "auto", "tools": [{"type": "web_search"}]}
    sent = _sent(ResponsesSurface(), responses_body(hosted_only, tools))
    assert "tools" not in sent and "tool_choice" not in sent  # nothing the model may call


def test_without_allowed_tools_every_tool_is_offered():
    for surface, body in ((ChatSurface(), chat_body("auto")), (ChatSurface(), chat_body("required")),
                          (ResponsesSurface(), responses_body("auto")),
                          (ResponsesSurface(), responses_body("required"))):
        assert _offered(_sent(surface, body)) == ["read_file", "get_time", "exec_command"]
    assert "tools" not in _sent(ChatSurface(), chat_body("none"))


# ---- refused, in the caller's shape ---------------------------------------------------------------

@pytest.mark.parametrize("surface, body", [
    (ChatSurface(), chat_body(chat_allowed("get_time", "no_such_tool"))),
    (ResponsesSurface(), responses_body(responses_allowed("get_time", "no_such_tool"))),
    # a custom tool is not a function of that name, nor a function a custom tool
    (ResponsesSurface(), responses_body({"type": "allowed_tools", "mode": "auto", "tools": [
        {"type": "custom", "name": "no_such_tool"}]}, [*RESPONSES_TOOLS, APPLY_PATCH])),
], ids=["chat", "responses", "responses-custom"])
def test_an_allowed_tool_not_among_the_tools_is_refused_by_name(surface, body):
    refused, shown = _refused(surface, body)
    assert "no_such_tool" in refused.message and (refused.param or "").startswith("tool_choice")
    error = shown["error"]
    assert error["type"] == "invalid_request_error" and "no_such_tool" in error["message"]
    assert error["param"].startswith("tool_choice")


def test_a_responses_function_named_as_custom_is_refused():
    body = responses_body({"type": "allowed_tools", "mode": "auto", "tools": [{"type": "custom", "name": "get_time"}]})
    refused, _ = _refused(ResponsesSurface(), body)
    assert "get_time" in refused.message


@pytest.mark.parametrize("surface, body, param", [
    (ChatSurface(), chat_body(chat_allowed()), "tool_choice.allowed_tools.tools"),
    (ResponsesSurface(), responses_body(responses_allowed()), "tool_choice.tools"),
    (ChatSurface(), chat_body({"type": "allowed_tools"}), "tool_choice.allowed_tools"),
    (ResponsesSurface(), responses_body({"type": "allowed_tools", "mode": "auto"}), "tool_choice.tools"),
    (ChatSurface(), chat_body(chat_allowed("get_time", mode="sometimes")), "tool_choice.allowed_tools.mode"),
    (ResponsesSurface(), responses_body(responses_allowed("get_time", mode="none")), "tool_choice.mode"),
    (ChatSurface(), chat_body({"type": "allowed_tools", "allowed_tools": {
        "mode": "auto", "tools": [{"type": "function"}]}}), "tool_choice.allowed_tools.tools[0]"),
    (ResponsesSurface(), responses_body({"type": "allowed_tools", "mode": "auto", "tools": [{"type": "function"}]}),
     "tool_choice.tools[0]"),
], ids=["chat-empty", "responses-empty", "chat-no-list", "responses-no-list", "chat-mode", "responses-mode",
        "chat-nameless", "responses-nameless"])
def test_an_empty_or_malformed_allowed_list_is_refused(surface, body, param):
    refused, shown = _refused(surface, body)
    assert refused.param == param and shown["error"]["param"] == param


# ---- end to end: the SDK, a real bridge, the simulator ----------------------------------------------

@pytest.fixture(scope="module")
def bridge(database, simulator):
    server = start_bridge(database, simulator.url + "/api/coding/paas/v4")
    yield server
    server.stop()


def _openai(bridge, database) -> openai.OpenAI:
    return openai.OpenAI(base_url=bridge.url + "/v1", api_key=new_user(database), max_retries=0)


def _said(text: str) -> str:
    # the simulator calls read_file when it is offered and asked to read
    return f"[[sim reasoning=0]] {text} {uuid.uuid4().hex[:6]}"


def test_chat_allowed_tools_the_model_calls_only_an_allowed_one(bridge, database):
    response = _openai(bridge, database).chat.completions.create(
        model="glm-4.6", messages=[{"role": "user", "content": _said("what time is it; also read a.py")}],
        tools=TOOLS, tool_choice=chat_allowed("get_time", mode="required"))
    assert [c.function.name for c in response.choices[0].message.tool_calls or []] == ["get_time"]


def test_responses_allowed_tools_the_model_calls_only_an_allowed_one(bridge, database):
    response = _openai(bridge, database).responses.create(
        model="glm-4.6", input=_said("what time is it; also read a.py"), tools=RESPONSES_TOOLS,
        tool_choice=responses_allowed("get_time"))
    assert [o.name for o in response.output if o.type == "function_call"] == ["get_time"]


def test_an_unknown_allowed_tool_is_a_400_over_http(bridge, database):
    client = _openai(bridge, database)
    with pytest.raises(openai.BadRequestError) as chat_refused:
        client.chat.completions.create(model="glm-4.6", messages=[{"role": "user", "content": "x"}],
                                       tools=TOOLS, tool_choice=chat_allowed("delete_everything"))
    with pytest.raises(openai.BadRequestError) as responses_refused:
        client.responses.create(model="glm-4.6", input="x", tools=RESPONSES_TOOLS,
                                tool_choice=responses_allowed("delete_everything"))
    for refused in (chat_refused.value, responses_refused.value):
        assert "delete_everything" in refused.message and refused.param.startswith("tool_choice")
