"""Sans-I/O translators, one per client protocol, and what the journey asks of each."""
from __future__ import annotations

from typing import Protocol, TypeVar

import msgspec

from .. import glm, wire
from ..errors import BridgeError, Kind

T = TypeVar("T")


# The least room beside the prompt worth answering in, for a client that does not say (Chat
# Completions, Responses): GLM thinks first, often for thousands of tokens, so an answer lowered
# below this ends `length` with thinking alone, which Cline and Roo resend whole until they give
# up, OpenCode resends turn after turn at 1 token, and Kilo shows as nothing (each round billed
# the whole window; proven with their CLIs). Refused instead as a context overflow, each of them
# compacts or says why. Claude Code's own floor is the same (surfaces/messages.py).
LEAST_ANSWER = 4000


class Parsed(msgspec.Struct):
    """A client request as a GLM request (model as the client named it), and the client's own
    output cap (None: the model's), lowered to the room the model's window leaves beside the
    prompt. `least_answer`: for a client that must be told when that room is too small for any
    answer it can take (Claude Code: an answer cut there ends `max_tokens`, which it continues
    with the whole prompt again and again, never compacting), the least room it can take;
    below it the request is a context-length refusal. None: the cap is only lowered.

    `one_call`: the client asked for one tool call at most (`parallel_tool_calls: false`,
    Anthropic's `disable_parallel_tool_use`), which GLM cannot be told: the journey hands it to
    the normaliser (glm.StreamNormalizer), which keeps the first call alone. `usage_chunk`:
    Chat Completions' usage-only last chunk (`choices: []`), left out when the client said
    `stream_options.include_usage: false` (the usage then rides on the finish chunk); the
    journey hands `Parsed` to the surface's `stream`."""
    request: wire.ChatRequest
    max_tokens: int | None
    least_answer: int | None = None
    one_call: bool = False
    usage_chunk: bool = True


class StreamTranslator(Protocol):
    content_type: str
    keepalive: bytes

    def start(self) -> bytes:
        """What goes out before the first upstream byte (Anthropic's message_start)."""
    def feed(self, events: list[glm.Event]) -> bytes: ...
    def finish(self, reason: str, usage: wire.Usage) -> bytes:
        """A complete answer's end: why it stopped and what it cost."""
    def fail(self, error: BridgeError) -> bytes:
        """A broken answer's end: the protocol's error event, never a clean end."""


class Surface(Protocol):
    name: str

    def parse(self, body: bytes) -> Parsed: ...
    def stream(self, model: str, request_id: str, prompt_estimate: int,
               parsed: Parsed | None = None) -> StreamTranslator:
        """The translator of one streamed answer; `parsed` is what this surface's `parse` gave
        for the request (None: a request that asked nothing of the stream)."""
    def complete(self, answer: glm.Answer, reason: str, model: str, request_id: str,
                 usage: wire.Usage) -> bytes: ...
    def error(self, error: BridgeError) -> tuple[int, dict[str, str], bytes]:
        """Status, headers and body of an error in this protocol's own shape."""


def with_schema(messages: list[wire.Message], schema: msgspec.Raw, name: str | None = None,
                description: str | None = None) -> None:
    """Tell the model the JSON Schema a client asked its answer to match. GLM takes
    `response_format` json_object alone (glm-upstream.md §4), which makes the answer JSON but
    not the JSON asked for: the schema goes in a system message after the client's own leading
    ones (their prefix, which GLM caches, stays as it was)."""
    if not wire.present(schema):
        return
    said = f" ({name}: {description})" if name and description else f" ({name})" if name else ""
    note = wire.Message(role="system", content="Answer with one JSON object matching this JSON Schema"
                        f"{said}: {bytes(schema).decode()}")
    at = 0
    while at < len(messages) and messages[at].role == "system":
        at += 1
    messages.insert(at, note)


def decode_body(decoder: msgspec.json.Decoder, body: bytes) -> T:
    """A request body as the protocol's Struct, or the request fault that says why not."""
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise BridgeError(Kind.invalid_request, f"Invalid request body: {exc}") from None
    except msgspec.DecodeError:
        raise BridgeError(Kind.invalid_request, "The request body is not valid JSON.") from None
    except RecursionError:  # a second line: the journey refuses deep bodies before this
        raise BridgeError(Kind.invalid_request, "The request body nests too deeply.") from None
