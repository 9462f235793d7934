"""The JSON depth guard and the caller-shaped errors: pure functions, checked against references."""
from __future__ import annotations

import json
import random

import msgspec
import pytest

from bridge import depth, shapes

from .rawhttp import assert_caller_shape


def reference_depth(text: str) -> int:
    """Nesting depth by a character-by-character reading of JSON text."""
    deepest = level = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            level += 1
            deepest = max(deepest, level)
        elif char in "]}":
            level -= 1
    return deepest


_TRICKY = ['[', ']', '{', '}', '"', '\\', '\\"', '\\\\', '\\\\"', 'ü', '€', '\x00', ' ', 'a']


def random_value(rng: random.Random, room: int):
    roll = rng.random()
    if room > 0 and roll < 0.3:
        return [random_value(rng, room - 1) for _ in range(rng.randint(0, 3))]
    if room > 0 and roll < 0.6:
        return {"".join(rng.choices(_TRICKY, k=rng.randint(0, 4))): random_value(rng, room - 1)
                for _ in range(rng.randint(0, 3))}
    if roll < 0.85:
        return "".join(rng.choices(_TRICKY, k=rng.randint(0, 12)))
    return rng.choice([0, -1.5e300, True, None, 12345678901234567890])


@pytest.mark.parametrize("seed", range(40))
def test_depth_matches_a_character_by_character_reading(seed):
    rng = random.Random(seed)
    for _ in range(50):
        value = random_value(rng, rng.randint(0, 12))
        for _ in range(rng.choice([0, 0, 10, 60, 70])):  # a spine of containers around it
            value = [value, "]]"] if rng.random() < 0.5 else {"}": value}
        text = json.dumps(value, ensure_ascii=rng.random() < 0.5)
        body = text.encode()
        expected = reference_depth(text)
        for limit in (max(0, expected - 1), expected, 8, 64):
            assert depth.too_deep(body, limit) is (expected > limit), (limit, expected, text[:200])


@pytest.mark.parametrize("n", [65, 500, 10_000, 1_000_000])
def test_deep_nesting_is_caught_anywhere(n):
    for body in (b"[" * n + b"]" * n, b'{"a":' * n + b"1" + b"}" * n,
                 b'{"model": "x", "ignored": ' + b"[" * n + b"]" * n + b"}",
                 b'{"model": "x", "later": [' + b"[1], " * 100_000 + b"[" * n + b"]" * n + b"]}",
                 b"[" * n,  # truncated, still too deep
                 b"]]]" + b"[" * n):  # stray closing brackets first
        assert depth.too_deep(body, 64)


def test_truncated_and_stray_brackets_within_the_limit_are_left_to_the_decoder():
    assert not depth.too_deep(b"[" * 64, 64)
    assert not depth.too_deep(b"[" + b"[1]," * 100_000, 64)
    assert not depth.too_deep(b"]" * 100 + b"[" * 64 + b"]" * 64, 64)
    assert depth.too_deep(b"[" * 60 + b"[" * 5 + b"]" * 5, 64)


def test_brackets_inside_strings_do_not_count():
    inside = json.dumps({"code": "[" * 10_000 + '\\"' + "{" * 10_000, "path": "C:\\\\dir\\\\"}).encode()
    assert not depth.too_deep(inside, 64)
    escaped_quote_then_brackets = b'{"a": "\\"[[[[", "b": ' + b"[" * 10 + b"]" * 10 + b"}"
    assert depth.too_deep(escaped_quote_then_brackets, 9)
    assert not depth.too_deep(escaped_quote_then_brackets, 11)


def test_an_ordinary_coding_tool_body_passes():
    schema = {"type": "object", "properties": {"edits": {"type": "array", "items": {
        "type": "object", "properties": {"old": {"type": "string"}, "new": {"type": "string"}}}}}}
    body = json.dumps({"model": "glm-4.6", "tools": [{"name": f"t{i}", "input_schema": schema}
                                                     for i in range(40)],
                       "messages": [{"role": "user", "content": [{"type": "text", "text": "[{x}]" * 50}]}
                                    for _ in range(100)]}).encode()
    assert reference_depth(body.decode()) < 12
    assert not depth.too_deep(body)


