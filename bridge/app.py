"""Litestar routes for the API surfaces: thin adapters that decode, call the journey, encode."""
from __future__ import annotations

import msgspec
from litestar import Request, Response, Router, asgi, get, head, post
from litestar.response import Stream
from litestar.types import Receive, Scope, Send

from . import errors
from .asgi import serve
from .errors import BridgeError, Kind
from .journey import Journey, Reply
from .models import CATALOG, model_list
from .surfaces import messages as anthropic
from .surfaces.chat import ChatSurface

_chat = ChatSurface()
_messages = anthropic.MessagesSurface()


def api_key(request: Request) -> str:
    """The key from `Authorization: Bearer` or `x-api-key` (Claude Code may send both)."""
    auth = request.headers.get("authorization")
    if auth:
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    return (request.headers.get("x-api-key") or "").strip()


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


@asgi(CHAT_PATHS, copy_scope=False)
async def chat_completions(scope: Scope, receive: Receive, send: Send) -> None:
    app = scope["app"]
    await serve(app.state.journey, _chat, scope, receive, send, app.state.max_body)


# Claude Code appends /v1/messages to ANTHROPIC_BASE_URL; Z.ai-style bases end in /api/anthropic
MESSAGES_PATHS = ["/v1/messages", "/messages", "/api/anthropic/v1/messages"]


@asgi(MESSAGES_PATHS, copy_scope=False)
async def messages(scope: Scope, receive: Receive, send: Send) -> None:
    app = scope["app"]
    await serve(app.state.journey, _messages, scope, receive, send, app.state.max_body)


class InputTokens(msgspec.Struct):
    input_tokens: int


@post([p + "/count_tokens" for p in MESSAGES_PATHS], status_code=200)
async def count_tokens(request: Request) -> Response:
    journey: Journey = request.app.state.journey
    reply, tokens = await journey.count_tokens(_messages, anthropic.count_request, api_key(request),
                                               request.body)
    if tokens is None:
        return respond(reply)
    return Response(msgspec.json.encode(InputTokens(input_tokens=tokens)), media_type="application/json")


@get(["/v1/models", "/models", "/api/coding/paas/v4/models", "/api/paas/v4/models"])
async def models(request: Request) -> Response:
    """The plan's models; without a key, every model served (tools probe before configuring)."""
    key = api_key(request)
    allowed = tuple(CATALOG)
    if key:
        principal = await request.app.state.journey.auth.authenticate(key)
        if principal is None:
            error = BridgeError(Kind.authentication, "Invalid API key.")
            return Response(msgspec.json.encode(errors.openai_error(error)), status_code=401,
                            media_type="application/json")
        allowed = principal.models or allowed
    return Response(msgspec.json.encode(model_list(allowed)), media_type="application/json")


@head(["/", "/api/hello"])
async def hello() -> None:
    """Claude Code probes `HEAD /` before its first request: answer at once."""


router = Router(path="/", route_handlers=[chat_completions, messages, count_tokens, models, hello])
