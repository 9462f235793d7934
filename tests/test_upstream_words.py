"""What of an upstream's and a user's words may reach others: an upstream's error text never
reaches a client (a gateway in front of the model may quote the operator's key, organisation or
balance there), and a WebSocket frame's payload (the user's prompt, the model's answer) never
reaches the log, at any level."""
from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from websockets.frames import Frame, Opcode
from websockets.sync.client import connect

from bridge import glm
from bridge.errors import Kind
from bridge.surfaces import chat, messages, responses
from service.logs import RedactHeaders

from .conftest import free_port, new_user, start_bridge

UPSTREAM_KEY = "sk-CANARYupstreamKey0123456789abcdef"
ORG = "org-CANARYorganisation"
SAID = f"API key {UPSTREAM_KEY} of organisation {ORG} has a balance of $3.21 CANARYbalance"


# ---- an upstream's error text stays in the operator's log --------------------------------------

# (HTTP status, business code) -> (kind, client status on Chat, code, retry-after): as before the mend
KINDS = [
    ((429, "1302"), (Kind.upstream_rate_limited, 429, "1302", 2)),
    ((429, "1303"), (Kind.upstream_rate_limited, 429, "1303", 2)),
    ((429, ""), (Kind.upstream_rate_limited, 429, None, 2)),
    ((429, "1305"), (Kind.upstream_overloaded, 503, "1305", 5)),
    ((529, ""), (Kind.upstream_overloaded, 503, None, 5)),
    ((400, "1301"), (Kind.content_policy, 400, "1301", None)),
    ((400, "1261"), (Kind.context_length, 400, "context_length_exceeded", None)),
    ((400, "1214"), (Kind.invalid_request, 400, "1214", None)),
    ((403, "1214"), (Kind.invalid_request, 400, "1214", None)),  # the code says the request's fault
    ((400, ""), (Kind.invalid_request, 400, None, None)),
    ((422, "anything"), (Kind.invalid_request, 400, "anything", None)),
    # the upstream account may not use the model: not the user's request fault (Cline cuts the
    # conversation on any Anthropic invalid_request_error), a model not available
    ((403, "1220"), (Kind.not_found, 404, "model_not_found", None)),
    ((403, "1311"), (Kind.not_found, 404, "model_not_found", None)),
    ((400, "1211"), (Kind.not_found, 404, "model_not_found", None)),
    # the operator's side: its deployment (404: vLLM's served-model-name), a proxy (408)
    ((404, ""), (Kind.upstream_error, 502, None, None)),
    ((408, ""), (Kind.upstream_error, 502, None, None)),
    ((429, "1113"), (Kind.upstream_billing, 402, "1113", None)),
    ((402, ""), (Kind.upstream_billing, 402, None, None)),  # a gateway's "out of credit"
    ((429, "1308"), (Kind.upstream_overloaded, 503, "1308", 30)),
    ((401, "1002"), (Kind.upstream_error, 502, None, None)),
    ((403, ""), (Kind.permission, 403, None, None)),  # a gateway's or WAF's refusal of this request
    ((403, "1002"), (Kind.upstream_error, 502, None, None)),  # our key's credentials
    ((500, "500"), (Kind.upstream_error, 502, "500", None)),
    ((503, ""), (Kind.upstream_overloaded, 503, None, 5)),
    ((504, ""), (Kind.upstream_timeout, 504, None, None)),
    ((524, ""), (Kind.upstream_timeout, 504, None, None)),
]


@pytest.mark.parametrize("upstream, expected", KINDS, ids=[f"{s}-{c or 'none'}" for (s, c), _ in KINDS])
def test_no_upstream_words_reach_any_surface(upstream, expected, caplog):
    status, code = upstream
    body = json.dumps({"error": {"code": code, "message": SAID}}).encode()
    with caplog.at_level(logging.WARNING, logger="codeplan.glm"):
        error = glm.upstream_error(status, body, "req-1")
    assert (error.kind, error.status, error.code, error.retry_after) == expected
    shown = [error.message, chat.ChatSurface().error(error)[2].decode(),
             messages.MessagesSurface().error(error)[2].decode(), *responses.failure(error)]
    for text in shown:
        assert "CANARY" not in text and "3.21" not in text, text
    # the operator still reads what the upstream said, blotted where it looks like a credential
    said = [r for r in caplog.records if getattr(r, "upstream_said", None)]
    assert said and said[0].levelno == logging.WARNING
    assert (said[0].status, said[0].code, said[0].request_id) == (status, code, "req-1")
    assert "CANARYbalance" in said[0].upstream_said
    assert UPSTREAM_KEY not in said[0].upstream_said and "CANARYupstreamKey" not in said[0].upstream_said


