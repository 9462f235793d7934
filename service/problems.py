"""RFC 9457 problem details: how errors look on our own API (not the coding tools' protocols),
and how the OpenAPI schema documents them."""
from __future__ import annotations

import http

import msgspec
from litestar import Response
from litestar.openapi import ResponseSpec

MEDIA_TYPE = "application/problem+json"


class Problem(msgspec.Struct, omit_defaults=True):
    """The same fields `bridge.shapes.render` writes for the service's own paths."""
    type: str
    title: str
    status: int
    detail: str | None = None
    code: str | None = None


def problem(status: int, title: str, detail: str | None = None, code: str | None = None) -> Response:
    return Response(msgspec.json.encode(Problem(type="about:blank", title=title, status=status,
                                                 detail=detail, code=code)),
                    status_code=status, media_type=MEDIA_TYPE)


_WHY = {
    400: "The request's parameters or body are not valid.",
    401: "No credential, or an unknown one.",
    402: "The key's account has no subscription that may spend.",
    403: "The credential is known but may not do this.",
    404: "No such resource.",
    409: "The resource exists already.",
    429: "Too many unknown keys from this address; retry after `Retry-After` seconds.",
    503: "The database is unreachable for a moment; retry.",
}


def problem_responses(*statuses: int) -> dict[int, ResponseSpec]:
    """The OpenAPI description of these error statuses, as problem details."""
    return {status: ResponseSpec(Problem, media_type=MEDIA_TYPE, generate_examples=False,
                                 description=_WHY.get(status) or http.HTTPStatus(status).phrase)
            for status in statuses}
