"""Client features the surfaces must carry through: what Claude Code sends with tool search and
documents (clients.md §5.3), how an overflow reads to it (§9 Errors), and how answers GLM ends
on its content filter or its context window reach Codex (§6.5), end to end with the official
SDKs through a real bridge and the GLM simulator, and through the translators directly."""
from __future__ import annotations

import json
import uuid

import anthropic
import msgspec
import openai
import pytest
from websockets.sync.client import connect

from bridge import glm
from bridge.errors import BridgeError, Kind
from bridge.surfaces import messages

from .conftest import new_user
from .test_responses import check_stream
from .test_responses_e2e import BETA, quick_bridge, ws_turn, ws_url  # noqa: F401 - a fixture


def _anthropic(bridge, database) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=bridge.url, api_key=new_user(database), max_retries=0)


def _said(directive: str, text: str = "go on") -> dict:
    return {"type": "text", "text": f"[[sim {directive}]] {text} {uuid.uuid4().hex[:6]}"}


def _upstream(content: list[dict] | str, *history: dict) -> list[dict]:
    """The GLM messages a Messages request becomes, as JSON."""
    request = messages.parse_request(msgspec.json.encode({
        "model": "glm-4.6", "max_tokens": 100,
        "messages": [*history, {"role": "user", "content": content}]}))
    return json.loads(msgspec.json.encode(messages.to_upstream(request).messages))


SEARCHED = [{"role": "user", "content": "find a tool to file an issue"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "ToolSearch",
                                               "input": {"query": "github issue"}}]}]
PDF = {"type": "base64", "media_type": "application/pdf", "data": "JVBERi0xLjQK"}


# ---- unknown block types: accepted, dropped, never a 400 --------------------------------------

def test_tool_search_answer_with_tool_reference_blocks_is_answered(quick_bridge, database):
    """Claude Code with tool search (ENABLE_TOOL_SEARCH=true) answers a ToolSearch call with
    `tool_reference` blocks in the tool_result; every later turn of that conversation carries
    them. The model is told which tools the search found (it was sent them all)."""
    response = _anthropic(quick_bridge, database).messages.create(
        model="glm-4.6", max_tokens=200, messages=[*SEARCHED, {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": [
                {"type": "tool_reference", "tool_name": "mcp__github__create_issue"},
                {"type": "tool_reference", "tool_name": "mcp__github__list_issues"}]},
            _said("tokens=2 reasoning=0")]}])
    assert response.stop_reason == "end_turn"
    # the simulator answers from the tool results it was sent
    assert "Tool available: mcp__github__create_issue" in response.content[-1].text
    assert "mcp__github__list_issues" in response.content[-1].text


def test_block_types_the_translator_does_not_know_are_dropped():
    """New block types (and known ones of another shape, such as a result whose content is an
    object) are accepted; at the top level they are dropped, in a tool result a note stands in
    their place, so the model never reads a tool that answered nothing."""
    sent = _upstream([
        {"type": "tool_result", "tool_use_id": "toolu_1", "content": [
            {"type": "text", "text": "found:"}, {"type": "tool_reference", "tool_name": "mcp__x"},
            {"type": "hologram", "frames": [1, 2]}]},
        {"type": "code_execution_tool_result", "tool_use_id": "x", "content": {"type": "code_execution_result"}},
        {"type": "container_upload", "file_id": "f"},
        {"type": "text", "text": "carry on"}], *SEARCHED)
    assert sent[-2:] == [
        {"role": "tool", "tool_call_id": "toolu_1",
         "content": "found:\nTool available: mcp__x\n[hologram content omitted]"},
        {"role": "user", "content": "carry on"}]


def test_an_image_a_tool_returned_leaves_a_note():
    """A screenshot tool's answer (Playwright MCP, a browser tool): GLM's tool messages are text,
    so the image cannot go; a note says it was there."""
    sent = _upstream([
        {"type": "tool_result", "tool_use_id": "toolu_1", "content": [
            {"type": "text", "text": "screenshot taken"},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}]},
        {"type": "text", "text": "what do you see?"}], *SEARCHED)
    assert sent[-2:] == [
        {"role": "tool", "tool_call_id": "toolu_1",
         "content": "screenshot taken\n[image omitted: this model reads no images in tool results]"},
        {"role": "user", "content": "what do you see?"}]


# ---- documents: their text reaches the model; one GLM cannot read leaves a note -----------------

def test_text_documents_and_search_results_reach_the_model_with_their_title_and_context():
    sent = _upstream([
        {"type": "document", "source": {"type": "text", "media_type": "text/plain",
                                        "data": "The grass is green."},
         "title": "facts", "context": "from the garden", "citations": {"enabled": True}},
        {"type": "document", "source": {"type": "content", "content": [
            {"type": "text", "text": "Part one."}, {"type": "text", "text": "Part two."}]}},
        {"type": "search_result", "source": "https://example.com/sky", "title": "Sky",
         "content": [{"type": "text", "text": "The sky is blue."}], "citations": {"enabled": True}},
        {"type": "text", "text": "What colour is the grass?"}])
    assert sent == [{"role": "user", "content":
                     '<document title="facts" context="from the garden">\nThe grass is green.\n</document>\n'
                     '<document>\nPart one.\nPart two.\n</document>\n'
                     '<search_result title="Sky" source="https://example.com/sky">\nThe sky is blue.\n</search_result>\n'
                     "What colour is the grass?"}]


