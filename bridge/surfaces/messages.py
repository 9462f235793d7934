"""Anthropic Messages <-> GLM chat completions, sans I/O.

`to_upstream` turns what Claude Code (and the Anthropic providers of Cline, Roo, OpenCode) send
into a GLM request; `MessagesStream` turns GLM chunks into Anthropic's event stream:
message_start, content blocks (thinking, text, tool_use: its input whole, at the call's end)
with increasing index, message_delta, message_stop. Fields GLM has no use for (cache_control,
context_management, future ones) and content block types the translator does not know are
accepted and dropped, never a 400. Text documents and search results reach the model as tagged
text; a document or an image GLM cannot read (a PDF, a Files API image) leaves a note in its
place. Asked of the answer and honoured: a JSON schema (`output_config.format`, as json_object
with the schema told), Anthropic's own client tools (bash, the text editor, memory: offered
with their published input schemas).
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import math
from typing import Annotated, Literal

import msgspec
from msgspec import UNSET, Raw, Struct, UnsetType

from .. import glm, sse, wire
from ..errors import BridgeError, Kind
from . import Parsed, decode_body, with_schema

SURFACE = "messages"


# ---- requests ---------------------------------------------------------------------------

class Source(Struct):
    """An image's or a document's source: `base64` / `url` (images, PDFs), `text` (a plain-text
    document, its text in `data`), `content` (a document made of blocks), `file` (Files API)."""
    type: str = "base64"
    media_type: str | None = None
    data: str | None = None
    url: str | None = None
    content: str | list["Block"] | None = None
    file_id: str | None = None


class Block(Struct):
    # Any type: Anthropic adds block types (tool_reference, search_result, ...) and Claude Code
    # sends them as soon as a beta is on; one the translator does not know is dropped, never a
    # 400 (it would stay in the history and fail every later turn of the conversation)
    type: str
    text: str | None = None
    # tool_use
    id: str | None = None
    name: str | None = None
    input: Raw = Raw()
    # tool_result (its content: text, images, documents, tool references); search_result (its
    # text blocks); a dict only in block types we drop (e.g. code_execution_tool_result)
    tool_use_id: str | None = None
    content: str | list["Block"] | dict | None = None
    is_error: bool | None = None
    # thinking
    thinking: str | None = None
    signature: str | None = None
    # image, document; a search_result's source is a string (where the result came from)
    source: Source | str | None = None
    # document, search_result
    title: str | None = None
    context: str | None = None
    # tool_reference (tool search): a tool the search found
    tool_name: str | None = None


class Message(Struct):
    # mid-conversation system turns: Claude Code sends them
    role: Literal["user", "assistant", "system"]
    content: str | list[Block]


class ToolDef(Struct):
    # toolsets (computer_toolset_*, browser_toolset_*, mcp_toolset) carry no name: `_tools`
    # drops them, as it drops the server tools; a custom tool without one is refused there
    name: str | None = None
    description: str | None = None
    input_schema: Raw = Raw()
    # custom tools: absent or "custom"; Anthropic-defined ones a versioned type (bash_20250124,
    # web_search_20250305...) and no schema (`_tools`)
    type: str | None = None


class ToolChoice(Struct):
    type: Literal["auto", "any", "tool", "none"] = "auto"
    name: str | None = None  # type tool: the one tool the model may call
    disable_parallel_tool_use: bool | None = None  # true: one tool call at most


class ThinkingConfig(Struct):
    # between_tools: think before each tool call and after each result; GLM thinks where it
    # will, so it is asked as enabled, as adaptive is
    type: Literal["enabled", "disabled", "adaptive", "between_tools"] = "enabled"
    budget_tokens: Annotated[int, msgspec.Meta(ge=0)] | None = None


class Metadata(Struct):
    user_id: str | None = None


class OutputFormat(Struct):
    type: str  # json_schema, the one type Anthropic defines; any other is refused (_check_format)
    schema: Raw = Raw()


class OutputConfig(Struct):
    format: OutputFormat | None = None
    # `effort` (low ... max) is accepted and ignored: GLM has no switch for it, and it asks
    # how hard to work, not what the answer must be (Claude Code sends it with every request)


class MessagesRequest(Struct):
    model: str
    messages: list[Message]
    max_tokens: int | None = None
    system: str | list[Block] | None = None
    stream: bool | None = False
    temperature: float | None = None
    top_p: float | None = None
    stop_sequences: list[str] | None = None
    tools: list[ToolDef] | None = None
    tool_choice: ToolChoice | None = None
    thinking: ThinkingConfig | None = None
    metadata: Metadata | None = None
    output_config: OutputConfig | None = None
    # top_k, cache_control, context_management, service_tier and any future field are
    # accepted and dropped


class CountTokensRequest(Struct):
    model: str
    messages: list[Message]
    system: str | list[Block] | None = None
    tools: list[ToolDef] | None = None
    tool_choice: ToolChoice | None = None
    thinking: ThinkingConfig | None = None
    output_config: OutputConfig | None = None  # its schema is told the model: it counts


_decoder = msgspec.json.Decoder(MessagesRequest)
_count_decoder = msgspec.json.Decoder(CountTokensRequest)


def _check(messages: list[Message]) -> None:
    """What the decoder cannot say: at least one message, and text blocks with their text."""
    if not messages:
        raise BridgeError(Kind.invalid_request, "messages: at least one message is required")
    for i, message in enumerate(messages):
        if isinstance(message.content, list):
            for j, block in enumerate(message.content):
                if block.type == "text" and block.text is None:
                    raise BridgeError(Kind.invalid_request,
                                      f"messages.{i}.content.{j}.text: a text block needs its text")


def _check_format(config: OutputConfig | None) -> None:
    """Structured output: a JSON schema is honoured (`to_upstream`); any other format type, or
    one without its schema, is refused, never answered as if not asked."""
    fmt = config.format if config is not None else None
    if fmt is None:
        return
    if fmt.type != "json_schema":
        raise BridgeError(Kind.invalid_request, f"output_config.format.type: {fmt.type!r} is not served: "
                          "json_schema is", param="output_config.format.type")
    if not wire.present(fmt.schema):
        raise BridgeError(Kind.invalid_request, "output_config.format.schema: a json_schema format needs "
                          "its schema", param="output_config.format.schema")


def parse_request(body: bytes) -> MessagesRequest:
    request = decode_body(_decoder, body)
    _check(request.messages)
    _check_format(request.output_config)
    if request.stop_sequences and len(set(request.stop_sequences)) > 1:
        # GLM stops at one word at most (glm.prepare): the others would be ignored in silence
        raise BridgeError(Kind.invalid_request, "stop_sequences: this model stops at one stop sequence at most",
                          param="stop_sequences")
    return request


def _text_of(content: str | list[Block] | dict | None) -> str:
    """System text: its text blocks."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return ""
    return "\n".join(b.text for b in content if b.type == "text" and b.text)


