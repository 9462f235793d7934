"""What the GLM simulator answers, decided without I/O.

`plan(request)` turns a chat request into a `Script`: the pieces to send (reasoning, text, tool
calls), how it ends and the usage to report. The server (server.py) only paces and frames it.

Its token counts are its own honest count of what it sends, made with a tokenizer other than
the bridge's estimator (cl100k_base, standing in for GLM's own), so estimates and reported
counts differ the way they do against the real GLM-4.6.

A request can steer the simulator with a directive anywhere in its last user message:
``[[sim tokens=40 reasoning=20 ttft=200 tps=50 fault=reset tool=read_file tools=2 text="hi"]]``;
numbers are clamped to DIRECTIVE_BOUNDS, and one it cannot read is answered 400 (1210).
Faults, comma-separated: before any token 1113 1302 1305 1308 1309 1214 1261 1301 500; mid-stream
reset, malformed, silence (for `silence` seconds), sensitive, network_error; at the end
no_usage, usage_apart (usage in a chunk of its own).
"""
from __future__ import annotations

import hashlib
import random
import re
import shlex
import threading
from collections import OrderedDict

import msgspec

from ..tokens import offline_encoding

from .. import wire

FAULTS = {
    # fault name -> (HTTP status, Z.ai business code, message) for faults answered before a token
    "1113": (429, "1113", "Insufficient balance or no resource package. Please recharge."),
    "1302": (429, "1302", "High concurrency usage of this API, please reduce concurrency or contact customer service to increase limits"),
    "1305": (429, "1305", "The service may be temporarily overloaded, please try again later"),
    "1308": (429, "1308", "Usage limit reached for 5 hour. Your limit will reset at 2025-10-09 05:38:28"),
    "1309": (429, "1309", "Your GLM Coding Plan package has expired. Please renew at https://z.ai/subscribe"),
    "1214": (400, "1214", "Incorrect role information"),
    "1261": (400, "1261", "Prompt exceeds max length"),
    "1301": (400, "1301", "System detected potentially unsafe or sensitive content in input or generation."),
    "500": (500, "500", "Internal Error"),
}
# faults that strike mid-stream, after half of the pieces
MID_STREAM_FAULTS = {"reset", "malformed", "silence", "sensitive", "network_error", "no_usage"}

_WORDS = (
    "the function returns a value after it reads the file and checks each line for errors "
    "then we update the test so that it covers the edge case where input is empty and "
    "refactor the loop into a helper with a clear name because small pieces are easier to "
    "review while the build stays green and every module keeps one job"
).split()
_REASONING = (
    "let me think about what the user wants first I should look at the code then decide "
    "which change is smallest and safe the question seems to need a careful answer"
).split()
_DIRECTIVE = re.compile(r"\[\[sim\s+([^\]]*)\]\]")
_PATHLIKE = re.compile(r"/?(?:[\w.\-]+/)*[\w\-]+\.[A-Za-z0-9]{1,8}\b")
_ABSOLUTE_PATH = re.compile(r"/(?:[\w.\-]+/)+[\w\-]+\.[A-Za-z0-9]{1,8}\b")
_READERS = ("read", "read_file", "readfile", "view", "view_file", "cat")
# tools that run a command (Codex reads a file with one): a reader is asked `cat PATH`
_SHELLS = ("exec_command", "shell", "shell_command", "local_shell", "bash", "run_command")
_COMMAND_KEYS = ("cmd", "command")
_PATH_KEYS = ("file_path", "path", "filePath", "absolute_path", "filename", "file", "target_file")


class BadDirective(ValueError):
    """A directive the simulator cannot read: answered 400 (Z.ai's 1210, invalid parameter)."""


# What a directive may ask, at most: a request must not make the simulator build a billion
# pieces or sleep for a day. (name -> (least, most)); GLM-4.6 writes at most 131,072 tokens.
DIRECTIVE_BOUNDS: dict[str, tuple[float, float]] = {
    "tokens": (0, 131_072), "reasoning": (0, 131_072), "tools": (1, 64),
    "ttft": (0, 600_000), "tps": (0, 1_000_000), "silence": (0, 600), "header_delay": (0, 600),
}


