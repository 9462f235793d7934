"""An error in the caller's own protocol, chosen by the request's path alone.

The HTTP server's limits (431, 413, 408, 503), the authentication throttle and any layer that
refuses a request before a surface has parsed it answer through `render`, so a coding tool
always gets an error object it can read:

- OpenAI's `{"error": {"message", "type", "param", "code"}}` on Chat Completions, Responses and
  model-list paths (also under Z.ai's `/api/coding/paas/v4` and `/api/paas/v4`);
- Anthropic's `{"type": "error", "error": {"type", "message"}}` on Messages paths;
- Z.ai's `{"code", "msg", "success": false, "data": null}` on its monitor paths;
- RFC 9457 problem details everywhere else (our own API).

Pure: a path and an error in, status, content type and bytes out.
"""
from __future__ import annotations

import http
from enum import Enum

import msgspec


class Family(str, Enum):
    openai = "openai"
    anthropic = "anthropic"
    zai = "zai"
    problem = "problem"


# Path roots, matched whole or followed by "/": "/v1/models" and "/v1/models/glm-4.6" are OpenAI's,
# "/v1/modelsx" is not. Longer roots first where they share a beginning.
_ROOTS: tuple[tuple[str, Family], ...] = (
    ("/v1/chat", Family.openai), ("/chat", Family.openai),
    ("/v1/responses", Family.openai), ("/responses", Family.openai),
    ("/v1/models", Family.openai), ("/models", Family.openai),
    ("/api/coding/paas/v4", Family.openai), ("/api/paas/v4", Family.openai),
    ("/v1/messages", Family.anthropic), ("/messages", Family.anthropic),
    ("/api/anthropic", Family.anthropic),
    ("/api/monitor", Family.zai),
    # the service's own API under /v1, then every other /v1 path: a tool pointed at the wrong
    # place is answered in OpenAI's shape (issue 11)
    ("/v1/usage", Family.problem), ("/v1/billing", Family.problem),
    ("/v1", Family.openai),
)


def family(path: str) -> Family:
    """Which protocol a request to `path` speaks (a query string, if any, is ignored)."""
    path = path.partition("?")[0]
    for root, kind in _ROOTS:
        if path.startswith(root) and (len(path) == len(root) or path[len(root)] == "/"):
            return kind
    return Family.problem


class Rendered(msgspec.Struct, frozen=True):
    status: int
    content_type: str
    body: bytes


# ---- OpenAI ------------------------------------------------------------------------------

class _OpenAIDetail(msgspec.Struct):
    message: str
    type: str
    param: str | None
    code: str | None


class _OpenAIError(msgspec.Struct):
    error: _OpenAIDetail


def _openai_type(status: int) -> str:
    if status == 401:
        return "authentication_error"
    if status == 403:
        return "permission_error"
    if status == 429:
        return "rate_limit_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


# ---- Anthropic ---------------------------------------------------------------------------

class _AnthropicDetail(msgspec.Struct):
    type: str
    message: str


class _AnthropicError(msgspec.Struct, tag="error", tag_field="type"):
    error: _AnthropicDetail


# https://docs.anthropic.com/en/api/errors; "invalid_request_error" also stands for the 4xx
# statuses it does not list. 408 is a timeout the client can retry, so not invalid_request_error
# (Cline reads any invalid_request_error as a context overflow and truncates its history).
_ANTHROPIC_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 402: "billing_error",
    403: "permission_error", 404: "not_found_error", 408: "timeout_error",
    413: "request_too_large", 429: "rate_limit_error", 500: "api_error", 502: "api_error",
    503: "overloaded_error", 504: "timeout_error", 529: "overloaded_error",
}


def _anthropic_type(status: int) -> str:
    return _ANTHROPIC_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")


# ---- Z.ai --------------------------------------------------------------------------------

class _ZaiEnvelope(msgspec.Struct):
    code: int
    msg: str
    success: bool
    data: None = None


# ---- RFC 9457 ----------------------------------------------------------------------------

class _Problem(msgspec.Struct, omit_defaults=True):
    type: str
    title: str
    status: int
    detail: str | None = None
    code: str | None = None


def _phrase(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "Error"


_encoder = msgspec.json.Encoder()


def render(path: str, status: int, message: str, code: str | None = None, *,
           http_level: bool = False) -> Rendered:
    """The error `status` / `message` (/ a machine-readable `code`) as the caller of `path` expects it.

    `http_level` marks an answer of the HTTP server itself (header or body limits, timeouts,
    capacity), as opposed to one of the application; it matters on Z.ai's paths only (below).
    """
    kind = family(path)
    if kind is Family.openai:
        body = _encoder.encode(_OpenAIError(error=_OpenAIDetail(
            message=message, type=_openai_type(status), param=None, code=code)))
        return Rendered(status, "application/json", body)
    if kind is Family.anthropic:
        body = _encoder.encode(_AnthropicError(error=_AnthropicDetail(
            type=_anthropic_type(status), message=message)))
        return Rendered(status, "application/json", body)
    if kind is Family.zai:
        # Z.ai's monitor API answers its own refusals (bad token, bad parameters) with HTTP 200
        # and the outcome in the envelope (service/usage.py `_zai`); the quota HUDs read
        # `success` and `code`, so application refusals (401, 429, 400...) keep that convention.
        # A refusal of the HTTP server itself (431, 413, 408, 503) keeps its real status: on
        # Z.ai it would come from their gateway, not the monitor API, and it closes the
        # connection, so a client's retry logic must see it for what it is. So does a failure
        # of ours (5xx): an HTTP 200 would hide it from every monitor and retry.
        envelope = _ZaiEnvelope(code=int(code) if code and code.isdigit() else status,
                                msg=message, success=False)
        real = http_level or status >= 500
        return Rendered(status if real else 200, "application/json", _encoder.encode(envelope))
    body = _encoder.encode(_Problem(type="about:blank", title=_phrase(status), status=status,
                                    detail=message, code=code))
    return Rendered(status, "application/problem+json", body)
