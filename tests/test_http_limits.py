"""The HTTP server's own limits, against a real `codeplan run` over raw sockets."""
from __future__ import annotations

import socket
import threading
import time
import urllib.request

import pytest

from .conftest import start_bridge
from .rawhttp import (Answer, assert_caller_shape, closed_by_peer, exchange, read_answer,
                      request)

LIMITS = dict(CODEPLAN_MAX_HEADER_BYTES="8192", CODEPLAN_MAX_BODY_BYTES="1000000",
              CODEPLAN_HEADER_TIMEOUT="2", CODEPLAN_BODY_TIMEOUT="2", CODEPLAN_KEEPALIVE_TIMEOUT="1")


@pytest.fixture(scope="module")
def limited(database, simulator):
    server = start_bridge(database, simulator.url + "/api/coding/paas/v4", **LIMITS)
    yield server
    server.stop()


def healthy(server) -> None:
    with urllib.request.urlopen(server.url + "/healthz", timeout=10) as response:
        assert response.status == 200


def shaped(path: str, answer: Answer, status: int) -> None:
    assert answer.status == status or (answer.status == 200 and status >= 400), answer
    assert answer.headers.get("connection") == "close", answer
    assert_caller_shape(path, status, answer.headers["content-type"], answer.body)


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages", "/api/anthropic/v1/messages",
                                  "/api/monitor/usage/quota/limit", "/v1/usage", "/nowhere"])
def test_oversized_headers_get_431_in_the_callers_shape(limited, path):
    answer = exchange(limited.port, request("GET", path, headers={"X-Big": "a" * 9000}))
    assert answer.status == 431, answer  # the HTTP layer's status, on Z.ai paths too
    shaped(path, answer, 431)
    healthy(limited)


def test_an_8_mb_header_is_cut_short_not_buffered(limited):
    """The answer arrives while the client is still sending: the server stopped at the limit."""
    sock = socket.create_connection(("127.0.0.1", limited.port))
    sock.sendall(b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nX-Huge: ")
    sent = 0
    refused = False
    sock.settimeout(0.05)
    while sent < 8 * 1024 * 1024:
        try:
            sock.sendall(b"a" * 65536)
        except (BrokenPipeError, ConnectionResetError):
            break
        sent += 65536
        try:
            if sock.recv(1, socket.MSG_PEEK):
                refused = True
                break
        except (TimeoutError, socket.timeout):
            pass
    answer = read_answer(sock)
    sock.close()
    assert refused and sent < 1024 * 1024, sent
    assert answer.status == 431
    shaped("/v1/messages", answer, 431)
    healthy(limited)


def test_a_long_url_gets_414(limited):
    path = "/v1/chat/completions?x=" + "a" * 9000
    answer = exchange(limited.port, request("POST", path, b"{}"))
    assert answer.status == 414, answer
    shaped("/v1/chat/completions", answer, 414)


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages", "/v1/messages/count_tokens",
                                  "/api/coding/paas/v4/chat/completions"])
def test_content_length_over_the_limit_is_refused_before_the_body_is_sent(limited, path):
    head = request("POST", path, headers={"Content-Length": "1000001", "Content-Type": "application/json",
                                           "Authorization": "Bearer cp_whoever"})
    with socket.create_connection(("127.0.0.1", limited.port)) as sock:
        sock.sendall(head.replace(b"Content-Length: 0\r\n", b""))  # headers only, no body at all
        answer = read_answer(sock)
    assert answer.status == 413, answer
    shaped(path, answer, 413)
    if path.startswith("/v1/messages"):
        assert answer.json()["error"]["type"] == "request_too_large"
    healthy(limited)


def test_a_client_busy_writing_a_big_body_still_reads_the_413(limited):
    body = b"x" * 3_000_000
    with socket.create_connection(("127.0.0.1", limited.port)) as sock:
        # the whole body is written, as most clients do, before the answer is read
        writer = threading.Thread(target=lambda: _send_quietly(sock, request("POST", "/v1/messages", body)))
        writer.start()
        answer = read_answer(sock)
        writer.join()
    assert answer.status == 413, answer
    shaped("/v1/messages", answer, 413)


def _send_quietly(sock: socket.socket, data: bytes) -> None:
    try:
        sock.sendall(data)
    except OSError:
        pass


def test_a_chunked_body_is_refused_when_it_passes_the_limit(limited, key):
    chunk = b"10000\r\n" + b"a" * 0x10000 + b"\r\n"
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + key.encode() + b"\r\n"
            b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
    with socket.create_connection(("127.0.0.1", limited.port)) as sock:
        writer = threading.Thread(target=lambda: _send_quietly(sock, head + chunk * 40 + b"0\r\n\r\n"))
        writer.start()
        answer = read_answer(sock)
        writer.join()
    assert answer.status == 413, answer
    shaped("/v1/chat/completions", answer, 413)
    healthy(limited)


