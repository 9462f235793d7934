"""OpenAI Responses <-> GLM chat completions, sans I/O.

What Codex (and the openai SDK's `responses` API) sends becomes one GLM chat request:
`instructions` and `developer`/`system` messages become system messages; `input` items become
turns (`function_call`, `custom_tool_call` and `local_shell_call` items the assistant's tool
calls, their `*_output` items tool results); `function`, `custom`, `local_shell` and namespaced
tools become GLM functions. A custom tool takes free text, which GLM functions cannot: it is
offered as a function with one string parameter, `input`, and the model's call is turned back
into a `custom_tool_call` carrying that string. Fields GLM has no use for (`store`, `include`,
`prompt_cache_key`, `text.verbosity`, `service_tier`, `metadata`, hosted tools such as
`web_search`, future fields) are accepted and dropped, never a 400. What names an object stored
at OpenAI (`conversation`, `prompt`, and over HTTP `previous_response_id`) is refused: answered
without it, the model would miss what the client meant it to have. A file (`input_file`, an
image given by file id) leaves a note where it was. A tool's output may hold images (Codex's
`view_image`): a tool message takes none, so they are shown in a user message right after the
turn's tool messages, each captioned with its call. A named `tool_choice` offers that tool
alone, an `allowed_tools` one the tools it lists; a `json_schema` text format is asked as
json_object with the schema in a system message.

`ResponsesStream` turns the normaliser's clean events into the event stream Codex parses
(docs: clients.md §6.5): `response.created` and `response.in_progress` at once, every output
item between `output_item.added` and `output_item.done`, text and reasoning in content parts
with their deltas, and exactly one terminal event: `response.completed` (with usage),
`response.incomplete` (max tokens) or `response.failed` (a filled `error`: a broken answer, or
one GLM ended on the context window or its content filter, which Codex must not retry).
A tool call is reported done only once the whole answer is: Codex runs a call from its
`output_item.done`, so a call cut off by a broken stream or by max tokens must never get one.

Reasoning: GLM's reasoning is streamed as `reasoning_text` and, when the request asked for a
summary, also as the summary (GLM has no separate one). Asked for with
`include: ["reasoning.encrypted_content"]`, the item carries it as `encrypted_content`, marked as
Codeplan's own (not secret: it is the text the client was shown); replayed in a later request it
goes back to GLM as `reasoning_content` on the assistant turn it preceded (GLM wants its
reasoning replayed on tool-call turns). Anyone else's encrypted reasoning is accepted and
dropped.

A `ResponsesSurface` serves one request (the journey calls `parse`, then `stream` or `complete`,
or `error`): the translator needs what the request said (custom tools, summary, the fields
echoed in the `response` object), and the WebSocket transport reads the finished response back
for the next turn's `previous_response_id`.
"""
from __future__ import annotations

import base64
import binascii
import math
import time
from typing import Iterable

import msgspec
from msgspec import UNSET, Raw, Struct, UnsetType

from .. import glm, sse, wire
from ..errors import BridgeError, Kind
from . import LEAST_ANSWER, Parsed, decode_body, with_schema
from .responses_wire import (
    ArgumentsDelta, ArgumentsDone, ContentPartAdded, ContentPartDone, CustomInputDelta,
    CustomInputDone, CustomToolCallItem, ErrorBody, ErrorDetail, ErrorInfo, FunctionCallItem,
    IncompleteDetails, InputTokensDetails, Item, LocalShellArguments, LocalShellCallItem,
    MessageItem, OutputItem, OutputItemAdded, OutputItemDone, OutputText, OutputTextDelta,
    OutputTextDone, OutputTokensDetails, Part, ReasoningConfig, ReasoningEcho, ReasoningItem,
    ReasoningText, ReasoningTextDelta, ReasoningTextDone, ResponseCompleted, ResponseCreated,
    ResponseFailed, ResponseIncomplete, ResponseInProgress, ResponseObject, ResponsesRequest,
    ShellAction, SummaryPartAdded, SummaryPartDone, SummaryText, SummaryTextDelta,
    SummaryTextDone, Tool, Usage)

SURFACE = "responses"


# ---- requests ---------------------------------------------------------------------------

_decoder = msgspec.json.Decoder(ResponsesRequest)
_encoder = msgspec.json.Encoder()


def parse_request(body: bytes) -> ResponsesRequest:
    request = decode_body(_decoder, body)
    glm.check_max_tokens(request.max_output_tokens, "max_output_tokens")
    # stored objects Codeplan does not keep: answered without them, the model would miss the
    # history or the instructions the client meant it to have (as previous_response_id over HTTP)
    if wire.present(request.conversation):
        raise BridgeError(Kind.invalid_request, "Conversation not found: Codeplan stores no conversations "
                          "(`conversation`). Send the whole conversation in `input`.",
                          param="conversation", code="conversation_not_found")
    if wire.present(request.prompt):
        raise BridgeError(Kind.invalid_request, "Prompt not found: Codeplan stores no prompt templates "
                          "(`prompt`). Send the instructions in `instructions` or `input`.",
                          param="prompt", code="prompt_not_found")
    fmt = request.text.format if request.text is not None else None
    if fmt is not None and fmt.type not in ("text", "json_object", "json_schema"):
        raise BridgeError(Kind.invalid_request, f"`text.format.type` {fmt.type!r} is not served: text, "
                          "json_object or json_schema.", param="text.format.type")
    return request


def input_items(request: ResponsesRequest) -> list[Item]:
    if isinstance(request.input, str):
        return [Item(role="user", content=request.input)] if request.input else []
    return list(request.input)


# Our own reasoning, carried through the client as `encrypted_content` (Codex sends that field
# back, not the reasoning text), marked so that nobody else's blob is taken for it.
_REASONING_MARK = "codeplan.r1."


def seal_reasoning(text: str) -> str:
    return _REASONING_MARK + base64.urlsafe_b64encode(text.encode()).decode()


def open_reasoning(sealed: str | None) -> str | None:
    if not sealed or not sealed.startswith(_REASONING_MARK):
        return None  # someone else's (OpenAI's encrypted reasoning): dropped
    try:
        return base64.urlsafe_b64decode(sealed[len(_REASONING_MARK):].encode()).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None


