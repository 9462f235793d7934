"""Images a tool returns on the Responses surface: Codex's `view_image` (and MCP tools, and the
openai SDK's callers) give a `function_call_output` whose `output` is a list of content parts,
`input_text`, `input_image` (`image_url`: a data URL or https; or `file_id`), `input_file`.

GLM's Chat API takes no image in a `tool` message, so the tool message keeps the output's text
(a short mark where each image was), and the images go to the model in a user message right after
that turn's tool messages, each after a text part naming the tool call it came from, in the
parts the Chat surface sends a user's images in (`image_url`). The order stays valid for GLM:
the assistant's tool calls, their tool messages, the images, then whatever came next. An image
given only by its Files API id, or a file, cannot be fetched: it leaves a note in the tool text,
as it does in a user turn. User images go to every model the plans serve (there is no text-only
refusal to follow), and tool images go the same way.

Through the translator with recorded Codex-shaped request bodies, and end to end: the openai SDK
through a real bridge in front of a scripted upstream that records what it was sent."""
from __future__ import annotations

import json
import uuid

import openai
import pytest

from bridge import glm, wire
from bridge.surfaces import responses
from bridge.surfaces.responses import ResponsesSurface

from .conftest import new_user, start_bridge
from .scripted_upstream import REQUESTS, start_scripted

PNG = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
JPEG_URL = "https://example.com/screens/after.jpg"

# Tools as Codex sends them (codex-rs core/src/tools/spec.rs): exec_command, view_image, apply_patch
CODEX_TOOLS = [
    {"type": "function", "name": "exec_command", "description": "Runs a command in a PTY", "strict": False,
     "parameters": {"type": "object", "properties": {"cmd": {"type": "string"}}, "required": ["cmd"],
                    "additionalProperties": False}},
    {"type": "function", "name": "view_image", "strict": False,
     "description": "Attach a local image (by filesystem path) to the conversation context for this turn.",
     "parameters": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"],
                    "additionalProperties": False}},
    {"type": "custom", "name": "apply_patch", "description": "Edit files",
     "format": {"type": "grammar", "syntax": "lark", "definition": "start: begin_patch hunk+ end_patch"}},
]


def codex_turn(*items: dict) -> dict:
    """A Codex request body (codex-rs codex-api common.rs ResponsesApiRequest), its history
    ending in the given items."""
    return {
        "model": "glm-4.6", "instructions": "You are Codex, a coding agent.", "stream": True,
        "tool_choice": "auto", "parallel_tool_calls": True, "store": False,
        "reasoning": {"effort": "medium", "summary": "auto"}, "include": ["reasoning.encrypted_content"],
        "prompt_cache_key": "019a-thread", "text": {"verbosity": "medium"}, "tools": CODEX_TOOLS,
        "input": [
            {"type": "message", "role": "user", "content": [
                {"type": "input_text", "text": "<environment_context><cwd>/repo</cwd></environment_context>"}]},
            {"type": "message", "role": "user", "content": [
                {"type": "input_text", "text": "The login page looks wrong. Look at docs/shot.png."}]},
            *items]}


def reasoning(text: str) -> dict:
    return {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": text}],
            "encrypted_content": responses.seal_reasoning(text)}


def call(call_id: str, name: str, arguments: dict) -> dict:
    return {"type": "function_call", "id": f"fc_{call_id}", "call_id": call_id, "name": name,
            "arguments": json.dumps(arguments)}


def output(call_id: str, parts: list[dict] | str) -> dict:
    return {"type": "function_call_output", "call_id": call_id, "output": parts}


def sent(body: dict) -> list[dict]:
    """The messages of the GLM request a Responses body becomes, as the upstream reads them."""
    parsed = ResponsesSurface().parse(json.dumps(body).encode())
    return json.loads(wire.encoder.encode(glm.prepare(parsed.request)))["messages"]


def shown_for(message: dict) -> list[tuple[str, str]]:
    """A user message's parts as (type, text or URL)."""
    return [(p["type"], p["text"] if p["type"] == "text" else p["image_url"]["url"]) for p in message["content"]]


# ---- Codex's view_image ----------------------------------------------------------------------

def test_codex_view_image_output_is_shown_to_the_model():
    """Codex's view_image turn, as it sends it: the output is the image alone."""
    messages = sent(codex_turn(
        reasoning("I should look at the screenshot."),
        call("call_V1", "view_image", {"path": "docs/shot.png"}),
        output("call_V1", [{"type": "input_image", "image_url": PNG}])))
    assert [m["role"] for m in messages] == ["system", "user", "user", "assistant", "tool", "user"]
    assistant, tool, images = messages[3:]
    assert [c["id"] for c in assistant["tool_calls"]] == ["call_V1"]
    assert assistant["reasoning_content"] == "I should look at the screenshot."
    # the tool message answers the call, and says where its image went (never empty)
    assert tool["tool_call_id"] == "call_V1" and tool["content"]
    assert "image" in tool["content"]
    # the image itself, in the parts the Chat surface sends a user's image in, after its caption
    (kind, caption), image = shown_for(images)
    assert kind == "text" and "call_V1" in caption
    assert image == ("image_url", PNG)


