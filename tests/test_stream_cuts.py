"""How a stream ends when the upstream's connection does something other than close cleanly
after the answer: reset after its last event (a proxy, a load balancer), kept open after
`[DONE]`, or kept busy with comment pings while nothing comes. Each case was proven wrong by a
hunt: the first told the client the answer broke off (it retried and paid twice), the second
held the client for the whole silence limit, the third left the client without a byte and was
never taken for silence."""
from __future__ import annotations

import json
import socket
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from .conftest import free_port, new_user, query, run, start_bridge, wait_settled


def chunk(delta=None, finish=None, usage=None) -> bytes:
    body = {"id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 1, "model": "glm-4.6",
            "choices": [{"index": 0, "delta": delta or {}, "finish_reason": finish}]}
    if usage is not None:
        body["usage"] = usage
    return b"data: " + json.dumps(body).encode() + b"\n\n"


USAGE = {"prompt_tokens": 50, "completion_tokens": 7, "total_tokens": 57}
PIECES = {
    # GLM's shape: finish_reason and usage on the last chunk, then [DONE]
    "with_done": [chunk({"role": "assistant", "content": "Hello there, all done."}),
                  chunk({}, "stop", USAGE), b"data: [DONE]\n\n"],
    "without_done": [chunk({"role": "assistant", "content": "Hello there, all done."}),
                     chunk({}, "stop", USAGE)],
}


class _Upstream(BaseHTTPRequestHandler):
    """An upstream on 127.0.0.1: HTTP/1.1, quiet, and a health check the bridge may probe."""
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def do_GET(self):
        self.send_response(200)
        self.send_header("content-length", "2")
        self.end_headers()
        self.wfile.write(b"ok")


class _Cut(_Upstream):
    """Chunked transfer encoding, cut without its last (zero) chunk: the connection reset by a
    proxy or load balancer after the answer's last event."""

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers.get("content-length") or 0)))
        said = json.dumps(body["messages"])
        name = "with_done" if "with_done" in said else "without_done"
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        for piece in PIECES[name]:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            self.wfile.flush()
            time.sleep(0.02)
        time.sleep(0.1)
        if "hang" in said:  # the answer is whole ([DONE] sent); the connection is just not closed
            time.sleep(20)
        # reset, not the zero chunk
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.connection.close()
        self.close_connection = True


@pytest.fixture(scope="module")
def cut_bridge(database):
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), _Cut)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    bridge = start_bridge(database, f"http://127.0.0.1:{server.server_address[1]}/v1", CODEPLAN_UPSTREAM_KEYS="k1")
    yield bridge
    bridge.stop()
    server.shutdown()


def _entry(database, key):
    wait_settled(database)
    return run(query(database, "SELECT l.* FROM usage_ledger l JOIN api_keys k ON k.id = l.api_key_id"
                               " WHERE k.prefix = $1 ORDER BY l.created_at DESC LIMIT 1", key[:10]))[0]


@pytest.mark.parametrize("name", ["with_done", "without_done"])
def test_a_whole_answer_cut_after_its_last_event_is_delivered_whole(cut_bridge, database, name):
    key = new_user(database)
    answer = httpx.post(cut_bridge.url + "/v1/chat/completions", timeout=60, headers={"authorization": f"Bearer {key}"},
                        json={"model": "glm-4.6", "stream": True, "messages": [{"role": "user", "content": f"{name} hi"}]})
    entry = _entry(database, key)
    print(answer.text)
    print(entry["state"], entry["prompt_tokens"], entry["completion_tokens"], entry["billed_tokens"], entry["estimated"])
    assert "[DONE]" in answer.text and '"error"' not in answer.text, (
        f"the client was told the answer broke off although the upstream finished it "
        f"(finish_reason stop + usage{' + [DONE]' if name == 'with_done' else ''}); "
        f"billed {entry['billed_tokens']} at the upstream's usage all the same: {answer.text[-220:]}")


