"""Litestar routes for the API surfaces: thin adapters that decode, call the journey, encode."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from typing import Awaitable, Callable

import msgspec
from litestar import Request, Response, Router, asgi, get, head, post, route
from litestar.connection import ASGIConnection, WebSocket
from litestar.exceptions import WebSocketDisconnect
from litestar.params import FromPath
from litestar.response import Stream
from litestar.types import Receive, Scope, Send

from . import errors, sse
from .asgi import api_key as raw_api_key
from .asgi import serve, unencoded
from .errors import BridgeError, Kind
from .journey import Journey, Reply, account_suspended
from .models import CATALOG, listed_model, model_list
from .surfaces import messages as anthropic
from .surfaces import responses, responses_socket
from .surfaces.chat import ChatSurface

log = logging.getLogger("codeplan.bridge")

_chat = ChatSurface()
_messages = anthropic.MessagesSurface()


def api_key(request: ASGIConnection) -> str:
    """The key from `Authorization: Bearer` or `x-api-key`, by the hot paths' one rule
    (bridge/asgi.py `api_key`): every route, guard and socket reads it so."""
    return raw_api_key(request.scope["headers"])


def respond(reply: Reply) -> Response:
    if reply.stream is not None:
        return Stream(reply.stream, status_code=reply.status, media_type=reply.media_type,
                      headers=reply.headers)
    return Response(reply.body, status_code=reply.status, media_type=reply.media_type,
                    headers=reply.headers)


# The hot routes are raw ASGI (bridge/asgi.py): no per-request framework objects.
# Tools whose base URL lacks /v1, and tools using a built-in Z.ai provider pointed at our host.
CHAT_PATHS = ["/v1/chat/completions", "/chat/completions",
              "/api/coding/paas/v4/chat/completions", "/api/paas/v4/chat/completions"]


async def serve_chat(scope: Scope, receive: Receive, send: Send) -> None:
    app = scope["app"]
    await serve(app.state.journey, _chat, scope, receive, send, app.state.max_body)


@asgi(CHAT_PATHS, copy_scope=False)
async def chat_completions(scope: Scope, receive: Receive, send: Send) -> None:
    await serve_chat(scope, receive, send)


# Claude Code appends /v1/messages to ANTHROPIC_BASE_URL; Z.ai-style bases end in /api/anthropic
MESSAGES_PATHS = ["/v1/messages", "/messages", "/api/anthropic/v1/messages"]


async def serve_messages(scope: Scope, receive: Receive, send: Send) -> None:
    app = scope["app"]
    await serve(app.state.journey, _messages, scope, receive, send, app.state.max_body)


@asgi(MESSAGES_PATHS, copy_scope=False)
async def messages(scope: Scope, receive: Receive, send: Send) -> None:
    await serve_messages(scope, receive, send)


class InputTokens(msgspec.Struct):
    input_tokens: int


@post([p + "/count_tokens" for p in MESSAGES_PATHS], status_code=200)
async def count_tokens(request: Request) -> Response:
    journey: Journey = request.app.state.journey

    async def body() -> bytes:
        unencoded(request.scope["headers"])  # a compressed body: 415, as on /v1/messages
        return await request.body()

    reply, tokens = await journey.count_tokens(_messages, anthropic.count_request, api_key(request), body)
    if tokens is None:
        return respond(reply)
    return Response(msgspec.json.encode(InputTokens(input_tokens=tokens)), media_type="application/json")


MODELS_PATHS = ["/v1/models", "/models", "/api/coding/paas/v4/models", "/api/paas/v4/models"]


async def _models_of(request: Request) -> tuple[str, ...] | Response:
    """The key's plan's models; without a key, every model served (tools probe before
    configuring); an unknown key, a 401."""
    key = api_key(request)
    if not key:
        return tuple(CATALOG)
    principal = await request.app.state.journey.auth.authenticate(key)
    if principal is None:
        return _openai_error(BridgeError(Kind.authentication, "Invalid API key."))
    return principal.models or tuple(CATALOG)


@get(MODELS_PATHS)
async def models(request: Request) -> Response:
    """The plan's models (OpenAI's list; each entry reads as Anthropic's model too)."""
    allowed = await _models_of(request)
    if isinstance(allowed, Response):
        return allowed
    return Response(msgspec.json.encode(model_list(allowed)), media_type="application/json")


