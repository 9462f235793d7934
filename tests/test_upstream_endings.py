"""How an OpenAI-style upstream (vLLM, SGLang, a gateway) ends an answer and says its reasoning,
and what every surface makes of it: vLLM's `abort` and `error` finish reasons are a broken answer,
never a whole one; `content_filter` is the filter's ending; vLLM's `reasoning` field (its name for
`reasoning_content` since late 2025) reaches the client and the meter; an enormous SSE line costs
linear time and, past the cap, ends the stream as broken."""
from __future__ import annotations

import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from bridge import glm, sse, tokens, wire
from bridge.errors import Kind
from bridge.flight import chunks
from bridge.metering import StreamMeter
from bridge.surfaces import chat, messages

from .conftest import free_port, new_user, query, run, start_bridge, wait_settled
from .test_translators import translate


def _chunk(delta: dict | None = None, finish: str | None = None, usage: dict | None = None) -> bytes:
    body: dict = {"id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 1, "model": "glm-4.6",
                  "choices": [{"index": 0, "delta": delta or {}, "finish_reason": finish}]}
    if usage is not None:
        body["usage"] = usage
    return b"data: " + json.dumps(body).encode() + b"\n\n"


def _usage(prompt: int = 50, completion: int = 7) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _decoded(*pieces: bytes) -> list[wire.Chunk]:
    decoder = sse.SSEDecoder()
    return [c for piece in pieces for c in chunks(decoder, piece)]


# ---- finish reasons -----------------------------------------------------------------------------

@pytest.mark.parametrize("finish, code", [("abort", "upstream_abort"), ("error", "upstream_failed"),
                                          ("network_error", "network_error")])
def test_an_answer_the_engine_aborted_or_failed_is_broken(finish, code):
    """vLLM ends a request it dropped (preempted, out of KV cache, its deadline) with `abort`, and
    one that failed with `error`; SGLang says `abort`. Both were delivered as a whole `stop`."""
    normalizer = glm.StreamNormalizer("c_")
    normalizer.feed(wire.Chunk(choices=[wire.ChunkChoice(delta=wire.Delta(content="Here is the first half"))]))
    normalizer.feed(wire.Chunk(choices=[wire.ChunkChoice(finish_reason=finish)]))
    normalizer.done()
    outcome = normalizer.close()[1]
    assert outcome.error is not None and outcome.error.kind is Kind.upstream_error
    assert outcome.error.code == code and finish in outcome.error.message


@pytest.mark.parametrize("finish", ["abort", "error"])
def test_an_aborted_stream_is_an_error_on_chat_and_messages(finish):
    pieces = [_chunk({"role": "assistant", "content": "Here is the first half of the ans"}),
              _chunk({}, finish), _chunk(usage=_usage()), sse.DONE]
    out, _ = translate(_decoded(*pieces), chat.ChatStream("glm-4.6", "a1"))
    events = sse.SSEDecoder().feed(out)
    assert events[-1].data != b"[DONE]" and json.loads(events[-1].data)["error"]["type"] == "server_error"
    assert not any(b'"finish_reason":"stop"' in e.data for e in events)
    out, _ = translate(_decoded(*pieces), messages.MessagesStream("glm-4.6", "a2", 10))
    events = sse.SSEDecoder().feed(out)
    assert events[-1].event == "error" and json.loads(events[-1].data)["error"]["type"] == "api_error"
    assert not any(e.event == "message_delta" for e in events)  # never a stop_reason


def test_a_whole_answer_the_engine_aborted_is_broken():
    completion = wire.completion_decoder.decode(json.dumps({"id": "c", "choices": [{
        "index": 0, "finish_reason": "abort", "message": {"role": "assistant", "content": "Here is the first"}}],
        "usage": _usage()}))
    outcome = glm.completion_events(completion, "c_")[1]
    assert outcome.error is not None and outcome.error.code == "upstream_abort"


