"""GLM-4.6 chat-completions wire shapes (docs/glm-upstream.md §4-5), as msgspec Structs.

Decoding is tolerant: unknown fields are ignored, so a new upstream field never breaks us.
Encoding: a struct uses omit_defaults only where no default carries meaning (UNSET fields are
always left out); `type: "function"`, `index: 0` or `thinking.type` must reach the wire.
A tool's schema is passed through untouched as a `msgspec.Raw`. An empty Raw is no JSON value:
msgspec writes `"key":` and nothing after it unless the Raw is the very default object of its
field (omit_defaults leaves out that one object, not another empty Raw), and the upstream
refuses the whole request. So no field of a request sent upstream is an optional Raw: an image
part and a response format are Structs of their own, and a function's schema, when none is
given, is the empty object schema (`FunctionDef.__post_init__`).
"""
from __future__ import annotations

from typing import Any

import msgspec
from msgspec import Raw, Struct, UNSET, UnsetType


# a function that takes no arguments (OpenAI lets `parameters` be left out; GLM wants a schema)
EMPTY_SCHEMA = Raw(b'{"type":"object","properties":{}}')


class FunctionDef(Struct, omit_defaults=True):
    name: str
    description: str | UnsetType = UNSET
    parameters: Raw = Raw()  # passed through untouched; absent or null: EMPTY_SCHEMA

    def __post_init__(self) -> None:
        # an empty Raw would be written as no value at all (`"parameters":`), and `null` is no
        # schema; EMPTY_SCHEMA is not the field's default object, so it is always written
        if not present(self.parameters):
            self.parameters = EMPTY_SCHEMA


class Tool(Struct, omit_defaults=True):
    type: str
    function: FunctionDef | UnsetType = UNSET


class FunctionCall(Struct):
    name: str = ""
    arguments: str = ""


class ToolCall(Struct):
    id: str = ""
    type: str = "function"
    function: FunctionCall = msgspec.field(default_factory=FunctionCall)


class ImageUrl(Struct):
    url: str  # an https URL or a data: URL


class ContentPart(Struct, omit_defaults=True):
    """A part of a user turn: `text` with its text, or `image_url` with its image."""
    type: str
    text: str | UnsetType = UNSET
    image_url: ImageUrl | UnsetType = UNSET


class Message(Struct, omit_defaults=True):
    role: str
    # no default, so always on the wire: `null` on an assistant turn that only called tools
    content: str | list[ContentPart] | None
    reasoning_content: str | UnsetType | None = UNSET
    tool_calls: list[ToolCall] | UnsetType | None = UNSET
    tool_call_id: str | UnsetType | None = UNSET
    name: str | UnsetType | None = UNSET

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        if not self.content:
            return ""
        return "".join(p.text for p in self.content if isinstance(p.text, str))

    def images(self) -> int:
        if isinstance(self.content, list):
            return sum(1 for p in self.content if p.type == "image_url")
        return 0


class Thinking(Struct):
    type: str = "enabled"


class ResponseFormat(Struct):
    type: str  # "text" or "json_object": all GLM documents (glm-upstream.md §4)


class StreamOptions(Struct):
    include_usage: bool = True


class ChatRequest(Struct, omit_defaults=True):
    model: str
    messages: list[Message]
    stream: bool = False
    # OpenAI-style servers (vLLM, SGLang, most hosts) report usage in a stream only when asked
    stream_options: StreamOptions | UnsetType = UNSET
    thinking: Thinking | UnsetType = UNSET
    tools: list[Tool] | UnsetType = UNSET
    tool_choice: str | UnsetType = UNSET
    tool_stream: bool | UnsetType = UNSET
    max_tokens: int | UnsetType = UNSET
    temperature: float | UnsetType = UNSET
    top_p: float | UnsetType = UNSET
    do_sample: bool | UnsetType = UNSET
    stop: list[str] | UnsetType = UNSET
    response_format: ResponseFormat | UnsetType = UNSET
    request_id: str | UnsetType = UNSET
    user_id: str | UnsetType = UNSET


class PromptTokensDetails(Struct):
    cached_tokens: int = 0


class CompletionTokensDetails(Struct):
    reasoning_tokens: int = 0


class Usage(Struct):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | UnsetType | None = UNSET
    completion_tokens_details: CompletionTokensDetails | UnsetType | None = UNSET

    @property
    def cached_tokens(self) -> int:
        details = self.prompt_tokens_details
        return details.cached_tokens if isinstance(details, PromptTokensDetails) else 0

    @property
    def reasoning_tokens(self) -> int:
        details = self.completion_tokens_details
        return details.reasoning_tokens if isinstance(details, CompletionTokensDetails) else 0


class FunctionDelta(Struct, omit_defaults=True):
    name: str | UnsetType | None = UNSET
    arguments: str | UnsetType | None = UNSET


