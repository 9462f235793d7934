"""The service's own JSON API takes its input as declared, or refuses it (400).

Litestar converts a handler's parameters and JSON body with msgspec in lax mode (`strict=False`,
which query values need: they arrive as text) and takes the last of a repeated query parameter.
So `"is_admin": 0` was taken as `false`, `"window_credits": "100"` as 100, and
`?limit=garbage&limit=5` as 5: a caller's mistake passed as if meant, where the schema
(service/openapi.py) says it is not valid. `strict_input`, a `before_request` hook on those
routes, refuses both first:
- a declared single-valued query parameter given more than once;
- a JSON body that is not its handler's `data` type under msgspec's strict decoder (a wrong
  type, not only a malformed document), naming the field.
Litestar's own conversion follows, on input now known to be what it means.
"""
from __future__ import annotations

import msgspec
from litestar import Request
from litestar.enums import RequestEncodingType
from litestar.exceptions import ValidationException
from litestar.params import BodyKwarg, ParameterKwarg, PathParameter, QueryParameter

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


async def strict_input(request: Request) -> None:
    """Refuse a repeated single-valued query parameter and a JSON body of the wrong types."""
    for name in _query_names(request):
        if len(request.query_params.getall(name, [])) > 1:
            raise ValidationException(f"The query parameter {name!r} may be given once.")
    field = request.route_handler.parsed_fn_signature.parameters.get("data")
    if field is None:
        return
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