def test_an_openai_style_content_filter_is_the_filters_ending():
    normalizer = glm.StreamNormalizer("c_")
    normalizer.feed(wire.Chunk(choices=[wire.ChunkChoice(delta=wire.Delta(content="x"), finish_reason="content_filter")]))
    assert normalizer.close()[1] == glm.Outcome(reason=glm.CONTENT_FILTER)


def test_an_unknown_finish_reason_is_a_natural_end_logged_once(caplog):
    with caplog.at_level(logging.WARNING, logger="codeplan.glm"):
        for _ in range(3):
            normalizer = glm.StreamNormalizer("c_")
            normalizer.feed(wire.Chunk(choices=[wire.ChunkChoice(delta=wire.Delta(content="x"),
                                                                 finish_reason="a_reason_from_2027")]))
            assert normalizer.close()[1] == glm.Outcome(reason=glm.STOP)
    said = [r for r in caplog.records if getattr(r, "finish_reason", None) == "a_reason_from_2027"]
    assert len(said) == 1


# ---- vLLM's `reasoning` -------------------------------------------------------------------------

def test_vllms_reasoning_field_is_reasoning_and_is_metered():
    """vLLM renamed `reasoning_content` to `reasoning` (Nov 2025) and removed the old name (Jan
    2026): its thinking was dropped on every surface, and the meter did not count it."""
    [first, second] = _decoded(_chunk({"role": "assistant", "reasoning": "Let me think about it carefully."}),
                               _chunk({"content": "Hello!"}, "stop"))
    normalizer = glm.StreamNormalizer("c_")
    meter = StreamMeter()
    events = []
    for chunk in (first, second):
        meter.observe(chunk, delivered=True)
        events += normalizer.feed(chunk)
    assert events == [glm.Reasoning("Let me think about it carefully."), glm.Text("Hello!")]
    assert meter.reasoning_tokens() > 0 and meter.delivered_tokens() > meter.reasoning_tokens()
    out, _ = translate([first, second], messages.MessagesStream("glm-4.6", "v1", 10))
    assert b"thinking_delta" in out and b"think about it" in out


def test_a_vllm_sending_both_names_is_read_once():
    """A vLLM of the transition sends the same text under both names."""
    [chunk] = _decoded(_chunk({"reasoning_content": "Same thought.", "reasoning": "Same thought."}))
    meter = StreamMeter()
    meter.observe(chunk, delivered=True)
    assert glm.StreamNormalizer("c_").feed(chunk) == [glm.Reasoning("Same thought.")]
    assert meter.delivered_tokens() == meter.reasoning_tokens() == tokens.count("Same thought.")


def test_a_whole_answers_reasoning_under_vllms_name_is_read():
    completion = wire.completion_decoder.decode(json.dumps({"id": "c", "choices": [{
        "index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "Hello!",
                                                         "reasoning": "Let me think."}}], "usage": _usage()}))
    assert completion.choices[0].message.reasoning_content == "Let me think."  # what every reader reads
    events, outcome = glm.completion_events(completion, "c_")
    assert glm.Answer(events).reasoning == "Let me think." and outcome.complete


def test_our_own_chunks_never_carry_the_second_name():
    assert b"reasoning\"" not in wire.encoder.encode(wire.Delta(reasoning_content="x")).replace(b"reasoning_content", b"")


# ---- an enormous line -----------------------------------------------------------------------------

def test_an_enormous_line_costs_linear_time():
    """Each read re-scanned (and copied) the whole unfinished line: a 15 MB line in 64 KB reads
    took seconds of the event loop (quadratic: 1.4 s at 8 MB), every stream stalled meanwhile."""
    decoder = sse.SSEDecoder()
    piece = b"x" * 65536
    started = time.perf_counter()
    decoder.feed(b"data: ")
    for _ in range(15 * 16):
        assert decoder.feed(piece) == []
    [event] = decoder.feed(b"\r\n\r\n")
    took = time.perf_counter() - started
    assert len(event.data) == 15 * 1024 * 1024 and took < 1.0, took