def test_parallel_calls_text_and_images_then_the_next_user_turn():
    """exec_command and view_image called together, an output of text and images, and the user
    speaking again: assistant calls, both tool messages, the images, then the user's words."""
    messages = sent(codex_turn(
        call("call_A", "exec_command", {"cmd": "git status"}),
        call("call_B", "view_image", {"path": "docs/shot.png"}),
        output("call_A", "On branch main\nnothing to commit"),
        output("call_B", [{"type": "input_text", "text": "Screenshot of the login page:"},
                          {"type": "input_image", "image_url": PNG, "detail": "high"},
                          {"type": "input_text", "text": "and after the fix:"},
                          {"type": "input_image", "image_url": {"url": JPEG_URL}}]),
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Compare them."}]}))
    assert [m["role"] for m in messages] == ["system", "user", "user", "assistant", "tool", "tool", "user", "user"]
    assert [c["id"] for c in messages[3]["tool_calls"]] == ["call_A", "call_B"]
    assert messages[4] == {"role": "tool", "content": "On branch main\nnothing to commit", "tool_call_id": "call_A"}
    tool_b = messages[5]
    assert tool_b["tool_call_id"] == "call_B"
    text = tool_b["content"]  # the text kept, in its order, with a mark where each image was
    assert text.index("Screenshot of the login page:") < text.index("and after the fix:")
    assert text.count("[image") == 2
    shown = shown_for(messages[6])
    assert [kind for kind, _ in shown] == ["text", "image_url", "image_url"]
    assert "call_B" in shown[0][1] and [url for _, url in shown[1:]] == [PNG, JPEG_URL]
    assert messages[7] == {"role": "user", "content": "Compare them."}


def test_images_of_several_calls_each_after_its_own_caption_and_before_the_next_turn():
    """Two calls' images in one user message after the turn's tool messages, each captioned with
    its call; the model's next turn (a custom tool call) comes after them, and its own output
    (a custom_tool_call_output with an image) is shown after it."""
    messages = sent(codex_turn(
        call("call_1", "view_image", {"path": "a.png"}),
        call("call_2", "view_image", {"path": "b.png"}),
        output("call_1", [{"type": "input_image", "image_url": PNG}]),
        output("call_2", [{"type": "input_image", "image_url": JPEG_URL}]),
        {"type": "custom_tool_call", "call_id": "call_3", "name": "apply_patch", "input": "*** Begin Patch"},
        {"type": "custom_tool_call_output", "call_id": "call_3", "output": [
            {"type": "input_text", "text": "Done!"}, {"type": "input_image", "image_url": PNG}]}))
    assert [m["role"] for m in messages] == [
        "system", "user", "user", "assistant", "tool", "tool", "user", "assistant", "tool", "user"]
    first = shown_for(messages[6])
    assert [kind for kind, _ in first] == ["text", "image_url", "text", "image_url"]
    assert "call_1" in first[0][1] and first[1][1] == PNG and "call_2" in first[2][1] and first[3][1] == JPEG_URL
    assert messages[7]["tool_calls"][0]["id"] == "call_3"
    assert messages[8]["tool_call_id"] == "call_3" and messages[8]["content"].startswith("Done!")
    last = shown_for(messages[9])
    assert "call_3" in last[0][1] and last[1] == ("image_url", PNG)


def test_an_image_by_file_id_and_a_file_leave_a_note_in_the_tool_text():
    """Nothing fetchable: a note in the tool's text, as in a user turn, and no image message."""
    messages = sent(codex_turn(
        call("call_F", "exec_command", {"cmd": "render"}),
        output("call_F", [{"type": "input_text", "text": "rendered"},
                          {"type": "input_image", "file_id": "file-img1"},
                          {"type": "input_file", "filename": "report.pdf", "file_data": "data:application/pdf;base64,JVBE"}])))
    assert [m["role"] for m in messages] == ["system", "user", "user", "assistant", "tool"]
    assert messages[-1]["content"] == ("rendered\n[image 'file-img1' omitted: this model cannot read it]\n"
                                       "[file 'report.pdf' omitted: this model cannot read it]")


def test_text_only_outputs_are_as_before():
    messages = sent(codex_turn(
        call("call_T", "exec_command", {"cmd": "ls"}),
        output("call_T", [{"type": "input_text", "text": "a"}, {"type": "input_text", "text": "b"}])))
    assert messages[-1] == {"role": "tool", "content": "a\nb", "tool_call_id": "call_T"}
    assert messages[-2]["role"] == "assistant"


def test_the_prompt_bound_counts_the_tool_images():
    """The shown images are image parts like a user's: admission's worst case holds each."""
    parsed = ResponsesSurface().parse(json.dumps(codex_turn(
        call("call_V1", "view_image", {"path": "docs/shot.png"}),
        output("call_V1", [{"type": "input_image", "image_url": PNG}]))).encode())
    assert sum(m.images() for m in parsed.request.messages) == 1


# ---- end to end: the SDK, a real bridge, an upstream that records what it gets ---------------------

@pytest.fixture(scope="module")
def scripted_bridge(database):
    upstream, url = start_scripted()
    server = start_bridge(database, url, CODEPLAN_UPSTREAM_KEYS="k1")
    yield server
    server.stop()
    upstream.shutdown()


def test_a_view_image_turn_reaches_the_upstream_with_its_image(scripted_bridge, database):
    marker = uuid.uuid4().hex
    body = codex_turn(call("call_V1", "view_image", {"path": "docs/shot.png"}),
                      output("call_V1", [{"type": "input_text", "text": f"shot {marker}"},
                                         {"type": "input_image", "image_url": PNG}]))
    client = openai.OpenAI(base_url=scripted_bridge.url + "/v1", api_key=new_user(database), max_retries=0)
    events = list(client.responses.create(**{k: v for k, v in body.items() if k != "stream"}, stream=True))
    assert events[-1].type == "response.completed"
    received = [r for r in REQUESTS if marker in json.dumps(r.get("messages"))]
    assert len(received) == 1
    messages = received[0]["messages"]
    assert [m["role"] for m in messages[-3:]] == ["assistant", "tool", "user"]
    assert messages[-2]["tool_call_id"] == "call_V1" and f"shot {marker}" in messages[-2]["content"]
    assert messages[-1]["content"][-1] == {"type": "image_url", "image_url": {"url": PNG}}