def test_invalid_utf8_and_nul_bytes_are_judged_on_their_brackets():
    assert not depth.too_deep(b'{"a": "\xff\xfe\x00' + b"[" * 100 + b'"}', 64)
    assert depth.too_deep(b'{"a": \xff\xfe' + b"[" * 100, 64)


# ---- shapes ------------------------------------------------------------------------------

@pytest.mark.parametrize("path, family", [
    ("/v1/chat/completions", "openai"), ("/chat/completions", "openai"),
    ("/api/coding/paas/v4/chat/completions", "openai"), ("/api/paas/v4/models", "openai"),
    ("/v1/responses", "openai"), ("/responses/resp_1/cancel", "openai"), ("/v1/models", "openai"),
    ("/models?x=1", "openai"), ("/v1/messages", "anthropic"), ("/v1/messages/count_tokens", "anthropic"),
    ("/messages", "anthropic"), ("/api/anthropic/v1/messages", "anthropic"),
    ("/api/monitor/usage/quota/limit", "zai"), ("/v1/usage", "problem"), ("/healthz", "problem"),
    ("/v1/modelsx", "openai"), ("/", "problem"), ("", "problem"), ("/v1/messagesx", "openai"),
    ("/v1/nope", "openai"), ("/v1", "openai"), ("/v1/usage/x", "problem"), ("/v1/billing", "problem"),
])
def test_each_path_gets_its_protocols_shape(path, family):
    assert shapes.family(path).value == family
    for status in (400, 401, 404, 408, 413, 429, 431):
        answer = shapes.render(path, status, "Something is wrong.", "some_code", http_level=True)
        assert_caller_shape(path, answer.status, answer.content_type, answer.body)
        assert answer.status == status


def test_zai_application_refusals_are_http_200_like_zai_itself():
    answer = shapes.render("/api/monitor/usage/model-usage", 429, "Too many failed attempts.")
    assert answer.status == 200
    assert msgspec.json.decode(answer.body) == {"code": 429, "msg": "Too many failed attempts.",
                                                "success": False, "data": None}
    assert shapes.render("/api/monitor/usage/quota/limit", 413, "big", http_level=True).status == 413


def test_anthropic_types_follow_its_documentation():
    def kind(status):
        return msgspec.json.decode(shapes.render("/v1/messages", status, "m").body)["error"]["type"]
    assert [kind(s) for s in (400, 401, 402, 403, 404, 413, 429, 500, 503, 529)] == [
        "invalid_request_error", "authentication_error", "billing_error", "permission_error",
        "not_found_error", "request_too_large", "rate_limit_error", "api_error", "overloaded_error",
        "overloaded_error"]
    assert kind(408) == "timeout_error" and kind(431) == "invalid_request_error"


def test_messages_are_escaped_not_spliced():
    answer = shapes.render("/v1/chat/completions", 400, 'a "quoted" \x00 message\n')
    assert msgspec.json.decode(answer.body)["error"]["message"] == 'a "quoted" \x00 message\n'


@pytest.mark.parametrize("height", [1, 2, 7, 58, 59, 63, 64, 65, 66, 80])
def test_long_bodies_agree_with_the_reference(height):
    """Hundreds of thousands of brackets, every nesting height around the limit."""
    unit = '{"k": ' * (height // 2) + '["s]]", ' * (height - height // 2) + "1" \
        + "]" * (height - height // 2) + "}" * (height // 2)
    text = "[" + ", ".join([unit] * (300_000 // (2 * height) + 2)) + "]"
    body = text.encode()
    assert body.count(b"[") + body.count(b"{") > 100_000
    expected = reference_depth(text)
    assert expected == height + 1
    for limit in (64, expected - 1, expected):
        if limit >= 8:
            assert depth.too_deep(body, limit) is (expected > limit), (limit, expected)


def test_every_configurable_limit_works_once_prepared():
    for limit in (8, 64, 128):  # CODEPLAN_MAX_JSON_DEPTH ranges from 8 to 128
        depth.prepare(limit)
        assert not depth.too_deep(b"[" * limit + b"]" * limit, limit)
        assert depth.too_deep(b"[" * (limit + 1) + b"]" * (limit + 1), limit)
        assert depth.too_deep(b"[" * (limit + 1), limit)