@get([p + "/{model_id:str}" for p in MODELS_PATHS])
async def retrieve_model(request: Request, model_id: FromPath[str]) -> Response:
    """One model of the list (OpenAI's and Anthropic's `models.retrieve`), by its id in any case;
    one the plan does not serve is a 404 naming it, as OpenAI answers a model one cannot use
    (not "unknown path": the tool's base URL is right)."""
    allowed = await _models_of(request)
    if isinstance(allowed, Response):
        return allowed
    info = CATALOG.get(model_id.strip().lower())
    if info is None or info.id not in allowed:
        return _openai_error(BridgeError(
            Kind.not_found, f"The model `{model_id}` does not exist or you do not have access to it. "
            f"Models: {', '.join(m for m in allowed if m in CATALOG)}", param="model"))
    return Response(msgspec.json.encode(listed_model(info)), media_type="application/json")


@head(["/", "/api/hello"])
async def hello() -> None:
    """Claude Code probes `HEAD /` before its first request: answer at once."""


# Codex appends /responses to its provider's base_url (which ends in /v1)
RESPONSES_PATHS = ["/v1/responses", "/responses", "/api/coding/paas/v4/responses",
                   "/api/paas/v4/responses"]


@asgi(RESPONSES_PATHS, copy_scope=False)
async def create_response(scope: Scope, receive: Receive, send: Send) -> None:
    """POST: one request (raw ASGI, as the other hot routes); a WebSocket upgrade on the same
    path: Codex's socket transport (an ASGI route owns its path, so it takes both)."""
    if scope["type"] == "websocket":
        await response_socket(WebSocket(scope, receive, send))
        return
    await serve_responses(scope, receive, send)


async def serve_responses(scope: Scope, receive: Receive, send: Send) -> None:
    app = scope["app"]
    # a surface per request: its translator needs what the request said
    await serve(app.state.journey, responses.ResponsesSurface(), scope, receive, send, app.state.max_body)


# The hot HTTP paths and their raw ASGI handlers, for an application that dispatches them before
# its framework's router (service/app.py): the same handlers the routes above call.
HOT_ROUTES: dict[str, Callable[[Scope, Receive, Send], Awaitable[None]]] = {
    **dict.fromkeys(CHAT_PATHS, serve_chat), **dict.fromkeys(MESSAGES_PATHS, serve_messages),
    **dict.fromkeys(RESPONSES_PATHS, serve_responses)}


def _openai_error(error: BridgeError, status: int | None = None) -> Response:
    return Response(msgspec.json.encode(errors.openai_error(error)), status_code=status or error.status,
                    media_type="application/json")


@route([p + "/{response_id:str}" for p in RESPONSES_PATHS], http_method=["GET", "DELETE"], status_code=404)
async def stored_response(response_id: FromPath[str]) -> Response:
    return _openai_error(responses.not_stored(response_id))


ENDPOINTS = ("POST /v1/chat/completions, POST /v1/messages, POST /v1/messages/count_tokens, "
             "POST /v1/responses (also as a WebSocket), GET /v1/models, GET /v1/models/{model}")


def not_served(method: str, path: str, status: int) -> Response:
    """A path under /v1 that is not served (404), or not with this method (405), in OpenAI's
    error shape: a tool pointed at the wrong place tells its user where it is and what is here.
    The service's exception handler answers with it for every such path."""
    what = f"{method} is not served on {path}" if status == 405 else f"Unknown path: {method} {path}"
    return _openai_error(BridgeError(Kind.not_found, f"{what}. Codeplan serves {ENDPOINTS}; point "
                                     "the tool's base URL at this server's /v1.", code="unknown_url"), status)


async def _refuse(socket: WebSocket, refusal: responses_socket.Refusal) -> None:
    """Answer the upgrade with an HTTP status and an OpenAI error body (ASGI's
    websocket.http.response), so the client can tell "use HTTP" (426) from "bad key" (401)."""
    if "websocket.http.response" not in socket.scope.get("extensions", {}):
        await socket.close(code=1008, reason=refusal.message[:120])  # a close reason is short
        return
    await socket.receive()  # the connect event
    await socket.send({"type": "websocket.http.response.start", "status": refusal.status,
                       "headers": [(b"content-type", b"application/json")]})
    await socket.send({"type": "websocket.http.response.body", "body": refusal.body})


async def _relay(socket: WebSocket, reply: Reply) -> None:
    """A turn's answer: each event of its stream as one text frame."""
    decoder = sse.SSEDecoder(max_line=None)  # our own output: as long as the request allows
    assert reply.stream is not None
    # closing the stream, however the loop ends, settles the turn (a client gone mid-answer
    # included)
    async with contextlib.aclosing(reply.stream) as stream:
        async for chunk in stream:
            for frame in responses_socket.frames(decoder, chunk):
                await socket.send_text(frame.decode())


# frames a socket may have waiting while a turn is answered (Codex sends one turn at a time,
# plus an acknowledgement or two)
_INBOX = 4


