"""OpenAI Chat Completions <-> GLM chat completions, sans I/O.

`parse_request` reads what Kilo Code, Cline, Roo Code, OpenCode and the openai SDK send, and
`to_upstream` adapts it to what GLM-4.6 accepts: a named `tool_choice` offers that tool alone, an
`allowed_tools` one the tools it lists, a `json_schema` response format is asked as json_object
with the schema told in a system message.
What a client asks of the answer that GLM cannot give (n > 1, log probabilities, audio out) is a
400 naming the field, never an answer without it. `ChatStream` takes GLM chunks and gives the
bytes of an OpenAI stream the tools parse correctly (docs/clients.md §9).
"""
from __future__ import annotations

import time
from typing import Annotated, Literal

import msgspec
from msgspec import UNSET, Raw, Struct, UnsetType

from .. import errors, glm, sse, wire
from ..errors import BridgeError, Kind
from . import LEAST_ANSWER, Parsed, decode_body, with_schema

SURFACE = "chat"


# ---- requests ---------------------------------------------------------------------------

class ClientImageUrl(Struct):
    url: Annotated[str, msgspec.Meta(min_length=1)]
    # `detail` is accepted and dropped: GLM has no such knob


class ClientPart(Struct):
    # input_audio and file parts are refused: GLM takes text and images
    type: Literal["text", "image_url", "refusal"] = "text"
    text: str | UnsetType = UNSET
    image_url: ClientImageUrl | None = None  # required on an image_url part (_content)
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


class ClientNamed(Struct):
    name: str


class ClientNamedTool(Struct):
    """A tool of an allowed_tools list: `{"type": "function", "function": {"name": ...}}`."""
    type: str = "function"
    function: ClientNamed | None = None
    custom: ClientNamed | None = None


class ClientAllowedTools(Struct):
    mode: str | None = None  # auto | required
    tools: list[ClientNamedTool] | None = None


class ClientToolChoice(Struct):
    """`{"type": "function", "function": {"name": ...}}`, or `{"type": "allowed_tools",
    "allowed_tools": {"mode": ..., "tools": [...]}}`; other kinds are read as auto."""
    type: str
    function: ClientNamed | None = None
    custom: ClientNamed | None = None
    allowed_tools: ClientAllowedTools | None = None


class ClientJsonSchema(Struct):
    name: str | None = None
    description: str | None = None
    schema: Raw = Raw()
    strict: bool | None = None


class ClientResponseFormat(Struct):
    type: str  # text | json_object | json_schema
    json_schema: ClientJsonSchema | None = None


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
    tool_choice: str | ClientToolChoice | None = None  # none, auto, required or a named function
    parallel_tool_calls: bool | None = None
    thinking: ClientThinking | None = None
    reasoning: ClientReasoning | None = None
    reasoning_effort: str | None = None
    response_format: ClientResponseFormat | None = None
    user: str | None = None
    # asked of the answer, and GLM has none of it: refused, never answered as if not asked
    n: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    modalities: list[str] | None = None
    audio: Raw = Raw()
    # every other field (seed, penalties, prompt_cache_key, chat_template_args...) is ignored


_request_decoder = msgspec.json.Decoder(ClientChatRequest)


_TOOL_CHOICES = {"none", "auto", "required"}
_RESPONSE_FORMATS = {"text", "json_object", "json_schema"}


def _refuse(message: str, param: str) -> BridgeError:
    return BridgeError(Kind.invalid_request, message, param=param)


