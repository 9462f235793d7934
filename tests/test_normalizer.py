"""The one GLM normaliser (bridge/glm.py) and every surface fed by it: recorded transcripts and
generated ones, split anywhere, tool fragments interleaved, usage present or absent, cut anywhere."""
from __future__ import annotations

import json
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge import glm, sse, wire
from bridge.errors import BridgeError, Kind
from bridge.flight import chunks
from bridge.metering import MAX_COUNT, StreamMeter
from bridge.surfaces import chat, messages

from .test_translators import _check_block_structure, _tool_calls, glm_chunks, openai_chunks, translate


# ---- interleaved tool calls -----------------------------------------------------------------

@pytest.mark.parametrize("seed", [None, 5, 6])
def test_interleaved_tool_calls_arrive_whole_on_chat(seed):
    out, _ = translate(glm_chunks("glm_interleaved_tools.sse", seed), chat.ChatStream("glm-4.6", "i1"))
    calls = _tool_calls(openai_chunks(sse.SSEDecoder().feed(out)))
    assert [(c["id"], c["name"], json.loads(c["arguments"])) for c in calls.values()] == [
        ("call_x0", "read_file", {"path": "src/main.py"}),
        ("call_x1", "grep", {"pattern": "TODO", "path": "."})]


@pytest.mark.parametrize("seed", [None, 7, 8])
def test_interleaved_tool_calls_arrive_whole_on_messages(seed):
    out, _ = translate(glm_chunks("glm_interleaved_tools.sse", seed), messages.MessagesStream("glm-4.6", "i2", 10))
    events = [(e.event, json.loads(e.data)) for e in sse.SSEDecoder().feed(out)]
    blocks = _check_block_structure(events)
    assert [(b["type"], b.get("name")) for b in blocks] == [
        ("thinking", None), ("tool_use", "read_file"), ("tool_use", "grep")]
    assert json.loads(blocks[1]["partial_json"]) == {"path": "src/main.py"}
    assert json.loads(blocks[2]["partial_json"]) == {"pattern": "TODO", "path": "."}
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"


def test_a_call_named_late_holds_later_calls_and_text_in_order():
    normalizer = glm.StreamNormalizer("call_t_")
    events = normalizer.feed(wire.Chunk(choices=[wire.ChunkChoice(delta=wire.Delta(tool_calls=[
        wire.ToolCallDelta(index=0, function=wire.FunctionDelta(arguments='{"a":')),
        wire.ToolCallDelta(index=1, id="c1", function=wire.FunctionDelta(name="second", arguments="{}"))]))]))
    assert events == []  # the first call has no name yet: nothing may go before it
    events += normalizer.feed(wire.Chunk(choices=[wire.ChunkChoice(delta=wire.Delta(tool_calls=[
        wire.ToolCallDelta(index=0, function=wire.FunctionDelta(name="first", arguments="1}"))]))]))
    events += normalizer.feed(wire.Chunk(choices=[wire.ChunkChoice(delta=wire.Delta(content="after"),
                                                                    finish_reason="stop")]))
    tail, outcome = normalizer.close()
    events += tail
    assert events == [
        glm.ToolStart(0, "call_t_0", "first"), glm.ToolArgs(0, '{"a":'), glm.ToolArgs(0, "1}"),
        glm.ToolEnd(0, "call_t_0", "first", '{"a":1}'),
        glm.ToolStart(1, "c1", "second"), glm.ToolArgs(1, "{}"), glm.ToolEnd(1, "c1", "second", "{}"),
        glm.Text("after")]
    assert outcome == glm.Outcome(reason="tool_calls")


# ---- how streams end --------------------------------------------------------------------------

def _text_chunks(finish: str | None, usage: bool) -> list[wire.Chunk]:
    chunks = [wire.Chunk(id="u1", choices=[wire.ChunkChoice(delta=wire.Delta(content="Hello"))])]
    if finish:
        chunks.append(wire.Chunk(choices=[wire.ChunkChoice(finish_reason=finish)],
                                 usage=wire.Usage(prompt_tokens=3, completion_tokens=1) if usage else wire.UNSET))
    return chunks


