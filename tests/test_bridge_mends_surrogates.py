"""An upstream chunk with a UTF-16 surrogate's escape alone (a gateway that cut an emoji's
escaped pair between two chunks: "wor\\ud83d" ends one, "\\ude00ld" begins the next) was refused
by msgspec and skipped whole: the client got an answer with a hole (the text around the emoji
too), told whole (finish_reason stop) and billed in full. Now the cut pair is joined again, a half
alone for good reads as U+FFFD, and a chunk still unreadable ends the answer as broken.

What the journey does with upstream bytes (`bridge.flight.chunks`, sans I/O) is fed split
transcripts; then the bridge, end to end."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from bridge import glm, sse, wire
from bridge.flight import chunks, last_chunks

from .conftest import free_port, new_user, query, run, start_bridge, wait_settled
from .scripted_upstream import DONE, call, chunk, usage

EMOJI = "\U0001F600"
# the hunter's transcript: json.dumps escapes a str holding the pair's halves apart, as such a
# gateway writes them
CUT_PAIR = [
    chunk({"role": "assistant", "content": "Hello "}),
    chunk({"content": "wor\ud83d"}),
    chunk({"content": "\ude00ld, bye"}),
    chunk({}, "stop", usage(20, 9)),
    DONE,
]


class Read:
    """What a stream's chunks say, as the journey reads them."""

    def __init__(self, chunks: list[wire.Chunk], done: int) -> None:
        self.chunks = chunks
        self.done = done
        normalizer = glm.StreamNormalizer("call_")
        events = []
        for c in chunks:
            events += normalizer.feed(c)
        if done:
            normalizer.done()
        tail, self.outcome = normalizer.close()
        events += tail
        self.text = "".join(e.text for e in events if isinstance(e, glm.Text))
        self.reasoning = "".join(e.text for e in events if isinstance(e, glm.Reasoning))
        self.calls = [e for e in events if isinstance(e, glm.ToolEnd)]
        self.usage = next((c.usage for c in chunks if isinstance(c.usage, wire.Usage)), None)


def read(pieces: list[bytes], cuts: list[int] | None = None) -> Read:
    """Feed the transcript's bytes cut at `cuts` (offsets), then end the stream."""
    raw = b"".join(pieces)
    edges = [0, *(cuts or []), len(raw)]
    decoder = sse.SSEDecoder()
    done = []
    got: list[wire.Chunk] = []
    for start, end in zip(edges, edges[1:]):
        got += chunks(decoder, raw[start:end], lambda: done.append(len(got)))
    got += last_chunks(decoder)
    return Read(got, len(done))


def test_a_pair_cut_between_two_chunks_is_joined_at_every_cut_of_the_bytes():
    raw = b"".join(CUT_PAIR)
    for cut in range(len(raw) + 1):
        got = read(CUT_PAIR, [cut])
        assert got.text == f"Hello wor{EMOJI}ld, bye", cut
        assert got.outcome.reason == "stop" and got.usage.completion_tokens == 9 and got.done == 1, cut


def test_a_pair_cut_between_two_chunks_is_joined_when_fed_byte_by_byte():
    raw = b"".join(CUT_PAIR)
    got = read(CUT_PAIR, list(range(1, len(raw))))
    assert (got.text, got.outcome.reason) == (f"Hello wor{EMOJI}ld, bye", "stop")


def test_a_high_half_alone_is_a_replacement_character_wherever_the_stream_goes_next():
    ordinary = [chunk({"content": "wor\ud83d"}), chunk({"content": "ld"}), chunk({}, "stop"), DONE]
    assert read(ordinary).text == "wor\ufffdld"
    before_done = [chunk({"content": "wor\ud83d"}), DONE]
    got = read(before_done)
    assert got.text == "wor\ufffd" and got.done == 1
    assert got.chunks and got.chunks[0].choices[0].delta.content == "wor\ufffd"
    cut_off = [chunk({"content": "wor\ud83d"})]  # the stream ends there: `last_chunks` gives it
    assert read(cut_off).text == "wor\ufffd"
    # a high half, then another high half: the first alone for good, the second held in its turn
    twice = [chunk({"content": "a\ud83d"}), chunk({"content": "\ud83d"}), chunk({"content": "\ude00b"}),
             chunk({}, "stop"), DONE]
    assert read(twice).text == f"a\ufffd{EMOJI}b"


def test_halves_alone_inside_a_chunk_are_replacement_characters():
    pieces = [chunk({"content": "\ude00ld"}), chunk({"content": "a\ud83db, c\ude00d \ud83d\ude00"}),
              chunk({}, "stop"), DONE]
    assert read(pieces).text == f"\ufffdlda\ufffdb, c\ufffdd {EMOJI}"


def test_halves_of_different_keys_are_not_joined():
    pieces = [chunk({"reasoning_content": "think\ud83d"}), chunk({"content": "\ude00answer"}),
              chunk({}, "stop"), DONE]
    got = read(pieces)
    assert (got.reasoning, got.text) == ("think\ufffd", "\ufffdanswer")