def parse_request(body: bytes) -> ClientChatRequest:
    request = decode_body(_request_decoder, body)
    if not request.messages:
        raise _refuse("`messages` must contain at least one message.", "messages")
    # (an image part without its image is refused where the parts are read, in `_content`)
    for i, tool in enumerate(request.tools or ()):
        if tool.type == "function" and not isinstance(tool.function, ClientFunction):
            raise _refuse(f"`tools[{i}]` is a function tool without its `function`.", f"tools[{i}].function")
    choice = request.tool_choice
    if isinstance(choice, str) and choice not in _TOOL_CHOICES:
        raise _refuse("`tool_choice` must be none, auto, required or a function choice.", "tool_choice")
    if isinstance(choice, ClientToolChoice):
        _check_offered(request)
    fmt = request.response_format
    if fmt is not None and fmt.type not in _RESPONSE_FORMATS:
        raise _refuse(f"`response_format.type` {fmt.type!r} is not served: text, json_object or json_schema.",
                      "response_format.type")
    if fmt is not None and fmt.type == "json_schema" and fmt.json_schema is None:
        raise _refuse("`response_format.json_schema` is required with the type json_schema.",
                      "response_format.json_schema")
    _refuse_unserved(request)
    return request


def _refuse_unserved(request: ClientChatRequest) -> None:
    """What a client asks of the answer that GLM cannot give: a 400 naming it, never an answer
    without it (n=1 and logprobs=false ask nothing and are served)."""
    if request.n is not None and request.n != 1:
        raise _refuse("`n` must be 1: this model gives one choice per request.", "n")
    if request.logprobs:
        raise _refuse("`logprobs` is not served: this model returns no log probabilities.", "logprobs")
    if request.top_logprobs:
        raise _refuse("`top_logprobs` is not served: this model returns no log probabilities.", "top_logprobs")
    if request.modalities is not None and any(m != "text" for m in request.modalities):
        raise _refuse("`modalities` may only be [\"text\"]: this model answers in text.", "modalities")
    if wire.present(request.audio):
        raise _refuse("`audio` output is not served: this model answers in text.", "audio")
    if isinstance(request.stop, list) and len(set(request.stop)) > 1:
        # GLM stops at one word at most (glm.prepare): the others would be ignored in silence
        raise _refuse("`stop` may hold one sequence: this model stops at one stop sequence at most.", "stop")


def named_tool(request: ClientChatRequest) -> str | None:
    """The one tool a `tool_choice` object names, if it names one."""
    choice = request.tool_choice
    if not isinstance(choice, ClientToolChoice):
        return None
    if choice.type == "function":
        if choice.function is None:
            raise _refuse("A function `tool_choice` needs `function.name`.", "tool_choice.function")
        return choice.function.name
    if choice.type == "custom":
        # custom tools are not served here (they are not functions): naming one names no tool
        if choice.custom is None:
            raise _refuse("A custom `tool_choice` needs `custom.name`.", "tool_choice.custom")
        return choice.custom.name
    return None


_ALLOWED_MODES = {"auto", "required"}


def allowed_tools(request: ClientChatRequest) -> list[str] | None:
    """The tools an `allowed_tools` choice lets the model call, by name; None for any other
    choice. Its mode is served as the plain choice of that name is (`required`: GLM's choice is
    auto alone, glm.prepare); an empty list or a tool without its name is a request fault."""
    choice = request.tool_choice
    if not isinstance(choice, ClientToolChoice) or choice.type != "allowed_tools":
        return None
    allowed = choice.allowed_tools
    if allowed is None:
        raise _refuse("An allowed_tools `tool_choice` needs `allowed_tools`: its `mode` and `tools`.",
                      "tool_choice.allowed_tools")
    if allowed.mode not in _ALLOWED_MODES:
        raise _refuse(f"`tool_choice.allowed_tools.mode` must be auto or required, not {allowed.mode!r}.",
                      "tool_choice.allowed_tools.mode")
    if not allowed.tools:
        raise _refuse("`tool_choice.allowed_tools.tools` must list at least one tool.",
                      "tool_choice.allowed_tools.tools")
    names: list[str] = []
    for i, tool in enumerate(allowed.tools):
        named = tool.custom if tool.type == "custom" else tool.function
        if named is None:
            raise _refuse(f"`tool_choice.allowed_tools.tools[{i}]` needs its tool's name "
                          f"(`{'custom' if tool.type == 'custom' else 'function'}.name`).",
                          f"tool_choice.allowed_tools.tools[{i}]")
        names.append(named.name)
    return names