def test_a_decoder_of_our_own_output_may_take_longer_lines():
    """The bridge's own Responses events echo the request's instructions and tools (up to the
    body limit): a decoder of them is made without the cap."""
    decoder = sse.SSEDecoder(max_line=None)
    line = b"data: " + b"x" * (sse.MAX_LINE + 1) + b"\n\n"
    [event] = [e for i in range(0, len(line), 1 << 20) for e in decoder.feed(line[i:i + (1 << 20)])]
    assert len(event.data) == sse.MAX_LINE + 1


@pytest.mark.parametrize("how", ["one line", "many data lines"])
def test_a_line_past_the_cap_ends_the_stream_as_broken(how, caplog):
    decoder = sse.SSEDecoder()
    got = decoder.feed(_chunk({"role": "assistant", "content": "Hel"}))
    piece = b"x" * 65536 if how == "one line" else b"data: " + b"x" * 65530 + b"\n"
    got += decoder.feed(b"data: " if how == "one line" else b"")
    with caplog.at_level(logging.WARNING, logger="codeplan.sse"):
        for _ in range(sse.MAX_LINE // 65536 + 2):
            got += decoder.feed(piece)
    assert [e.data for e in got[1:]] == [sse.TOO_LONG, b"[DONE]"]
    assert decoder.feed(b"\n\n" + _chunk({"content": "more"}, "stop") + sse.DONE) == []  # nothing after it
    assert "upstream event too long" in caplog.text
    # what the client gets: the answer so far, then an error event, never a whole answer
    said_done: list[int] = []
    normalizer = glm.StreamNormalizer("c_")
    translator = chat.ChatStream("glm-4.6", "big")
    out = translator.start()
    for chunk in chunks(sse.SSEDecoder(), b"".join([_chunk({"content": "Hel"}), sse.frame(sse.TOO_LONG),
                                                     sse.DONE]), lambda: said_done.append(1)):
        out += translator.feed(normalizer.feed(chunk))
    normalizer.done()
    tail, outcome = normalizer.close()
    assert said_done == [1] and outcome.error is not None and outcome.error.code == "line_too_long"
    out += translator.feed(tail) + translator.fail(outcome.error)
    last = json.loads(sse.SSEDecoder().feed(out)[-1].data)
    assert last["error"]["type"] == "server_error"


# ---- end to end: a real bridge before a vLLM-like upstream ------------------------------------------

_REASONING = "Let me think about the question carefully. " * 10
SCRIPTS: dict[str, list[bytes]] = {
    "abort": [_chunk({"role": "assistant", "content": "Here is the first half of the ans"}),
              _chunk({}, "abort"), _chunk(usage=_usage()), sse.DONE],
    "error": [_chunk({"role": "assistant", "content": "Here is the first half of the ans"}),
              _chunk({}, "error"), _chunk(usage=_usage()), sse.DONE],
    "content_filter": [_chunk({"role": "assistant", "content": "Here is the first half"}),
                       _chunk({}, "content_filter", _usage()), sse.DONE],
    "reasoning": [_chunk({"role": "assistant", "reasoning": _REASONING}), _chunk({"reasoning": "The user wants hi."}),
                  _chunk({"content": "Hello!"}), _chunk({}, "stop", _usage(50, 30)), sse.DONE],
    # no usage: the ledger bills what was delivered, the reasoning included
    "reasoning_unmetered": [_chunk({"role": "assistant", "reasoning": _REASONING}), _chunk({"content": "Hello!"}),
                            _chunk({}, "stop"), sse.DONE],
}
WHOLE: dict[str, dict] = {
    "abort": {"id": "c", "choices": [{"index": 0, "finish_reason": "abort", "message": {
        "role": "assistant", "content": "Here is the first half of the ans"}}], "usage": _usage(50, 9)},
    "reasoning": {"id": "c", "choices": [{"index": 0, "finish_reason": "stop", "message": {
        "role": "assistant", "content": "Hello!", "reasoning": "Let me think about the question carefully."}}],
        "usage": _usage(50, 30)},
}
BIG_LINE_MB = 20  # past sse.MAX_LINE


class _VLLMLike(BaseHTTPRequestHandler):
    """Answers as the `[[script NAME]]` in the conversation says; entitled to every model but
    glm-4.5-air (Z.ai's 1220 for that one)."""
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802
        self.send_response(200)
        self.send_header("content-length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def _json(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers.get("content-length") or 0)) or b"{}")
        if body.get("model") == "glm-4.5-air":
            self._json(403, {"error": {"code": "1220", "message": "You do not have permission to access glm-4.5-air"}})
            return
        text = json.dumps(body.get("messages", []))
        name = next((n for n in [*SCRIPTS, *WHOLE, "big_line"] if f"[[script {n}]]" in text), None)
        if not body.get("stream"):
            self._json(200, WHOLE.get(name) or {"id": "c", "choices": [{"index": 0, "finish_reason": "stop", "message": {
                "role": "assistant", "content": "hi"}}], "usage": _usage()})
            return
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("connection", "close")
        self.end_headers()
        try:
            if name == "big_line":
                self.wfile.write(b'data: {"id":"a","choices":[{"index":0,"delta":{"role":"assistant","content":"')
                piece = b"x" * 65536
                for _ in range(BIG_LINE_MB * 16):
                    self.wfile.write(piece)
                self.wfile.write(b'"},"finish_reason":"stop"}]}\n\n' + sse.DONE)
            else:
                for piece in SCRIPTS.get(name) or [_chunk({"role": "assistant", "content": "hi"}, "stop", _usage()),
                                                   sse.DONE]:
                    self.wfile.write(piece)
                    self.wfile.flush()
                    time.sleep(0.01)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the bridge stopped reading (the big line's cap)
        self.close_connection = True


@pytest.fixture(scope="module")
def vllm_bridge(database):
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), _VLLMLike)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    bridge = start_bridge(database, f"http://127.0.0.1:{server.server_address[1]}/v1",
                          CODEPLAN_UPSTREAM_KEYS="key-one,key-two")
    yield bridge
    bridge.stop()
    server.shutdown()


def _post(bridge, key: str, surface: str, script: str, *, stream: bool = True, model: str = "glm-4.6") -> httpx.Response:
    said = f"[[script {script}]] hi"
    if surface == "chat":
        return httpx.post(bridge.url + "/v1/chat/completions", timeout=60, headers={"authorization": f"Bearer {key}"},
                          json={"model": model, "stream": stream, "messages": [{"role": "user", "content": said}]})
    if surface == "messages":
        return httpx.post(bridge.url + "/v1/messages", timeout=60,
                          headers={"x-api-key": key, "anthropic-version": "2023-06-01"},
                          json={"model": model, "max_tokens": 1000, "stream": stream,
                                "messages": [{"role": "user", "content": said}]})
    return httpx.post(bridge.url + "/v1/responses", timeout=60, headers={"authorization": f"Bearer {key}"},
                      json={"model": model, "stream": stream, "input": said})


def _data(text: str) -> list[dict]:
    return [json.loads(line[5:]) for line in text.splitlines()
            if line.startswith("data:") and line[5:].strip() != "[DONE]"]


@pytest.mark.parametrize("script", ["abort", "error"])
def test_an_aborted_stream_is_never_a_whole_answer_on_any_surface(vllm_bridge, database, script):
    key = new_user(database)
    answer = _post(vllm_bridge, key, "chat", script)
    events = _data(answer.text)
    assert "[DONE]" not in answer.text and events[-1]["error"]["type"] == "server_error", answer.text
    assert not [c for c in events if c.get("choices") and c["choices"][0].get("finish_reason")]
    answer = _post(vllm_bridge, key, "messages", script)
    assert "event: error" in answer.text and "end_turn" not in answer.text, answer.text
    answer = _post(vllm_bridge, key, "responses", script)
    kinds = [e.get("type") for e in _data(answer.text)]
    assert "response.completed" not in kinds and "response.failed" in kinds, kinds[-4:]


def test_a_whole_answer_the_engine_aborted_is_an_error(vllm_bridge, database):
    key = new_user(database)
    answer = _post(vllm_bridge, key, "messages", "abort", stream=False)
    assert answer.status_code == 502 and answer.json()["error"]["type"] == "api_error", answer.text


def test_an_openai_style_content_filter_reaches_chat_as_one(vllm_bridge, database):
    key = new_user(database)
    events = _data(_post(vllm_bridge, key, "chat", "content_filter").text)
    assert [c["choices"][0]["finish_reason"] for c in events
            if c.get("choices") and c["choices"][0].get("finish_reason")] == ["content_filter"]


def test_vllms_reasoning_reaches_every_surface(vllm_bridge, database):
    key = new_user(database)
    events = _data(_post(vllm_bridge, key, "chat", "reasoning").text)
    assert "think about the question" in "".join(
        c["choices"][0]["delta"].get("reasoning_content") or "" for c in events if c.get("choices"))
    assert "thinking_delta" in _post(vllm_bridge, key, "messages", "reasoning").text
    whole = _post(vllm_bridge, key, "messages", "reasoning", stream=False).json()
    assert [b["type"] for b in whole["content"]] == ["thinking", "text"], whole
    whole = _post(vllm_bridge, key, "chat", "reasoning", stream=False).json()
    assert "think about" in whole["choices"][0]["message"]["reasoning_content"], whole
    assert "think about the question" in _post(vllm_bridge, key, "responses", "reasoning").text


def test_vllms_reasoning_is_billed_as_delivered_when_the_upstream_gives_no_usage(vllm_bridge, database):
    key = new_user(database)
    assert "Hello!" in _post(vllm_bridge, key, "chat", "reasoning_unmetered").text
    wait_settled(database)
    [row] = run(query(database, "SELECT l.* FROM usage_ledger l JOIN api_keys k ON k.id = l.api_key_id"
                                " WHERE k.prefix = $1", key[:10]))
    # "Hello!" alone is two tokens; the reasoning relayed before it is some eighty more
    assert row["estimated"] and row["completion_tokens"] >= 40, dict(row)


def test_a_refused_model_does_not_take_the_bridge_out_of_service(vllm_bridge, database):
    """Two requests for a model the upstream account may not use (Claude Code's "haiku" slot,
    glm-4.5-air) cooled both keys: /readyz said 503 and the load balancer took the bridge out."""
    key = new_user(database)
    for _ in range(3):
        refused = _post(vllm_bridge, key, "messages", "none", stream=False, model="glm-4.5-air")
        assert refused.status_code == 404 and refused.json()["error"]["type"] == "not_found_error", refused.text
        assert refused.headers["x-should-retry"] == "false"
    assert httpx.get(vllm_bridge.url + "/readyz", timeout=10).status_code == 200
    assert _post(vllm_bridge, key, "chat", "none", stream=False).status_code == 200


def test_an_enormous_upstream_line_ends_the_stream_as_broken_and_holds_no_one_up(vllm_bridge, database):
    key = new_user(database)
    gaps: list[float] = []
    stop, probing = threading.Event(), threading.Event()

    def probe() -> None:
        with httpx.Client(timeout=60) as client:
            while not stop.is_set():
                started = time.monotonic()
                client.get(vllm_bridge.url + "/healthz")
                gaps.append(time.monotonic() - started)
                probing.set()
                time.sleep(0.02)

    prober = threading.Thread(target=probe)
    prober.start()
    try:
        assert probing.wait(10)
        started = time.monotonic()
        answer = _post(vllm_bridge, key, "chat", "big_line")
        took = time.monotonic() - started
    finally:
        stop.set()
        prober.join()
    assert answer.status_code == 200 and len(answer.content) < 4096, (answer.status_code, len(answer.content))
    said = _data(answer.text)[-1]["error"]
    assert (said["type"], said["code"]) == ("server_error", "line_too_long") and "[DONE]" not in answer.text
    assert took < 10 and max(gaps) < 1.0, (took, max(gaps))
