"""Claude Code at the edges of a long session: the model's context window (a prompt that leaves
no room for an answer is "prompt is too long", the words it compacts on) and the plan's window (a
request whose worst case does not fit the room left is told both numbers)."""
from __future__ import annotations

import random
import re

import httpx

from bridge import tokens

from .conftest import new_plan, new_user, wait_settled

WORDS = ("the function returns a value after it reads the file and checks each line for errors "
         "then we update the test so that it covers the edge case").split()
WINDOW = 204_800  # glm-4.6's, which claude-* ids are served by


def _text(n_tokens: int) -> str:
    rng = random.Random(3)
    parts, total = [], 0
    while total < n_tokens:
        chunk = " ".join(rng.choice(WORDS) + str(rng.randint(0, 99)) for _ in range(200))
        parts.append(chunk)
        total += tokens.count(chunk)
    return " ".join(parts)


def _post(bridge, key: str, body: dict) -> httpx.Response:
    return httpx.post(bridge.url + "/v1/messages", timeout=180, json=body,
                      headers={"x-api-key": key, "anthropic-version": "2023-06-01"})


def _turn(history: str, max_tokens: int, **extra) -> dict:
    return {"model": "claude-sonnet-4-5", "max_tokens": max_tokens, **extra,
            "messages": [{"role": "user", "content": history}, {"role": "assistant", "content": "ok"},
                         {"role": "user", "content": "[[sim tool=none tokens=50 tps=1000000 ttft=0]] go on"}]}


def test_a_prompt_that_leaves_no_room_for_an_answer_is_too_long_as_claude_code_reads_it(bridge, database):
    """Near the window the bridge lowered Claude Code's 64000 to the room left, however little:
    with ~1,000 tokens left the answer was cut there and ended `stop_reason: max_tokens`, and
    Claude Code continued it with the whole ~200K prompt three more times (each billed), never
    compacting. With less room than an answer it can take (3,000 and 1,000 to spare, or more than
    its thinking budget), it is now told "prompt is too long", on which it compacts (checked with
    the real Claude Code 2.1.197); with room enough the cap is still lowered, no round trip lost."""
    key = new_user(database)
    roomy = _text(190_000)  # ~15K tokens left: served, the cap lowered
    served = _post(bridge, key, _turn(roomy, 64_000))
    assert served.status_code == 200, served.text
    assert served.json()["stop_reason"] == "end_turn"
    tight = _text(202_000)  # ~2,500 left
    refused = _post(bridge, key, _turn(tight, 64_000))
    assert refused.status_code == 400, refused.text
    said = re.fullmatch(r"prompt is too long: (\d+) tokens > (\d+) maximum", refused.json()["error"]["message"])
    assert said, refused.text
    prompt, limit = map(int, said.groups())
    assert limit == WINDOW - 4000 and prompt > limit
    # a thinking budget above the room left: no answer fits beside it either
    budget = 20_000
    thinking = _post(bridge, key, _turn(roomy, 64_000, thinking={"type": "enabled", "budget_tokens": budget}))
    assert thinking.status_code == 400, thinking.text
    assert thinking.json()["error"]["message"].startswith("prompt is too long: ")
    # a client whose cap fits is served as before
    assert _post(bridge, key, _turn(tight, 2_000)).status_code == 200


def test_a_request_whose_worst_case_passes_the_room_left_is_told_both(bridge, database):
    """A long conversation's hold (its prompt's bound plus the max_tokens Claude Code always asks)
    was refused as "Usage limit reached" with much of the window left, and nothing said that a
    shorter conversation would go through: the refusal keeps Z.ai's words and adds the numbers."""
    key = new_user(database, new_plan(database, window=100_000, weekly=1_000_000))
    spent = _post(bridge, key, {"model": "claude-sonnet-4-5", "max_tokens": 64_000, "messages": [
        {"role": "user", "content": "[[sim tool=none tokens=60000 reasoning=0 tps=1000000 ttft=0]] write"}]})
    assert spent.status_code == 200, spent.text
    wait_settled(database)
    refused = _post(bridge, key, _turn("a short history", 64_000))
    assert refused.status_code == 429, refused.text
    message = refused.json()["error"]["message"]
    assert message.startswith("Usage limit reached for the 5 hour window. Your limit will reset at "), message
    held, left = map(int, re.search(r"may use up to (\d+) tokens .*; (\d+) remain\.", message).groups())
    assert left < held and 30_000 < left < 45_000, message
    assert _post(bridge, key, _turn("a short history", 2_000)).status_code == 200
