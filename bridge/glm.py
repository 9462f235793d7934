"""The one GLM normaliser, sans I/O: every surface sees a clean answer, never GLM's quirks.

Upstream side, in:  GLM (or any OpenAI-style) chat chunks, `[DONE]`, the end of the stream.
Surface side, out:  `Reasoning`, `Text`, `ToolStart`, `ToolArgs`, `ToolEnd` events, then one
                    `Outcome`: a complete answer and why it stopped, or a broken one and why.

What it fixes, once for every surface (chat, messages, responses):
- tool calls arrive whole and one at a time, whatever the upstream interleaves: the first call
  streams live; fragments of later calls (by `index`) are held until the stream ends, since a
  call may still receive arguments after the next one began;
- every call has an id (synthesized when the upstream gave none) and a name before its first
  argument; a call whose arguments never came gets `"{}"` (AI-SDK clients never run `""`);
- `stop` with tool calls is `tool_calls`; `sensitive` (GLM) and `content_filter` (OpenAI-style
  hosts) are `content_filter`; `model_context_window_exceeded` is its own reason (the client
  compacts on it; Chat Completions reads it as `length`); `network_error` (GLM), `abort` and
  `error` (vLLM, SGLang: the engine dropped or failed the request) are a broken answer, and so is
  an OpenAI-style host's mid-stream `{"error": ...}` chunk; a reason we do not know is logged once
  and read as `stop`;
- reasoning comes as `reasoning_content` (GLM, SGLang, vLLM before 2026) or `reasoning` (vLLM
  since its rename): the same thing, read from either;
- a stream that ended with a finish reason is complete even without usage; one that just
  stopped, or said `[DONE]` without ever giving a finish reason, is broken; a complete answer
  with no text and no tool call (nothing, or reasoning alone) is a retryable error;
- parallel calls that reuse an `index` with a new `id` (some OpenAI-compatible hosts) stay
  separate calls;
- a client that asked for one call at most (`parallel_tool_calls: false`, Anthropic's
  `disable_parallel_tool_use`) gets the first call alone: GLM has no such switch and may call
  several, so every later call is dropped here, streamed or whole (`one_call`);
- requests: `max_tokens` < 1 refused, sampling values clamped to GLM's ranges, one stop word,
  `tool_choice` auto (all GLM supports; a client's named tool is the only one the surfaces
  offer);
- upstream errors: one meaning per Z.ai business code.
"""
from __future__ import annotations

import hashlib
import logging
import re

import msgspec
from msgspec import UNSET, Struct

from . import wire
from .errors import BridgeError, Kind

log = logging.getLogger("codeplan.glm")


# ---- events ------------------------------------------------------------------------------

class Reasoning(Struct, frozen=True):
    text: str


class Text(Struct, frozen=True):
    text: str


class ToolStart(Struct, frozen=True):
    index: int  # 0, 1, 2... in the order the calls are delivered
    id: str
    name: str


class ToolArgs(Struct, frozen=True):
    index: int
    text: str


class ToolEnd(Struct, frozen=True):
    index: int
    id: str
    name: str
    arguments: str  # the whole arguments: the ToolArgs texts joined


Event = Reasoning | Text | ToolStart | ToolArgs | ToolEnd

STOP, LENGTH, TOOL_CALLS, CONTENT_FILTER = "stop", "length", "tool_calls", "content_filter"
# GLM's own finish reason when the prompt and the answer filled the model's context window: not
# `length` (the client's max_tokens), because a coding agent compacts its history on this one
# and only this one (Codex: `context_length_exceeded`; Anthropic's own stop reason of this name)
CONTEXT_WINDOW = "model_context_window_exceeded"


class Outcome(Struct, frozen=True):
    """How the answer ended. `reason` is set for a complete answer (stop, length, tool_calls,
    content_filter, model_context_window_exceeded); `error` for a broken one, which no client may take for a whole answer."""
    reason: str | None = None
    error: BridgeError | None = None

    @property
    def complete(self) -> bool:
        return self.error is None


