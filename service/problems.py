"""RFC 9457 problem details: how errors look on our own API (not the coding tools' protocols)."""
from __future__ import annotations

import msgspec
from litestar import Response


class Problem(msgspec.Struct, omit_defaults=True):
    type: str
    title: str
    status: int
    detail: str | None = None


def problem(status: int, title: str, detail: str | None = None) -> Response:
    return Response(msgspec.json.encode(Problem(type="about:blank", title=title, status=status,
                                                 detail=detail)),
                    status_code=status, media_type="application/problem+json")