def test_a_stream_that_ended_properly_without_usage_is_complete():
    out, meter = translate(_text_chunks("stop", usage=False), chat.ChatStream("glm-4.6", "e1"))
    events = sse.SSEDecoder().feed(out)
    assert events[-1].data == b"[DONE]" and meter.usage is None


def test_done_without_a_finish_reason_after_an_answer_is_broken():
    """GLM (glm-upstream.md §5.2), OpenAI, vLLM and SGLang all end an answer with a finish
    reason: `[DONE]` without one is an upstream that stopped without saying the answer was whole."""
    normalizer = glm.StreamNormalizer("c_")
    normalizer.feed(_text_chunks(None, usage=False)[0])
    normalizer.done()
    outcome = normalizer.close()[1]
    assert outcome.error is not None and outcome.error.code == "stream_unfinished"
    assert outcome.error.kind is Kind.upstream_error  # retryable, like every broken answer


@pytest.mark.parametrize("surface", ["chat", "messages"])
def test_a_stream_cut_off_is_broken_on_every_surface(surface):
    translator = chat.ChatStream("glm-4.6", "e2") if surface == "chat" else messages.MessagesStream("glm-4.6", "e2", 1)
    out, _ = translate(_text_chunks(None, usage=False), translator, done=False)
    last = sse.SSEDecoder().feed(out)[-1]
    body = json.loads(last.data)
    if surface == "chat":
        assert body["error"]["code"] == "stream_interrupted"
    else:
        assert last.event == "error" and body["error"]["type"] == "api_error"


@pytest.mark.parametrize("finish", ["stop", "tool_calls"])
def test_an_empty_complete_answer_is_a_retryable_error(finish):
    normalizer = glm.StreamNormalizer("c_")
    normalizer.feed(wire.Chunk(choices=[wire.ChunkChoice(delta=wire.Delta(content=""), finish_reason=finish)]))
    _, outcome = normalizer.close()
    assert outcome.error is not None and outcome.error.code == "empty_response"


def _reasoning_then(finish: str) -> list[wire.Chunk]:
    return [wire.Chunk(choices=[wire.ChunkChoice(delta=wire.Delta(reasoning_content="Let me think."))]),
            wire.Chunk(choices=[wire.ChunkChoice(delta=wire.Delta(content=""), finish_reason=finish)])]


@pytest.mark.parametrize("finish", ["stop", "tool_calls", None])
def test_a_reasoning_only_answer_is_a_retryable_error(finish):
    """clients.md §9: never an empty turn (Cline: "did not provide any assistant messages");
    thinking without text or a call is one, however it ended."""
    normalizer = glm.StreamNormalizer("c_")
    events = []
    for chunk in _reasoning_then(finish):
        events += normalizer.feed(chunk)
    normalizer.done()
    tail, outcome = normalizer.close()
    assert events + tail == [glm.Reasoning("Let me think.")]  # the thinking still goes out
    assert outcome.error is not None and outcome.error.code == "empty_response"
    assert outcome.error.kind is Kind.upstream_error


@pytest.mark.parametrize("finish,reason", [
    ("length", "length"), ("model_context_window_exceeded", "model_context_window_exceeded"),
    ("sensitive", "content_filter")])
def test_a_reasoning_only_answer_cut_by_a_limit_keeps_its_reason(finish, reason):
    """A small max_tokens spent on thinking (glm-upstream.md §6) is a `length` answer, not a
    retryable error: a retry would meet the same cap."""
    normalizer = glm.StreamNormalizer("c_")
    for chunk in _reasoning_then(finish):
        normalizer.feed(chunk)
    assert normalizer.close()[1] == glm.Outcome(reason=reason)


