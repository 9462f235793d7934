"""Sans-I/O translators, one per client protocol."""
from __future__ import annotations

from typing import TypeVar

import msgspec

from ..errors import BridgeError, Kind

T = TypeVar("T")


def decode_body(decoder: msgspec.json.Decoder, body: bytes) -> T:
    """A request body as the protocol's Struct, or the request fault that says why not."""
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise BridgeError(Kind.invalid_request, f"Invalid request body: {exc}") from None
    except msgspec.DecodeError:
        raise BridgeError(Kind.invalid_request, "The request body is not valid JSON.") from None