@pytest.mark.parametrize("name", ["with_done"])
def test_messages_whole_answer_cut_after_its_last_event(cut_bridge, database, name):
    key = new_user(database)
    answer = httpx.post(cut_bridge.url + "/v1/messages", timeout=60,
                        headers={"x-api-key": key, "anthropic-version": "2023-06-01"},
                        json={"model": "glm-4.6", "max_tokens": 100, "stream": True,
                              "messages": [{"role": "user", "content": f"{name} hi"}]})
    entry = _entry(database, key)
    assert "message_stop" in answer.text and "event: error" not in answer.text, (entry["billed_tokens"], answer.text[-300:])


def test_a_whole_answer_is_not_held_until_the_upstream_closes(database):
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), _Cut)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    bridge = start_bridge(database, f"http://127.0.0.1:{server.server_address[1]}/v1", CODEPLAN_UPSTREAM_KEYS="k1",
                          CODEPLAN_KEEPALIVE_INTERVAL="2", CODEPLAN_UPSTREAM_TIMEOUT="6")
    try:
        key = new_user(database)
        started = time.monotonic()
        answer = httpx.post(bridge.url + "/v1/chat/completions", timeout=60, headers={"authorization": f"Bearer {key}"},
                            json={"model": "glm-4.6", "stream": True,
                                  "messages": [{"role": "user", "content": "with_done hang hi"}]})
        took = time.monotonic() - started
    finally:
        bridge.stop()
        server.shutdown()
    assert took < 3 and "[DONE]" in answer.text, (f"{took:.1f}s", answer.text[-200:])


PING_FOR = 20.0


class _Pinging(_Upstream):
    """Only SSE comments, once a second: a proxy's pings while its backend hangs."""

    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length") or 0))
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("connection", "close")
        self.end_headers()
        end = time.monotonic() + PING_FOR
        try:
            while time.monotonic() < end:
                self.wfile.write(b": OPENROUTER PROCESSING\n\n")
                self.wfile.flush()
                time.sleep(1.0)
        except OSError:
            return
        self.close_connection = True


def test_an_upstream_sending_only_comments_is_neither_silent_to_the_client_nor_waited_on_for_ever(database):
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), _Pinging)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    bridge = start_bridge(database, f"http://127.0.0.1:{server.server_address[1]}/v1", CODEPLAN_UPSTREAM_KEYS="k1",
                          CODEPLAN_KEEPALIVE_INTERVAL="2", CODEPLAN_UPSTREAM_TIMEOUT="6")
    arrivals: list[tuple[float, bytes]] = []
    try:
        key = new_user(database)
        started = time.monotonic()
        with httpx.stream("POST", bridge.url + "/v1/chat/completions", timeout=60,
                          headers={"authorization": f"Bearer {key}"},
                          json={"model": "glm-4.6", "stream": True, "messages": [{"role": "user", "content": "hi"}]}) as r:
            for piece in r.iter_raw():
                arrivals.append((round(time.monotonic() - started, 1), piece[:60]))
        took = time.monotonic() - started
    finally:
        bridge.stop()
        server.shutdown()
    print(took, arrivals)
    gaps = [b[0] - a[0] for a, b in zip([(0.0, b"")] + arrivals, arrivals)]
    assert max(gaps) < 5 and took < 12, (
        f"keep-alive 2 s, upstream timeout 6 s: the client's longest wait for a byte was {max(gaps):.1f}s, "
        f"the stream ended after {took:.1f}s (the upstream pinged for {PING_FOR:.0f}s, sent nothing else): {arrivals}")


class _RefusingIn200(_Upstream):
    """Refusals inside a 200 (llama-server, LiteLLM and some proxies say errors so): an error as
    a stream's first event, or a whole answer that is only `{"error": ...}`."""

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers.get("content-length") or 0)))
        if body.get("stream"):
            out = (b'data: {"error": {"object": "error", "message": "Too many requests", "type": "RateLimitError",'
                   b' "code": 429}}\n\ndata: [DONE]\n\n')
            kind = "text/event-stream"
        else:
            out = b'{"error": {"code": "1301", "message": "System detected potentially unsafe content"}}'
            kind = "application/json"
        self.send_response(200)
        self.send_header("content-type", kind)
        self.send_header("content-length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)


@pytest.fixture(scope="module")
def refusing_bridge(database):
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), _RefusingIn200)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    bridge = start_bridge(database, f"http://127.0.0.1:{server.server_address[1]}/v1", CODEPLAN_UPSTREAM_KEYS="k1")
    yield bridge
    bridge.stop()
    server.shutdown()