def test_reasoning_only_reaches_chat_as_an_error_without_done():
    out, _ = translate(_reasoning_then("stop"), chat.ChatStream("glm-4.6", "r1"))
    events = sse.SSEDecoder().feed(out)
    assert events[-1].data != b"[DONE]"
    assert json.loads(events[-1].data)["error"]["code"] == "empty_response"
    assert not any(b'"finish_reason":"stop"' in e.data for e in events)


@pytest.mark.parametrize("upstream,reason", [
    ("stop", "stop"), ("length", "length"), ("model_context_window_exceeded", "model_context_window_exceeded"),
    ("sensitive", "content_filter"), ("content_filter", "content_filter"), ("something_new", "stop")])
def test_finish_reasons_have_one_meaning(upstream, reason):
    normalizer = glm.StreamNormalizer("c_")
    normalizer.feed(wire.Chunk(choices=[wire.ChunkChoice(delta=wire.Delta(content="x"), finish_reason=upstream)]))
    assert normalizer.close()[1] == glm.Outcome(reason=reason)


def test_non_streamed_answers_go_through_the_same_normaliser():
    completion = wire.completion_decoder.decode(json.dumps({
        "id": "x", "choices": [{"finish_reason": "stop", "message": {
            "role": "assistant", "content": None, "reasoning_content": "think",
            "tool_calls": [{"id": "", "type": "function", "function": {"name": "ls", "arguments": ""}}]}}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}}).encode())
    events, outcome = glm.completion_events(completion, "call_n_")
    answer = glm.Answer(events)
    assert outcome.reason == "tool_calls" and answer.reasoning == "think"
    assert [(c.id, c.name, c.arguments) for c in answer.calls] == [("call_n_0", "ls", "{}")]
    body = json.loads(chat.completion_body(answer, outcome.reason, "glm-4.6", "n1", wire.Usage()))
    assert body["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"] == "{}"
    assert body["choices"][0]["finish_reason"] == "tool_calls"
    body = json.loads(messages.completion_body(answer, outcome.reason, "glm-4.6", "n1", wire.Usage()))
    assert body["stop_reason"] == "tool_use" and body["content"][1]["input"] == {}


# ---- an upstream's error chunk mid-stream (vLLM, SGLang: glm-upstream.md §16) ----------------

# vllm/entrypoints/openai/serving_chat.py, chat_completion_stream_generator: a generation that
# fails after it began sends an error object in place of a chunk, then [DONE]
VLLM_STREAM = (
    b'data: {"id":"chatcmpl-v","object":"chat.completion.chunk","created":1,"model":"glm-4.6",'
    b'"choices":[{"index":0,"delta":{"role":"assistant","content":"Here is the first half"},"finish_reason":null}]}\n\n'
    b'data: {"error": {"object": "error", "message": "CUDA out of memory", "type": "InternalServerError", '
    b'"param": null, "code": 500}}\n\n'
    b'data: [DONE]\n\n')


def _relay_raw(pieces: list[bytes]) -> tuple[list[glm.Event], glm.Outcome, StreamMeter]:
    """What the journey does with upstream bytes (bridge/flight.py `chunks`), sans I/O."""
    normalizer, decoder, meter = glm.StreamNormalizer("c_"), sse.SSEDecoder(), StreamMeter()
    events: list[glm.Event] = []
    for piece in pieces:
        for chunk in chunks(decoder, piece, normalizer.done):
            meter.observe(chunk, delivered=True)
            events += normalizer.feed(chunk)
    tail, outcome = normalizer.close()
    return events + tail, outcome, meter