def _document_text(block: Block) -> str | None:
    """A `document` or `search_result` block as text for the model, headed by what the client
    said about it (title, context, where a search result came from); None for a document GLM
    cannot read (a PDF, as base64 or a URL, or a Files API file: GLM takes text and images)."""
    source = block.source
    if block.type == "search_result":
        body = _text_of(block.content)
        origin = source if isinstance(source, str) else None
    elif isinstance(source, Source) and source.type == "text":
        body, origin = source.data or "", None
    elif isinstance(source, Source) and source.type == "content":
        body, origin = _text_of(source.content), None
    else:
        return None
    # tagged, so the model tells where the document ends and the user's own words begin
    said = "".join(f' {name}="{value.replace(chr(34), chr(39))}"' for name, value in (
        ("title", block.title), ("source", origin), ("context", block.context)) if value)
    return f"<{block.type}{said}>\n{body}\n</{block.type}>"


def _result_text(content: str | list[Block] | dict | None) -> str:
    """A tool result's content as the text of GLM's tool message. It answers a call the model
    made, so nothing in it is dropped without a trace: a block GLM cannot take leaves a note in
    its place, or the model would read a search that found nothing, or an empty file."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return ""
    parts: list[str] = []
    for block in content:
        if block.type == "text":
            if block.text:
                parts.append(block.text)
        elif block.type in ("document", "search_result"):
            text = _document_text(block)
            parts.append(text if text is not None else _unreadable(block))
        elif block.type == "tool_reference":
            # tool search's answer: Anthropic expands it into the tool's definition; GLM was
            # sent every tool (deferred ones too), so naming the tool is the whole answer
            if block.tool_name:
                parts.append(f"Tool available: {block.tool_name}")
        elif block.type == "image":
            # GLM's tool messages are text: a screenshot a tool returned cannot reach the model,
            # and without a word it would take the tool for one that showed nothing
            parts.append("[image omitted: this model reads no images in tool results]")
        else:
            parts.append(f"[{block.type} content omitted]")
    return "\n".join(parts)


def _unreadable(block: Block) -> str:
    """The note standing in for a document GLM cannot read."""
    return f"[{_media_type(block)} document{_titled(block)} omitted: this model cannot read it]"


def _media_type(block: Block) -> str:
    """What kind of document GLM cannot read, for the message that says so."""
    source = block.source
    if not isinstance(source, Source):
        return "source-less"
    if source.type == "file":
        return "Files API"
    # base64 and URL documents are PDFs unless they say otherwise
    return "PDF" if source.media_type in (None, "application/pdf") else source.media_type


def _titled(block: Block) -> str:
    return f" '{block.title}'" if block.title else ""


def _unshown(block: Block) -> str:
    """The note standing in for an image GLM cannot be shown."""
    said = block.source.file_id if isinstance(block.source, Source) else None
    return f"[image{f' {said!r}' if said else ''} omitted: this model cannot read it]"


def _image_part(block: Block) -> wire.ContentPart | None:
    source = block.source
    if not isinstance(source, Source):
        return None
    if source.type == "url" and source.url:
        url = source.url
    elif source.data:
        try:
            binascii.a2b_base64(source.data, strict_mode=True)
        except (binascii.Error, ValueError):
            raise BridgeError(Kind.invalid_request, "An image's base64 data is not valid base64.",
                              param="source.data") from None
        url = f"data:{source.media_type or 'image/png'};base64,{source.data}"
    else:
        return None
    return wire.ContentPart(type="image_url", image_url=wire.ImageUrl(url=url))


def _user_content(blocks: list[Block]) -> str | list[wire.ContentPart] | None:
    """A user turn's content but its tool results; block types GLM has no use for are dropped."""
    parts: list[wire.ContentPart] = []
    for block in blocks:
        if block.type == "text" and block.text:
            parts.append(wire.ContentPart(type="text", text=block.text))
        elif block.type == "image":
            # one GLM cannot be shown (a Files API id: the bridge has no Files API) leaves a
            # note, as an unreadable document does, and as on Responses
            image = _image_part(block)
            parts.append(image if image is not None else wire.ContentPart(type="text", text=_unshown(block)))
        elif block.type in ("document", "search_result"):
            # one GLM cannot read leaves a note, as in a tool result: dropped silently, the model
            # would answer as if it had read it; refused, the turn would stay in the client's
            # history and fail every later request of the conversation
            text = _document_text(block)
            if text is None:
                text = _unreadable(block)
            if text:
                parts.append(wire.ContentPart(type="text", text=text))
    if not parts:
        return None
    if all(p.type == "text" for p in parts):
        return "\n".join(p.text for p in parts if isinstance(p.text, str))
    return parts