def _broken(message: str, code: str) -> Outcome:
    return Outcome(error=BridgeError(Kind.upstream_error, message, code=code))


# ---- the stream --------------------------------------------------------------------------

class _Call:
    __slots__ = ("id", "given_id", "name", "parts", "index", "sent", "dropped")

    def __init__(self, dropped: bool = False) -> None:
        self.id: str | None = None
        # the id the upstream gave (never a synthesized one): a fragment with another id at
        # this call's index is a new call
        self.given_id: str | None = None
        self.name: str | None = None
        self.parts: list[str] = []
        self.index = -1  # delivery index, once started
        self.sent = 0  # parts already delivered
        # a call after the first when the client asked for one call at most: its fragments are
        # read (so they join nothing else) and never delivered
        self.dropped = dropped


class StreamNormalizer:
    """Feed it GLM chunks; it returns clean events. `close()` at the end of the stream.
    `one_call`: the client asked for one tool call at most; later calls are dropped."""

    def __init__(self, call_id_prefix: str, *, one_call: bool = False) -> None:
        self._prefix = call_id_prefix
        self._one_call = one_call
        self._calls: dict[int, _Call] = {}
        # once a tool call is live, what follows is held in arrival order until the end
        self._held: list[_Call | Reasoning | Text] = []
        self._live: _Call | None = None
        self._started = 0
        self._finish: str | None = None
        self._done = False
        self._failure: wire.ChunkError | None = None
        # text or a tool call: what makes a turn. Reasoning alone does not (clients.md §9:
        # Cline fails a turn without either)
        self._answered = False
        self._kept_call = False  # a call was kept (with one_call, the only one)

    def feed(self, chunk: wire.Chunk) -> list[Event]:
        if self._failure is not None:
            return []  # the upstream said the answer failed: nothing after that belongs to it
        # (most chunks carry no `error`: the look is skipped for them)
        failure = wire.stream_failure(chunk) if chunk.error is not UNSET else None
        if failure is not None:
            self._failure = failure
            # the upstream's own words are for the operator (they may name its hardware or
            # internals); the client gets a plain retryable failure
            # blotted as a refusal's words are: a gateway may quote our key here too
            code = failure.code if isinstance(failure.code, int) or (
                isinstance(failure.code, str) and _CODE_SHAPE.fullmatch(failure.code)) else ""
            kind = failure.type if isinstance(failure.type, str) and _CODE_SHAPE.fullmatch(failure.type) else ""
            log.warning("upstream reported an error mid-stream",
                        extra={"upstream_code": code, "upstream_type": kind,
                               "upstream_message": _for_log(failure.message or "")})
            return []
        out: list[Event] = []
        for choice in chunk.choices:
            if choice.index:
                continue  # only the first choice is ever asked for
            if isinstance(choice.finish_reason, str) and choice.finish_reason:
                self._finish = choice.finish_reason
            delta = choice.delta
            reasoning = delta.reasoning_content
            if not (isinstance(reasoning, str) and reasoning):
                reasoning = delta.reasoning  # vLLM's name since late 2025 (wire.Delta)
            if isinstance(reasoning, str) and reasoning:
                self._say(Reasoning(reasoning), out)
            if isinstance(delta.content, str) and delta.content:
                self._say(Text(delta.content), out)
            if isinstance(delta.tool_calls, list):
                for fragment in delta.tool_calls:
                    self._fragment(fragment, out)
        return out

    def done(self) -> None:
        """The upstream said `[DONE]`."""
        self._done = True

    def _say(self, event: Reasoning | Text, out: list[Event]) -> None:
        if isinstance(event, Text):
            self._answered = True
        if self._live is not None or self._held:
            self._held.append(event)
        else:
            out.append(event)

    def _fragment(self, fragment: wire.ToolCallDelta, out: list[Event]) -> None:
        given_id = fragment.id if isinstance(fragment.id, str) and fragment.id else None
        function = fragment.function
        names = isinstance(function, wire.FunctionDelta) and isinstance(function.name, str) and bool(function.name)
        call = self._calls.get(fragment.index)
        if call is None or (names and given_id is not None and call.name is not None
                            and call.given_id is not None and given_id != call.given_id):
            # a new call; or one that reuses a named call's `index` under another id and a name
            # of its own (parallel calls each sent whole at index 0 by some OpenAI-compatible
            # hosts): joining them would give one call with two JSON documents for arguments.
            # A fragment with another id but no name goes on with the open call: some hosts put
            # a new id on every piece of one call (Poolside; mlx-openai-server before its fix).
            # The index now names the new call; the earlier one keeps its place in the delivery order.
            # With one call asked for, a call after the first takes the index all the same (its
            # later fragments must not join the first) but is never delivered.
            call = self._calls[fragment.index] = _Call(dropped=self._one_call and self._kept_call)
            if not call.dropped:
                self._kept_call = True
                self._held.append(call)
        if call.dropped:
            # only what tells a later call from this one is kept
            if given_id is not None and call.given_id is None:
                call.given_id = given_id
            if names and call.name is None:
                call.name = function.name  # type: ignore[union-attr]
            return
        if given_id is not None and call.given_id is None:
            call.given_id = given_id
            if call.id is None and call.index < 0:
                call.id = given_id
        if isinstance(function, wire.FunctionDelta):
            if isinstance(function.name, str) and function.name and call.name is None:
                call.name = function.name
            if isinstance(function.arguments, str) and function.arguments:
                call.parts.append(function.arguments)
        self._answered = True
        if self._live is None and self._held and self._held[0] is call and call.name is not None:
            self._held.pop(0)
            self._start(call, out)
        if self._live is call:
            self._send_args(call, out)

    def _start(self, call: _Call, out: list[Event]) -> None:
        call.index = self._started
        self._started += 1
        if call.id is None:
            call.id = f"{self._prefix}{call.index}"
        out.append(ToolStart(call.index, call.id, call.name or ""))
        self._live = call

    @staticmethod
    def _send_args(call: _Call, out: list[Event]) -> None:
        while call.sent < len(call.parts):
            out.append(ToolArgs(call.index, call.parts[call.sent]))
            call.sent += 1

    def _end(self, call: _Call, out: list[Event]) -> None:
        self._send_args(call, out)
        if not call.parts:
            call.parts.append("{}")
            self._send_args(call, out)
        out.append(ToolEnd(call.index, call.id or "", call.name or "", "".join(call.parts)))

    def close(self) -> tuple[list[Event], Outcome]:
        """The stream ended: deliver what was held, and say how the answer ended."""
        out: list[Event] = []
        if self._live is not None:
            self._end(self._live, out)
            self._live = None
        for item in self._held:
            if isinstance(item, _Call):
                self._start(item, out)
                self._end(item, out)
                self._live = None
            else:
                out.append(item)
        self._held = []
        return out, self._outcome()

    def _outcome(self) -> Outcome:
        if self._failure is not None:
            if self._failure.code == "line_too_long":  # our SSE decoder's cap (sse.MAX_LINE)
                return _broken("The model provider sent an event too large to relay; please retry.",
                               "line_too_long")
            if self._failure.code == "unreadable_chunk":  # an event no mend could read (flight.chunks)
                return _broken("The model provider sent an event the bridge could not read; please retry.",
                               "unreadable_chunk")
            return _broken("The model provider failed mid-answer; please retry.", "upstream_error")
        finish = self._finish
        if finish in _BROKEN_FINISH:
            # the upstream ended the answer unfinished: GLM's inference exception, vLLM's and
            # SGLang's engine dropping the request (`abort`: preempted, out of KV cache, its
            # deadline) or failing it (`error`). The client gets an error, never a whole answer
            return _broken(f"The model failed mid-answer (finish_reason: {finish}); please retry.",
                           _BROKEN_FINISH[finish])
        if finish is None and not self._done:
            return _broken("The model provider's stream broke off before the answer was finished.",
                           "stream_interrupted")
        reason = finish_reason(finish, tools=self._started > 0)
        # `length`, the context window and the filter stay what they are even with reasoning
        # alone: the client's cap or the model's window was reached, and a retry would meet the
        # same end (glm-upstream.md §6: a small cap gives a thinking-only `max_tokens` reply)
        if not self._answered and (finish is None or reason in (STOP, TOOL_CALLS)):
            return _broken("The model returned an empty answer; please retry.", "empty_response")
        if finish is None:
            # `[DONE]` after an answer but no finish reason: GLM, OpenAI, vLLM and SGLang all
            # give one on the last choice chunk, so the upstream stopped without saying the
            # answer was whole (an error chunk it sent in a shape we could not read, a proxy
            # that dropped it). A cut answer taken for a whole one is applied by the client as
            # is; a retry costs one request.
            return _broken("The model provider ended the stream without finishing the answer; please retry.",
                           "stream_unfinished")
        return Outcome(reason=reason)


