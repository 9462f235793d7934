"""The service's own JSON API takes its input as declared, or refuses it (400; 415 encoded).

Litestar converts a handler's parameters and JSON body with msgspec in lax mode (`strict=False`,
which query values need: they arrive as text) and takes the last of a repeated query parameter.
So `"is_admin": 0` was taken as `false`, `"window_credits": "100"` as 100, and
`?limit=garbage&limit=5` as 5: a caller's mistake passed as if meant, where the schema
(service/openapi.py) says it is not valid. `strict_input`, a `before_request` hook on those
routes, refuses both first:
- a declared single-valued query parameter given more than once;
- a body sent with a Content-Encoding other than `identity` (415, naming the coding), before a
  byte of it is read: the body is read as sent, and a compressed one was refused as malformed
  JSON, sending its caller after JSON that is fine (the bridge's rule and words, `unencoded`);
- a JSON body that is not its handler's `data` type under msgspec's strict decoder (a wrong
  type, not only a malformed document), naming the field.
Litestar's own conversion follows, on input now known to be what it means.

Every route of the service's own API that takes a body (`data`) has this hook (the admin router,
/v1/billing's JSON endpoints), and it runs after their guards: a stranger is refused for its
credential first, as on the bridge. A route that reads no body (GET /v1/usage, /v1/billing) is
served whatever the header says: it describes nothing the route uses. The bridge's paths never
pass here; they refuse an encoded body themselves, in the tool's protocol.
"""
from __future__ import annotations

import msgspec
from litestar import Request, Response
from litestar.enums import RequestEncodingType
from litestar.exceptions import ValidationException
from litestar.params import BodyKwarg, ParameterKwarg, PathParameter, QueryParameter

from bridge.asgi import unencoded
from bridge.errors import BridgeError

from .problems import problem

# what Litestar fills from the connection itself, not from the query string
_RESERVED = {"request", "socket", "headers", "query", "cookies", "state", "scope", "body", "data"}


def _query_names(request: Request) -> list[str]:
    """The handler's single-valued query parameters, by the name they have in the URL."""
    names = []
    for name, field in request.route_handler.parsed_fn_signature.parameters.items():
        kwarg = field.kwarg_definition
        if name in _RESERVED or name in request.path_params or isinstance(kwarg, (BodyKwarg, PathParameter)):
            continue
        if isinstance(kwarg, ParameterKwarg) and not isinstance(kwarg, QueryParameter) \
                and (kwarg.header or kwarg.cookie or type(kwarg) is not ParameterKwarg):
            continue  # a header or cookie parameter
        if field.is_non_string_sequence:
            continue
        names.append(getattr(kwarg, "name", None) or name)
    return names


async def strict_input(request: Request) -> Response | None:
    """Refuse a repeated single-valued query parameter, an encoded body and a JSON body of the
    wrong types."""
    for name in _query_names(request):
        if len(request.query_params.getall(name, [])) > 1:
            raise ValidationException(f"The query parameter {name!r} may be given once.")
    field = request.route_handler.parsed_fn_signature.parameters.get("data")
    if field is None:
        return
    try:
        unencoded(request.scope["headers"])
    except BridgeError as refused:
        # the bridge's rule, words and code (`unsupported_content_encoding`), in the service's
        # problem details; a response returned here is the answer, the handler is not called
        return problem(415, "Unsupported Media Type", refused.message, refused.code)
    kwarg = field.kwarg_definition
    if isinstance(kwarg, BodyKwarg) and kwarg.media_type != RequestEncodingType.JSON:
        return
    try:
        msgspec.json.decode(await request.body(), type=field.annotation, strict=True)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        said = str(exc)
        if said == "Input data was truncated":
            # msgspec's words for a body cut short, and for a string ending in an unpaired
            # \ud800-\udbff escape: the second is a whole body, whose sender looks for no proxy
            said = "JSON is malformed: the body is cut short, or a string holds an unpaired \\ud800-\\udbff escape"
        raise ValidationException(f"Invalid request body: {said}") from None