def _messages(request: MessagesRequest) -> list[wire.Message]:
    out: list[wire.Message] = []
    system = _text_of(request.system) if request.system is not None else ""
    if system:
        out.append(wire.Message(role="system", content=system))
    for message in request.messages:
        blocks = [Block(type="text", text=message.content)] if isinstance(message.content, str) \
            else message.content
        if message.role == "assistant":
            text = "".join(b.text or "" for b in blocks if b.type == "text")
            reasoning = "".join(b.thinking or "" for b in blocks if b.type == "thinking")
            calls = [wire.ToolCall(id=b.id or "", type="function", function=wire.FunctionCall(
                name=b.name or "", arguments=bytes(b.input).decode() if wire.present(b.input) else "{}"))
                for b in blocks if b.type == "tool_use"]
            assistant = wire.Message(role="assistant", content=text or (None if calls else ""))
            if reasoning:
                assistant.reasoning_content = reasoning  # GLM wants its thinking replayed
            if calls:
                assistant.tool_calls = calls
            out.append(assistant)
        elif message.role == "system":
            # Claude Code sends system turns mid-conversation; GLM takes them where they stand
            out.append(wire.Message(role="system", content=_text_of(blocks)))
        else:
            # tool results answer the previous assistant turn, so they come first
            for block in blocks:
                if block.type == "tool_result":
                    result = _result_text(block.content)
                    if block.is_error:
                        result = "Error: " + result
                    out.append(wire.Message(role="tool", content=result, tool_call_id=block.tool_use_id or ""))
            rest = _user_content(blocks)
            if rest is not None:
                out.append(wire.Message(role="user", content=rest))
    return out