# finish reasons that end an answer unfinished, and the code its error carries
_BROKEN_FINISH = {"network_error": "network_error", "abort": "upstream_abort", "error": "upstream_failed"}
# finish reasons read as a natural end (`function_call`: OpenAI's older name for a tool call)
_PLAIN_FINISH = {STOP, TOOL_CALLS, "function_call"}
# reasons already logged as unknown: each once per process, and only so many (an upstream that
# puts a new word in every answer must not grow the set without end)
_UNKNOWN_SEEN: set[str] = set()
_UNKNOWN_MAX = 64


def finish_reason(upstream: str | None, *, tools: bool) -> str:
    if upstream == "length":
        return LENGTH
    if upstream == CONTEXT_WINDOW:
        return CONTEXT_WINDOW
    if upstream in ("sensitive", CONTENT_FILTER):
        return CONTENT_FILTER
    if upstream is not None and upstream not in _PLAIN_FINISH and len(_UNKNOWN_SEEN) < _UNKNOWN_MAX:
        said = upstream[:64]  # what is kept and logged of it: an upstream's word, bounded
        if said not in _UNKNOWN_SEEN:
            _UNKNOWN_SEEN.add(said)
            log.warning("upstream gave a finish reason we do not know; read as a natural end",
                        extra={"finish_reason": said})
    return TOOL_CALLS if tools else STOP