def test_upstream_words_in_the_log_are_bounded_and_blotted():
    long = "Bearer short-key " + "x" * 1000
    logged = glm._for_log(long)
    assert "short-key" not in logged and len(logged) <= 301
    assert "token=abc123" not in glm._for_log("bad token=abc123 here")


def test_glm_overflow_still_reads_as_every_client_matches():
    """GLM's 1261 in our words: Claude Code compacts on "prompt is too long", Cline on
    "context window" / "maximum context", OpenCode on "exceeds the context window", Codex on the code."""
    error = glm.upstream_error(400, json.dumps({"error": {"code": "1261", "message": SAID}}).encode(), "r")
    anthropic = json.loads(messages.MessagesSurface().error(error)[2])["error"]["message"]
    assert anthropic.startswith("prompt is too long: ")
    assert "exceeds the context window" in error.message and "maximum context length" in error.message
    assert responses.failure(error)[0] == "context_length_exceeded"
    assert json.loads(chat.ChatSurface().error(error)[2])["error"]["code"] == "context_length_exceeded"


class _Quoting(BaseHTTPRequestHandler):
    """An OpenAI-compatible gateway that quotes the key it was sent in its refusals."""
    status = 403
    code = "1220"
    retry_after = ""  # a Retry-After header to send, when set

    def do_POST(self) -> None:  # noqa: N802
        self.rfile.read(int(self.headers.get("content-length") or 0))
        bearer = (self.headers.get("authorization") or "").removeprefix("Bearer ")
        error = {"message": f"API key {bearer} of organisation {ORG} may not do this", "type": "refused"}
        if self.code:
            error["code"] = self.code
        body = json.dumps({"error": error}).encode()
        self.send_response(self.status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        if self.retry_after:
            self.send_header("retry-after", self.retry_after)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def quoting_upstream():
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), _Quoting)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()


@pytest.mark.parametrize("status, code", [(403, "1220"), (429, ""), (400, "1214"), (404, "")])
def test_a_gateway_quoting_our_key_is_not_repeated_to_clients(database, quoting_upstream, status, code):
    _Quoting.status, _Quoting.code = status, code
    bridge = start_bridge(database, f"http://127.0.0.1:{quoting_upstream.server_address[1]}/v4",
                          CODEPLAN_UPSTREAM_KEYS=UPSTREAM_KEY)
    try:
        key = new_user(database)
        said = "hi"
        answers = [
            httpx.post(bridge.url + "/v1/chat/completions", timeout=30, headers={"authorization": f"Bearer {key}"},
                       json={"model": "glm-4.6", "messages": [{"role": "user", "content": said}]}),
            httpx.post(bridge.url + "/v1/messages", timeout=30,
                       headers={"x-api-key": key, "anthropic-version": "2023-06-01"},
                       json={"model": "glm-4.6", "max_tokens": 50, "messages": [{"role": "user", "content": said}]}),
            httpx.post(bridge.url + "/v1/responses", timeout=30, headers={"authorization": f"Bearer {key}"},
                       json={"model": "glm-4.6", "input": said}),
        ]
    finally:
        bridge.stop()
    for answer in answers:
        assert 400 <= answer.status_code < 600 and answer.json()["error"]["message"], answer.text
        assert "CANARY" not in answer.text, answer.text
    out = bridge.output()
    assert "upstream refused a request" in out and "may not do this" in out  # the log has the words...
    assert UPSTREAM_KEY not in out  # ...but never the key


@pytest.mark.parametrize("header, told", [("20", 20), (None, 2), ("1", 2), ("soon", 2), ("86400", 60)])
def test_an_upstreams_retry_after_is_passed_on_bounded(header, told):
    """A rate limit's own words are not the client's any more ("try again in 20s"): its
    Retry-After header is, when it asks longer than our default, at most a minute."""
    error = glm.upstream_error(429, b'{"error": {"message": "slow down"}}', "r", header)
    assert (error.kind, error.retry_after) == (Kind.upstream_rate_limited, told)