def _object(properties: dict, required: list[str]) -> Raw:
    return Raw(msgspec.json.encode({"type": "object", "properties": properties, "required": required}))


_STRING, _LINE = {"type": "string"}, {"type": "integer"}
_RANGE = {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 2,
          "description": "view: the first and last line to show, from 1; -1 for the last: to the end"}


def _editor(undo: bool, insert_text: str) -> tuple[str, Raw]:
    """The text editor (Anthropic's docs, text-editor-tool): view, create, str_replace, insert,
    and undo_edit in the versions before Claude 4. Its insert takes its text in `new_str` in the
    published schema of those versions, in `insert_text` in the Claude 4 ones (what Claude
    sends and the docs now say: anthropics/anthropic-sdk-python#1155)."""
    commands = ["view", "create", "str_replace", "insert"] + (["undo_edit"] if undo else [])
    description = ("View, create and edit plain-text files. view: a file with line numbers, or a "
                   "directory's files; create: write file_text to a new file; str_replace: replace "
                   "old_str, which must appear exactly once, with new_str; insert: add "
                   f"{insert_text} after line insert_line (0: the top of the file)"
                   + ("; undo_edit: revert the file's last edit." if undo else "."))
    properties = {"command": {"type": "string", "enum": commands},
                  "path": {**_STRING, "description": "file or directory"}, "file_text": _STRING,
                  "old_str": _STRING, "new_str": _STRING, "insert_line": _LINE, "view_range": _RANGE}
    properties[insert_text] = _STRING
    return description, _object(properties, ["command", "path"])


_BASH = ("Run a command in a persistent bash session (its state lasts between calls).", _object({
    "command": {**_STRING, "description": "The bash command to run. Required unless the tool is being restarted."},
    "restart": {"type": "boolean", "description": "true restarts the session; otherwise leave it out."}}, []))
_OLD_EDITOR, _EDITOR = _editor(True, "new_str"), _editor(False, "insert_text")
_MEMORY = ("Your memory directory, /memories, kept across conversations: view it (or a file, "
           "view_range for some lines), create a file with file_text, str_replace old_str with "
           "new_str, insert insert_text after line insert_line, delete a file or directory, "
           "rename old_path to new_path.", _object({
               "command": {"type": "string", "enum": ["view", "create", "str_replace", "insert", "delete", "rename"]},
               "path": {**_STRING, "description": "under /memories"}, "view_range": _RANGE,
               "file_text": _STRING, "old_str": _STRING, "new_str": _STRING, "insert_line": _LINE,
               "insert_text": _STRING, "old_path": _STRING, "new_path": _STRING}, ["command"]))

# Anthropic-defined client tools (the client runs them; the model calls them by name, with
# inputs of a schema Anthropic publishes and keeps on its side): each is offered GLM as a function
# of that schema. Their names are fixed (the SDK's ToolUnionParam); the request's own is used.
_CLIENT_TOOLS: dict[str, tuple[str, tuple[str, Raw]]] = {
    "bash_20241022": ("bash", _BASH), "bash_20250124": ("bash", _BASH),
    "text_editor_20241022": ("str_replace_editor", _OLD_EDITOR),
    "text_editor_20250124": ("str_replace_editor", _OLD_EDITOR),
    "text_editor_20250429": ("str_replace_based_edit_tool", _EDITOR),
    "text_editor_20250728": ("str_replace_based_edit_tool", _EDITOR),
    "memory_20250818": ("memory", _MEMORY),
}
# Anthropic-defined tools Anthropic runs itself (any version): dropped, the model answers
# without them (Claude Code sends web_search with every request, and the advisor)
_SERVER_TOOLS = ("web_search_", "web_fetch_", "code_execution_", "tool_search_tool_", "advisor_", "mcp_toolset")


