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


def _sized(bridge, key: str, database: str, want: int, **extra) -> tuple[str, int]:
    """A history whose turn the bridge counts at about `want` prompt tokens, and that count: the
    bridge calibrates its counts on the upstream's (bridge/metering.py), so sizes are measured
    through count_tokens (what admission counts), once earlier requests have settled."""
    wait_settled(database)

    def counted(history: str) -> int:
        r = httpx.post(bridge.url + "/v1/messages/count_tokens", timeout=60, json=_turn(history, 64_000, **extra),
                       headers={"x-api-key": key, "anthropic-version": "2023-06-01"})
        assert r.status_code == 200, r.text
        return r.json()["input_tokens"]
    words = _text(want * 2).split(" ")
    probe = " ".join(words[:len(words) // 2])
    keep = round(len(words) // 2 * want / counted(probe))
    history = " ".join(words[:keep])
    return history, counted(history)


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
    roomy, counted = _sized(bridge, key, database, WINDOW - 15_000)  # ~15K left: served, the cap lowered
    assert WINDOW - 16_000 < counted < WINDOW - 14_000, counted
    served = _post(bridge, key, _turn(roomy, 64_000))
    assert served.status_code == 200, served.text
    assert served.json()["stop_reason"] == "end_turn"
    tight, counted = _sized(bridge, key, database, WINDOW - 2_500)  # ~2,500 left
    assert WINDOW - 4_000 < counted < WINDOW - 1_000, counted
    refused = _post(bridge, key, _turn(tight, 64_000))
    assert refused.status_code == 400, refused.text
    said = re.fullmatch(r"prompt is too long: (\d+) tokens > (\d+) maximum", refused.json()["error"]["message"])
    assert said, refused.text
    prompt, limit = map(int, said.groups())
    assert limit == WINDOW - 4000 and prompt == counted
    # a thinking budget above the room left: no answer fits beside it either
    thinking = _post(bridge, key, _turn(roomy, 64_000, thinking={"type": "enabled", "budget_tokens": 20_000}))
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


def test_both_too_long_refusals_give_the_maximum_that_leaves_room_for_an_answer(bridge, database):
    """A prompt past the window itself was "> 204800 maximum", the other refusal "> 200800":
    Claude Code, trimming by how far over it is, landed in the second and compacted twice. And a
    thinking budget past max_tokens (which Anthropic refuses) made the maximum negative."""
    key = new_user(database)
    past, counted = _sized(bridge, key, database, WINDOW + 1_500)
    assert counted >= WINDOW, counted
    over = _post(bridge, key, _turn(past, 64_000))
    assert over.status_code == 400, (over.status_code, over.text[:300])
    said = re.fullmatch(r"prompt is too long: (\d+) tokens > (\d+) maximum", over.json()["error"]["message"])
    assert said and int(said.group(2)) == WINDOW - 4000, over.text
    odd = _post(bridge, key, _turn(_text(80_000), 131_072, thinking={"type": "enabled", "budget_tokens": 300_000}))
    said = re.fullmatch(r"prompt is too long: (\d+) tokens > (-?\d+) maximum", odd.json()["error"]["message"]) \
        if odd.status_code == 400 else None
    assert said is None or int(said.group(2)) > 0, odd.text