@pytest.mark.parametrize("header, told", [("20", 20), (None, 5), ("86400", 60)])
def test_an_upstream_503s_retry_after_is_passed_on_bounded(header, told):
    """An upstream's (or its proxy's) 503 was a plain 502 and its Retry-After dropped: it is
    an overload, with the wait it asks, as 1305 and 529 are."""
    error = glm.upstream_error(503, b'{"error": {"message": "no capacity"}}', "r", header)
    assert (error.kind, error.status, error.retry_after) == (Kind.upstream_overloaded, 503, told)
    status, headers, _ = messages.MessagesSurface().error(error)
    assert (status, headers["retry-after"], headers["x-should-retry"]) == (529, str(told), "true")


# what each surface calls an operator-side refusal: never the user's invalid_request_error
OPERATOR_SIDE = [
    (402, {"error": {"message": "Insufficient credits. Add more using https://openrouter.ai/settings/credits",
                     "code": 402}}, "billing_error"),
    (403, {"error": {"code": "1220", "message": "You do not have permission to access this model"}}, "not_found_error"),
    (403, {"error": {"code": "1311", "message": "model not in plan"}}, "not_found_error"),
    (404, {"object": "error", "message": "The model `glm-4.6` does not exist.", "type": "NotFoundError",
           "code": 404}, "api_error"),
    (408, {"error": {"message": "Request Timeout"}}, "api_error"),
]


@pytest.mark.parametrize("status, body, anthropic", OPERATOR_SIDE,
                         ids=["402", "403-1220", "403-1311", "404", "408"])
def test_an_operator_side_refusal_is_not_the_users_invalid_request(status, body, anthropic):
    """Cline reads any Anthropic invalid_request_error as an overflow and truncates the
    conversation (clients.md): the operator's billing, credentials, entitlement or deployment is
    no fault of the user's request, and is not said as one on any surface."""
    error = glm.upstream_error(status, json.dumps(body).encode(), "r")
    said = json.loads(messages.MessagesSurface().error(error)[2])["error"]
    assert said["type"] == anthropic
    assert json.loads(chat.ChatSurface().error(error)[2])["error"]["type"] != "invalid_request_error" \
        or error.kind is Kind.not_found  # OpenAI's own model_not_found is a 404 invalid_request_error
    assert responses.failure(error)[0] != "invalid_prompt" or error.kind is Kind.not_found


def test_a_gateways_retry_after_reaches_the_client(database, quoting_upstream):
    _Quoting.status, _Quoting.code, _Quoting.retry_after = 429, "rate_limit_exceeded", "20"
    bridge = start_bridge(database, f"http://127.0.0.1:{quoting_upstream.server_address[1]}/v4",
                          CODEPLAN_UPSTREAM_KEYS=UPSTREAM_KEY)
    try:
        key = new_user(database)
        answer = httpx.post(bridge.url + "/v1/chat/completions", timeout=30, headers={"authorization": f"Bearer {key}"},
                            json={"model": "glm-4.6", "messages": [{"role": "user", "content": "hi"}]})
    finally:
        bridge.stop()
        _Quoting.retry_after = ""
    assert answer.status_code == 429 and answer.headers["retry-after"] == "20", (answer.headers, answer.text)


# ---- WebSocket frames are logged as their kind and size -----------------------------------------

@pytest.mark.parametrize("opcode", list(Opcode), ids=[o.name for o in Opcode])
@pytest.mark.parametrize("direction", ["<", ">"])
def test_a_frame_record_keeps_only_its_kind_and_size(opcode, direction):
    payload = b"\x03\xe8CANARYframe" if opcode is Opcode.CLOSE else b'{"input":"CANARYframe"}'
    record = logging.LogRecord("uvicorn.error", logging.DEBUG, "", 0, f"{direction} %s",
                               (Frame(opcode, payload),), None)
    assert RedactHeaders().filter(record)
    assert record.getMessage() == f"{direction} {opcode.name} [{len(payload)} bytes]"
    # and one already put into words (another websockets version, another logger) alike
    worded = logging.LogRecord("uvicorn.error", logging.INFO, "", 0,
                               f"{direction} {Frame(opcode, payload)}", (), None)
    RedactHeaders().filter(worded)
    assert "CANARY" not in worded.getMessage() and worded.getMessage().startswith(f"{direction} {opcode.name}")