def _text(parts: str | list[Part] | None, sep: str = "\n") -> str:
    if parts is None:
        return ""
    if isinstance(parts, str):
        return parts
    return sep.join(p.text if p.text is not None else p.refusal or "" for p in parts
                    if p.type in ("input_text", "output_text", "text", "refusal", "summary_text",
                                  "reasoning_text") and (p.text or p.refusal))


def _image_url(part: Part) -> str | None:
    if not wire.present(part.image_url):
        return None
    value = msgspec.json.decode(part.image_url)
    if isinstance(value, dict):
        value = value.get("url")
    return value if isinstance(value, str) and value else None


def _unreadable(part: Part) -> str | None:
    """The note standing in for a part GLM cannot read (as the Messages surface leaves one for a
    PDF): a file, or an image given only by its Files API id. Dropped silently, the model would
    answer as if it had read it; refused, the turn would fail every later request of the
    conversation. None for a part that is no file or image."""
    if part.type == "input_file":
        said = part.filename or part.file_id or part.file_url
        return f"[file{f' {said!r}' if said else ''} omitted: this model cannot read it]"
    if part.type == "input_image":
        said = part.file_id
        return f"[image{f' {said!r}' if said else ''} omitted: this model cannot read it]"
    return None


def _image(part: Part) -> wire.ContentPart | None:
    """An input_image the model can be shown, as the part GLM reads an image in; None for any
    other part, or an image given only by its Files API id. A user's images and a tool's go
    through here alike: what one model is shown, the other is."""
    url = _image_url(part) if part.type == "input_image" else None
    return wire.ContentPart(type="image_url", image_url=wire.ImageUrl(url=url)) if url else None


def _user_content(parts: str | list[Part] | None) -> str | list[wire.ContentPart]:
    if not isinstance(parts, list):
        return parts or ""
    out: list[wire.ContentPart] = []
    for part in parts:
        image = _image(part)
        if image is not None:
            out.append(image)
        elif part.type in ("input_image", "input_file"):
            out.append(wire.ContentPart(type="text", text=_unreadable(part)))
        elif part.text:
            out.append(wire.ContentPart(type="text", text=part.text))
    # GLM's text models take a plain string; parts only when an image is present
    if all(p.type == "text" for p in out):
        return "\n".join(p.text for p in out if isinstance(p.text, str))
    return out


_TEXT_PARTS = ("input_text", "output_text", "text", "refusal", "summary_text", "reasoning_text")
# where a tool's image was in its text (a tool message takes no image: it follows the turn's
# tool messages in a user message), so the text reads as the tool wrote it
_IMAGE_MARK = "[image: shown in the message after the tool results]"


def _tool_output(output: str | list[Part] | None, call_id: str, shown: list[wire.ContentPart]) -> str:
    """A tool's output as its tool message's text. GLM reads images in user turns alone: each
    image the output holds is added to `shown`, after a caption naming the call, for the user
    message that follows the turn's tool messages (dropped, the model would answer as if the
    tool had shown nothing). A file, or an image given only by its id, leaves its note."""
    if not isinstance(output, list):
        return output or ""
    texts: list[str] = []
    images: list[wire.ContentPart] = []
    for part in output:
        image = _image(part)
        if image is not None:
            images.append(image)
            texts.append(_IMAGE_MARK)
        elif part.type in ("input_image", "input_file"):
            texts.append(_unreadable(part) or "")
        elif part.type in _TEXT_PARTS and (part.text or part.refusal):
            texts.append(part.text if part.text is not None else part.refusal or "")
    if images:
        said = "The image" if len(images) == 1 else f"The {len(images)} images"
        shown.append(wire.ContentPart(type="text", text=f"{said} output by tool call {call_id}:"))
        shown.extend(images)
    return "\n".join(texts)


def _reasoning_of(item: Item) -> str | None:
    """The reasoning an input reasoning item carries: its own text (the SDK's output items fed
    back), or our sealed copy; a summary alone is not the reasoning and is dropped."""
    if isinstance(item.content, list):
        text = "".join(p.text or "" for p in item.content if p.type == "reasoning_text")
        if text:
            return text
    return open_reasoning(item.encrypted_content)


def _flat(namespace: str | None, name: str) -> str:
    """A namespaced tool's GLM function name (GLM has no namespaces)."""
    return f"{namespace}__{name}" if namespace else name


def _call_of(item: Item) -> wire.ToolCall | None:
    name = item.name or ""
    if item.type == "function_call":
        arguments = item.arguments or "{}"
        name = _flat(item.namespace, name)
    elif item.type == "custom_tool_call":
        arguments = _encoder.encode({"input": item.input or ""}).decode()
    elif item.type == "local_shell_call":
        action = item.action or ShellAction()
        name = LOCAL_SHELL
        arguments = _encoder.encode(LocalShellArguments(
            command=action.command, workdir=action.working_directory,
            timeout_ms=action.timeout_ms)).decode()
    else:
        return None
    return wire.ToolCall(id=item.call_id or item.id or "", type="function",
                         function=wire.FunctionCall(name=name, arguments=arguments))


_CALLS = ("function_call", "custom_tool_call", "local_shell_call")
_OUTPUTS = ("function_call_output", "custom_tool_call_output", "local_shell_call_output")