def _clamp(value: float, least: float, most: float) -> float:
    if value != value:  # NaN
        return least
    return min(max(value, least), most)


class Directive(msgspec.Struct, kw_only=True):
    tokens: int | None = None
    reasoning: int | None = None
    ttft: float | None = None
    tps: float | None = None
    fault: str | None = None
    tool: str | None = None
    tools: int = 1
    text: str | None = None
    empty_args: bool = False
    silence: float = 30.0
    header_delay: float = 0.0  # seconds before the response starts at all (a queued request)
    tail_delay: float = 0.0  # seconds between the usage chunk and the end of the stream
    once: bool = False  # the faults strike only the first time this conversation is seen


class Piece(msgspec.Struct, frozen=True):
    kind: str  # reasoning | content | tool_start | tool_args
    text: str = ""
    index: int = 0
    call_id: str = ""
    name: str = ""


class Script(msgspec.Struct):
    pieces: list[Piece]
    finish_reason: str
    usage: wire.Usage
    ttft: float  # seconds before the first piece
    interval: float  # seconds between pieces
    faults: frozenset[str] = frozenset()
    fault_at: int = 0  # index in pieces where mid-stream faults strike
    silence: float = 30.0
    header_delay: float = 0.0
    tail_delay: float = 0.0


class SimConfig(msgspec.Struct, kw_only=True, frozen=True):
    seed: int = 0
    ttft_ms: float = 0.0
    tokens_per_second: float = 0.0  # 0: as fast as possible
    output_tokens: int = 48
    reasoning_tokens: int = 24
    # accepted upstream keys; empty accepts any non-empty key
    keys: tuple[str, ...] = ()
    # stream usage: always (GLM's own API: unasked, in the finish chunk); when_asked (OpenAI's
    # rule, vLLM, SGLang: only with stream_options.include_usage, in a chunk of its own);
    # never; reject_field (a strict server: a 400 naming stream_options when it is sent)
    usage_mode: str = "always"
    # a fault for every request whose directive names none (an upstream that is down, or
    # always at its concurrency limit: failover tests)
    fault: str = ""


class _Tokenizer:
    @staticmethod
    def count(text: str) -> int:
        return len(offline_encoding("cl100k_base").encode_ordinary(text)) if text else 0


class _PrefixCache:
    """Implicit prefix caching, as Z.ai does it: a prompt whose leading messages were seen
    before reports those messages' tokens as cached."""

    def __init__(self, size: int = 4096) -> None:
        self._seen: OrderedDict[bytes, int] = OrderedDict()
        self._size = size
        self._lock = threading.Lock()

    def cached_tokens(self, message_tokens: list[int], message_keys: list[bytes]) -> int:
        cached = 0
        running = 0
        digest = hashlib.sha256()
        with self._lock:
            for i, key in enumerate(message_keys):
                digest.update(key)
                prefix = digest.copy().digest()
                running += message_tokens[i]
                if i < len(message_keys) - 1 and prefix in self._seen:
                    cached = running
                self._seen[prefix] = running
                self._seen.move_to_end(prefix)
            while len(self._seen) > self._size:
                self._seen.popitem(last=False)
        return cached


