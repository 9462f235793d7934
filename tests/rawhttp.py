"""Raw HTTP/1.1 over a socket, for requests no client library would send."""
from __future__ import annotations

import json
import socket
import time


class Answer:
    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        head, _, self.body = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split(" ")[1]) if lines[0].startswith("HTTP/") else 0
        self.headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            self.headers[name.strip().lower()] = value.strip()

    def json(self):
        return json.loads(self.body)

    def __repr__(self) -> str:
        return f"Answer({self.raw[:400]!r})"


def read_answer(sock: socket.socket, timeout: float = 10.0, *, head: bool = False) -> Answer:
    """Read one response (Content-Length framed, or up to the close). An answer to a HEAD
    (`head`), a 204 or a 304 has no body whatever its headers say (RFC 9112 6.3): it is returned
    once its head is in, instead of waiting out `timeout` for a body that never comes."""
    sock.settimeout(timeout)
    data = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if b"\r\n\r\n" in data:
            answer = Answer(data)
            if head or answer.status in (204, 304):
                return answer
            length = answer.headers.get("content-length")
            if length is not None and len(answer.body) >= int(length):
                return answer
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, TimeoutError, socket.timeout):
            break
        if not chunk:
            break
        data += chunk
    return Answer(data)


def exchange(port: int, data: bytes, timeout: float = 10.0) -> Answer:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        return read_answer(sock, timeout, head=data.startswith(b"HEAD "))


def request(method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    if body or method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def closed_by_peer(sock: socket.socket, timeout: float) -> bool:
    """Whether the server closes `sock` within `timeout` (reading whatever it says first)."""
    sock.settimeout(timeout)
    try:
        while True:
            if not sock.recv(65536):
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except (TimeoutError, socket.timeout):
        return False


# What each path's caller expects, written out here rather than taken from bridge/shapes.py.
OPENAI_PATHS = ("/v1/chat/completions", "/chat/completions", "/api/coding/paas/v4/chat/completions",
                "/api/paas/v4/chat/completions", "/v1/models", "/models", "/v1/responses",
                "/responses")
ANTHROPIC_PATHS = ("/v1/messages", "/messages", "/api/anthropic/v1/messages",
                   "/v1/messages/count_tokens")
ZAI_PATHS = ("/api/monitor/usage/quota/limit", "/api/monitor/usage/model-usage")


def expected_family(path: str) -> str:
    path = path.partition("?")[0]
    for family, paths in (("openai", OPENAI_PATHS), ("anthropic", ANTHROPIC_PATHS), ("zai", ZAI_PATHS)):
        if any(path == p or path.startswith(p + "/") for p in paths):
            return family
    if path.startswith(("/api/coding/paas/v4/", "/api/paas/v4/", "/v1/chat/")):
        return "openai"
    if path == "/v1/usage" or path.startswith(("/v1/usage/", "/v1/billing")):
        return "problem"  # the service's own API
    if path == "/v1" or path.startswith("/v1"):
        return "openai"  # any other /v1 path: a coding tool pointed at the wrong place (issue 11)
    if path.startswith("/api/anthropic/"):
        return "anthropic"
    if path.startswith("/api/monitor/"):
        return "zai"
    return "problem"


def assert_caller_shape(path: str, status: int, content_type: str, body: bytes) -> None:
    """A 4xx in the protocol `path` speaks: OpenAI, Anthropic, Z.ai or RFC 9457."""
    family = expected_family(path)
    document = json.loads(body)
    if family == "openai":
        assert 400 <= status < 500, (status, body)
        assert content_type.startswith("application/json"), content_type
        error = document["error"]
        assert set(error) == {"message", "type", "param", "code"}, document
        assert isinstance(error["message"], str) and error["message"]
        assert isinstance(error["type"], str) and error["type"]
    elif family == "anthropic":
        assert 400 <= status < 500, (status, body)
        assert content_type.startswith("application/json"), content_type
        assert document["type"] == "error", document
        assert set(document["error"]) >= {"type", "message"}, document
        assert document["error"]["message"]
    elif family == "zai":
        # Z.ai answers its own refusals with HTTP 200 and the outcome in the envelope
        assert status == 200 or 400 <= status < 500, (status, body)
        assert content_type.startswith("application/json"), content_type
        assert document["success"] is False, document
        assert 400 <= document["code"] < 500 or document["code"] >= 1000, document
        assert document["msg"] and "data" in document
    else:
        assert 400 <= status < 500, (status, body)
        assert content_type.startswith("application/problem+json"), content_type
        assert document["status"] == status and document["title"], document