def test_a_stream_whose_first_event_is_an_error_is_not_billed(refusing_bridge, database):
    key = new_user(database)
    answer = httpx.post(refusing_bridge.url + "/v1/chat/completions", timeout=60,
                        headers={"authorization": f"Bearer {key}"},
                        json={"model": "glm-4.6", "stream": True, "messages": [{"role": "user", "content": "hi"}]})
    # routed as the same refusal with its status (bridge/upstreams.py `_first_event`): a 429
    assert answer.status_code == 429 and '"error"' in answer.text and "[DONE]" not in answer.text
    entry = _entry(database, key)
    assert (entry["state"], entry["billed_tokens"]) == ("voided", 0)


def test_a_whole_answer_that_is_a_refusal_is_told_as_one_and_not_billed(refusing_bridge, database):
    key = new_user(database)
    answer = httpx.post(refusing_bridge.url + "/v1/chat/completions", timeout=60,
                        headers={"authorization": f"Bearer {key}"},
                        json={"model": "glm-4.6", "messages": [{"role": "user", "content": "hi"}]})
    assert answer.status_code == 400 and answer.json()["error"]["code"] == "1301", answer.text
    assert answer.headers.get("x-should-retry") != "true"
    entry = _entry(database, key)
    assert (entry["state"], entry["billed_tokens"]) == ("voided", 0)


class _SlowPings(_Upstream):
    """Comment pings just under the keep-alive interval: each read waited a whole interval
    afresh, so the client went ~2x the interval without a byte (a review proved it)."""

    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length") or 0))
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("connection", "close")
        self.end_headers()
        try:
            # two are enough: a read that waited the interval afresh left the client 3.8 s
            # without a byte, past the test's 3 s
            for _ in range(2):
                time.sleep(1.9)  # just under the 2 s keep-alive interval
                self.wfile.write(b": PROCESSING\n\n")
                self.wfile.flush()
            for piece in (chunk({"role": "assistant", "content": "Hi."}), chunk({}, "stop", USAGE), b"data: [DONE]\n\n"):
                self.wfile.write(piece)
                self.wfile.flush()
        except OSError:
            return
        self.close_connection = True


class _EmptyEvents(_Upstream):
    """Whole events that give the client nothing (an empty delta, as a tool call held by the
    normaliser does): `heard` moves, `told` does not, and no keep-alive is ever checked."""

    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length") or 0))
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("connection", "close")
        self.end_headers()
        try:
            # three are enough: no keep-alive checked left the client 4.5 s without a byte
            for _ in range(3):
                time.sleep(1.5)
                self.wfile.write(chunk({}))
                self.wfile.flush()
            for piece in (chunk({"role": "assistant", "content": "Hi."}), chunk({}, "stop", USAGE), b"data: [DONE]\n\n"):
                self.wfile.write(piece)
                self.wfile.flush()
        except OSError:
            return
        self.close_connection = True


@pytest.mark.parametrize("upstream", [_SlowPings, _EmptyEvents], ids=["pings", "empty_events"])
def test_client_is_kept_alive_within_the_interval(database, upstream):
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), upstream)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    bridge = start_bridge(database, f"http://127.0.0.1:{server.server_address[1]}/v1", CODEPLAN_UPSTREAM_KEYS="k1",
                          CODEPLAN_KEEPALIVE_INTERVAL="2", CODEPLAN_UPSTREAM_TIMEOUT="30")
    arrivals = []
    try:
        key = new_user(database)
        started = time.monotonic()
        with httpx.stream("POST", bridge.url + "/v1/chat/completions", timeout=60,
                          headers={"authorization": f"Bearer {key}"},
                          json={"model": "glm-4.6", "stream": True, "messages": [{"role": "user", "content": "hi"}]}) as r:
            for piece in r.iter_raw():
                arrivals.append((round(time.monotonic() - started, 2), piece[:40]))
    finally:
        bridge.stop()
        server.shutdown()
    gaps = [b[0] - a[0] for a, b in zip([(0.0, b"")] + arrivals, arrivals)]
    assert max(gaps) < 3.0, f"keep-alive interval 2 s; the client waited {max(gaps):.1f}s for a byte: {arrivals}"
