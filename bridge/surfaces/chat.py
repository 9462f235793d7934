"""OpenAI Chat Completions <-> GLM chat completions, sans I/O.

`parse_request` reads what Kilo Code, Cline, Roo Code, OpenCode and the openai SDK send, and
`to_upstream` adapts it to what GLM-4.6 accepts. `ChatStream` takes GLM chunks and gives the
bytes of an OpenAI stream the tools parse correctly (docs/clients.md §9).
"""
from __future__ import annotations

import time
from typing import Literal

import msgspec
from msgspec import UNSET, Raw, Struct, UnsetType

from .. import errors, glm, sse, wire
from ..errors import BridgeError, Kind
from . import LEAST_ANSWER, Parsed, decode_body

SURFACE = "chat"


# ---- requests ---------------------------------------------------------------------------

class ClientPart(Struct):
    # input_audio and file parts are refused: GLM takes text and images
    type: Literal["text", "image_url", "refusal"] = "text"
    text: str | UnsetType = UNSET
    image_url: Raw = Raw()
    # cache_control and anything else on a part is accepted and dropped


class ClientFunction(Struct):
    name: str
    description: str | UnsetType | None = UNSET
    parameters: Raw = Raw()
    strict: bool | UnsetType | None = UNSET


class ClientTool(Struct):
    type: str = "function"
    function: ClientFunction | UnsetType = UNSET


class ClientMessage(Struct):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ClientPart] | None = None
    reasoning_content: str | UnsetType | None = UNSET
    reasoning: str | UnsetType | None = UNSET
    tool_calls: list[wire.ToolCall] | UnsetType | None = UNSET
    tool_call_id: str | UnsetType | None = UNSET
    name: str | UnsetType | None = UNSET


class ClientThinking(Struct):
    type: Literal["enabled", "disabled", "auto", "adaptive"] = "enabled"


class ClientReasoning(Struct):
    enabled: bool | UnsetType | None = UNSET
    effort: str | UnsetType | None = UNSET
    exclude: bool | UnsetType | None = UNSET


class ClientStreamOptions(Struct):
    include_usage: bool | None = None


class ClientChatRequest(Struct):
    model: str
    messages: list[ClientMessage]
    stream: bool | None = False
    stream_options: ClientStreamOptions | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    tools: list[ClientTool] | None = None
    tool_choice: Raw = Raw()  # "auto", "none", "required" or {"type": "function", ...}
    parallel_tool_calls: bool | None = None
    thinking: ClientThinking | None = None
    reasoning: ClientReasoning | None = None
    reasoning_effort: str | None = None
    response_format: Raw = Raw()
    user: str | None = None
    # every other field (seed, n, penalties, prompt_cache_key, chat_template_args...) is ignored


_request_decoder = msgspec.json.Decoder(ClientChatRequest)


_TOOL_CHOICES = {b'"none"', b'"auto"', b'"required"'}


def parse_request(body: bytes) -> ClientChatRequest:
    request = decode_body(_request_decoder, body)
    if not request.messages:
        raise BridgeError(Kind.invalid_request, "`messages` must contain at least one message.",
                          param="messages")
    choice = bytes(request.tool_choice).strip()
    if choice.startswith(b'"') and choice not in _TOOL_CHOICES:
        raise BridgeError(Kind.invalid_request, "`tool_choice` must be none, auto, required or a "
                          "function choice.", param="tool_choice")
    for i, tool in enumerate(request.tools or ()):
        if tool.type == "function" and not isinstance(tool.function, ClientFunction):
            raise BridgeError(Kind.invalid_request, f"`tools[{i}]` is a function tool without its "
                              "`function`.", param=f"tools[{i}].function")
    return request


def _thinking(request: ClientChatRequest) -> wire.Thinking | UnsetType:
    """GLM's `thinking` from whichever reasoning knob the client used; unset keeps GLM's default."""
    if request.thinking is not None:
        return wire.Thinking(type="disabled" if request.thinking.type == "disabled" else "enabled")
    if request.reasoning_effort is not None:
        return wire.Thinking(type="disabled" if request.reasoning_effort in ("none", "minimal") else "enabled")
    reasoning = request.reasoning
    if reasoning is not None:
        if reasoning.enabled is False or reasoning.effort in ("none", "minimal"):
            return wire.Thinking(type="disabled")
        if reasoning.enabled is True or isinstance(reasoning.effort, str):
            return wire.Thinking(type="enabled")
    return UNSET


_ROLES = {"developer": "system", "function": "tool"}