def test_a_tool_calls_arguments_cut_in_a_pair_are_joined():
    pieces = [chunk(call(0, "call_1", "write", '{"text": "smile \ud83d')),
              chunk({"tool_calls": [{"index": 0, "function": {"arguments": '\ude00"}'}}]}),
              chunk({}, "tool_calls"), DONE]
    got = read(pieces)
    assert [json.loads(c.arguments) for c in got.calls] == [{"text": f"smile {EMOJI}"}]


def test_upper_case_escapes_and_whole_pairs_are_read_as_they_are():
    pieces = [b'data: {"choices": [{"delta": {"content": "a\\uD83D"}}]}\n\n',
              b'data: {"choices": [{"delta": {"content": "\\uDE00b \\uD83D\\uDE00"}}]}\n\n',
              chunk({}, "stop"), DONE]
    assert read(pieces).text == f"a{EMOJI}b {EMOJI}"


def test_an_escaped_backslash_before_u_is_text_not_a_half():
    """`\\\\ud83d` is a backslash and the letters `ud83d`: a chunk unreadable for another reason is
    not "mended" there, and one that is fine is read as it is."""
    fine = [b'data: {"choices": [{"delta": {"content": "C:\\\\ud83d"}}]}\n\n', chunk({}, "stop"), DONE]
    assert read(fine).text == "C:\\ud83d"
    broken = [b'data: {"choices": [{"delta": {"content": "C:\\\\ud83d", }}]}\n\n', chunk({}, "stop"), DONE]
    got = read(broken)
    assert got.outcome.error is not None and got.outcome.error.code == "unreadable_chunk"


def test_a_chunk_still_unreadable_ends_the_answer_as_broken_and_its_usage_still_counts():
    pieces = [chunk({"role": "assistant", "content": "Hello "}),
              b'data: {"choices": [{"delta": {"cont\n\n',  # the simulator's `malformed` fault
              chunk({"content": "world"}), chunk({}, "stop", usage(20, 9)), DONE]
    got = read(pieces)
    assert got.outcome.error is not None and got.outcome.error.code == "unreadable_chunk"
    assert "could not read" in got.outcome.error.message
    assert got.text == "Hello "  # nothing after the hole is passed off as the answer
    assert got.usage is not None and got.usage.completion_tokens == 9  # billed at the upstream's word


# ---- end to end ---------------------------------------------------------------------------------

TRANSCRIPTS = {
    "cut_pair": CUT_PAIR,
    "unreadable": [chunk({"role": "assistant", "content": "Hello "}), b'data: {"choices": [{"delta": {"cont\n\n',
                   chunk({"content": "world"}), chunk({}, "stop", usage(20, 9)), DONE],
}


class _Scripted(BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        name = next(n for n in TRANSCRIPTS if n in body.decode())
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("connection", "close")
        self.end_headers()
        for piece in TRANSCRIPTS[name]:
            self.wfile.write(piece)
            self.wfile.flush()
        self.close_connection = True


@pytest.fixture(scope="module")
def scripted_bridge(database):
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), _Scripted)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    bridge = start_bridge(database, f"http://127.0.0.1:{server.server_address[1]}/v1",
                          CODEPLAN_UPSTREAM_KEYS="surrogate-k")
    yield bridge
    bridge.stop()
    server.shutdown()


def _chat(bridge, key: str, name: str) -> tuple[str, str | None, list[dict]]:
    text, finish, errors = "", None, []
    with httpx.stream("POST", bridge.url + "/v1/chat/completions", timeout=60,
                      headers={"authorization": f"Bearer {key}"},
                      json={"model": "glm-4.6", "stream": True, "max_tokens": 50,
                            "messages": [{"role": "user", "content": name}]}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                body = json.loads(line[6:])
                if "error" in body:
                    errors.append(body["error"])
                for c in body.get("choices", []):
                    text += c["delta"].get("content") or ""
                    finish = c.get("finish_reason") or finish
    return text, finish, errors


def _billed(database: str, key: str) -> list[tuple]:
    wait_settled(database)
    return [tuple(r) for r in run(query(
        database, "SELECT l.state, l.prompt_tokens, l.completion_tokens, l.estimated FROM usage_ledger l"
                  " JOIN api_keys k ON k.id = l.api_key_id WHERE k.prefix = $1", key[:10]))]


def test_the_client_gets_the_whole_text_of_a_cut_pair(scripted_bridge, database):
    key = new_user(database)
    text, finish, errors = _chat(scripted_bridge, key, "cut_pair")
    assert (text, finish, errors) == (f"Hello wor{EMOJI}ld, bye", "stop", [])
    assert _billed(database, key) == [("posted", 20, 9, False)]


def test_an_unreadable_chunk_is_never_told_whole(scripted_bridge, database):
    key = new_user(database)
    text, finish, errors = _chat(scripted_bridge, key, "unreadable")
    assert finish != "stop" and text == "Hello ", (text, finish)
    assert errors and "could not read" in errors[0]["message"], errors
    assert _billed(database, key) == [("posted", 20, 9, False)]  # what the upstream said it did