def to_messages(instructions: str | list[Item] | None, items: Iterable[Item]) -> list[wire.Message]:
    """The conversation as GLM turns. Consecutive calls (and the text before them) form one
    assistant turn; a reasoning item's text rides on the assistant turn that follows it."""
    out: list[wire.Message] = []
    if isinstance(instructions, str) and instructions:
        out.append(wire.Message(role="system", content=instructions))
    elif isinstance(instructions, list):
        items = [*instructions, *items]
    reasoning: str | None = None
    open_turn: wire.Message | None = None  # the assistant turn calls may still join
    # the images of the tool outputs since the last turn: shown in a user message once the
    # turn's tool messages end (a user message between them would break the call's answers)
    shown: list[wire.ContentPart] = []

    def assistant(content: str | None) -> wire.Message:
        nonlocal reasoning
        message = wire.Message(role="assistant", content=content)
        if reasoning:
            message.reasoning_content = reasoning
            reasoning = None
        out.append(message)
        return message

    for item in items:
        kind = item.type
        if shown and (kind == "message" or kind in _CALLS):
            out.append(wire.Message(role="user", content=shown))
            shown = []
        if kind == "message":
            role = item.role or "user"
            if role == "assistant":
                open_turn = assistant(_text(item.content, ""))
                continue
            open_turn = None
            if role in ("system", "developer"):
                out.append(wire.Message(role="system", content=_text(item.content)))
            else:
                out.append(wire.Message(role="user", content=_user_content(item.content)))
        elif kind == "reasoning":
            reasoning = _reasoning_of(item) or reasoning
        elif kind in _CALLS:
            call = _call_of(item)
            assert call is not None
            if open_turn is None or reasoning:
                open_turn = assistant(None)
            if not isinstance(open_turn.tool_calls, list):
                open_turn.tool_calls = []
                if open_turn.content == "":
                    open_turn.content = None
            open_turn.tool_calls.append(call)
        elif kind in _OUTPUTS:
            open_turn = None
            call_id = item.call_id or item.id or ""
            out.append(wire.Message(role="tool", content=_tool_output(item.output, call_id, shown),
                                    tool_call_id=call_id))
        # item_reference, web_search_call, compaction items...: nothing GLM can use
    if shown:
        out.append(wire.Message(role="user", content=shown))
    return out


LOCAL_SHELL = "local_shell"
_CUSTOM_INPUT = "input"


_LOCAL_SHELL_SCHEMA = Raw(msgspec.json.encode({
    "type": "object",
    "properties": {
        "command": {"type": "array", "items": {"type": "string"},
                    "description": "The command and its arguments, e.g. [\"bash\", \"-lc\", \"ls\"]."},
        "workdir": {"type": "string", "description": "The working directory."},
        "timeout_ms": {"type": "integer", "description": "Timeout in milliseconds."}},
    "required": ["command"]}))
_EMPTY_SCHEMA = Raw(b'{"type":"object","properties":{}}')


def _custom_schema(tool: Tool) -> Raw:
    described = "The tool's whole input, as free text."
    fmt = tool.format
    if fmt is not None and fmt.type == "grammar" and fmt.definition:
        described += f" It must match this {fmt.syntax or 'lark'} grammar:\n{fmt.definition}"
    return Raw(msgspec.json.encode({
        "type": "object", "properties": {_CUSTOM_INPUT: {"type": "string", "description": described}},
        "required": [_CUSTOM_INPUT]}))


class ToolKinds(Struct):
    """What each GLM function name stands for on the way back."""
    custom: frozenset[str] = frozenset()
    local_shell: bool = False
    namespaced: dict[str, tuple[str, str]] = msgspec.field(default_factory=dict)


def to_tools(tools: list[Tool] | None) -> tuple[list[wire.Tool], ToolKinds]:
    out: list[wire.Tool] = []
    kinds = ToolKinds()
    custom: set[str] = set()

    def function(name: str, description: str | None, parameters: Raw) -> None:
        out.append(wire.Tool(type="function", function=wire.FunctionDef(
            name=name, description=description or UNSET,
            parameters=parameters if wire.present(parameters) else _EMPTY_SCHEMA)))

    for tool in tools or ():
        if tool.type == "function" and tool.name:
            function(tool.name, tool.description, tool.parameters)
        elif tool.type == "custom" and tool.name:
            custom.add(tool.name)
            function(tool.name, tool.description, _custom_schema(tool))
        elif tool.type == "local_shell":
            kinds.local_shell = True
            function(LOCAL_SHELL, "Run a command on the user's machine.", _LOCAL_SHELL_SCHEMA)
        elif tool.type == "namespace" and tool.name:
            for inner in tool.tools or ():
                if inner.type == "function" and inner.name:
                    flat = _flat(tool.name, inner.name)
                    kinds.namespaced[flat] = (tool.name, inner.name)
                    function(flat, inner.description, inner.parameters)
        # web_search, file_search, image_generation, mcp, computer use...: hosted tools GLM
        # cannot run; dropped
    kinds.custom = frozenset(custom)
    return out, kinds


class AllowedTool(Struct):
    """A tool of an allowed_tools choice: `{"type": "function", "name": ...}`, a custom tool by
    its name, `{"type": "local_shell"}`, a namespace by its name, a hosted tool by its type."""
    type: str
    name: str | None = None
    namespace: str | None = None


class ToolChoice(Struct):
    """A `tool_choice` object: a named function or custom tool, or `allowed_tools` (a `mode` and
    the `tools` the model may call); others (hosted tools, mcp) are read as auto."""
    type: str
    name: str | None = None
    mode: str | None = None
    tools: list[AllowedTool] | None = None


_JSON_OBJECT = wire.ResponseFormat(type="json_object")
_tool_choice_decoder = msgspec.json.Decoder(ToolChoice)
_ALLOWED_MODES = ("auto", "required")


def _tool_choice(raw: bytes) -> ToolChoice:
    try:
        return _tool_choice_decoder.decode(raw)
    except msgspec.ValidationError as exc:
        raise BridgeError(Kind.invalid_request, f"Invalid `tool_choice`: {exc}", param="tool_choice") from None


def _named(tools: list[wire.Tool], kinds: ToolKinds, kind: str, name: str) -> list[wire.Tool]:
    """The function (or custom tool) of this name among the tools; a namespaced function is
    named by its own name or its flattened one."""
    def named(flat: str) -> bool:
        inner = kinds.namespaced.get(flat)
        return flat == name or (inner is not None and inner[1] == name)

    return [t for t in tools if isinstance(t.function, wire.FunctionDef) and named(t.function.name)
            and (t.function.name in kinds.custom) == (kind == "custom")]


def _chosen(tools: list[wire.Tool], kinds: ToolKinds, choice: ToolChoice) -> list[wire.Tool]:
    """A named function or custom tool is the only one offered, an allowed_tools choice's tools
    the only ones: GLM's tool_choice is auto alone (glm.prepare), so the model may still answer
    in text, but calls no other tool."""
    if choice.type == "allowed_tools":
        return _allowed(tools, kinds, choice)
    if choice.type not in ("function", "custom"):
        return tools
    if not choice.name:
        raise BridgeError(Kind.invalid_request, f"A {choice.type} `tool_choice` needs the tool's `name`.",
                          param="tool_choice.name")
    chosen = _named(tools, kinds, choice.type, choice.name)
    if not chosen:
        raise BridgeError(Kind.invalid_request, f"`tool_choice` names the {choice.type} tool {choice.name!r}, "
                          "which is not among the request's `tools`.", param="tool_choice")
    return chosen


