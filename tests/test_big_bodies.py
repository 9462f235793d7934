"""Bodies from 1 MB are guarded and decoded on a worker thread, and long texts counted in
pieces there: the same answers as on the event loop, in the caller's shape."""
from __future__ import annotations

import httpx
import pytest

from bridge import journey, tokens

from .conftest import new_user


def test_a_text_counted_in_pieces_counts_as_it_would_whole():
    short = "def f(x):\n    return x + 1\n" * 1000
    assert len(short) < tokens.PIECE_CHARS and tokens.count_in_pieces(short) == tokens.count(short)
    long = "".join(f"    total += compute(item, index={i})  # step {i * 7 % 1000}\n" for i in range(40_000))
    assert len(long) > 6 * tokens.PIECE_CHARS
    # cut after newlines: the pieces tokenize as the whole does
    assert tokens.count_in_pieces(long) == tokens.count(long)
    no_newline = "word " * (tokens.PIECE_CHARS // 2)
    assert abs(tokens.count_in_pieces(no_newline) - tokens.count(no_newline)) <= 3


def _big(nesting: int) -> bytes:
    pad = "x" * (journey.OFFLOAD_BYTES + 1000)
    return (b'{"model": "glm-4.6", "max_tokens": 8, "metadata": ' + b"[" * nesting + b"]" * nesting
            + b', "messages": [{"role": "user", "content": "' + pad.encode() + b'"}]}')


@pytest.mark.parametrize("path,shape", [("/v1/chat/completions", "openai"), ("/v1/messages", "anthropic"),
                                        ("/v1/responses", "openai"), ("/v1/messages/count_tokens", "anthropic")])
def test_a_big_body_refused_on_the_worker_thread_is_refused_in_the_callers_shape(bridge, database, path, shape):
    key = new_user(database)
    headers = {"authorization": f"Bearer {key}", "x-api-key": key, "content-type": "application/json",
               "anthropic-version": "2023-06-01"}
    for body, words in ((_big(10_000), "nests deeper"), (_big(0)[:-7], "")):  # too deep; truncated
        answer = httpx.post(bridge.url + path, content=body, headers=headers, timeout=60)
        assert answer.status_code == 400, answer.text
        error = answer.json()["error"]
        if shape == "anthropic":
            assert answer.json()["type"] == "error" and error["type"] == "invalid_request_error"
        else:
            assert error["type"] == "invalid_request_error"
        assert words in error["message"]
    assert httpx.get(bridge.url + "/healthz").status_code == 200