def _server(tool: ToolDef) -> bool:
    return tool.type is not None and tool.type.startswith(_SERVER_TOOLS)


def _tools(tools: list[ToolDef] | None) -> list[wire.Tool]:
    """The tools GLM is offered: the client's own (with an input_schema) as they are, Anthropic's
    client tools with their schema; server tools and nameless toolsets dropped. A versioned type
    this bridge does not know is refused: dropped, the model would answer without a tool the
    client meant it to have (computer use, a version newer than this table)."""
    out: list[wire.Tool] = []
    for i, t in enumerate(tools or ()):
        if t.type in (None, "custom") or wire.present(t.input_schema):
            if not t.name:
                raise BridgeError(Kind.invalid_request, f"tools.{i}.name: a custom tool needs its name",
                                  param=f"tools.{i}.name")
            out.append(wire.Tool(type="function", function=wire.FunctionDef(
                name=t.name, description=t.description if t.description else UNSET,
                parameters=t.input_schema)))  # absent: the empty schema (wire.FunctionDef)
        elif t.type in _CLIENT_TOOLS:
            name, (description, schema) = _CLIENT_TOOLS[t.type]
            out.append(wire.Tool(type="function", function=wire.FunctionDef(
                name=t.name or name, description=description, parameters=schema)))
        elif not (_server(t) or t.name is None):
            raise BridgeError(Kind.invalid_request, f"tools.{i}.type: {t.type!r} is not served. Served: custom "
                              f"tools (with an input_schema) and {', '.join(sorted(_CLIENT_TOOLS))}; server "
                              "tools (web search, web fetch, code execution...) are answered without",
                              param=f"tools.{i}.type")
    return out


def _named(tools: list[wire.Tool], choice: ToolChoice, declared: list[ToolDef] | None) -> list[wire.Tool]:
    """`tool_choice: {"type": "tool", "name": ...}`: that tool alone is offered (GLM's choice is
    auto alone, glm.prepare: the model may still answer in text, but calls no other tool)."""
    if not choice.name:
        raise BridgeError(Kind.invalid_request, "tool_choice.name: a tool choice of type tool needs the tool's name")
    named = [t for t in tools if isinstance(t.function, wire.FunctionDef) and t.function.name == choice.name]
    if not named:
        server = next((t for t in declared or () if t.name == choice.name and _server(t)), None)
        if server is not None:
            raise BridgeError(Kind.invalid_request, f"tool_choice.name: {choice.name!r} is a server tool "
                              f"({server.type}) this service does not run", param="tool_choice.name")
        raise BridgeError(Kind.invalid_request,
                          f"tool_choice.name: {choice.name!r} is not among the request's tools")
    return named


def to_upstream(request: MessagesRequest) -> wire.ChatRequest:
    upstream = wire.ChatRequest(model=request.model, messages=_messages(request), stream=bool(request.stream))
    if request.thinking is not None:
        upstream.thinking = wire.Thinking(type="disabled" if request.thinking.type == "disabled" else "enabled")
    choice = request.tool_choice or ToolChoice()
    tools = _tools(request.tools)
    if choice.type == "tool":
        tools = _named(tools, choice, request.tools)
    if tools and choice.type != "none":
        upstream.tools = tools  # tool_choice any: GLM supports only auto (glm.prepare)
    if request.temperature is not None:
        upstream.temperature = request.temperature
    if request.top_p is not None:
        upstream.top_p = request.top_p
    if request.stop_sequences:
        upstream.stop = request.stop_sequences
    if request.metadata is not None and request.metadata.user_id:
        upstream.user_id = glm.user_id(request.metadata.user_id)
    fmt = request.output_config.format if request.output_config is not None else None
    if fmt is not None:
        # GLM documents text and json_object alone (glm-upstream.md §4): a JSON schema is asked
        # as json_object, and the model is told the schema (as on Chat and Responses)
        upstream.response_format = wire.ResponseFormat(type="json_object")
        with_schema(upstream.messages, fmt.schema)
    return upstream