def completion_events(completion: wire.Completion, call_id_prefix: str, *,
                      one_call: bool = False) -> tuple[list[Event], Outcome]:
    """A non-streamed answer as the same clean events and outcome a stream would give."""
    normalizer = StreamNormalizer(call_id_prefix, one_call=one_call)
    events: list[Event] = []
    for choice in completion.choices[:1]:
        message = choice.message
        calls = message.tool_calls if isinstance(message.tool_calls, list) else []
        events += normalizer.feed(wire.Chunk(choices=[wire.ChunkChoice(
            delta=wire.Delta(
                content=message.content if isinstance(message.content, str) else UNSET,
                reasoning_content=message.reasoning_content,  # or vLLM's `reasoning` (wire.ResponseMessage)
                tool_calls=[wire.ToolCallDelta(index=i, id=c.id or UNSET, function=wire.FunctionDelta(
                    name=c.function.name, arguments=c.function.arguments)) for i, c in enumerate(calls)]),
            finish_reason=choice.finish_reason or "stop")]))
    if not completion.choices:
        normalizer.done()
    tail, outcome = normalizer.close()
    return events + tail, outcome


class Answer:
    """A whole answer gathered from the events, for the surfaces' non-streamed bodies."""

    __slots__ = ("reasoning", "text", "calls")

    def __init__(self, events: list[Event]) -> None:
        reasoning: list[str] = []
        text: list[str] = []
        self.calls: list[ToolEnd] = []
        for event in events:
            if isinstance(event, Reasoning):
                reasoning.append(event.text)
            elif isinstance(event, Text):
                text.append(event.text)
            elif isinstance(event, ToolEnd):
                self.calls.append(event)
        self.reasoning = "".join(reasoning)
        self.text = "".join(text)