def _allowed(tools: list[wire.Tool], kinds: ToolKinds, choice: ToolChoice) -> list[wire.Tool]:
    """The tools of the request an allowed_tools choice lists, in the request's order. Its mode
    is served as the plain choice of that name is (`required`: GLM's choice is auto alone); a
    tool it lists that the request does not define is a 400 naming it. A hosted tool (web_search,
    mcp...) is never offered to GLM (to_tools), so allowing one allows nothing GLM can call."""
    if choice.mode not in _ALLOWED_MODES:
        raise BridgeError(Kind.invalid_request, "An allowed_tools `tool_choice` needs `mode` auto or required, "
                          f"not {choice.mode!r}.", param="tool_choice.mode")
    if not choice.tools:
        raise BridgeError(Kind.invalid_request, "An allowed_tools `tool_choice` must list at least one tool "
                          "in `tools`.", param="tool_choice.tools")
    keep: set[str] = set()
    for i, entry in enumerate(choice.tools):
        if entry.type in ("function", "custom"):
            name = _flat(entry.namespace, entry.name or "")
            found = _named(tools, kinds, entry.type, name) if entry.name else None
            said = f"{entry.type} tool {name!r}"
        elif entry.type == "namespace":
            found = [t for t in tools if isinstance(t.function, wire.FunctionDef)
                     and kinds.namespaced.get(t.function.name, ("",))[0] == entry.name] if entry.name else None
            said = f"namespace {entry.name!r}"
        elif entry.type == "local_shell":
            found = [t for t in tools if kinds.local_shell and isinstance(t.function, wire.FunctionDef)
                     and t.function.name == LOCAL_SHELL]
            said = "local_shell tool"
        else:
            continue  # a hosted tool
        if found is None:
            raise BridgeError(Kind.invalid_request, f"`tool_choice.tools[{i}]` needs the tool's `name`.",
                              param=f"tool_choice.tools[{i}]")
        if not found:
            raise BridgeError(Kind.invalid_request, f"`tool_choice` allows the {said}, which is not among the "
                              "request's `tools`.", param=f"tool_choice.tools[{i}]")
        keep.update(t.function.name for t in found if isinstance(t.function, wire.FunctionDef))
    return [t for t in tools if isinstance(t.function, wire.FunctionDef) and t.function.name in keep]


def _thinking(reasoning: ReasoningConfig | None) -> wire.Thinking | UnsetType:
    if reasoning is None or reasoning.effort is None:
        return UNSET  # GLM's default
    return wire.Thinking(type="disabled" if reasoning.effort in ("none", "minimal") else "enabled")


def wants_summary(reasoning: ReasoningConfig | None) -> bool:
    if reasoning is None:
        return False
    summary = reasoning.summary or reasoning.generate_summary
    return summary is not None and summary != "none"


def to_upstream(request: ResponsesRequest, items: list[Item], *,
                warmup: bool = False) -> tuple[wire.ChatRequest, ToolKinds]:
    messages = to_messages(request.instructions, items)
    # a warm-up (Codex's socket prewarm) holds the instructions alone: nothing is generated
    if not warmup and not any(m.role != "system" for m in messages):
        raise BridgeError(Kind.invalid_request, "`input` must contain at least one message or item.",
                          param="input")
    upstream = wire.ChatRequest(model=request.model, messages=messages, stream=bool(request.stream),
                                thinking=_thinking(request.reasoning))
    tools, kinds = to_tools(request.tools)
    choice = bytes(request.tool_choice).strip()
    if choice.startswith(b"{"):
        tools = _chosen(tools, kinds, _tool_choice(choice))
    if tools and choice != b'"none"':
        upstream.tools = tools  # required (or an allowed_tools mode): GLM has only auto (glm.prepare)
    if request.temperature is not None:
        upstream.temperature = request.temperature
    if request.top_p is not None:
        upstream.top_p = request.top_p
    text = request.text
    fmt = text.format if text is not None else None
    if fmt is not None and fmt.type in ("json_object", "json_schema"):
        upstream.response_format = _JSON_OBJECT  # all GLM offers (glm-upstream.md §4)
        if fmt.type == "json_schema":
            with_schema(upstream.messages, fmt.schema, fmt.name, fmt.description)  # and what it must hold
    user = request.safety_identifier or request.user
    if user:
        upstream.user_id = glm.user_id(user)
    return upstream, kinds


# ---- the response object ----------------------------------------------------------------


def out_usage(usage: wire.Usage) -> Usage:
    # OpenAI's input_tokens include the cached ones, as GLM's prompt_tokens do
    return Usage(input_tokens=usage.prompt_tokens,
                 input_tokens_details=InputTokensDetails(cached_tokens=usage.cached_tokens),
                 output_tokens=usage.completion_tokens,
                 output_tokens_details=OutputTokensDetails(reasoning_tokens=usage.reasoning_tokens),
                 total_tokens=usage.total_tokens or usage.prompt_tokens + usage.completion_tokens)


class Context(Struct):
    """What the translator needs from the request: how to read the model's calls back, what
    to stream, and the fields every `response` object echoes."""
    kinds: ToolKinds
    summary: bool
    sealed_reasoning: bool
    instructions: str | None
    tools: list[Tool]
    tool_choice: Raw
    parallel_tool_calls: bool
    temperature: float | None
    top_p: float | None
    max_output_tokens: int | None
    previous_response_id: str | None
    reasoning: ReasoningEcho
    store: bool
    text: Raw
    metadata: Raw
    prompt_cache_key: str | None