def test_debug_log_has_no_websocket_prompt(database, simulator):
    bridge = start_bridge(database, simulator.url + "/api/coding/paas/v4", CODEPLAN_LOG_LEVEL="debug")
    try:
        key = new_user(database)
        url = bridge.url.replace("http://", "ws://") + "/v1/responses"
        beta = {"openai-beta": "responses_websockets=2026-02-06"}
        with connect(url, additional_headers={"authorization": f"Bearer {key}", **beta}) as socket:
            for create in ({"type": "response.create", "model": "glm-4.6", "input": "CANARYprompt"},
                           # long, as Codex sends: instructions first, the user's latest words last
                           {"type": "response.create", "model": "glm-4.6", "instructions": "Be terse. " * 200,
                            "input": [{"role": "user", "content": "the db password is CANARYtail"}]}):
                socket.send(json.dumps(create, separators=(",", ":")))
                while json.loads(socket.recv(timeout=30))["type"] not in (
                        "response.completed", "response.incomplete", "response.failed", "error"):
                    pass
    finally:
        bridge.stop()
    out = bridge.output()
    assert "CANARYprompt" not in out and "CANARYtail" not in out
    assert '"msg":"< TEXT [' in out and '"msg":"> TEXT [' in out  # frames are still seen, by size
    assert key not in out  # the handshake's Authorization stays redacted


# ---- an OpenAI-compatible gateway's overflow, and what the operator's log keeps ----------------

GATEWAY_OVERFLOWS = [
    # LiteLLM proxy (its code is the status as a string)
    {"error": {"message": "litellm.ContextWindowExceededError: This model's maximum context length is "
                          "131072 tokens. However, you requested 250000 tokens.", "type": None, "code": "400"}},
    # OpenAI's shape, with the code
    {"error": {"message": "This model's maximum context length is 131072 tokens. However, your messages "
                          "resulted in 250000 tokens.", "type": "invalid_request_error",
               "code": "context_length_exceeded"}},
    # Fireworks-style, no code
    {"error": {"message": "The prompt is too long: 250000, model maximum context length: 131072",
               "type": "invalid_request_error"}},
    # OpenAI's shape with `code: null`
    {"error": {"message": "This model's maximum context length is 131072 tokens. However, your messages "
                          "resulted in 250000 tokens.", "type": "invalid_request_error", "param": "messages",
               "code": None}},
    # vLLM and SGLang today: the code is the HTTP status, a number
    {"error": {"message": "This model's maximum context length is 131072 tokens. However, you requested "
                          "250000 tokens (249000 in the messages, 1000 in the completion).",
               "type": "BadRequestError", "param": None, "code": 400}},
    # vLLM before its `error` envelope (and the servers copied from it): flat
    {"object": "error", "message": "This model's maximum context length is 131072 tokens. However, you "
                                   "requested 250000 tokens.", "type": "BadRequestError", "param": None, "code": 400},
]


@pytest.mark.parametrize("body", GATEWAY_OVERFLOWS)
def test_a_gateways_overflow_is_still_an_overflow_in_our_words(body):
    """Only GLM's 1261 was recognised: another upstream's overflow became a plain 400, and Cline,
    Roo and OpenCode, which compact on overflow wording, stopped compacting."""
    error = glm.upstream_error(400, json.dumps(body).encode(), "req-1")
    assert error.kind is Kind.context_length and error.code == "context_length_exceeded"
    assert "context window" in error.message and "131072" not in error.message


@pytest.mark.parametrize("said, secret", [
    ("login failed for pwd hunter2x", "hunter2x"),
    ("upstream sent Authorization: Basic dXNlcjpwYXNz", "dXNlcjpwYXNz"),
    ("cannot reach postgres://litellm:hunter2pw@db:5432/litellm", "hunter2pw"),
    ("Incorrect API key provided: sk-proj-abc123def456ghi789jkl012mno345", "abc123def456ghi789jkl012mno345"),
])
def test_the_log_blots_credentials_by_word_by_url_and_by_shape(said, secret):
    assert secret not in glm._for_log(said)