# ---- requests ----------------------------------------------------------------------------

def check_max_tokens(value: int | None, param: str = "max_tokens") -> int | None:
    """The client's output cap; below 1 is a request fault on every surface."""
    if value is not None and value < 1:
        raise BridgeError(Kind.invalid_request, f"`{param}` must be at least 1, got {value}.",
                          param=param)
    return value


def user_id(value: str) -> str:
    """GLM takes an end-user id of 6 to 128 characters (Claude Code sends a long JSON string):
    one outside that range is replaced by a stable digest of it."""
    if 6 <= len(value) <= 128:
        return value
    return "u-" + hashlib.sha256(value.encode()).hexdigest()[:40]


def prepare(request: wire.ChatRequest) -> wire.ChatRequest:
    """Adapt a surface's GLM request to what GLM accepts, the same way for every surface."""
    if isinstance(request.temperature, float | int):
        request.temperature = min(max(float(request.temperature), 0.0), 1.0)
    if isinstance(request.top_p, float | int):
        request.top_p = min(max(float(request.top_p), 0.01), 1.0)
    if isinstance(request.stop, list):
        request.stop = request.stop[:1] or UNSET  # GLM takes at most one stop word
    if isinstance(request.tools, list):
        if request.tools:
            request.tool_choice = "auto"  # the only choice GLM supports
            if request.stream:
                request.tool_stream = True
        else:
            request.tools = UNSET
            request.tool_choice = UNSET
    return request


# ---- errors ------------------------------------------------------------------------------

_QUOTA_CODES = {"1308", "1310", "1316", "1317", "1318", "1319", "1320", "1321"}
_AUTH_CODES = {"1000", "1001", "1002", "1003", "1004"}
# Z.ai's documented meanings of its request-fault codes (glm-upstream.md §7.3), in our words:
# the caller learns what to fix without the upstream's own text
_REFUSALS = {
    "1210": "a parameter is invalid", "1211": "the model does not exist",
    "1212": "the method is not supported", "1213": "a required field is missing",
    "1214": "a field is invalid", "1215": "two fields exclude each other",
    "1220": "the model is not available to the service's upstream account",
    "1221": "the API is offline", "1222": "the API does not exist",
    "1311": "the model is not included in the service's upstream plan",
}
# refusals of one model to the upstream account: 1211 no such model, 1220 not entitled, 1311 not
# in the plan (glm-upstream.md §7.3, §16)
_MODEL_CODES = {"1211", "1220", "1311"}
# refusals of the request itself
_REQUEST_CODES = {"1210", "1212", "1213", "1214", "1215"}
# what of an upstream's words the operator's log keeps: a gateway may quote our key, an org id
# or a balance there, so anything shaped like a credential is blotted before it is written
_SAID_LIMIT = 300
# what follows a word that announces a credential (Authorization: Basic x, Bearer x, api_key=x)
_CREDENTIAL_WORD = re.compile(
    r"(?i)\b((?:authorization[\s:=\"']+)?(?:bearer|basic)|api[ _-]?key|access[ _-]?token|token|secret|"
    r"password|passwd|pwd)([\s:=\"']+)[^\s\"',;]+")
# a URL's password (scheme://user:password@)
_URL_PASSWORD = re.compile(r"(\b[a-z][a-z0-9+.-]*://[^/\s:@]*:)[^@\s/]+@", re.IGNORECASE)
# a long run of letters and digits both, as keys are: model ids ("meta-llama/Llama-3.1-70B-
# Instruct"), URLs and words are kept (separators break their runs), and so are request ids
# (a UUID's groups are shorter). A dot does not break a run: a Z.ai key is `id.secret`, and a
# run cut at its dot left the 16-character secret under the length that blots a piece
_CREDENTIAL_SHAPE = re.compile(r"(?=[A-Za-z0-9_\-+=.]*[0-9])(?=[A-Za-z0-9_\-+=.]*[A-Za-z])"
                               r"(?<![A-Za-z0-9_\-+=.])[A-Za-z0-9_+=.]*(?:-[A-Za-z0-9_+=.]+)*")