def _message(message: ClientMessage) -> wire.Message:
    role = _ROLES.get(message.role, message.role)
    content: str | list[wire.ContentPart] | None
    if isinstance(message.content, list):
        parts = [wire.ContentPart(type=p.type, text=p.text, image_url=p.image_url)
                 for p in message.content if p.type in ("text", "image_url")]
        # GLM's text models take a plain string; keep parts only when an image is present
        if all(p.type == "text" for p in parts):
            content = "".join(p.text for p in parts if isinstance(p.text, str))
        else:
            content = parts
    else:
        content = message.content
    out = wire.Message(role=role, content=content)
    # GLM wants its reasoning replayed on assistant tool-call turns (clients.md pitfall 5)
    reasoning = message.reasoning_content if isinstance(message.reasoning_content, str) else message.reasoning
    if role == "assistant" and isinstance(reasoning, str) and reasoning:
        out.reasoning_content = reasoning
    if isinstance(message.tool_calls, list) and message.tool_calls:
        out.tool_calls = [wire.ToolCall(id=c.id, type="function", function=wire.FunctionCall(
            name=c.function.name, arguments=c.function.arguments or "{}")) for c in message.tool_calls]
        if out.content == "":
            out.content = None
    if isinstance(message.tool_call_id, str):
        out.tool_call_id = message.tool_call_id
    return out


def to_upstream(request: ClientChatRequest) -> wire.ChatRequest:
    upstream = wire.ChatRequest(
        model=request.model, messages=[_message(m) for m in request.messages],
        stream=bool(request.stream), thinking=_thinking(request))
    tool_choice_none = bytes(request.tool_choice).strip() == b'"none"'
    if request.tools and not tool_choice_none:
        upstream.tools = [
            wire.Tool(type="function", function=wire.FunctionDef(
                name=t.function.name,
                description=t.function.description if isinstance(t.function.description, str) else UNSET,
                parameters=t.function.parameters if wire.present(t.function.parameters) else Raw()))
            for t in request.tools if isinstance(t.function, ClientFunction)]
    if request.temperature is not None:
        upstream.temperature = request.temperature
    if request.top_p is not None:
        upstream.top_p = request.top_p
    if request.stop:
        upstream.stop = [request.stop] if isinstance(request.stop, str) else request.stop
    if wire.present(request.response_format):
        upstream.response_format = request.response_format
    if request.user:
        upstream.user_id = glm.user_id(request.user)
    return upstream


def requested_max_tokens(request: ClientChatRequest) -> int | None:
    """`max_completion_tokens` (newer clients) or `max_tokens`; below 1 is refused."""
    if request.max_completion_tokens is not None:
        return glm.check_max_tokens(request.max_completion_tokens, "max_completion_tokens")
    return glm.check_max_tokens(request.max_tokens)


# ---- responses --------------------------------------------------------------------------

class PromptDetails(Struct):
    cached_tokens: int
    cache_write_tokens: int = 0  # GLM's caching is implicit: nothing is ever written for a fee


class CompletionDetails(Struct):
    reasoning_tokens: int