@pytest.mark.parametrize("seed", [None, 1, 2, 3])
def test_an_upstream_error_chunk_breaks_the_answer(seed):
    pieces = [VLLM_STREAM]
    if seed is not None:  # split anywhere, as the network delivers it
        rng = random.Random(seed)
        cuts = sorted(rng.sample(range(1, len(VLLM_STREAM)), 12))
        pieces = [VLLM_STREAM[a:b] for a, b in zip([0] + cuts, cuts + [len(VLLM_STREAM)])]
    events, outcome, meter = _relay_raw(pieces)
    assert events == [glm.Text("Here is the first half")]
    assert outcome.error is not None and outcome.error.kind is Kind.upstream_error
    assert outcome.error.code == "upstream_error" and "CUDA" not in outcome.error.message
    assert meter.delivered_tokens() > 0 and meter.usage is None  # settled at what was delivered


@pytest.mark.parametrize("error", [
    b'{"message": "boom", "code": "500"}', b'{"message": "boom", "type": "server_error", "code": null}',
    b'{}', b'"boom"'])
def test_every_shape_of_error_chunk_breaks_the_answer(error):
    stream = VLLM_STREAM.replace(VLLM_STREAM.split(b"\n\n")[1], b'data: {"error": ' + error + b"}")
    _, outcome, _ = _relay_raw([stream])
    assert outcome.error is not None and outcome.error.code == "upstream_error"


def test_a_null_error_field_is_no_error():
    normalizer = glm.StreamNormalizer("c_")
    normalizer.feed(wire.chunk_decoder.decode(
        b'{"error": null, "choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": "stop"}]}'))
    assert normalizer.close()[1] == glm.Outcome(reason="stop")


def test_nothing_after_an_error_chunk_is_delivered_or_counted():
    tail = (b'data: {"choices":[{"index":0,"delta":{"content":" and more words"},"finish_reason":"stop"}],'
            b'"usage":{"prompt_tokens":20,"completion_tokens":8,"total_tokens":28}}\n\n')
    stream = VLLM_STREAM.replace(b"data: [DONE]", tail + b"data: [DONE]")
    events, outcome, meter = _relay_raw([stream])
    assert events == [glm.Text("Here is the first half")] and not outcome.complete
    _, _, before = _relay_raw([VLLM_STREAM])
    assert meter.delivered_tokens() == before.delivered_tokens()  # counted once, up to the error
    assert meter.usage is not None and meter.usage.completion_tokens == 8  # usage is still the upstream's word


@pytest.mark.parametrize("surface", ["chat", "messages"])
def test_an_upstream_error_chunk_reaches_each_surface_as_its_error(surface):
    chunks = [wire.chunk_decoder.decode(e.data) for e in sse.SSEDecoder().feed(VLLM_STREAM)
              if e.data != b"[DONE]"]
    translator = chat.ChatStream("glm-4.6", "v1") if surface == "chat" else messages.MessagesStream("glm-4.6", "v1", 1)
    out, _ = translate(chunks, translator)
    names = [(e.event, e.data) for e in sse.SSEDecoder().feed(out)]
    if surface == "chat":
        assert names[-1][1] != b"[DONE]" and json.loads(names[-1][1])["error"]["code"] == "upstream_error"
        assert not any(b'"finish_reason":"stop"' in data for _, data in names)
    else:
        assert names[-1][0] == "error" and "message_stop" not in [n for n, _ in names]
        assert not any(b"end_turn" in data for _, data in names)


# ---- parallel calls that reuse an index ------------------------------------------------------

def _call(index, id=None, name=None, arguments=None):
    return wire.Chunk(choices=[wire.ChunkChoice(delta=wire.Delta(tool_calls=[wire.ToolCallDelta(
        index=index, id=id if id is not None else wire.UNSET, type="function" if id else wire.UNSET,
        function=wire.FunctionDelta(name=name if name is not None else wire.UNSET,
                                    arguments=arguments if arguments is not None else wire.UNSET))]))])


def _calls_of(chunks: list[wire.Chunk]) -> list[tuple[str, str, str]]:
    normalizer = glm.StreamNormalizer("call_t_")
    events = []
    for chunk in chunks:
        events += normalizer.feed(chunk)
    normalizer.done()
    tail, outcome = normalizer.close()
    assert outcome.reason == "tool_calls"
    return [(e.id, e.name, e.arguments) for e in events + tail if isinstance(e, glm.ToolEnd)]


