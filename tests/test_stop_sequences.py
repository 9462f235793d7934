"""GLM stops at one stop sequence at most (docs/glm-upstream.md: `stop`, at most 1). A request
naming more is refused with a 400 naming the field, never served with all but the first ignored
in silence (README: parameters honoured or refused, never ignored)."""
from __future__ import annotations

import json

import pytest

from bridge import glm, wire
from bridge.errors import BridgeError
from bridge.surfaces import chat, messages


def _chat(stop) -> bytes:
    return json.dumps({"model": "glm-4.6", "messages": [{"role": "user", "content": "hi"}],
                       "stop": stop}).encode()


@pytest.mark.parametrize("stop", [["END", "STOP"], ["a", "b", "c", "d"]])
def test_chat_with_several_stop_sequences_is_a_400_naming_stop(stop):
    with pytest.raises(BridgeError) as refused:
        chat.parse_request(_chat(stop))
    status, _, body = chat.ChatSurface().error(refused.value)
    error = json.loads(body)["error"]
    assert status == 400 and error["param"] == "stop" and "one stop sequence" in error["message"]


@pytest.mark.parametrize("stop", ["END", ["END"], ["END", "END"]])
def test_chat_with_one_stop_sequence_reaches_glm(stop):
    sent = json.loads(wire.encoder.encode(glm.prepare(chat.to_upstream(chat.parse_request(_chat(stop))))))
    assert sent["stop"] == ["END"]


def _messages(stop) -> bytes:
    return json.dumps({"model": "glm-4.6", "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}],
                       "stop_sequences": stop}).encode()


def test_messages_with_several_stop_sequences_is_a_400_in_anthropics_shape():
    with pytest.raises(BridgeError) as refused:
        messages.parse_request(_messages(["NEVER_SAID", "HALT"]))
    status, _, body = messages.MessagesSurface().error(refused.value)
    error = json.loads(body)
    assert status == 400 and error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
    assert "one stop sequence" in error["error"]["message"]


def test_messages_with_one_stop_sequence_reaches_glm():
    sent = json.loads(wire.encoder.encode(glm.prepare(messages.to_upstream(messages.parse_request(
        _messages(["HALT"]))))))
    assert sent["stop"] == ["HALT"]
