"""Simulator directives are bounded: a request cannot make the simulator build a billion pieces."""
from __future__ import annotations

import time

import httpx
import msgspec
import pytest

from bridge import wire
from bridge.simulator.engine import DIRECTIVE_BOUNDS, BadDirective, Engine, SimConfig

TOOLS = [{"type": "function", "function": {"name": "read_file", "parameters": {
    "type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}}}]


def chat(directive: str, **extra) -> wire.ChatRequest:
    return msgspec.json.decode(msgspec.json.encode({
        "model": "glm-4.6", "messages": [{"role": "user", "content": f"[[sim {directive}]] go"}], **extra}),
        type=wire.ChatRequest)


@pytest.mark.parametrize("directive, field, bound", [
    ("tools=1000000000", "tools", 64), ("tokens=1000000000000", "tokens", 131_072),
    ("reasoning=99999999999", "reasoning", 131_072), ("ttft=1e300", "ttft", 600_000),
    ("tps=inf", "tps", 1_000_000), ("silence=86400", "silence", 600),
    ("header_delay=1e9", "header_delay", 600), ("tokens=-5", "tokens", 0), ("ttft=nan", "ttft", 0),
    ("tools=-3", "tools", 1),
])
def test_numbers_are_clamped(directive, field, bound):
    assert getattr(Engine(SimConfig()).directive(chat(directive)), field) == bound
    assert DIRECTIVE_BOUNDS[field][0] <= bound <= DIRECTIVE_BOUNDS[field][1]


def test_a_huge_directive_plans_a_bounded_answer_quickly():
    engine = Engine(SimConfig())
    started = time.monotonic()
    script = engine.plan(chat("tools=1000000000 tokens=1000000000 reasoning=1000000000", tools=TOOLS))
    assert time.monotonic() - started < 30
    assert script.finish_reason == "tool_calls"
    assert len({p.index for p in script.pieces if p.kind == "tool_start"}) == 64


@pytest.mark.parametrize("directive", ['tokens=abc', 'text="unbalanced', 'tools=[1]'])
def test_an_unreadable_directive_is_a_bad_request(directive):
    with pytest.raises(BadDirective):
        Engine(SimConfig()).directive(chat(directive))


def test_the_simulator_answers_an_unreadable_directive_with_400(simulator):
    response = httpx.post(simulator.url + "/api/coding/paas/v4/chat/completions",
                          headers={"Authorization": "Bearer k"}, timeout=30,
                          json={"model": "glm-4.6", "messages": [{"role": "user", "content": "[[sim tokens=abc]] x"}]})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "1210"