async def response_socket(socket: WebSocket) -> None:
    journey: Journey = socket.app.state.journey
    settings = journey.settings
    gate: responses_socket.Gate = socket.app.state.setdefault("response_sockets", responses_socket.Gate())
    key = api_key(socket)
    refusal = responses_socket.handshake(socket.headers.get("openai-beta"),
                                         enabled=settings.responses_websockets,
                                         open_sockets=gate.open, limit=settings.max_websockets)
    if refusal is None:
        principal = await journey.auth.authenticate(key) if key else None
        if principal is None:
            refusal = responses_socket.bad_key()
        elif principal.subscription_id is None:
            # a key that cannot spend holds no socket (nor its memory): it is told why, at once
            refusal = responses_socket.no_subscription(settings.public_url + "/billing")
        elif principal.suspended:
            # told as its HTTP requests are (their admission's 403), not after a first turn
            refusal = responses_socket.refusal_for(account_suspended())
    if refusal is not None:
        await _refuse(socket, refusal)
        return
    gate.open += 1
    session = responses_socket.SocketSession(max_depth=settings.max_json_depth,
                                             max_bytes=socket.app.state.max_body)
    # Frames are read all the time, also while a turn is answered: a client that closes the
    # socket mid-turn cancels the turn at once, wherever it waits (as bridge/asgi.py does for
    # HTTP), so an abandoned request does not keep an upstream thinking.
    inbox: asyncio.Queue[bytes | None] = asyncio.Queue()
    turn = asyncio.current_task()
    assert turn is not None
    serving = gone = False

    async def listen() -> None:
        nonlocal gone
        while True:
            message = await socket.receive()
            if message["type"] != "websocket.receive":
                gone = True
                inbox.put_nowait(None)
                if serving:
                    turn.cancel()
                return
            if inbox.qsize() >= _INBOX:
                # a client that sends frames faster than its turns are answered is not Codex
                gone = True
                inbox.put_nowait(None)
                if serving:
                    turn.cancel()
                await socket.close(code=1008, reason="too many frames waiting; one turn at a time")
                return
            inbox.put_nowait(message.get("bytes") or (message.get("text") or "").encode())

    listener: asyncio.Future | None = None
    try:
        await socket.accept()
        listener = asyncio.ensure_future(listen())
        while (data := await inbox.get()) is not None:
            serving = True
            try:
                cannot_spend = await _serve_frame(socket, journey, key, session, data)
            finally:
                serving = False
            if cannot_spend is not None:
                # its refusal is sent (Codex reads it as the turn's answer); the socket is not
                # held for turns that would all be refused alike
                await socket.close(code=1008, reason=cannot_spend)
                break
    except asyncio.CancelledError:
        if not gone:
            raise
        turn.uncancel()  # the client left mid-turn: its stream was closed, the turn settled
    except (WebSocketDisconnect, OSError):
        pass  # gone while being answered: the answer's stream was closed, the turn settled
    finally:
        if listener is not None:
            listener.cancel()
        gate.open -= 1
        log.info("response socket closed", extra=msgspec.structs.asdict(session.counts))


def _cannot_spend(error: BridgeError) -> str | None:
    """Why a refused turn's key cannot spend at all (revoked, its account suspended, its
    subscription gone or unpaid), as a close reason; None when the next turn may be served (a
    full window resets, a bad request is the request's)."""
    if error.kind is Kind.authentication:
        return "invalid_api_key"
    if error.code == "account_suspended" or error.kind is Kind.payment_required:
        return error.code or "payment_required"
    return None


async def _serve_frame(socket: WebSocket, journey: Journey, key: str,
                       session: responses_socket.SocketSession, data: bytes) -> str | None:
    """One frame: a turn through the journey like any request, a warm-up, or an error event.
    Returns why the socket must close when the turn was refused because its key cannot spend
    ("a key that cannot spend holds no socket": the handshake checks what the key's principal
    says, the admission what the account is now, a suspension included)."""
    surface = responses.ResponsesSurface(session.memory, socket=True)
    try:
        turn = session.read(data)
        if turn.kind == "ignore":
            return None
        if turn.kind == "warmup":
            for frame in session.warmup(surface, turn.body, "resp_" + uuid.uuid4().hex):
                await socket.send_text(frame.decode())
            return None
    except BridgeError as error:
        log.info("response socket refused a frame", extra={"status": error.status, "code": error.code,
                                                            "reason": error.message[:200]})
        await socket.send_text(session.refused(error).decode())
        return None

    async def body() -> bytes:
        return turn.body

    reply = await journey.handle(surface, key, body)
    if reply.stream is None:
        assert surface.failure is not None  # a socket's turns always stream
        await socket.send_text(session.refused(surface.failure).decode())
        return _cannot_spend(surface.failure)
    await _relay(socket, reply)
    session.finished(surface)
    return None


router = Router(path="/", route_handlers=[
    chat_completions, messages, count_tokens, models, retrieve_model, hello, create_response, stored_response])