def context_of(request: ResponsesRequest, kinds: ToolKinds) -> Context:
    reasoning = request.reasoning
    return Context(
        kinds=kinds, summary=wants_summary(reasoning),
        sealed_reasoning="reasoning.encrypted_content" in (request.include or ()),
        instructions=request.instructions if isinstance(request.instructions, str) else None,
        tools=request.tools or [],
        tool_choice=request.tool_choice if wire.present(request.tool_choice) else Raw(b'"auto"'),
        parallel_tool_calls=request.parallel_tool_calls is not False,
        temperature=request.temperature, top_p=request.top_p,
        max_output_tokens=request.max_output_tokens,
        previous_response_id=request.previous_response_id,
        reasoning=ReasoningEcho(effort=reasoning.effort if reasoning else None,
                                summary=(reasoning.summary or reasoning.generate_summary) if reasoning else None),
        store=bool(request.store),
        text=Raw(_encoder.encode(request.text)) if request.text is not None else Raw(b'{"format":{"type":"text"}}'),
        metadata=request.metadata if wire.present(request.metadata) else Raw(b"{}"),
        prompt_cache_key=request.prompt_cache_key)


def response_object(context: Context, response_id: str, model: str, status: str,
                    output: list[OutputItem], usage: wire.Usage | None = None,
                    error: ErrorInfo | None = None, incomplete: str | None = None,
                    created_at: int | None = None) -> ResponseObject:
    return ResponseObject(
        id=response_id, created_at=created_at or int(time.time()), status=status, model=model,
        output=output, usage=out_usage(usage) if usage is not None else None, error=error,
        incomplete_details=IncompleteDetails(reason=incomplete) if incomplete else None,
        instructions=context.instructions, tools=context.tools, tool_choice=context.tool_choice,
        parallel_tool_calls=context.parallel_tool_calls, temperature=context.temperature,
        top_p=context.top_p, max_output_tokens=context.max_output_tokens,
        previous_response_id=context.previous_response_id, reasoning=context.reasoning,
        store=context.store, text=context.text,
        metadata=context.metadata, prompt_cache_key=context.prompt_cache_key, service_tier="default")


# How a finished answer's reason reads in a response: its status and incomplete reason.
_ENDINGS = {glm.STOP: ("completed", None), glm.TOOL_CALLS: ("completed", None),
            glm.LENGTH: ("incomplete", "max_output_tokens"),
            glm.CONTEXT_WINDOW: ("failed", None), glm.CONTENT_FILTER: ("failed", None)}
# Finishes that end the response as failed, with the error Codex acts on. Codex reads
# `response.incomplete` as a broken stream ("Incomplete response returned, reason: ...") and
# sends the same turn again, up to stream_max_retries times, each a billed upstream request
# with the same ending (codex-rs codex-api/src/sse/responses.rs, process_responses_event).
# `response.failed` is read by its error code: context_length_exceeded is its context-window
# error, on which it compacts the conversation instead; invalid_prompt is shown and not retried.
_FAILURES = {
    glm.CONTEXT_WINDOW: ErrorInfo(
        "context_length_exceeded",
        "The conversation filled the model's context window before the answer was finished "
        "(finish_reason: model_context_window_exceeded); compact or shorten the conversation."),
    glm.CONTENT_FILTER: ErrorInfo(
        "invalid_prompt",
        "The model provider's content filter stopped the answer (finish_reason: sensitive); "
        "retrying the same request gives the same result, so rephrase it."),
}


def _call_item(kinds: ToolKinds, item_id: str, call_id: str, name: str, arguments: str) -> OutputItem:
    """The model's call as the item the client asked for: a custom tool's free text comes out
    of its one string parameter, a local shell call gets its action back."""
    if name in kinds.custom:
        return CustomToolCallItem(id=item_id, call_id=call_id, name=name, input=custom_input(arguments))
    if kinds.local_shell and name == LOCAL_SHELL:
        return LocalShellCallItem(id=item_id, call_id=call_id, action=shell_action(arguments))
    namespaced = kinds.namespaced.get(name)
    if namespaced is not None:
        return FunctionCallItem(id=item_id, call_id=call_id, name=namespaced[1], arguments=arguments,
                                namespace=namespaced[0])
    return FunctionCallItem(id=item_id, call_id=call_id, name=name, arguments=arguments)


def _call_prefix(kinds: ToolKinds, name: str) -> str:
    if name in kinds.custom:
        return "ctc"
    return "lsh" if kinds.local_shell and name == LOCAL_SHELL else "fc"


def custom_input(arguments: str) -> str:
    try:
        decoded = msgspec.json.decode(arguments)
    except msgspec.DecodeError:
        return arguments  # not JSON at all: the model wrote the input itself
    if isinstance(decoded, dict):
        value = decoded.get(_CUSTOM_INPUT)
        if isinstance(value, str):
            return value
        strings = [v for v in decoded.values() if isinstance(v, str)]
        if len(strings) == 1:
            return strings[0]  # the right text under another name
    if isinstance(decoded, str):
        return decoded
    return arguments


def shell_action(arguments: str) -> ShellAction:
    try:
        args = msgspec.json.decode(arguments, type=LocalShellArguments)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return ShellAction(command=["bash", "-lc", arguments])
    command = args.command if isinstance(args.command, list) else ["bash", "-lc", args.command]
    return ShellAction(command=command, timeout_ms=args.timeout_ms, working_directory=args.workdir,
                       env={})


def output_items(answer: glm.Answer, kinds: ToolKinds, response_id: str, sealed: bool,
                 summary: bool) -> list[OutputItem]:
    """A whole answer's output array (non-streamed bodies)."""
    output: list[OutputItem] = []
    if answer.reasoning:
        output.append(_reasoning_item(f"rs_{response_id}_0", answer.reasoning, summary, sealed))
    if answer.text:
        output.append(MessageItem(id=f"msg_{response_id}_{len(output)}", status="completed",
                                  content=[OutputText(text=answer.text)]))
    for call in answer.calls:
        prefix = _call_prefix(kinds, call.name)
        output.append(_call_item(kinds, f"{prefix}_{response_id}_{len(output)}", call.id, call.name,
                                 call.arguments))
    return output


def _reasoning_item(item_id: str, text: str, summary: bool, sealed: bool) -> ReasoningItem:
    return ReasoningItem(id=item_id, summary=[SummaryText(text=text)] if summary else [],
                         content=[ReasoningText(text=text)],
                         encrypted_content=seal_reasoning(text) if sealed else None)


