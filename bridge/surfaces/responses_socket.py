"""The Responses API over a WebSocket, as Codex speaks it (`supports_websockets = true`), sans I/O.

Codex opens `GET {base_url}/responses` as a WebSocket with `OpenAI-Beta:
responses_websockets=2026-02-06` and its key as a Bearer token. Each turn is a text frame
`{"type": "response.create", ...the Responses request...}`; the answer comes back as the very
events of the HTTP stream, one JSON text frame each, ending in one terminal event. Several turns
share a socket: a turn may name the socket's last response in `previous_response_id` and send
only the items that came after it, so the socket keeps its latest responses' conversations
(a few, in memory, gone with the socket). Codex may warm a socket up with `generate: false`: the
conversation is set up and a response id handed back, no model is called.

A refusal before the first turn is an HTTP answer to the upgrade: 401 for a bad key, 402 for an
account with no subscription, 403 for a suspended one, 426 for a client this transport cannot
serve (turned off, full, or another protocol version), on which Codex falls back to HTTP at once.
A request refused later comes back as an `error` frame carrying the HTTP status it would have
had, which Codex reads like that HTTP answer.
"""
from __future__ import annotations

import logging
from collections import OrderedDict

import msgspec
from msgspec import Struct

from .. import depth, glm, sse, wire
from ..errors import BridgeError, Kind
from .responses import (History, Memory, ResponsesStream, ResponsesSurface, as_input, error_detail,
                        error_response)
from .responses_wire import ErrorDetail, Item, ResponsesRequest

BETA = "responses_websockets=2026-02-06"
log = logging.getLogger("codeplan.responses_socket")

# responses a socket keeps for a later `previous_response_id` (Codex names only the last one)
KEEP = 4

_encoder = msgspec.json.Encoder()


class SocketMemory(Memory):
    """A socket's latest responses, each with the whole conversation that led to it.

    Bounded twice: the number of responses kept, and the size of a conversation (a chain of
    warm-ups, which never reach the model's context check, must not grow a socket without end:
    every later conversation holds every earlier item)."""

    def __init__(self, keep: int = KEEP, max_bytes: int = 32 * 1024 * 1024) -> None:
        self._keep = keep
        self._max_bytes = max_bytes
        self._held: OrderedDict[str, History] = OrderedDict()

    def recall(self, response_id: str) -> History | None:
        return self._held.get(response_id)

    def remember(self, response_id: str, items: list[Item]) -> None:
        size = len(_encoder.encode(items))
        if size > self._max_bytes:
            self._held.clear()
            raise BridgeError(Kind.invalid_request, f"The conversation on this socket is {size} bytes, "
                              f"more than the {self._max_bytes} a socket keeps; start a new one.",
                              status=413)
        self._held[response_id] = History(items=items)
        self._held.move_to_end(response_id)
        while len(self._held) > self._keep:
            self._held.popitem(last=False)

    def __len__(self) -> int:
        return len(self._held)


# ---- the handshake -----------------------------------------------------------------------

class Refusal(Struct):
    status: int
    message: str
    body: bytes  # OpenAI's error object


class _RefusalDetail(Struct):
    message: str
    type: str
    param: str | None
    code: str


class _RefusalBody(Struct):
    error: _RefusalDetail


def _refusal(status: int, message: str, code: str, kind: str) -> Refusal:
    return Refusal(status, message, _encoder.encode(_RefusalBody(_RefusalDetail(
        message=message, type=kind, param=None, code=code))))


def handshake(beta: str | None, *, enabled: bool, open_sockets: int, limit: int) -> Refusal | None:
    """Whether this upgrade can be served; a refusal Codex takes for "use HTTP" (426) if not.
    The key is checked apart (401), as on HTTP."""
    if not enabled:
        return _refusal(426, "The Responses WebSocket transport is turned off on this server; "
                        "use HTTP (POST /v1/responses).", "websocket_disabled", "invalid_request_error")
    versions = [v.strip() for v in (beta or "").split(",") if v.strip().startswith("responses_websockets=")]
    if versions and BETA not in versions:
        return _refusal(426, f"This server speaks {BETA}, not {', '.join(versions)}; use HTTP "
                        "(POST /v1/responses).", "websocket_version_unsupported", "invalid_request_error")
    if limit and open_sockets >= limit:
        return _refusal(426, "This server holds as many WebSockets as it may; use HTTP "
                        "(POST /v1/responses).", "websocket_connection_limit_reached", "server_error")
    return None


def bad_key() -> Refusal:
    return _refusal(401, "Invalid API key. Create one with `codeplan keys create` and send it as a "
                    "Bearer token.", "invalid_api_key", "authentication_error")


def no_subscription(billing_url: str) -> Refusal:
    return _refusal(402, f"This account has no active subscription. Choose a plan at {billing_url}.",
                    "no_subscription", "insufficient_quota")


def refusal_for(error: BridgeError) -> Refusal:
    """A refusal of the key, for the upgrade, in the very status and body an HTTP request with it
    gets (POST /v1/responses): a suspended account (`journey.account_suspended`)."""
    status, _, body = error_response(error)
    return Refusal(status, error.message, body)