def _blot_run(found: re.Match) -> str:
    run = found.group(0)
    # a key is one long piece ("sk-" and its 40 characters, a Z.ai key's id.secret); an id is
    # short pieces joined
    longest = max((len(piece) for piece in run.split("-")), default=0)
    return "[redacted]" if longest >= 24 else run


def _for_log(said: str) -> str:
    said = _URL_PASSWORD.sub(r"\1[redacted]@", said)
    said = _CREDENTIAL_WORD.sub(r"\1\2[redacted]", said)
    said = _CREDENTIAL_SHAPE.sub(_blot_run, said)
    return said if len(said) <= _SAID_LIMIT else said[:_SAID_LIMIT] + "…"


# an overflow in an OpenAI-compatible gateway's words (LiteLLM, vLLM, Fireworks, OpenAI's own):
# recognised, so the client still gets the overflow it compacts on, in our words
_OVERFLOW = re.compile(r"(?i)context[ _-]?(length|window)|maximum context|prompt is too long|too many tokens"
                       r"|tokens? exceed|exceeds? the (model'?s? )?(max|context)")


# the longest wait an upstream's Retry-After may ask of a client (longer: the client may come
# back sooner and be told again)
_MOST_WAIT = 60


def _asked_wait(retry_after: str | None, default: int) -> int:
    """The seconds a client is told to wait: the upstream's Retry-After (delta-seconds) when it
    asks longer than our default, at most _MOST_WAIT."""
    asked = retry_after.strip() if retry_after else ""
    if not asked.isdigit():
        return default
    return max(default, min(int(asked[:6]), _MOST_WAIT))


# what may pass as a code: a business code ("1302") or an identifier ("context_length_exceeded");
# a gateway's free text in the field is not repeated to clients
_CODE_SHAPE = re.compile(r"[A-Za-z0-9_.:-]{1,64}")


def _error_said(body: bytes) -> tuple[str, str]:
    """The code and the message of an upstream's error body, in whichever shape it came. A
    number in `code` is the HTTP status (vLLM, SGLang), not a business code: dropped."""
    try:
        said = wire.error_decoder.decode(body)
    except msgspec.DecodeError:
        return "", ""
    detail = said.error
    if isinstance(detail, wire.ErrorDetail):
        code, message = detail.code, detail.message
    else:
        code, message = said.code, detail or said.message
    code = code if isinstance(code, str) and _CODE_SHAPE.fullmatch(code) else ""
    return code, message or ""


