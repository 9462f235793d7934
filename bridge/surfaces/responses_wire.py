"""The OpenAI Responses API's wire shapes, as msgspec Structs: what clients send (requests,
input items, tools) and what they get back (the response object, its output items, the
streamed events, errors). The shapes follow the openai SDK's `types.responses` models and what
Codex parses (codex-rs `ResponseItem`, `sse/responses.rs`); the logic is in responses.py.

Decoding is tolerant: unknown fields are ignored and every input item decodes into one flat
`Item`, so a new item type or field never turns a request into a 400.
"""
from __future__ import annotations

import msgspec
from msgspec import UNSET, Raw, Struct, UnsetType


# ---- requests ---------------------------------------------------------------------------

class Part(Struct, omit_defaults=True):
    """A content part of a message or of a tool's output: input_text, output_text,
    input_image, input_file, reasoning_text, summary_text, refusal; anything else is skipped."""
    type: str = "input_text"
    text: str | None = None
    refusal: str | None = None
    image_url: Raw = Raw()  # a URL string (Responses) or {"url": ...} (tolerated)
    # input_image or input_file by the Files API's id; input_file's name or URL (its data, when
    # given inline, is not decoded: GLM cannot read the file, and the part leaves a note)
    file_id: str | None = None
    filename: str | None = None
    file_url: str | None = None


class ShellAction(Struct):
    type: str = "exec"
    command: list[str] = msgspec.field(default_factory=list)
    timeout_ms: int | None = None
    working_directory: str | None = None
    env: dict[str, str] | None = None
    user: str | None = None


class Item(Struct, omit_defaults=True):
    """Every input item in one flat shape: a `message` may come without `type`, and items
    of types we do not serve (item_reference, web_search_call...) must decode all the same."""
    type: str = "message"
    id: str | None = None
    role: str | None = None
    content: str | list[Part] | None = None
    status: str | None = None
    # function_call, custom_tool_call, local_shell_call
    call_id: str | None = None
    name: str | None = None
    namespace: str | None = None
    arguments: str | None = None
    input: str | None = None
    action: ShellAction | None = None
    # function_call_output, custom_tool_call_output, local_shell_call_output
    output: str | list[Part] | None = None
    # reasoning
    summary: list[Part] | None = None
    encrypted_content: str | None = None


class ToolFormat(Struct, omit_defaults=True):
    type: str = "text"  # text | grammar
    syntax: str | None = None  # lark | regex
    definition: str | None = None


class Tool(Struct, omit_defaults=True):
    type: str
    name: str | None = None
    description: str | None = None
    parameters: Raw = Raw()
    strict: bool | None = None
    format: ToolFormat | None = None  # custom tools
    tools: list["Tool"] | None = None  # namespace tools


class ReasoningConfig(Struct, omit_defaults=True):
    effort: str | None = None
    summary: str | None = None
    generate_summary: str | None = None  # the older name of `summary`


class TextFormat(Struct, omit_defaults=True):
    type: str = "text"  # text | json_object | json_schema
    # json_schema: the schema the answer must match (echoed in the response object as sent)
    name: str | None = None
    description: str | None = None
    schema: Raw = Raw()
    strict: bool | None = None


class TextConfig(Struct, omit_defaults=True):
    format: TextFormat | None = None
    verbosity: str | None = None


class ResponsesRequest(Struct, omit_defaults=True):
    model: str
    input: str | list[Item] = ""
    instructions: str | list[Item] | None = None
    stream: bool | None = False
    previous_response_id: str | None = None
    # stored server-side objects (a Conversations API conversation, a prompt template), which
    # Codeplan does not keep: refused when named (responses.parse_request), never ignored
    conversation: Raw = Raw()
    prompt: Raw = Raw()
    tools: list[Tool] | None = None
    tool_choice: Raw = Raw()  # "auto" | "none" | "required" | {"type": ...}
    parallel_tool_calls: bool | None = None
    reasoning: ReasoningConfig | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    text: TextConfig | None = None
    store: bool | None = None
    include: list[str] | None = None
    metadata: Raw = Raw()
    prompt_cache_key: str | None = None
    service_tier: str | None = None
    user: str | None = None
    safety_identifier: str | None = None
    # Codex's WebSocket warm-up: `generate: false` sets up the conversation without a model call
    generate: bool | None = None
    # client_metadata, truncation, background, stream_options and every future field are
    # ignored


class LocalShellArguments(Struct, omit_defaults=True):
    command: list[str] | str = msgspec.field(default_factory=list)
    workdir: str | None = None
    timeout_ms: int | None = None


# ---- the response object ----------------------------------------------------------------

class OutputText(Struct, tag="output_text", tag_field="type"):
    text: str
    annotations: list[Raw] = msgspec.field(default_factory=list)
    logprobs: list[Raw] = msgspec.field(default_factory=list)


class SummaryText(Struct, tag="summary_text", tag_field="type"):
    text: str


class ReasoningText(Struct, tag="reasoning_text", tag_field="type"):
    text: str


class MessageItem(Struct, tag="message", tag_field="type"):
    id: str
    status: str
    content: list[OutputText]
    role: str = "assistant"


class ReasoningItem(Struct, tag="reasoning", tag_field="type"):
    id: str
    summary: list[SummaryText]
    content: list[ReasoningText]
    encrypted_content: str | None = None
    status: str = "completed"


class FunctionCallItem(Struct, tag="function_call", tag_field="type"):
    id: str
    call_id: str
    name: str
    arguments: str
    status: str = "completed"
    namespace: str | UnsetType = UNSET  # left out unless the tool was namespaced