def test_a_body_under_the_limit_reaches_the_application(limited, key):
    body = b'{"model": "glm-4.6", "max_tokens": 8, "messages": [{"role": "user", "content": "' \
        + b"word " * 180_000 + b'"}]}'
    assert 900_000 < len(body) < 1_000_000
    answer = exchange(limited.port, request("POST", "/v1/chat/completions", body, headers={
        "Content-Type": "application/json", "Authorization": f"Bearer {key}"}), timeout=60)
    assert answer.status == 200, answer
    assert answer.json()["usage"]["prompt_tokens"] > 100_000


def test_unknown_method_gets_400_in_the_callers_shape(limited):
    for path in ("/v1/messages", "/v1/chat/completions", "/v1/usage"):
        answer = exchange(limited.port, f"BREW {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert answer.status == 400, answer
        shaped(path, answer, 400)
    healthy(limited)
    # one line per malformed request would let anyone fill the disk: the refusals are tallied
    assert "Invalid HTTP request received" not in limited.output()
    assert "requests refused by the HTTP limits" in limited.output()


def test_a_head_that_never_finishes_gets_408_and_is_closed(limited):
    with socket.create_connection(("127.0.0.1", limited.port)) as sock:
        sock.sendall(b"POST /v1/messages HTTP/1.1\r\nHost: x\r\n")
        started = time.monotonic()
        answer = read_answer(sock, timeout=15)
        waited = time.monotonic() - started
        assert closed_by_peer(sock, 5)
    assert answer.status == 408, answer
    shaped("/v1/messages", answer, 408)
    assert 1.5 < waited < 10, waited


def test_a_body_that_never_finishes_gets_408(limited, key):
    with socket.create_connection(("127.0.0.1", limited.port)) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + key.encode() + b"\r\n"
                     b"Content-Length: 100\r\n\r\n{\"model\"")
        answer = read_answer(sock, timeout=15)
    assert answer.status == 408, answer
    shaped("/v1/chat/completions", answer, 408)


def test_an_idle_kept_alive_connection_is_closed(limited):
    with socket.create_connection(("127.0.0.1", limited.port)) as sock:
        sock.sendall(request("GET", "/healthz"))
        assert read_answer(sock).status == 200
        started = time.monotonic()
        assert closed_by_peer(sock, 10)
        assert time.monotonic() - started < 8


def test_slowloris_connections_are_all_closed(database, simulator):
    """300 connections that dribble their headers a byte at a time are all closed by the server."""
    server = start_bridge(database, simulator.url + "/api/coding/paas/v4", CODEPLAN_HEADER_TIMEOUT="2")
    try:
        sockets = []
        for _ in range(300):
            sock = socket.create_connection(("127.0.0.1", server.port))
            sock.sendall(b"POST /v1/messages HTTP/1.1\r\nHost: x\r\n")
            sockets.append(sock)
        open_ = set(range(300))
        deadline = time.monotonic() + 20
        while open_ and time.monotonic() < deadline:
            for i in list(open_):
                try:
                    sockets[i].sendall(b"X")  # one more byte of a header that never ends
                except OSError:
                    open_.discard(i)
                    continue
                sockets[i].setblocking(False)
                try:
                    if sockets[i].recv(65536) == b"":
                        open_.discard(i)
                except BlockingIOError:
                    pass
                except OSError:
                    open_.discard(i)
            time.sleep(0.2)
        for sock in sockets:
            sock.close()
        assert not open_, f"{len(open_)} of 300 slow connections still open after 20 s"
        healthy(server)
    finally:
        server.stop()


def test_connections_past_the_limit_get_503_then_are_closed_at_once(database, simulator):
    server = start_bridge(database, simulator.url + "/api/coding/paas/v4", CODEPLAN_MAX_CONNECTIONS="20",
                          CODEPLAN_HEADER_TIMEOUT="10")
    idle = []
    try:
        for _ in range(20):
            idle.append(socket.create_connection(("127.0.0.1", server.port)))
        time.sleep(0.3)
        answer = exchange(server.port, request("POST", "/v1/messages", b"{}"))
        assert answer.status == 503, answer
        assert answer.headers["retry-after"] == "1"
        assert answer.json()["error"]["type"] == "overloaded_error"
        # past max + max(16, max/8), new connections are closed without a word
        for _ in range(20):
            idle.append(socket.create_connection(("127.0.0.1", server.port)))
        time.sleep(0.3)
        late = socket.create_connection(("127.0.0.1", server.port))
        assert closed_by_peer(late, 5)
        late.close()
        for sock in idle:
            sock.close()
        time.sleep(0.5)
        healthy(server)
    finally:
        for sock in idle:
            sock.close()
        server.stop()