def upstream_error(status: int, body: bytes, request_id: str, retry_after: str | None = None) -> BridgeError:
    """An upstream's error response, with one meaning per Z.ai business code. The client gets
    that meaning in our own fixed words, never the upstream's: behind an OpenAI-compatible
    gateway (LiteLLM, OpenRouter, a proxy) the text may name the operator's key, organisation
    or balance, and every user would read it. The upstream's words go to the operator's log.
    `retry_after`: the upstream's Retry-After header, which a rate limit or an overload passes
    on (the text that said "try again in 20s" is no longer the client's to read).

    `invalid_request` is kept for faults of the user's own request (400, 422, codes 1210-1215):
    Cline reads any Anthropic invalid_request_error as an overflow and cuts the conversation
    (clients.md). What the operator's upstream account or deployment refuses is said as such:
    credentials (401, 1000-1004), billing (402), a model it may not serve (1211, 1220, 1311), a
    deployment that does not answer the path or the model's name (404), a proxy's 408."""
    code, message = _error_said(body)
    if message:
        log.warning("upstream refused a request", extra={
            "status": status, "code": code, "request_id": request_id, "upstream_said": _for_log(message)})
    # a business code is GLM's number; anything else from a gateway is not repeated in a message
    # (the OpenAI shape carries `code` as it always did)
    numbered = f"code {code}, " if code.isdigit() and len(code) <= 6 else ""
    if code in ("1113", "1309") or status == 402:
        # 402: an OpenAI-compatible gateway's "out of credit" (OpenRouter, LiteLLM budgets)
        return BridgeError(Kind.upstream_billing,
                           f"The model provider refused the request for billing reasons ({numbered}HTTP {status}); "
                           f"this is not retryable. Request id {request_id}.", code=code or None)
    if code in ("1302", "1303"):
        # GLM's documented meanings: 1302 too many requests at once, 1303 too many in a row
        limit = "concurrency" if code == "1302" else "request rate"
        return BridgeError(Kind.upstream_rate_limited,
                           f"The model provider is limiting the service's {limit} ({numbered}HTTP {status}); "
                           f"retry shortly. Request id {request_id}.", code=code,
                           retry_after=_asked_wait(retry_after, 2))
    if code == "1305" or status == 529:
        return _overloaded(status, numbered, code, request_id, retry_after)
    if code in _QUOTA_CODES:
        # the service's own upstream plan ran dry: capacity on our side, retry later
        return BridgeError(Kind.upstream_overloaded,
                           f"The service is at capacity; retry shortly. Request id {request_id}.",
                           code=code, retry_after=30)
    if code == "1301":
        return BridgeError(Kind.content_policy,
                           "The model provider's content safety review blocked this request (1301); "
                           f"rephrase it or remove the flagged content. Request id {request_id}.", code=code)
    if code in ("1261", "context_length_exceeded") or (
            status in (400, 413) and _OVERFLOW.search(message or "") is not None):
        # worded for every client's overflow matcher: Claude Code's "prompt is too long: " is
        # prefixed by the Messages surface, Cline's "context window" / "maximum context" and
        # OpenCode's "exceeds the context window" are here, Codex reads the code
        return BridgeError(Kind.context_length,
                           "The prompt exceeds the context window (the model's maximum context length); "
                           f"compact or shorten the conversation. Request id {request_id}.",
                           code="context_length_exceeded")
    if code in _MODEL_CODES:
        # the upstream account may not use this model: no key's fault, and the same for every
        # key of it (the router tries another profile serving the model, if any). Not the user's
        # request fault either: a model not available, as OpenAI says it (404 model_not_found;
        # Anthropic's not_found_error)
        return BridgeError(Kind.not_found,
                           f"The model is not available from the service's model provider ({numbered}HTTP {status}): "
                           f"{_REFUSALS[code]}. Request id {request_id}.", code="model_not_found")
    if code in _REQUEST_CODES:
        return BridgeError(Kind.invalid_request,
                           f"The model provider rejected the request ({numbered}HTTP {status}): {_REFUSALS[code]}. "
                           f"Request id {request_id}.", code=code)
    if status == 401 or code in _AUTH_CODES:
        log.error("upstream rejected our key", extra={"status": status, "code": code})
        return BridgeError(Kind.upstream_error,
                           f"The model provider rejected the service's credentials. Request id {request_id}.")
    if status == 403:
        # GLM says a bad key with 401 (1000-1004); a plain 403 comes from what stands before a
        # model (a gateway's moderation, a WAF) and is about this request, the same on every key:
        # neither retried nor any key's fault (cooling each key on one user's flagged request
        # would take the bridge out of service)
        return BridgeError(Kind.permission, f"The model provider refused this request ({numbered}HTTP 403). "
                           f"Request id {request_id}.", code=code or None)
    if status == 429:
        return BridgeError(Kind.upstream_rate_limited,
                           f"The model provider is rate-limiting the service ({numbered}HTTP {status}); "
                           f"retry shortly. Request id {request_id}.", code=code or None,
                           retry_after=_asked_wait(retry_after, 2))
    if status == 503:
        # an upstream (or the proxy before it) with no capacity now: its wait passed on
        return _overloaded(status, numbered, code, request_id, retry_after)
    if status in (504, 524):
        # a gateway before the model waited for it and gave up (524: Cloudflare's): the model
        # may have computed the whole answer. Not sent again (the router's own read timeout)
        return BridgeError(Kind.upstream_timeout,
                           f"The model provider timed out before answering (HTTP {status}). "
                           f"Request id {request_id}.", code=code or None)
    if status in (404, 408):
        # 404: a deployment that does not serve this path or model name (vLLM's
        # --served-model-name, a wrong base URL); 408: a proxy that gave up reading our request
        return BridgeError(Kind.upstream_error,
                           f"The model provider could not serve the request (HTTP {status}). "
                           f"Request id {request_id}.", code=code or None)
    if 400 <= status < 500:
        meaning = _REFUSALS.get(code, "check the model and the request's parameters")
        return BridgeError(Kind.invalid_request,
                           f"The model provider rejected the request ({numbered}HTTP {status}): {meaning}. "
                           f"Request id {request_id}.", code=code or None)
    return BridgeError(Kind.upstream_error,
                       f"The model provider failed (HTTP {status}). Request id {request_id}.",
                       code=code or None)