class OutUsage(Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptDetails
    completion_tokens_details: CompletionDetails
    # Roo Code's OpenAI provider reads cache figures under Anthropic's names (clients.md §2.2)
    cache_read_input_tokens: int = 0
    cache_creation_input_tokens: int = 0


class OutChoice(Struct):
    index: int
    delta: wire.Delta
    finish_reason: str | None


class OutChunk(Struct, omit_defaults=True):
    id: str
    object: str
    created: int
    model: str
    choices: list[OutChoice]
    usage: OutUsage | None = None


class OutMessage(Struct, omit_defaults=True):
    role: str
    content: str | None
    reasoning_content: str | UnsetType = UNSET
    tool_calls: list[wire.ToolCall] | UnsetType = UNSET


class OutCompletionChoice(Struct):
    index: int
    message: OutMessage
    finish_reason: str | None


class OutCompletion(Struct):
    id: str
    object: str
    created: int
    model: str
    choices: list[OutCompletionChoice]
    usage: OutUsage


_encoder = msgspec.json.Encoder()


def out_usage(usage: wire.Usage) -> OutUsage:
    return OutUsage(
        prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
        total_tokens=usage.total_tokens or usage.prompt_tokens + usage.completion_tokens,
        prompt_tokens_details=PromptDetails(cached_tokens=usage.cached_tokens),
        completion_tokens_details=CompletionDetails(reasoning_tokens=usage.reasoning_tokens),
        cache_read_input_tokens=usage.cached_tokens)


class ChatStream:
    """Clean events in, OpenAI chat-completion-chunk SSE bytes out.

    Every chunk of a stream shares its id, created time and model: that part is encoded once,
    and each chunk only encodes its delta."""

    content_type = "text/event-stream"
    keepalive = sse.KEEPALIVE
    __slots__ = ("model", "id", "created", "_sent_role", "_head")

    def __init__(self, model: str, request_id: str) -> None:
        self.model = model
        self.id = "chatcmpl-" + request_id
        self.created = int(time.time())
        self._sent_role = False
        envelope = _encoder.encode(OutChunk(id=self.id, object="chat.completion.chunk",
                                            created=self.created, model=self.model, choices=[]))
        # b'data: {"id":...,"model":...,"choices":[{"index":0,"delta":' + delta + tail
        self._head = b"data: " + envelope[:-len(b"[]}")] + b'[{"index":0,"delta":'

    def start(self) -> bytes:
        return b""

    def _chunk(self, delta: wire.Delta, finish: str | None = None) -> bytes:
        if not self._sent_role:
            delta.role = "assistant"
            self._sent_role = True
        tail = b',"finish_reason":null}]}\n\n' if finish is None else \
            b',"finish_reason":' + _encoder.encode(finish) + b"}]}\n\n"
        return self._head + _encoder.encode(delta) + tail

    def feed(self, events: list[glm.Event]) -> bytes:
        out = b""
        for event in events:
            if isinstance(event, glm.Text):
                out += self._chunk(wire.Delta(content=event.text))
            elif isinstance(event, glm.Reasoning):
                out += self._chunk(wire.Delta(reasoning_content=event.text))
            elif isinstance(event, glm.ToolStart):
                # the first delta of a call carries id, type and name (Cline and Roo drop it otherwise)
                out += self._chunk(wire.Delta(tool_calls=[wire.ToolCallDelta(
                    index=event.index, id=event.id, type="function",
                    function=wire.FunctionDelta(name=event.name, arguments=""))]))
            elif isinstance(event, glm.ToolArgs):
                out += self._chunk(wire.Delta(tool_calls=[wire.ToolCallDelta(
                    index=event.index, function=wire.FunctionDelta(arguments=event.text))]))
        return out

    def finish(self, reason: str, usage: wire.Usage) -> bytes:
        """The finish chunk, the usage-only last chunk (`choices: []`), then [DONE]."""
        return (self._chunk(wire.Delta(), _finish_reason(reason))
                + sse.frame(_encoder.encode(OutChunk(
                    id=self.id, object="chat.completion.chunk", created=self.created, model=self.model,
                    choices=[], usage=out_usage(usage))))
                + sse.DONE)

    def fail(self, error: BridgeError) -> bytes:
        """A failure after the stream began: an OpenAI error object in the stream (the SDKs raise
        it), and no [DONE], so no client mistakes the cut answer for a whole one."""
        return sse.frame(_encoder.encode(errors.openai_error(error)))


def _finish_reason(reason: str) -> str:
    """Chat Completions has no finish reason for a full context window: `length`, as before."""
    return glm.LENGTH if reason == glm.CONTEXT_WINDOW else reason


def completion_body(answer: glm.Answer, reason: str, model: str, request_id: str,
                    usage: wire.Usage) -> bytes:
    calls = [wire.ToolCall(id=c.id, type="function", function=wire.FunctionCall(
        name=c.name, arguments=c.arguments)) for c in answer.calls]
    message = OutMessage(
        role="assistant", content=answer.text if answer.text or not calls else None,
        reasoning_content=answer.reasoning or UNSET, tool_calls=calls or UNSET)
    return _encoder.encode(OutCompletion(
        id="chatcmpl-" + request_id, object="chat.completion", created=int(time.time()),
        model=model, choices=[OutCompletionChoice(index=0, message=message, finish_reason=_finish_reason(reason))],
        usage=out_usage(usage)))


def error_body(error: BridgeError) -> bytes:
    return _encoder.encode(errors.openai_error(error))


class ChatSurface:
    """The Chat Completions surface as the journey sees it."""
    name = SURFACE

    def parse(self, body: bytes) -> Parsed:
        request = parse_request(body)
        asked = requested_max_tokens(request)
        return Parsed(to_upstream(request), asked, least_answer=min(LEAST_ANSWER, asked or LEAST_ANSWER))

    def stream(self, model: str, request_id: str, prompt_estimate: int) -> ChatStream:
        return ChatStream(model, request_id)

    def complete(self, answer: glm.Answer, reason: str, model: str, request_id: str,
                 usage: wire.Usage) -> bytes:
        return completion_body(answer, reason, model, request_id, usage)

    def error(self, error: BridgeError) -> tuple[int, dict[str, str], bytes]:
        return error.status, error.headers(), error_body(error)