def count_request(body: bytes) -> wire.ChatRequest:
    """count_tokens takes the same prompt fields as a message request, without max_tokens."""
    request = decode_body(_count_decoder, body)
    _check(request.messages)
    _check_format(request.output_config)
    return to_upstream(MessagesRequest(model=request.model, messages=request.messages,
                                       system=request.system, tools=request.tools,
                                       tool_choice=request.tool_choice, thinking=request.thinking,
                                       output_config=request.output_config))


# ---- responses --------------------------------------------------------------------------

class OutUsage(Struct):
    input_tokens: int
    output_tokens: int
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0


def out_usage(usage: wire.Usage) -> OutUsage:
    # Anthropic's input_tokens excludes cache reads; GLM's prompt_tokens includes them
    cached = min(usage.cached_tokens, usage.prompt_tokens)
    return OutUsage(input_tokens=usage.prompt_tokens - cached, output_tokens=usage.completion_tokens,
                    cache_read_input_tokens=cached)


class OutMessage(Struct):
    id: str
    type: str
    role: str
    model: str
    content: list[dict]
    stop_reason: str | None
    stop_sequence: str | None
    usage: OutUsage


class MessageStart(Struct, tag="message_start", tag_field="type"):
    message: OutMessage


class TextStart(Struct, tag="text", tag_field="type"):
    text: str = ""


class ThinkingStart(Struct, tag="thinking", tag_field="type"):
    thinking: str = ""
    signature: str = ""


class ToolUseStart(Struct, tag="tool_use", tag_field="type"):
    id: str
    name: str
    input: dict = msgspec.field(default_factory=dict)


class BlockStart(Struct, tag="content_block_start", tag_field="type"):
    index: int
    content_block: TextStart | ThinkingStart | ToolUseStart


class TextDelta(Struct, tag="text_delta", tag_field="type"):
    text: str


class ThinkingDelta(Struct, tag="thinking_delta", tag_field="type"):
    thinking: str


class SignatureDelta(Struct, tag="signature_delta", tag_field="type"):
    signature: str


class JsonDelta(Struct, tag="input_json_delta", tag_field="type"):
    partial_json: str


class BlockDelta(Struct, tag="content_block_delta", tag_field="type"):
    index: int
    delta: TextDelta | ThinkingDelta | SignatureDelta | JsonDelta


class BlockStop(Struct, tag="content_block_stop", tag_field="type"):
    index: int


class StopDelta(Struct):
    stop_reason: str | None
    stop_sequence: str | None = None


class MessageDelta(Struct, tag="message_delta", tag_field="type"):
    delta: StopDelta
    usage: OutUsage


class MessageStop(Struct, tag="message_stop", tag_field="type"):
    pass


class ErrorDetail(Struct):
    type: str
    message: str


class ErrorEvent(Struct, tag="error", tag_field="type"):
    error: ErrorDetail


_encoder = msgspec.json.Encoder()

STOP_REASONS = {glm.STOP: "end_turn", glm.TOOL_CALLS: "tool_use", glm.LENGTH: "max_tokens",
                glm.CONTENT_FILTER: "refusal", glm.CONTEXT_WINDOW: "model_context_window_exceeded"}


def _event(name: str, payload: Struct) -> bytes:
    return sse.frame(_encoder.encode(payload), event=name)


def signature(text: str) -> str:
    """An opaque signature for a thinking block; GLM does not check them, clients want one."""
    return base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()