def test_documents_in_a_tool_result_reach_the_model(quick_bridge, database):
    """Tools answer with documents and search results too (an MCP search tool, a file reader);
    a PDF there becomes a note for the model, not a 400 that would wedge the conversation."""
    response = _anthropic(quick_bridge, database).messages.create(
        model="glm-4.6", max_tokens=300, messages=[*SEARCHED, {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": [
                {"type": "search_result", "source": "https://example.com", "title": "Issues",
                 "content": [{"type": "text", "text": "Use create_issue."}]},
                {"type": "document", "source": PDF, "title": "manual"}]},
            _said("tokens=2 reasoning=0")]}])
    text = response.content[-1].text
    assert "Use create_issue." in text and "PDF document 'manual' omitted" in text


def test_a_pdf_the_model_cannot_read_leaves_a_note_for_it():
    """GLM reads text and images; a PDF the user sent must not be dropped silently (the model
    would answer as if it had read it) nor refused (the turn would stay in the client's history
    and fail every later request): a note stands in its place."""
    sent = _upstream([{"type": "text", "text": "summarise"},
                      {"type": "document", "source": PDF, "title": "report"}])
    assert sent == [{"role": "user", "content":
                     "summarise\n[PDF document 'report' omitted: this model cannot read it]"}]


# ---- overflow on Messages reads as Anthropic's -------------------------------------------------

def test_glm_prompt_too_long_reads_as_prompt_is_too_long(quick_bridge, database):
    """GLM's 1261 (the prompt passed our estimate but not GLM's count): Claude Code compacts
    only on "prompt is too long", before the stream and after its headers alike."""
    client = _anthropic(quick_bridge, database)
    with pytest.raises(anthropic.BadRequestError) as caught:
        client.messages.create(model="glm-4.6", max_tokens=100, messages=[
            {"role": "user", "content": [_said("fault=1261", "hi")]}])
    said = caught.value.body["error"]["message"]
    # in our words, not the upstream's ("Prompt exceeds max length" is the simulator's)
    assert said.startswith("prompt is too long: The prompt exceeds the context window") and "max length" not in said
    with pytest.raises(anthropic.APIStatusError) as caught:
        with client.messages.stream(model="glm-4.6", max_tokens=100, messages=[
                {"role": "user", "content": [_said("fault=1261 header_delay=1", "hi")]}]) as stream:
            for _ in stream:
                pass
    assert caught.value.body["error"]["message"].startswith("prompt is too long")


def test_every_context_length_error_starts_as_claude_code_matches():
    ours = BridgeError(Kind.context_length, "This model's maximum context length is 200000 tokens.",
                       limit=200000, requested=210000)
    glms = glm.upstream_error(400, json.dumps({"error": {"code": "1261", "message": "m"}}).encode(), "r")
    assert [json.loads(messages.error_response(e)[2])["error"]["message"] for e in (ours, glms)] == [
        "prompt is too long: 210000 tokens > 200000 maximum", f"prompt is too long: {glms.message}"]
    stream = messages.MessagesStream("glm-4.6", "x", 1)
    assert f"prompt is too long: {glms.message}".encode() in stream.fail(glms)


# ---- GLM's content filter reaches Codex as a failure it does not retry --------------------------

def test_content_filter_is_a_failure_codex_shows_not_a_retry(quick_bridge, database):
    """`response.incomplete` makes Codex send the whole turn again (up to 5 times, each billed,
    each filtered the same); `invalid_prompt` is shown and not retried."""
    client = openai.OpenAI(base_url=quick_bridge.url + "/v1", api_key=new_user(database), max_retries=0)
    directive = "tokens=20 reasoning=0 fault=sensitive"
    events = list(client.responses.create(model="glm-4.6", stream=True, input=_said(directive)["text"]))
    final = check_stream([e.model_dump(mode="json", exclude_unset=True) for e in events])
    assert events[-1].type == "response.failed" and final["error"]["code"] == "invalid_prompt"
    assert "content filter" in final["error"]["message"] and final["usage"]["output_tokens"] > 0
    whole = client.responses.create(model="glm-4.6", input=_said(directive)["text"])
    assert whole.status == "failed" and whole.error.code == "invalid_prompt"


def test_content_filter_over_the_websocket_is_the_same_failure(quick_bridge, database):
    key = new_user(database)
    with connect(ws_url(quick_bridge), additional_headers={"authorization": f"Bearer {key}", **BETA}) as socket:
        final = check_stream(ws_turn(socket, {"input": _said("tokens=20 reasoning=0 fault=sensitive")["text"]}))
        assert final["status"] == "failed" and final["error"]["code"] == "invalid_prompt"
        # a failed turn is not kept: the socket serves the next one
        assert ws_turn(socket, {"input": _said("tokens=2 reasoning=0")["text"]})[-1]["type"] == "response.completed"