@pytest.mark.parametrize("said, kept", [
    ("The model `meta-llama/Llama-3.1-70B-Instruct` does not exist", "meta-llama/Llama-3.1-70B-Instruct"),
    ("Invalid model name passed in model=deepseek-ai/DeepSeek-V3.1", "deepseek-ai/DeepSeek-V3.1"),
    ("litellm.ContextWindowExceededError: too long", "litellm.ContextWindowExceededError"),
    ("see https://docs.z.ai/api-reference/api-code", "https://docs.z.ai/api-reference/api-code"),
    ("Missing required key 'messages' in request", "'messages'"),
    ("request 9f1c2a7e-3b4d-4e5f-8a9b-0c1d2e3f4a5b failed", "9f1c2a7e-3b4d-4e5f-8a9b-0c1d2e3f4a5b"),
])
def test_the_log_keeps_what_the_operator_needs(said, kept):
    """Model ids (the commonest operator mistake), URLs, field names and request ids stay."""
    assert kept in glm._for_log(said)


@pytest.mark.parametrize("body, code", [
    ({"error": {"message": "m", "code": 400}}, None),  # vLLM's HTTP status is no business code
    ({"object": "error", "message": "m", "type": "BadRequestError", "code": 404}, None),
    ({"error": {"message": "m", "code": f"quota of {ORG} is spent"}}, None),  # free text in the field
    ({"error": {"message": "m", "code": "x" * 65}}, None),
    ({"error": {"message": "m", "code": "model_not_found"}}, "model_not_found"),
    ({"error": "a bare string"}, None),
])
def test_only_a_code_shaped_code_reaches_the_client(body, code, caplog):
    """The `code` field went to clients as sent: a gateway may put anything there, and a body
    whose code was a number (vLLM, SGLang) could not be read at all, so its message, an overflow
    included, was lost."""
    with caplog.at_level(logging.WARNING, logger="codeplan.glm"):
        error = glm.upstream_error(400, json.dumps(body).encode(), "req-1")
    assert error.kind is Kind.invalid_request and error.code == code
    assert ORG not in chat.ChatSurface().error(error)[2].decode()
    assert "upstream refused a request" in caplog.text  # the message was read, for the operator


# Z.ai's key shape (glm-upstream.md section 2): a 32-hex id, a dot, a 16-character secret
ZAI_KEY = "0f3a9c2e7b1d4e6f8a5c3b2d1e0f9a8b.Q7xLm2Rt9VbN4kPz"


@pytest.mark.parametrize("said", [
    f"Authentication failed for key {ZAI_KEY}",
    f"invalid credentials {ZAI_KEY}",
    f"令牌已过期或验证不正确: {ZAI_KEY}",
])
def test_the_log_blots_both_halves_of_a_zai_key(said):
    """The run was cut at the key's dot: the 32-hex id was blotted, the secret half (16
    characters, under the length that blots a piece) was written to the log."""
    logged = glm._for_log(said)
    assert "Q7xLm2Rt9VbN4kPz" not in logged and "0f3a9c2e7b1d4e6f" not in logged, logged


def test_an_error_event_mid_stream_is_logged_without_the_key_it_quotes(caplog):
    """LiteLLM's and vLLM's `data: {"error": ...}` mid-stream: its message was logged as sent,
    so a gateway quoting the key it was given put our whole upstream key in the log."""
    from bridge import wire

    normalizer = glm.StreamNormalizer("c_")
    key = "sk-CANARYupstreamKey" + "7f3a9c" * 4
    failure = wire.Chunk(error=wire.ChunkError(message=f"Incorrect API key provided: {key}",
                                               type=f"auth {key}", code=401))
    with caplog.at_level(logging.WARNING, logger="codeplan.glm"):
        normalizer.feed(failure)
    record = next(r for r in caplog.records if r.getMessage() == "upstream reported an error mid-stream")
    assert "CANARYupstreamKey" not in record.upstream_message + str(record.upstream_type)
    assert record.upstream_message.startswith("Incorrect API key")  # the words kept, the key not
    assert record.upstream_code == 401  # vLLM's HTTP status, kept for the operator