class MessagesStream:
    """Clean events in, Anthropic Messages SSE events out."""

    content_type = "text/event-stream"
    keepalive = _event("ping", msgspec.defstruct("Ping", [], tag="ping", tag_field="type")())

    def __init__(self, model: str, request_id: str, prompt_estimate: int) -> None:
        self.model = model
        self.id = "msg_" + request_id
        self.prompt_estimate = prompt_estimate
        self._index = -1
        self._open: str | None = None  # type of the open block
        self._thinking: list[str] = []

    def start(self) -> bytes:
        return _event("message_start", MessageStart(message=OutMessage(
            id=self.id, type="message", role="assistant", model=self.model, content=[],
            stop_reason=None, stop_sequence=None,
            usage=OutUsage(input_tokens=self.prompt_estimate, output_tokens=1))))

    def _open_block(self, kind: str, start: TextStart | ThinkingStart | ToolUseStart) -> bytes:
        out = self._close_block()
        self._index += 1
        self._open = kind
        return out + _event("content_block_start", BlockStart(index=self._index, content_block=start))

    def _close_block(self) -> bytes:
        if self._open is None:
            return b""
        out = b""
        if self._open == "thinking":
            out += _event("content_block_delta", BlockDelta(
                index=self._index, delta=SignatureDelta(signature=signature("".join(self._thinking)))))
            self._thinking = []
        self._open = None
        return out + _event("content_block_stop", BlockStop(index=self._index))

    def feed(self, events: list[glm.Event]) -> bytes:
        out = b""
        for event in events:
            if isinstance(event, glm.Reasoning):
                if self._open != "thinking":
                    out += self._open_block("thinking", ThinkingStart())
                self._thinking.append(event.text)
                out += _event("content_block_delta", BlockDelta(
                    index=self._index, delta=ThinkingDelta(thinking=event.text)))
            elif isinstance(event, glm.Text):
                if self._open != "text":
                    out += self._open_block("text", TextStart())
                out += _event("content_block_delta", BlockDelta(index=self._index, delta=TextDelta(text=event.text)))
            elif isinstance(event, glm.ToolStart):
                out += self._open_block("tool_use", ToolUseStart(id=event.id, name=event.name))
            elif isinstance(event, glm.ToolEnd):
                # the input goes whole, at the call's end (ToolArgs are not relayed): a call's
                # arguments that turn out no JSON object (cut, or not JSON) would fail the
                # client (the anthropic SDK raises on them), and what was sent cannot be taken
                # back; as `completion_body`, the client gets `{}` then. Claude Code behind a
                # custom base URL takes whole inputs anyway (no fine-grained tool streaming,
                # clients.md §5.3) and runs a tool at its block's end; the block's start (the
                # tool's name) still goes out at once, and the journey keeps the client pinged
                # while the arguments come
                out += _event("content_block_delta", BlockDelta(
                    index=self._index, delta=JsonDelta(partial_json=tool_input(event.arguments))))
                out += self._close_block()
        return out

    def finish(self, reason: str, usage: wire.Usage) -> bytes:
        return (self._close_block()
                + _event("message_delta", MessageDelta(
                    delta=StopDelta(stop_reason=STOP_REASONS[reason]), usage=out_usage(usage)))
                + _event("message_stop", MessageStop()))

    def fail(self, error: BridgeError) -> bytes:
        return self._close_block() + _event("error", ErrorEvent(error=ErrorDetail(
            type=_error_type(error), message=error_message(error))))


_input_decoder = msgspec.json.Decoder(dict[str, Raw])  # an object's members left unread


def tool_input(arguments: str) -> str:
    """A tool call's arguments as its `input`: as the model gave them when they are a JSON
    object, else `{}` (Anthropic's input is always an object)."""
    try:
        _input_decoder.decode(arguments)
    except msgspec.DecodeError:  # ValidationError too: JSON, but no object
        return "{}"
    return arguments


def completion_body(answer: glm.Answer, reason: str, model: str, request_id: str,
                    usage: wire.Usage) -> bytes:
    content: list[dict] = []
    if answer.reasoning:
        content.append({"type": "thinking", "thinking": answer.reasoning,
                        "signature": signature(answer.reasoning)})
    if answer.text:
        content.append({"type": "text", "text": answer.text})
    for call in answer.calls:
        content.append({"type": "tool_use", "id": call.id, "name": call.name,
                        "input": Raw(tool_input(call.arguments))})  # the stream's rule (above)
    return _encoder.encode(OutMessage(
        id="msg_" + request_id, type="message", role="assistant", model=model, content=content,
        stop_reason=STOP_REASONS[reason], stop_sequence=None, usage=out_usage(usage)))


# ---- errors -----------------------------------------------------------------------------