class CustomToolCallItem(Struct, tag="custom_tool_call", tag_field="type"):
    id: str
    call_id: str
    name: str
    input: str
    status: str = "completed"


class LocalShellCallItem(Struct, tag="local_shell_call", tag_field="type"):
    id: str
    call_id: str
    action: ShellAction
    status: str = "completed"


OutputItem = MessageItem | ReasoningItem | FunctionCallItem | CustomToolCallItem | LocalShellCallItem


class InputTokensDetails(Struct):
    cached_tokens: int
    cache_write_tokens: int = 0  # GLM's caching is implicit: nothing is written for a fee


class OutputTokensDetails(Struct):
    reasoning_tokens: int


class Usage(Struct):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int


class ErrorInfo(Struct):
    code: str
    message: str


class IncompleteDetails(Struct):
    reason: str  # max_output_tokens (a content filter stop is a failure: see responses._FAILURES)


class ReasoningEcho(Struct):
    effort: str | None = None
    summary: str | None = None


class ResponseObject(Struct):
    id: str
    created_at: int
    status: str  # in_progress | completed | incomplete | failed
    model: str
    output: list[OutputItem]
    usage: Usage | None
    error: ErrorInfo | None
    incomplete_details: IncompleteDetails | None
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
    service_tier: str
    truncation: str = "disabled"
    object: str = "response"


# ---- events (each one SSE event, or one WebSocket text frame) ----------------------------

class ResponseCreated(Struct, tag="response.created", tag_field="type"):
    response: ResponseObject
    sequence_number: int


class ResponseInProgress(Struct, tag="response.in_progress", tag_field="type"):
    response: ResponseObject
    sequence_number: int


class ResponseCompleted(Struct, tag="response.completed", tag_field="type"):
    response: ResponseObject
    sequence_number: int


class ResponseIncomplete(Struct, tag="response.incomplete", tag_field="type"):
    response: ResponseObject
    sequence_number: int


class ResponseFailed(Struct, tag="response.failed", tag_field="type"):
    response: ResponseObject
    sequence_number: int


class OutputItemAdded(Struct, tag="response.output_item.added", tag_field="type"):
    output_index: int
    item: OutputItem
    sequence_number: int


class OutputItemDone(Struct, tag="response.output_item.done", tag_field="type"):
    output_index: int
    item: OutputItem
    sequence_number: int


class ContentPartAdded(Struct, tag="response.content_part.added", tag_field="type"):
    item_id: str
    output_index: int
    content_index: int
    part: OutputText | ReasoningText
    sequence_number: int


class ContentPartDone(Struct, tag="response.content_part.done", tag_field="type"):
    item_id: str
    output_index: int
    content_index: int
    part: OutputText | ReasoningText
    sequence_number: int


class OutputTextDelta(Struct, tag="response.output_text.delta", tag_field="type"):
    item_id: str
    output_index: int
    content_index: int
    delta: str
    sequence_number: int
    logprobs: list[Raw] = msgspec.field(default_factory=list)


class OutputTextDone(Struct, tag="response.output_text.done", tag_field="type"):
    item_id: str
    output_index: int
    content_index: int
    text: str
    sequence_number: int
    logprobs: list[Raw] = msgspec.field(default_factory=list)


class SummaryPartAdded(Struct, tag="response.reasoning_summary_part.added", tag_field="type"):
    item_id: str
    output_index: int
    summary_index: int
    part: SummaryText
    sequence_number: int


class SummaryPartDone(Struct, tag="response.reasoning_summary_part.done", tag_field="type"):
    item_id: str
    output_index: int
    summary_index: int
    part: SummaryText
    sequence_number: int


class SummaryTextDelta(Struct, tag="response.reasoning_summary_text.delta", tag_field="type"):
    item_id: str
    output_index: int
    summary_index: int
    delta: str
    sequence_number: int


class SummaryTextDone(Struct, tag="response.reasoning_summary_text.done", tag_field="type"):
    item_id: str
    output_index: int
    summary_index: int
    text: str
    sequence_number: int


class ReasoningTextDelta(Struct, tag="response.reasoning_text.delta", tag_field="type"):
    item_id: str
    output_index: int
    content_index: int
    delta: str
    sequence_number: int


class ReasoningTextDone(Struct, tag="response.reasoning_text.done", tag_field="type"):
    item_id: str
    output_index: int
    content_index: int
    text: str
    sequence_number: int


class ArgumentsDelta(Struct, tag="response.function_call_arguments.delta", tag_field="type"):
    item_id: str
    output_index: int
    delta: str
    sequence_number: int


class ArgumentsDone(Struct, tag="response.function_call_arguments.done", tag_field="type"):
    item_id: str
    output_index: int
    name: str
    arguments: str
    sequence_number: int


class CustomInputDelta(Struct, tag="response.custom_tool_call_input.delta", tag_field="type"):
    item_id: str
    call_id: str  # Codex keys the input stream by item_id or call_id
    output_index: int
    delta: str
    sequence_number: int


class CustomInputDone(Struct, tag="response.custom_tool_call_input.done", tag_field="type"):
    item_id: str
    call_id: str
    output_index: int
    input: str
    sequence_number: int


# ---- errors -----------------------------------------------------------------------------

class ErrorDetail(Struct, omit_defaults=True):
    message: str
    type: str
    param: str | None
    code: str | None
    resets_at: int | UnsetType = UNSET  # usage_limit_reached: when the window resets (Unix time)


class ErrorBody(Struct):
    error: ErrorDetail