_FINISH_CALLS = wire.Chunk(choices=[wire.ChunkChoice(finish_reason="tool_calls")])


def test_parallel_calls_reusing_index_zero_stay_two_calls():
    """LiteLLM's ollama_chat, Gemini adapters: each parallel call sent whole with its own id and
    name, every one at `index` 0."""
    assert _calls_of([_call(0, "call_A", "read_file", '{"path":"a.py"}'),
                      _call(0, "call_B", "read_file", '{"path":"b.py"}'), _FINISH_CALLS]) == [
        ("call_A", "read_file", '{"path":"a.py"}'), ("call_B", "read_file", '{"path":"b.py"}')]


def test_a_reused_index_takes_the_fragments_that_follow_it():
    assert _calls_of([_call(0, "call_A", "read_file", '{"path":'), _call(0, arguments='"a.py"}'),
                      _call(0, "call_B", "grep", '{"pattern":'), _call(0, arguments='"x"}'), _FINISH_CALLS]) == [
        ("call_A", "read_file", '{"path":"a.py"}'), ("call_B", "grep", '{"pattern":"x"}')]


def test_an_id_repeated_on_every_fragment_or_given_late_is_one_call():
    assert _calls_of([_call(0, "call_A", "read_file", '{"path":'), _call(0, "call_A", arguments='"a.py"}'),
                      _FINISH_CALLS]) == [("call_A", "read_file", '{"path":"a.py"}')]
    # the call started under a synthesized id; the upstream's id came after: still one call
    assert _calls_of([_call(0, name="read_file", arguments='{"path":'), _call(0, "call_late", arguments='"a.py"}'),
                      _FINISH_CALLS]) == [("call_t_0", "read_file", '{"path":"a.py"}')]


@pytest.mark.parametrize("ids", [
    ["call_first", "call_second", "call_second", "call_second"],  # Poolside: another id after the name
    ["id0", "id1", "id2", "id3"],  # mlx-openai-server before its fix: a fresh id on every piece
])
def test_new_ids_on_the_pieces_of_one_call_keep_it_one_call(ids):
    """Some hosts put a different id on the later pieces of the same call: a piece with another
    id but no name of its own goes on with the open call (only a named one starts a new call)."""
    pieces = ['{"path": ', '"src/', 'main.py"}']
    assert _calls_of([_call(0, ids[0], "read_file", ""), *(_call(0, i, arguments=p) for i, p in zip(ids[1:], pieces)),
                      _FINISH_CALLS]) == [(ids[0], "read_file", '{"path": "src/main.py"}')]


# ---- usage counts the ledger can hold ---------------------------------------------------------

def test_upstream_counts_are_clamped_where_they_enter():
    meter = StreamMeter()
    meter.observe(wire.chunk_decoder.decode(json.dumps({"usage": {
        "prompt_tokens": 2**40, "completion_tokens": -5, "total_tokens": -1,
        "prompt_tokens_details": {"cached_tokens": 2**33},
        "completion_tokens_details": {"reasoning_tokens": -2}}}).encode()), delivered=False)
    usage = meter.completed_usage()
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens, usage.cached_tokens,
            usage.reasoning_tokens) == (MAX_COUNT, 0, 0, MAX_COUNT, 0)
    assert MAX_COUNT == 2**31 - 1  # the ledger's int4 columns and arrays


def test_usual_counts_pass_untouched():
    usage = wire.Usage(prompt_tokens=MAX_COUNT, completion_tokens=0, total_tokens=MAX_COUNT)
    meter = StreamMeter()
    meter.observe(wire.Chunk(usage=usage), delivered=False)
    assert meter.usage is usage  # no copy on the usual path


# ---- requests and errors: one meaning on every surface -----------------------------------------