def _overloaded(status: int, numbered: str, code: str, request_id: str, retry_after: str | None) -> BridgeError:
    return BridgeError(Kind.upstream_overloaded,
                       f"The model provider is temporarily overloaded ({numbered}HTTP {status}); "
                       f"retry shortly. Request id {request_id}.", code=code or None,
                       retry_after=_asked_wait(retry_after, 5))


# ---- a refusal inside a 200 ----------------------------------------------------------------

class _Carried(Struct):
    """A whole answer's body as far as telling an answer from a refusal needs: the error's
    fields, and whether choices or usage are there (their contents are not decoded)."""
    error: wire.ErrorDetail | str | None = None
    object: str | None = None  # vLLM's and SGLang's older shape: {"object": "error", ...}
    code: str | int | None = None
    choices: list[msgspec.Raw] = msgspec.field(default_factory=list)
    usage: msgspec.Raw = msgspec.Raw(b"")


_carried_decoder = msgspec.json.Decoder(_Carried)


def _stands_for(code: str | int | None) -> int:
    """The HTTP status a refusal carried in a 200 would have had: the one its body names (a
    number in `code` is the HTTP status for vLLM, SGLang and llama-server, a string of one for
    LiteLLM), 401 for GLM's credential codes (GLM says them with a 401), else 200 (the meaning is
    in the business code, or nowhere)."""
    if isinstance(code, str) and len(code) == 3 and code.isascii() and code.isdigit():
        code = int(code)
    if isinstance(code, int) and 400 <= code <= 599:
        return code
    if code in _AUTH_CODES:
        return 401
    return 200


def carried_refusal(body: bytes, request_id: str) -> tuple[int, BridgeError] | None:
    """A whole answer that is only a refusal: `{"error": ...}` (or vLLM's older
    `{"object": "error", ...}`) with no choices and no usage, which llama-server, LiteLLM and
    some GLM proxies send with status 200. Returns the status it stands for (`_stands_for`) and
    its error as `upstream_error` reads it with that status, so the router blames, cools and
    retries as it would for the same refusal with its status; None for anything else (an answer;
    a body that is not JSON is the answer's reader's to refuse). Most answers cost one substring
    search: `"error"` stands in an answer only as a key or value (its text escapes its quotes),
    and one with `"finish_reason": "error"` is decoded here without its choices' contents."""
    if b'"error"' not in body:
        return None
    try:
        said = _carried_decoder.decode(body)
    except msgspec.DecodeError:
        return None
    if said.choices or wire.present(said.usage) or (not said.error and said.object != "error"):
        return None
    detail = said.error
    status = _stands_for(detail.code if isinstance(detail, wire.ErrorDetail) else said.code)
    return status, upstream_error(status, body, request_id)