def as_input(item: OutputItem) -> Item:
    """An output item as the input item a client sends back, for a socket's next turn."""
    if isinstance(item, MessageItem):
        return Item(type="message", role="assistant",
                    content=[Part(type="output_text", text=c.text) for c in item.content])
    if isinstance(item, ReasoningItem):
        return Item(type="reasoning", content=[Part(type="reasoning_text", text=c.text) for c in item.content])
    if isinstance(item, FunctionCallItem):
        return Item(type="function_call", call_id=item.call_id, name=item.name, arguments=item.arguments,
                    namespace=item.namespace if isinstance(item.namespace, str) else None)
    if isinstance(item, CustomToolCallItem):
        return Item(type="custom_tool_call", call_id=item.call_id, name=item.name, input=item.input)
    return Item(type="local_shell_call", call_id=item.call_id, action=item.action)


# ---- events -----------------------------------------------------------------------------

def _event(payload: Struct) -> bytes:
    name = type(payload).__struct_config__.tag
    assert isinstance(name, str)
    return sse.frame(_encoder.encode(payload), event=name)


class _Call:
    __slots__ = ("index", "item_id", "call_id", "name", "parts")

    def __init__(self, index: int, item_id: str, call_id: str, name: str) -> None:
        self.index = index
        self.item_id = item_id
        self.call_id = call_id
        self.name = name
        self.parts: list[str] = []