class Engine:
    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self._cache = _PrefixCache()
        self._struck: set[int] = set()
        self._once_lock = threading.Lock()

    def directive(self, request: wire.ChatRequest) -> Directive:
        for message in reversed(request.messages):
            if message.role == "user":
                found = _DIRECTIVE.search(message.text())
                if not found:
                    break
                fields: dict[str, object] = {}
                try:
                    tokens = shlex.split(found.group(1))
                except ValueError as exc:  # an unbalanced quote
                    raise BadDirective(f"Invalid simulator directive: {exc}") from None
                for token in tokens:
                    key, _, value = token.partition("=")
                    fields[key] = value if value else "true"
                try:
                    directive = msgspec.convert(fields, Directive, strict=False)
                except msgspec.ValidationError as exc:
                    raise BadDirective(f"Invalid simulator directive: {exc}") from None
                bounded = {}
                for name, (least, most) in DIRECTIVE_BOUNDS.items():
                    value = getattr(directive, name)
                    if value is not None:
                        kind = type(value)
                        bounded[name] = kind(_clamp(value, least, most))
                return msgspec.structs.replace(directive, **bounded)
        return Directive()

    def prompt_tokens(self, request: wire.ChatRequest) -> tuple[int, int]:
        """(prompt tokens, cached prompt tokens) as the simulated GLM counts them."""
        per_message: list[int] = []
        keys: list[bytes] = []
        for message in request.messages:
            body = message.text()
            if message.reasoning_content:
                body += message.reasoning_content
            if message.tool_calls:
                body += "".join(c.function.name + c.function.arguments for c in message.tool_calls)
            per_message.append(_Tokenizer.count(body) + 3)
            keys.append(wire.encoder.encode(message))
        tools = 0
        if request.tools:
            tools = _Tokenizer.count(wire.encoder.encode(request.tools).decode())
        total = sum(per_message) + tools + 2
        return total, self._cache.cached_tokens(per_message, keys)

    def plan(self, request: wire.ChatRequest) -> Script:
        directive = self.directive(request)
        seed = int.from_bytes(hashlib.sha256(
            self.config.seed.to_bytes(8, "big") + wire.encoder.encode(request.messages)).digest()[:8], "big")
        rng = random.Random(seed)
        # GLM never writes more than max_tokens (reasoning included): neither does this
        budget = request.max_tokens if isinstance(request.max_tokens, int) else 1 << 30
        thinking = not (isinstance(request.thinking, wire.Thinking) and request.thinking.type == "disabled")
        pieces: list[Piece] = []
        spent = 0
        finish = "stop"

        def add(piece: Piece) -> bool:
            nonlocal spent, finish
            cost = _Tokenizer.count(piece.text or piece.name)
            if spent + cost > budget:
                finish = "length"
                return False
            pieces.append(piece)
            spent += cost
            return True

        reasoning_n = directive.reasoning if directive.reasoning is not None else (
            self.config.reasoning_tokens if thinking else 0)
        for _ in range(reasoning_n):
            if not add(Piece("reasoning", " " + rng.choice(_REASONING))):
                break

        calls = self._tool_calls(request, directive, rng)
        if calls and finish == "stop":
            for index, (name, arguments) in enumerate(calls):
                call_id = f"call_{seed % 10**12:012d}{index}"
                if not add(Piece("tool_start", index=index, call_id=call_id, name=name)):
                    break
                # arguments arrive in fragments, as with tool_stream
                step = max(1, len(arguments) // 3)
                for start in range(0, len(arguments), step):
                    if not add(Piece("tool_args", arguments[start:start + step], index=index)):
                        break
                if finish == "length":
                    break
            else:
                finish = "tool_calls"
        elif finish == "stop":
            if directive.text is not None:
                content = [w for w in re.split(r"(\s+)", directive.text) if w]
            else:
                answer = self._answer_from_tool_result(request)
                n = directive.tokens if directive.tokens is not None else self.config.output_tokens
                content = re.findall(r"\s*\S+", answer) + [
                    " " + rng.choice(_WORDS) for _ in range(n)]
            for text in content:
                if not add(Piece("content", text)):
                    break

        prompt, cached = self.prompt_tokens(request)
        completion = sum(_Tokenizer.count(p.text or p.name) for p in pieces)
        faults = frozenset(f for f in (directive.fault or self.config.fault).split(",") if f)
        if directive.once and faults:
            with self._once_lock:
                if seed in self._struck:
                    faults = frozenset()
                else:
                    self._struck.add(seed)
        fault_at = len(pieces) // 2
        for stop in faults & {"sensitive", "network_error"}:
            # GLM ends the answer early and reports what it actually sent
            pieces = pieces[:fault_at]
            finish = stop
            completion = sum(_Tokenizer.count(p.text or p.name) for p in pieces)
        # Z.ai reports no reasoning breakdown (glm-upstream.md §5.4): reasoning is inside
        # completion_tokens, and so it is here.
        usage = wire.Usage(
            prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
            prompt_tokens_details=wire.PromptTokensDetails(cached_tokens=cached))
        ttft = (directive.ttft if directive.ttft is not None else self.config.ttft_ms) / 1000
        tps = directive.tps if directive.tps is not None else self.config.tokens_per_second
        return Script(pieces=pieces, finish_reason=finish, usage=usage, ttft=ttft,
                      interval=1 / tps if tps > 0 else 0.0, faults=faults, fault_at=fault_at,
                      silence=directive.silence, header_delay=directive.header_delay,
                      tail_delay=directive.tail_delay)

    @staticmethod
    def _tool_results(request: wire.ChatRequest) -> list[str] | None:
        """The results of the tool calls the last assistant turn made; None when that turn
        made none (or there was none): then the model has yet to act on the user's words."""
        for i in range(len(request.messages) - 1, -1, -1):
            message = request.messages[i]
            if message.role == "assistant":
                if not message.tool_calls:
                    return None
                return [m.text() for m in request.messages[i + 1:] if m.role == "tool"]
        return None

    def _answer_from_tool_result(self, request: wire.ChatRequest) -> str:
        """After a tool ran, answer from what it returned, so clients can check the loop."""
        results = self._tool_results(request)
        if results:
            return "From the tool result: " + " ".join(r.strip() for r in results)[:400]
        return ""

    def _tool_calls(self, request: wire.ChatRequest, directive: Directive,
                    rng: random.Random) -> list[tuple[str, str]]:
        if not request.tools or directive.tool == "none":
            return []
        if self._tool_results(request) is not None:
            return []  # the tools ran: answer from their results instead
        last = next((m for m in reversed(request.messages) if m.role == "user"), None)
        if last is None:
            return []
        functions = [t.function for t in request.tools if isinstance(t.function, wire.FunctionDef)]
        if not functions:
            return []
        if directive.tool:
            chosen = [f for f in functions if f.name == directive.tool] or functions[:1]
        else:
            exact = [f for f in functions if f.name.lower() in _READERS]
            shells = [f for f in functions if f.name.lower() in _SHELLS]
            readers = [f for f in functions if re.search(r"read|view|cat", f.name, re.I)]
            chosen = exact[:1] or shells[:1] or readers[:1] or functions[:1]
        if directive.tools > 1:  # parallel calls: cycle through the tools offered
            chosen = (functions * directive.tools)[:directive.tools]
        text = last.text()
        calls = []
        for function in chosen:
            if directive.empty_args:
                calls.append((function.name, ""))
                continue
            calls.append((function.name, wire.encoder.encode(
                self._arguments(wire.schema_of(function.parameters), text, rng)).decode()))
        return calls

    @staticmethod
    def _arguments(schema: dict, user_text: str, rng: random.Random) -> dict:
        plain = _DIRECTIVE.sub("", user_text)
        # an absolute path is what the user most likely meant; agents' reminders name others
        found = _ABSOLUTE_PATH.search(plain) or _PATHLIKE.search(plain)
        path = found.group(0) if found else "README.md"
        value = _fill(schema, "", path, rng)
        return value if isinstance(value, dict) else {}


def _fill(schema: dict, name: str, path: str, rng: random.Random) -> object:
    """A value that satisfies `schema`, with the path wherever a file path is asked for."""
    kind = schema.get("type")
    if kind is None and isinstance(schema.get("anyOf"), list):
        options = [o for o in schema["anyOf"] if isinstance(o, dict) and o.get("type") != "null"]
        return _fill(options[0], name, path, rng) if options else None
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "string")
    pathlike = name in _PATH_KEYS or "path" in name.lower() or "file" in name.lower()
    if name in _COMMAND_KEYS and kind in ("string", "array"):
        return f"cat {path}" if kind == "string" else ["cat", path]
    if name == "input" and kind == "string":
        # a free-text tool (a Responses custom tool, e.g. Codex's apply_patch): a patch
        return f"*** Begin Patch\n*** Update File: {path}\n@@\n-old\n+new\n*** End Patch"
    if kind == "object" or (kind is None and "properties" in schema):
        properties = schema.get("properties") or {}
        required = schema.get("required") or list(properties)[:1]
        return {key: _fill(properties.get(key) or {}, key, path, rng) for key in required}
    if kind == "array":
        if not pathlike:
            return []
        return [_fill(schema.get("items") or {"type": "string"}, name, path, rng)]
    if kind in ("integer", "number"):
        return 1
    if kind == "boolean":
        return False
    return path if pathlike else rng.choice(_WORDS)
