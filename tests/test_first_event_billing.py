"""The router's look at a stream's first event, through the bridge over real HTTP: a client
leaving at each moment around the first event billed as it should be, headers and keep-alives
in time, a whole answer in one read billed once (a reviewer's probes, kept)."""
from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from .conftest import free_port, new_user, query, run, start_bridge, wait_settled

USAGE = {"prompt_tokens": 50, "completion_tokens": 7, "total_tokens": 57}


def _chunk(content=None, finish=None, usage=None) -> bytes:
    body = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "glm-4.6",
            "choices": [{"index": 0, "delta": {"content": content} if content else {}, "finish_reason": finish}]}
    if usage:
        body["usage"] = usage
    return b"data: " + json.dumps(body).encode() + b"\n\n"


WHOLE = _chunk("Hello there") + _chunk(None, "stop", USAGE) + b"data: [DONE]\n\n"


class _Scripted(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    closed: list[str] = []

    def log_message(self, *a):
        pass

    def do_GET(self):
        self.send_response(200)
        self.send_header("content-length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def _watch_close(self, mode: str, seconds: float) -> None:
        """Wait `seconds`, noting whether the bridge closed the connection meanwhile."""
        self.connection.settimeout(seconds)
        try:
            if self.connection.recv(1) == b"":
                _Scripted.closed.append(mode)
                return
        except (socket.timeout, OSError):
            pass

    def do_POST(self):
        said = self.rfile.read(int(self.headers.get("content-length") or 0)).decode()
        if "late200" in said:
            self._watch_close("late200", 2.5)
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        if "whole" in said:
            self.send_header("content-length", str(len(WHOLE)))
            self.end_headers()
            self.wfile.write(WHOLE)
            self.wfile.flush()
            return
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        self.wfile.flush()
        if "latefirst" in said:
            self._watch_close("latefirst", 4.0)
        try:
            for piece in (_chunk("Hello"), _chunk(None, "stop", USAGE), b"data: [DONE]\n\n"):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except OSError:
            pass


@pytest.fixture(scope="module")
def bridge(database):
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), _Scripted)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    b = start_bridge(database, f"http://127.0.0.1:{server.server_address[1]}/v1", CODEPLAN_UPSTREAM_KEYS="k1",
                     CODEPLAN_HEADER_WAIT="3", CODEPLAN_KEEPALIVE_INTERVAL="10")
    yield b
    b.stop()
    server.shutdown()


def _rows(database, key):
    wait_settled(database)
    return [dict(r) for r in run(query(database, "SELECT l.state, l.settle_reason, l.prompt_tokens, l.completion_tokens,"
                                                 " l.estimated FROM usage_ledger l JOIN api_keys k ON k.id = l.api_key_id"
                                                 " WHERE k.prefix = $1", key[:10]))]


def _leave_after(url, key, content, seconds):
    """Send a stream request and drop the connection after `seconds`, whatever came."""
    body = json.dumps({"model": "glm-4.6", "stream": True, "messages": [{"role": "user", "content": content}]}).encode()
    host, port = url.removeprefix("http://").split(":")
    s = socket.create_connection((host, int(port)))
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
              b"authorization: Bearer " + key.encode() + b"\r\ncontent-length: " + str(len(body)).encode()
              + b"\r\n\r\n" + body)
    time.sleep(seconds)
    s.settimeout(0.01)
    try:
        got = s.recv(65536)
    except OSError:
        got = b""
    s.close()
    return got


def test_leaving_before_the_200_is_voided_and_the_upstream_stopped(bridge, database):
    key = new_user(database)
    got = _leave_after(bridge.url, key, "late200", 1.0)
    assert got == b"", got  # no headers yet: inside the header wait
    time.sleep(2.0)
    rows = _rows(database, key)
    assert [(r["state"], r["settle_reason"]) for r in rows] == [("voided", "client left before the upstream answered")], rows


def test_leaving_between_the_200_and_the_first_event_inside_the_header_wait_pays_the_prompt(bridge, database):
    key = new_user(database)
    _Scripted.closed.clear()
    got = _leave_after(bridge.url, key, "latefirst", 1.0)
    assert got == b"", got  # no headers yet: inside the header wait
    time.sleep(1.0)
    rows = _rows(database, key)
    assert [(r["state"], r["settle_reason"], r["estimated"]) for r in rows] == [
        ("posted", "client left before the first token", True)], rows
    time.sleep(3.5)
    assert "latefirst" in _Scripted.closed, _Scripted.closed  # the upstream was told (connection closed)


def test_headers_and_first_byte_within_the_header_wait(bridge, database):
    key = new_user(database)
    started = time.monotonic()
    with httpx.stream("POST", bridge.url + "/v1/chat/completions", timeout=60, headers={"authorization": f"Bearer {key}"},
                      json={"model": "glm-4.6", "stream": True,
                            "messages": [{"role": "user", "content": "latefirst"}]}) as answer:
        headers_at = time.monotonic() - started
        it = answer.iter_raw()
        first = next(it)
        first_at = time.monotonic() - started
        rest = first + b"".join(it)
    assert answer.status_code == 200
    assert headers_at < 3.6 and first_at < 3.6, (headers_at, first_at)
    assert b"Hello" in rest and rest.rstrip().endswith(b"data: [DONE]"), rest
    rows = _rows(database, key)
    assert [(r["state"], r["prompt_tokens"], r["completion_tokens"], r["estimated"]) for r in rows] == [
        ("posted", 50, 7, False)], rows


def test_a_whole_answer_in_one_read_then_closed(bridge, database):
    key = new_user(database)
    answer = httpx.post(bridge.url + "/v1/chat/completions", timeout=60, headers={"authorization": f"Bearer {key}"},
                        json={"model": "glm-4.6", "stream": True, "messages": [{"role": "user", "content": "whole"}]})
    assert answer.status_code == 200 and "Hello there" in answer.text and answer.text.rstrip().endswith("[DONE]"), answer.text
    rows = _rows(database, key)
    assert [(r["state"], r["prompt_tokens"], r["completion_tokens"], r["estimated"]) for r in rows] == [
        ("posted", 50, 7, False)], rows
