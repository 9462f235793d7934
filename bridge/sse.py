"""Server-sent events framing, incremental and without I/O: bytes in, events out, and back."""
from __future__ import annotations

import msgspec


class Event(msgspec.Struct, frozen=True):
    data: bytes
    event: str | None = None


class SSEDecoder:
    """Feed it bytes as they arrive; it returns the events completed so far.

    Follows the WHATWG rules that matter here: CRLF, CR or LF line ends, `data:` lines joined
    with newlines, `event:` names, comment lines (`:`) ignored, a blank line ends an event.
    """

    def __init__(self) -> None:
        self._buffer = b""
        self._data: list[bytes] = []
        self._event: str | None = None

    def feed(self, chunk: bytes) -> list[Event]:
        buffer = self._buffer + chunk
        if b"\r" in buffer:
            # a lone trailing CR may be the first half of a CRLF: keep it for the next feed
            keep_cr = buffer.endswith(b"\r")
            if keep_cr:
                buffer = buffer[:-1]
            buffer = buffer.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
            if keep_cr:
                buffer += b"\r"
        events: list[Event] = []
        start = 0
        while True:
            end = buffer.find(b"\n", start)
            if end < 0:
                break
            line = buffer[start:end]
            start = end + 1
            if not line:
                if self._data:
                    events.append(Event(b"\n".join(self._data), self._event))
                self._data = []
                self._event = None
            elif line.startswith(b"data:"):
                value = line[5:]
                self._data.append(value[1:] if value.startswith(b" ") else value)
            elif line.startswith(b"event:"):
                self._event = line[6:].strip().decode("utf-8", "replace")
            # comments (":") and fields we do not use (id:, retry:) are skipped
        self._buffer = buffer[start:]
        return events

    def pending(self) -> bool:
        """True when an event was started but not ended: the stream was cut."""
        return bool(self._data or self._buffer.strip())


def frame(data: bytes, event: str | None = None) -> bytes:
    if event is None:
        return b"data: " + data + b"\n\n"
    return b"event: " + event.encode() + b"\ndata: " + data + b"\n\n"


DONE = b"data: [DONE]\n\n"
KEEPALIVE = b": keep-alive\n\n"
