"""One error taxonomy for every surface; each surface renders it in its own protocol's shape."""
from __future__ import annotations

import math
from enum import Enum

import msgspec


class Kind(str, Enum):
    authentication = "authentication"          # 401: no key, unknown key
    permission = "permission"                  # 403: model not in the plan, subscription inactive
    invalid_request = "invalid_request"        # 400: a real fault in the request
    not_found = "not_found"                    # 404: unknown model or path
    context_length = "context_length"          # 400: prompt larger than the model's window
    too_large = "too_large"                    # 400: can never fit in a whole quota window
    quota_exhausted = "quota_exhausted"        # 429: a window is full until it resets
    concurrency = "concurrency"                # 429: too many requests in flight, retry soon
    upstream_rate_limited = "upstream_rate_limited"  # 429: GLM's concurrency limit (1302)
    upstream_overloaded = "upstream_overloaded"      # 503 / 529: GLM overloaded (1305)
    upstream_billing = "upstream_billing"      # 402: our upstream account cannot pay (1113, 1309)
    payment_required = "payment_required"      # 402: the user's subscription may not spend
    content_policy = "content_policy"          # 400: GLM's safety review (1301)
    upstream_error = "upstream_error"          # 502: GLM failed
    upstream_timeout = "upstream_timeout"      # 504
    unavailable = "unavailable"                # 503: our own database cannot be reached


STATUS = {
    Kind.authentication: 401, Kind.permission: 403, Kind.invalid_request: 400,
    Kind.not_found: 404, Kind.context_length: 400, Kind.too_large: 400,
    Kind.quota_exhausted: 429, Kind.concurrency: 429, Kind.upstream_rate_limited: 429,
    Kind.upstream_overloaded: 503, Kind.upstream_billing: 402, Kind.payment_required: 402,
    Kind.content_policy: 400,
    Kind.upstream_error: 502, Kind.upstream_timeout: 504, Kind.unavailable: 503,
}
RETRYABLE = {Kind.concurrency, Kind.upstream_rate_limited, Kind.upstream_overloaded,
             Kind.upstream_error, Kind.upstream_timeout, Kind.unavailable}


class BridgeError(Exception):
    def __init__(self, kind: Kind, message: str, *, code: str | None = None,
                 retry_after: float | None = None, param: str | None = None,
                 limit: int | None = None, requested: int | None = None, status: int | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        # a status more precise than the kind's (413 for a body too large, 405 for a method)
        self._status = status
        self.message = message
        self.code = code
        self.retry_after = retry_after
        self.param = param
        # for context_length: the model's window and the request's size
        self.limit = limit
        self.requested = requested
        # when the upstream router gave up (bridge/upstreams.py): the upstream's time ends there,
        # though the request may hear it only after its admission
        self.upstream_at: float | None = None

    @property
    def status(self) -> int:
        return self._status or STATUS[self.kind]

    def headers(self) -> dict[str, str]:
        headers: dict[str, str] = {}
        if self.retry_after is not None:
            seconds = max(1, math.ceil(self.retry_after))
            headers["retry-after"] = str(seconds)
            headers["retry-after-ms"] = str(max(1, math.ceil(self.retry_after * 1000)))
        headers["x-should-retry"] = "true" if self.kind in RETRYABLE else "false"
        return headers


# OpenAI's error object: {"error": {"message", "type", "param", "code"}}
class OpenAIErrorDetail(msgspec.Struct):
    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIError(msgspec.Struct):
    error: OpenAIErrorDetail


_OPENAI_TYPE = {
    Kind.authentication: "authentication_error", Kind.permission: "permission_error",
    Kind.invalid_request: "invalid_request_error", Kind.not_found: "invalid_request_error",
    Kind.context_length: "invalid_request_error", Kind.too_large: "invalid_request_error",
    Kind.quota_exhausted: "rate_limit_error", Kind.concurrency: "rate_limit_error",
    Kind.upstream_rate_limited: "rate_limit_error", Kind.upstream_overloaded: "server_error",
    Kind.upstream_billing: "insufficient_quota", Kind.payment_required: "insufficient_quota",
    Kind.content_policy: "invalid_request_error",
    Kind.upstream_error: "server_error", Kind.upstream_timeout: "server_error",
    Kind.unavailable: "server_error",
}
_OPENAI_CODE = {
    Kind.authentication: "invalid_api_key", Kind.not_found: "model_not_found",
    Kind.context_length: "context_length_exceeded", Kind.upstream_billing: "insufficient_quota",
    Kind.payment_required: "insufficient_quota",
    Kind.content_policy: "content_policy_violation",
}


def openai_error(error: BridgeError) -> OpenAIError:
    return OpenAIError(error=OpenAIErrorDetail(
        message=error.message, type=_OPENAI_TYPE[error.kind], param=error.param,
        code=error.code or _OPENAI_CODE.get(error.kind)))
