"""OpenAI Chat Completions <-> GLM chat completions, sans I/O.

`parse_request` reads what Kilo Code, Cline, Roo Code, OpenCode and the openai SDK send, and
`to_upstream` adapts it to what GLM-4.6 accepts. `ChatStream` takes GLM chunks and gives the
bytes of an OpenAI stream the tools parse correctly (docs/clients.md §9).
"""
from __future__ import annotations

import time
import msgspec
from msgspec import UNSET, Raw, Struct, UnsetType

from .. import errors, sse, wire
from ..errors import BridgeError, Kind
from . import decode_body

SURFACE = "chat"


# ---- requests ---------------------------------------------------------------------------

class ClientPart(Struct):
    type: str = "text"
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
    role: str
    content: str | list[ClientPart] | None = None
    reasoning_content: str | UnsetType | None = UNSET
    reasoning: str | UnsetType | None = UNSET
    tool_calls: list[wire.ToolCall] | UnsetType | None = UNSET
    tool_call_id: str | UnsetType | None = UNSET
    name: str | UnsetType | None = UNSET


class ClientThinking(Struct):
    type: str = "enabled"


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


def parse_request(body: bytes) -> ClientChatRequest:
    request = decode_body(_request_decoder, body)
    if not request.messages:
        raise BridgeError(Kind.invalid_request, "`messages` must contain at least one message.",
                          param="messages")
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


def _message(message: ClientMessage) -> wire.Message:
    role = "system" if message.role == "developer" else message.role
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


def to_upstream(request: ClientChatRequest, model: str, max_tokens: int) -> wire.ChatRequest:
    upstream = wire.ChatRequest(
        model=model, messages=[_message(m) for m in request.messages],
        stream=bool(request.stream), max_tokens=max_tokens, thinking=_thinking(request))
    tool_choice_none = bytes(request.tool_choice).strip() == b'"none"'
    if request.tools and not tool_choice_none:
        upstream.tools = [
            wire.Tool(type="function", function=wire.FunctionDef(
                name=t.function.name,
                description=t.function.description if isinstance(t.function.description, str) else UNSET,
                parameters=t.function.parameters if wire.present(t.function.parameters) else Raw()))
            for t in request.tools if isinstance(t.function, ClientFunction)]
        # GLM supports only "auto"; a forced choice cannot be honoured upstream
        upstream.tool_choice = "auto"
        if request.stream:
            upstream.tool_stream = True
    if request.temperature is not None:
        upstream.temperature = min(max(request.temperature, 0.0), 1.0)
    if request.top_p is not None:
        upstream.top_p = min(max(request.top_p, 0.01), 1.0)
    if request.stop:
        # GLM takes at most one stop word
        upstream.stop = [request.stop] if isinstance(request.stop, str) else request.stop[:1]
    if wire.present(request.response_format):
        upstream.response_format = request.response_format
    return upstream


