"""Request parameters the official openai and anthropic SDKs send, and what the bridge does with
each: served as asked (a named tool, one tool call at most, a JSON schema, the usage chunk or
not), or refused with a 400 naming the field (n > 1, logprobs, audio out, stored conversations
and prompts), never answered as if not asked; and every body sent upstream is JSON, whatever
parts and tools a client leaves out. Through the translators directly, and end to end with the
SDKs through a real bridge and the GLM simulator."""
from __future__ import annotations

import json
import uuid

import anthropic
import httpx
import msgspec
import openai
import pytest

from bridge import glm, wire
from bridge.errors import BridgeError
from bridge.surfaces import chat, messages
from bridge.surfaces.chat import ChatSurface
from bridge.surfaces.messages import MessagesSurface
from bridge.surfaces.responses import ResponsesSurface

from .conftest import new_user, start_bridge
from .test_translators import openai_chunks, relay

TOOLS = [
    {"type": "function", "function": {"name": "read_file", "description": "Read a file",
                                      "parameters": {"type": "object", "properties": {"path": {"type": "string"}},
                                                     "required": ["path"]}}},
    {"type": "function", "function": {"name": "get_time", "description": "The time",
                                      "parameters": {"type": "object", "properties": {}}}},
]
ANTHROPIC_TOOLS = [{"name": t["function"]["name"], "description": t["function"]["description"],
                    "input_schema": t["function"]["parameters"]} for t in TOOLS]
RESPONSES_TOOLS = [{"type": "function", "name": t["function"]["name"], "description": t["function"]["description"],
                    "parameters": t["function"]["parameters"]} for t in TOOLS]
IMAGE = "data:image/png;base64,iVBORw0KGgo="
SCHEMA = {"type": "object", "properties": {"city_name_field": {"type": "string"}}, "required": ["city_name_field"]}


@pytest.fixture(scope="module")
def bridge(database, simulator):
    server = start_bridge(database, simulator.url + "/api/coding/paas/v4")
    yield server
    server.stop()


def _openai(bridge, database) -> openai.OpenAI:
    return openai.OpenAI(base_url=bridge.url + "/v1", api_key=new_user(database), max_retries=0)


def _anthropic(bridge, database) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=bridge.url, api_key=new_user(database), max_retries=0)


def say(directive: str, text: str = "go") -> list[dict]:
    return [{"role": "user", "content": f"[[sim {directive}]] {text} {uuid.uuid4().hex[:6]}"}]


def said(directive: str, text: str = "go") -> str:
    return f"[[sim {directive}]] {text} {uuid.uuid4().hex[:6]}"


def _parsed(surface, body: dict):
    return surface.parse(json.dumps({"model": "glm-4.6", **body}).encode())


def _sent(surface, body: dict) -> dict:
    """The GLM request body a client body becomes, as the upstream reads it (json.loads fails on
    a body that is not JSON)."""
    return json.loads(wire.encoder.encode(glm.prepare(_parsed(surface, body).request)))


def _refused(surface, body: dict) -> BridgeError:
    with pytest.raises(BridgeError) as refused:
        _parsed(surface, body)
    assert refused.value.status == 400
    return refused.value


# ---- every body sent upstream is JSON ---------------------------------------------------------