# Anthropic's error types; the status is the taxonomy's own (errors.STATUS), except that
# Anthropic says "overloaded" with its documented 529.
_TYPES = {
    Kind.authentication: "authentication_error", Kind.permission: "permission_error",
    # invalid_request_error only for real request faults: Cline reads any of it as overflow
    Kind.invalid_request: "invalid_request_error", Kind.not_found: "not_found_error",
    Kind.context_length: "invalid_request_error", Kind.too_large: "invalid_request_error",
    Kind.quota_exhausted: "rate_limit_error", Kind.concurrency: "rate_limit_error",
    Kind.upstream_rate_limited: "rate_limit_error", Kind.upstream_overloaded: "overloaded_error",
    Kind.upstream_billing: "billing_error", Kind.payment_required: "billing_error",
    Kind.content_policy: "invalid_request_error",
    Kind.upstream_error: "api_error", Kind.upstream_timeout: "timeout_error",
    Kind.unavailable: "api_error",
}


def _error_type(error: BridgeError) -> str:
    return _TYPES[error.kind]


def _status(error: BridgeError) -> int:
    return 529 if error.kind is Kind.upstream_overloaded else error.status


class ErrorBody(Struct, tag="error", tag_field="type"):
    error: ErrorDetail


def error_message(error: BridgeError) -> str:
    """An error's message as Claude Code reads it. It compacts the conversation only on an
    overflow worded as Anthropic's, "prompt is too long" (and reads how far over from
    ": N tokens > M maximum"), so every context-length error starts so, ours with the numbers
    and GLM's own (1261, the prompt passed our estimate but not its count) with its text."""
    if error.kind is not Kind.context_length:
        return error.message
    if error.limit is not None and error.requested is not None:
        return f"prompt is too long: {error.requested} tokens > {error.limit} maximum"
    return f"prompt is too long: {error.message}"


def error_response(error: BridgeError) -> tuple[int, dict[str, str], bytes]:
    kind, status = _TYPES[error.kind], _status(error)
    message = error_message(error)
    headers = error.headers()
    if error.retry_after is not None:
        # Claude Code waits out retry-after; a quota reset hours away is said in the message
        # instead, and x-should-retry tells the SDK not to loop on it
        headers["retry-after"] = str(min(60, max(1, math.ceil(error.retry_after))))
        headers.pop("retry-after-ms", None)
    return status, headers, _encoder.encode(ErrorBody(error=ErrorDetail(type=kind, message=message)))


# The least answer Claude Code works with: its own floor for a lowered cap is 3,000 tokens (with
# 1,000 to spare) and more than a thinking budget (its retry after Anthropic's "input length and
# `max_tokens` exceed context limit"); with less room, "prompt is too long" makes it compact
_RETRY_MARGIN, _FLOOR_OUTPUT = 1000, 3000


def least_answer(request: MessagesRequest) -> int:
    """The least room beside the prompt an answer to this request needs (above)."""
    budget = request.thinking.budget_tokens if request.thinking is not None and \
        request.thinking.type == "enabled" and request.thinking.budget_tokens else 0
    if request.max_tokens is not None:
        budget = min(budget, request.max_tokens - 1)  # Anthropic's own rule: thinking inside the cap
    return _RETRY_MARGIN + max(_FLOOR_OUTPUT, budget + 1)


class MessagesSurface:
    name = SURFACE

    def parse(self, body: bytes) -> Parsed:
        request = parse_request(body)
        choice = request.tool_choice
        return Parsed(to_upstream(request), glm.check_max_tokens(request.max_tokens),
                      least_answer=least_answer(request) if request.max_tokens is not None else None,
                      one_call=choice is not None and choice.disable_parallel_tool_use is True)

    def stream(self, model: str, request_id: str, prompt_estimate: int,
               parsed: Parsed | None = None) -> MessagesStream:
        return MessagesStream(model, request_id, prompt_estimate)

    def complete(self, answer: glm.Answer, reason: str, model: str, request_id: str,
                 usage: wire.Usage) -> bytes:
        return completion_body(answer, reason, model, request_id, usage)

    def error(self, error: BridgeError) -> tuple[int, dict[str, str], bytes]:
        return error_response(error)
