"""Chat Completions and Responses near the model's context window: a prompt that leaves less room
than an answer can use is a context overflow, not an answer lowered to the room left. Proven with
the real CLIs (Cline 3.0.65, Kilo 7.7.7, OpenCode 1.18.33): lowered to ~800 tokens or to 1, GLM's
answer was thinking cut at `length`; Cline resent the whole window until it gave up, OpenCode
resent it turn after turn and never compacted, Kilo printed nothing, each round billed ~200K
tokens. Refused, each compacts or says why (Cline, OpenCode and Kilo all read
`context_length_exceeded`)."""
from __future__ import annotations

import httpx

from .conftest import new_user, wait_settled
from .test_claude_code_edges import WINDOW, _sized

GO_ON = "[[sim tool=none tokens=50 tps=1000000 ttft=0]] go on"


def _chat(bridge, key: str, history: str, **extra) -> httpx.Response:
    return httpx.post(bridge.url + "/v1/chat/completions", timeout=180, headers={"authorization": f"Bearer {key}"},
                      json={"model": "glm-4.6", **extra, "messages": [
                          {"role": "user", "content": history}, {"role": "assistant", "content": "ok"},
                          {"role": "user", "content": GO_ON}]})


def _responses(bridge, key: str, history: str, **extra) -> httpx.Response:
    return httpx.post(bridge.url + "/v1/responses", timeout=180, headers={"authorization": f"Bearer {key}"},
                      json={"model": "glm-4.6", **extra, "input": [
                          {"role": "user", "content": history}, {"role": "assistant", "content": "ok"},
                          {"role": "user", "content": GO_ON}]})


def test_chat_without_max_tokens_near_the_window_is_an_overflow_and_with_room_is_served(bridge, database):
    key = new_user(database)
    tight, counted = _sized(bridge, key, database, WINDOW - 2_000)  # ~2,000 left
    assert WINDOW - 3_500 < counted < WINDOW - 500, counted
    refused = _chat(bridge, key, tight)  # no max_tokens, as Cline and Roo send it
    assert refused.status_code == 400, refused.text[:300]
    error = refused.json()["error"]
    assert error["code"] == "context_length_exceeded" and "leaves no room for an answer" in error["message"]
    # a client that asks for less than the room is served as asked
    assert _chat(bridge, key, tight, max_tokens=300).status_code == 200
    wait_settled(database)
    roomy, counted = _sized(bridge, key, database, WINDOW - 12_000)  # room enough: the cap lowered
    served = _chat(bridge, key, roomy, max_tokens=32_000)
    assert served.status_code == 200, served.text[:300]


def test_responses_near_the_window_is_an_overflow(bridge, database):
    key = new_user(database)
    tight, counted = _sized(bridge, key, database, WINDOW - 2_000)
    assert WINDOW - 3_500 < counted < WINDOW - 500, counted
    refused = _responses(bridge, key, tight)
    assert refused.status_code == 400, refused.text[:300]
    assert refused.json()["error"]["code"] == "context_length_exceeded"