def requested_max_tokens(request: ClientChatRequest) -> int | None:
    value = request.max_completion_tokens or request.max_tokens
    return value if value and value > 0 else None


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
    """GLM chunks in, OpenAI chat-completion-chunk SSE bytes out."""

    content_type = "text/event-stream"
    keepalive = sse.KEEPALIVE

    def __init__(self, model: str, request_id: str) -> None:
        self.model = model
        self.id = "chatcmpl-" + request_id
        self.created = int(time.time())
        self._tools: dict[int, bool] = {}  # GLM tool index -> its arguments have begun
        self._sent_role = False
        self._said_anything = False

    def start(self) -> bytes:
        return b""

    def _chunk(self, delta: wire.Delta, finish: str | None) -> bytes:
        return sse.frame(_encoder.encode(OutChunk(
            id=self.id, object="chat.completion.chunk", created=self.created, model=self.model,
            choices=[OutChoice(index=0, delta=delta, finish_reason=finish)])))

    def feed(self, chunk: wire.Chunk) -> bytes:
        out = b""
        for choice in chunk.choices:
            delta = choice.delta
            finish = choice.finish_reason or None
            if isinstance(delta.tool_calls, list) and delta.tool_calls:
                delta.tool_calls = [self._tool_delta(call) for call in delta.tool_calls]
            # GLM repeats role and sends an empty content on its last chunk: drop the noise
            if delta.content == "" and finish is not None:
                delta.content = UNSET
            if self._sent_role:
                delta.role = UNSET
            elif delta.role is UNSET or delta.role is None:
                delta.role = "assistant"
            self._sent_role = True
            if finish is not None:
                out += self._close_tools()
                if self._tools and finish == "stop":
                    finish = "tool_calls"
            if _has_content(delta):
                self._said_anything = True
            if finish is not None or _has_payload(delta):
                out += self._chunk(delta, finish)
        return out

    def _tool_delta(self, call: wire.ToolCallDelta) -> wire.ToolCallDelta:
        function = call.function if isinstance(call.function, wire.FunctionDelta) else wire.FunctionDelta()
        if call.index not in self._tools:
            # the first delta of a call must carry id, type and name (Cline and Roo drop it otherwise)
            self._tools[call.index] = False
            if not (isinstance(call.id, str) and call.id):
                call.id = f"call_{self.id[-12:]}_{call.index}"
            call.type = "function"
            if not isinstance(function.name, str):
                function.name = ""
            if not isinstance(function.arguments, str):
                function.arguments = ""
        else:
            call.id = UNSET
            call.type = UNSET
            function.name = UNSET
        if isinstance(function.arguments, str) and function.arguments:
            self._tools[call.index] = True
        call.function = function
        return call

    def _close_tools(self) -> bytes:
        """A tool call that never got arguments gets "{}": AI-SDK clients never run "" (pitfall 2)."""
        out = b""
        for index, has_arguments in self._tools.items():
            if not has_arguments:
                self._tools[index] = True
                out += self._chunk(wire.Delta(tool_calls=[wire.ToolCallDelta(
                    index=index, function=wire.FunctionDelta(arguments="{}"))]), None)
        return out

    def finish(self, usage: wire.Usage) -> bytes:
        """The usage-only last chunk (`choices: []`), then [DONE].

        An answer with no text, reasoning or tool call is an error to every client (Cline
        fails hard on it): it ends as a retryable error instead, after the usage."""
        if not self._said_anything:
            return sse.frame(_encoder.encode(OutChunk(
                id=self.id, object="chat.completion.chunk", created=self.created, model=self.model,
                choices=[], usage=out_usage(usage)))) + self.fail(BridgeError(
                    Kind.upstream_error, "The model returned an empty answer; please retry.",
                    code="empty_response"))
        return sse.frame(_encoder.encode(OutChunk(
            id=self.id, object="chat.completion.chunk", created=self.created, model=self.model,
            choices=[], usage=out_usage(usage)))) + sse.DONE

    def fail(self, error: BridgeError) -> bytes:
        """A failure after the stream began: an OpenAI error object in the stream (the SDKs raise
        it), and no [DONE], so no client mistakes the cut answer for a whole one."""
        return sse.frame(_encoder.encode(errors.openai_error(error)))


def _has_content(delta: wire.Delta) -> bool:
    return bool(delta.content) or bool(delta.reasoning_content) or bool(delta.tool_calls)


def _has_payload(delta: wire.Delta) -> bool:
    return bool(delta.content) or bool(delta.reasoning_content) or bool(delta.tool_calls) \
        or isinstance(delta.role, str)


def completion_body(completion: wire.Completion, model: str, usage: wire.Usage) -> bytes:
    choices = []
    for choice in completion.choices or [wire.Choice()]:
        message = choice.message
        calls = message.tool_calls if isinstance(message.tool_calls, list) and message.tool_calls else UNSET
        if calls:
            for call in calls:
                call.type = "function"
                if not call.function.arguments:
                    call.function.arguments = "{}"
        finish = choice.finish_reason
        if calls and finish == "stop":
            finish = "tool_calls"
        choices.append(OutCompletionChoice(index=choice.index, finish_reason=finish, message=OutMessage(
            role="assistant", content=message.content,
            reasoning_content=message.reasoning_content if isinstance(message.reasoning_content, str) and message.reasoning_content else UNSET,
            tool_calls=calls)))
    return _encoder.encode(OutCompletion(
        id=completion.id, object="chat.completion", created=completion.created or int(time.time()),
        model=model, choices=choices, usage=out_usage(usage)))


def error_body(error: BridgeError) -> bytes:
    return _encoder.encode(errors.openai_error(error))


class ChatSurface:
    """The Chat Completions surface as the journey sees it."""
    name = SURFACE

    def parse(self, body: bytes) -> tuple[wire.ChatRequest, int | None]:
        request = parse_request(body)
        return to_upstream(request, request.model, 0), requested_max_tokens(request)

    def stream(self, model: str, request_id: str, prompt_estimate: int) -> ChatStream:
        return ChatStream(model, request_id)

    def complete(self, completion: wire.Completion, model: str, usage: wire.Usage) -> bytes:
        return completion_body(completion, model, usage)

    def error(self, error: BridgeError) -> tuple[int, dict[str, str], bytes]:
        return error.status, error.headers(), error_body(error)