class ResponsesStream:
    """Clean events in, the Responses event stream out (SSE; the WebSocket transport sends
    each event's data as a text frame)."""

    content_type = "text/event-stream"
    keepalive = sse.KEEPALIVE

    def __init__(self, context: Context, model: str, response_id: str) -> None:
        self.context = context
        self.model = model
        self.id = response_id
        self.created_at = int(time.time())
        self.status = "in_progress"
        self.output: list[OutputItem | None] = []  # by output_index; None while in progress
        self._seq = 0
        self._open: str | None = None  # "reasoning" | "message" | "call"
        self._index = -1  # output index of the open item
        self._parts: list[str] = []  # the open reasoning or message text
        self._calls: dict[int, _Call] = {}  # by the normaliser's call index
        self._finished_calls: list[tuple[_Call, str]] = []  # whole, but reported at the end
        # text and reasoning items whole after a call, held so that items are reported done in
        # output order: Codex adds them to its history in the order of their `output_item.done`
        # and replays that order next turn (its output index, kind, text)
        self._held: list[tuple[int, str, str]] = []

    # -- framing

    def _next(self) -> int:
        self._seq += 1
        return self._seq - 1

    def _response(self, status: str, usage: wire.Usage | None = None, error: ErrorInfo | None = None,
                  incomplete: str | None = None) -> ResponseObject:
        return response_object(self.context, self.id, self.model, status,
                               [item for item in self.output if item is not None], usage, error,
                               incomplete, self.created_at)

    def _add(self) -> int:
        self.output.append(None)  # filled when the item is done
        return len(self.output) - 1

    # -- the journey's calls

    def start(self) -> bytes:
        return (_event(ResponseCreated(response=self._response("in_progress"), sequence_number=self._next()))
                + _event(ResponseInProgress(response=self._response("in_progress"),
                                            sequence_number=self._next())))

    def feed(self, events: list[glm.Event]) -> bytes:
        out = b""
        for event in events:
            if isinstance(event, glm.Reasoning):
                if self._open != "reasoning":
                    out += self._close() + self._open_reasoning()
                self._parts.append(event.text)
                out += self._reasoning_delta(event.text)
            elif isinstance(event, glm.Text):
                if self._open != "message":
                    out += self._close() + self._open_message()
                self._parts.append(event.text)
                out += _event(OutputTextDelta(item_id=self._item_id("msg"), output_index=self._index,
                                              content_index=0, delta=event.text,
                                              sequence_number=self._next()))
            elif isinstance(event, glm.ToolStart):
                out += self._close() + self._open_call(event)
            elif isinstance(event, glm.ToolArgs):
                call = self._calls[event.index]
                call.parts.append(event.text)
                if call.name not in self.context.kinds.custom:
                    out += _event(ArgumentsDelta(item_id=call.item_id, output_index=call.index,
                                                 delta=event.text, sequence_number=self._next()))
            elif isinstance(event, glm.ToolEnd):
                # reported done with the answer: a cut-off answer's calls must never run
                self._finished_calls.append((self._calls[event.index], event.arguments))
                self._open = None
        return out

    def finish(self, reason: str, usage: wire.Usage) -> bytes:
        status, incomplete = _ENDINGS[reason]
        out = self._close()
        # reported done in output order: (index, call or None, kind, text or arguments). An
        # answer cut by max tokens, the context window or the filter keeps what was whole: its
        # text and reasoning, not its calls
        whole: list[tuple[int, _Call | None, str, str]] = [(i, None, kind, text) for i, kind, text in self._held]
        if status == "completed":
            whole += [(call.index, call, "call", arguments) for call, arguments in self._finished_calls]
        for index, call, kind, text in sorted(whole, key=lambda entry: entry[0]):
            out += self._call_done(call, text) if call is not None else self._text_item_done(index, kind, text)
        self.status = status
        terminal = {"completed": ResponseCompleted, "incomplete": ResponseIncomplete,
                    "failed": ResponseFailed}[status]
        return out + _event(terminal(response=self._response(status, usage, error=_FAILURES.get(reason),
                                                             incomplete=incomplete),
                                     sequence_number=self._next()))

    def fail(self, error: BridgeError) -> bytes:
        """A broken answer: `response.failed` with a filled error, and no item in progress (nor
        one held behind a call) reported done (the client retries the turn)."""
        self.status = "failed"
        code, message = failure(error)
        return _event(ResponseFailed(response=self._response("failed", error=ErrorInfo(code, message)),
                                     sequence_number=self._next()))

    # -- items

    def _item_id(self, prefix: str, index: int | None = None) -> str:
        return f"{prefix}_{self.id.removeprefix('resp_')}_{self._index if index is None else index}"

    def _open_reasoning(self) -> bytes:
        self._open, self._parts = "reasoning", []
        self._index = self._add()
        item_id = self._item_id("rs")
        out = _event(OutputItemAdded(output_index=self._index, item=ReasoningItem(
            id=item_id, summary=[], content=[], status="in_progress"), sequence_number=self._next()))
        if self.context.summary:
            out += _event(SummaryPartAdded(item_id=item_id, output_index=self._index, summary_index=0,
                                           part=SummaryText(text=""), sequence_number=self._next()))
        return out + _event(ContentPartAdded(item_id=item_id, output_index=self._index, content_index=0,
                                             part=ReasoningText(text=""), sequence_number=self._next()))

    def _reasoning_delta(self, text: str) -> bytes:
        item_id = self._item_id("rs")
        out = b""
        if self.context.summary:
            out += _event(SummaryTextDelta(item_id=item_id, output_index=self._index, summary_index=0,
                                           delta=text, sequence_number=self._next()))
        return out + _event(ReasoningTextDelta(item_id=item_id, output_index=self._index, content_index=0,
                                               delta=text, sequence_number=self._next()))

    def _open_message(self) -> bytes:
        self._open, self._parts = "message", []
        self._index = self._add()
        item_id = self._item_id("msg")
        return (_event(OutputItemAdded(output_index=self._index, item=MessageItem(
                    id=item_id, status="in_progress", content=[]), sequence_number=self._next()))
                + _event(ContentPartAdded(item_id=item_id, output_index=self._index, content_index=0,
                                          part=OutputText(text=""), sequence_number=self._next())))

    def _open_call(self, start: glm.ToolStart) -> bytes:
        self._open = "call"
        self._index = self._add()
        call = _Call(self._index, self._item_id(_call_prefix(self.context.kinds, start.name)),
                     start.id, start.name)
        self._calls[start.index] = call
        item = _call_item(self.context.kinds, call.item_id, call.call_id, call.name, "")
        if isinstance(item, CustomToolCallItem | LocalShellCallItem | FunctionCallItem):
            item.status = "in_progress"
        if isinstance(item, LocalShellCallItem):
            item.action = ShellAction()
        return _event(OutputItemAdded(output_index=self._index, item=item, sequence_number=self._next()))

    def _close(self) -> bytes:
        """End the open reasoning or message item (calls end with the answer); one after a call
        is held until the call is reported done."""
        kind, self._open = self._open, None
        if kind not in ("reasoning", "message"):
            return b""
        text = "".join(self._parts)
        if any(call.index < self._index for call in self._calls.values()):
            self._held.append((self._index, kind, text))
            return b""
        return self._text_item_done(self._index, kind, text)

    def _text_item_done(self, index: int, kind: str, text: str) -> bytes:
        if kind == "reasoning":
            item = _reasoning_item(self._item_id("rs", index), text, self.context.summary,
                                   self.context.sealed_reasoning)
            out = _event(ReasoningTextDone(item_id=item.id, output_index=index, content_index=0,
                                           text=text, sequence_number=self._next()))
            out += _event(ContentPartDone(item_id=item.id, output_index=index, content_index=0,
                                          part=ReasoningText(text=text), sequence_number=self._next()))
            if self.context.summary:
                out += _event(SummaryTextDone(item_id=item.id, output_index=index, summary_index=0,
                                              text=text, sequence_number=self._next()))
                out += _event(SummaryPartDone(item_id=item.id, output_index=index, summary_index=0,
                                              part=SummaryText(text=text), sequence_number=self._next()))
            return out + self._item_done(index, item)
        item_id = self._item_id("msg", index)
        out = _event(OutputTextDone(item_id=item_id, output_index=index, content_index=0,
                                    text=text, sequence_number=self._next()))
        out += _event(ContentPartDone(item_id=item_id, output_index=index, content_index=0,
                                      part=OutputText(text=text), sequence_number=self._next()))
        return out + self._item_done(index, MessageItem(id=item_id, status="completed",
                                                        content=[OutputText(text=text)]))

    def _item_done(self, index: int, item: OutputItem) -> bytes:
        self.output[index] = item
        return _event(OutputItemDone(output_index=index, item=item, sequence_number=self._next()))

    def _call_done(self, call: _Call, arguments: str) -> bytes:
        item = _call_item(self.context.kinds, call.item_id, call.call_id, call.name, arguments)
        out = b""
        if isinstance(item, CustomToolCallItem):
            # the free text is known only once the arguments are whole
            out += _event(CustomInputDelta(item_id=item.id, call_id=item.call_id, output_index=call.index,
                                           delta=item.input, sequence_number=self._next()))
            out += _event(CustomInputDone(item_id=item.id, call_id=item.call_id, output_index=call.index,
                                          input=item.input, sequence_number=self._next()))
        elif isinstance(item, FunctionCallItem):
            out += _event(ArgumentsDone(item_id=item.id, output_index=call.index, name=item.name,
                                        arguments=arguments, sequence_number=self._next()))
        self.output[call.index] = item
        return out + _event(OutputItemDone(output_index=call.index, item=item, sequence_number=self._next()))

    def finished_output(self) -> list[OutputItem]:
        return [item for item in self.output if item is not None]


# ---- errors -----------------------------------------------------------------------------

def _retry_text(error: BridgeError) -> str:
    seconds = max(1, math.ceil(error.retry_after or 1))
    return f"Please try again in {seconds}s."


def failure(error: BridgeError) -> tuple[str, str]:
    """A failure's code and message as Codex reads them in `response.failed`:
    context_length_exceeded, insufficient_quota (not retried), rate_limit_exceeded with
    "Please try again in Ns" (retried after that), server_error (retried with backoff),
    invalid_prompt (shown, not retried)."""
    kind = error.kind
    if kind is Kind.context_length:
        return "context_length_exceeded", error.message
    if kind in (Kind.upstream_billing, Kind.payment_required):
        return "insufficient_quota", error.message
    if kind is Kind.quota_exhausted and (error.retry_after or 0) > 60:
        return "insufficient_quota", error.message  # hours away: retrying would only wait
    if kind in (Kind.concurrency, Kind.upstream_rate_limited, Kind.quota_exhausted):
        return "rate_limit_exceeded", f"{error.message} {_retry_text(error)}"
    if kind in (Kind.upstream_overloaded, Kind.upstream_error, Kind.upstream_timeout, Kind.unavailable):
        message = error.message
        if error.retry_after is not None:
            message = f"{message} {_retry_text(error)}"
        return "server_error", message
    return "invalid_prompt", error.message