class Gate:
    """How many sockets this process holds, against its limit."""

    def __init__(self) -> None:
        self.open = 0


# ---- frames -----------------------------------------------------------------------------

class _Header(Struct):
    type: str = ""
    generate: bool | None = None


class _Append(Struct):
    input: str | list[Item] = ""


_header_decoder = msgspec.json.Decoder(_Header)
_append_decoder = msgspec.json.Decoder(_Append)


class Turn(Struct):
    """What a frame asks for: a model turn, a warm-up (no model call), or nothing to answer."""
    kind: str  # create | warmup | ignore
    body: bytes = b""


class SocketError(Struct, tag="error", tag_field="type"):
    status: int
    error: ErrorDetail
    headers: dict[str, str]


def error_frame(error: BridgeError) -> bytes:
    """A refused request as Codex reads it on a socket: the HTTP answer it would have had."""
    return _encoder.encode(SocketError(status=error.status, error=error_detail(error),
                                       headers=error.headers()))


class Counts(Struct):
    """What a socket served, for its closing log line."""
    turns: int = 0  # model turns
    continued: int = 0  # of which continued a response the socket kept
    warmups: int = 0
    refused: int = 0  # frames answered with an error event


class SocketSession:
    """One socket's state: the frames it reads and the conversations it keeps."""

    def __init__(self, keep: int = KEEP, max_depth: int = depth.DEFAULT_LIMIT,
                 max_bytes: int = 32 * 1024 * 1024) -> None:
        self.memory = SocketMemory(keep, max_bytes)
        self.counts = Counts()
        self._max_depth = max_depth
        self._last_request: ResponsesRequest | None = None
        self._last_response: str | None = None

    def read(self, data: bytes) -> Turn:
        """A client frame as a turn; a BridgeError (sent back as an `error` frame) if it is
        none we serve."""
        # every frame, as every HTTP body, passes the depth guard before any decoder (a warm-up
        # never reaches the journey, which guards the turns' bodies again)
        if depth.too_deep(data, self._max_depth):
            raise BridgeError(Kind.invalid_request, f"The frame nests deeper than {self._max_depth} levels.")
        try:
            header = _header_decoder.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
            raise BridgeError(Kind.invalid_request, "A frame must be a JSON object with a `type`, "
                              "such as response.create.") from None
        if header.type == "response.create":
            return Turn("warmup" if header.generate is False else "create", data)
        if header.type == "response.append":
            return Turn("create", self._append(data))
        if header.type in ("response.processed", "response.cancel"):
            return Turn("ignore")  # acknowledgements; turns here are never left running
        raise BridgeError(Kind.invalid_request, f"Unknown frame type {header.type!r}: this socket "
                          "serves response.create (and response.append).", param="type")

    def _append(self, data: bytes) -> bytes:
        """`response.append` (older Codex): the last request again, with the new input after
        the last response."""
        if self._last_request is None or self._last_response is None:
            raise BridgeError(Kind.invalid_request, "response.append needs a completed response on "
                              "this socket first; send response.create.", param="type")
        try:
            appended = _append_decoder.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise BridgeError(Kind.invalid_request, f"Invalid response.append frame: {exc}") from None
        request = msgspec.structs.replace(self._last_request, input=appended.input,
                                          previous_response_id=self._last_response, generate=None)
        return _encoder.encode(request)

    def warmup(self, surface: ResponsesSurface, body: bytes, response_id: str) -> list[bytes]:
        """`generate: false`: the conversation is kept under a new response id, which a
        `response.completed` without output hands back; nothing is generated or billed."""
        surface.parse(body, warmup=True)
        request, context = surface.request, surface.context
        assert request is not None and context is not None
        translator = ResponsesStream(context, request.model, response_id)
        out = translator.start() + translator.finish(glm.STOP, wire.Usage())
        self.memory.remember(response_id, surface.items)
        self._last_request, self._last_response = request, response_id
        self.counts.warmups += 1
        return [event.data for event in sse.SSEDecoder(max_line=None).feed(out)]

    def refused(self, error: BridgeError) -> bytes:
        self.counts.refused += 1
        return error_frame(error)

    def finished(self, surface: ResponsesSurface) -> None:
        """After a turn: a completed response is kept for the next turn to continue."""
        self.counts.turns += 1
        if surface.request is not None and surface.request.previous_response_id:
            self.counts.continued += 1
        done = surface.finished()
        if done is None or surface.request is None:
            return
        response_id, output = done
        try:
            self.memory.remember(response_id, surface.items + [as_input(item) for item in output])
        except BridgeError as error:
            # Too big to keep. Nothing is said now: the turn's `response.completed` went out, and
            # Codex reads a frame after it as the answer to its next request. A later turn that
            # names this response gets previous_response_not_found, and Codex resends it whole.
            log.info("response socket forgot a conversation too big to keep", extra={"reason": error.message})
            return
        self._last_request, self._last_response = surface.request, response_id


def frames(decoder: sse.SSEDecoder, chunk: bytes) -> list[bytes]:
    """The events in a piece of the HTTP stream, each one frame's text; keep-alive comments
    have no frame (the socket has its own pings)."""
    return [event.data for event in decoder.feed(chunk)]