_CHAT_BODIES = [
    {"messages": [{"role": "user", "content": [{"type": "text", "text": "what"},
                                               {"type": "image_url", "image_url": {"url": IMAGE, "detail": "low"}}]}]},
    {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function", "function": {"name": "get_time"}}]},
    {"messages": [{"role": "user", "content": "x"}],
     "tools": [{"type": "function", "function": {"name": "get_time", "parameters": None}}]},
    {"messages": [{"role": "user", "content": "read"}, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "read_file", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": [{"type": "text", "text": "shot"},
                                                            {"type": "image_url", "image_url": {"url": IMAGE}}]},
        {"role": "user", "content": "and?"}], "tools": TOOLS},
    {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": IMAGE}}]}]},
    {"messages": [{"role": "assistant", "content": [{"type": "refusal", "refusal": "no"}]},
                  {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text"}]}]},
    {"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}},
    {"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "text"}},
    {"messages": [{"role": "user", "content": "x"}],
     "response_format": {"type": "json_schema", "json_schema": {"name": "place", "schema": SCHEMA}}},
    {"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_schema", "json_schema": {"name": "n"}}},
    {"messages": [{"role": "user", "content": "x"}], "tools": TOOLS, "tool_choice": "required", "stream": True},
    {"messages": [{"role": "user", "content": "x"}], "functions": [TOOLS[0]["function"]], "function_call": "auto"},
]
_MESSAGES_BODIES = [
    {"messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "url", "url": "https://x/y.png"}},
                                               {"type": "text", "text": "what"}]}]},
    {"messages": [{"role": "user", "content": "x"}], "tools": [{"name": "bare"}, {"name": "nulled", "input_schema": None}]},
    {"messages": [{"role": "user", "content": "read"}, {"role": "assistant", "content": [
        {"type": "tool_use", "id": "t1", "name": "read_file", "input": {"path": "a"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "is_error": True, "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}]}]}],
     "tools": ANTHROPIC_TOOLS, "tool_choice": {"type": "none"}},
    {"messages": [{"role": "user", "content": "x"}], "tool_choice": {"type": "any"}, "tools": ANTHROPIC_TOOLS, "stream": True},
    {"messages": [{"role": "user", "content": "x"}], "tools": ANTHROPIC_TOOLS,
     "tool_choice": {"type": "tool", "name": "get_time", "disable_parallel_tool_use": True}},
]
_RESPONSES_BODIES = [
    {"input": [{"role": "user", "content": [{"type": "input_text", "text": "what"},
                                            {"type": "input_image", "image_url": IMAGE}]}]},
    {"input": "x", "tools": [{"type": "function", "name": "bare"}, {"type": "custom", "name": "patch"},
                             {"type": "namespace", "name": "ns", "tools": [{"type": "function", "name": "f"}]}]},
    {"input": [{"role": "user", "content": [{"type": "input_file", "filename": "a.pdf", "file_data": "data:,"},
                                            {"type": "input_image", "file_id": "file-1"}]}]},
    {"input": "x", "text": {"format": {"type": "json_schema", "name": "place", "schema": SCHEMA}}},
    {"input": "x", "tools": RESPONSES_TOOLS, "tool_choice": {"type": "function", "name": "get_time"},
     "parallel_tool_calls": False},
]


@pytest.mark.parametrize("surface, body", [
    *[(ChatSurface(), b) for b in _CHAT_BODIES],
    *[(MessagesSurface(), {"max_tokens": 100, **b}) for b in _MESSAGES_BODIES],
    *[(ResponsesSurface(), b) for b in _RESPONSES_BODIES]])
def test_every_upstream_body_is_json(surface, body):
    """An empty msgspec.Raw is written as no value (`"image_url":`, `"parameters":`) and GLM
    refuses the request: no request a client can send becomes one."""
    sent = _sent(surface, body)
    for tool in sent.get("tools", []):
        assert isinstance(tool["function"]["parameters"], dict)  # a schema, if only the empty one
    for message in sent["messages"]:
        for part in message["content"] if isinstance(message["content"], list) else ():
            assert part["type"] in ("text", "image_url") and (
                isinstance(part.get("text"), str) if part["type"] == "text" else part["image_url"]["url"])


def test_the_responses_object_echoes_a_schema_and_no_empty_value():
    """The response object echoes what the request said (text.format with its schema, tools
    without parameters): JSON, and the schema as sent."""
    surface = ResponsesSurface()
    _parsed(surface, {"input": "x", "tools": [{"type": "function", "name": "bare"}],
                      "text": {"format": {"type": "json_schema", "name": "place", "schema": SCHEMA}}})
    body = json.loads(surface.complete(glm.Answer([glm.Text("{}")]), glm.STOP, "glm-4.6", "r1", wire.Usage()))
    assert body["text"]["format"]["schema"] == SCHEMA and body["tools"] == [{"type": "function", "name": "bare"}]


def test_chat_text_and_image_parts_reach_glm_each_by_its_type():
    sent = _sent(ChatSurface(), _CHAT_BODIES[0])
    assert sent["messages"][0]["content"] == [{"type": "text", "text": "what"},
                                              {"type": "image_url", "image_url": {"url": IMAGE}}]
    # an image in a tool message: GLM's tool messages are text, so it leaves a note
    tool = _sent(ChatSurface(), _CHAT_BODIES[3])["messages"][2]
    assert tool == {"role": "tool", "content": "shot\n[image omitted: this model reads no images in tool results]",
                    "tool_call_id": "c1"}


def test_chat_function_without_parameters_gets_the_empty_schema():
    for body in _CHAT_BODIES[1:3]:
        assert _sent(ChatSurface(), body)["tools"][0]["function"]["parameters"] == {"type": "object", "properties": {}}


@pytest.mark.parametrize("parts, at", [
    ([{"type": "image_url"}], "messages[0].content[0].image_url"),
    ([{"type": "text", "text": "what"}, {"type": "image_url", "image_url": None}], "messages[0].content[1].image_url"),
    ([{"type": "image_url", "image_url": "https://x/y.png"}], "$.messages[0].content[0].image_url"),
    ([{"type": "image_url", "image_url": {}}], "$.messages[0].content[0].image_url"),
    ([{"type": "image_url", "image_url": {"url": ""}}], "$.messages[0].content[0].image_url.url"),
])
def test_chat_image_part_without_its_image_is_refused_naming_it(parts, at):
    refused = _refused(ChatSurface(), {"messages": [{"role": "user", "content": parts}]})
    assert at in (refused.param or "") or at in refused.message, refused


def test_an_image_part_without_its_image_is_a_400_over_http(bridge, database):
    answer = httpx.post(bridge.url + "/v1/chat/completions", timeout=60,
                        headers={"authorization": f"Bearer {new_user(database)}"},
                        json={"model": "glm-4.6", "max_tokens": 8, "messages": [{"role": "user", "content": [
                            {"type": "text", "text": "what is this"}, {"type": "image_url"}]}]})
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == "messages[0].content[1].image_url"


def test_chat_text_and_image_parts_answered_by_the_sdk(bridge, database):
    response = _openai(bridge, database).chat.completions.create(model="glm-4.6", messages=[{"role": "user", "content": [
        {"type": "text", "text": said("tokens=3 reasoning=0", "what is in this picture")},
        {"type": "image_url", "image_url": {"url": IMAGE}}]}])
    assert response.choices[0].message.content


def test_chat_function_without_parameters_called_through_the_sdk(bridge, database):
    response = _openai(bridge, database).chat.completions.create(
        model="glm-4.6", messages=say("reasoning=0", "what time is it"),
        tools=[{"type": "function", "function": {"name": "get_time", "description": "The time"}}])
    assert response.choices[0].message.tool_calls[0].function.name == "get_time"


# ---- the usage chunk ----------------------------------------------------------------------

def test_chat_usage_rides_on_the_finish_chunk_when_the_client_said_no_usage_chunk():
    events, _ = relay("glm_reasoning_text.sse", ChatSurface().stream(
        "glm-4.6", "r1", 20, _parsed(ChatSurface(), {"messages": [{"role": "user", "content": "x"}],
                                                     "stream": True, "stream_options": {"include_usage": False}})))
    chunks = openai_chunks(events)
    assert all(len(c["choices"]) == 1 for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop" and chunks[-1]["usage"]["total_tokens"] > 0
    assert all("usage" not in c for c in chunks[:-1])


@pytest.mark.parametrize("options", [None, {"include_usage": True}, {}])
def test_chat_usage_chunk_kept_unless_refused(options):
    """Absent or true (as every coding tool sends it): the usage-only last chunk, as the README's
    loop reads it."""
    body = {"messages": [{"role": "user", "content": "x"}], "stream": True}
    if options is not None:
        body["stream_options"] = options
    stream = ChatSurface().stream("glm-4.6", "r1", 20, _parsed(ChatSurface(), body))
    events, _ = relay("glm_reasoning_text.sse", stream)
    chunks = openai_chunks(events)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] > 0
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"


def test_chat_include_usage_false_every_chunk_has_a_choice_in_the_sdk(bridge, database):
    stream = _openai(bridge, database).chat.completions.create(
        model="glm-4.6", messages=say("tokens=3 reasoning=0"), stream=True, stream_options={"include_usage": False})
    chunks = list(stream)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks)  # IndexError on `choices: []`
    assert text and chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


# ---- a named tool choice ------------------------------------------------------------------------

NAMED = [
    (ChatSurface(), {"messages": [{"role": "user", "content": "x"}], "tools": TOOLS,
                     "tool_choice": {"type": "function", "function": {"name": "get_time"}}}),
    (MessagesSurface(), {"max_tokens": 100, "messages": [{"role": "user", "content": "x"}], "tools": ANTHROPIC_TOOLS,
                         "tool_choice": {"type": "tool", "name": "get_time"}}),
    (ResponsesSurface(), {"input": "x", "tools": RESPONSES_TOOLS, "tool_choice": {"type": "function", "name": "get_time"}}),
]


@pytest.mark.parametrize("surface, body", NAMED, ids=["chat", "messages", "responses"])
def test_a_named_tool_is_the_only_one_offered(surface, body):
    sent = _sent(surface, body)
    assert [t["function"]["name"] for t in sent["tools"]] == ["get_time"] and sent["tool_choice"] == "auto"


@pytest.mark.parametrize("surface, body", NAMED, ids=["chat", "messages", "responses"])
def test_a_named_tool_not_among_the_tools_is_refused(surface, body):
    body = json.loads(json.dumps(body).replace('"get_time"}', '"no_such_tool"}'))
    refused = _refused(surface, body)
    assert "no_such_tool" in refused.message and "tool_choice" in (refused.param or refused.message)


def test_chat_named_tool_choice_is_the_tool_called(bridge, database):
    """The simulator calls read_file when it is offered ("read a.py"): offered get_time alone,
    it calls get_time."""
    response = _openai(bridge, database).chat.completions.create(
        model="glm-4.6", messages=say("reasoning=0", "what time is it; also read a.py"), tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert [c.function.name for c in response.choices[0].message.tool_calls or []] == ["get_time"]


def test_messages_named_tool_choice_is_the_tool_called(bridge, database):
    response = _anthropic(bridge, database).messages.create(
        model="glm-4.6", max_tokens=500, messages=say("reasoning=0", "what time is it; also read a.py"),
        tools=ANTHROPIC_TOOLS, tool_choice={"type": "tool", "name": "get_time"})
    assert [b.name for b in response.content if b.type == "tool_use"] == ["get_time"]


def test_responses_named_tool_choice_is_the_tool_called(bridge, database):
    response = _openai(bridge, database).responses.create(
        model="glm-4.6", input=said("reasoning=0", "what time is it; also read a.py"),
        tools=RESPONSES_TOOLS, tool_choice={"type": "function", "name": "get_time"})
    assert [o.name for o in response.output if o.type == "function_call"] == ["get_time"]


# ---- one tool call at most ------------------------------------------------------------------

def _fragment(index: int, id: str | None = None, name: str | None = None, arguments: str | None = None) -> wire.Chunk:
    function = wire.FunctionDelta(name=name or msgspec.UNSET, arguments=arguments or msgspec.UNSET)
    return wire.Chunk(choices=[wire.ChunkChoice(delta=wire.Delta(tool_calls=[wire.ToolCallDelta(
        index=index, id=id or msgspec.UNSET, function=function)]))])


_FINISH = wire.Chunk(choices=[wire.ChunkChoice(finish_reason="tool_calls")],
                     usage=wire.Usage(prompt_tokens=10, completion_tokens=5, total_tokens=15))


def _calls(chunks: list[wire.Chunk], one_call: bool) -> list[tuple[str, str, str]]:
    normalizer = glm.StreamNormalizer("call_", one_call=one_call)
    events = [e for chunk in chunks for e in normalizer.feed(chunk)]
    normalizer.done()
    tail, outcome = normalizer.close()
    assert outcome.reason == glm.TOOL_CALLS
    return [(e.id, e.name, e.arguments) for e in events + tail if isinstance(e, glm.ToolEnd)]


@pytest.mark.parametrize("chunks", [
    # one after the other
    [_fragment(0, "a", "read_file", '{"path":'), _fragment(0, arguments='"a.py"}'),
     _fragment(1, "b", "get_time", "{}"), _FINISH],
    # interleaved by index
    [_fragment(0, "a", "read_file"), _fragment(1, "b", "get_time", "{"), _fragment(0, arguments='{"path":"a.py"}'),
     _fragment(1, arguments="}"), _FINISH],
    # each sent whole at index 0 (some OpenAI-compatible hosts), the second's arguments in pieces
    [_fragment(0, "a", "read_file", '{"path":"a.py"}'), _fragment(0, "b", "get_time", "{"),
     _fragment(0, arguments="}"), _fragment(0, "c", "read_file", '{"path":"b.py"}'), _FINISH],
], ids=["sequential", "interleaved", "index-reused"])
def test_one_call_keeps_the_first_call_whole_and_alone(chunks):
    assert _calls(chunks, one_call=True) == [("a", "read_file", '{"path":"a.py"}')]
    assert len(_calls(chunks, one_call=False)) >= 2


def test_one_call_in_a_whole_answer():
    completion = wire.completion_decoder.decode(json.dumps({"choices": [{"finish_reason": "tool_calls", "message": {
        "role": "assistant", "content": None, "tool_calls": [
            {"id": "a", "type": "function", "function": {"name": "read_file", "arguments": "{}"}},
            {"id": "b", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]}}]}).encode())
    events, outcome = glm.completion_events(completion, "call_", one_call=True)
    assert [c.name for c in glm.Answer(events).calls] == ["read_file"] and outcome.reason == glm.TOOL_CALLS
    events, _ = glm.completion_events(completion, "call_")
    assert [c.name for c in glm.Answer(events).calls] == ["read_file", "get_time"]


def test_one_call_streamed_through_a_translator():
    """What the journey does with a stream for a client that asked for one call: the chat
    stream shows one call, its finish and the usage."""
    normalizer = glm.StreamNormalizer("call_", one_call=True)
    stream = chat.ChatStream("glm-4.6", "r1")
    out = b"".join(stream.feed(normalizer.feed(chunk))
                   for chunk in [_fragment(0, "a", "read_file", "{}"), _fragment(1, "b", "get_time", "{}"), _FINISH])
    normalizer.done()
    tail, outcome = normalizer.close()
    out += stream.feed(tail) + stream.finish(outcome.reason, _FINISH.usage)
    chunks = [json.loads(line[6:]) for line in out.split(b"\n\n") if line.startswith(b"data: {")]
    starts = [c["choices"][0]["delta"]["tool_calls"][0] for c in chunks
              if c["choices"] and "tool_calls" in c["choices"][0]["delta"]]
    assert [s["function"]["name"] for s in starts if "id" in s] == ["read_file"]
    assert chunks[-2]["choices"][0]["finish_reason"] == "tool_calls" and chunks[-1]["usage"]["total_tokens"] == 15


@pytest.mark.parametrize("surface, body, one_call", [
    (ChatSurface(), {"messages": [{"role": "user", "content": "x"}], "parallel_tool_calls": False}, True),
    (ChatSurface(), {"messages": [{"role": "user", "content": "x"}], "parallel_tool_calls": True}, False),
    (ChatSurface(), {"messages": [{"role": "user", "content": "x"}]}, False),
    (MessagesSurface(), {"max_tokens": 9, "messages": [{"role": "user", "content": "x"}],
                         "tool_choice": {"type": "auto", "disable_parallel_tool_use": True}}, True),
    (MessagesSurface(), {"max_tokens": 9, "messages": [{"role": "user", "content": "x"}],
                         "tool_choice": {"type": "any"}}, False),
    (ResponsesSurface(), {"input": "x", "parallel_tool_calls": False}, True),
    (ResponsesSurface(), {"input": "x"}, False),
])
def test_the_parsed_request_says_one_call(surface, body, one_call):
    assert _parsed(surface, body).one_call is one_call


def test_chat_parallel_tool_calls_false_gives_one_call(bridge, database):
    client = _openai(bridge, database)
    for stream in (False, True):
        response = client.chat.completions.create(
            model="glm-4.6", messages=say("tools=2 reasoning=0", "read a.py"), tools=TOOLS,
            parallel_tool_calls=False, stream=stream)
        if stream:
            names = {c.function.name for chunk in response if chunk.choices
                     for c in chunk.choices[0].delta.tool_calls or () if c.function and c.function.name}
        else:
            names = {c.function.name for c in response.choices[0].message.tool_calls}
        assert names == {"read_file"}, stream
    both = client.chat.completions.create(model="glm-4.6", messages=say("tools=2 reasoning=0", "read a.py"), tools=TOOLS)
    assert len(both.choices[0].message.tool_calls) == 2


def test_messages_disable_parallel_tool_use_gives_one_call(bridge, database):
    response = _anthropic(bridge, database).messages.create(
        model="glm-4.6", max_tokens=500, messages=say("tools=2 reasoning=0", "read a.py"),
        tools=ANTHROPIC_TOOLS, tool_choice={"type": "auto", "disable_parallel_tool_use": True})
    assert [b.name for b in response.content if b.type == "tool_use"] == ["read_file"]
    assert response.stop_reason == "tool_use"


def test_responses_parallel_tool_calls_false_gives_one_call(bridge, database):
    response = _openai(bridge, database).responses.create(
        model="glm-4.6", input=said("tools=2 reasoning=0", "read a.py"), tools=RESPONSES_TOOLS,
        parallel_tool_calls=False)
    assert response.parallel_tool_calls is False
    assert [o.name for o in response.output if o.type == "function_call"] == ["read_file"]


# ---- what GLM cannot give: a 400 naming it ------------------------------------------------------

@pytest.mark.parametrize("asked, param", [
    ({"n": 2}, "n"), ({"n": 0}, "n"), ({"logprobs": True}, "logprobs"),
    ({"logprobs": True, "top_logprobs": 2}, "logprobs"), ({"top_logprobs": 3}, "top_logprobs"),
    ({"modalities": ["text", "audio"], "audio": {"voice": "alloy", "format": "wav"}}, "modalities"),
    ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
])
def test_chat_what_glm_cannot_give_is_refused_naming_it(asked, param):
    refused = _refused(ChatSurface(), {"messages": [{"role": "user", "content": "x"}], **asked})
    assert refused.param == param


def test_chat_what_asks_nothing_is_served():
    sent = _sent(ChatSurface(), {"messages": [{"role": "user", "content": "x"}], "n": 1, "logprobs": False,
                                 "top_logprobs": 0, "modalities": ["text"], "audio": None})
    assert sent["messages"] == [{"role": "user", "content": "x"}]


@pytest.mark.parametrize("asked, param", [
    ({"n": 2}, "n"), ({"logprobs": True, "top_logprobs": 2}, "logprobs"),
    ({"modalities": ["text", "audio"], "audio": {"voice": "alloy", "format": "wav"}}, "modalities"),
])
def test_chat_refusals_reach_the_sdk_as_bad_requests(bridge, database, asked, param):
    with pytest.raises(openai.BadRequestError) as refused:
        _openai(bridge, database).chat.completions.create(model="glm-4.6", messages=say("tokens=3 reasoning=0"), **asked)
    assert refused.value.body["param"] == param


@pytest.mark.parametrize("asked, param, code", [
    ({"conversation": "conv_6870ab12"}, "conversation", "conversation_not_found"),
    ({"conversation": {"id": "conv_6870ab12"}}, "conversation", "conversation_not_found"),
    ({"prompt": {"id": "pmpt_abc123", "variables": {"city": "Paris"}}}, "prompt", "prompt_not_found"),
    ({"text": {"format": {"type": "xml"}}}, "text.format.type", None),
])
def test_responses_stored_objects_are_refused_naming_them(asked, param, code):
    refused = _refused(ResponsesSurface(), {"input": "x", **asked})
    assert refused.param == param and refused.code == code
    served = _sent(ResponsesSurface(), {"input": "x", "conversation": None, "prompt": None})
    assert served["messages"] == [{"role": "user", "content": "x"}]


def test_responses_conversation_and_prompt_are_bad_requests_in_the_sdk(bridge, database):
    client = _openai(bridge, database)
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(model="glm-4.6", conversation="conv_6870ab12", input=said("tokens=3 reasoning=0"))
    assert refused.value.body["param"] == "conversation"
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(model="glm-4.6", prompt={"id": "pmpt_abc123"}, input=said("tokens=3 reasoning=0"))
    assert refused.value.body["param"] == "prompt"


# ---- a JSON schema reaches the model ----------------------------------------------------------

def test_chat_json_schema_is_json_object_and_the_schema_told():
    sent = _sent(ChatSurface(), {
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "x"}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "place", "schema": SCHEMA}}})
    assert sent["response_format"] == {"type": "json_object"}
    system, note, user = sent["messages"]
    assert system == {"role": "system", "content": "Be brief."} and user["role"] == "user"
    assert note["role"] == "system" and note["content"].startswith("Answer with one JSON object matching this JSON Schema")
    assert json.loads(note["content"].split(": ", 1)[1]) == SCHEMA


def test_responses_json_schema_is_json_object_and_the_schema_told():
    sent = _sent(ResponsesSurface(), {"input": "Where is the Eiffel tower?", "instructions": "Be brief.",
                                      "text": {"format": {"type": "json_schema", "name": "place", "schema": SCHEMA}}})
    assert sent["response_format"] == {"type": "json_object"}
    assert [m["role"] for m in sent["messages"]] == ["system", "system", "user"]
    assert json.loads(sent["messages"][1]["content"].split(": ", 1)[1]) == SCHEMA
    plain = _sent(ResponsesSurface(), {"input": "x", "text": {"format": {"type": "json_object"}}})
    assert plain["messages"] == [{"role": "user", "content": "x"}] and plain["response_format"] == {"type": "json_object"}


# ---- a file GLM cannot read leaves a note --------------------------------------------------------

def test_responses_input_file_and_file_id_image_leave_a_note():
    sent = _sent(ResponsesSurface(), {"input": [{"role": "user", "content": [
        {"type": "input_file", "filename": "report.pdf", "file_data": "data:application/pdf;base64,JVBERi0xLjQK"},
        {"type": "input_image", "file_id": "file-abc"},
        {"type": "input_text", "text": "Summarise the attached report."}]}]})
    assert sent["messages"][-1]["content"] == (
        "[file 'report.pdf' omitted: this model cannot read it]\n"
        "[image 'file-abc' omitted: this model cannot read it]\nSummarise the attached report.")
    by_id = _sent(ResponsesSurface(), {"input": [{"role": "user", "content": [
        {"type": "input_file", "file_id": "file-9"}]}]})
    assert "file-9" in by_id["messages"][-1]["content"]