def offered(request: ClientChatRequest) -> frozenset[str] | None:
    """The names of the tools a `tool_choice` object limits the model to (a named tool, an
    allowed_tools list); None: every tool of the request."""
    named = named_tool(request)
    if named is not None:
        return frozenset((named,))
    allowed = allowed_tools(request)
    return frozenset(allowed) if allowed is not None else None


def _check_offered(request: ClientChatRequest) -> None:
    """A tool_choice object naming a tool the request does not define is a 400 naming it: the
    client would believe the model had a tool it never had."""
    defined = {t.function.name for t in request.tools or () if isinstance(t.function, ClientFunction)}
    named = named_tool(request)
    if named is not None and named not in defined:
        raise _refuse(f"`tool_choice` names the tool {named!r}, which is not among the request's `tools`.",
                      "tool_choice")
    for i, name in enumerate(allowed_tools(request) or ()):
        if name not in defined:
            raise _refuse(f"`tool_choice.allowed_tools` allows the tool {name!r}, which is not among the "
                          "request's `tools`.", f"tool_choice.allowed_tools.tools[{i}]")


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
# GLM reads images in user turns only; elsewhere the image leaves a note (the model would take a
# tool that returned a screenshot for one that showed nothing)
_IMAGE_NOTE = {"tool": "[image omitted: this model reads no images in tool results]"}
_IMAGE_NOTE_ELSEWHERE = "[image omitted: this model reads images only in user turns]"


def _content(role: str, content: str | list[ClientPart] | None,
             at: int) -> str | list[wire.ContentPart] | None:
    """A turn's content (`messages[at]`) as GLM takes it, each part built by its type (refusal
    parts dropped); an image part without its image is a request fault."""
    if not isinstance(content, list):
        return content
    parts: list[wire.ContentPart] = []
    noted = False
    for j, part in enumerate(content):
        if part.type == "text":
            if isinstance(part.text, str):
                parts.append(wire.ContentPart(type="text", text=part.text))
        elif part.type == "image_url":
            if part.image_url is None:
                raise _refuse(f"`messages[{at}].content[{j}].image_url` is required on an image_url part: "
                              "an object with the image's `url`.", f"messages[{at}].content[{j}].image_url")
            if role == "user":
                parts.append(wire.ContentPart(type="image_url", image_url=wire.ImageUrl(url=part.image_url.url)))
            else:
                noted = True
                parts.append(wire.ContentPart(type="text", text=_IMAGE_NOTE.get(role, _IMAGE_NOTE_ELSEWHERE)))
    if any(p.type == "image_url" for p in parts):
        return parts
    # GLM's text models take a plain string; a note stands apart from the text around it
    return ("\n" if noted else "").join(p.text for p in parts if isinstance(p.text, str))