_TYPES = {
    Kind.authentication: "authentication_error", Kind.permission: "permission_error",
    Kind.invalid_request: "invalid_request_error", Kind.not_found: "invalid_request_error",
    Kind.context_length: "invalid_request_error", Kind.too_large: "invalid_request_error",
    # Codex shows `usage_limit_reached` with the reset time and does not retry it
    Kind.quota_exhausted: "usage_limit_reached", Kind.concurrency: "rate_limit_error",
    Kind.upstream_rate_limited: "rate_limit_error", Kind.upstream_overloaded: "server_error",
    Kind.upstream_billing: "insufficient_quota", Kind.payment_required: "insufficient_quota",
    Kind.content_policy: "invalid_request_error",
    Kind.upstream_error: "server_error", Kind.upstream_timeout: "server_error",
    Kind.unavailable: "server_error",
}
_CODES = {
    Kind.authentication: "invalid_api_key", Kind.not_found: "model_not_found",
    Kind.context_length: "context_length_exceeded", Kind.concurrency: "rate_limit_exceeded",
    Kind.upstream_rate_limited: "rate_limit_exceeded", Kind.upstream_billing: "insufficient_quota",
    Kind.payment_required: "insufficient_quota", Kind.content_policy: "content_policy_violation",
    Kind.upstream_overloaded: "server_is_overloaded",
}


def error_detail(error: BridgeError) -> ErrorDetail:
    message = error.message
    detail = ErrorDetail(message=message, type=_TYPES[error.kind], param=error.param,
                         code=_CODES.get(error.kind) or error.code)
    if error.kind in (Kind.concurrency, Kind.upstream_rate_limited) and error.retry_after is not None:
        detail.message = f"{message} {_retry_text(error)}"
    if error.kind is Kind.quota_exhausted and error.retry_after is not None:
        # rounded up: never a second before the window ends (the moment Codex tells its user)
        detail.resets_at = math.ceil(time.time() + error.retry_after)
    return detail


def error_response(error: BridgeError) -> tuple[int, dict[str, str], bytes]:
    return error.status, error.headers(), _encoder.encode(ErrorBody(error=error_detail(error)))


def not_stored(response_id: str) -> BridgeError:
    return BridgeError(Kind.not_found, f"Response '{response_id}' not found: Codeplan does not store "
                       "responses (`store` is accepted and ignored). Send the whole conversation in "
                       "`input`; over the WebSocket transport a socket's own responses can be "
                       "continued with `previous_response_id`.", code="response_not_found")


def previous_not_found(response_id: str, socket: bool) -> BridgeError:
    where = ("This socket does not hold it (a socket keeps only its own latest responses)."
             if socket else "Over HTTP Codeplan stores no responses: send the whole conversation "
             "in `input`, or use the WebSocket transport, which keeps a socket's responses for its "
             "next turn.")
    return BridgeError(Kind.invalid_request, f"Previous response with id '{response_id}' not found. "
                       + where, param="previous_response_id", code="previous_response_not_found")


# ---- the surface -------------------------------------------------------------------------

class History(Struct):
    """A finished response as a later turn continues it: the whole conversation the model saw,
    its answer included."""
    items: list[Item]


class Memory:
    """Where a surface finds the conversation a `previous_response_id` names. Over HTTP there
    is none (responses are not stored); a WebSocket keeps its own (responses_socket.py)."""

    def recall(self, response_id: str) -> History | None:
        return None


class ResponsesSurface:
    """The Responses surface for one request (the translator needs what the request said)."""
    name = SURFACE

    def __init__(self, memory: Memory | None = None, *, socket: bool = False) -> None:
        self.memory = memory or Memory()
        self.socket = socket
        self.request: ResponsesRequest | None = None
        self.items: list[Item] = []  # the whole conversation, for the next turn on a socket
        self.context: Context | None = None
        self.translator: ResponsesStream | None = None
        self.output: list[OutputItem] | None = None  # set once the answer is whole
        self.failure: BridgeError | None = None

    def parse(self, body: bytes, *, warmup: bool = False) -> Parsed:
        request = parse_request(body)
        items = input_items(request)
        if request.previous_response_id:
            history = self.memory.recall(request.previous_response_id)
            if history is None:
                raise previous_not_found(request.previous_response_id, self.socket)
            items = history.items + items
        upstream, kinds = to_upstream(request, items, warmup=warmup)
        if self.socket:
            upstream.stream = True  # a socket only ever streams
        self.request, self.items = request, items
        self.context = context_of(request, kinds)
        asked = request.max_output_tokens
        return Parsed(upstream, asked, least_answer=min(LEAST_ANSWER, asked or LEAST_ANSWER),
                      one_call=request.parallel_tool_calls is False)

    def stream(self, model: str, request_id: str, prompt_estimate: int,
               parsed: Parsed | None = None) -> ResponsesStream:
        assert self.context is not None
        self.translator = ResponsesStream(self.context, model, "resp_" + request_id)
        return self.translator

    def complete(self, answer: glm.Answer, reason: str, model: str, request_id: str,
                 usage: wire.Usage) -> bytes:
        context = self.context
        assert context is not None
        response_id = "resp_" + request_id
        status, incomplete = _ENDINGS[reason]
        output = output_items(answer, context.kinds, request_id, context.sealed_reasoning, context.summary)
        if status != "completed":
            output = [o for o in output if isinstance(o, MessageItem | ReasoningItem)]
        self.output = output
        return _encoder.encode(response_object(context, response_id, model, status, output, usage,
                                               error=_FAILURES.get(reason), incomplete=incomplete))

    def error(self, error: BridgeError) -> tuple[int, dict[str, str], bytes]:
        self.failure = error
        return error_response(error)

    def finished(self) -> tuple[str, list[OutputItem]] | None:
        """The response id and output of a completed streamed answer, once it is; else None."""
        translator = self.translator
        if translator is None or translator.status != "completed":
            return None
        return translator.id, translator.finished_output()