class ToolCallDelta(Struct):
    # not omit_defaults: `index` 0 must be on the wire (clients key calls by it); UNSET
    # fields are left out all the same
    index: int = 0
    id: str | UnsetType | None = UNSET
    type: str | UnsetType | None = UNSET
    function: FunctionDelta | UnsetType | None = UNSET


class Delta(Struct, omit_defaults=True):
    role: str | UnsetType | None = UNSET
    content: str | UnsetType | None = UNSET
    reasoning_content: str | UnsetType | None = UNSET
    tool_calls: list[ToolCallDelta] | UnsetType | None = UNSET
    # vLLM's name for `reasoning_content` since Nov 2025 (the old one removed Jan 2026): the same
    # thing. Read where `reasoning_content` is read, when that one is absent or empty (a vLLM of
    # the transition sends both, the same text); never written (UNSET, left out)
    reasoning: str | UnsetType | None = UNSET


class ChunkChoice(Struct):
    index: int = 0
    delta: Delta = msgspec.field(default_factory=Delta)
    # GLM sends finish_reason on the last chunk only; UNSET keeps it off the others
    finish_reason: str | UnsetType | None = UNSET


class ChunkError(Struct):
    """A failure reported inside a stream, as OpenAI-style servers do (vLLM, SGLang, LiteLLM:
    `data: {"error": {...}}`, then `[DONE]`). GLM itself never sends one (glm-upstream.md §5.2);
    every field is optional and `code` is a number (vLLM's HTTP status) or a string (OpenAI's)."""
    message: str | None = None
    type: str | None = None
    code: str | int | None = None


class Chunk(Struct, omit_defaults=True):
    """One `data:` line of a GLM stream."""
    id: str = ""
    created: int = 0
    model: str = ""
    choices: list[ChunkChoice] = msgspec.field(default_factory=list)
    usage: Usage | UnsetType | None = UNSET
    # an upstream's mid-stream failure: an object, or a bare string from looser hosts
    error: ChunkError | str | UnsetType | None = UNSET


class ResponseMessage(Struct):
    role: str = "assistant"
    content: str | None = None
    reasoning_content: str | UnsetType | None = UNSET
    tool_calls: list[ToolCall] | UnsetType | None = UNSET
    # vLLM's newer name for `reasoning_content` (see Delta): merged into it once decoded, so
    # every reader of a whole answer sees one field (one message per answer: the cost is nil)
    reasoning: str | UnsetType | None = UNSET

    def __post_init__(self) -> None:
        if isinstance(self.reasoning, str) and self.reasoning and not (
                isinstance(self.reasoning_content, str) and self.reasoning_content):
            self.reasoning_content = self.reasoning


class Choice(Struct):
    index: int = 0
    message: ResponseMessage = msgspec.field(default_factory=ResponseMessage)
    finish_reason: str | None = None


class Completion(Struct, omit_defaults=True):
    """A non-streamed GLM response."""
    id: str = ""
    created: int = 0
    model: str = ""
    choices: list[Choice] = msgspec.field(default_factory=list)
    usage: Usage | UnsetType | None = UNSET
    request_id: str | UnsetType = UNSET


class ErrorDetail(Struct):
    # a string for Z.ai and OpenAI ("1302", "context_length_exceeded"), null at times for
    # OpenAI, a number (the HTTP status) for vLLM, SGLang and the servers shaped like them
    code: str | int | None = None
    message: str | None = None


class ErrorBody(Struct, omit_defaults=True):
    """An upstream's error body. Z.ai's: `{"error": {"code": "1302", "message": "..."}}`;
    vLLM's and SGLang's, older and newer: `{"object": "error", "message": "...", "code": 400}`
    and `{"error": {"message": "...", "code": 400}}`; a bare string from looser hosts."""
    error: ErrorDetail | str | None = None
    message: str | None = None
    code: str | int | None = None


def stream_failure(chunk: Chunk) -> ChunkError | None:
    """The failure a chunk reports, if any (`"error": null` or `""` is none)."""
    error = chunk.error
    if isinstance(error, ChunkError):
        return error
    if isinstance(error, str) and error:
        return ChunkError(message=error)
    return None


def present(raw: Raw) -> bool:
    """Whether a pass-through field was given (msgspec.Raw cannot sit in a union)."""
    return bool(raw) and bytes(raw).strip() != b"null"


def schema_of(raw: Raw) -> dict[str, Any]:
    """A tool's JSON schema, decoded only where something must look inside it."""
    if present(raw):
        decoded = msgspec.json.decode(raw)
        if isinstance(decoded, dict):
            return decoded
    return {}


chunk_decoder = msgspec.json.Decoder(Chunk)
completion_decoder = msgspec.json.Decoder(Completion)
request_decoder = msgspec.json.Decoder(ChatRequest)
error_decoder = msgspec.json.Decoder(ErrorBody)
encoder = msgspec.json.Encoder()
