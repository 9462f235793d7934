"""Server-sent events framing, incremental and without I/O: bytes in, events out, and back."""
from __future__ import annotations

import logging

import msgspec

log = logging.getLogger("codeplan.sse")

# The longest line (and the largest event, its `data:` lines together) a decoder holds. An
# upstream's chunk is one delta, a few KB; the largest honest one is a whole tool call in a single
# delta, bounded by the model's output cap (128K tokens: a few MB even fully escaped). Past this
# the upstream is broken or hostile: the stream ends as broken (`TOO_LONG`) instead of buffering
# without end. Our own Responses events echo the request's instructions and tools (up to the body
# limit, 32 MB by default): a decoder of the bridge's own output is made with `max_line=None`.
MAX_LINE = 16 * 1024 * 1024

# what a decoder says when the cap is passed: a failure in the shape OpenAI-style servers report
# one mid-stream (vLLM, SGLang: `data: {"error": {...}}`, then `[DONE]`), so the stream's reader
# ends the answer as broken, with an error event for the client, as for theirs
TOO_LONG = (b'{"error": {"message": "The model provider sent an event longer than the bridge accepts.", '
            b'"type": "line_too_long", "code": "line_too_long"}}')


class Event(msgspec.Struct, frozen=True):
    data: bytes
    event: str | None = None


class SSEDecoder:
    """Feed it bytes as they arrive; it returns the events completed so far.

    Follows the WHATWG rules that matter here: CRLF, CR or LF line ends, `data:` lines joined
    with newlines, `event:` names, comment lines (`:`) ignored, a blank line ends an event.

    Each byte is scanned once, when it arrives: an unfinished line waits as its pieces, joined
    once its end comes (an enormous line costs linear time, not a re-scan per read). A line or
    event longer than `max_line` ends the stream: its events so far, then `TOO_LONG` and
    `[DONE]`; whatever comes after is dropped.
    """

    __slots__ = ("_partial", "_partial_size", "_data", "_size", "_event", "_after_cr", "_max", "_over", "held")

    def __init__(self, max_line: int | None = MAX_LINE) -> None:
        self._partial: list[bytes] = []  # the unfinished line, in pieces
        self._partial_size = 0
        self._data: list[bytes] = []
        self._size = 0  # the bytes of `_data`
        self._event: str | None = None
        # the last piece ended with a CR, taken as a line end: an LF first in the next is its pair
        self._after_cr = False
        self._max = max_line
        self._over = False
        # what the reader of its events keeps from one event to the next, with the stream's own
        # state (bridge/flight.py `chunks`: a chunk whose string ends with half a surrogate pair);
        # the framing never looks at it
        self.held: object = None

    def feed(self, chunk: bytes) -> list[Event]:
        if self._over or not chunk:
            return []
        if self._after_cr:
            self._after_cr = False
            if chunk.startswith(b"\n"):
                chunk = chunk[1:]
        if b"\r" in chunk:
            self._after_cr = chunk.endswith(b"\r")
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        end = chunk.find(b"\n")
        limit = self._max
        if end < 0:
            if chunk:
                self._partial.append(chunk)
                self._partial_size += len(chunk)
                if limit is not None and self._partial_size > limit:
                    return self._too_long([])
            return []
        if self._partial:
            end += self._partial_size
            self._partial.append(chunk)
            buffer = b"".join(self._partial)
            self._partial = []
            self._partial_size = 0
        else:
            buffer = chunk
        events: list[Event] = []
        start = 0
        while end >= 0:
            if limit is not None and end - start > limit:
                return self._too_long(events)
            line = buffer[start:end]
            start = end + 1
            if not line:
                if self._data:
                    events.append(Event(b"\n".join(self._data), self._event))
                self._data = []
                self._size = 0
                self._event = None
            elif line.startswith(b"data:"):
                value = line[5:]
                value = value[1:] if value.startswith(b" ") else value
                self._data.append(value)
                self._size += len(value) + 1
                if limit is not None and self._size > limit:
                    return self._too_long(events)
            elif line.startswith(b"event:"):
                self._event = line[6:].strip().decode("utf-8", "replace")
            # comments (":") and fields we do not use (id:, retry:) are skipped
            end = buffer.find(b"\n", start)
        if start < len(buffer):
            tail = buffer[start:]
            self._partial.append(tail)
            self._partial_size = len(tail)
            if limit is not None and self._partial_size > limit:
                return self._too_long(events)
        return events

    def _too_long(self, events: list[Event]) -> list[Event]:
        log.warning("upstream event too long; stream ended as broken", extra={"limit": self._max})
        self._over = True
        self._partial = []
        self._partial_size = 0
        self._data = []
        self._size = 0
        events.append(Event(TOO_LONG))
        events.append(Event(b"[DONE]"))
        return events

    def pending(self) -> bool:
        """True when an event was started but not ended: the stream was cut."""
        return bool(self._data or any(piece.strip() for piece in self._partial))


def frame(data: bytes, event: str | None = None) -> bytes:
    if event is None:
        return b"data: " + data + b"\n\n"
    return b"event: " + event.encode() + b"\ndata: " + data + b"\n\n"


DONE = b"data: [DONE]\n\n"
KEEPALIVE = b": keep-alive\n\n"