def _message(message: ClientMessage, at: int) -> wire.Message:
    role = _ROLES.get(message.role, message.role)
    out = wire.Message(role=role, content=_content(role, message.content, at))
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
        model=request.model, messages=[_message(m, i) for i, m in enumerate(request.messages)],
        stream=bool(request.stream), thinking=_thinking(request))
    if request.tools and request.tool_choice != "none":
        # a named tool, or an allowed_tools list, is all that is offered: GLM's tool_choice is
        # auto alone (glm.prepare), so the model may still answer in text, but calls no other tool
        limited = offered(request) if isinstance(request.tool_choice, ClientToolChoice) else None
        upstream.tools = [
            wire.Tool(type="function", function=wire.FunctionDef(
                name=t.function.name,
                description=t.function.description if isinstance(t.function.description, str) else UNSET,
                parameters=t.function.parameters))  # absent: the empty schema (wire.FunctionDef)
            for t in request.tools
            if isinstance(t.function, ClientFunction) and (limited is None or t.function.name in limited)]
    if request.temperature is not None:
        upstream.temperature = request.temperature
    if request.top_p is not None:
        upstream.top_p = request.top_p
    if request.stop:
        upstream.stop = [request.stop] if isinstance(request.stop, str) else request.stop
    fmt = request.response_format
    if fmt is not None:
        # GLM documents text and json_object only (glm-upstream.md §4): a JSON schema is asked
        # as json_object, and the model is told the schema
        upstream.response_format = wire.ResponseFormat(type="text" if fmt.type == "text" else "json_object")
        if fmt.json_schema is not None and fmt.type == "json_schema":
            with_schema(upstream.messages, fmt.json_schema.schema, fmt.json_schema.name,
                        fmt.json_schema.description)
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
    and each chunk only encodes its delta. The usage comes in a last chunk of its own with no
    choice (`usage_chunk`, OpenAI's `include_usage`, sent unasked too: the coding tools all ask
    for it, and the README's loop reads it), or, when the client said `include_usage: false`,
    on the finish chunk as GLM sends it: a client that indexes `choices[0]` of every chunk never
    meets an empty one."""

    content_type = "text/event-stream"
    keepalive = sse.KEEPALIVE
    __slots__ = ("model", "id", "created", "usage_chunk", "_sent_role", "_head")

    def __init__(self, model: str, request_id: str, *, usage_chunk: bool = True) -> None:
        self.model = model
        self.id = "chatcmpl-" + request_id
        self.created = int(time.time())
        self.usage_chunk = usage_chunk
        self._sent_role = False
        envelope = _encoder.encode(OutChunk(id=self.id, object="chat.completion.chunk",
                                            created=self.created, model=self.model, choices=[]))
        # b'data: {"id":...,"model":...,"choices":[{"index":0,"delta":' + delta + tail
        self._head = b"data: " + envelope[:-len(b"[]}")] + b'[{"index":0,"delta":'

    def start(self) -> bytes:
        return b""

    def _chunk(self, delta: wire.Delta, finish: str | None = None, usage: OutUsage | None = None) -> bytes:
        if not self._sent_role:
            delta.role = "assistant"
            self._sent_role = True
        if finish is None:
            tail = b',"finish_reason":null}]}\n\n'
        elif usage is None:
            tail = b',"finish_reason":' + _encoder.encode(finish) + b"}]}\n\n"
        else:  # the usage on the finish chunk, as GLM sends it (ChatStream)
            tail = (b',"finish_reason":' + _encoder.encode(finish) + b'}],"usage":' + _encoder.encode(usage)
                    + b"}\n\n")
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
        """The finish chunk, the usage-only last chunk (`choices: []`), then [DONE]; without
        `usage_chunk`, the finish chunk carrying the usage, then [DONE]."""
        if not self.usage_chunk:
            return self._chunk(wire.Delta(), _finish_reason(reason), out_usage(usage)) + sse.DONE
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
        options = request.stream_options
        return Parsed(to_upstream(request), asked, least_answer=min(LEAST_ANSWER, asked or LEAST_ANSWER),
                      one_call=request.parallel_tool_calls is False,
                      usage_chunk=options is None or options.include_usage is not False)

    def stream(self, model: str, request_id: str, prompt_estimate: int,
               parsed: Parsed | None = None) -> ChatStream:
        return ChatStream(model, request_id, usage_chunk=parsed is None or parsed.usage_chunk)

    def complete(self, answer: glm.Answer, reason: str, model: str, request_id: str,
                 usage: wire.Usage) -> bytes:
        return completion_body(answer, reason, model, request_id, usage)

    def error(self, error: BridgeError) -> tuple[int, dict[str, str], bytes]:
        return error.status, error.headers(), error_body(error)
