"""Claude Code at the edges of a long session: the model's context window (its max_tokens must
fit beside the prompt, or it is told so in the words it acts on) and the plan's window (a request
whose worst case does not fit the room left is told both numbers)."""
from __future__ import annotations

import random
import re

import httpx

from bridge import tokens

from .conftest import new_plan, new_user, wait_settled

WORDS = ("the function returns a value after it reads the file and checks each line for errors "
         "then we update the test so that it covers the edge case").split()
WINDOW = 204_800  # glm-4.6's, which claude-* ids are served by
OVER = re.compile(r"input length and `max_tokens` exceed context limit: (\d+) \+ (\d+) > (\d+)")


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


def test_a_max_tokens_that_does_not_fit_beside_the_prompt_is_said_as_claude_code_reads_it(bridge, database):
    """Near the window the bridge lowered Claude Code's 64000 to the room left, and an answer cut
    there ended `stop_reason: max_tokens`: Claude Code took it for its own cap, sent the ~200K
    prompt three more times (each billed) and stopped with "exceeded the 64000 output token
    maximum", never compacting. Now it is told as Anthropic tells it, and its retry (max_tokens
    Z - X - 1000, read from the message as the real binary does) goes through; with too little
    room for any answer, "prompt is too long" makes it compact."""
    key = new_user(database)
    history = _text(190_000)
    refused = _post(bridge, key, _turn(history, 64_000))
    assert refused.status_code == 400, refused.text
    said = OVER.search(refused.json()["error"]["message"])
    assert said, refused.text
    prompt, asked, window = map(int, said.groups())
    assert asked == 64_000 and window == WINDOW and prompt + asked > window
    retried = _post(bridge, key, _turn(history, window - prompt - 1000))  # what Claude Code sends next
    assert retried.status_code == 200, retried.text
    # a thinking budget above the room: no retry could fit, so compact
    budget = window - prompt  # Claude Code's retry would ask budget + 1 at the least
    thinking = _post(bridge, key, _turn(history, 64_000, thinking={"type": "enabled", "budget_tokens": budget}))
    assert thinking.status_code == 400 and thinking.json()["error"]["message"].startswith("prompt is too long: ")
    # a client that sets no cap, or one that fits, is served as before
    fits = _post(bridge, key, _turn(history, 2_000))
    assert fits.status_code == 200, fits.text


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