@pytest.mark.parametrize("value", [-1000, -1, 0])
def test_max_tokens_below_one_is_a_400_on_every_surface(value):
    base = {"model": "glm-4.6", "messages": [{"role": "user", "content": "x"}]}
    for surface, body in ((chat.ChatSurface(), {**base, "max_tokens": value}),
                          (chat.ChatSurface(), {**base, "max_completion_tokens": value}),
                          (messages.MessagesSurface(), {**base, "max_tokens": value})):
        with pytest.raises(BridgeError) as raised:
            surface.parse(json.dumps(body).encode())
        assert raised.value.status == 400 and "at least 1" in raised.value.message


@pytest.mark.parametrize("code,status,chat_status,anthropic", [
    ("1113", 429, 402, ("billing_error", 402)), ("1309", 429, 402, ("billing_error", 402)),
    ("1302", 429, 429, ("rate_limit_error", 429)), ("1305", 429, 503, ("overloaded_error", 529)),
    ("1301", 400, 400, ("invalid_request_error", 400)), ("1308", 429, 503, ("overloaded_error", 529)),
])
def test_zai_codes_mean_one_thing_on_every_surface(code, status, chat_status, anthropic):
    error = glm.upstream_error(status, json.dumps({"error": {"code": code, "message": "m"}}).encode(), "r")
    assert chat.ChatSurface().error(error)[0] == chat_status
    anthropic_status, _, body = messages.MessagesSurface().error(error)
    assert (json.loads(body)["error"]["type"], anthropic_status) == anthropic


def test_sampling_values_are_clamped_for_every_surface():
    request = wire.ChatRequest(model="glm-4.6", messages=[], stream=True, temperature=7.0, top_p=0.0,
                               stop=["a", "b"], tools=[wire.Tool(type="function")])
    glm.prepare(request)
    assert (request.temperature, request.top_p, request.stop) == (1.0, 0.01, ["a"])
    assert request.tool_choice == "auto" and request.tool_stream is True


# ---- generated streams: any upstream sequence gives a valid stream in each protocol -------------

@st.composite
def upstream_streams(draw):
    """A stream as any OpenAI-style upstream might send it: reasoning, text and tool fragments in
    any order (tool fragments interleaved by index), a finish reason or none, usage or none,
    [DONE] or not, then cut at any point."""
    rng = random.Random(draw(st.integers(0, 2**32)))
    n_calls = draw(st.integers(0, 3))
    calls = [(f"tool_{i}", json.dumps({"arg": "v" * rng.randint(0, 12), "n": i})) for i in range(n_calls)]
    pieces: list[wire.Chunk] = []
    fragments = []
    for index, (name, arguments) in enumerate(calls):
        cuts = sorted(rng.sample(range(1, len(arguments)), min(3, len(arguments) - 1)))
        parts = [arguments[a:b] for a, b in zip([0] + cuts, cuts + [len(arguments)])]
        fragments.append([(index, name if k == 0 else None, part) for k, part in enumerate(parts)])
    text_first = [wire.Chunk(choices=[wire.ChunkChoice(delta=wire.Delta(reasoning_content="r" * rng.randint(1, 5)))])
                  for _ in range(draw(st.integers(0, 3)))]
    text_first += [wire.Chunk(choices=[wire.ChunkChoice(delta=wire.Delta(content="t" * rng.randint(1, 5)))])
                   for _ in range(draw(st.integers(0, 3)))]
    pieces += text_first
    queues = [list(f) for f in fragments]
    while any(queues):
        queue = rng.choice([q for q in queues if q])
        index, name, part = queue.pop(0)
        pieces.append(wire.Chunk(choices=[wire.ChunkChoice(delta=wire.Delta(tool_calls=[wire.ToolCallDelta(
            index=index, id=f"id{index}" if name else wire.UNSET, type="function" if name else wire.UNSET,
            function=wire.FunctionDelta(name=name if name else wire.UNSET, arguments=part))]))]))
    finish = draw(st.sampled_from([None, "stop", "tool_calls", "length", "sensitive", "network_error",
                                   "content_filter", "abort", "error"]))
    usage = wire.Usage(prompt_tokens=9, completion_tokens=4, total_tokens=13) if draw(st.booleans()) else wire.UNSET
    if finish is not None:
        pieces.append(wire.Chunk(choices=[wire.ChunkChoice(delta=wire.Delta(content=""), finish_reason=finish)],
                                 usage=usage))
    done = draw(st.booleans())
    cut = draw(st.integers(0, len(pieces)))
    whole = cut == len(pieces)
    return pieces[:cut], dict(calls), done and whole, whole and finish is not None


def _framed(chunks: list[wire.Chunk], done: bool, seed: int) -> list[bytes]:
    """The stream as bytes, cut into random pieces, as the network delivers it."""
    data = b"".join(sse.frame(wire.encoder.encode(c)) for c in chunks) + (sse.DONE if done else b"")
    rng = random.Random(seed)
    cuts = sorted(set(rng.randint(1, max(1, len(data) - 1)) for _ in range(rng.randint(0, 12))))
    return [data[a:b] for a, b in zip([0] + cuts, cuts + [len(data)]) if data[a:b]]


def _relay_bytes(pieces: list[bytes], translator) -> bytes:
    normalizer = glm.StreamNormalizer("call_p_")
    decoder = sse.SSEDecoder()
    out = translator.start()
    for piece in pieces:
        for event in decoder.feed(piece):
            if event.data == b"[DONE]":
                normalizer.done()
                continue
            out += translator.feed(normalizer.feed(wire.chunk_decoder.decode(event.data)))
    tail, outcome = normalizer.close()
    out += translator.feed(tail)
    return out + (translator.finish(outcome.reason, wire.Usage()) if outcome.complete
                  else translator.fail(outcome.error))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(upstream_streams(), st.integers(0, 1000))
def test_any_upstream_stream_becomes_a_valid_chat_stream(stream, seed):
    chunks, calls, done, finished = stream
    out = _relay_bytes(_framed(chunks, done, seed), chat.ChatStream("glm-4.6", "p1"))
    events = sse.SSEDecoder().feed(out)
    if events[-1].data == b"[DONE]":  # a clean end: whole tool calls, a finish reason, usage
        chunks_out = openai_chunks(events)
        assert chunks_out[-1]["choices"] == [] and "usage" in chunks_out[-1]
        assert chunks_out[-2]["choices"][0]["finish_reason"] in ("stop", "length", "tool_calls", "content_filter")
        got = _tool_calls(chunks_out)
        assert {c["name"]: c["arguments"] for c in got.values()} == {
            name: arguments for name, arguments in calls.items() if name in {c["name"] for c in got.values()}}
        if finished and chunks_out[-2]["choices"][0]["finish_reason"] != "length":
            assert len(got) == len(calls)  # a whole stream delivers every call, whole
    else:  # a broken end: an error object, never [DONE]
        assert "error" in json.loads(events[-1].data)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(upstream_streams(), st.integers(0, 1000))
def test_any_upstream_stream_becomes_a_valid_messages_stream(stream, seed):
    chunks, calls, done, finished = stream
    out = _relay_bytes(_framed(chunks, done, seed), messages.MessagesStream("glm-4.6", "p2", 1))
    events = [(e.event, json.loads(e.data)) for e in sse.SSEDecoder().feed(out)]
    if events[-1][0] == "message_stop":
        blocks = _check_block_structure(events)
        tools = {b["name"]: b["partial_json"] for b in blocks if b["type"] == "tool_use"}
        for name, arguments in tools.items():
            assert arguments == calls[name]  # joined arguments equal the upstream's
        if finished:
            assert len(tools) == len(calls)
    else:
        assert events[-1][0] == "error" and events[0][0] == "message_start"
        assert "message_stop" not in [name for name, _ in events]
